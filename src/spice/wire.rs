//! The parts of SPICE's wire format the link proxy reads and writes: the
//! link header and messages every channel connection starts with, and the
//! data-message header of the main channel. All integers are little-endian.

/// "REDQ", the first four bytes of every link message either way.
pub const MAGIC: [u8; 4] = *b"REDQ";
pub const MAJOR_VERSION: u32 = 2;
pub const MINOR_VERSION: u32 = 2;
/// The link header: magic, major, minor, size of what follows.
pub const LINK_HEADER_LEN: usize = 16;
/// A link message (either way) larger than this is refused: real ones carry
/// a handful of capability words.
pub const MAX_LINK_MESSAGE: u32 = 4096;
/// The server's public key: a 1024-bit RSA key as SubjectPublicKeyInfo DER.
pub const PUBKEY_LEN: usize = 162;
/// An RSA-1024 ciphertext.
pub const TICKET_LEN: usize = 128;
/// The fixed part of the client's link message.
pub const LINK_MESS_LEN: usize = 18;
/// The fixed part of the server's link reply.
pub const LINK_REPLY_LEN: usize = 4 + PUBKEY_LEN + 12;

/// Channel types.
pub mod channel {
    pub const MAIN: u8 = 1;
    pub const DISPLAY: u8 = 2;
    pub const INPUTS: u8 = 3;
    pub const CURSOR: u8 = 4;
    pub const PLAYBACK: u8 = 5;
    pub const RECORD: u8 = 6;
    pub const TUNNEL: u8 = 7;
    pub const SMARTCARD: u8 = 8;
    pub const USBREDIR: u8 = 9;
    pub const PORT: u8 = 10;
    pub const WEBDAV: u8 = 11;

    /// The name operators and logs use.
    pub fn name(kind: u8) -> &'static str {
        match kind {
            MAIN => "main",
            DISPLAY => "display",
            INPUTS => "inputs",
            CURSOR => "cursor",
            PLAYBACK => "playback",
            RECORD => "record",
            TUNNEL => "tunnel",
            SMARTCARD => "smartcard",
            USBREDIR => "usbredir",
            PORT => "port",
            WEBDAV => "webdav",
            _ => "unknown",
        }
    }
}

/// Link results and errors (`SPICE_LINK_ERR_*`).
pub mod link_err {
    pub const OK: u32 = 0;
    pub const ERROR: u32 = 1;
    pub const INVALID_MAGIC: u32 = 2;
    pub const INVALID_DATA: u32 = 3;
    pub const VERSION_MISMATCH: u32 = 4;
    pub const NEED_SECURED: u32 = 5;
    pub const NEED_UNSECURED: u32 = 6;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const BAD_CONNECTION_ID: u32 = 8;
    pub const CHANNEL_NOT_AVAILABLE: u32 = 9;
}

/// Common capability bits (the first common capability word).
pub mod common_cap {
    pub const AUTH_SELECTION: u32 = 1 << 0;
    pub const AUTH_SPICE: u32 = 1 << 1;
    pub const AUTH_SASL: u32 = 1 << 2;
    pub const MINI_HEADER: u32 = 1 << 3;
}

/// The auth mechanism word a client sends when both sides select one.
pub const AUTH_MECHANISM_SPICE: u32 = 1;
pub const AUTH_MECHANISM_SASL: u32 = 2;

/// Server-to-client message types the proxy acts on.
pub mod msg {
    pub const MIGRATE: u16 = 1;
    pub const MIGRATE_DATA: u16 = 2;
    pub const MAIN_MIGRATE_BEGIN: u16 = 101;
    pub const MAIN_MIGRATE_CANCEL: u16 = 102;
    pub const MAIN_INIT: u16 = 103;
    pub const MAIN_AGENT_DATA: u16 = 109;
    pub const MAIN_MIGRATE_SWITCH_HOST: u16 = 111;
    pub const MAIN_MIGRATE_END: u16 = 112;
    pub const MAIN_MIGRATE_BEGIN_SEAMLESS: u16 = 116;
    pub const MAIN_MIGRATE_DST_SEAMLESS_ACK: u16 = 117;
    pub const MAIN_MIGRATE_DST_SEAMLESS_NACK: u16 = 118;

