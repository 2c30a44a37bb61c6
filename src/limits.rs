//! Per-address limits: budgets of failed token and password attempts, caps
//! on password verifications in progress, and caps on open connections.
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
use std::sync::atomic::{AtomicUsize, Ordering};
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
    delay: Duration,
    seen: Mutex<HashMap<IpAddr, Entry>>,
    /// Woken whenever an attempt ends, for attempts waiting for room.
    changed: Notify,
}

impl FailureLimiter {
    /// `per_minute` of 0 turns the budget off.
    pub fn new(per_minute: u32, delay: Duration) -> FailureLimiter {
        FailureLimiter {
            per_minute,
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
    /// whose budget is taken by attempts still in progress waits for them,
    /// up to a bound.
    pub async fn begin(self: &Arc<Self>, ip: IpAddr) -> Result<Attempt, Refused> {
        if self.per_minute == 0 {
            return Ok(Attempt {
                limiter: None,
                key: ip,
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
                if entry.failures >= self.per_minute {
                    return Err(Refused::Spent);
                }
                if entry.failures + entry.pending < self.per_minute {
                    entry.pending += 1;
                    return Ok(Attempt {
                        limiter: Some(Arc::clone(self)),
                        key,
                    });
                }
            }
            if tokio::time::timeout_at(give_up, woken).await.is_err() {
                return Err(Refused::Busy);
            }
        }
    }

    fn end(&self, key: IpAddr, failed: bool) {
        {
            let mut seen = lock(&self.seen);
            if let Some(e) = seen.get_mut(&key) {
                e.pending = e.pending.saturating_sub(1);
                if failed {
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
    }))
}

/// An attempt in progress. Dropped unresolved (the client went away, the
/// request ran out of time) it stays charged as a failure.
pub struct Attempt {
    limiter: Option<Arc<FailureLimiter>>,
    key: IpAddr,
}

impl Attempt {
    /// The attempt did not fail as a guess (it succeeded, or failed for a
    /// reason that is not a wrong credential): its charge is refunded.
    pub fn refund(mut self) {
        if let Some(l) = self.limiter.take() {
            l.end(self.key, false);
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
            l.end(self.key, true);
        }
    }
}

/// A cap on work in progress per address (password verifications), where
/// work over the cap waits for a place, up to a bound.
pub struct InFlight {
    per_address: AtomicUsize,
    busy: Mutex<HashMap<IpAddr, usize>>,
    freed: Notify,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight::new(0)
    }
}

impl InFlight {
    /// 0: no cap.
    pub fn new(per_address: usize) -> InFlight {
        InFlight {
            per_address: AtomicUsize::new(per_address),
            busy: Mutex::new(HashMap::new()),
            freed: Notify::new(),
        }
    }

    /// Changes the cap (for work started from now on).
    pub fn set_cap(&self, per_address: usize) {
        self.per_address.store(per_address, Ordering::Relaxed);
    }

    /// A place for one piece of work from `ip`: at once if the address is
    /// under the cap, else once one of its places is free; `Busy` if none
    /// is free in time. The table holds only addresses with work in
    /// progress, so it is bounded by the work allowed at all.
    pub async fn enter(self: &Arc<Self>, ip: IpAddr) -> Result<InFlightSlot, Refused> {
        let key = bucket(ip);
        let give_up = tokio::time::Instant::now() + MAX_WAIT;
        loop {
            let woken = self.freed.notified();
            let mut woken = std::pin::pin!(woken);
            woken.as_mut().enable();
            {
                let cap = self.per_address.load(Ordering::Relaxed);
                let mut busy = lock(&self.busy);
                let n = busy.entry(key).or_default();
                if cap == 0 || *n < cap {
                    *n += 1;
                    return Ok(InFlightSlot {
                        gate: Arc::clone(self),
                        key,
                    });
                }
            }
            if tokio::time::timeout_at(give_up, woken).await.is_err() {
                return Err(Refused::Busy);
            }
        }
    }
}

/// A place taken in an [`InFlight`]; dropping it frees the place.
pub struct InFlightSlot {
    gate: Arc<InFlight>,
    key: IpAddr,
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        {
            let mut busy = lock(&self.gate.busy);
            if let Some(n) = busy.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    busy.remove(&self.key);
                }
            }
        }
        self.gate.freed.notify_waiters();
    }
}

/// Why a connection is turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnRefused {
    #[error("too many connections from your address")]
    PerAddress,
    #[error("too many connections to this server")]
    Total,
}

impl ConnRefused {
    /// The `reason` label in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            ConnRefused::PerAddress => "per_address",
            ConnRefused::Total => "total",
        }
    }
}

#[derive(Default)]
struct ConnTable {
    open: usize,
    per: HashMap<IpAddr, usize>,
}

