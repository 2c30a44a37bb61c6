//! The live sessions of this node, so a revocation can end them.
//!
//! Every proxy node polls the store for tokens revoked since its last look
//! and ends the sessions opened with them. Polling works across processes
//! and nodes sharing a database, and costs one small indexed query per
//! interval however many sessions are live.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::store::Store;

/// Why the broker ended a session from outside the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Revoked,
    /// The server is shutting down and its drain time is over.
    Shutdown,
}

struct Live {
    token_id: i64,
    vm_id: i64,
    user: Arc<str>,
    stop: watch::Sender<Option<Stop>>,
}

/// How many sessions may run at once on this node (0: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub total: usize,
    pub per_vm: usize,
    pub per_user: usize,
}

/// Which limit a new session would break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitHit {
    #[error("too many console sessions on this node")]
    Total,
    #[error("too many console sessions for this VM")]
    Vm,
    #[error("too many console sessions for this user")]
    User,
}

#[derive(Default)]
struct Table {
    live: HashMap<u64, Live>,
    per_vm: HashMap<i64, usize>,
    per_user: HashMap<Arc<str>, usize>,
}

/// The registry of live sessions on this node.
#[derive(Default)]
pub struct Sessions {
    next: AtomicU64,
    table: Mutex<Table>,
    limits: Limits,
}

