//! What the handshake tests of both roles share: the protocol's fixed
//! messages, one known VNC Authentication exchange, byte helpers, and a
//! deterministic random source for the fuzz-style tests.

pub(crate) const PW: &[u8] = b"password";
/// Challenge 0x00..=0x0f and the matching response for "password"
/// (independently computed with pycryptodome, see vncauth's tests).
pub(crate) const CHALLENGE: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
pub(crate) const RESPONSE: [u8; 16] = [
    0xb8, 0x66, 0x92, 0x41, 0x25, 0xc8, 0xee, 0xbb, 0x9d, 0xeb, 0xc1, 0xdb, 0x61, 0xc5, 0x38, 0xe2,
];
pub(crate) const V3: &[u8] = b"RFB 003.003\n";
pub(crate) const V7: &[u8] = b"RFB 003.007\n";
pub(crate) const V8: &[u8] = b"RFB 003.008\n";
/// SecurityResult OK and failed.
pub(crate) const OK: &[u8] = &[0, 0, 0, 0];
pub(crate) const FAILED: &[u8] = &[0, 0, 0, 1];

pub(crate) fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

pub(crate) fn be(n: u32) -> Vec<u8> {
    n.to_be_bytes().to_vec()
}

/// u32 length + text.
pub(crate) fn string(t: &[u8]) -> Vec<u8> {
    cat(&[&be(t.len() as u32), t])
}

/// Deterministic xorshift64* generator.
pub(crate) struct XorShift(pub(crate) u64);

impl XorShift {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}
