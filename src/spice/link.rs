//! The SPICE security proxy for one channel connection, without I/O.
//!
//! Every channel links on its own: the client sends its link message, the
//! server answers with a fresh RSA key, the client sends a ticket sealed
//! with it, and the server answers with a result. The proxy forwards the
//! link message and the reply, throws the client's ticket away and sends
//! one sealed with the stored password instead; with no stored password it
//! passes the client's ticket on unchanged. Nothing binds the server's key
//! to the client, so the client never needs the password.
//!
//! Bytes go in with [`LinkProxy::feed_client`] and
//! [`LinkProxy::feed_server`]; what to send comes out of
//! [`LinkProxy::take_to_server`] and [`LinkProxy::take_to_client`]; the
//! [`Phase`] says where the link is. Once it reads [`Phase::Linked`],
//! [`LinkProxy::finish`] hands over what is left and the caller relays.

use super::ticket::{self, TicketError};
use super::wire::{
    self, AUTH_MECHANISM_SPICE, LINK_HEADER_LEN, LinkMess, TICKET_LEN, WireError, common_cap,
    link_err,
};

/// How the client's ticket is delimited. A WebSocket client sends it as one
/// message, which is then the whole ticket even if it is short (spice-html5
/// sometimes sends 127 bytes); a TCP client sends exactly 128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Stream,
    Messages,
}

/// Where the link is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the client's link message.
    ClientLink,
    /// The client asked for this channel: the caller [`LinkProxy::admit`]s
    /// or [`LinkProxy::refuse`]s it.
    Asked(LinkMess),
    /// Waiting for the server's reply.
    ServerReply,
    /// Waiting for the client's ticket.
    ClientTicket,
    /// Waiting for the server's link result.
    LinkResult,
    /// The channel is linked: relay.
    Linked,
    /// The caller refused the channel; the refusal is in `take_to_client`.
    Refused(u32),
}

/// Why a link failed. Whatever the client should still see (a server's
/// refusal, an error reply) is left in `take_to_client`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the client's link message: {0}")]
    Client(WireError),
    #[error("the SPICE server's link reply: {0}")]
    Server(WireError),
    /// The server refused the link (`SPICE_LINK_ERR_*`).
    #[error("the SPICE server refused the channel ({})", refusal(*.0))]
    ServerRefused(u32),
    #[error("the SPICE server refused the stored password")]
    PasswordRejected,
    #[error(
        "the SPICE server accepts only SASL authentication; vncbroker authenticates with the \
         SPICE password (set a password and leave SASL off)"
    )]
    SaslOnly,
    #[error("the client asked for SASL authentication, which vncbroker does not proxy")]
    ClientSasl,
    #[error("{0}")]
    Ticket(TicketError),
    #[error("the client sent more than a link handshake holds before it was linked")]
    ClientFlood,
    #[error("the SPICE server sent more than a link handshake holds before it was linked")]
    ServerFlood,
    /// Set by the caller: the link did not finish in time.
    #[error("the SPICE link timed out")]
    Timeout,
}

/// The words of a link error, as operators read them.
pub fn refusal(code: u32) -> &'static str {
    match code {
        link_err::ERROR => "error",
        link_err::INVALID_MAGIC => "invalid magic",
        link_err::INVALID_DATA => "invalid data",
        link_err::VERSION_MISMATCH => "version mismatch",
        link_err::NEED_SECURED => {
            "the channel needs TLS: the server is set to secure channels (tls-channel or \
             secure-channels); vncbroker links over the plain port"
        }
        link_err::NEED_UNSECURED => "the channel must not use TLS",
        link_err::PERMISSION_DENIED => "permission denied",
        link_err::BAD_CONNECTION_ID => "bad connection id",
        link_err::CHANNEL_NOT_AVAILABLE => "channel not available",
        _ => "unknown error",
    }
}

/// Most bytes either side may have in flight before the link is done: a
/// link message, a ticket and a little that a client sends early.
const MAX_PENDING: usize = LINK_HEADER_LEN + wire::MAX_LINK_MESSAGE as usize + 4 + 2 * TICKET_LEN;

