//! The local registry: users and VMs kept in the broker's own database.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Console, Credential, Grant, Inventory, InventoryError, Lapse, Principal, Verdict};
use crate::auth::{Against, VerifyCache};
use crate::protocol::Protocol;
use crate::secrets::Secrets;
use crate::store::{Registry, StoreError, User, Vm};

pub struct LocalInventory {
    store: Arc<dyn Registry>,
    cache: VerifyCache,
    secrets: Secrets,
}

impl LocalInventory {
    /// `secrets` opens the VMs' stored VNC passwords.
    pub fn new(
        store: Arc<dyn Registry>,
        secrets: Secrets,
        cache_ttl: Duration,
        cache_size: usize,
    ) -> LocalInventory {
        LocalInventory {
            store,
            cache: VerifyCache::new(cache_ttl, cache_size),
            secrets,
        }
    }

    /// Checks a credential on the password verifier (off the async and
    /// blocking threads), unless the cache vouches for it. A credential the
    /// cache does not know takes a place in the verifier before the user is
    /// even looked up (waiting while its client address holds its share),
    /// so a flood of guesses is answered "busy" without touching the
    /// database. An unknown user is checked against a dummy
    /// hash, so the answer takes as long as for a known one and timing does
    /// not tell which names exist.
    async fn verify(&self, cred: &Credential) -> Result<User, InventoryError> {
        let verifier = crate::auth::verifier();
        let busy = |_| InventoryError::Busy;
        let mut ticket = None;
        if !self.cache.vouched(&cred.user, &cred.secret) {
            let t = verifier.ticket().await.map_err(busy)?;
            // A check of the same credential may have succeeded while this
            // one waited for its place.
            if !self.cache.vouched(&cred.user, &cred.secret) {
                ticket = Some(t);
            }
        }
        let found = self.store.user(&cred.user).await.map_err(unavailable)?;
        let Some(user) = found else {
            let ticket = match ticket.take() {
                Some(t) => t,
                None => verifier.ticket().await.map_err(busy)?,
            };
            return match verifier
                .verify(ticket, cred.secret.clone(), Against::Dummy)
                .await
            {
                Ok(_) => Err(InventoryError::Authentication),
                Err(e) => Err(busy(e)),
            };
        };
        if self
            .cache
            .hit(&cred.user, &cred.secret, &user.password_hash)
        {
            return Ok(user);
        }
        let ticket = match ticket.take() {
            Some(t) => t,
            None => verifier.ticket().await.map_err(busy)?,
        };
        let against = Against::Stored(user.password_hash.clone());
        match verifier.verify(ticket, cred.secret.clone(), against).await {
            Ok(true) => {}
            Ok(false) => return Err(InventoryError::Authentication),
            Err(e) => return Err(busy(e)),
        }
        self.cache
            .remember(&cred.user, &cred.secret, &user.password_hash);
        Ok(user)
    }
}

impl LocalInventory {
    /// The caller and the VM, if the caller may open its console.
    async fn openable(&self, cred: &Credential, vm_id: i64) -> Result<(User, Vm), InventoryError> {
        let user = self.verify(cred).await?;
        let vm = self
            .store
            .vm(vm_id)
            .await
            .map_err(unavailable)?
            .ok_or(InventoryError::NoSuchVm(vm_id))?;
        if !may_open(&user, &vm) {
            return Err(InventoryError::Authorization {
                user: user.name,
                vm_id,
            });
        }
        Ok((user, vm))
    }
}

/// Whether `user` may open `vm`'s console under the registry's rules.
fn may_open(user: &User, vm: &Vm) -> bool {
    user.admin || vm.owner == user.name || vm.allowed.contains(&user.name)
}

fn unavailable(e: StoreError) -> InventoryError {
    InventoryError::Unavailable(e.to_string())
}

#[async_trait]
impl Inventory for LocalInventory {
    async fn authenticate(&self, cred: &Credential) -> Result<Principal, InventoryError> {
        let user = self.verify(cred).await?;
        Ok(Principal {
            name: user.name,
            admin: user.admin,
        })
    }

    async fn still_at(
        &self,
        vm_id: i64,
        host: &str,
        port: u16,
        protocol: Protocol,
    ) -> Result<bool, InventoryError> {
        let vm = self.store.vm(vm_id).await.map_err(unavailable)?;
        Ok(vm.is_some_and(|vm| {
            vm.vnc_host == host && vm.vnc_port == port && vm.protocol == protocol
        }))
    }

    async fn console(&self, cred: &Credential, vm_id: i64) -> Result<Console, InventoryError> {
        let (user, vm) = self.openable(cred, vm_id).await?;
        Ok(Console {
            user: user.name,
            vm_id,
            host: vm.vnc_host,
            port: vm.vnc_port,
            policy: vm.policy,
            protocol: vm.protocol,
            vnc_password: self
                .secrets
                .open_opt(vm.vnc_password.as_deref())
                .map_err(|e| {
                    InventoryError::Unavailable(format!("VM [{vm_id}] VNC password: {e}"))
                })?,
            // Registry changes end sessions as they are made; the periodic
            // re-check needs no credential.
            recheck_as: None,
        })
    }

    async fn authorize(&self, cred: &Credential, vm_id: i64) -> Result<Principal, InventoryError> {
        let (user, _) = self.openable(cred, vm_id).await?;
        Ok(Principal {
            name: user.name,
            admin: user.admin,
        })
    }

    async fn recheck(&self, vm_id: i64, grants: &[Grant]) -> Vec<Verdict> {
        let vm = match self.store.vm(vm_id).await {
            Ok(Some(vm)) => vm,
            Ok(None) => return vec![Verdict::End(Lapse::VmGone); grants.len()],
            Err(e) => return vec![Verdict::Unknown(e.to_string()); grants.len()],
        };
        let mut out = Vec::with_capacity(grants.len());
        for g in grants {
            if g.host != vm.vnc_host || g.port != vm.vnc_port || g.protocol != vm.protocol {
                out.push(Verdict::End(Lapse::VmMoved));
                continue;
            }
            out.push(match self.store.user(&g.user).await {
                Ok(Some(user)) if may_open(&user, &vm) => Verdict::Continue,
                Ok(Some(_)) => Verdict::End(Lapse::AccessLost),
                Ok(None) => Verdict::End(Lapse::CredentialRejected),
                Err(e) => Verdict::Unknown(e.to_string()),
            });
        }
        out
    }
}
