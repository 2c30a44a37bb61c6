//! Sans-IO RFB *server* handshake (RFC 6143 §7.1–7.3): what a VNC server says
//! to a client from its ProtocolVersion up to ServerInit.
//!
//! [`ServerHandshake`] takes the client's bytes in ([`feed`](ServerHandshake::feed)),
//! hands back what must be written to the client
//! ([`take_output`](ServerHandshake::take_output)), and tells where it stands
//! ([`is_done`](ServerHandshake::is_done),
//! [`wants_input`](ServerHandshake::wants_input), or the error that ended it).
//! It owns no socket, clock or random source, so any transport can drive it and
//! tests feed it bytes directly. Two servers use it: the demo VNC server
//! (VNC Authentication, then ServerInit) and the browser side of the security
//! proxy (security type None only, started and released by the proxy as the
//! real server answers it, with ClientInit and what follows relayed).
//!
//! It speaks RFB 3.8 and accepts 3.7 clients; a 3.3 client or any other version
//! is told why it is refused, in the format its version reads. Every failure
//! the protocol has room for reaches the client as a reason before the caller
//! closes. It never buffers more than [`MAX_BUFFERED`](super::wire::MAX_BUFFERED)
//! unparsed bytes, and never loses bytes that arrive after its end
//! ([`take_leftovers`](ServerHandshake::take_leftovers)).

use std::fmt;

use super::vncauth::{self, CHALLENGE_LEN};
use super::wire::{
    self, Handshake, Inbox, Minor, PixelFormat, SEC_NONE, SEC_VNC_AUTH, SECURITY_FAILED,
    SECURITY_OK, VERSION_LEN,
};

/// Longest desktop name sent in ServerInit, in bytes; a longer one is cut on
/// a character boundary.
pub const MAX_NAME_LEN: usize = 1024;

/// Reason sent to a client whose protocol version is not served.
pub(crate) const REASON_VERSION: &str = "unsupported RFB protocol version (3.7 or 3.8 required)";
/// Reasons sent to a client that chose a security type it was not offered.
pub(crate) const REASON_ONLY_NONE: &str = "unsupported security type (only None is offered)";
pub(crate) const REASON_ONLY_VNC_AUTH: &str =
    "unsupported security type (only VNC Authentication is offered)";
/// Reason sent to a client that failed VNC Authentication.
pub(crate) const REASON_AUTH: &str = "authentication failed";
/// Reason sent to a client that sent too much before it was asked to.
pub(crate) const REASON_PROTOCOL: &str = "RFB protocol error";

/// What the client did wrong. Each variant's `Display` is a sentence fragment
/// for logs.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// The client's ProtocolVersion is malformed or not RFB 3.7/3.8.
    #[error(
        "the client sent an unsupported or malformed RFB protocol version '{0}' (3.7 or 3.8 required)"
    )]
    Version(String),
    /// The client chose a security type it was not offered.
    #[error(
        "the client chose security type {chosen}, but only type {offered} ({}) was offered",
        wire::security_type_name(*offered)
    )]
    SecurityType {
        /// The type the client chose.
        chosen: u8,
        /// The one type that was offered.
        offered: u8,
    },
    /// The client's VNC Authentication answer was wrong.
    #[error("the client failed VNC authentication")]
    AuthFailed,
    /// More unparsed input than the handshake buffers.
    #[error("the client sent too much unexpected data during the handshake")]
    Flood,
}

/// How the client has to authenticate: the one security type offered.
pub struct Security(Auth);

enum Auth {
    None,
    VncAuth {
        password: Vec<u8>,
        challenge: [u8; CHALLENGE_LEN],
    },
}

impl Security {
    /// Security type None: no authentication.
    pub fn none() -> Security {
        Security(Auth::None)
    }

    /// VNC Authentication with `password` (only its first 8 bytes count).
    /// `challenge` must be fresh random bytes for every connection: the
    /// handshake has no random source of its own.
    pub fn vnc_auth(password: &[u8], challenge: [u8; CHALLENGE_LEN]) -> Security {
        Security(Auth::VncAuth {
            password: password.to_vec(),
            challenge,
        })
    }

    /// The security type number offered.
    fn kind(&self) -> u8 {
        match self.0 {
            Auth::None => SEC_NONE,
            Auth::VncAuth { .. } => SEC_VNC_AUTH,
        }
    }

