//! VNC Authentication (RFB security type 2, RFC 6143 §7.2.2): the DES
//! challenge-response.
//!
//! The server sends a random 16-byte challenge and the client answers with the
//! challenge encrypted by single DES (ECB, two 8-byte blocks) under a key made
//! from the password. The broker needs this in two places: the security proxy
//! ([`crate::rfb::SecurityProxy`]) logs in to a VNC server on the browser's
//! behalf, so the browser never learns the password, and the server handshake
//! ([`crate::rfb::server`]) checks the clients of the demo VNC server.
//!
//! Two historical quirks are part of the protocol and must be reproduced: only
//! the first 8 bytes of the password count (shorter ones are zero-padded), and
//! every key byte is bit-reversed (the original VNC code fed DES its key in the
//! opposite bit order). VNC Authentication is weak by modern standards; it is
//! implemented here because that is what VNC servers speak.

use des::cipher::generic_array::GenericArray;
use des::cipher::{BlockEncrypt, KeyInit};

/// Length of the challenge and of the response, in bytes.
pub const CHALLENGE_LEN: usize = 16;

/// Only this many leading password bytes take part in VNC Authentication.
pub const MAX_PASSWORD_LEN: usize = 8;

/// Computes the VNC Authentication response to `challenge` for `password`.
///
/// The key is the first 8 bytes of `password` (zero-padded when shorter), each
/// byte bit-reversed; the two 8-byte halves of the challenge are encrypted with
/// DES in ECB mode.
pub fn response(password: &[u8], challenge: &[u8; CHALLENGE_LEN]) -> [u8; CHALLENGE_LEN] {
    let mut key = [0u8; MAX_PASSWORD_LEN];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    let cipher = des::Des::new(&GenericArray::from(key));
    key.fill(0);

    let mut out = [0u8; CHALLENGE_LEN];
    for (src, dst) in challenge.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
        let mut block = [0u8; 8];
        block.copy_from_slice(src);
        let mut block = GenericArray::from(block);
        cipher.encrypt_block(&mut block);
        dst.copy_from_slice(&block);
    }
    out
}

/// Checks a client's `answer` to `challenge` against `password`.
///
/// The comparison does not stop at the first differing byte, so its timing does
/// not tell an attacker how much of a guess was right. An answer of the wrong
/// length is simply wrong.
pub fn verify(password: &[u8], challenge: &[u8; CHALLENGE_LEN], answer: &[u8]) -> bool {
    if answer.len() != CHALLENGE_LEN {
        return false;
    }
    let expected = response(password, challenge);
    let diff = expected
        .iter()
        .zip(answer)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> [u8; 16] {
        let mut out = [0u8; 16];
        assert_eq!(s.len(), 32);
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    fn counting_challenge() -> [u8; 16] {
        let mut c = [0u8; 16];
        for (i, b) in c.iter_mut().enumerate() {
            *b = i as u8;
        }
        c
    }

    // Reference vectors computed independently of this code, with pycryptodome:
    //   key = bytes(int(f"{b:08b}"[::-1], 2) for b in (pw[:8] + b"\0" * 8)[:8])
    //   DES.new(key, DES.MODE_ECB).encrypt(challenge).hex()
    // and cross-checked with `openssl enc -des-ecb -nopad -K <key hex>`
    // (legacy provider). The challenge is bytes 0x00..=0x0f unless noted.
    #[test]
    fn known_answer_password() {
        // key for "password" after bit reversal: 0e86ceceeef64e26
        assert_eq!(
            response(b"password", &counting_challenge()),
            hex("b866924125c8eebb9debc1db61c538e2")
        );
    }

    #[test]
    fn known_answer_short_password_is_zero_padded() {
        // key for "secret": cea6c64ea62e0000
        assert_eq!(
            response(b"secret", &counting_challenge()),
            hex("ee22539f33a5983ec12f9c2edbc995dd")
        );
    }

    #[test]
    fn known_answer_long_password_is_truncated() {
        let expected = hex("5931256585fd62106d317e09fc963baf");
        assert_eq!(
            response(b"longpassword123", &counting_challenge()),
            expected
        );
        // Only the first 8 bytes count.
        assert_eq!(response(b"longpass", &counting_challenge()), expected);
        assert_eq!(response(b"longpassXYZ", &counting_challenge()), expected);
    }

    #[test]
    fn known_answer_empty_password() {
        // all-zero key
        assert_eq!(
            response(b"", &counting_challenge()),
            hex("491e890de9ace932838a49792f2213f3")
        );
    }

    #[test]
    fn known_answer_other_challenge() {
        let challenge = hex("ffeeddccbbaa99887766554433221100");
        assert_eq!(
            response(b"vnc", &challenge),
            hex("88677a51cd38148fc5e536e6e90c9726")
        );
    }

    #[test]
    fn key_bytes_are_bit_reversed() {
        // Plain DES with the unreversed key b"password" gives
        // eb175c5f075811cd27669005286b11cc (pycryptodome); VNC must differ.
        let plain = hex("eb175c5f075811cd27669005286b11cc");
        assert_ne!(response(b"password", &counting_challenge()), plain);
    }

    #[test]
    fn halves_are_encrypted_independently() {
        // ECB: equal challenge halves give equal response halves.
        let challenge = [0x5a; 16];
        let r = response(b"pw", &challenge);
        assert_eq!(r[..8], r[8..]);
        assert_ne!(r[..8], challenge[..8]);
    }

    #[test]
    fn verify_accepts_right_and_rejects_wrong() {
        let c = counting_challenge();
        let good = response(b"password", &c);
        assert!(verify(b"password", &c, &good));
        assert!(verify(b"password-with-suffix", &c, &good));
        assert!(!verify(b"passwore", &c, &good));
        let mut bad = good;
        bad[15] ^= 1;
        assert!(!verify(b"password", &c, &bad));
        assert!(!verify(b"password", &c, &good[..15]));
        assert!(!verify(b"password", &c, &[]));
        let mut long = good.to_vec();
        long.push(0);
        assert!(!verify(b"password", &c, &long));
    }
}
