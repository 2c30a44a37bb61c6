//! Passwords: argon2id hashes, the bounded pool that verifies them, and a
//! cache so that a portal calling the API many times a second does not pay
//! a full argon2 run each time.
//!
//! Verifications run on a few threads of their own with a short queue, so a
//! flood of password guesses can take neither the blocking threads the
//! database needs nor unbounded memory. A check takes a [`Ticket`] (a place
//! in that queue) before it even looks the user up; when none is left it is
//! answered "busy" at once, and a flood costs the database nothing. One
//! client address holds only a few places at a time (its other checks wait
//! their turn), so it cannot fill the queue for everyone.
//!
//! The cache remembers only that a credential matched a given stored hash.
//! Its key is an HMAC, under a per-process random key, of the user name, the
//! password and the stored hash: the cache holds no password, a changed
//! password misses at once, and entries are bounded in count and age.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Hashes a password with argon2id and a random salt (PHC string format).
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks a password against a PHC hash. A malformed stored hash never matches.
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// The hash unknown users are checked against, so that their answer takes
/// as long as a known user's: made like any stored hash (same parameters),
/// from a random password nobody knows.
static DUMMY_HASH: LazyLock<Option<String>> = LazyLock::new(|| {
    let mut pw = [0u8; 32];
    getrandom::fill(&mut pw).ok()?;
    hash_password(&hex::encode(pw)).ok()
});

/// What a password is checked against.
pub enum Against {
    /// A stored PHC hash.
    Stored(String),
    /// The dummy hash, for a user that does not exist.
    Dummy,
}

/// The verification queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many password checks in progress")]
pub struct Busy;

tokio::task_local! {
    /// The address of the client whose password is being checked, set by
    /// the APIs around the calls that check one.
    pub static CLIENT: IpAddr;
}

/// The client address of the check in progress, if the caller set one.
fn client() -> Option<IpAddr> {
    CLIENT.try_with(|ip| *ip).ok()
}

/// A place in the verifier: a check running or waiting to run. Dropping
/// it frees the place.
pub struct Ticket {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _address: Option<crate::limits::InFlightSlot>,
}

struct Job {
    password: String,
    against: Against,
    reply: tokio::sync::oneshot::Sender<bool>,
    /// Held until the job is done.
    _ticket: Ticket,
}

/// A fixed set of threads that run argon2, fed by a bounded queue.
pub struct Verifier {
    jobs: SyncSender<Job>,
    tickets: Arc<tokio::sync::Semaphore>,
    per_address: Arc<crate::limits::InFlight>,
}

impl Verifier {
    /// `threads` workers (at least one), and up to `queue` checks waiting.
    pub fn new(threads: usize, queue: usize) -> Verifier {
        let threads = threads.max(1);
        // Every job holds a ticket, so the channel never holds more jobs
        // than there are tickets.
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(queue + threads);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(Job {
                            password,
                            against,
                            reply,
                            _ticket: ticket,
                        }) = job
                        else {
                            return;
                        };
                        // The caller gave up (its client left, or its
                        // request ran out of time): skip the work.
                        if reply.is_closed() {
                            continue;
                        }
                        let ok = match &against {
                            Against::Stored(phc) => run_verification(&password, phc),
                            Against::Dummy => {
                                // Both branches do the same work; the answer
                                // for an unknown user is always no.
                                let _ = DUMMY_HASH
                                    .as_deref()
                                    .map(|phc| run_verification(&password, phc));
                                false
                            }
                        };
                        // The place is free before the caller hears back.
                        drop(ticket);
                        let _ = reply.send(ok);
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password verification thread");
            }
        }
        Verifier {
            jobs,
            tickets: Arc::new(tokio::sync::Semaphore::new(threads + queue)),
            per_address: Arc::new(crate::limits::InFlight::new(0)),
        }
    }

    /// How many places one client address may hold at once (0: no cap).
    pub fn set_per_address(&self, n: usize) {
        self.per_address.set_cap(n);
    }

    /// A place for one check of the current [`CLIENT`]'s: once the address
    /// has a place of its own free (waiting for one, up to a bound), and at
    /// once a free place in the queue, else `Busy`.
    pub async fn ticket(&self) -> Result<Ticket, Busy> {
        let busy = || {
            crate::metrics::global().password_check_busy();
            Busy
        };
        let address = match client() {
            Some(ip) => Some(self.per_address.enter(ip).await.map_err(|_| busy())?),
            None => None,
        };
        match Arc::clone(&self.tickets).try_acquire_owned() {
            Ok(permit) => Ok(Ticket {
                _permit: permit,
                _address: address,
            }),
            Err(_) => Err(busy()),
        }
    }

    /// Checks `password` on the pool, in the place `ticket` holds.
    pub async fn verify(
        &self,
        ticket: Ticket,
        password: String,
        against: Against,
    ) -> Result<bool, Busy> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            password,
            against,
            reply,
            _ticket: ticket,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                crate::metrics::global().password_check_busy();
                return Err(Busy);
            }
        }
        answer.await.map_err(|_| Busy)
    }
}

