//! Per-address limits: budgets of failed token and password attempts.
//!
//! An address is an IPv4 address or an IPv6 /64 (one customer's network is
//! one /64, so its 2^64 addresses are one client here). Every table is
//! bounded, so a flood of addresses cannot grow it without limit.
//!
//! A failure is charged when an attempt starts, not when it is found to
//! have failed, and refunded if the attempt succeeds: however many attempts
//! an address starts at once, no more than its budget are ever checked.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Most addresses tracked at once.
const MAX_TRACKED: usize = 65_536;
const WINDOW: Duration = Duration::from_secs(60);
/// Longest an attempt waits for a free place in its address's budget
/// before it is answered "busy".
const MAX_WAIT: Duration = Duration::from_secs(10);

/// The unit limits count in: the IPv4 address, or the IPv6 /64 (IPv4-mapped
/// IPv6 addresses count as their IPv4 address).
pub fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What an attempt is: a password check (capped in flight per address) or
/// a token redemption (only budgeted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Password,
    Token,
}

/// Why an attempt may not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The address used up its failures for this minute.
    #[error("too many failed attempts, try again later")]
    Spent,
    /// The address has too many attempts in progress, for too long.
    #[error("too many attempts in progress from this address, try again shortly")]
    Busy,
}

struct Entry {
    start: Instant,
    failures: u32,
    /// Attempts started and not yet resolved; each counts as a failure.
    pending: u32,
    /// Of those, password checks.
    checking: u32,
}

impl Entry {
    fn roll(&mut self) {
        if self.start.elapsed() >= WINDOW {
            self.start = Instant::now();
            self.failures = 0;
        }
    }
}

/// Budgets of failures per address and minute.
pub struct FailureLimiter {
    per_minute: u32,
    /// Password checks in flight per address (0: only the budget bounds them).
    checks_in_flight: u32,
    delay: Duration,
    seen: Mutex<HashMap<IpAddr, Entry>>,
    /// Woken whenever an attempt ends, for attempts waiting for room.
    changed: Notify,
}

impl FailureLimiter {
    /// `per_minute` of 0 turns the budget off; `checks_in_flight` of 0 leaves
    /// concurrent password checks bounded by the budget alone.
    pub fn new(per_minute: u32, checks_in_flight: u32, delay: Duration) -> FailureLimiter {
        FailureLimiter {
            per_minute,
            checks_in_flight,
            delay,
            seen: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        }
    }

    /// The delay to impose on a refused request.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// Starts an attempt from `ip`, charging it as a failure until it is
    /// refunded. An address whose budget is spent is refused at once; one
    /// whose budget is taken by attempts still in progress (or that has
    /// too many password checks in flight) waits for them, up to a bound.
    pub async fn begin(self: &Arc<Self>, ip: IpAddr, kind: Kind) -> Result<Attempt, Refused> {
        let cap = match kind {
            Kind::Password if self.checks_in_flight > 0 => self.checks_in_flight,
            _ => u32::MAX,
        };
        if self.per_minute == 0 && cap == u32::MAX {
            return Ok(Attempt {
                limiter: None,
                key: ip,
                kind,
            });
        }
        let key = bucket(ip);
        let give_up = tokio::time::Instant::now() + MAX_WAIT;
        loop {
            // Registered before looking, so an attempt ending in between
            // still wakes this one.
            let woken = self.changed.notified();
            let mut woken = std::pin::pin!(woken);
            woken.as_mut().enable();
            {
                let mut seen = lock(&self.seen);
                let Some(entry) = entry(&mut seen, key) else {
                    return Err(Refused::Busy);
                };
                entry.roll();
                let budget = self.per_minute;
                if budget > 0 && entry.failures >= budget {
                    return Err(Refused::Spent);
                }
                let budget_room = budget == 0 || entry.failures + entry.pending < budget;
                let check_room = kind == Kind::Token || entry.checking < cap;
                if budget_room && check_room {
                    entry.pending += 1;
                    if kind == Kind::Password {
                        entry.checking += 1;
                    }
                    return Ok(Attempt {
                        limiter: Some(Arc::clone(self)),
                        key,
                        kind,
                    });
                }
            }
            if tokio::time::timeout_at(give_up, woken).await.is_err() {
                return Err(Refused::Busy);
            }
        }
    }

    fn end(&self, key: IpAddr, kind: Kind, failed: bool) {
        {
            let mut seen = lock(&self.seen);
            if let Some(e) = seen.get_mut(&key) {
                e.pending = e.pending.saturating_sub(1);
                if kind == Kind::Password {
                    e.checking = e.checking.saturating_sub(1);
                }
                if failed && self.per_minute > 0 {
                    e.roll();
                    e.failures = e.failures.saturating_add(1);
                }
            }
        }
        self.changed.notify_waiters();
    }
}