    /// Messages that would send the client to another host (the
    /// hypervisor's address, past the broker).
    pub fn is_migration(kind: u16) -> bool {
        matches!(
            kind,
            MIGRATE
                | MIGRATE_DATA
                | MAIN_MIGRATE_BEGIN
                | MAIN_MIGRATE_CANCEL
                | MAIN_MIGRATE_SWITCH_HOST
                | MAIN_MIGRATE_END
                | MAIN_MIGRATE_BEGIN_SEAMLESS
                | MAIN_MIGRATE_DST_SEAMLESS_ACK
                | MAIN_MIGRATE_DST_SEAMLESS_NACK
        )
    }
}

/// Client-to-server message types the proxy acts on.
pub mod msgc {
    pub const MAIN_AGENT_START: u16 = 106;
    pub const MAIN_AGENT_DATA: u16 = 107;
    pub const MAIN_AGENT_TOKEN: u16 = 108;
}

/// What a link header said was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a SPICE link message (bad magic)")]
    Magic,
    #[error("SPICE protocol version {0} is not supported (2 is)")]
    Version(u32),
    #[error("link message of {0} bytes is larger than {MAX_LINK_MESSAGE}")]
    TooLarge(u32),
    #[error("malformed link message: {0}")]
    Malformed(&'static str),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// Reads a link header from its 16 bytes: the size of the message that
/// follows, checked against [`MAX_LINK_MESSAGE`].
pub fn link_header(b: &[u8; LINK_HEADER_LEN]) -> Result<u32, WireError> {
    if b[..4] != MAGIC {
        return Err(WireError::Magic);
    }
    let major = u32_at(b, 4);
    if major != MAJOR_VERSION {
        return Err(WireError::Version(major));
    }
    let size = u32_at(b, 12);
    if size > MAX_LINK_MESSAGE {
        return Err(WireError::TooLarge(size));
    }
    Ok(size)
}

/// The capability words of a link message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caps {
    pub common: Vec<u32>,
    pub channel: Vec<u32>,
}

impl Caps {
    /// Whether common capability `bit` (a [`common_cap`] mask) is set.
    pub fn common_has(&self, mask: u32) -> bool {
        self.common.first().is_some_and(|w| w & mask != 0)
    }
}

/// Reads the capability words a link message's counts and offset point at.
fn caps(body: &[u8], counts_at: usize) -> Result<Caps, WireError> {
    let common = u32_at(body, counts_at) as usize;
    let chan = u32_at(body, counts_at + 4) as usize;
    let offset = u32_at(body, counts_at + 8) as usize;
    let words = common
        .checked_add(chan)
        .filter(|n| *n <= 64)
        .ok_or(WireError::Malformed("too many capability words"))?;
    let end = offset
        .checked_add(words * 4)
        .filter(|e| *e <= body.len() && offset >= counts_at + 12)
        .ok_or(WireError::Malformed("capabilities outside the message"))?;
    let all: Vec<u32> = body[offset..end]
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect();
    Ok(Caps {
        common: all[..common].to_vec(),
        channel: all[common..].to_vec(),
    })
}

/// The client's link message: which channel it opens, in which session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkMess {
    /// 0 for a new session's main channel; the session id for the others.
    pub connection_id: u32,
    pub channel_type: u8,
    pub channel_id: u8,
    pub caps: Caps,
}

/// Reads the client's link message (what follows its header).
pub fn link_mess(body: &[u8]) -> Result<LinkMess, WireError> {
    if body.len() < LINK_MESS_LEN {
        return Err(WireError::Malformed("link message too short"));
    }
    Ok(LinkMess {
        connection_id: u32_at(body, 0),
        channel_type: body[4],
        channel_id: body[5],
        caps: caps(body, 6)?,
    })
}

