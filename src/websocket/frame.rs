//! Frame headers (RFC 6455 section 5.2), without I/O.

/// Longest header a server writes: 2 bytes plus an 8-byte length.
pub const MAX_SERVER_HEADER: usize = 10;

/// Control frames carry at most this many payload bytes.
pub const MAX_CONTROL_PAYLOAD: u64 = 125;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_u8(v: u8) -> Option<OpCode> {
        Some(match v {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn as_u8(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A client frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: OpCode,
    pub mask: [u8; 4],
    pub len: u64,
}

/// Why a client frame is refused. Each ends the connection with a close
/// code (1002 protocol error, 1009 too big).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("reserved bits set without a negotiated extension")]
    Reserved,
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("client frames must be masked")]
    Unmasked,
    #[error("control frame longer than 125 bytes")]
    ControlTooLong,
    #[error("fragmented control frame")]
    ControlFragmented,
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("non-minimal payload length encoding")]
    NonMinimalLength,
}

impl FrameError {
    /// The close code this error ends the connection with.
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::TooLarge { .. } => 1009,
            _ => 1002,
        }
    }
}

/// Parses a client frame header at the start of `buf`. `Ok(None)` means
/// more bytes are needed; otherwise the header and its length in bytes.
/// Frames longer than `max_len` are refused before any payload is read.
pub fn parse_client_header(
    buf: &[u8],
    max_len: u64,
) -> Result<Option<(Header, usize)>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::from_u8(b0 & 0x0F).ok_or(FrameError::UnknownOpcode(b0 & 0x0F))?;
    if b1 & 0x80 == 0 {
        return Err(FrameError::Unmasked);
    }
    let (len, at) = match b1 & 0x7F {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            let len = u64::from(u16::from_be_bytes([b[0], b[1]]));
            if len < 126 {
                return Err(FrameError::NonMinimalLength);
            }
            (len, 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut raw = [0u8; 8];
            raw.copy_from_slice(b);
            let len = u64::from_be_bytes(raw);
            if len < 65536 || len >> 63 != 0 {
                return Err(FrameError::NonMinimalLength);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode.is_control() {
        if !fin {
            return Err(FrameError::ControlFragmented);
        }
        if len > MAX_CONTROL_PAYLOAD {
            return Err(FrameError::ControlTooLong);
        }
    }
    if len > max_len {
        return Err(FrameError::TooLarge { len, max: max_len });
    }
    let Some(m) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    let mask = [m[0], m[1], m[2], m[3]];
    Ok(Some((
        Header {
            fin,
            opcode,
            mask,
            len,
        },
        at + 4,
    )))
}

/// Unmasks `data` in place; `offset` is how many payload bytes of the same
/// frame came before it (payloads are unmasked piece by piece as they
/// arrive). Works eight bytes at a time.
pub fn unmask(data: &mut [u8], mask: [u8; 4], offset: u64) {
    let rot = (offset % 4) as usize;
    let m = [
        mask[rot],
        mask[(rot + 1) % 4],
        mask[(rot + 2) % 4],
        mask[(rot + 3) % 4],
    ];
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(raw) ^ word).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

/// Writes an unmasked, final server frame header for `len` payload bytes;
/// returns its length.
pub fn server_header(opcode: OpCode, len: usize, out: &mut [u8; MAX_SERVER_HEADER]) -> usize {
    out[0] = 0x80 | opcode.as_u8();
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= usize::from(u16::MAX) {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut v = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => v.push(0x80 | n as u8),
            n if n < 65536 => {
                v.push(0x80 | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(0x80 | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    #[test]
    fn parses_all_three_length_forms_and_unmasks() {
        for n in [0usize, 5, 125, 126, 1000, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            let wire = masked(0x2, &payload, [1, 2, 3, 4]);
            // Every prefix shorter than the header asks for more.
            let mut k = 0;
            let (h, at) = loop {
                match parse_client_header(&wire[..k], u64::MAX).unwrap() {
                    Some(found) => break found,
                    None => k += 1,
                }
            };
            assert_eq!(h.len as usize, n);
            assert_eq!(h.opcode, OpCode::Binary);
            let mut body = wire[at..].to_vec();
            unmask(&mut body, h.mask, 0);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn unmasking_in_pieces_matches_unmasking_at_once() {
        let mask = [0xA1, 0xB2, 0xC3, 0xD4];
        let data: Vec<u8> = (0..301u32).map(|i| (i * 31) as u8).collect();
        let mut whole = data.clone();
        unmask(&mut whole, mask, 0);
        for split in [1usize, 3, 7, 8, 9, 64, 150] {
            let mut pieces = data.clone();
            let mut off = 0;
            for chunk in pieces.chunks_mut(split) {
                unmask(chunk, mask, off);
                off += chunk.len() as u64;
            }
            assert_eq!(pieces, whole, "split {split}");
        }
    }

    #[test]
    fn strict_client_rules() {
        let m = [9, 9, 9, 9];
        assert_eq!(
            parse_client_header(&[0x82, 0x05], 100),
            Err(FrameError::Unmasked)
        );
        assert_eq!(
            parse_client_header(&[0xC2, 0x85], 100),
            Err(FrameError::Reserved)
        );
        assert_eq!(
            parse_client_header(&[0x83, 0x85], 100),
            Err(FrameError::UnknownOpcode(3))
        );
        assert_eq!(
            parse_client_header(&[0x09, 0x80], 100),
            Err(FrameError::ControlFragmented)
        );
        assert_eq!(
            parse_client_header(&[0x89, 0xFE, 0x00, 0x7E], 1000),
            Err(FrameError::ControlTooLong)
        );
        assert_eq!(
            parse_client_header(&[0x82, 0xFE, 0x00, 0x05], 1000),
            Err(FrameError::NonMinimalLength)
        );
        let big = masked(0x2, &[0u8; 200], m);
        assert_eq!(
            parse_client_header(&big, 100),
            Err(FrameError::TooLarge { len: 200, max: 100 })
        );
        assert_eq!(FrameError::TooLarge { len: 1, max: 0 }.close_code(), 1009);
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(
            parse_client_header(&huge, u64::MAX),
            Err(FrameError::NonMinimalLength)
        );
    }

    #[test]
    fn server_headers() {
        let mut h = [0u8; MAX_SERVER_HEADER];
        assert_eq!(server_header(OpCode::Binary, 5, &mut h), 2);
        assert_eq!(&h[..2], &[0x82, 5]);
        assert_eq!(server_header(OpCode::Binary, 300, &mut h), 4);
        assert_eq!(&h[..4], &[0x82, 126, 1, 44]);
        assert_eq!(server_header(OpCode::Close, 70000, &mut h), 10);
        assert_eq!(&h[..2], &[0x88, 127]);
        assert_eq!(u64::from_be_bytes(h[2..10].try_into().unwrap()), 70000);
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x2545F4914F6CDD1D;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            let n = (x >> 60) as usize % 9;
            let _ = parse_client_header(&bytes[..n], 1 << 20);
        }
    }
}
