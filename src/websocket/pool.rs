//! Large read buffers, lent to a session only while its bytes are moving.
//!
//! A session that holds a 64 KiB buffer for its whole life costs 64 KiB
//! even when its screen is still, which is most of the time. Here a session
//! takes a buffer when a read finds bytes and gives it back as soon as a
//! read would wait, so memory follows the sessions that are busy, not the
//! ones that are open. A few returned buffers are kept for the next taker,
//! which spares the allocator (and the zeroing) on every burst.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, PoisonError};

/// The size of a lent buffer: one full read from the VNC server or the
/// browser.
pub const BIG: usize = 64 * 1024;
/// Most returned buffers kept (4 MiB); more are freed.
const KEEP: usize = 64;

static SPARE: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

/// A lent buffer of [`BIG`] bytes; it goes back when dropped. Its contents
/// are whatever the last borrower left: read into it before reading it.
pub struct Lent(Option<Box<[u8]>>);

impl Lent {
    pub fn take() -> Lent {
        let spare = SPARE.lock().unwrap_or_else(PoisonError::into_inner).pop();
        Lent(Some(
            spare.unwrap_or_else(|| vec![0u8; BIG].into_boxed_slice()),
        ))
    }
}

impl Deref for Lent {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl DerefMut for Lent {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(buf) = self.0.take() {
            let mut spare = SPARE.lock().unwrap_or_else(PoisonError::into_inner);
            if spare.len() < KEEP {
                spare.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_keep_returned_buffers_are_kept() {
        let lent: Vec<Lent> = (0..KEEP + 8).map(|_| Lent::take()).collect();
        assert!(lent.iter().all(|b| b.len() == BIG));
        drop(lent);
        let kept = SPARE.lock().map(|s| s.len()).unwrap_or(usize::MAX);
        assert!(kept <= KEEP, "{kept} kept");
        assert!(kept > 0);
    }
}
