//! Where tokens, sessions, users and VMs live.
//!
//! Callers see only the [`Store`] trait, so a backend can be swapped by the
//! `database` URL alone. SQLite (`sqlite://PATH`) is the embedded default;
//! PostgreSQL (`postgres://...`) lets several nodes share one database.

pub mod conninfo;
mod pgtls;
mod postgres;
mod sql;
mod sqlite;
/// The private PostgreSQL server the tests use, from the test kit the
/// integration tests share.
#[cfg(test)]
pub(crate) use testkit::pg as testpg;
#[cfg(test)]
mod tests;
mod timed;

use std::sync::Arc;

use async_trait::async_trait;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use timed::{StoreOp, TimedStore};

pub use crate::policy::{SessionPolicy, VmPolicy};
pub use crate::protocol::Protocol;
use crate::token::TokenHash;

/// Errors callers branch on: a duplicate is retried or reported, an
/// unavailable store fails the request fast. `what` is the message shown to
/// operators; `source` keeps the backend's own error, where there was one.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique key already exists (a token hash, a user name, a VM id).
    #[error("already exists: {what}")]
    Conflict {
        what: String,
        #[source]
        source: Option<BackendError>,
    },
    /// A referenced row is missing (e.g. a VM's owner).
    #[error("not found: {what}")]
    NotFound {
        what: String,
        #[source]
        source: Option<BackendError>,
    },
    /// The database is locked, unreachable or cannot be opened.
    #[error("database unavailable: {what}")]
    Unavailable {
        what: String,
        #[source]
        source: Option<BackendError>,
    },
    /// Anything else the backend reported.
    #[error("database error: {what}")]
    Internal {
        what: String,
        #[source]
        source: Option<BackendError>,
    },
}

/// The error a backend's library reported.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A blocking database call panicked or was cancelled.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

impl StoreError {
    pub(crate) fn conflict(what: impl Into<String>) -> StoreError {
        StoreError::Conflict {
            what: what.into(),
            source: None,
        }
    }

    pub(crate) fn not_found(what: impl Into<String>) -> StoreError {
        StoreError::NotFound {
            what: what.into(),
            source: None,
        }
    }

    pub(crate) fn unavailable(what: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            what: what.into(),
            source: None,
        }
    }

    pub(crate) fn internal(what: impl Into<String>) -> StoreError {
        StoreError::Internal {
            what: what.into(),
            source: None,
        }
    }

    /// The same error, keeping `source` as its cause.
    pub(crate) fn caused_by(mut self, cause: impl Into<BackendError>) -> StoreError {
        let (StoreError::Conflict { source, .. }
        | StoreError::NotFound { source, .. }
        | StoreError::Unavailable { source, .. }
        | StoreError::Internal { source, .. }) = &mut self;
        *source = Some(cause.into());
        self
    }

    /// The `kind` label of `vncbroker_store_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Conflict { .. } => "conflict",
            StoreError::NotFound { .. } => "not_found",
            StoreError::Unavailable { .. } => "unavailable",
            StoreError::Internal { .. } => "internal",
        }
    }
}

/// A token row as minted. The target is fixed here, once.
#[derive(Clone)]
pub struct NewToken {
    pub hash: TokenHash,
    pub vm_id: i64,
    pub target_host: String,
    pub target_port: u16,
    pub vnc_password: Option<String>,
    pub user_name: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub single_use: bool,
    /// The caller's session string, sealed, for inventories that re-check
    /// live sessions with the caller's own rights.
    pub caller_session: Option<String>,
    /// The rules its session follows.
    pub policy: SessionPolicy,
    pub protocol: Protocol,
}

/// A user of the local registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub password_hash: String,
    pub admin: bool,
}

/// A VM of the local registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Vm {
    pub id: i64,
    pub name: String,
    pub vnc_host: String,
    pub vnc_port: u16,
    pub vnc_password: Option<String>,
    pub owner: String,
    /// Users other than the owner who may open the console.
    pub allowed: Vec<String>,
    /// Its console settings; unset ones take the broker's defaults.
    pub policy: VmPolicy,
    pub protocol: Protocol,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("vnc_host", &self.vnc_host)
            .field("vnc_port", &self.vnc_port)
            .field("vnc_password", &self.vnc_password.as_ref().map(|_| "<set>"))
            .field("owner", &self.owner)
            .field("allowed", &self.allowed)
            .field("policy", &self.policy)
            .field("protocol", &self.protocol)
            .finish()
    }
}

