//! The live sessions of this node, so that revocations and the inventory's
//! re-checks can end them.
//!
//! Revocations are an ordered log in the store (see [`crate::store::Cause`]).
//! A session remembers the last revocation its token's redemption saw; it is
//! subject to every later one that matches its VM, user or session id. The
//! table remembers the last revocation applied to it, so a session that
//! joins after a revocation was applied catches up when it attaches its
//! record ([`Registration::attach`]). No node's clock takes part.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::inventory::{Grant, Lapse};
use crate::store::{Cause, RecordedRevocation};

/// Why the broker ended a session from outside the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A revocation in the store covers it.
    Revoked(Cause),
    /// The inventory's re-check found it may not go on.
    Lapsed(Lapse),
    /// The server is shutting down and its drain time is over.
    Shutdown,
    /// The revocation log could not be read for a new session, which then
    /// does not run unchecked.
    StoreDown,
}

struct Live {
    vm_id: i64,
    user: Arc<str>,
    /// The last revocation the token's redemption saw.
    seen: i64,
    /// The session's row in the store, once recorded.
    record: Option<i64>,
    grant: Arc<Grant>,
    stop: watch::Sender<Option<Stop>>,
    /// Counted against the limits: a console, not one more SPICE channel
    /// of a console already counted.
    counted: bool,
}

impl Live {
    fn falls_under(&self, r: &RecordedRevocation) -> bool {
        r.seq > self.seen && r.revocation.matches(self.vm_id, &self.user, self.record)
    }
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
    #[error("too many channels for this SPICE console")]
    Channels,
}

/// How many channels may join one SPICE console on this node. A viewer
/// opens 8 to 12; the bound keeps one token holder from opening thousands.
pub const MAX_CHANNELS_PER_CONSOLE: usize = 32;

#[derive(Default)]
struct Table {
    live: HashMap<u64, Live>,
    per_vm: HashMap<i64, usize>,
    per_user: HashMap<Arc<str>, usize>,
    /// Joined SPICE channels on this node, by the row of their console.
    channels: HashMap<i64, usize>,
    /// The last revocation applied to every session in the table; `None`
    /// until the watcher has looked.
    applied: Option<i64>,
    /// Set by [`Sessions::close`]: every session registering later is told
    /// this at once.
    closing: Option<Stop>,
}

/// What a new session is, for the registry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub vm_id: i64,
    pub user: String,
    /// The last revocation its token's redemption saw.
    pub seen: i64,
    pub grant: Grant,
}

/// The registry of live sessions on this node.
#[derive(Default)]
pub struct Sessions {
    next: AtomicU64,
    table: Mutex<Table>,
    limits: Limits,
    /// Woken when the last registration is dropped.
    emptied: tokio::sync::Notify,
}

/// Keeps a session registered; dropping it unregisters.
pub struct Registration {
    id: u64,
    /// The last revocation this session has been checked against.
    checked: AtomicI64,
    sessions: Arc<Sessions>,
    /// Changes to `Some` when the session must end.
    pub stop: watch::Receiver<Option<Stop>>,
}

/// What [`Registration::attach`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Nothing was applied to the table that this session has not seen.
    Current,
    /// Revocations after `seen` up to `upto` were applied before the session
    /// joined (or, with `upto` at `i64::MAX`, the watcher has not looked
    /// yet): the caller looks them up and hands them to
    /// [`Registration::apply`].
    Needed { seen: i64, upto: i64 },
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut t) = self.sessions.table.lock()
            && let Some(gone) = t.live.remove(&self.id)
        {
            if gone.counted {
                decrement(&mut t.per_vm, &gone.vm_id);
                decrement(&mut t.per_user, &gone.user);
            } else if let Some(record) = gone.record {
                decrement(&mut t.channels, &record);
            }
            if t.live.is_empty() {
                self.sessions.emptied.notify_waiters();
            }
        }
    }
}

