//! Where VMs and permissions come from.
//!
//! The broker asks one question of an inventory: may this caller open this
//! VM's console, and where is it? The local registry answers from the
//! broker's own database; an OpenNebula-backed inventory can answer the same
//! question by asking oned with the caller's session.

mod local;
pub mod opennebula;

use async_trait::async_trait;

pub use local::LocalInventory;

/// A caller's credentials, "user:password" in OpenNebula's session form.
/// `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub user: String,
    pub secret: String,
}

impl Credential {
    /// Splits an OpenNebula session string at its first colon.
    pub fn from_session(session: &str) -> Option<Credential> {
        let (user, secret) = session.split_once(':')?;
        if user.is_empty() {
            return None;
        }
        Some(Credential {
            user: user.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}:<redacted>)", self.user)
    }
}

/// Where a VM's console is, and the VNC password the proxy answers it with.
#[derive(Clone, PartialEq, Eq)]
pub struct Console {
    /// The authenticated user the console is granted to.
    pub user: String,
    pub vm_id: i64,
    pub host: String,
    pub port: u16,
    /// The console's password, VNC or SPICE, which the proxy answers the
    /// server with.
    pub vnc_password: Option<String>,
    /// The VM's own console settings.
    pub policy: crate::policy::VmPolicy,
    pub protocol: crate::protocol::Protocol,
    /// The caller's credential, where the inventory re-checks live
    /// sessions with the caller's own rights (it is then kept, sealed, with
    /// the token).
    pub recheck_as: Option<Credential>,
}

/// A live session as the inventory re-checks it: who, and the console its
/// token was bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub protocol: crate::protocol::Protocol,
    /// The credential the session was opened with, if the inventory kept it.
    pub caller: Option<Credential>,
}

/// Why a live session may not go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lapse {
    /// The VM no longer exists.
    VmGone,
    /// The VM is not running (powered off, suspended, stopped).
    VmStopped,
    /// The VM's console is elsewhere now (a migration, a new port).
    VmMoved,
    /// The user may no longer open this VM's console.
    AccessLost,
    /// The user's credential is no longer accepted (user removed, password
    /// changed, login token expired).
    CredentialRejected,
}

/// The re-check of one live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    End(Lapse),
    /// The inventory could not tell (unreachable); the session goes on.
    Unknown(String),
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("user", &self.user)
            .field("vm_id", &self.vm_id)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("vnc_password", &self.vnc_password.as_ref().map(|_| "<set>"))
            .field("policy", &self.policy)
            .field("protocol", &self.protocol)
            .field("recheck_as", &self.recheck_as)
            .finish()
    }
}

/// Why an inventory refused. Each maps to one OpenNebula error code.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("user couldn't be authenticated")]
    Authentication,
    #[error("user [{user}] is not authorized to use VM [{vm_id}]")]
    Authorization { user: String, vm_id: i64 },
    #[error("VM [{0}] does not exist")]
    NoSuchVm(i64),
    #[error("VM [{vm_id}] has no console: {why}")]
    NoConsole { vm_id: i64, why: String },
    #[error("VM [{vm_id}] console is not available now: {why}")]
    NotAvailable { vm_id: i64, why: String },
    /// oned refused for its own reasons; its code and message pass through.
    #[error("{message}")]
    Oned { code: i64, message: String },
    #[error("inventory unavailable: {0}")]
    Unavailable(String),
    /// Too many password checks are in progress; try again shortly.
    #[error("too many password checks in progress")]
    Busy,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    /// Sees and may act on everything.
    pub admin: bool,
}

/// The questions the token service asks.
#[async_trait]
pub trait Inventory: Send + Sync {
    /// Authenticates `cred`.
    async fn authenticate(&self, cred: &Credential) -> Result<Principal, InventoryError>;

    /// Authenticates `cred` and returns the console of `vm_id` if the caller
    /// may open it.
    async fn console(&self, cred: &Credential, vm_id: i64) -> Result<Console, InventoryError>;

    /// Authenticates `cred` and checks that the caller may act on `vm_id`
    /// (revoke its tokens), whatever state the VM is in.
    async fn authorize(&self, cred: &Credential, vm_id: i64) -> Result<Principal, InventoryError>;

    /// Whether the VM's console still speaks `protocol` at `host:port`,
    /// checked when a token is redeemed so that a token minted before a
    /// migration, a port change or a new console type cannot reach whatever
    /// listens there now. An inventory that cannot tell answers true.
    async fn still_at(
        &self,
        vm_id: i64,
        host: &str,
        port: u16,
        protocol: crate::protocol::Protocol,
    ) -> Result<bool, InventoryError>;

    /// Re-checks the live sessions of one VM, one verdict per grant in
    /// order: the VM must still exist, run and be where the token points
    /// (with the same protocol),
    /// and each user must still be allowed to open it.
    async fn recheck(&self, vm_id: i64, grants: &[Grant]) -> Vec<Verdict>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_strings() {
        let c = Credential::from_session("alice:se:cret").unwrap();
        assert_eq!(c.user, "alice");
        assert_eq!(c.secret, "se:cret");
        assert!(Credential::from_session("nocolon").is_none());
        assert!(Credential::from_session(":pw").is_none());
        assert!(!format!("{c:?}").contains("cret"));
    }
}