/// What the console page is told about its token, and the live sessions
/// it may hold a reconnect ticket for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleView {
    pub token_id: i64,
    pub single_use: bool,
    pub expires_at: i64,
    pub policy: SessionPolicy,
    pub protocol: Protocol,
    /// The token's live sessions, newest first.
    pub live: Vec<LiveSession>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSession {
    pub id: i64,
    pub client_addr: String,
    pub started_at: i64,
}

/// A reconnect ticket as it is stored: only its hash. It reopens a
/// single-use token's console once, from the address it was given to,
/// within the grace after its session dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub hash: TokenHash,
    pub session_id: i64,
    pub token_id: i64,
    pub client_ip: String,
}

/// What a reconnect ticket opened.
#[derive(Debug)]
pub enum Resumed {
    /// A new session of the token, continuing session `from`.
    Session { redemption: Redemption, from: i64 },
    /// The ticket's session is still live: the broker has not yet seen the
    /// connection drop.
    Pending,
    /// Unknown, used, past its grace, for another address, or its token was
    /// revoked or expired.
    Invalid,
}

/// What a redeemed token opens: the target fixed at mint time.
#[derive(Clone, PartialEq, Eq)]
pub struct Redemption {
    pub token_id: i64,
    pub vm_id: i64,
    pub target_host: String,
    pub target_port: u16,
    pub vnc_password: Option<String>,
    pub user_name: String,
    pub expires_at: i64,
    /// The caller's session string, sealed, where the inventory re-checks
    /// live sessions with it.
    pub caller_session: Option<String>,
    /// The last revocation the store had recorded when the token was
    /// redeemed: the session is subject to every later one.
    pub revocation_seq: i64,
    /// The rules the session follows, as minted.
    pub policy: SessionPolicy,
    /// Opens one session only: its console reconnects with a ticket.
    pub single_use: bool,
    pub protocol: Protocol,
}

impl std::fmt::Debug for Redemption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redemption")
            .field("token_id", &self.token_id)
            .field("vm_id", &self.vm_id)
            .field(
                "target",
                &format_args!("{}:{}", self.target_host, self.target_port),
            )
            .field("vnc_password", &self.vnc_password.as_ref().map(|_| "<set>"))
            .field("user_name", &self.user_name)
            .field("expires_at", &self.expires_at)
            .field(
                "caller_session",
                &self.caller_session.as_ref().map(|_| "<set>"),
            )
            .field("revocation_seq", &self.revocation_seq)
            .field("policy", &self.policy)
            .field("single_use", &self.single_use)
            .field("protocol", &self.protocol)
            .finish()
    }
}

/// Why console access was withdrawn; each cause gives the session its own
/// close reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The VM's console tokens were revoked through an API.
    Revoked,
    /// One session was ended by an administrator or its owner.
    SessionEnded,
    /// The VM was removed from the registry.
    VmRemoved,
    /// The VM's console moved or its VNC password changed.
    VmChanged,
    /// The user was removed.
    UserRemoved,
    /// The user may no longer open this VM's console.
    AccessRemoved,
}

impl Cause {
    /// The form stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Revoked => "revoked",
            Cause::SessionEnded => "session ended",
            Cause::VmRemoved => "vm removed",
            Cause::VmChanged => "vm changed",
            Cause::UserRemoved => "user removed",
            Cause::AccessRemoved => "access removed",
        }
    }

    /// Reads the stored form; one this version does not know is taken as a
    /// plain revocation, so a session still ends.
    pub fn parse(s: &str) -> Cause {
        [
            Cause::Revoked,
            Cause::SessionEnded,
            Cause::VmRemoved,
            Cause::VmChanged,
            Cause::UserRemoved,
            Cause::AccessRemoved,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
        .unwrap_or(Cause::Revoked)
    }
}

/// A revocation to record. Every field that is set must match a session for
/// it to end; with `session_id` unset, the matching tokens are revoked too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub vm_id: Option<i64>,
    pub user: Option<String>,
    pub session_id: Option<i64>,
    pub cause: Cause,
}