/// Makes the dummy hash now, off the async threads (one argon2 run), so the
/// first unknown user does not pay for it.
pub fn warm_up() {
    let _ = std::thread::Builder::new()
        .name("argon2-warm-up".into())
        .spawn(|| {
            LazyLock::force(&DUMMY_HASH);
        });
}

fn run_verification(password: &str, phc: &str) -> bool {
    crate::metrics::global().password_verification();
    verify_password(password, phc)
}

/// Worker threads of the process's verifier: half the cores (at least one),
/// so a flood of guesses leaves the rest to the proxy and the database.
fn verifier_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() / 2)
        .unwrap_or(1)
        .max(1)
}

/// Checks waiting per worker thread before new ones are answered "busy".
const QUEUE_PER_THREAD: usize = 16;

static VERIFIER: LazyLock<Verifier> = LazyLock::new(|| {
    let threads = verifier_threads();
    Verifier::new(threads, threads * QUEUE_PER_THREAD)
});

/// The process's password verifier.
pub fn verifier() -> &'static Verifier {
    &VERIFIER
}

/// A bounded, short-lived record of successful verifications.
pub struct VerifyCache {
    key: [u8; 32],
    ttl: Duration,
    capacity: usize,
    seen: Mutex<HashMap<[u8; 32], Instant>>,
}