/// Keeps a session registered; dropping it unregisters.
pub struct Registration {
    id: u64,
    sessions: Arc<Sessions>,
    /// Changes to `Some` when the session must end.
    pub stop: watch::Receiver<Option<Stop>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut t) = self.sessions.table.lock()
            && let Some(gone) = t.live.remove(&self.id)
        {
            decrement(&mut t.per_vm, &gone.vm_id);
            decrement(&mut t.per_user, &gone.user);
        }
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Sessions {
    pub fn with_limits(limits: Limits) -> Sessions {
        Sessions {
            limits,
            ..Sessions::default()
        }
    }

    /// Registers a new session unless it would break a limit.
    pub fn register(
        self: &Arc<Self>,
        token_id: i64,
        vm_id: i64,
        user: &str,
    ) -> Result<Registration, LimitHit> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let mut t = self.table.lock().map_err(|_| LimitHit::Total)?;
        let l = self.limits;
        if l.total > 0 && t.live.len() >= l.total {
            return Err(LimitHit::Total);
        }
        if l.per_vm > 0 && t.per_vm.get(&vm_id).copied().unwrap_or(0) >= l.per_vm {
            return Err(LimitHit::Vm);
        }
        if l.per_user > 0 && t.per_user.get(user).copied().unwrap_or(0) >= l.per_user {
            return Err(LimitHit::User);
        }
        let user: Arc<str> = Arc::from(user);
        *t.per_vm.entry(vm_id).or_default() += 1;
        *t.per_user.entry(Arc::clone(&user)).or_default() += 1;
        t.live.insert(
            id,
            Live {
                token_id,
                vm_id,
                user,
                stop: tx,
            },
        );
        Ok(Registration {
            id,
            sessions: Arc::clone(self),
            stop: rx,
        })
    }

    pub fn count(&self) -> usize {
        self.table.lock().map(|t| t.live.len()).unwrap_or(0)
    }

    /// Ends every live session opened with one of `token_ids`; returns how
    /// many were told to stop.
    pub fn end_tokens(&self, token_ids: &[i64], why: Stop) -> usize {
        let Ok(t) = self.table.lock() else {
            return 0;
        };
        let mut n = 0;
        for s in t.live.values() {
            if token_ids.contains(&s.token_id) && s.stop.send(Some(why)).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Ends every live session; returns how many were told to stop.
    pub fn end_all(&self, why: Stop) -> usize {
        let Ok(t) = self.table.lock() else {
            return 0;
        };
        t.live
            .values()
            .filter(|s| s.stop.send(Some(why)).is_ok())
            .count()
    }
}

/// Polls the store for revocations until the process ends: every `every`,
/// and at once when the store signals a revocation (PostgreSQL's NOTIFY from
/// any node). The periodic look covers a missed signal.
pub async fn watch_revocations(sessions: Arc<Sessions>, store: Arc<dyn Store>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let signal = store.revocation_signal();
    // Armed before each look, so a signal that comes during one is kept.
    let mut notified = signal.as_ref().map(|s| Box::pin(s.notified()));
    // Revocation times are whole seconds, so each look reaches one second
    // back; ending an already-ending session is harmless.
    let mut since = crate::now_unix() - 1;
    loop {
        match (&signal, notified.as_mut()) {
            (Some(signal), Some(armed)) => {
                armed.as_mut().enable();
                let signalled = tokio::select! {
                    _ = tick.tick() => false,
                    _ = armed.as_mut() => true,
                };
                if signalled {
                    armed.set(signal.notified());
                    armed.as_mut().enable();
                }
            }
            _ => {
                tick.tick().await;
            }
        }
        if sessions.count() == 0 {
            since = crate::now_unix() - 1;
            continue;
        }
        let now = crate::now_unix();
        match store.revoked_since(since).await {
            Ok(ids) if !ids.is_empty() => {
                let n = sessions.end_tokens(&ids, Stop::Revoked);
                if n > 0 {
                    tracing::info!(sessions = n, "ending sessions of revoked tokens");
                }
                since = now - 1;
            }
            Ok(_) => since = now - 1,
            // Keep `since` so the next successful look covers the gap.
            Err(e) => tracing::warn!(error = %e, "checking for revoked tokens failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_node_vm_and_user() {
        let s = Arc::new(Sessions::with_limits(Limits {
            total: 3,
            per_vm: 2,
            per_user: 2,
        }));
        let a = s.register(1, 7, "alice").unwrap();
        let _b = s.register(2, 7, "bob").unwrap();
        assert_eq!(s.register(3, 7, "carol").err(), Some(LimitHit::Vm));
        let _c = s.register(4, 8, "alice").unwrap();
        assert_eq!(s.register(5, 9, "dave").err(), Some(LimitHit::Total));
        drop(a);
        let _d = s.register(6, 9, "alice").unwrap();
        assert_eq!(s.register(7, 10, "erin").err(), Some(LimitHit::Total));
        assert_eq!(s.count(), 3);
        let u = Arc::new(Sessions::with_limits(Limits {
            per_user: 1,
            ..Limits::default()
        }));
        let _e = u.register(1, 1, "alice").unwrap();
        assert_eq!(u.register(2, 2, "alice").err(), Some(LimitHit::User));
        assert!(u.register(3, 2, "bob").is_ok());
    }

    #[test]
    fn registration_lifecycle_and_targeted_stop() {
        let s = Arc::new(Sessions::default());
        let a = s.register(1, 7, "alice").unwrap();
        let b = s.register(2, 7, "alice").unwrap();
        assert_eq!(s.count(), 2);
        assert_eq!(s.end_tokens(&[2, 3], Stop::Revoked), 1);
        assert_eq!(*a.stop.borrow(), None);
        assert_eq!(*b.stop.borrow(), Some(Stop::Revoked));
        drop(a);
        assert_eq!(s.count(), 1);
        drop(b);
        assert_eq!(s.count(), 0);
    }

    #[test]
    fn end_all_stops_every_live_session() {
        let s = Arc::new(Sessions::default());
        let a = s.register(1, 7, "alice").unwrap();
        let b = s.register(2, 8, "bob").unwrap();
        assert_eq!(s.end_all(Stop::Shutdown), 2);
        assert_eq!(*a.stop.borrow(), Some(Stop::Shutdown));
        assert_eq!(*b.stop.borrow(), Some(Stop::Shutdown));
        drop((a, b));
        assert_eq!(s.end_all(Stop::Shutdown), 0);
    }
}
