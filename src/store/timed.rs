//! The store as the node uses it: every call timed and every failure
//! counted by kind, around the backend [`super::open`] gave.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::{
    ConsoleView, Health, NewSession, NewToken, RecordedRevocation, Redemption, Registry, Resumed,
    Revocation, Revoked, SessionEnd, SessionFilter, SessionLog, SessionRecord, Store, StoreError,
    Ticket, TokenStore, User, Vm,
};
use crate::metrics::{Metrics, global};
use crate::token::TokenHash;

/// The store operations, as the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StoreOp {
    InsertToken,
    Revoke,
    PurgeExpired,
    Redeem,
    ClaimMainChannel,
    Console,
    SetTicket,
    Resume,
    RevocationsAfter,
    LastRevocation,
    PurgeRevocations,
    OpenSession,
    CloseSession,
    SpiceSession,
    AddChannel,
    CloseOrphanedSessions,
    Sessions,
    Session,
    PurgeSessions,
    Ping,
    AddUser,
    User,
    Users,
    SetPassword,
    RemoveUser,
    AddVm,
    UpdateVm,
    Vm,
    Vms,
    RemoveVm,
}

impl StoreOp {
    /// The `op` label of `vncbroker_store_duration_seconds` and
    /// `vncbroker_store_errors_total`.
    pub fn label(self) -> &'static str {
        match self {
            StoreOp::InsertToken => "insert_token",
            StoreOp::Revoke => "revoke",
            StoreOp::PurgeExpired => "purge_expired",
            StoreOp::Redeem => "redeem",
            StoreOp::ClaimMainChannel => "claim_main_channel",
            StoreOp::Console => "console",
            StoreOp::SetTicket => "set_ticket",
            StoreOp::Resume => "resume",
            StoreOp::RevocationsAfter => "revocations_after",
            StoreOp::LastRevocation => "last_revocation",
            StoreOp::PurgeRevocations => "purge_revocations",
            StoreOp::OpenSession => "open_session",
            StoreOp::CloseSession => "close_session",
            StoreOp::SpiceSession => "spice_session",
            StoreOp::AddChannel => "add_channel",
            StoreOp::CloseOrphanedSessions => "close_orphaned_sessions",
            StoreOp::Sessions => "sessions",
            StoreOp::Session => "session",
            StoreOp::PurgeSessions => "purge_sessions",
            StoreOp::Ping => "ping",
            StoreOp::AddUser => "add_user",
            StoreOp::User => "user",
            StoreOp::Users => "users",
            StoreOp::SetPassword => "set_password",
            StoreOp::RemoveUser => "remove_user",
            StoreOp::AddVm => "add_vm",
            StoreOp::UpdateVm => "update_vm",
            StoreOp::Vm => "vm",
            StoreOp::Vms => "vms",
            StoreOp::RemoveVm => "remove_vm",
        }
    }
}

/// A store that times every call and counts failures, around another.
///
/// It implements every store interface by forwarding; the interfaces have
/// no default methods, so a new method cannot be left out by mistake.
pub struct TimedStore {
    inner: Arc<dyn Store>,
    metrics: &'static Metrics,
}

impl TimedStore {
    pub fn wrap(inner: Arc<dyn Store>) -> Arc<dyn Store> {
        Arc::new(TimedStore {
            inner,
            metrics: global(),
        })
    }

    async fn timed<T>(
        &self,
        op: StoreOp,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let r = call.await;
        self.metrics.store_call(
            op.label(),
            start.elapsed(),
            r.as_ref().err().map(StoreError::kind),
        );
        r
    }
}

#[async_trait]
impl TokenStore for TimedStore {
    async fn insert_token(&self, token: &NewToken) -> Result<i64, StoreError> {
        self.timed(StoreOp::InsertToken, self.inner.insert_token(token))
            .await
    }

    async fn revoke(&self, r: &Revocation) -> Result<Revoked, StoreError> {
        self.timed(StoreOp::Revoke, self.inner.revoke(r)).await
    }

    async fn purge_expired(&self, before: i64) -> Result<u64, StoreError> {
        self.timed(StoreOp::PurgeExpired, self.inner.purge_expired(before))
            .await
    }

    async fn redeem(&self, hash: &TokenHash, now: i64) -> Result<Option<Redemption>, StoreError> {
        self.timed(StoreOp::Redeem, self.inner.redeem(hash, now))
            .await
    }

    async fn claim_main_channel(&self, token_id: i64, now: i64) -> Result<bool, StoreError> {
        self.timed(
            StoreOp::ClaimMainChannel,
            self.inner.claim_main_channel(token_id, now),
        )
        .await
    }

    async fn console(&self, hash: &TokenHash, now: i64) -> Result<Option<ConsoleView>, StoreError> {
        self.timed(StoreOp::Console, self.inner.console(hash, now))
            .await
    }

    async fn set_ticket(&self, ticket: &Ticket) -> Result<(), StoreError> {
        self.timed(StoreOp::SetTicket, self.inner.set_ticket(ticket))
            .await
    }