/// The server's link reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkReply {
    pub error: u32,
    pub pub_key: Vec<u8>,
    pub caps: Caps,
}

/// Reads the server's link reply (what follows its header). A reply that
/// carries an error may be short: only its error word is read then.
pub fn link_reply(body: &[u8]) -> Result<LinkReply, WireError> {
    if body.len() < 4 {
        return Err(WireError::Malformed("link reply too short"));
    }
    let error = u32_at(body, 0);
    if error != link_err::OK {
        return Ok(LinkReply {
            error,
            pub_key: Vec::new(),
            caps: Caps::default(),
        });
    }
    if body.len() < LINK_REPLY_LEN {
        return Err(WireError::Malformed("link reply too short"));
    }
    Ok(LinkReply {
        error,
        pub_key: body[4..4 + PUBKEY_LEN].to_vec(),
        caps: caps(body, 4 + PUBKEY_LEN)?,
    })
}

/// A link reply that refuses with `error`, as a server sends it: the
/// header and a zeroed reply carrying only the error.
pub fn error_reply(error: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(LINK_HEADER_LEN + LINK_REPLY_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&MAJOR_VERSION.to_le_bytes());
    out.extend_from_slice(&MINOR_VERSION.to_le_bytes());
    out.extend_from_slice(&(LINK_REPLY_LEN as u32).to_le_bytes());
    out.extend_from_slice(&error.to_le_bytes());
    out.resize(LINK_HEADER_LEN + LINK_REPLY_LEN, 0);
    // The capability offset points past the fixed part, at no words.
    let at = LINK_HEADER_LEN + LINK_REPLY_LEN - 4;
    out[at..].copy_from_slice(&(LINK_REPLY_LEN as u32).to_le_bytes());
    out
}

/// A data message's header: the 6-byte mini header when both sides
/// announced it, else the 18-byte one with a serial and a sub-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgHeader {
    pub kind: u16,
    pub size: u32,
}

/// The data-message header's length.
pub fn msg_header_len(mini: bool) -> usize {
    if mini { 6 } else { 18 }
}

/// Reads a data-message header of [`msg_header_len`] bytes.
pub fn msg_header(b: &[u8], mini: bool) -> MsgHeader {
    let at = if mini { 0 } else { 8 };
    MsgHeader {
        kind: u16::from_le_bytes([b[at], b[at + 1]]),
        size: u32_at(b, at + 2),
    }
}

/// The session id in MAIN_INIT's body (its first word), if the body holds
/// it.
pub fn main_init_session_id(body: &[u8]) -> Option<u32> {
    (body.len() >= 4).then(|| u32_at(body, 0))
}

#[cfg(test)]
pub(crate) mod build {
    //! Link messages as real peers send them, for the tests.
    use super::*;