/// What a linked channel leaves to the relay.
#[derive(Debug)]
pub struct Linked {
    pub link: LinkMess,
    /// Both sides announced the 6-byte message header.
    pub mini_header: bool,
    /// Client bytes that came after its ticket, for the server.
    pub to_server: Vec<u8>,
    /// Server bytes that came after the result, for the client.
    pub to_client: Vec<u8>,
}

/// One channel connection's link, from the client's first byte to the
/// server's link result.
pub struct LinkProxy {
    phase: Phase,
    framing: Framing,
    /// The stored password; `None` passes the client's ticket on.
    password: Option<String>,
    client_in: Vec<u8>,
    server_in: Vec<u8>,
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    link: Option<LinkMess>,
    /// The client sends an auth-mechanism word before its ticket.
    auth_selection: bool,
    mini_header: bool,
    server_key: Vec<u8>,
}

impl std::fmt::Debug for LinkProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkProxy")
            .field("phase", &self.phase)
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        if let Some(pw) = self.password.as_mut() {
            // Best effort: the password does not outlive its link in this
            // buffer.
            let len = pw.len();
            pw.clear();
            pw.extend(std::iter::repeat_n('\0', len));
        }
    }
}

impl LinkProxy {
    pub fn new(password: Option<String>, framing: Framing) -> LinkProxy {
        LinkProxy {
            phase: Phase::ClientLink,
            framing,
            password,
            client_in: Vec::new(),
            server_in: Vec::new(),
            to_server: Vec::new(),
            to_client: Vec::new(),
            link: None,
            auth_selection: false,
            mini_header: false,
            server_key: Vec::new(),
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn take_to_server(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.to_server)
    }

    pub fn take_to_client(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.to_client)
    }

    /// Bytes from the client; `message_end` when they end a WebSocket
    /// message.
    pub fn feed_client(&mut self, data: &[u8], message_end: bool) -> Result<(), LinkError> {
        if self.client_in.len() + data.len() > MAX_PENDING {
            return Err(LinkError::ClientFlood);
        }
        self.client_in.extend_from_slice(data);
        self.advance_client(message_end)
    }

    /// Bytes from the server.
    pub fn feed_server(&mut self, data: &[u8]) -> Result<(), LinkError> {
        if self.server_in.len() + data.len() > MAX_PENDING {
            return Err(LinkError::ServerFlood);
        }
        self.server_in.extend_from_slice(data);
        self.advance_server()?;
        // The client's ticket may have come before the reply it answers.
        self.advance_client(false)
    }

    /// Lets the asked-for channel link: its link message goes to the server.
    pub fn admit(&mut self) {
        if let Phase::Asked(link) = &self.phase {
            let link = link.clone();
            self.link = Some(link);
            let size = self.client_link_len().unwrap_or(LINK_HEADER_LEN);
            self.to_server.extend(self.client_in.drain(..size));
            self.phase = Phase::ServerReply;
        }
    }

    /// Turns the asked-for channel away with link error `code`, as a server
    /// would.
    pub fn refuse(&mut self, code: u32) {
        if matches!(self.phase, Phase::Asked(_)) {
            self.to_client = wire::error_reply(code);
            self.phase = Phase::Refused(code);
        }
    }

    /// The link and what is left to relay, once [`Phase::Linked`].
    pub fn finish(mut self) -> Option<Linked> {
        if self.phase != Phase::Linked {
            return None;
        }
        Some(Linked {
            link: self.link.take()?,
            mini_header: self.mini_header,
            to_server: std::mem::take(&mut self.client_in),
            to_client: std::mem::take(&mut self.server_in),
        })
    }

    /// The length of the client's link message with its header, once its
    /// header is in.
    fn client_link_len(&self) -> Option<usize> {
        let head: &[u8; LINK_HEADER_LEN] =
            self.client_in.get(..LINK_HEADER_LEN)?.try_into().ok()?;
        wire::link_header(head)
            .ok()
            .map(|size| LINK_HEADER_LEN + size as usize)
    }

