//! The token service: minting and revoking console tokens.
//!
//! Both APIs and the CLI go through here, so the rules (who may mint, how
//! long a token lives, what it is bound to) exist once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Serialize;

use crate::inventory::{Console, Credential, Grant, Inventory, InventoryError, Verdict};
use crate::policy::{Defaults, SessionPolicy};
use crate::protocol::Protocol;
use crate::secrets::{Secrets, SecretsError};
use crate::store::{
    Cause, NewToken, Redemption, Resumed, Revocation, Revoked, SessionFilter, SessionLog,
    SessionRecord, StoreError, Ticket, TokenStore,
};
use crate::token::{self, Policy, Token, TokenForm};

/// How many times minting retries on the (astronomically unlikely) event of
/// a duplicate token hash.
const MINT_ATTEMPTS: usize = 3;

/// What a caller may choose about a new token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MintRequest {
    pub ttl: Option<i64>,
    pub single_use: Option<bool>,
    /// The session may watch but not act: no input, no clipboard to the VM.
    pub view_only: bool,
}

/// A minted token as both APIs return it.
#[derive(Serialize, Clone, PartialEq, Eq)]
pub struct Minted {
    pub token: String,
    pub url: String,
    pub path: String,
    pub expires_at: i64,
    pub ttl: i64,
    pub vm_id: i64,
    pub single_use: bool,
    pub view_only: bool,
    /// What the console speaks, so a caller knows which client opens it.
    pub protocol: Protocol,
}

/// A token minted for a remote-viewer file, with what the file tells the
/// client about the session.
#[derive(Debug, Clone)]
pub struct ViewerMint {
    pub minted: Minted,
    pub policy: SessionPolicy,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field(
                "token",
                &format_args!("{}", token::fingerprint(&token::hash_token(&self.token))),
            )
            .field("expires_at", &self.expires_at)
            .field("vm_id", &self.vm_id)
            .field("protocol", &self.protocol)
            .finish()
    }
}

/// Why a token opened no console.
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    /// Unknown, expired, revoked or used up: callers never say which.
    #[error("token invalid or expired")]
    Invalid,
    /// A reconnect ticket whose session the broker still sees live: the
    /// drop has not been noticed yet.
    #[error("the console's previous connection is still open")]
    Pending,
    /// The VM is no longer where the token points.
    #[error("the VM moved since the token was minted")]
    Moved,
    /// The store cannot be asked.
    #[error("unavailable: {0}")]
    Store(#[from] StoreError),
    /// The inventory cannot tell where the VM is.
    #[error("unavailable: {0}")]
    Inventory(#[from] InventoryError),
    /// A sealed secret of the token does not open with this node's key.
    #[error("unavailable: {what}: {source}")]
    Secret {
        what: &'static str,
        #[source]
        source: SecretsError,
    },
}

/// Why a request failed. Each API maps the kinds to its own codes and
/// words: OpenNebula's in `api::xmlrpc`, HTTP statuses in `api::json`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The inventory refused or could not answer (authentication, access,
    /// the VM and its console, oned's own errors).
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error("{0}")]
    BadParameter(String),
    /// No such session, or not one the caller may see.
    #[error("no console session [{0}]")]
    NoSuchSession(i64),
    #[error("console session [{0}] has already ended")]
    SessionOver(i64),
    /// The caller may see the session but not this about it.
    #[error("{0}")]
    NotAllowed(String),
    /// The request is for another kind of console than the VM has (a
    /// remote-viewer file for a VNC VM).
    #[error("VM [{vm_id}] has a {} console; {why}", protocol.as_str().to_uppercase())]
    WrongProtocol {
        vm_id: i64,
        protocol: Protocol,
        why: &'static str,
    },
    /// The session has no recording this node can serve.
    #[error("console session [{id}] has no recording here: {why}")]
    NoRecording { id: i64, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A backend (the store, the inventory) cannot be asked just now.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// Whether a backend is down for now (try again), as opposed to a
    /// fault in the request or the broker.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ServiceError::Unavailable(_)
                | ServiceError::Inventory(InventoryError::Unavailable(_))
                | ServiceError::Store(StoreError::Unavailable { .. })
        )
    }
}

pub struct TokenService {
    tokens: Arc<dyn TokenStore>,
    log: Arc<dyn SessionLog>,
    inventory: Arc<dyn Inventory>,
    secrets: Secrets,
    /// Replaced on a configuration reload (SIGHUP).
    policy: std::sync::RwLock<Policy>,
    /// What sessions of VMs without their own settings follow; replaced on
    /// a reload.
    defaults: std::sync::RwLock<Defaults>,
    retention_days: AtomicU32,
    recordings: std::sync::RwLock<Recordings>,
    public_url: String,
}