/// Caps on open connections: in all, and per client address. Trusted
/// reverse proxies count in the total only; the clients behind them are
/// capped by their forwarded address, request by request.
pub struct ConnectionLimiter {
    total: usize,
    per_address: usize,
    exempt: Vec<IpAddr>,
    table: Mutex<ConnTable>,
    refusing: AtomicUsize,
}

/// How many refusals (a 503 or a 4429 close) may be in progress at once;
/// past that, connections over a cap are closed without an answer.
pub const MAX_REFUSING: usize = 256;

impl ConnectionLimiter {
    /// 0 turns a cap off; `exempt` (the trusted proxies) are never capped
    /// per address.
    pub fn new(total: usize, per_address: usize, exempt: Vec<IpAddr>) -> ConnectionLimiter {
        ConnectionLimiter {
            total,
            per_address,
            exempt,
            table: Mutex::new(ConnTable::default()),
            refusing: AtomicUsize::new(0),
        }
    }

    /// Admits a TCP connection from `peer`.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<ConnSlot, ConnRefused> {
        let key = (self.per_address > 0 && !self.exempt.contains(&peer)).then(|| bucket(peer));
        let mut t = lock(&self.table);
        if self.total > 0 && t.open >= self.total {
            return Err(ConnRefused::Total);
        }
        if let Some(k) = key
            && t.per.get(&k).copied().unwrap_or(0) >= self.per_address
        {
            return Err(ConnRefused::PerAddress);
        }
        t.open += 1;
        if let Some(k) = key {
            *t.per.entry(k).or_default() += 1;
        }
        crate::metrics::global().connection_opened();
        Ok(ConnSlot {
            limiter: Arc::clone(self),
            key,
            counted: true,
        })
    }

    /// Admits a request (or WebSocket) from `client`, an address forwarded
    /// by a trusted proxy; the proxy's connection is already counted.
    pub fn admit_forwarded(self: &Arc<Self>, client: IpAddr) -> Result<ConnSlot, ConnRefused> {
        let key = bucket(client);
        let mut t = lock(&self.table);
        if self.per_address > 0 && t.per.get(&key).copied().unwrap_or(0) >= self.per_address {
            return Err(ConnRefused::PerAddress);
        }
        *t.per.entry(key).or_default() += 1;
        Ok(ConnSlot {
            limiter: Arc::clone(self),
            key: Some(key),
            counted: false,
        })
    }

    /// Whether the cap per address applies at all.
    pub fn caps_addresses(&self) -> bool {
        self.per_address > 0
    }

    /// A place to answer a refused connection in, if one is free.
    pub fn refusing(self: &Arc<Self>) -> Option<RefusalSlot> {
        let n = self.refusing.fetch_add(1, Ordering::SeqCst);
        if n >= MAX_REFUSING {
            self.refusing.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(RefusalSlot(Arc::clone(self)))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.table).open
    }
}

/// An admitted connection; dropping it frees its place.
pub struct ConnSlot {
    limiter: Arc<ConnectionLimiter>,
    key: Option<IpAddr>,
    /// Whether it counts in the total (TCP connections do, forwarded
    /// clients do not).
    counted: bool,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut t = lock(&self.limiter.table);
        if self.counted {
            t.open = t.open.saturating_sub(1);
            crate::metrics::global().connection_closed();
        }
        if let Some(k) = self.key
            && let Some(n) = t.per.get_mut(&k)
        {
            *n -= 1;
            if *n == 0 {
                t.per.remove(&k);
            }
        }
    }
}

/// A refusal being answered.
pub struct RefusalSlot(Arc<ConnectionLimiter>);