    /// Checks the client's answer to the challenge once; the password is
    /// wiped either way.
    fn verify_once(&mut self, answer: &[u8]) -> bool {
        match &mut self.0 {
            Auth::None => false,
            Auth::VncAuth {
                password,
                challenge,
            } => {
                let ok = vncauth::verify(password, challenge, answer);
                wire::wipe(password);
                ok
            }
        }
    }
}

impl fmt::Debug for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        f.write_str(wire::security_type_name(self.kind()))
    }
}

impl Drop for Security {
    fn drop(&mut self) {
        if let Auth::VncAuth { password, .. } = &mut self.0 {
            wire::wipe(password);
        }
    }
}

/// What the server says about its desktop once the client is in (ServerInit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInit {
    pub width: u16,
    pub height: u16,
    pub format: PixelFormat,
    /// The desktop name; cut to [`MAX_NAME_LEN`] bytes when sent.
    pub name: String,
}

impl ServerInit {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.width.to_be_bytes());
        out.extend_from_slice(&self.height.to_be_bytes());
        out.extend_from_slice(&self.format.encode());
        wire::push_string(out, truncated_name(&self.name).as_bytes());
    }
}

/// `name` cut to at most [`MAX_NAME_LEN`] bytes on a char boundary.
fn truncated_name(name: &str) -> &str {
    let mut end = name.len().min(MAX_NAME_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.get(..end).unwrap_or("")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Deferred and not started: nothing sent yet; input is only buffered.
    NotStarted,
    /// Our ProtocolVersion was sent; waiting for the client's.
    Version,
    /// Client version known; the security types wait for `release`.
    Held,
    /// The security type was offered; waiting for the client's choice.
    SecurityChoice,
    /// VNC Authentication: the challenge was sent; waiting for the answer.
    Response,
    /// Security done; waiting for ClientInit.
    ClientInit,
    /// Handshake complete.
    Done,
    /// Failed or refused: nothing more is parsed or sent.
    Closed,
}

/// The server side of the RFB handshake. See the module docs.
///
/// Typical use: write out `take_output()`, then after every read `feed` the
/// bytes and write `take_output()` again, also when `feed` failed (the output
/// then holds a failure the client can show); close after an error. Once
/// `is_done()`, the bytes in `take_leftovers()` are the first of the protocol
/// that follows.
pub struct ServerHandshake {
    security: Security,
    init: Option<ServerInit>,
    state: State,
    /// The client's version; meaningful once past `State::Version` (and set
    /// to `V3` when a 3.3 client is being refused).
    minor: Minor,
    released: bool,
    input: Inbox,
    output: Vec<u8>,
    failed: Option<ClientError>,
}

impl fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandshake")
            .field("security", &self.security)
            .field("state", &self.state)
            .field("minor", &self.minor)
            .field("released", &self.released)
            .field("input", &self.input.len())
            .field("output", &self.output.len())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl ServerHandshake {
    /// A handshake that has begun: our ProtocolVersion is already in the
    /// output. It ends after the security phase; see [`with_init`](Self::with_init).
    pub fn new(security: Security) -> Self {
        let mut hs = Self::deferred(security);
        hs.released = true;
        hs.output.extend_from_slice(Minor::V8.version_line());
        hs.state = State::Version;
        hs
    }

    /// A handshake that sends nothing until [`start`](Self::start), and offers
    /// its security type only after [`release`](Self::release): for a proxy
    /// that must first hear from the server behind it. Client input that
    /// arrives earlier is kept (up to the buffering bound).
    pub fn deferred(security: Security) -> Self {
        ServerHandshake {
            security,
            init: None,
            state: State::NotStarted,
            minor: Minor::V8,
            released: false,
            input: Inbox::default(),
            output: Vec::new(),
            failed: None,
        }
    }

    /// Also runs the initialisation phase: reads ClientInit and answers with
    /// `init`. Without it the handshake is done once the client is through
    /// security, and ClientInit is the first leftover byte.
    pub fn with_init(mut self, init: ServerInit) -> Self {
        self.init = Some(init);
        self
    }

    /// Sends our ProtocolVersion (a deferred handshake); parses client input
    /// that was waiting for it.
    pub fn start(&mut self) -> Result<(), ClientError> {
        self.sticky()?;
        if self.state != State::NotStarted {
            return Ok(());
        }
        self.output.extend_from_slice(Minor::V8.version_line());
        self.state = State::Version;
        self.advance().map_err(|e| self.fail(e))
    }

    /// Lets the security type be offered (a deferred handshake), at once if
    /// the client's version is already known; parses client input that was
    /// waiting for it.
    pub fn release(&mut self) -> Result<(), ClientError> {
        self.sticky()?;
        if self.released {
            return Ok(());
        }
        self.released = true;
        if self.state != State::Held {
            return Ok(());
        }
        self.offer();
        self.advance().map_err(|e| self.fail(e))
    }

    /// Feeds bytes received from the client.
    ///
    /// After an error every further call returns the same error; after
    /// [`refuse`](Self::refuse) input is ignored. After
    /// [`is_done`](Self::is_done) the bytes are kept for
    /// [`take_leftovers`](Self::take_leftovers).
    pub fn feed(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.sticky()?;
        if self.state == State::Closed {
            return Ok(());
        }
        self.take_in(data).map_err(|e| self.fail(e))
    }

    /// Ends the handshake from the server's side: the client is told `reason`
    /// in whatever form the current phase allows (some phases allow none).
    /// Nothing happens once the handshake is done, failed or refused.
    pub fn refuse(&mut self, reason: &str) {
        match self.state {
            State::Done | State::Closed => return,
            State::NotStarted => {
                // The client has not even seen a version yet: give it one, so
                // that it gets to read the reason.
                self.output.extend_from_slice(Minor::V8.version_line());
                wire::push_failure(&mut self.output, &[0], reason);
            }
            State::Version if self.minor == Minor::V3 => {
                // RFB 3.3 failure: security type 0, then the reason.
                wire::push_failure(&mut self.output, &0u32.to_be_bytes(), reason);
            }
            State::Version | State::Held => {
                // RFB 3.7/3.8 failure: zero security types, then the reason.
                wire::push_failure(&mut self.output, &[0], reason);
            }
            State::SecurityChoice => {
                // A failed SecurityResult with its reason; RFB 3.7 has no
                // SecurityResult after a choice: just closed.
                if self.minor == Minor::V8 {
                    wire::push_failure(&mut self.output, &SECURITY_FAILED.to_be_bytes(), reason);
                }
            }
            State::Response => {
                // A failed SecurityResult; only RFB 3.8 adds a reason.
                if self.minor == Minor::V8 {
                    wire::push_failure(&mut self.output, &SECURITY_FAILED.to_be_bytes(), reason);
                } else {
                    self.output
                        .extend_from_slice(&SECURITY_FAILED.to_be_bytes());
                }
            }
            // The client waits for ServerInit, which cannot say no.
            State::ClientInit => {}
        }
        self.state = State::Closed;
    }

    /// Bytes that must now be written to the client (drains the output).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// True once the handshake is complete.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the handshake waits for client input now (false while it
    /// waits for `start` or `release`, and once it is over).
    pub fn wants_input(&self) -> bool {
        matches!(
            self.state,
            State::Version | State::SecurityChoice | State::Response | State::ClientInit
        )
    }

    /// After [`is_done`](Self::is_done): the client's bytes received past the
    /// end of the handshake, in order (drained). Before that, nothing.
    pub fn take_leftovers(&mut self) -> Vec<u8> {
        if self.is_done() {
            self.input.take()
        } else {
            Vec::new()
        }
    }

    /// Unparsed input held right now.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.input.len()
    }

    fn offer(&mut self) {
        self.output.extend_from_slice(&[1, self.security.kind()]);
        self.state = State::SecurityChoice;
    }

    /// The client is through security; `result` says whether a
    /// SecurityResult tells it so (RFB 3.7 sends none for None).
    fn security_done(&mut self, result: bool) {
        if result {
            self.output.extend_from_slice(&SECURITY_OK.to_be_bytes());
        }
        self.state = if self.init.is_some() {
            State::ClientInit
        } else {
            State::Done
        };
    }

    /// One parsing step; `Ok(true)` if it made progress.
    fn step_client(&mut self) -> Result<bool, ClientError> {
        match self.state {
            State::NotStarted | State::Held | State::Done | State::Closed => Ok(false),
            State::Version => {
                let Some(line) = self.input.bytes().get(..VERSION_LEN) else {
                    return Ok(false);
                };
                self.minor = match wire::parse_version(line) {
                    Some((3, 8)) => Minor::V8,
                    Some((3, 7)) => Minor::V7,
                    parsed => {
                        if parsed == Some((3, 3)) {
                            // So that the failure is sent in the 3.3 format.
                            self.minor = Minor::V3;
                        }
                        return Err(ClientError::Version(wire::printable(line)));
                    }
                };
                self.input.consume(VERSION_LEN);
                self.state = State::Held;
                if self.released {
                    self.offer();
                }
                Ok(true)
            }
            State::SecurityChoice => {
                let Some(&chosen) = self.input.bytes().first() else {
                    return Ok(false);
                };
                let offered = self.security.kind();
                if chosen != offered {
                    return Err(ClientError::SecurityType { chosen, offered });
                }
                self.input.consume(1);
                match &self.security.0 {
                    Auth::VncAuth { challenge, .. } => {
                        self.output.extend_from_slice(challenge);
                        self.state = State::Response;
                    }
                    Auth::None => self.security_done(self.minor == Minor::V8),
                }
                Ok(true)
            }
            State::Response => {
                let Some(answer) = self.input.bytes().get(..CHALLENGE_LEN) else {
                    return Ok(false);
                };
                let ok = self.security.verify_once(answer);
                self.input.consume(CHALLENGE_LEN);
                if !ok {
                    return Err(ClientError::AuthFailed);
                }
                self.security_done(true);
                Ok(true)
            }
            State::ClientInit => {
                // The shared flag does not matter to the handshake.
                if self.input.bytes().is_empty() {
                    return Ok(false);
                }
                self.input.consume(1);
                if let Some(init) = &self.init {
                    init.encode(&mut self.output);
                }
                self.state = State::Done;
                Ok(true)
            }
        }
    }

    /// Tells the client why (as far as the phase allows), records `err` as
    /// final and hands it back.
    fn fail(&mut self, err: ClientError) -> ClientError {
        let reason = match &err {
            ClientError::Version(_) => REASON_VERSION,
            ClientError::SecurityType { offered, .. } if *offered == SEC_NONE => REASON_ONLY_NONE,
            ClientError::SecurityType { .. } => REASON_ONLY_VNC_AUTH,
            ClientError::AuthFailed => REASON_AUTH,
            ClientError::Flood => REASON_PROTOCOL,
        };
        self.refuse(reason);
        self.failed = Some(err.clone());
        err
    }
}