/// Where this node keeps recordings and who may see them.
#[derive(Debug, Clone, Default)]
pub struct Recordings {
    pub dir: Option<std::path::PathBuf>,
    /// A session's own user may download and replay it (admins always may).
    pub owner_can_view: bool,
    /// Recordings older than this many days are deleted (0: never).
    pub retention_days: u32,
}

/// What the console page is told about its token before it connects, and
/// about its session once it is up.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct ConsoleSession {
    /// Which client the page opens the console with.
    pub protocol: crate::protocol::Protocol,
    pub view_only: bool,
    pub clipboard: &'static str,
    pub single_use: bool,
    pub expires_at: i64,
    /// When the caller's newest live session of the token started, if it
    /// has one from this address.
    pub started_at: Option<i64>,
    /// The reconnect ticket, for a single-use token's live session: it goes
    /// into an HttpOnly cookie, never into the answer's body or a log.
    #[serde(skip)]
    pub ticket: Option<String>,
}

/// A replay token as the API returns it.
#[derive(Serialize, Clone)]
pub struct ReplayToken {
    pub token: String,
    /// The replay page with the token in its fragment, which browsers do
    /// not send to servers or put in logs.
    pub url: String,
    pub session_id: i64,
    pub expires_at: i64,
}

/// How long a replay token opens its recording.
pub const REPLAY_TOKEN_SECS: i64 = 300;

/// What a replay token says, before it is sealed.
const REPLAY_PREFIX: &str = "replay:v1:";

impl TokenService {
    /// `secrets` seals the VNC password each token carries for the proxy.
    pub fn new(
        tokens: Arc<dyn TokenStore>,
        log: Arc<dyn SessionLog>,
        inventory: Arc<dyn Inventory>,
        secrets: Secrets,
        policy: Policy,
        public_url: &str,
    ) -> TokenService {
        TokenService {
            tokens,
            log,
            inventory,
            secrets,
            policy: std::sync::RwLock::new(policy),
            defaults: std::sync::RwLock::new(Defaults::default()),
            retention_days: AtomicU32::new(0),
            recordings: std::sync::RwLock::new(Recordings::default()),
            public_url: public_url.trim_end_matches('/').to_owned(),
        }
    }

    pub fn policy(&self) -> Policy {
        *self.policy.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies new token lifetime rules to later mints (configuration reload).
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = policy;
    }

    /// Applies new session defaults (clipboard, recording) to later mints.
    pub fn set_defaults(&self, defaults: Defaults) {
        *self.defaults.write().unwrap_or_else(|e| e.into_inner()) = defaults;
    }