    fn header(size: usize) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&MAJOR_VERSION.to_le_bytes());
        out.extend_from_slice(&MINOR_VERSION.to_le_bytes());
        out.extend_from_slice(&(size as u32).to_le_bytes());
        out
    }

    pub fn link_mess(connection_id: u32, channel_type: u8, common: u32, chan: &[u32]) -> Vec<u8> {
        let mut body = connection_id.to_le_bytes().to_vec();
        body.push(channel_type);
        body.push(0);
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&(chan.len() as u32).to_le_bytes());
        body.extend_from_slice(&(LINK_MESS_LEN as u32).to_le_bytes());
        body.extend_from_slice(&common.to_le_bytes());
        for c in chan {
            body.extend_from_slice(&c.to_le_bytes());
        }
        let mut out = header(body.len());
        out.extend_from_slice(&body);
        out
    }

    pub fn link_reply(pub_key: &[u8], common: u32) -> Vec<u8> {
        let mut body = 0u32.to_le_bytes().to_vec();
        let mut key = pub_key.to_vec();
        key.resize(PUBKEY_LEN, 0);
        body.extend_from_slice(&key);
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&(LINK_REPLY_LEN as u32).to_le_bytes());
        body.extend_from_slice(&common.to_le_bytes());
        let mut out = header(body.len());
        out.extend_from_slice(&body);
        out
    }

    pub fn message(mini: bool, kind: u16, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        if !mini {
            out.extend_from_slice(&7u64.to_le_bytes());
        }
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        if !mini {
            out.extend_from_slice(&0u32.to_le_bytes());
        }
        out.extend_from_slice(body);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_messages_read_back() {
        let m = build::link_mess(0xabcd, channel::DISPLAY, common_cap::MINI_HEADER, &[5, 6]);
        let size = link_header(m[..16].try_into().unwrap()).unwrap();
        assert_eq!(size as usize, m.len() - 16);
        let mess = link_mess(&m[16..]).unwrap();
        assert_eq!(mess.connection_id, 0xabcd);
        assert_eq!(mess.channel_type, channel::DISPLAY);
        assert!(mess.caps.common_has(common_cap::MINI_HEADER));
        assert_eq!(mess.caps.channel, [5, 6]);

        let r = build::link_reply(&[1; PUBKEY_LEN], common_cap::AUTH_SPICE);
        let reply = link_reply(&r[16..]).unwrap();
        assert_eq!(reply.error, 0);
        assert_eq!(reply.pub_key, [1; PUBKEY_LEN]);
        assert!(reply.caps.common_has(common_cap::AUTH_SPICE));
    }

    #[test]
    fn bad_headers_and_bodies_are_refused() {
        let mut m = build::link_mess(0, channel::MAIN, 0, &[]);
        let hdr = |m: &[u8]| link_header(m[..16].try_into().unwrap());
        m[12..16].copy_from_slice(&(MAX_LINK_MESSAGE + 1).to_le_bytes());
        assert_eq!(hdr(&m), Err(WireError::TooLarge(MAX_LINK_MESSAGE + 1)));
        m[4] = 1;
        assert_eq!(hdr(&m), Err(WireError::Version(1)));
        m[0] = b'X';
        assert_eq!(hdr(&m), Err(WireError::Magic));
        assert!(link_mess(&[0; 10]).is_err());
        // Counts that point past the message, or overlap its fixed part.
        let mut body = build::link_mess(0, channel::MAIN, 0, &[])[16..].to_vec();
        body[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(link_mess(&body).is_err());
        let mut body = build::link_mess(0, channel::MAIN, 0, &[])[16..].to_vec();
        body[14..18].copy_from_slice(&2u32.to_le_bytes());
        assert!(link_mess(&body).is_err());
        let mut body = build::link_mess(0, channel::MAIN, 0, &[])[16..].to_vec();
        body[14..18].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(link_mess(&body).is_err());
        assert!(link_reply(&[0; 3]).is_err());
        assert!(link_reply(&[0; 40]).is_err());
    }

    #[test]
    fn an_error_reply_reads_as_its_error() {
        let r = error_reply(link_err::CHANNEL_NOT_AVAILABLE);
        let size = link_header(r[..16].try_into().unwrap()).unwrap();
        assert_eq!(size as usize, LINK_REPLY_LEN);
        assert_eq!(
            link_reply(&r[16..]).unwrap().error,
            link_err::CHANNEL_NOT_AVAILABLE
        );
    }

    #[test]
    fn message_headers_both_sizes() {
        for mini in [true, false] {
            let m = build::message(mini, msg::MAIN_INIT, &[1, 0, 0, 0]);
            let h = msg_header(&m, mini);
            assert_eq!(h, MsgHeader { kind: 103, size: 4 });
            assert_eq!(m.len(), msg_header_len(mini) + 4);
        }
        assert_eq!(main_init_session_id(&[9, 0, 0, 1]), Some(0x0100_0009));
        assert_eq!(main_init_session_id(&[9]), None);
    }
}