impl VerifyCache {
    pub fn new(ttl: Duration, capacity: usize) -> VerifyCache {
        let mut key = [0u8; 32];
        // Without OS randomness a fixed key would make entries guessable from
        // memory dumps only; the cache stays correct either way.
        let _ = getrandom::fill(&mut key);
        VerifyCache {
            key,
            ttl,
            capacity,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether this user name and password matched some stored hash within
    /// the TTL (the hash may have changed since: [`hit`](Self::hit) decides).
    /// A credential never seen right has to queue for a verification.
    pub fn vouched(&self, user: &str, password: &str) -> bool {
        self.hit(user, password, "")
    }

    fn entry_key(&self, user: &str, password: &str, phc: &str) -> [u8; 32] {
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => return [0u8; 32],
        };
        for part in [user, password, phc] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part.as_bytes());
        }
        mac.finalize().into_bytes().into()
    }

    /// Whether this credential matched this stored hash within the TTL.
    pub fn hit(&self, user: &str, password: &str, phc: &str) -> bool {
        if self.capacity == 0 || self.ttl.is_zero() {
            return false;
        }
        let k = self.entry_key(user, password, phc);
        let Ok(mut seen) = self.seen.lock() else {
            return false;
        };
        match seen.get(&k) {
            Some(at) if at.elapsed() < self.ttl => true,
            Some(_) => {
                seen.remove(&k);
                false
            }
            None => false,
        }
    }

    /// Records a successful verification. When full, expired entries go
    /// first; if none have expired, the oldest entry makes room.
    pub fn remember(&self, user: &str, password: &str, phc: &str) {
        if self.capacity == 0 || self.ttl.is_zero() {
            return;
        }
        // With the stored hash, for `hit`, and without, for `vouched`
        // (stored hashes are never empty).
        let keys = [
            self.entry_key(user, password, phc),
            self.entry_key(user, password, ""),
        ];
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        for k in keys {
            if seen.len() >= self.capacity && !seen.contains_key(&k) {
                let ttl = self.ttl;
                seen.retain(|_, at| at.elapsed() < ttl);
                if seen.len() >= self.capacity
                    && let Some(oldest) = seen.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k)
                {
                    seen.remove(&oldest);
                }
            }
            seen.insert(k, Instant::now());
        }
    }

    pub fn len(&self) -> usize {
        self.seen.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("s3cret ", &h));
        assert!(!verify_password("s3cret", "not a hash"));
        assert_ne!(h, hash_password("s3cret").unwrap(), "salts differ");
    }

    #[tokio::test]
    async fn the_pool_verifies_and_answers_busy_when_full() {
        let h = hash_password("pw").unwrap();
        let v = Verifier::new(1, 1);
        for (pw, against, want) in [
            ("pw", Against::Stored(h.clone()), true),
            ("no", Against::Stored(h.clone()), false),
            ("pw", Against::Dummy, false),
        ] {
            let t = v.ticket().await.unwrap();
            assert_eq!(v.verify(t, pw.into(), against).await, Ok(want));
        }
        // One running, one queued: a third is turned away at once.
        let (t1, t2) = (v.ticket().await.unwrap(), v.ticket().await.unwrap());
        assert!(v.ticket().await.is_err());
        drop(t1);
        assert!(v.ticket().await.is_ok());
        drop(t2);
        // Of many at once, some are turned away.
        let v: &'static Verifier = Box::leak(Box::new(v));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let h = h.clone();
                tokio::spawn(async move {
                    let ticket = v.ticket().await?;
                    v.verify(ticket, "no".into(), Against::Stored(h)).await
                })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        assert!(answers.contains(&Err(Busy)), "{answers:?}");
        assert!(answers.contains(&Ok(false)), "{answers:?}");
    }

    #[test]
    fn cache_hits_only_the_same_credential_and_hash() {
        let c = VerifyCache::new(Duration::from_secs(60), 10);
        c.remember("alice", "pw", "H1");
        assert!(c.hit("alice", "pw", "H1"));
        assert!(c.vouched("alice", "pw"));
        assert!(!c.vouched("alice", "pw2"));
        assert!(!c.hit("alice", "pw2", "H1"));
        assert!(!c.hit("alice", "pw", "H2"), "a changed stored hash misses");
        assert!(!c.hit("alic", "epw", "H1"), "fields are length-delimited");
    }

    #[test]
    fn cache_entries_expire() {
        let c = VerifyCache::new(Duration::from_millis(20), 10);
        c.remember("a", "b", "c");
        std::thread::sleep(Duration::from_millis(40));
        assert!(!c.hit("a", "b", "c"));
        assert!(!c.vouched("a", "b"));
        assert!(c.is_empty());
    }

    #[test]
    fn cache_is_bounded() {
        let c = VerifyCache::new(Duration::from_secs(60), 3);
        for i in 0..10 {
            c.remember(&format!("u{i}"), "p", "h");
        }
        assert_eq!(c.len(), 3);
        assert!(c.hit("u9", "p", "h"));
        assert!(!c.hit("u0", "p", "h"));
    }

    #[test]
    fn disabled_cache_never_hits() {
        let c = VerifyCache::new(Duration::ZERO, 10);
        c.remember("a", "b", "c");
        assert!(!c.hit("a", "b", "c"));
    }
}