    fn defaults(&self) -> Defaults {
        *self.defaults.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Mints a token for `vm_id` if `cred` may open its console.
    pub async fn mint(
        &self,
        cred: &Credential,
        vm_id: i64,
        req: MintRequest,
    ) -> Result<Minted, ServiceError> {
        // Parameters are checked before anything costly happens.
        let (ttl, single_use) = self.lifetime(req)?;
        let console = self.inventory.console(cred, vm_id).await?;
        self.mint_for(console, ttl, single_use, req.view_only).await
    }

    /// Mints a token for a console the caller already resolved (the local
    /// admin CLI does this without a credential).
    pub async fn mint_for_console(
        &self,
        console: Console,
        req: MintRequest,
    ) -> Result<Minted, ServiceError> {
        let (ttl, single_use) = self.lifetime(req)?;
        self.mint_for(console, ttl, single_use, req.view_only).await
    }

    /// Mints a token for a remote-viewer (`.vv`) file for `vm_id`, if
    /// `cred` may open its console and it is a SPICE console; the token is
    /// in lowercase form, which survives virt-viewer's proxy URL parsing.
    pub async fn mint_viewer(
        &self,
        cred: &Credential,
        vm_id: i64,
        req: MintRequest,
    ) -> Result<ViewerMint, ServiceError> {
        let (ttl, single_use) = self.lifetime(req)?;
        let console = self.inventory.console(cred, vm_id).await?;
        self.mint_viewer_for(console, ttl, single_use, req.view_only)
            .await
    }

    /// [`TokenService::mint_viewer`] for a console the caller already
    /// resolved (the local admin CLI).
    pub async fn mint_viewer_for_console(
        &self,
        console: Console,
        req: MintRequest,
    ) -> Result<ViewerMint, ServiceError> {
        let (ttl, single_use) = self.lifetime(req)?;
        self.mint_viewer_for(console, ttl, single_use, req.view_only)
            .await
    }

    async fn mint_viewer_for(
        &self,
        console: Console,
        ttl: i64,
        single_use: bool,
        view_only: bool,
    ) -> Result<ViewerMint, ServiceError> {
        if console.protocol != Protocol::Spice {
            return Err(ServiceError::WrongProtocol {
                vm_id: console.vm_id,
                protocol: console.protocol,
                why: "remote-viewer files are for SPICE consoles (open it in the console page)",
            });
        }
        let (minted, policy) = self
            .mint_in(console, ttl, single_use, view_only, TokenForm::Lowercase)
            .await?;
        Ok(ViewerMint { minted, policy })
    }

    /// This node's public URL, without a trailing slash.
    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    /// The ttl and single-use flag a request gets under the current policy.
    fn lifetime(&self, req: MintRequest) -> Result<(i64, bool), ServiceError> {
        let policy = self.policy();
        let ttl = policy
            .ttl(req.ttl)
            .map_err(|e| ServiceError::BadParameter(e.to_string()))?;
        Ok((ttl, policy.single_use(req.single_use)))
    }

    async fn mint_for(
        &self,
        console: Console,
        ttl: i64,
        single_use: bool,
        view_only: bool,
    ) -> Result<Minted, ServiceError> {
        let (minted, _) = self
            .mint_in(console, ttl, single_use, view_only, TokenForm::Base64Url)
            .await?;
        Ok(minted)
    }

    /// Mints a token written in `form`; the session policy it carries comes
    /// back with it.
    async fn mint_in(
        &self,
        console: Console,
        ttl: i64,
        single_use: bool,
        view_only: bool,
        form: TokenForm,
    ) -> Result<(Minted, SessionPolicy), ServiceError> {
        let now = crate::now_unix();
        let policy = SessionPolicy::resolve(console.policy, self.defaults(), view_only);
        let expires_at = now.saturating_add(ttl);
        let vnc_password = self
            .secrets
            .seal_opt(console.vnc_password.as_deref())
            .map_err(|e| ServiceError::Internal(format!("sealing the VNC password: {e}")))?;
        let caller_session = console
            .recheck_as
            .as_ref()
            .map(|c| self.secrets.seal(&format!("{}:{}", c.user, c.secret)))
            .transpose()
            .map_err(|e| ServiceError::Internal(format!("sealing the caller's session: {e}")))?;
        for _ in 0..MINT_ATTEMPTS {
            let token = Token::generate_in(form)
                .map_err(|e| ServiceError::Internal(format!("no OS randomness: {e}")))?;
            let row = NewToken {
                hash: token.hash(),
                vm_id: console.vm_id,
                target_host: console.host.clone(),
                target_port: console.port,
                vnc_password: vnc_password.clone(),
                user_name: console.user.clone(),
                created_at: now,
                expires_at,
                single_use,
                caller_session: caller_session.clone(),
                policy,
                protocol: console.protocol,
            };
            match self.tokens.insert_token(&row).await {
                Ok(id) => {
                    tracing::info!(
                        token_id = id,
                        token = %token::fingerprint(&row.hash),
                        vm_id = console.vm_id,
                        user = %console.user,
                        ttl,
                        single_use,
                        view_only,
                        protocol = %console.protocol,
                        "console token minted"
                    );
                    crate::metrics::global().token_minted();
                    let minted = self.minted(
                        token,
                        expires_at,
                        ttl,
                        console.vm_id,
                        single_use,
                        view_only,
                        console.protocol,
                    );
                    return Ok((minted, policy));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::Internal(
            "could not store a unique token".into(),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn minted(
        &self,
        token: Token,
        expires_at: i64,
        ttl: i64,
        vm_id: i64,
        single_use: bool,
        view_only: bool,
        protocol: Protocol,
    ) -> Minted {
        let text = token.into_string();
        // The page stops offering input on a view-only link; the proxy
        // enforces it whatever the page does.
        let mode = if view_only { "&view_only=1" } else { "" };
        Minted {
            url: format!("{}/console#token={}{mode}", self.public_url, text),
            path: format!("websockify?token={text}"),
            token: text,
            expires_at,
            ttl,
            vm_id,
            single_use,
            view_only,
            protocol,
        }
    }

    /// Revokes every token of `vm_id` and ends its live sessions on every
    /// node, if `cred` may act on the VM; a VM without a live console (off,
    /// suspended, migrating) can be revoked too.
    pub async fn revoke(&self, cred: &Credential, vm_id: i64) -> Result<Revoked, ServiceError> {
        let who = self.inventory.authorize(cred, vm_id).await?;
        let done = self
            .tokens
            .revoke(&Revocation::vm(vm_id, Cause::Revoked))
            .await?;
        tracing::info!(
            vm_id, user = %who.name, tokens = done.tokens, sessions = done.sessions,
            "console access revoked"
        );
        Ok(done)
    }

    /// The caller and session `id`, if the caller may see it: admins see
    /// every session, a user their own.
    async fn visible_session(
        &self,
        cred: &Credential,
        id: i64,
    ) -> Result<(crate::inventory::Principal, SessionRecord), ServiceError> {
        let who = self.inventory.authenticate(cred).await?;
        let record = self
            .log
            .session(id)
            .await?
            .filter(|s| who.admin || s.user == who.name)
            .ok_or(ServiceError::NoSuchSession(id))?;
        Ok((who, record))
    }

    /// Ends one live session on whichever node runs it: admins may end any,
    /// a user their own.
    pub async fn end_session(&self, cred: &Credential, id: i64) -> Result<Revoked, ServiceError> {
        let (who, record) = self.visible_session(cred, id).await?;
        if record.ended_at.is_some() {
            return Err(ServiceError::SessionOver(id));
        }
        let done = self.tokens.revoke(&Revocation::session(&record)).await?;
        tracing::info!(session = id, vm_id = record.vm_id, by = %who.name, "console session ended on request");
        Ok(done)
    }

    /// Lists recorded sessions: admins see all, a user only their own.
    pub async fn sessions(
        &self,
        cred: &Credential,
        mut filter: SessionFilter,
    ) -> Result<Vec<SessionRecord>, ServiceError> {
        let who = self.inventory.authenticate(cred).await?;
        if !who.admin {
            filter.user = Some(who.name);
        }
        Ok(self.log.sessions(&filter).await?)
    }

    /// Redeems a token for a new session, for this broker's proxy and for
    /// outside ones alike: it must be live (not expired, revoked, or used if
    /// single-use), and its VM must still be where the token points, so a
    /// stale token cannot reach whatever listens on that port now. The VNC
    /// password comes back opened.
    pub async fn redeem(&self, token_text: &str) -> Result<Redemption, RedeemError> {
        // Junk is refused without touching the store.
        if !token::looks_like_token(token_text) {
            return Err(RedeemError::Invalid);
        }
        let hash = token::hash_token(token_text);
        let r = self
            .tokens
            .redeem(&hash, crate::now_unix())
            .await?
            .ok_or(RedeemError::Invalid)?;
        crate::metrics::global().token_redeemed();
        tracing::debug!(token = %token::fingerprint(&hash), token_id = r.token_id, "token redeemed");
        self.settle(r).await
    }

    /// Reopens a single-use token's console with the reconnect ticket its
    /// dropped session held: the new session, and the one it continues.
    pub async fn resume(
        &self,
        token_text: &str,
        ticket: &str,
        client: std::net::IpAddr,
    ) -> Result<(Redemption, i64), RedeemError> {
        if !token::looks_like_token(token_text) || !token::looks_like_token(ticket) {
            return Err(RedeemError::Invalid);
        }
        let hash = token::hash_token(token_text);
        let resumed = self
            .tokens
            .resume(
                &hash,
                &token::hash_token(ticket),
                &client.to_string(),
                crate::now_unix(),
            )
            .await?;
        match resumed {
            Resumed::Session { redemption, from } => {
                tracing::debug!(token = %token::fingerprint(&hash), from, "console resumed with a reconnect ticket");
                Ok((self.settle(redemption).await?, from))
            }
            Resumed::Pending => Err(RedeemError::Pending),
            Resumed::Invalid => Err(RedeemError::Invalid),
        }
    }

    /// What the console page of `token_text` is told once its session is
    /// up; for a single-use token's live VNC session from `client`, with a
    /// new reconnect ticket (replacing the one it had). `None`: the token opens
    /// nothing.
    pub async fn console_session(
        &self,
        token_text: &str,
        client: std::net::IpAddr,
    ) -> Result<Option<ConsoleSession>, ServiceError> {
        if !token::looks_like_token(token_text) {
            return Ok(None);
        }
        let hash = token::hash_token(token_text);
        let Some(view) = self.tokens.console(&hash, crate::now_unix()).await? else {
            return Ok(None);
        };
        let mine = view.live.iter().find(|s| {
            s.client_addr
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| a.ip() == client)
        });
        let mut ticket = None;
        // A SPICE console's channels cannot be resumed one by one: no
        // ticket for it.
        let resumable = view.single_use && view.protocol == crate::protocol::Protocol::Vnc;
        if let (true, Some(session)) = (resumable, mine) {
            let t = Token::generate()
                .map_err(|e| ServiceError::Internal(format!("no OS randomness: {e}")))?;
            self.tokens
                .set_ticket(&Ticket {
                    hash: t.hash(),
                    session_id: session.id,
                    token_id: view.token_id,
                    client_ip: client.to_string(),
                })
                .await?;
            ticket = Some(t.into_string());
        }
        Ok(Some(ConsoleSession {
            protocol: view.protocol,
            view_only: view.policy.view_only,
            clipboard: view.policy.clipboard.as_str(),
            single_use: view.single_use,
            expires_at: view.expires_at,
            started_at: mine.map(|s| s.started_at),
            ticket,
        }))
    }

    /// The checks and unsealing every redeemed token goes through.
    async fn settle(&self, mut r: Redemption) -> Result<Redemption, RedeemError> {
        let here = self
            .inventory
            .still_at(r.vm_id, &r.target_host, r.target_port, r.protocol)
            .await?;
        if !here {
            return Err(RedeemError::Moved);
        }
        r.vnc_password = self
            .secrets
            .open_opt(r.vnc_password.as_deref())
            .map_err(|source| RedeemError::Secret {
                what: "stored VNC password",
                source,
            })?;
        r.caller_session =
            self.secrets
                .open_opt(r.caller_session.as_deref())
                .map_err(|source| RedeemError::Secret {
                    what: "stored caller session",
                    source,
                })?;
        Ok(r)
    }

    /// Redeems a token for an outside proxy (websockify's JSONTokenApi),
    /// answering only the target.
    pub async fn redeem_target(
        &self,
        token_text: &str,
    ) -> Result<Option<(String, u16)>, ServiceError> {
        use crate::metrics::{Refused, global as metrics};
        match self.redeem(token_text).await {
            // An outside proxy would relay SPICE without the link proxy:
            // the client would need the password, and a single-use token,
            // which only a main channel takes, would never be used up.
            Ok(r) if r.protocol == crate::protocol::Protocol::Spice => {
                Err(ServiceError::BadParameter(
                    "this token opens a SPICE console, which only vncbroker's own proxy carries"
                        .into(),
                ))
            }
            Ok(r) => {
                tracing::info!(vm_id = r.vm_id, user = %r.user_name, "token redeemed for an outside proxy");
                Ok(Some((r.target_host, r.target_port)))
            }
            Err(RedeemError::Invalid | RedeemError::Pending) => {
                metrics().refused(Refused::InvalidToken);
                Ok(None)
            }
            Err(RedeemError::Moved) => {
                metrics().refused(Refused::Moved);
                Ok(None)
            }
            Err(RedeemError::Store(e)) => Err(e.into()),
            Err(RedeemError::Inventory(e)) => Err(e.into()),
            Err(e @ RedeemError::Secret { .. }) => Err(ServiceError::Unavailable(e.to_string())),
        }
    }

    /// Re-checks the live sessions of one VM with the inventory.
    pub async fn recheck(&self, vm_id: i64, grants: &[Grant]) -> Vec<Verdict> {
        self.inventory.recheck(vm_id, grants).await
    }

    /// Where recordings are, and who may see them.
    pub fn set_recordings(&self, recordings: Recordings) {
        *self.recordings.write().unwrap_or_else(|e| e.into_inner()) = recordings;
    }

    /// How long recordings are kept (0: for ever); replaced on a reload.
    pub fn set_recording_retention_days(&self, days: u32) {
        self.recordings
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retention_days = days;
    }

    fn recordings(&self) -> Recordings {
        self.recordings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The file of session `id`'s recording, if `cred` may see it: admins
    /// may, the session's own user where `owner_can_view` says so.
    pub async fn recording(
        &self,
        cred: &Credential,
        id: i64,
    ) -> Result<std::path::PathBuf, ServiceError> {
        let (who, record) = self.visible_session(cred, id).await?;
        let rec = self.recordings();
        if !who.admin && !rec.owner_can_view {
            return Err(ServiceError::NotAllowed(format!(
                "only administrators may see the recording of console session [{id}]"
            )));
        }
        self.recording_file(&record, &rec)
    }

    fn recording_file(
        &self,
        record: &SessionRecord,
        rec: &Recordings,
    ) -> Result<std::path::PathBuf, ServiceError> {
        let id = record.id;
        if !record.recording {
            return Err(ServiceError::NoRecording {
                id,
                why: "the session was not recorded".into(),
            });
        }
        let dir = rec
            .dir
            .as_deref()
            .ok_or_else(|| ServiceError::NoRecording {
                id,
                why: "this node has no [recording] dir".into(),
            })?;
        let path = crate::recording::path_for(dir, id);
        if !path.is_file() {
            return Err(ServiceError::NoRecording {
                id,
                why: format!(
                    "it was recorded on node {:?}, or deleted by the retention",
                    record.node
                ),
            });
        }
        Ok(path)
    }

    /// A short-lived token that opens session `id`'s recording on the
    /// replay page, for a caller who may see it. It is sealed with the
    /// nodes' shared key, so any node with the recording can check it.
    pub async fn replay_token(
        &self,
        cred: &Credential,
        id: i64,
    ) -> Result<ReplayToken, ServiceError> {
        self.recording(cred, id).await?;
        let expires_at = crate::now_unix().saturating_add(REPLAY_TOKEN_SECS);
        let token = self
            .secrets
            .seal(&format!("{REPLAY_PREFIX}{id}:{expires_at}"))
            .map_err(|e| ServiceError::Unavailable(format!("replay tokens need the key: {e}")))?;
        Ok(ReplayToken {
            url: format!("{}/replay#token={token}", self.public_url),
            token,
            session_id: id,
            expires_at,
        })
    }

    /// The recording a replay token opens; `None` if the token is not one,
    /// or has expired.
    pub async fn replay(&self, token: &str) -> Result<Option<std::path::PathBuf>, ServiceError> {
        let Ok(plain) = self.secrets.open(token) else {
            return Ok(None);
        };
        let Some((id, expires_at)) = plain
            .strip_prefix(REPLAY_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .and_then(|(id, exp)| Some((id.parse::<i64>().ok()?, exp.parse::<i64>().ok()?)))
        else {
            return Ok(None);
        };
        if !crate::token::is_live(expires_at, crate::now_unix()) {
            return Ok(None);
        }
        let record = self
            .log
            .session(id)
            .await?
            .ok_or(ServiceError::NoSuchSession(id))?;
        self.recording_file(&record, &self.recordings()).map(Some)
    }

    /// How long ended session records are kept (0: for ever); replaced on a
    /// configuration reload.
    pub fn set_retention_days(&self, days: u32) {
        self.retention_days.store(days, Ordering::Relaxed);
    }

    /// Deletes expired tokens, revocations older than the log keeps, and,
    /// with a retention, session records that ended longer ago than that.
    /// Each failure is logged and the rest still runs.
    pub async fn purge(&self) {
        let now = crate::now_unix();
        match self.tokens.purge_expired(now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired console tokens deleted"),
            Err(e) => tracing::warn!(error = %e, "purging expired tokens failed"),
        }
        let kept_from = now.saturating_sub(crate::store::REVOCATION_LOG_SECS);
        if let Err(e) = self.tokens.purge_revocations(kept_from).await {
            tracing::warn!(error = %e, "purging old revocations failed");
        }
        let days = self.retention_days.load(Ordering::Relaxed);
        if days > 0 {
            let before = now.saturating_sub(i64::from(days) * 86_400);
            match self.log.purge_sessions(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    deleted = n,
                    retention_days = days,
                    "old session records deleted"
                ),
                Err(e) => tracing::warn!(error = %e, "deleting old session records failed"),
            }
        }
        let rec = self.recordings();
        if let (Some(dir), days) = (rec.dir, rec.retention_days)
            && days > 0
        {
            let before = std::time::SystemTime::now()
                - std::time::Duration::from_secs(u64::from(days) * 86_400);
            let done =
                tokio::task::spawn_blocking(move || crate::recording::purge(&dir, before)).await;
            match done {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => {
                    tracing::info!(deleted = n, retention_days = days, "old recordings deleted")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "deleting old recordings failed"),
                Err(e) => tracing::warn!(error = %e, "deleting old recordings failed"),
            }
        }
    }
}

/// Runs [`TokenService::purge`] every `every`, for as long as it is polled.
pub async fn purge_loop(service: Arc<TokenService>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        service.purge().await;
    }
}