impl Revocation {
    /// Every session of a VM, and its tokens.
    pub fn vm(vm_id: i64, cause: Cause) -> Revocation {
        Revocation {
            vm_id: Some(vm_id),
            user: None,
            session_id: None,
            cause,
        }
    }

    /// A user's sessions and tokens, on one VM or on all.
    pub fn user(user: &str, vm_id: Option<i64>, cause: Cause) -> Revocation {
        Revocation {
            vm_id,
            user: Some(user.to_owned()),
            session_id: None,
            cause,
        }
    }

    /// One recorded session.
    pub fn session(record: &SessionRecord) -> Revocation {
        Revocation {
            vm_id: Some(record.vm_id),
            user: Some(record.user.clone()),
            session_id: Some(record.id),
            cause: Cause::SessionEnded,
        }
    }

    /// Whether a live session of `vm_id` by `user`, recorded as `session_id`,
    /// falls under this revocation.
    pub fn matches(&self, vm_id: i64, user: &str, session_id: Option<i64>) -> bool {
        self.vm_id.is_none_or(|v| v == vm_id)
            && self.user.as_deref().is_none_or(|u| u == user)
            && self.session_id.is_none_or(|s| session_id == Some(s))
    }
}

/// A recorded revocation, in the order the database gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRevocation {
    pub seq: i64,
    pub revocation: Revocation,
}

/// What recording a revocation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Revoked {
    /// Its place in the revocation order.
    #[serde(skip)]
    pub seq: i64,
    /// Tokens that could still have opened a console and no longer can.
    pub tokens: u64,
    /// Sessions recorded as live that it ends, on every node.
    pub sessions: u64,
}

impl Revoked {
    /// Two revocations recorded together: the later seq, the sums.
    pub fn and(self, other: Revoked) -> Revoked {
        Revoked {
            seq: self.seq.max(other.seq),
            tokens: self.tokens + other.tokens,
            sessions: self.sessions + other.sessions,
        }
    }
}

/// `u64` counters are stored as a signed 64-bit integer (SQLite's INTEGER,
/// PostgreSQL's BIGINT); a count past its range is kept at the maximum
/// rather than wrapping negative.
pub(crate) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Reads back a count stored by [`to_i64`]; a negative one (never written
/// by this program) reads as 0.
pub(crate) fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A revocation must name what it ends: one with no field set would end
/// every session everywhere, which no caller means.
pub(crate) fn check_scope(r: &Revocation) -> Result<(), StoreError> {
    if r.vm_id.is_none() && r.user.is_none() && r.session_id.is_none() {
        return Err(StoreError::internal(
            "a revocation must name a VM, a user or a session",
        ));
    }
    Ok(())
}

/// The revocations that changing a VM from `old` to `new` calls for: a new
/// console (host, port, password or protocol) ends every session of the VM; otherwise
/// each user who was owner or allowed and is neither any more loses theirs.
/// Backends skip the users who are admins, whom the change does not affect.
pub(crate) fn withdrawn(old: &Vm, new: &Vm) -> Vec<Revocation> {
    if old.vnc_host != new.vnc_host
        || old.vnc_port != new.vnc_port
        || old.vnc_password != new.vnc_password
        || old.protocol != new.protocol
    {
        return vec![Revocation::vm(new.id, Cause::VmChanged)];
    }
    let keeps = |u: &String| *u == new.owner || new.allowed.contains(u);
    let mut lost: Vec<&String> = std::iter::once(&old.owner)
        .chain(old.allowed.iter())
        .filter(|u| !keeps(u))
        .collect();
    lost.sort();
    lost.dedup();
    lost.into_iter()
        .map(|u| Revocation::user(u, Some(new.id), Cause::AccessRemoved))
        .collect()
}

/// A proxied session as it starts.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub token_id: i64,
    pub vm_id: i64,
    pub user_name: String,
    pub client_addr: String,
    pub node: String,
    pub started_at: i64,
    pub view_only: bool,
    /// The VM takes one control session at a time: a control session opens
    /// only if no other is live, wherever it runs.
    pub exclusive: bool,
    pub recording: bool,
    /// The session this one continues, reopened with a reconnect ticket.
    pub resumed_from: Option<i64>,
    pub protocol: Protocol,
    /// SPICE: the session id the server gave the main channel, which the
    /// session's other channels link with.
    pub spice_session_id: Option<u32>,
}