impl Handshake for ServerHandshake {
    type Error = ClientError;

    fn inbox(&mut self) -> &mut Inbox {
        &mut self.input
    }

    fn finished(&self) -> bool {
        self.is_done()
    }

    fn step(&mut self) -> Result<bool, ClientError> {
        self.step_client()
    }

    fn flooded(&self) -> ClientError {
        ClientError::Flood
    }

    fn failure(&self) -> Option<&ClientError> {
        self.failed.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rfb::testing::*;
    use crate::rfb::wire::MAX_BUFFERED;

    const FORMAT: PixelFormat = PixelFormat::TRUE_COLOUR_32;

    fn init(name: &str) -> ServerInit {
        ServerInit {
            width: 800,
            height: 480,
            format: FORMAT,
            name: name.into(),
        }
    }

    fn init_bytes(name: &str) -> Vec<u8> {
        cat(&[
            &[3, 0x20, 1, 0xe0],
            &FORMAT.encode(),
            &string(name.as_bytes()),
        ])
    }

    fn vnc_server() -> ServerHandshake {
        ServerHandshake::new(Security::vnc_auth(PW, CHALLENGE)).with_init(init("desk"))
    }

    #[derive(Debug, PartialEq)]
    struct Outcome {
        result: Result<(), ClientError>,
        output: Vec<u8>,
        done: bool,
        leftovers: Vec<u8>,
    }

    /// Feeds `input` in `chunk`-sized pieces (0 = all at once) to the
    /// handshake `make` builds, collecting all output; stops at the first
    /// error. Checks the bounds and the liveness on the way.
    fn run_chunked(make: fn() -> ServerHandshake, input: &[u8], chunk: usize) -> Outcome {
        let mut hs = make();
        let mut out = Outcome {
            result: Ok(()),
            output: hs.take_output(),
            done: false,
            leftovers: Vec::new(),
        };
        let pieces: Vec<&[u8]> = if chunk == 0 {
            vec![input]
        } else {
            input.chunks(chunk).collect()
        };
        for piece in pieces {
            let r = hs.feed(piece);
            out.output.extend(hs.take_output());
            if !hs.is_done() {
                assert!(hs.buffered() <= MAX_BUFFERED);
            }
            if r.is_err() {
                assert!(!hs.is_done() && !hs.wants_input());
                out.result = r;
                break;
            }
            assert!(hs.is_done() || hs.wants_input(), "{hs:?}");
        }
        out.done = hs.is_done();
        if out.done {
            assert!(!hs.wants_input());
            out.leftovers = hs.take_leftovers();
        }
        out
    }

    /// Runs `input` whole, byte by byte and in other fragment sizes: every
    /// way of fragmenting must give the same outcome.
    fn run(make: fn() -> ServerHandshake, input: &[u8]) -> Outcome {
        let whole = run_chunked(make, input, 0);
        for chunk in [1, 2, 3, 5, 7, 13] {
            assert_eq!(
                whole,
                run_chunked(make, input, chunk),
                "fragment size {chunk}"
            );
        }
        whole
    }

    #[test]
    fn vnc_auth_38_through_server_init() {
        let o = run(vnc_server, &cat(&[V8, &[2], &RESPONSE, &[1]]));
        assert_eq!(o.result, Ok(()));
        assert!(o.done);
        assert_eq!(
            o.output,
            cat(&[V8, &[1, 2], &CHALLENGE, OK, &init_bytes("desk")])
        );
        assert!(o.leftovers.is_empty());
    }

    #[test]
    fn vnc_auth_37_gets_a_security_result_too() {
        let o = run(vnc_server, &cat(&[V7, &[2], &RESPONSE, &[0]]));
        assert!(o.done);
        assert_eq!(
            o.output,
            cat(&[V8, &[1, 2], &CHALLENGE, OK, &init_bytes("desk")])
        );
    }

    #[test]
    fn step_by_step_outputs_and_wants() {
        let mut hs = vnc_server();
        assert_eq!(hs.take_output(), V8);
        assert!(hs.wants_input() && !hs.is_done());
        hs.feed(V8).unwrap();
        assert_eq!(hs.take_output(), [1, 2]);
        hs.feed(&[2]).unwrap();
        assert_eq!(hs.take_output(), CHALLENGE);
        hs.feed(&RESPONSE[..15]).unwrap();
        assert!(hs.take_output().is_empty());
        hs.feed(&RESPONSE[15..]).unwrap();
        assert_eq!(hs.take_output(), OK);
        assert!(
            matches!(&hs.security.0, Auth::VncAuth { password, .. } if password.is_empty()),
            "password wiped after use"
        );
        assert!(hs.wants_input() && !hs.is_done());
        hs.feed(&[1]).unwrap();
        assert_eq!(hs.take_output(), init_bytes("desk"));
        assert!(hs.is_done() && !hs.wants_input());
    }

    #[test]
    fn pipelined_client_keeps_its_later_bytes() {
        // ClientInit together with SetEncodings and an update request.
        let after = [2u8, 0, 0, 1, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 10, 0, 10];
        let o = run(vnc_server, &cat(&[V8, &[2], &RESPONSE, &[1], &after]));
        assert!(o.done);
        assert_eq!(o.leftovers, after);
    }

    #[test]
    fn large_leftovers_are_not_lost() {
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let o = run(vnc_server, &cat(&[V8, &[2], &RESPONSE, &[1], &big]));
        assert!(o.done);
        assert_eq!(o.leftovers, big);
    }

    #[test]
    fn feeding_after_done_keeps_the_bytes() {
        let mut hs = vnc_server();
        hs.feed(&cat(&[V8, &[2], &RESPONSE, &[1]])).unwrap();
        assert!(hs.take_leftovers().is_empty());
        hs.feed(b"abc").unwrap();
        hs.feed(b"def").unwrap();
        assert_eq!(hs.take_leftovers(), b"abcdef");
        assert!(hs.take_leftovers().is_empty());
    }

    #[test]
    fn wrong_password_38_gets_a_reason() {
        let wrong = vncauth::response(b"wrong", &CHALLENGE);
        let o = run(vnc_server, &cat(&[V8, &[2], &wrong, &[1]]));
        assert_eq!(o.result, Err(ClientError::AuthFailed));
        assert!(!o.done);
        assert_eq!(
            o.output,
            cat(&[
                V8,
                &[1, 2],
                &CHALLENGE,
                FAILED,
                &string(REASON_AUTH.as_bytes())
            ])
        );
    }

    #[test]
    fn wrong_password_37_has_no_reason() {
        let wrong = vncauth::response(b"", &CHALLENGE);
        let o = run(vnc_server, &cat(&[V7, &[2], &wrong]));
        assert_eq!(o.result, Err(ClientError::AuthFailed));
        assert_eq!(o.output, cat(&[V8, &[1, 2], &CHALLENGE, FAILED]));
    }

    #[test]
    fn the_password_is_checked_once_only() {
        // A wrong answer wipes the password, so a right one later fails too
        // (and is never parsed: the error is sticky).
        let mut hs = vnc_server();
        let wrong = vncauth::response(b"wrong", &CHALLENGE);
        hs.feed(&cat(&[V8, &[2]])).unwrap();
        assert_eq!(hs.feed(&wrong), Err(ClientError::AuthFailed));
        assert_eq!(hs.feed(&RESPONSE), Err(ClientError::AuthFailed));
        assert!(matches!(&hs.security.0, Auth::VncAuth { password, .. } if password.is_empty()));
    }

    #[test]
    fn client_33_is_refused_in_the_33_format() {
        let o = run(vnc_server, V3);
        assert_eq!(o.result, Err(ClientError::Version("RFB 003.003\\n".into())));
        assert_eq!(
            o.output,
            cat(&[V8, &0u32.to_be_bytes(), &string(REASON_VERSION.as_bytes())])
        );
    }

    #[test]
    fn other_client_versions_are_refused_with_a_reason() {
        for line in [
            &b"RFB 003.005\n"[..],
            b"RFB 003.009\n",
            b"RFB 003.889\n",
            b"RFB 004.001\n",
            b"RFB 003.008\r",
            b"GET / HTTP/1.",
            b"\0\0\0\0\0\0\0\0\0\0\0\0",
        ] {
            let o = run(vnc_server, line);
            assert!(matches!(o.result, Err(ClientError::Version(_))), "{line:?}");
            assert_eq!(
                o.output,
                cat(&[V8, &[0], &string(REASON_VERSION.as_bytes())])
            );
        }
    }

    #[test]
    fn wrong_security_type_is_refused() {
        let o = run(vnc_server, &cat(&[V8, &[1]]));
        assert_eq!(
            o.result,
            Err(ClientError::SecurityType {
                chosen: 1,
                offered: 2
            })
        );
        assert_eq!(
            o.output,
            cat(&[
                V8,
                &[1, 2],
                FAILED,
                &string(REASON_ONLY_VNC_AUTH.as_bytes())
            ])
        );
        // RFB 3.7: no SecurityResult, just closed.
        let o = run(vnc_server, &cat(&[V7, &[0]]));
        assert!(matches!(
            o.result,
            Err(ClientError::SecurityType { chosen: 0, .. })
        ));
        assert_eq!(o.output, cat(&[V8, &[1, 2]]));
    }

    fn none_server() -> ServerHandshake {
        ServerHandshake::new(Security::none())
    }

    #[test]
    fn security_none_ends_after_the_security_phase() {
        let o = run(none_server, &cat(&[V8, &[1], &[1], b"rest"]));
        assert!(o.done);
        assert_eq!(o.output, cat(&[V8, &[1, 1], OK]));
        // ClientInit is not read: it belongs to whoever serves the session.
        assert_eq!(o.leftovers, b"\x01rest");
        // RFB 3.7 has no SecurityResult for None.
        let o = run(none_server, &cat(&[V7, &[1]]));
        assert!(o.done);
        assert_eq!(o.output, cat(&[V8, &[1, 1]]));
        // Choosing VNC Authentication when only None is offered.
        let o = run(none_server, &cat(&[V8, &[2]]));
        assert_eq!(
            o.output,
            cat(&[V8, &[1, 1], FAILED, &string(REASON_ONLY_NONE.as_bytes())])
        );
    }

    #[test]
    fn none_with_init_37() {
        fn make() -> ServerHandshake {
            ServerHandshake::new(Security::none()).with_init(init("x"))
        }
        let o = run(make, &cat(&[V7, &[1], &[0]]));
        assert!(o.done);
        assert_eq!(o.output, cat(&[V8, &[1, 1], &init_bytes("x")]));
    }

    #[test]
    fn deferred_waits_for_start_and_release() {
        let mut hs = ServerHandshake::deferred(Security::none());
        assert!(hs.take_output().is_empty() && !hs.wants_input());
        // The client speaks first; its bytes wait.
        hs.feed(&cat(&[V8, &[1]])).unwrap();
        assert!(hs.take_output().is_empty());
        hs.start().unwrap();
        assert_eq!(hs.take_output(), V8, "version parsed, types held");
        assert!(!hs.wants_input() && !hs.is_done());
        hs.start().unwrap();
        assert!(hs.take_output().is_empty(), "start is idempotent");
        hs.release().unwrap();
        assert_eq!(hs.take_output(), cat(&[&[1, 1], OK]));
        assert!(hs.is_done());
        hs.release().unwrap();

        // Released before the client's version arrives: offered at once.
        let mut hs = ServerHandshake::deferred(Security::none());
        hs.start().unwrap();
        hs.release().unwrap();
        assert_eq!(hs.take_output(), V8);
        assert!(hs.wants_input());
        hs.feed(V8).unwrap();
        assert_eq!(hs.take_output(), [1, 1]);
    }

    #[test]
    fn deferred_errors_surface_from_start_and_release() {
        let mut hs = ServerHandshake::deferred(Security::none());
        hs.feed(V3).unwrap();
        assert!(matches!(hs.start(), Err(ClientError::Version(_))));
        assert_eq!(
            hs.take_output(),
            cat(&[V8, &0u32.to_be_bytes(), &string(REASON_VERSION.as_bytes())])
        );
        assert!(matches!(hs.release(), Err(ClientError::Version(_))));

        let mut hs = ServerHandshake::deferred(Security::none());
        hs.feed(&cat(&[V7, &[2]])).unwrap();
        hs.start().unwrap();
        assert_eq!(
            hs.release(),
            Err(ClientError::SecurityType {
                chosen: 2,
                offered: 1
            })
        );
        assert_eq!(hs.take_output(), cat(&[V8, &[1, 1]]), "3.7: just closed");
    }

    #[test]
    fn refuse_speaks_the_format_of_each_phase() {
        let reason = "no console";
        let r = string(reason.as_bytes());
        let refused_after = |hs: &mut ServerHandshake, input: &[u8]| {
            hs.feed(input).unwrap();
            let _ = hs.take_output();
            hs.refuse(reason);
            assert!(!hs.wants_input() && !hs.is_done());
            let out = hs.take_output();
            // Refused: input is ignored, nothing more is said.
            hs.feed(&[1; 64]).unwrap();
            hs.refuse("again");
            assert!(hs.take_output().is_empty());
            out
        };
        let mut hs = ServerHandshake::deferred(Security::none());
        assert_eq!(refused_after(&mut hs, b""), cat(&[V8, &[0], &r]));
        let mut hs = vnc_server();
        assert_eq!(refused_after(&mut hs, b""), cat(&[&[0], &r]));
        let mut hs = ServerHandshake::deferred(Security::none());
        hs.start().unwrap();
        assert_eq!(refused_after(&mut hs, V7), cat(&[&[0], &r]));
        let mut hs = vnc_server();
        assert_eq!(refused_after(&mut hs, V8), cat(&[FAILED, &r]));
        let mut hs = vnc_server();
        assert!(refused_after(&mut hs, V7).is_empty());
        let mut hs = vnc_server();
        assert_eq!(
            refused_after(&mut hs, &cat(&[V8, &[2]])),
            cat(&[FAILED, &r])
        );
        let mut hs = vnc_server();
        assert_eq!(refused_after(&mut hs, &cat(&[V7, &[2]])), FAILED);
        let mut hs = vnc_server();
        assert!(refused_after(&mut hs, &cat(&[V8, &[2], &RESPONSE])).is_empty());
        // Done: refusing changes nothing.
        let mut hs = vnc_server();
        hs.feed(&cat(&[V8, &[2], &RESPONSE, &[1], b"x"])).unwrap();
        hs.refuse(reason);
        assert!(hs.is_done());
        assert_eq!(hs.take_leftovers(), b"x");
    }

    #[test]
    fn too_much_early_data_is_an_error() {
        // Exactly MAX_BUFFERED unparsed bytes are tolerated...
        let mut hs = ServerHandshake::deferred(Security::none());
        hs.feed(&vec![b'x'; MAX_BUFFERED]).unwrap();
        // ...one more is not.
        assert_eq!(hs.feed(b"x"), Err(ClientError::Flood));
        assert_eq!(
            hs.take_output(),
            cat(&[V8, &[0], &string(REASON_PROTOCOL.as_bytes())])
        );
        // Also in one large chunk, while the security types are held.
        let mut hs = ServerHandshake::deferred(Security::none());
        hs.start().unwrap();
        hs.feed(V8).unwrap();
        assert_eq!(hs.feed(&[0; MAX_BUFFERED + 1]), Err(ClientError::Flood));
        // A server that asks for input never holds that much: a pipelining
        // client is parsed as it goes.
        let big: Vec<u8> = cat(&[V8, &[2], &RESPONSE, &[1], &[7; 3 * MAX_BUFFERED]]);
        let o = run(vnc_server, &big);
        assert!(o.done);
    }

    #[test]
    fn errors_are_sticky() {
        let mut hs = vnc_server();
        let err = hs.feed(b"RFB 009.000\n").unwrap_err();
        assert!(matches!(err, ClientError::Version(_)));
        assert_eq!(hs.feed(V8), Err(err.clone()));
        assert_eq!(hs.start(), Err(err.clone()));
        assert_eq!(hs.release(), Err(err));
        assert!(!hs.is_done() && !hs.wants_input());
        assert!(hs.take_leftovers().is_empty());
    }

    #[test]
    fn server_init_name_is_bounded() {
        assert_eq!(truncated_name("abc"), "abc");
        let long = "é".repeat(1000); // 2000 bytes
        let t = truncated_name(&long);
        assert_eq!(t.len(), MAX_NAME_LEN);
        assert!(t.chars().all(|c| c == 'é'));
        let odd = format!("a{}", "é".repeat(600));
        assert_eq!(truncated_name(&odd).len(), MAX_NAME_LEN - 1);
        let mut out = Vec::new();
        init(&long).encode(&mut out);
        assert_eq!(out.len(), 4 + 16 + 4 + MAX_NAME_LEN);
    }

    #[test]
    fn error_messages_are_clear() {
        assert_eq!(
            ClientError::SecurityType {
                chosen: 1,
                offered: 2
            }
            .to_string(),
            "the client chose security type 1, but only type 2 (VNC Authentication) was offered"
        );
        for e in [
            ClientError::Version("x".into()),
            ClientError::AuthFailed,
            ClientError::Flood,
        ] {
            assert!(e.to_string().len() > 20, "{e}");
        }
    }

    #[test]
    fn debug_does_not_show_password() {
        let hs = ServerHandshake::new(Security::vnc_auth(b"hunter22", CHALLENGE));
        let dbg = format!("{hs:?}");
        assert!(dbg.contains("VNC Authentication"), "{dbg}");
        assert!(
            !dbg.contains("hunter22") && !dbg.contains("104, 117"),
            "{dbg}"
        );
    }

    #[test]
    fn mutated_handshakes_never_panic_and_fragment_alike() {
        let good = cat(&[V8, &[2], &RESPONSE, &[1], &[3, 0, 0, 0]]);
        let mut rng = XorShift(7);
        for i in 0..2000 {
            let mut input = good.clone();
            for _ in 0..1 + rng.below(3) {
                match rng.below(3) {
                    0 if !input.is_empty() => {
                        let at = rng.below(input.len());
                        input[at] = rng.next() as u8;
                    }
                    1 if !input.is_empty() => {
                        let len = rng.below(input.len());
                        input.truncate(len);
                    }
                    _ => input.extend((0..rng.below(8)).map(|_| rng.next() as u8)),
                }
            }
            let make = if i % 2 == 0 { vnc_server } else { none_server };
            let o = run(make, &input);
            assert!(o.output.len() <= 128, "{o:?}");
        }
    }
}