    async fn resume(
        &self,
        token: &TokenHash,
        ticket: &TokenHash,
        client_ip: &str,
        now: i64,
    ) -> Result<Resumed, StoreError> {
        self.timed(
            StoreOp::Resume,
            self.inner.resume(token, ticket, client_ip, now),
        )
        .await
    }

    async fn revocations_after(
        &self,
        seq: i64,
        limit: u32,
    ) -> Result<Vec<RecordedRevocation>, StoreError> {
        self.timed(
            StoreOp::RevocationsAfter,
            self.inner.revocations_after(seq, limit),
        )
        .await
    }

    async fn last_revocation(&self) -> Result<i64, StoreError> {
        self.timed(StoreOp::LastRevocation, self.inner.last_revocation())
            .await
    }

    async fn purge_revocations(&self, before: i64) -> Result<u64, StoreError> {
        self.timed(
            StoreOp::PurgeRevocations,
            self.inner.purge_revocations(before),
        )
        .await
    }

    fn revocation_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.inner.revocation_signal()
    }
}

#[async_trait]
impl SessionLog for TimedStore {
    async fn session(&self, id: i64) -> Result<Option<SessionRecord>, StoreError> {
        self.timed(StoreOp::Session, self.inner.session(id)).await
    }

    async fn open_session(&self, session: &NewSession) -> Result<super::Opened, StoreError> {
        self.timed(StoreOp::OpenSession, self.inner.open_session(session))
            .await
    }

    async fn close_session(&self, id: i64, end: &SessionEnd) -> Result<(), StoreError> {
        self.timed(StoreOp::CloseSession, self.inner.close_session(id, end))
            .await
    }

    async fn spice_session(
        &self,
        token_id: i64,
        spice_session_id: u32,
    ) -> Result<Option<i64>, StoreError> {
        self.timed(
            StoreOp::SpiceSession,
            self.inner.spice_session(token_id, spice_session_id),
        )
        .await
    }

    async fn add_channel(
        &self,
        id: i64,
        joined: bool,
        bytes_to_client: u64,
        bytes_to_server: u64,
    ) -> Result<(), StoreError> {
        self.timed(
            StoreOp::AddChannel,
            self.inner
                .add_channel(id, joined, bytes_to_client, bytes_to_server),
        )
        .await
    }

    async fn close_orphaned_sessions(&self, node: &str, now: i64) -> Result<u64, StoreError> {
        self.timed(
            StoreOp::CloseOrphanedSessions,
            self.inner.close_orphaned_sessions(node, now),
        )
        .await
    }

    async fn sessions(&self, filter: &SessionFilter) -> Result<Vec<SessionRecord>, StoreError> {
        self.timed(StoreOp::Sessions, self.inner.sessions(filter))
            .await
    }

    async fn purge_sessions(&self, before: i64) -> Result<u64, StoreError> {
        self.timed(StoreOp::PurgeSessions, self.inner.purge_sessions(before))
            .await
    }
}

#[async_trait]
impl Registry for TimedStore {
    async fn set_password(&self, name: &str, hash: &str) -> Result<bool, StoreError> {
        self.timed(StoreOp::SetPassword, self.inner.set_password(name, hash))
            .await
    }

    async fn remove_user(&self, name: &str) -> Result<Option<Revoked>, StoreError> {
        self.timed(StoreOp::RemoveUser, self.inner.remove_user(name))
            .await
    }

    async fn update_vm(&self, vm: &Vm) -> Result<Option<Revoked>, StoreError> {
        self.timed(StoreOp::UpdateVm, self.inner.update_vm(vm))
            .await
    }

    async fn add_user(
        &self,
        name: &str,
        password_hash: &str,
        admin: bool,
    ) -> Result<i64, StoreError> {
        self.timed(
            StoreOp::AddUser,
            self.inner.add_user(name, password_hash, admin),
        )
        .await
    }

    async fn user(&self, name: &str) -> Result<Option<User>, StoreError> {
        self.timed(StoreOp::User, self.inner.user(name)).await
    }

    async fn users(&self) -> Result<Vec<User>, StoreError> {
        self.timed(StoreOp::Users, self.inner.users()).await
    }

    async fn add_vm(&self, vm: &Vm) -> Result<(), StoreError> {
        self.timed(StoreOp::AddVm, self.inner.add_vm(vm)).await
    }

    async fn vm(&self, id: i64) -> Result<Option<Vm>, StoreError> {
        self.timed(StoreOp::Vm, self.inner.vm(id)).await
    }

    async fn vms(&self) -> Result<Vec<Vm>, StoreError> {
        self.timed(StoreOp::Vms, self.inner.vms()).await
    }

    async fn remove_vm(&self, id: i64) -> Result<Option<Revoked>, StoreError> {
        self.timed(StoreOp::RemoveVm, self.inner.remove_vm(id))
            .await
    }

    /// Not timed: it runs once, at start.
    async fn sealed_vnc_password(&self) -> Result<Option<String>, StoreError> {
        self.inner.sealed_vnc_password().await
    }
}

#[async_trait]
impl Health for TimedStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.timed(StoreOp::Ping, self.inner.ping()).await
    }
}
