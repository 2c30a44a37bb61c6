//! The RFB wire format both roles share (RFC 6143 §7): protocol versions,
//! security type numbers, length-prefixed strings, the pixel format, and the
//! bounded input buffer every handshake parses from.
//!
//! Nothing here does I/O or keeps protocol state; the state machines are in
//! [`super::server`] (the server role) and [`super::SecurityProxy`] (both
//! roles at once).

/// Most unparsed input bytes buffered per peer while a handshake runs; more
/// than that before the handshake needs them is a protocol error.
pub const MAX_BUFFERED: usize = 4096;

/// Longest failure reason (in bytes) that is read from a peer. A longer one
/// is not read at all; a generic message is reported instead.
pub const MAX_REASON_LEN: u32 = 256;

/// Length of a ProtocolVersion message (`RFB xxx.yyy\n`).
pub const VERSION_LEN: usize = 12;

/// Security type "invalid": in RFB 3.3 the server's way of refusing.
pub const SEC_INVALID: u32 = 0;
/// Security type "None".
pub const SEC_NONE: u8 = 1;
/// Security type "VNC Authentication" ([`super::vncauth`]).
pub const SEC_VNC_AUTH: u8 = 2;

/// SecurityResult "OK"; any other value is a failure.
pub const SECURITY_OK: u32 = 0;
/// SecurityResult value a server sends for a failure.
pub const SECURITY_FAILED: u32 = 1;

/// The RFB 3.x minor version spoken with one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Minor {
    V3,
    V7,
    V8,
}

impl Minor {
    pub(crate) fn version_line(self) -> &'static [u8; VERSION_LEN] {
        match self {
            Minor::V3 => b"RFB 003.003\n",
            Minor::V7 => b"RFB 003.007\n",
            Minor::V8 => b"RFB 003.008\n",
        }
    }
}

/// Human-readable name of a security type, for messages.
pub(crate) fn security_type_name(kind: u8) -> &'static str {
    match kind {
        SEC_NONE => "None",
        SEC_VNC_AUTH => "VNC Authentication",
        _ => "unknown",
    }
}

/// Parses `RFB xxx.yyy\n` into `(major, minor)`.
pub(crate) fn parse_version(line: &[u8]) -> Option<(u32, u32)> {
    let [b'R', b'F', b'B', b' ', a, b, c, b'.', d, e, f, b'\n'] = line else {
        return None;
    };
    Some((digits3([*a, *b, *c])?, digits3([*d, *e, *f])?))
}

fn digits3(d: [u8; 3]) -> Option<u32> {
    d.iter().try_fold(0u32, |acc, &c| {
        if c.is_ascii_digit() {
            Some(acc * 10 + u32::from(c - b'0'))
        } else {
            None
        }
    })
}

/// Appends `text` as an RFB string: u32 length, then the bytes. A text too
/// long for a u32 length is sent as the empty string.
pub(crate) fn push_string(out: &mut Vec<u8>, text: &[u8]) {
    let len = u32::try_from(text.len()).unwrap_or(0);
    out.extend_from_slice(&len.to_be_bytes());
    if len > 0 {
        out.extend_from_slice(text);
    }
}

/// Appends `prefix` (what says "failed" in the current phase), then `reason`
/// as an RFB string.
pub(crate) fn push_failure(out: &mut Vec<u8>, prefix: &[u8], reason: &str) {
    out.extend_from_slice(prefix);
    push_string(out, reason.as_bytes());
}

