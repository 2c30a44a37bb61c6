//! The background jobs that end live sessions the store or the inventory no
//! longer allows: the revocation watcher and the periodic re-check.

use std::sync::Arc;
use std::time::Duration;

use super::sessions::{CatchUp, Registration, Sessions, Stop};
use crate::inventory::Verdict;
use crate::service::TokenService;
use crate::store::TokenStore;

/// Most revocations read in one look; a longer backlog takes several.
const BATCH: u32 = 500;

/// Follows the store's revocation log until the process ends: every
/// `every`, and at once when the store signals a revocation (PostgreSQL's
/// NOTIFY from any node). The periodic look covers a missed signal.
pub async fn watch_revocations(
    sessions: Arc<Sessions>,
    store: Arc<dyn TokenStore>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let signal = store.revocation_signal();
    // Armed before each look, so a signal that comes during one is kept.
    let mut notified = signal.as_ref().map(|s| Box::pin(s.notified()));
    // The last revocation applied; `None` until the first look.
    let mut cursor: Option<i64> = None;
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
        let mut from = match cursor {
            Some(c) => c,
            // First look: from the newest revocation, or from the oldest view
            // of a session already live, so that none misses one.
            None => match store.last_revocation().await {
                Ok(last) => sessions.oldest_seen().map_or(last, |seen| seen.min(last)),
                Err(e) => {
                    tracing::warn!(error = %e, "reading the revocation log failed");
                    continue;
                }
            },
        };
        loop {
            match store.revocations_after(from, BATCH).await {
                Ok(batch) => {
                    let n = sessions.apply(&batch, from);
                    if n > 0 {
                        tracing::info!(sessions = n, "ending sessions of revoked console access");
                    }
                    from = batch.last().map_or(from, |r| r.seq);
                    cursor = Some(from);
                    if batch.len() < BATCH as usize {
                        break;
                    }
                }
                // The cursor stays, so the next look covers the gap.
                Err(e) => {
                    tracing::warn!(error = %e, "reading the revocation log failed");
                    break;
                }
            }
        }
    }
}

/// Applies to a new session the revocations this node applied before it
/// joined (recorded after its token was redeemed): a revocation made while
/// the session was being set up still ends it. If the log cannot be read
/// the session ends rather than run unchecked.
pub async fn catch_up(store: &dyn TokenStore, registration: &Registration, record: Option<i64>) {
    let CatchUp::Needed { mut seen, upto } = registration.attach(record) else {
        return;
    };
    while seen < upto {
        match store.revocations_after(seen, BATCH).await {
            Ok(batch) => {
                if registration.apply(&batch) {
                    return;
                }
                seen = batch.last().map_or(seen, |r| r.seq);
                registration.checked_up_to(seen);
                if batch.len() < BATCH as usize {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the revocation log for a new session");
                registration.end(Stop::StoreDown);
                return;
            }
        }
    }
}

/// Re-checks every live session with the inventory every `every`, one VM at
/// a time, and ends those whose VM moved, stopped or went, or whose user
/// lost access. While the inventory cannot be asked, sessions go on and the
/// failures are counted.
pub async fn recheck(sessions: Arc<Sessions>, service: Arc<TokenService>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        recheck_once(&sessions, &service).await;
    }
}

/// One round of [`recheck`]; returns how many sessions it ended.
pub async fn recheck_once(sessions: &Sessions, service: &TokenService) -> usize {
    let mut ended = 0;
    for (vm_id, live) in sessions.by_vm() {
        let grants: Vec<_> = live.iter().map(|s| s.grant.as_ref().clone()).collect();
        let verdicts = service.recheck(vm_id, &grants).await;
        let mut unknown = 0u64;
        for (s, verdict) in live.iter().zip(verdicts) {
            match verdict {
                Verdict::Continue => {}
                Verdict::End(lapse) => {
                    if sessions.end(s.id, Stop::Lapsed(lapse)) {
                        ended += 1;
                        tracing::info!(vm_id = s.vm_id, user = %s.grant.user, ?lapse, "ending a console session the inventory no longer allows");
                    }
                }
                Verdict::Unknown(why) => {
                    unknown += 1;
                    tracing::warn!(vm_id, error = %why, "could not re-check a console session");
                }
            }
        }
        if unknown > 0 {
            crate::metrics::global().recheck_failed(unknown);
            if unknown as usize == live.len() {
                // The inventory is down: the rest of this round would only
                // wait on it too.
                let rest: usize = sessions.count().saturating_sub(ended);
                tracing::warn!(
                    skipped = rest,
                    "inventory unreachable; re-checking again next round"
                );
                break;
            }
        }
    }
    ended
}