    fn advance_client(&mut self, message_end: bool) -> Result<(), LinkError> {
        match self.phase {
            Phase::ClientLink => {
                // Not SPICE at all is known from the first four bytes.
                if self.client_in.len() >= 4 && self.client_in[..4] != wire::MAGIC {
                    self.to_client = wire::error_reply(link_err::INVALID_MAGIC);
                    return Err(LinkError::Client(WireError::Magic));
                }
                let Some(head) = self.client_in.get(..LINK_HEADER_LEN) else {
                    return Ok(());
                };
                let head: [u8; LINK_HEADER_LEN] = head.try_into().unwrap_or([0; LINK_HEADER_LEN]);
                let size = match wire::link_header(&head) {
                    Ok(size) => size as usize,
                    Err(e) => {
                        let code = match e {
                            WireError::Magic => link_err::INVALID_MAGIC,
                            WireError::Version(_) => link_err::VERSION_MISMATCH,
                            _ => link_err::INVALID_DATA,
                        };
                        self.to_client = wire::error_reply(code);
                        return Err(LinkError::Client(e));
                    }
                };
                let Some(body) = self.client_in.get(LINK_HEADER_LEN..LINK_HEADER_LEN + size) else {
                    return Ok(());
                };
                match wire::link_mess(body) {
                    Ok(link) => {
                        self.phase = Phase::Asked(link);
                        Ok(())
                    }
                    Err(e) => {
                        self.to_client = wire::error_reply(link_err::INVALID_DATA);
                        Err(LinkError::Client(e))
                    }
                }
            }
            Phase::ClientTicket => self.take_ticket(message_end),
            _ => Ok(()),
        }
    }

    fn take_ticket(&mut self, message_end: bool) -> Result<(), LinkError> {
        let mech = if self.auth_selection { 4 } else { 0 };
        let have = self.client_in.len();
        let end = if have >= mech + TICKET_LEN {
            mech + TICKET_LEN
        } else if self.framing == Framing::Messages && message_end && have > mech {
            have
        } else {
            return Ok(());
        };
        if mech == 4 {
            let word = u32::from_le_bytes([
                self.client_in[0],
                self.client_in[1],
                self.client_in[2],
                self.client_in[3],
            ]);
            if word != AUTH_MECHANISM_SPICE {
                return Err(LinkError::ClientSasl);
            }
        }
        let theirs: Vec<u8> = self.client_in.drain(..end).collect();
        match &self.password {
            Some(pw) => {
                let sealed = ticket::seal(&self.server_key, pw).map_err(LinkError::Ticket)?;
                if mech == 4 {
                    self.to_server
                        .extend_from_slice(&AUTH_MECHANISM_SPICE.to_le_bytes());
                }
                self.to_server.extend_from_slice(&sealed);
            }
            // No password is stored: the client's own ticket decides.
            None => self.to_server.extend_from_slice(&theirs),
        }
        self.phase = Phase::LinkResult;
        Ok(())
    }

