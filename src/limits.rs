//! Per-address limits on failures: wrong tokens, wrong passwords.
//!
//! Each address gets a budget of failures per minute; past it, requests
//! from that address are answered "too many attempts" after a delay,
//! without any token or password being checked. The table is bounded, so
//! a flood of addresses cannot grow it without limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most addresses tracked at once.
const MAX_TRACKED: usize = 65_536;
const WINDOW: Duration = Duration::from_secs(60);

pub struct FailureLimiter {
    per_minute: u32,
    delay: Duration,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimiter {
    /// `per_minute` of 0 turns the limit off.
    pub fn new(per_minute: u32, delay: Duration) -> FailureLimiter {
        FailureLimiter {
            per_minute,
            delay,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// The delay to impose on a refused request.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// Whether `ip` has used up its failures for this minute.
    pub fn blocked(&self, ip: IpAddr) -> bool {
        if self.per_minute == 0 {
            return false;
        }
        let Ok(seen) = self.seen.lock() else {
            return false;
        };
        seen.get(&ip)
            .is_some_and(|(start, n)| start.elapsed() < WINDOW && *n >= self.per_minute)
    }

    /// Records a failure from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        if self.per_minute == 0 {
            return;
        }
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        if seen.len() >= MAX_TRACKED && !seen.contains_key(&ip) {
            seen.retain(|_, (start, _)| start.elapsed() < WINDOW);
            if seen.len() >= MAX_TRACKED {
                // Still full of live entries: forget an arbitrary one rather
                // than grow.
                if let Some(k) = seen.keys().next().copied() {
                    seen.remove(&k);
                }
            }
        }
        let entry = seen.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_per_address() {
        let l = FailureLimiter::new(3, Duration::ZERO);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(!l.blocked(a));
            l.failed(a);
        }
        assert!(l.blocked(a));
        assert!(!l.blocked(b));
    }

    #[test]
    fn zero_turns_it_off() {
        let l = FailureLimiter::new(0, Duration::ZERO);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..100 {
            l.failed(a);
        }
        assert!(!l.blocked(a));
    }

    #[test]
    fn the_table_is_bounded() {
        let l = FailureLimiter::new(5, Duration::ZERO);
        for i in 0..(MAX_TRACKED as u32 + 1000) {
            l.failed(IpAddr::from(i.to_be_bytes()));
        }
        assert!(l.seen.lock().unwrap().len() <= MAX_TRACKED);
    }
}