/// Whether a session row was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Session(i64),
    /// The VM is exclusive and another control session is live.
    ControlTaken,
}

impl Opened {
    /// The new row's id, unless the session was turned away.
    pub fn id(self) -> Option<i64> {
        match self {
            Opened::Session(id) => Some(id),
            Opened::ControlTaken => None,
        }
    }
}

/// What the proxy saw of a session's input, where it followed the
/// messages. Keystroke contents are never kept, only counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Audit {
    pub key_events: u64,
    pub pointer_events: u64,
    pub clipboard_bytes_to_vm: u64,
    /// Known only where the VNC server's stream was parsed.
    pub clipboard_bytes_from_vm: Option<u64>,
}

/// How a session's recording went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordingState {
    /// The session is live and being recorded.
    Recording,
    Complete,
    /// It stopped early (the writer fell behind, the disk failed, the node
    /// died): it holds the session up to that point.
    Incomplete,
}

impl RecordingState {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordingState::Recording => "recording",
            RecordingState::Complete => "complete",
            RecordingState::Incomplete => "incomplete",
        }
    }

    pub fn parse(s: &str) -> RecordingState {
        match s {
            "recording" => RecordingState::Recording,
            "complete" => RecordingState::Complete,
            _ => RecordingState::Incomplete,
        }
    }
}

/// How a proxied session ended.
#[derive(Debug, Clone)]
pub struct SessionEnd {
    pub ended_at: i64,
    pub bytes_to_client: u64,
    pub bytes_to_server: u64,
    pub reason: String,
    /// `None` for a session relayed without following its messages.
    pub audit: Option<Audit>,
    pub recording: Option<RecordingState>,
    /// What becomes of the session's reconnect ticket.
    pub ticket: TicketEnd,
}

/// What becomes of a session's reconnect ticket as it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketEnd {
    /// The session cannot have one (its token is reusable).
    NoTicket,
    /// It ended for good: the ticket goes.
    Void,
    /// Its connection dropped: the ticket is valid until then (Unix time).
    ValidUntil(i64),
}

/// A recorded session, as `vncbroker sessions` and the API list them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SessionRecord {
    pub id: i64,
    pub vm_id: i64,
    pub user: String,
    pub client_addr: String,
    pub node: String,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    pub bytes_to_client: u64,
    pub bytes_to_server: u64,
    pub close_reason: Option<String>,
    pub view_only: bool,
    /// The input counts; `null` while live, and for a session relayed
    /// without following its messages.
    pub key_events: Option<u64>,
    pub pointer_events: Option<u64>,
    pub clipboard_bytes_to_vm: Option<u64>,
    pub clipboard_bytes_from_vm: Option<u64>,
    /// Whether the session was recorded.
    pub recording: bool,
    pub recording_state: Option<RecordingState>,
    /// The session this one continues, reopened with a reconnect ticket.
    pub resumed_from: Option<i64>,
    pub protocol: Protocol,
    /// Connections the console used: 1 for VNC; for SPICE, its main
    /// channel and every channel that joined it.
    pub channels: u64,
}

/// Which sessions to list; newest first, at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFilter {
    pub vm_id: Option<i64>,
    pub user: Option<String>,
    /// Only sessions started at or after this Unix time.
    pub since: Option<i64>,
    /// Only live sessions.
    pub live: bool,
    pub limit: u32,
}

/// How long a revocation stays in the log: every proxy follows it within
/// seconds, and a day covers a node that lost the database for a while.
pub const REVOCATION_LOG_SECS: i64 = 86_400;