/// The entry for `key`, made room for if the table is full; `None` if every
/// tracked address has attempts in progress.
fn entry(seen: &mut HashMap<IpAddr, Entry>, key: IpAddr) -> Option<&mut Entry> {
    if seen.len() >= MAX_TRACKED && !seen.contains_key(&key) {
        seen.retain(|_, e| e.pending > 0 || e.start.elapsed() < WINDOW);
        if seen.len() >= MAX_TRACKED {
            // Still full of live entries: forget one with nothing in
            // progress rather than grow.
            let idle = seen.iter().find(|(_, e)| e.pending == 0).map(|(k, _)| *k);
            seen.remove(&idle?);
        }
    }
    Some(seen.entry(key).or_insert_with(|| Entry {
        start: Instant::now(),
        failures: 0,
        pending: 0,
        checking: 0,
    }))
}

/// An attempt in progress. Dropped unresolved (the client went away, the
/// request ran out of time) it stays charged as a failure.
pub struct Attempt {
    limiter: Option<Arc<FailureLimiter>>,
    key: IpAddr,
    kind: Kind,
}

impl Attempt {
    /// The attempt did not fail as a guess (it succeeded, or failed for a
    /// reason that is not a wrong credential): its charge is refunded.
    pub fn refund(mut self) {
        if let Some(l) = self.limiter.take() {
            l.end(self.key, self.kind, false);
        }
    }

    /// The attempt failed: the charge stays.
    pub fn fail(self) {
        drop(self);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(l) = self.limiter.take() {
            l.end(self.key, self.kind, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn budget_per_address() {
        let l = Arc::new(FailureLimiter::new(3, 0, Duration::ZERO));
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        for _ in 0..3 {
            l.begin(a, Kind::Password).await.unwrap().fail();
        }
        assert_eq!(l.begin(a, Kind::Password).await.err(), Some(Refused::Spent));
        assert!(l.begin(b, Kind::Token).await.is_ok());
    }

    #[tokio::test]
    async fn successes_are_refunded() {
        let l = Arc::new(FailureLimiter::new(2, 0, Duration::ZERO));
        let a = ip("192.0.2.1");
        for _ in 0..10 {
            l.begin(a, Kind::Password).await.unwrap().refund();
        }
        l.begin(a, Kind::Password).await.unwrap().fail();
        l.begin(a, Kind::Password).await.unwrap().fail();
        assert!(l.begin(a, Kind::Token).await.is_err());
    }

    /// Of many attempts started at once, only the budget's worth run; the
    /// rest wait for them and are then refused.
    #[tokio::test]
    async fn concurrent_attempts_cannot_overdraw_the_budget() {
        let l = Arc::new(FailureLimiter::new(5, 2, Duration::ZERO));
        let a = ip("192.0.2.1");
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let ran = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (l, running, most, ran) = (
                    Arc::clone(&l),
                    Arc::clone(&running),
                    Arc::clone(&most),
                    Arc::clone(&ran),
                );
                tokio::spawn(async move {
                    let Ok(attempt) = l.begin(a, Kind::Password).await else {
                        return;
                    };
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    ran.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    attempt.fail();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(ran.load(Ordering::SeqCst), 5);
        assert!(most.load(Ordering::SeqCst) <= 2);
    }

    #[tokio::test]
    async fn an_abandoned_attempt_stays_charged() {
        let l = Arc::new(FailureLimiter::new(1, 0, Duration::ZERO));
        let a = ip("192.0.2.1");
        drop(l.begin(a, Kind::Password).await.unwrap());
        assert_eq!(l.begin(a, Kind::Token).await.err(), Some(Refused::Spent));
    }

    #[tokio::test]
    async fn ipv6_counts_per_64() {
        let l = Arc::new(FailureLimiter::new(2, 0, Duration::ZERO));
        l.begin(ip("2001:db8:1:2::1"), Kind::Password)
            .await
            .unwrap()
            .fail();
        l.begin(ip("2001:db8:1:2:ffff::9"), Kind::Password)
            .await
            .unwrap()
            .fail();
        assert!(
            l.begin(ip("2001:db8:1:2::77"), Kind::Password)
                .await
                .is_err()
        );
        assert!(l.begin(ip("2001:db8:1:3::1"), Kind::Password).await.is_ok());
        assert_eq!(bucket(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(bucket(ip("2001:db8:a:b:c:d:e:f")), ip("2001:db8:a:b::"));
    }

    #[tokio::test]
    async fn zero_turns_it_off() {
        let l = Arc::new(FailureLimiter::new(0, 0, Duration::ZERO));
        let a = ip("192.0.2.1");
        for _ in 0..100 {
            l.begin(a, Kind::Password).await.unwrap().fail();
        }
        assert!(l.begin(a, Kind::Password).await.is_ok());
    }

    #[tokio::test]
    async fn the_table_is_bounded() {
        let l = Arc::new(FailureLimiter::new(5, 0, Duration::ZERO));
        for i in 0..(MAX_TRACKED as u32 + 1000) {
            l.begin(IpAddr::from(i.to_be_bytes()), Kind::Token)
                .await
                .unwrap()
                .fail();
        }
        assert!(lock(&l.seen).len() <= MAX_TRACKED);
    }
}
