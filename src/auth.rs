//! Passwords: argon2id hashes, and a cache so that a portal calling the API
//! many times a second does not pay a full argon2 run each time.
//!
//! The cache remembers only that a credential matched a given stored hash.
//! Its key is an HMAC, under a per-process random key, of the user name, the
//! password and the stored hash: the cache holds no password, a changed
//! password misses at once, and entries are bounded in count and age.

use std::collections::HashMap;
use std::sync::Mutex;
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
        let k = self.entry_key(user, password, phc);
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
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

    #[test]
    fn cache_hits_only_the_same_credential_and_hash() {
        let c = VerifyCache::new(Duration::from_secs(60), 10);
        c.remember("alice", "pw", "H1");
        assert!(c.hit("alice", "pw", "H1"));
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