pub(crate) fn peek_u32(buf: &[u8], at: usize) -> Option<u32> {
    let end = at.checked_add(4)?;
    let bytes = <[u8; 4]>::try_from(buf.get(at..end)?).ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// Outcome of looking for a failure reason (u32 length + text) in a buffer.
pub(crate) enum Reason {
    Incomplete,
    Text(String),
    TooLong(u32),
}

impl Reason {
    /// Looks for a reason starting at `at` in `buf`.
    pub(crate) fn peek(buf: &[u8], at: usize) -> Reason {
        let Some(len) = peek_u32(buf, at) else {
            return Reason::Incomplete;
        };
        if len > MAX_REASON_LEN {
            return Reason::TooLong(len);
        }
        let start = at + 4;
        // len <= MAX_REASON_LEN, so this cannot overflow.
        match buf.get(start..start + len as usize) {
            Some([]) => Reason::Text("(no reason given)".to_owned()),
            Some(text) => Reason::Text(printable(text)),
            None => Reason::Incomplete,
        }
    }
}

/// What stands in for a reason that was too long to read.
pub(crate) fn too_long_reason(len: u32) -> String {
    format!(
        "no reason shown (the server's {len}-byte reason exceeds the {MAX_REASON_LEN}-byte limit and was not read)"
    )
}

/// Network text made safe for logs: invalid UTF-8 replaced, control characters
/// escaped.
pub(crate) fn printable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for c in String::from_utf8_lossy(bytes).chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Overwrites a secret before its memory is given back.
pub(crate) fn wipe(secret: &mut Vec<u8>) {
    secret.fill(0);
    std::hint::black_box(&secret);
    secret.clear();
}

/// Input received from one peer and not parsed yet.
///
/// While a handshake runs it never holds more than [`MAX_BUFFERED`] bytes;
/// once the handshake is over it keeps whatever arrives whole, for the caller
/// to take (those bytes belong to the protocol that follows).
#[derive(Debug, Default)]
pub(crate) struct Inbox(Vec<u8>);

impl Inbox {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Drops the first `n` bytes (all of them if fewer are there).
    pub(crate) fn consume(&mut self, n: usize) {
        let n = n.min(self.0.len());
        self.0.drain(..n);
    }

    /// Everything held, emptying the inbox.
    pub(crate) fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// A handshake state machine that parses one peer's input from an [`Inbox`].
///
/// The provided methods are the one feeding discipline both roles follow:
/// the buffering bound ([`take_in`](Self::take_in)), parsing until nothing
/// moves ([`advance`](Self::advance)), and errors that stick
/// ([`sticky`](Self::sticky)).
pub(crate) trait Handshake {
    type Error: Clone;

    fn inbox(&mut self) -> &mut Inbox;

    /// True once the handshake no longer parses this peer's input.
    fn finished(&self) -> bool;

    /// One parsing step on what the inbox holds; `Ok(true)` if it made
    /// progress.
    fn step(&mut self) -> Result<bool, Self::Error>;

    /// The error for a peer that sent more than [`MAX_BUFFERED`] bytes ahead.
    fn flooded(&self) -> Self::Error;

    /// The error that ended the handshake, if one did.
    fn failure(&self) -> Option<&Self::Error>;

    /// `Err` with the recorded failure, if there is one.
    fn sticky(&self) -> Result<(), Self::Error> {
        match self.failure() {
            Some(err) => Err(err.clone()),
            None => Ok(()),
        }
    }

    /// Parses what the inbox holds as far as it goes.
    fn advance(&mut self) -> Result<(), Self::Error> {
        while self.step()? {}
        Ok(())
    }

    /// Takes in `data`: at most as much at a time as fits the bound, parsing
    /// after each piece. Bytes past the end of the handshake are kept whole.
    fn take_in(&mut self, data: &[u8]) -> Result<(), Self::Error> {
        let mut rest = data;
        loop {
            if self.finished() {
                self.inbox().0.extend_from_slice(rest);
                return Ok(());
            }
            if rest.is_empty() {
                return Ok(());
            }
            let room = MAX_BUFFERED.saturating_sub(self.inbox().len());
            if room == 0 {
                return Err(self.flooded());
            }
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.inbox().0.extend_from_slice(now);
            rest = later;
            self.advance()?;
        }
    }
}

/// An RFB PIXEL_FORMAT (RFC 6143 §7.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub true_colour: bool,
    pub red_max: u16,
    pub green_max: u16,
    pub blue_max: u16,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

impl PixelFormat {
    /// Length of a PIXEL_FORMAT on the wire (three bytes of it are padding).
    pub const LEN: usize = 16;

    /// 32 bits a pixel, depth 24, little-endian 0x00RRGGBB: the format most
    /// servers announce and every client takes.
    pub const TRUE_COLOUR_32: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        true_colour: true,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    pub fn encode(&self) -> [u8; Self::LEN] {
        let [rh, rl] = self.red_max.to_be_bytes();
        let [gh, gl] = self.green_max.to_be_bytes();
        let [bh, bl] = self.blue_max.to_be_bytes();
        [
            self.bits_per_pixel,
            self.depth,
            u8::from(self.big_endian),
            u8::from(self.true_colour),
            rh,
            rl,
            gh,
            gl,
            bh,
            bl,
            self.red_shift,
            self.green_shift,
            self.blue_shift,
            0,
            0,
            0,
        ]
    }

    pub fn decode(b: &[u8; Self::LEN]) -> PixelFormat {
        PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: u16::from_be_bytes([b[4], b[5]]),
            green_max: u16::from_be_bytes([b[6], b[7]]),
            blue_max: u16::from_be_bytes([b[8], b[9]]),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_version_cases() {
        assert_eq!(parse_version(b"RFB 003.008\n"), Some((3, 8)));
        assert_eq!(parse_version(b"RFB 123.456\n"), Some((123, 456)));
        assert_eq!(parse_version(b"RFB 003.008"), None);
        assert_eq!(parse_version(b"RFB 003.008\n\n"), None);
        assert_eq!(parse_version(b"RFB +03.008\n"), None);
        assert_eq!(parse_version(b""), None);
        for m in [Minor::V3, Minor::V7, Minor::V8] {
            assert!(parse_version(m.version_line()).is_some());
        }
    }

    #[test]
    fn strings_are_length_prefixed() {
        let mut out = Vec::new();
        push_string(&mut out, b"abc");
        push_string(&mut out, b"");
        assert_eq!(out, [0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 0]);
        let mut out = Vec::new();
        push_failure(&mut out, &[0], "no");
        assert_eq!(out, [0, 0, 0, 0, 2, b'n', b'o']);
    }

    #[test]
    fn reasons_are_bounded_and_sanitised() {
        let mut buf = vec![9];
        push_string(&mut buf, b"bad\x1b\xff");
        assert!(matches!(Reason::peek(&buf, 1), Reason::Text(t) if t == "bad\\u{1b}\u{fffd}"));
        assert!(matches!(Reason::peek(&buf, 2), Reason::TooLong(_)));
        assert!(matches!(Reason::peek(&buf[..6], 1), Reason::Incomplete));
        assert!(
            matches!(Reason::peek(&[0, 0, 0, 0], 0), Reason::Text(t) if t == "(no reason given)")
        );
        let long = (MAX_REASON_LEN + 1).to_be_bytes();
        assert!(matches!(Reason::peek(&long, 0), Reason::TooLong(257)));
        assert!(matches!(Reason::peek(&[], usize::MAX), Reason::Incomplete));
    }

    #[test]
    fn pixel_format_round_trip() {
        let pf = PixelFormat {
            bits_per_pixel: 32,
            depth: 24,
            big_endian: true,
            true_colour: true,
            red_max: 0x1234,
            green_max: 0x5678,
            blue_max: 0x9abc,
            red_shift: 1,
            green_shift: 2,
            blue_shift: 3,
        };
        assert_eq!(PixelFormat::decode(&pf.encode()), pf);
        assert_eq!(pf.encode()[13..], [0, 0, 0], "padding");
    }
}