impl Drop for RefusalSlot {
    fn drop(&mut self) {
        self.0.refusing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The total connection cap to use when none is configured: half of what
/// the open-files limit leaves after a reserve (each console session holds
/// two descriptors: the browser's and the VNC server's).
pub fn auto_max_connections(open_files: u64) -> usize {
    let reserve = 64 + MAX_REFUSING as u64;
    (open_files.saturating_sub(reserve) / 2).max(16) as usize
}

/// The soft open-files limit of this process, from `/proc/self/limits`.
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    match soft {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn budget_per_address() {
        let l = Arc::new(FailureLimiter::new(3, Duration::ZERO));
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        for _ in 0..3 {
            l.begin(a).await.unwrap().fail();
        }
        assert_eq!(l.begin(a).await.err(), Some(Refused::Spent));
        assert!(l.begin(b).await.is_ok());
    }

    #[tokio::test]
    async fn successes_are_refunded() {
        let l = Arc::new(FailureLimiter::new(2, Duration::ZERO));
        let a = ip("192.0.2.1");
        for _ in 0..10 {
            l.begin(a).await.unwrap().refund();
        }
        l.begin(a).await.unwrap().fail();
        l.begin(a).await.unwrap().fail();
        assert!(l.begin(a).await.is_err());
    }

    /// Of many attempts started at once, only the budget's worth run; the
    /// rest wait for them and are then refused.
    #[tokio::test]
    async fn concurrent_attempts_cannot_overdraw_the_budget() {
        let l = Arc::new(FailureLimiter::new(5, Duration::ZERO));
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
                    let Ok(attempt) = l.begin(a).await else {
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
        assert!(most.load(Ordering::SeqCst) <= 5);
    }

    /// Work over the cap waits for a place rather than failing.
    #[tokio::test]
    async fn work_in_flight_is_capped_per_address() {
        let gate = Arc::new(InFlight::new(2));
        let a = ip("2001:db8::1");
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let (gate, running, most) =
                    (Arc::clone(&gate), Arc::clone(&running), Arc::clone(&most));
                // The same /64, from different addresses.
                let from = IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, i + 1]);
                tokio::spawn(async move {
                    let _slot = gate.enter(from).await.unwrap();
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
        assert!(lock(&gate.busy).is_empty());
        let _held = (gate.enter(a).await.unwrap(), gate.enter(a).await.unwrap());
        // Another address is not held up.
        assert!(gate.enter(ip("192.0.2.1")).await.is_ok());
    }

    #[tokio::test]
    async fn an_abandoned_attempt_stays_charged() {
        let l = Arc::new(FailureLimiter::new(1, Duration::ZERO));
        let a = ip("192.0.2.1");
        drop(l.begin(a).await.unwrap());
        assert_eq!(l.begin(a).await.err(), Some(Refused::Spent));
    }

    #[tokio::test]
    async fn ipv6_counts_per_64() {
        let l = Arc::new(FailureLimiter::new(2, Duration::ZERO));
        l.begin(ip("2001:db8:1:2::1")).await.unwrap().fail();
        l.begin(ip("2001:db8:1:2:ffff::9")).await.unwrap().fail();
        assert!(l.begin(ip("2001:db8:1:2::77")).await.is_err());
        assert!(l.begin(ip("2001:db8:1:3::1")).await.is_ok());
        assert_eq!(bucket(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(bucket(ip("2001:db8:a:b:c:d:e:f")), ip("2001:db8:a:b::"));
    }

    #[tokio::test]
    async fn zero_turns_it_off() {
        let l = Arc::new(FailureLimiter::new(0, Duration::ZERO));
        let a = ip("192.0.2.1");
        for _ in 0..100 {
            l.begin(a).await.unwrap().fail();
        }
        assert!(l.begin(a).await.is_ok());
    }

    #[tokio::test]
    async fn the_table_is_bounded() {
        let l = Arc::new(FailureLimiter::new(5, Duration::ZERO));
        for i in 0..(MAX_TRACKED as u32 + 1000) {
            l.begin(IpAddr::from(i.to_be_bytes())).await.unwrap().fail();
        }
        assert!(lock(&l.seen).len() <= MAX_TRACKED);
    }

    #[test]
    fn connection_caps() {
        let proxy = ip("10.0.0.1");
        let l = Arc::new(ConnectionLimiter::new(5, 2, vec![proxy]));
        let a1 = l.admit(ip("2001:db8::1")).unwrap();
        let _a2 = l.admit(ip("2001:db8::2")).unwrap();
        assert_eq!(
            l.admit(ip("2001:db8::3")).err(),
            Some(ConnRefused::PerAddress),
            "the same /64"
        );
        drop(a1);
        let _a3 = l.admit(ip("2001:db8::3")).unwrap();
        // The trusted proxy is not one client, but counts in the total.
        let _p1 = l.admit(proxy).unwrap();
        let _p2 = l.admit(proxy).unwrap();
        let _p3 = l.admit(proxy).unwrap();
        assert_eq!(l.admit(proxy).err(), Some(ConnRefused::Total));
        // Clients behind it are capped by their forwarded address.
        let f1 = l.admit_forwarded(ip("198.51.100.7")).unwrap();
        let _f2 = l.admit_forwarded(ip("198.51.100.7")).unwrap();
        assert!(l.admit_forwarded(ip("198.51.100.7")).is_err());
        drop(f1);
        assert!(l.admit_forwarded(ip("198.51.100.7")).is_ok());
        assert_eq!(l.open(), 5);
    }

    #[test]
    fn refusals_in_progress_are_bounded() {
        let l = Arc::new(ConnectionLimiter::new(0, 0, vec![]));
        let held: Vec<_> = (0..MAX_REFUSING).map(|_| l.refusing().unwrap()).collect();
        assert!(l.refusing().is_none());
        drop(held);
        assert!(l.refusing().is_some());
    }

    #[test]
    fn automatic_total_cap() {
        assert_eq!(auto_max_connections(1024), 352);
        assert_eq!(auto_max_connections(65_536), 32_608);
        assert_eq!(auto_max_connections(10), 16);
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