/// What the token service and the proxy need: tokens are minted, redeemed
/// and revoked, and proxies follow the revocations.
#[async_trait]
pub trait TokenStore: Send + Sync {
    /// Stores a minted token; [`StoreError::Conflict`] if its hash exists.
    async fn insert_token(&self, token: &NewToken) -> Result<i64, StoreError>;
    /// Records a revocation, revokes the tokens it covers and counts the live
    /// sessions it ends, in one transaction.
    async fn revoke(&self, r: &Revocation) -> Result<Revoked, StoreError>;
    /// Deletes tokens that expired at or before `before`, and revoked ones
    /// (the revocation log, not the token, ends sessions); returns how many.
    async fn purge_expired(&self, before: i64) -> Result<u64, StoreError>;
    /// Redeems a token for a new session, atomically: `None` if it is
    /// unknown, expired, revoked, or single-use and already used. Of several
    /// concurrent redemptions of a single-use token, exactly one wins. The
    /// answer carries the last revocation seq recorded before it.
    ///
    /// A SPICE token is only read here, used or not: which
    /// of its connections is the session's one main channel is known only
    /// after its link message, and the main channel then claims it.
    async fn redeem(&self, hash: &TokenHash, now: i64) -> Result<Option<Redemption>, StoreError>;
    /// SPICE: takes the token's use for a main channel, atomically: false if
    /// it is single-use and already used, or was revoked or expired since it
    /// was read. A reusable token's use is only noted.
    async fn claim_main_channel(&self, token_id: i64, now: i64) -> Result<bool, StoreError>;
    /// Revocations after `seq`, oldest first, at most `limit`. Proxies poll
    /// it to end live sessions; revocations are rare, so the answer is small.
    async fn revocations_after(
        &self,
        seq: i64,
        limit: u32,
    ) -> Result<Vec<RecordedRevocation>, StoreError>;
    /// The seq of the newest revocation (0 if none).
    async fn last_revocation(&self) -> Result<i64, StoreError>;
    /// Deletes revocations recorded before `before` (Unix time); returns how
    /// many.
    async fn purge_revocations(&self, before: i64) -> Result<u64, StoreError>;

    /// The token's rules and live sessions, without redeeming it: `None` if
    /// it is unknown, expired or revoked.
    async fn console(&self, hash: &TokenHash, now: i64) -> Result<Option<ConsoleView>, StoreError>;
    /// Stores a live session's reconnect ticket, replacing the one it had.
    async fn set_ticket(&self, ticket: &Ticket) -> Result<(), StoreError>;
    /// Redeems a reconnect ticket for a new session of the single-use token
    /// `token`, atomically and once.
    async fn resume(
        &self,
        token: &TokenHash,
        ticket: &TokenHash,
        client_ip: &str,
        now: i64,
    ) -> Result<Resumed, StoreError>;

    /// Woken whenever any node revokes tokens, if the backend can tell
    /// (PostgreSQL's `NOTIFY`); `None` where it cannot. Proxies still look
    /// periodically, so a missed wake-up only delays the end of a revoked
    /// session.
    fn revocation_signal(&self) -> Option<Arc<tokio::sync::Notify>>;
}

/// The record of proxied sessions: the proxy writes it, operators read it.
#[async_trait]
pub trait SessionLog: Send + Sync {
    /// Records the start of a proxied session. For an exclusive control
    /// session, checks and records in one step that no other control
    /// session of the VM is live, so two nodes cannot both let one in.
    async fn open_session(&self, session: &NewSession) -> Result<Opened, StoreError>;
    /// Records the end of a proxied session. Its bytes add to those its
    /// joined channels recorded.
    async fn close_session(&self, id: i64, end: &SessionEnd) -> Result<(), StoreError>;
    /// SPICE: the live session of token `token_id` whose main channel the
    /// server gave `spice_session_id`, for another channel to join; `None`
    /// if there is none (ended, another token's, made up).
    async fn spice_session(
        &self,
        token_id: i64,
        spice_session_id: u32,
    ) -> Result<Option<i64>, StoreError>;
    /// SPICE: a channel joined session `id` (`joined`), or ended and moved
    /// its bytes (not `joined`): adds to the row's counts.
    async fn add_channel(
        &self,
        id: i64,
        joined: bool,
        bytes_to_client: u64,
        bytes_to_server: u64,
    ) -> Result<(), StoreError>;
    /// Ends the rows `node` left open (it was killed, or lost the database
    /// while sessions ended), with reason "node restarted"; returns how many.
    /// A node calls it when it starts, before it opens any session.
    async fn close_orphaned_sessions(&self, node: &str, now: i64) -> Result<u64, StoreError>;
    /// Lists recorded sessions, newest first.
    async fn sessions(&self, filter: &SessionFilter) -> Result<Vec<SessionRecord>, StoreError>;
    /// One recorded session.
    async fn session(&self, id: i64) -> Result<Option<SessionRecord>, StoreError>;

