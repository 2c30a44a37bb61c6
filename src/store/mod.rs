//! Where tokens, sessions, users and VMs live.
//!
//! Callers see only the [`Store`] trait, so a backend can be swapped by the
//! `database` URL alone. SQLite (`sqlite://PATH`) is the embedded default;
//! PostgreSQL (`postgres://...`) lets several nodes share one database.

pub mod conninfo;
mod pgtls;
mod postgres;
mod sqlite;
/// The private PostgreSQL server the tests use; the integration tests
/// include the same file as `common::pg`.
#[cfg(test)]
#[path = "../../tests/common/pg.rs"]
pub(crate) mod testpg;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use async_trait::async_trait;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use crate::token::TokenHash;

/// Errors callers branch on: a duplicate is retried or reported, an
/// unavailable store fails the request fast.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique key already exists (a token hash, a user name, a VM id).
    #[error("already exists: {0}")]
    Conflict(String),
    /// A referenced row is missing (e.g. a VM's owner).
    #[error("not found: {0}")]
    NotFound(String),
    /// The database is locked, unreachable or cannot be opened.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Anything else the backend reported.
    #[error("database error: {0}")]
    Internal(String),
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
            .finish()
    }
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
            .finish()
    }
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
}

/// How a proxied session ended.
#[derive(Debug, Clone)]
pub struct SessionEnd {
    pub ended_at: i64,
    pub bytes_to_client: u64,
    pub bytes_to_server: u64,
    pub reason: String,
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
}

/// Which sessions to list; newest first, at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFilter {
    pub vm_id: Option<i64>,
    pub user: Option<String>,
    /// Only sessions started at or after this Unix time.
    pub since: Option<i64>,
    pub limit: u32,
}

/// The persistence interface. Each method is one thing a caller needs, done
/// atomically by the backend.
#[async_trait]
pub trait Store: Send + Sync {
    /// Stores a minted token; [`StoreError::Conflict`] if its hash exists.
    async fn insert_token(&self, token: &NewToken) -> Result<i64, StoreError>;
    /// Revokes every live token of a VM and returns how many.
    async fn revoke_vm_tokens(&self, vm_id: i64, now: i64) -> Result<u64, StoreError>;
    /// Deletes tokens that expired at or before `before`, or were revoked
    /// more than a grace period before it; returns how many.
    async fn purge_expired(&self, before: i64) -> Result<u64, StoreError>;
    /// Redeems a token for a new session, atomically: `None` if it is
    /// unknown, expired, revoked, or single-use and already used. Of several
    /// concurrent redemptions of a single-use token, exactly one wins.
    async fn redeem(&self, hash: &TokenHash, now: i64) -> Result<Option<Redemption>, StoreError>;
    /// Ids of tokens revoked at or after `since` (by an API call, or because
    /// their VM was removed). Proxies poll it to end live sessions; revocations
    /// are rare, so the answer is small.
    async fn revoked_since(&self, since: i64) -> Result<Vec<i64>, StoreError>;

    /// Records the start of a proxied session; returns its id.
    async fn open_session(&self, session: &NewSession) -> Result<i64, StoreError>;
    /// Records the end of a proxied session.
    async fn close_session(&self, id: i64, end: &SessionEnd) -> Result<(), StoreError>;
    /// Ends the rows `node` left open (it was killed, or lost the database
    /// while sessions ended), with reason "node restarted"; returns how many.
    /// A node calls it when it starts, before it opens any session.
    async fn close_orphaned_sessions(&self, node: &str, now: i64) -> Result<u64, StoreError>;
    /// Lists recorded sessions, newest first.
    async fn sessions(&self, filter: &SessionFilter) -> Result<Vec<SessionRecord>, StoreError>;

    async fn add_user(
        &self,
        name: &str,
        password_hash: &str,
        admin: bool,
    ) -> Result<i64, StoreError>;
    async fn user(&self, name: &str) -> Result<Option<User>, StoreError>;
    async fn users(&self) -> Result<Vec<User>, StoreError>;

    /// Adds a VM; the owner and allowed users must exist.
    async fn add_vm(&self, vm: &Vm) -> Result<(), StoreError>;
    async fn vm(&self, id: i64) -> Result<Option<Vm>, StoreError>;
    async fn vms(&self) -> Result<Vec<Vm>, StoreError>;
    /// Removes a VM and revokes its tokens (the purge deletes them soon
    /// after); false if there was none.
    async fn remove_vm(&self, id: i64) -> Result<bool, StoreError>;

    /// Woken whenever any node revokes tokens, if the backend can tell
    /// (PostgreSQL's `NOTIFY`). Proxies still look periodically, so a missed
    /// wake-up only delays the end of a revoked session.
    fn revocation_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }

    /// Deletes recorded sessions that ended before `before` (live sessions
    /// are kept whatever their age); returns how many. The session
    /// retention (`[sessions] retention_days`) calls it periodically.
    async fn purge_sessions(&self, before: i64) -> Result<u64, StoreError> {
        let _ = before;
        Ok(0)
    }

    /// One VM's sealed VNC password, if any VM has one: the key check at
    /// start opens it, and a database holding one never gets a new key.
    async fn sealed_vnc_password(&self) -> Result<Option<String>, StoreError> {
        Ok(self.vms().await?.into_iter().find_map(|vm| vm.vnc_password))
    }

    /// A cheap query that succeeds while the store answers; `/readyz`
    /// calls it.
    async fn ping(&self) -> Result<(), StoreError> {
        self.sessions(&SessionFilter {
            limit: 0,
            ..SessionFilter::default()
        })
        .await
        .map(|_| ())
    }
}

/// Opens the store a `database` URL names, creating and migrating it.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(StoreError::Unavailable(
                "sqlite:// needs a file path, e.g. sqlite:///var/lib/vncbroker/db.sqlite".into(),
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
    Err(StoreError::Unavailable(format!(
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