impl Registration {
    /// Records the session's row id once it has one, so that ending it by id
    /// works, and says whether it must catch up with revocations applied to
    /// the table that it has not been checked against. Called right after
    /// registering, and again with the record.
    pub fn attach(&self, record: Option<i64>) -> CatchUp {
        let Ok(mut t) = self.sessions.table.lock() else {
            return CatchUp::Current;
        };
        if let Some(live) = t.live.get_mut(&self.id)
            && record.is_some()
        {
            live.record = record;
        }
        let seen = self.checked.load(Ordering::Relaxed);
        match t.applied {
            Some(upto) if upto > seen => CatchUp::Needed { seen, upto },
            Some(_) => CatchUp::Current,
            // The watcher has not looked yet: the whole log after `seen`.
            None => CatchUp::Needed {
                seen,
                upto: i64::MAX,
            },
        }
    }

    /// Notes that the session has been checked against the log up to `seq`.
    pub fn checked_up_to(&self, seq: i64) {
        self.checked.fetch_max(seq, Ordering::Relaxed);
    }

    /// Applies revocations to this session alone; true if one ends it.
    pub fn apply(&self, revocations: &[RecordedRevocation]) -> bool {
        let Ok(t) = self.sessions.table.lock() else {
            return false;
        };
        let Some(live) = t.live.get(&self.id) else {
            return false;
        };
        match revocations.iter().find(|r| live.falls_under(r)) {
            Some(r) => {
                let _ = live.stop.send(Some(Stop::Revoked(r.revocation.cause)));
                true
            }
            None => false,
        }
    }

    /// Ends this session now.
    pub fn end(&self, why: Stop) {
        if let Ok(t) = self.sessions.table.lock()
            && let Some(live) = t.live.get(&self.id)
        {
            let _ = live.stop.send(Some(why));
        }
    }
}