    /// Deletes recorded sessions that ended before `before` (live sessions
    /// are kept whatever their age); returns how many. The session
    /// retention (`[sessions] retention_days`) calls it periodically.
    async fn purge_sessions(&self, before: i64) -> Result<u64, StoreError>;
}

/// The local registry of users and VMs, for the local inventory and the CLI.
#[async_trait]
pub trait Registry: Send + Sync {
    async fn add_user(
        &self,
        name: &str,
        password_hash: &str,
        admin: bool,
    ) -> Result<i64, StoreError>;
    async fn user(&self, name: &str) -> Result<Option<User>, StoreError>;
    async fn users(&self) -> Result<Vec<User>, StoreError>;
    /// Replaces a user's password hash; false if there is no such user.
    async fn set_password(&self, name: &str, password_hash: &str) -> Result<bool, StoreError>;
    /// Removes a user, revoking their tokens and ending their sessions;
    /// `None` if there was none. A user who owns VMs is a
    /// [`StoreError::Conflict`]: their VMs need another owner first.
    async fn remove_user(&self, name: &str) -> Result<Option<Revoked>, StoreError>;

    /// Adds a VM; the owner and allowed users must exist.
    async fn add_vm(&self, vm: &Vm) -> Result<(), StoreError>;
    async fn vm(&self, id: i64) -> Result<Option<Vm>, StoreError>;
    async fn vms(&self) -> Result<Vec<Vm>, StoreError>;
    /// Replaces a VM's settings and allowed users. In the same transaction,
    /// a changed console (host, port or VNC password) ends every session of
    /// the VM and revokes its tokens, and each user who lost access (not an
    /// admin, no longer owner nor allowed) loses their sessions and tokens
    /// on it. `None` if there is no such VM.
    async fn update_vm(&self, vm: &Vm) -> Result<Option<Revoked>, StoreError>;
    /// Removes a VM, revokes its tokens (the purge deletes them soon after)
    /// and ends its sessions; `None` if there was none.
    async fn remove_vm(&self, id: i64) -> Result<Option<Revoked>, StoreError>;

    /// One VM's sealed VNC password, if any VM has one: the key check at
    /// start opens it, and a database holding one never gets a new key.
    async fn sealed_vnc_password(&self) -> Result<Option<String>, StoreError>;
}

/// Whether the store answers, for `/readyz`.
#[async_trait]
pub trait Health: Send + Sync {
    /// A cheap query that succeeds while the store answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Every interface at once: what [`open`] gives, for the node's wiring to
/// hand each caller the part it needs.
pub trait Store: TokenStore + SessionLog + Registry + Health {}

impl<T: TokenStore + SessionLog + Registry + Health + ?Sized> Store for T {}

/// Opens the store a `database` URL names, creating and migrating it.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(StoreError::unavailable(
                "sqlite:// needs a file path, e.g. sqlite:///var/lib/vncbroker/db.sqlite",
            ));
        }
        let store = SqliteStore::open(path.to_owned()).await?;
        return Ok(Arc::new(store));
    }
    if conninfo::is_conninfo(url) {
        return Ok(Arc::new(PgStore::open(url).await?));
    }
    // Only the scheme is shown: the rest may hold a password.
    let scheme = match url.split_once("://") {
        Some((scheme, _)) => format!("database URL scheme {scheme:?}"),
        None => "database setting".to_owned(),
    };
    Err(StoreError::unavailable(format!(
        "unsupported {scheme}: use sqlite://PATH, postgres://USER@HOST/DB, or libpq \
         keyword=value pairs"
    )))
}

/// The `database` setting as logs may show it: an SQLite URL as it is, a
/// PostgreSQL connection string rebuilt from its parsed settings without the
/// password, and anything else not at all.
pub fn redact_database_url(url: &str) -> String {
    if url.starts_with("sqlite://") {
        url.to_owned()
    } else if conninfo::is_conninfo(url) {
        conninfo::redact(url)
    } else {
        "<unsupported database setting>".to_owned()
    }
}