    fn advance_server(&mut self) -> Result<(), LinkError> {
        match self.phase {
            Phase::ServerReply => {
                let Some(head) = self.server_in.get(..LINK_HEADER_LEN) else {
                    return Ok(());
                };
                let head: [u8; LINK_HEADER_LEN] = head.try_into().unwrap_or([0; LINK_HEADER_LEN]);
                let size = wire::link_header(&head).map_err(LinkError::Server)? as usize;
                let total = LINK_HEADER_LEN + size;
                let Some(body) = self.server_in.get(LINK_HEADER_LEN..total) else {
                    return Ok(());
                };
                let reply = wire::link_reply(body).map_err(LinkError::Server)?;
                let link = self.link.as_ref().ok_or(LinkError::ServerFlood)?;
                if reply.error != link_err::OK {
                    self.to_client.extend(self.server_in.drain(..total));
                    return Err(LinkError::ServerRefused(reply.error));
                }
                if !reply.caps.common_has(common_cap::AUTH_SPICE)
                    && reply.caps.common_has(common_cap::AUTH_SASL)
                {
                    self.to_client = wire::error_reply(link_err::PERMISSION_DENIED);
                    return Err(LinkError::SaslOnly);
                }
                self.auth_selection = link.caps.common_has(common_cap::AUTH_SELECTION)
                    && reply.caps.common_has(common_cap::AUTH_SELECTION);
                self.mini_header = link.caps.common_has(common_cap::MINI_HEADER)
                    && reply.caps.common_has(common_cap::MINI_HEADER);
                self.server_key = reply.pub_key;
                self.to_client.extend(self.server_in.drain(..total));
                self.phase = Phase::ClientTicket;
                Ok(())
            }
            Phase::LinkResult => {
                let Some(word) = self.server_in.get(..4) else {
                    return Ok(());
                };
                let result = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
                self.to_client.extend(self.server_in.drain(..4));
                match result {
                    link_err::OK => {
                        self.phase = Phase::Linked;
                        Ok(())
                    }
                    link_err::PERMISSION_DENIED => Err(LinkError::PasswordRejected),
                    code => Err(LinkError::ServerRefused(code)),
                }
            }
            // The server speaks only after the link message.
            Phase::ClientLink | Phase::Asked(_) if !self.server_in.is_empty() => Err(
                LinkError::Server(WireError::Malformed("the server spoke before the client")),
            ),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ticket::testing::ServerKey;
    use super::super::wire::{build, channel};
    use super::*;

    const CLIENT_CAPS: u32 =
        common_cap::AUTH_SELECTION | common_cap::AUTH_SPICE | common_cap::MINI_HEADER;
    const SERVER_CAPS: u32 =
        common_cap::AUTH_SELECTION | common_cap::AUTH_SPICE | common_cap::MINI_HEADER;

    /// The client's ticket, sealed with some key the proxy must not use.
    fn client_ticket(mech: bool, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        if mech {
            out.extend_from_slice(&AUTH_MECHANISM_SPICE.to_le_bytes());
        }
        out.extend(std::iter::repeat_n(0x5a, len));
        out
    }

    /// Feeds `data` to the client side one byte at a time.
    fn bytewise_client(p: &mut LinkProxy, data: &[u8], message_end: bool) -> Result<(), LinkError> {
        for (i, b) in data.iter().enumerate() {
            p.feed_client(&[*b], message_end && i + 1 == data.len())?;
        }
        Ok(())
    }

    fn bytewise_server(p: &mut LinkProxy, data: &[u8]) -> Result<(), LinkError> {
        for b in data {
            p.feed_server(&[*b])?;
        }
        Ok(())
    }

    /// A full link, fed byte by byte, for each framing and ticket length.
    #[test]
    fn a_link_swaps_the_ticket_for_the_stored_password() {
        let server = ServerKey::new();
        for (framing, ticket_len) in [
            (Framing::Stream, TICKET_LEN),
            (Framing::Messages, TICKET_LEN),
            (Framing::Messages, TICKET_LEN - 1),
        ] {
            let mut p = LinkProxy::new(Some("pw-1".into()), framing);
            let link = build::link_mess(0, channel::MAIN, CLIENT_CAPS, &[1]);
            bytewise_client(&mut p, &link, true).unwrap();
            let Phase::Asked(asked) = p.phase().clone() else {
                panic!("{:?}", p.phase())
            };
            assert_eq!(
                (asked.connection_id, asked.channel_type),
                (0, channel::MAIN)
            );
            assert!(p.take_to_server().is_empty(), "nothing goes before admit");
            p.admit();
            assert_eq!(p.take_to_server(), link);
            let reply = build::link_reply(&server.spki(), SERVER_CAPS);
            bytewise_server(&mut p, &reply).unwrap();
            assert_eq!(p.take_to_client(), reply);
            assert_eq!(p.phase(), &Phase::ClientTicket);
            bytewise_client(&mut p, &client_ticket(true, ticket_len), true).unwrap();
            assert_eq!(p.phase(), &Phase::LinkResult);
            let sent = p.take_to_server();
            assert_eq!(sent.len(), 4 + TICKET_LEN);
            assert_eq!(sent[..4], AUTH_MECHANISM_SPICE.to_le_bytes());
            assert_eq!(server.open(&sent[4..]).as_deref(), Some("pw-1"));
            // The result, and the server's first message in the same read.
            let mut result = 0u32.to_le_bytes().to_vec();
            result.extend_from_slice(&build::message(true, 103, &[1, 2, 3, 4]));
            p.feed_server(&result).unwrap();
            assert_eq!(p.take_to_client(), [0, 0, 0, 0]);
            assert_eq!(p.phase(), &Phase::Linked);
            let linked = p.finish().unwrap();
            assert!(linked.mini_header);
            assert_eq!(linked.to_client, build::message(true, 103, &[1, 2, 3, 4]));
        }
    }

    #[test]
    fn without_a_password_the_clients_ticket_passes() {
        let server = ServerKey::new();
        let mut p = LinkProxy::new(None, Framing::Stream);
        // A client without auth selection sends no mechanism word.
        p.feed_client(
            &build::link_mess(7, channel::DISPLAY, common_cap::AUTH_SPICE, &[]),
            false,
        )
        .unwrap();
        p.admit();
        p.take_to_server();
        p.feed_server(&build::link_reply(&server.spki(), SERVER_CAPS))
            .unwrap();
        let theirs = client_ticket(false, TICKET_LEN);
        p.feed_client(&theirs[..100], false).unwrap();
        assert_eq!(
            p.phase(),
            &Phase::ClientTicket,
            "a stream ticket is 128 bytes"
        );
        p.feed_client(&theirs[100..], false).unwrap();
        assert_eq!(p.take_to_server(), theirs);
        assert!(!p.finish().is_some_and(|l| l.mini_header));
    }

    #[test]
    fn refusals_and_rejections_reach_the_client() {
        let server = ServerKey::new();
        // Refused by the caller.
        let mut p = LinkProxy::new(Some("pw".into()), Framing::Messages);
        p.feed_client(
            &build::link_mess(5, channel::INPUTS, CLIENT_CAPS, &[]),
            true,
        )
        .unwrap();
        p.refuse(link_err::CHANNEL_NOT_AVAILABLE);
        assert!(p.take_to_server().is_empty());
        let out = p.take_to_client();
        assert_eq!(
            wire::link_reply(&out[16..]).unwrap().error,
            link_err::CHANNEL_NOT_AVAILABLE
        );
        // The server wants TLS for this channel.
        let mut p = LinkProxy::new(Some("pw".into()), Framing::Messages);
        p.feed_client(&build::link_mess(0, channel::MAIN, CLIENT_CAPS, &[]), true)
            .unwrap();
        p.admit();
        let e = p
            .feed_server(&wire::error_reply(link_err::NEED_SECURED))
            .unwrap_err();
        assert_eq!(e, LinkError::ServerRefused(link_err::NEED_SECURED));
        assert!(e.to_string().contains("tls-channel"), "{e}");
        assert_eq!(
            p.take_to_client(),
            wire::error_reply(link_err::NEED_SECURED)
        );
        // SASL only.
        let mut p = LinkProxy::new(Some("pw".into()), Framing::Messages);
        p.feed_client(&build::link_mess(0, channel::MAIN, CLIENT_CAPS, &[]), true)
            .unwrap();
        p.admit();
        let sasl = common_cap::AUTH_SELECTION | common_cap::AUTH_SASL;
        assert_eq!(
            p.feed_server(&build::link_reply(&server.spki(), sasl)),
            Err(LinkError::SaslOnly)
        );
        // A wrong stored password.
        let mut p = LinkProxy::new(Some("wrong".into()), Framing::Messages);
        p.feed_client(&build::link_mess(0, channel::MAIN, CLIENT_CAPS, &[]), true)
            .unwrap();
        p.admit();
        p.feed_server(&build::link_reply(&server.spki(), SERVER_CAPS))
            .unwrap();
        p.feed_client(&client_ticket(true, TICKET_LEN), true)
            .unwrap();
        p.take_to_client();
        assert_eq!(
            p.feed_server(&link_err::PERMISSION_DENIED.to_le_bytes()),
            Err(LinkError::PasswordRejected)
        );
        assert_eq!(
            p.take_to_client(),
            link_err::PERMISSION_DENIED.to_le_bytes()
        );
        // A client that picks SASL.
        let mut p = LinkProxy::new(Some("pw".into()), Framing::Messages);
        p.feed_client(&build::link_mess(0, channel::MAIN, CLIENT_CAPS, &[]), true)
            .unwrap();
        p.admit();
        p.feed_server(&build::link_reply(&server.spki(), SERVER_CAPS))
            .unwrap();
        let mut sasl = wire::AUTH_MECHANISM_SASL.to_le_bytes().to_vec();
        sasl.extend_from_slice(&[0; 8]);
        assert_eq!(p.feed_client(&sasl, true), Err(LinkError::ClientSasl));
    }

    #[test]
    fn hostile_input_is_refused_without_buffering() {
        // Not SPICE at all (an RFB greeting, an HTTP request).
        for junk in [&b"RFB "[..], b"GET / HTTP/1.1\r\n\r\n"] {
            let mut p = LinkProxy::new(None, Framing::Stream);
            assert!(matches!(
                p.feed_client(junk, false),
                Err(LinkError::Client(WireError::Magic))
            ));
            assert_eq!(
                wire::link_reply(&p.take_to_client()[16..]).unwrap().error,
                link_err::INVALID_MAGIC
            );
        }
        // A huge declared size is refused from the header alone.
        let mut link = build::link_mess(0, channel::MAIN, CLIENT_CAPS, &[]);
        link[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut p = LinkProxy::new(None, Framing::Stream);
        assert!(matches!(
            p.feed_client(&link[..16], false),
            Err(LinkError::Client(WireError::TooLarge(_)))
        ));
        // A flood after the link message.
        let mut p = LinkProxy::new(None, Framing::Stream);
        p.feed_client(&build::link_mess(0, channel::MAIN, CLIENT_CAPS, &[]), false)
            .unwrap();
        assert_eq!(
            p.feed_client(&vec![0; MAX_PENDING], false),
            Err(LinkError::ClientFlood)
        );
        // A server that speaks first, or floods.
        let mut p = LinkProxy::new(None, Framing::Stream);
        assert!(matches!(p.feed_server(b"REDQ"), Err(LinkError::Server(_))));
        let mut p = LinkProxy::new(None, Framing::Stream);
        p.feed_client(&build::link_mess(0, channel::MAIN, CLIENT_CAPS, &[]), false)
            .unwrap();
        p.admit();
        assert_eq!(
            p.feed_server(&vec![0; MAX_PENDING + 1]),
            Err(LinkError::ServerFlood)
        );
        // A server reply with a key that is no key.
        let mut p = LinkProxy::new(Some("pw".into()), Framing::Messages);
        p.feed_client(&build::link_mess(0, channel::MAIN, CLIENT_CAPS, &[]), true)
            .unwrap();
        p.admit();
        p.feed_server(&build::link_reply(&[7; 162], SERVER_CAPS))
            .unwrap();
        assert!(matches!(
            p.feed_client(&client_ticket(true, TICKET_LEN), true),
            Err(LinkError::Ticket(_))
        ));
    }

    /// Arbitrary bytes on either side never panic, and never grow the
    /// buffers past their bound.
    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x1234_5678_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let server = ServerKey::new();
        for _ in 0..500 {
            let mut p = LinkProxy::new(Some("pw".into()), Framing::Messages);
            let mut link = build::link_mess(0, channel::MAIN, CLIENT_CAPS, &[1, 2]);
            let at = (next() as usize) % link.len();
            link[at] = next() as u8;
            if p.feed_client(&link, true).is_err() {
                continue;
            }
            if matches!(p.phase(), Phase::Asked(_)) {
                p.admit();
            }
            let mut reply = build::link_reply(&server.spki(), SERVER_CAPS);
            let at = (next() as usize) % reply.len();
            reply[at] = next() as u8;
            let _ = p.feed_server(&reply);
            let _ = p.feed_client(&client_ticket(true, (next() % 200) as usize), true);
            let _ = p.feed_server(&(next() as u32).to_le_bytes());
            assert!(p.client_in.len() <= MAX_PENDING && p.server_in.len() <= MAX_PENDING);
        }
    }
}
