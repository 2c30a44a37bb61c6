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
}

struct Live {
    token_id: i64,
    stop: watch::Sender<Option<Stop>>,
}

/// The registry of live sessions on this node.
#[derive(Default)]
pub struct Sessions {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Live>>,
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
        if let Ok(mut live) = self.sessions.live.lock() {
            live.remove(&self.id);
        }
    }
}

impl Sessions {
    pub fn register(self: &Arc<Self>, token_id: i64) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        if let Ok(mut live) = self.live.lock() {
            live.insert(id, Live { token_id, stop: tx });
        }
        Registration {
            id,
            sessions: Arc::clone(self),
            stop: rx,
        }
    }

    pub fn count(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Ends every live session opened with one of `token_ids`; returns how
    /// many were told to stop.
    pub fn end_tokens(&self, token_ids: &[i64], why: Stop) -> usize {
        let Ok(live) = self.live.lock() else {
            return 0;
        };
        let mut n = 0;
        for s in live.values() {
            if token_ids.contains(&s.token_id) && s.stop.send(Some(why)).is_ok() {
                n += 1;
            }
        }
        n
    }
}

/// Polls the store for revocations until the process ends.
pub async fn watch_revocations(sessions: Arc<Sessions>, store: Arc<dyn Store>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Revocation times are whole seconds, so each look reaches one second
    // back; ending an already-ending session is harmless.
    let mut since = crate::now_unix() - 1;
    loop {
        tick.tick().await;
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
    fn registration_lifecycle_and_targeted_stop() {
        let s = Arc::new(Sessions::default());
        let a = s.register(1);
        let b = s.register(2);
        assert_eq!(s.count(), 2);
        assert_eq!(s.end_tokens(&[2, 3], Stop::Revoked), 1);
        assert_eq!(*a.stop.borrow(), None);
        assert_eq!(*b.stop.borrow(), Some(Stop::Revoked));
        drop(a);
        assert_eq!(s.count(), 1);
        drop(b);
        assert_eq!(s.count(), 0);
    }
}