/// Completes when the session is told to stop; never if its registration
/// goes without a word.
pub async fn stopped(stop: &mut watch::Receiver<Option<Stop>>) -> Stop {
    loop {
        if let Some(why) = *stop.borrow_and_update() {
            return why;
        }
        if stop.changed().await.is_err() {
            return std::future::pending().await;
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

/// A live session as the re-check sees it.
pub struct Snapshot {
    pub id: u64,
    pub vm_id: i64,
    pub grant: Arc<Grant>,
}

impl Sessions {
    pub fn with_limits(limits: Limits) -> Sessions {
        Sessions {
            limits,
            ..Sessions::default()
        }
    }

    /// Registers a new session unless it would break a limit.
    pub fn register(self: &Arc<Self>, entry: Entry) -> Result<Registration, LimitHit> {
        self.insert(entry, None, true)
    }

    /// Registers another channel of the SPICE session recorded as `record`
    /// (whose main channel may live on another node): it ends with every
    /// revocation of that session, and is not counted as a console of its
    /// own, only against [`MAX_CHANNELS_PER_CONSOLE`].
    pub fn register_channel(
        self: &Arc<Self>,
        entry: Entry,
        record: i64,
    ) -> Result<Registration, LimitHit> {
        self.insert(entry, Some(record), false)
    }

    fn insert(
        self: &Arc<Self>,
        entry: Entry,
        record: Option<i64>,
        counted: bool,
    ) -> Result<Registration, LimitHit> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut t = self.table.lock().map_err(|_| LimitHit::Total)?;
        let (tx, rx) = watch::channel(t.closing);
        let l = self.limits;
        if counted {
            if l.total > 0 && t.live.len() >= l.total {
                return Err(LimitHit::Total);
            }
            if l.per_vm > 0 && t.per_vm.get(&entry.vm_id).copied().unwrap_or(0) >= l.per_vm {
                return Err(LimitHit::Vm);
            }
            if l.per_user > 0
                && t.per_user.get(entry.user.as_str()).copied().unwrap_or(0) >= l.per_user
            {
                return Err(LimitHit::User);
            }
        } else if let Some(record) = record {
            let joined = t.channels.entry(record).or_default();
            if *joined >= MAX_CHANNELS_PER_CONSOLE {
                return Err(LimitHit::Channels);
            }
            *joined += 1;
        }
        let user: Arc<str> = Arc::from(entry.user.as_str());
        if counted {
            *t.per_vm.entry(entry.vm_id).or_default() += 1;
            *t.per_user.entry(Arc::clone(&user)).or_default() += 1;
        }
        t.live.insert(
            id,
            Live {
                vm_id: entry.vm_id,
                user,
                seen: entry.seen,
                record,
                grant: Arc::new(entry.grant),
                stop: tx,
                counted,
            },
        );
        Ok(Registration {
            id,
            checked: AtomicI64::new(entry.seen),
            sessions: Arc::clone(self),
            stop: rx,
        })
    }

    pub fn count(&self) -> usize {
        self.table.lock().map(|t| t.live.len()).unwrap_or(0)
    }

    /// The last revocation applied to the table, if the watcher has looked.
    pub fn applied(&self) -> Option<i64> {
        self.table.lock().ok().and_then(|t| t.applied)
    }

    /// The oldest revocation view among live sessions: the watcher, starting
    /// afresh, must look from there so that none of them misses one.
    pub fn oldest_seen(&self) -> Option<i64> {
        let t = self.table.lock().ok()?;
        t.live.values().map(|l| l.seen).min()
    }

    /// Applies revocations, oldest first, to every live session; the table
    /// then counts as having seen everything up to `upto` (at least the last
    /// seq given). Returns how many sessions were told to stop.
    pub fn apply(&self, revocations: &[RecordedRevocation], upto: i64) -> usize {
        let Ok(mut t) = self.table.lock() else {
            return 0;
        };
        let mut n = 0;
        for live in t.live.values() {
            if let Some(r) = revocations.iter().find(|r| live.falls_under(r))
                && live
                    .stop
                    .send(Some(Stop::Revoked(r.revocation.cause)))
                    .is_ok()
            {
                n += 1;
            }
        }
        let last = revocations.iter().map(|r| r.seq).max().unwrap_or(upto);
        t.applied = Some(t.applied.unwrap_or(i64::MIN).max(last).max(upto));
        n
    }

    /// The live sessions, grouped by VM, for the inventory's re-check.
    pub fn by_vm(&self) -> Vec<(i64, Vec<Snapshot>)> {
        let Ok(t) = self.table.lock() else {
            return Vec::new();
        };
        let mut groups: HashMap<i64, Vec<Snapshot>> = HashMap::new();
        for (id, live) in &t.live {
            groups.entry(live.vm_id).or_default().push(Snapshot {
                id: *id,
                vm_id: live.vm_id,
                grant: Arc::clone(&live.grant),
            });
        }
        let mut out: Vec<_> = groups.into_iter().collect();
        out.sort_by_key(|(vm, _)| *vm);
        out
    }

    /// Ends one live session by its registry id; false if it is gone.
    pub fn end(&self, id: u64, why: Stop) -> bool {
        let Ok(t) = self.table.lock() else {
            return false;
        };
        t.live
            .get(&id)
            .is_some_and(|l| l.stop.send(Some(why)).is_ok())
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

    /// Ends every live session and every one that registers from now on
    /// (those still setting up when a node stops); returns how many live
    /// ones were told.
    pub fn close(&self, why: Stop) -> usize {
        if let Ok(mut t) = self.table.lock() {
            t.closing = Some(why);
        }
        self.end_all(why)
    }

    /// Completes once no session is registered (at once if none is).
    pub async fn emptied(&self) {
        loop {
            let woken = self.emptied.notified();
            let mut woken = std::pin::pin!(woken);
            // Registered before looking, so a drop in between still wakes it.
            woken.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            woken.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Revocation;

    fn entry(vm_id: i64, user: &str, seen: i64) -> Entry {
        Entry {
            vm_id,
            user: user.into(),
            seen,
            grant: Grant {
                user: user.into(),
                host: "127.0.0.1".into(),
                port: 5900,
                protocol: Default::default(),
                caller: None,
            },
        }
    }

    fn rev(seq: i64, r: Revocation) -> RecordedRevocation {
        RecordedRevocation { seq, revocation: r }
    }

    #[test]
    fn limits_per_node_vm_and_user() {
        let s = Arc::new(Sessions::with_limits(Limits {
            total: 3,
            per_vm: 2,
            per_user: 2,
        }));
        let a = s.register(entry(7, "alice", 0)).unwrap();
        let _b = s.register(entry(7, "bob", 0)).unwrap();
        assert_eq!(s.register(entry(7, "carol", 0)).err(), Some(LimitHit::Vm));
        let _c = s.register(entry(8, "alice", 0)).unwrap();
        assert_eq!(s.register(entry(9, "dave", 0)).err(), Some(LimitHit::Total));
        drop(a);
        let _d = s.register(entry(9, "alice", 0)).unwrap();
        assert_eq!(
            s.register(entry(10, "erin", 0)).err(),
            Some(LimitHit::Total)
        );
        assert_eq!(s.count(), 3);
        let u = Arc::new(Sessions::with_limits(Limits {
            per_user: 1,
            ..Limits::default()
        }));
        let _e = u.register(entry(1, "alice", 0)).unwrap();
        assert_eq!(u.register(entry(2, "alice", 0)).err(), Some(LimitHit::User));
        assert!(u.register(entry(2, "bob", 0)).is_ok());
    }

    #[test]
    fn a_spice_console_takes_a_bounded_number_of_channels_outside_the_limits() {
        let s = Arc::new(Sessions::with_limits(Limits {
            total: 1,
            per_vm: 1,
            per_user: 1,
        }));
        let _main = s.register(entry(7, "alice", 0)).unwrap();
        let mut joined: Vec<_> = (0..MAX_CHANNELS_PER_CONSOLE)
            .map(|_| s.register_channel(entry(7, "alice", 0), 40).unwrap())
            .collect();
        assert_eq!(
            s.register_channel(entry(7, "alice", 0), 40).err(),
            Some(LimitHit::Channels)
        );
        // Another console's channels have their own bound.
        let _other = s.register_channel(entry(7, "alice", 0), 41).unwrap();
        joined.pop();
        let _again = s.register_channel(entry(7, "alice", 0), 40).unwrap();
        drop(joined);
        assert_eq!(s.count(), 1 + 1 + 1);
        // The channels never counted as consoles.
        assert_eq!(s.register(entry(8, "bob", 0)).err(), Some(LimitHit::Total));
    }

    #[test]
    fn a_revocation_ends_the_sessions_it_matches_and_only_later_ones() {
        let s = Arc::new(Sessions::default());
        let old = s.register(entry(7, "alice", 4)).unwrap();
        let other_vm = s.register(entry(8, "alice", 4)).unwrap();
        // Redeemed after revocation 5 was recorded: not subject to it.
        let newer = s.register(entry(7, "bob", 5)).unwrap();
        let n = s.apply(&[rev(5, Revocation::vm(7, Cause::Revoked))], 5);
        assert_eq!(n, 1);
        assert_eq!(*old.stop.borrow(), Some(Stop::Revoked(Cause::Revoked)));
        assert_eq!(*other_vm.stop.borrow(), None);
        assert_eq!(*newer.stop.borrow(), None);
        assert_eq!(s.applied(), Some(5));

        let by_user = Revocation::user("bob", Some(7), Cause::AccessRemoved);
        assert_eq!(s.apply(&[rev(6, by_user)], 6), 1);
        assert_eq!(
            *newer.stop.borrow(),
            Some(Stop::Revoked(Cause::AccessRemoved))
        );
        assert_eq!(*other_vm.stop.borrow(), None);
    }

    #[test]
    fn ending_one_session_needs_its_record() {
        let s = Arc::new(Sessions::default());
        let a = s.register(entry(7, "alice", 0)).unwrap();
        let b = s.register(entry(7, "alice", 0)).unwrap();
        // Before the watcher's first look, a session reads the log itself.
        assert_eq!(
            a.attach(Some(100)),
            CatchUp::Needed {
                seen: 0,
                upto: i64::MAX
            }
        );
        s.apply(&[], 0);
        assert_eq!(a.attach(Some(100)), CatchUp::Current);
        assert_eq!(b.attach(Some(101)), CatchUp::Current);
        let one = Revocation {
            vm_id: Some(7),
            user: Some("alice".into()),
            session_id: Some(101),
            cause: Cause::SessionEnded,
        };
        assert_eq!(s.apply(&[rev(1, one)], 1), 1);
        assert_eq!(*a.stop.borrow(), None);
        assert_eq!(*b.stop.borrow(), Some(Stop::Revoked(Cause::SessionEnded)));
    }

    #[test]
    fn a_session_that_joins_after_a_revocation_was_applied_catches_up() {
        let s = Arc::new(Sessions::default());
        let _other = s.register(entry(1, "carol", 0)).unwrap();
        // Redeemed when the last revocation was 3; the watcher then applies
        // 4 (for this VM) before the session registers.
        s.apply(&[rev(4, Revocation::vm(7, Cause::Revoked))], 4);
        let late = s.register(entry(7, "alice", 3)).unwrap();
        assert_eq!(*late.stop.borrow(), None);
        let need = late.attach(Some(9));
        assert_eq!(need, CatchUp::Needed { seen: 3, upto: 4 });
        assert!(late.apply(&[rev(4, Revocation::vm(7, Cause::Revoked))]));
        assert_eq!(*late.stop.borrow(), Some(Stop::Revoked(Cause::Revoked)));
        // One that saw 4 has nothing to catch up on.
        let current = s.register(entry(7, "alice", 4)).unwrap();
        assert_eq!(current.attach(Some(10)), CatchUp::Current);
    }

    #[test]
    fn registration_lifecycle_and_grouping() {
        let s = Arc::new(Sessions::default());
        let a = s.register(entry(7, "alice", 0)).unwrap();
        let b = s.register(entry(7, "bob", 0)).unwrap();
        let c = s.register(entry(9, "bob", 0)).unwrap();
        let groups = s.by_vm();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].0, 7);
        assert_eq!(groups[0].1.len(), 2);
        assert!(s.end(groups[1].1[0].id, Stop::Lapsed(Lapse::VmMoved)));
        assert_eq!(*c.stop.borrow(), Some(Stop::Lapsed(Lapse::VmMoved)));
        drop((a, b, c));
        assert_eq!(s.count(), 0);
        assert!(s.by_vm().is_empty());
    }

    #[tokio::test]
    async fn close_stops_the_live_sessions_and_later_ones_and_emptied_waits_for_them() {
        let s = Arc::new(Sessions::default());
        s.emptied().await;
        let mut a = s.register(entry(7, "alice", 0)).unwrap();
        assert_eq!(s.close(Stop::Shutdown), 1);
        assert_eq!(*a.stop.borrow_and_update(), Some(Stop::Shutdown));
        let late = s.register(entry(8, "bob", 0)).unwrap();
        assert_eq!(
            *late.stop.borrow(),
            Some(Stop::Shutdown),
            "a late one is told at once"
        );
        let waiting = tokio::spawn({
            let s = Arc::clone(&s);
            async move { s.emptied().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "two sessions are still registered");
        drop(a);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "one session is still registered");
        drop(late);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("emptied once the last registration went")
            .unwrap();
    }

    #[test]
    fn end_all_stops_every_live_session() {
        let s = Arc::new(Sessions::default());
        let a = s.register(entry(7, "alice", 0)).unwrap();
        let b = s.register(entry(8, "bob", 0)).unwrap();
        assert_eq!(s.end_all(Stop::Shutdown), 2);
        assert_eq!(*a.stop.borrow(), Some(Stop::Shutdown));
        assert_eq!(*b.stop.borrow(), Some(Stop::Shutdown));
        drop((a, b));
        assert_eq!(s.end_all(Stop::Shutdown), 0);
    }
}
