//! Sans-IO RFB (VNC) *security proxy* handshake (RFC 6143 §7.1–7.2).
//!
//! When the broker has a VNC server's password stored, the browser (noVNC, the
//! "client") must be able to use the console without ever learning it. The
//! broker therefore sits in the middle of the RFB handshake: towards the client
//! it is a server ([`ServerHandshake`]) that speaks RFB 3.8 (or 3.7, if that is
//! what the client answers) and offers only security type 1 (None); towards the
//! server it is a client that performs VNC Authentication (type 2) itself with
//! the stored password. Once both sides are through their security phase the
//! handshake is done and the caller relays all further bytes (ClientInit,
//! ServerInit, ...) unchanged in both directions.
//!
//! The browser hears from the proxy only as the server answers: the version
//! once the server sent its own, the security types once the server accepted
//! the password. When the server side fails, the browser is told so in the
//! form its phase allows.
//!
//! [`SecurityProxy`] is a pure state machine without any I/O, so it can be tested
//! exhaustively and wired to any transport: feed it what arrives from either
//! side, write out what it hands back, and read from the side it asks for
//! ([`SecurityProxy::wants_server`] / [`SecurityProxy::wants_client`]). It never
//! buffers more than [`MAX_BUFFERED`] bytes of unparsed input per side during the
//! handshake, and it never loses bytes that arrive after the handshake ended
//! ([`SecurityProxy::take_leftovers`]).

use std::fmt;

use super::server::{ClientError, Security, ServerHandshake};
use super::vncauth;
#[cfg(doc)]
use super::wire::MAX_BUFFERED;
use super::wire::{
    self, Handshake, Inbox, Minor, Reason, SEC_INVALID, SEC_NONE, SEC_VNC_AUTH, SECURITY_OK,
    VERSION_LEN,
};

/// Reason shown to the browser when the server side of the handshake failed.
const CLIENT_REASON_SERVER: &str = "authentication with the VNC server failed";

const SERVER_FLOOD: &str = "the VNC server sent too much unexpected data during the handshake";
const CLIENT_FLOOD: &str = "the browser sent too much unexpected data during the handshake";
/// Cannot happen (the browser is offered None only); named for completeness.
const CLIENT_AUTH: &str = "the browser failed VNC authentication";

/// Why the handshake failed. Each variant's `Display` is a complete sentence
/// fragment suitable for logs and for an operator.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RfbError {
    /// The server's ProtocolVersion line is malformed or not RFB 3.x (x >= 3).
    #[error("the VNC server sent an unsupported or malformed RFB protocol version '{0}'")]
    ServerVersion(String),
    /// The client's ProtocolVersion is malformed or not RFB 3.7/3.8.
    #[error(
        "the browser sent an unsupported or malformed RFB protocol version '{0}' (3.7 or 3.8 required)"
    )]
    ClientVersion(String),
    /// The server offers neither VNC Authentication nor None.
    #[error(
        "the VNC server offers no supported security type (offered: {offered:?}; supported: 1 = None, 2 = VNC Authentication)"
    )]
    NoCommonSecurityType {
        /// The security types the server offered.
        offered: Vec<u32>,
    },
    /// The server refused the connection before authentication
    /// (security type count 0, or type 0 for RFB 3.3).
    #[error("the VNC server refused the connection: {reason}")]
    ServerRefused {
        /// The server's reason, sanitised, or a generic text when none was read.
        reason: String,
    },
    /// The server's SecurityResult said the authentication failed
    /// (typically: wrong stored password).
    #[error("authentication with the VNC server failed: {reason}")]
    AuthFailed {
        /// The server's reason (RFB 3.8), sanitised, or a generic text.
        reason: String,
    },
    /// The browser chose a security type other than 1 (None).
    #[error("the browser chose security type {0}, but only type 1 (None) was offered")]
    ClientSecurityType(u8),
    /// The server asks for a password and none is stored (see
    /// [`SecurityProxy::without_password`]).
    #[error(
        "the VNC server asks for a password and none is stored for this VM; view-only, clipboard-restricted and recorded sessions need the VM's VNC password stored in the broker, or a server without authentication"
    )]
    PasswordNeeded,
    /// Any other violation of the protocol by either side.
    #[error("RFB protocol error: {0}")]
    Protocol(&'static str),
}

/// The browser side's errors, in the proxy's terms.
impl From<ClientError> for RfbError {
    fn from(err: ClientError) -> Self {
        match err {
            ClientError::Version(line) => RfbError::ClientVersion(line),
            ClientError::SecurityType { chosen, .. } => RfbError::ClientSecurityType(chosen),
            ClientError::AuthFailed => RfbError::Protocol(CLIENT_AUTH),
            ClientError::Flood => RfbError::Protocol(CLIENT_FLOOD),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    /// Waiting for the server's ProtocolVersion.
    Version,
    /// RFB 3.7/3.8: waiting for the list of security types.
    SecurityTypes,
    /// RFB 3.3: waiting for the u32 security type the server decided on.
    SecurityType33,
    /// Waiting for the 16-byte VNC Authentication challenge.
    Challenge,
    /// Waiting for the SecurityResult.
    SecurityResult,
    /// The server accepted us; it now waits for ClientInit.
    Authenticated,
}

/// The RFB security-proxy handshake state machine. See the module docs.
///
/// Typical use: after every read, `feed_*` the bytes, then write
/// `take_to_server()` / `take_to_client()` out. Once `is_done()`, write the
/// outputs of `take_leftovers()` and relay raw bytes from then on. After an
/// error, still write `take_to_client()` to the browser (best effort) before
/// closing: it then contains a failure message the browser can show.
pub struct SecurityProxy {
    password: Vec<u8>,
    /// No password is stored: only a server that asks for none will do.
    none_only: bool,
    server_state: ServerState,
    /// Version spoken with the server; meaningful once past `ServerState::Version`.
    server_minor: Minor,
    server_in: Inbox,
    to_server: Vec<u8>,
    /// The browser side: a server handshake offering None, started when the
    /// server's version arrives and released when the server accepted us.
    client: ServerHandshake,
    failed: Option<RfbError>,
}

impl fmt::Debug for SecurityProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        f.debug_struct("SecurityProxy")
            .field("server_state", &self.server_state)
            .field("server_minor", &self.server_minor)
            .field("server_in", &self.server_in.len())
            .field("to_server", &self.to_server.len())
            .field("client", &self.client)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Drop for SecurityProxy {
    fn drop(&mut self) {
        wire::wipe(&mut self.password);
    }
}

impl SecurityProxy {
    /// Creates a proxy that authenticates to the server with `password`
    /// (only its first 8 bytes matter for VNC Authentication).
    pub fn new(password: Vec<u8>) -> Self {
        SecurityProxy {
            password,
            none_only: false,
            server_state: ServerState::Version,
            server_minor: Minor::V8,
            server_in: Inbox::default(),
            to_server: Vec::new(),
            client: ServerHandshake::deferred(Security::none()),
            failed: None,
        }
    }

    /// Creates a proxy for a server that asks for no authentication, so
    /// that the session's messages can be followed from their first byte;
    /// a server that wants a password is refused with
    /// [`RfbError::PasswordNeeded`].
    pub fn without_password() -> Self {
        let mut proxy = SecurityProxy::new(Vec::new());
        proxy.none_only = true;
        proxy
    }

    /// Feed bytes received from the VNC server.
    ///
    /// After an error every further call returns the same error. After
    /// [`is_done`](Self::is_done) the bytes are not parsed but appended to the
    /// server-to-client leftovers.
    pub fn feed_server(&mut self, data: &[u8]) -> Result<(), RfbError> {
        self.sticky()?;
        self.take_in(data).map_err(|e| self.fail(e))
    }

    /// Feed bytes received from the browser.
    ///
    /// After an error every further call returns the same error. After
    /// [`is_done`](Self::is_done) the bytes are not parsed but appended to the
    /// client-to-server leftovers.
    pub fn feed_client(&mut self, data: &[u8]) -> Result<(), RfbError> {
        self.sticky()?;
        self.client.feed(data).map_err(|e| self.fail(e.into()))
    }

    /// Bytes that must now be written to the server (drains the output buffer).
    pub fn take_to_server(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.to_server)
    }

    /// Bytes that must now be written to the client (drains the output buffer).
    pub fn take_to_client(&mut self) -> Vec<u8> {
        self.client.take_output()
    }

    /// True once the handshake is complete; from then on the caller relays raw
    /// bytes in both directions.
    pub fn is_done(&self) -> bool {
        self.failed.is_none() && self.client.is_done()
    }

    /// After [`is_done`](Self::is_done): everything that must still be written,
    /// as `(to_server, to_client)`. Each part is the not yet taken handshake
    /// output for that side followed by the bytes already received from the
    /// other side past the end of the handshake (client-to-server leftovers go to
    /// the server, server-to-client leftovers to the client), in order. Nothing is
    /// lost, whether or not `take_to_*` was called first.
    ///
    /// Before the handshake is done this only drains the pending output; unparsed
    /// handshake input stays where it is.
    pub fn take_leftovers(&mut self) -> (Vec<u8>, Vec<u8>) {
        let mut to_server = self.take_to_server();
        let mut to_client = self.take_to_client();
        if self.is_done() {
            to_server.append(&mut self.client.take_leftovers());
            to_client.append(&mut self.server_in.take());
        }
        (to_server, to_client)
    }

    /// Whether the state machine currently needs more bytes from the server.
    pub fn wants_server(&self) -> bool {
        self.failed.is_none() && !self.is_done() && self.server_state != ServerState::Authenticated
    }

    /// Whether the state machine currently needs more bytes from the client.
    pub fn wants_client(&self) -> bool {
        self.failed.is_none() && self.client.wants_input()
    }

    /// The server accepted us: the browser may now be offered None.
    fn authenticated(&mut self) -> Result<bool, RfbError> {
        self.server_state = ServerState::Authenticated;
        self.client.release()?;
        Ok(true)
    }

    /// One step of the server side; `Ok(true)` if it made progress.
    fn step_server(&mut self) -> Result<bool, RfbError> {
        let input = self.server_in.bytes();
        match self.server_state {
            ServerState::Version => {
                let Some(line) = input.get(..VERSION_LEN) else {
                    return Ok(false);
                };
                let minor = match wire::parse_version(line) {
                    Some((3, m)) if m >= 8 => Minor::V8,
                    Some((3, 7)) => Minor::V7,
                    Some((3, 3..=6)) => Minor::V3,
                    _ => return Err(RfbError::ServerVersion(wire::printable(line))),
                };
                self.server_in.consume(VERSION_LEN);
                self.server_minor = minor;
                self.to_server.extend_from_slice(minor.version_line());
                self.server_state = if minor == Minor::V3 {
                    ServerState::SecurityType33
                } else {
                    ServerState::SecurityTypes
                };
                self.client.start()?;
                Ok(true)
            }
            ServerState::SecurityTypes => {
                let Some(&count) = input.first() else {
                    return Ok(false);
                };
                if count == 0 {
                    return refused(input, 1);
                }
                let end = 1 + usize::from(count);
                let Some(types) = input.get(1..end) else {
                    return Ok(false);
                };
                let offered: Vec<u32> = types.iter().map(|&t| u32::from(t)).collect();
                if self.none_only && !offered.contains(&u32::from(SEC_NONE)) {
                    return Err(if offered.contains(&u32::from(SEC_VNC_AUTH)) {
                        RfbError::PasswordNeeded
                    } else {
                        RfbError::NoCommonSecurityType { offered }
                    });
                }
                let Some(choice) = choose(&offered, !self.password.is_empty()) else {
                    return Err(RfbError::NoCommonSecurityType { offered });
                };
                self.server_in.consume(end);
                self.to_server.push(choice);
                match choice {
                    SEC_VNC_AUTH => self.server_state = ServerState::Challenge,
                    _ if self.server_minor == Minor::V8 => {
                        self.server_state = ServerState::SecurityResult
                    }
                    _ => return self.authenticated(),
                }
                Ok(true)
            }
            ServerState::SecurityType33 => {
                let Some(kind) = wire::peek_u32(input, 0) else {
                    return Ok(false);
                };
                if kind == SEC_INVALID {
                    return refused(input, 4);
                }
                if kind != u32::from(SEC_VNC_AUTH) && kind != u32::from(SEC_NONE) {
                    return Err(RfbError::NoCommonSecurityType {
                        offered: vec![kind],
                    });
                }
                if self.none_only && kind == u32::from(SEC_VNC_AUTH) {
                    return Err(RfbError::PasswordNeeded);
                }
                self.server_in.consume(4);
                if kind == u32::from(SEC_NONE) {
                    return self.authenticated();
                }
                self.server_state = ServerState::Challenge;
                Ok(true)
            }
            ServerState::Challenge => {
                let Some(challenge) = input
                    .get(..vncauth::CHALLENGE_LEN)
                    .and_then(|c| <[u8; vncauth::CHALLENGE_LEN]>::try_from(c).ok())
                else {
                    return Ok(false);
                };
                self.server_in.consume(vncauth::CHALLENGE_LEN);
                let answer = vncauth::response(&self.password, &challenge);
                // The password is not needed any more.
                wire::wipe(&mut self.password);
                self.to_server.extend_from_slice(&answer);
                self.server_state = ServerState::SecurityResult;
                Ok(true)
            }
            ServerState::SecurityResult => {
                let Some(result) = wire::peek_u32(input, 0) else {
                    return Ok(false);
                };
                if result == SECURITY_OK {
                    self.server_in.consume(4);
                    return self.authenticated();
                }
                if self.server_minor != Minor::V8 {
                    return Err(RfbError::AuthFailed {
                        reason: format!(
                            "the server reported failure (code {result}; RFB 3.3/3.7 servers give no reason)"
                        ),
                    });
                }
                match Reason::peek(input, 4) {
                    Reason::Incomplete => Ok(false),
                    Reason::Text(reason) => Err(RfbError::AuthFailed { reason }),
                    Reason::TooLong(len) => Err(RfbError::AuthFailed {
                        reason: wire::too_long_reason(len),
                    }),
                }
            }
            ServerState::Authenticated => Ok(false),
        }
    }

    /// Records `err` as final, has the browser told (unless its own side
    /// already told it why), and hands the error back.
    fn fail(&mut self, err: RfbError) -> RfbError {
        self.client.refuse(CLIENT_REASON_SERVER);
        self.failed = Some(err.clone());
        err
    }
}

/// The server side: the proxy parses the VNC server's input.
impl Handshake for SecurityProxy {
    type Error = RfbError;

    fn inbox(&mut self) -> &mut Inbox {
        &mut self.server_in
    }

    fn finished(&self) -> bool {
        self.is_done()
    }

    fn step(&mut self) -> Result<bool, RfbError> {
        self.step_server()
    }

    fn flooded(&self) -> RfbError {
        RfbError::Protocol(SERVER_FLOOD)
    }

    fn failure(&self) -> Option<&RfbError> {
        self.failed.as_ref()
    }
}

/// Security type to ask the server for, from those it offered.
///
/// VNC Authentication when offered and we have a password (or when None is not
/// offered); otherwise None.
fn choose(offered: &[u32], have_password: bool) -> Option<u8> {
    let vnc = offered.contains(&u32::from(SEC_VNC_AUTH));
    let none = offered.contains(&u32::from(SEC_NONE));
    if vnc && (have_password || !none) {
        Some(SEC_VNC_AUTH)
    } else if none {
        Some(SEC_NONE)
    } else {
        None
    }
}

/// The server refused the connection; its reason (u32 length + text) starts
/// at `at` in `buf`.
fn refused(buf: &[u8], at: usize) -> Result<bool, RfbError> {
    match Reason::peek(buf, at) {
        Reason::Incomplete => Ok(false),
        Reason::Text(reason) => Err(RfbError::ServerRefused { reason }),
        Reason::TooLong(len) => Err(RfbError::ServerRefused {
            reason: wire::too_long_reason(len),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rfb::server::{
        REASON_ONLY_NONE as CLIENT_REASON_SECURITY, REASON_PROTOCOL as CLIENT_REASON_PROTOCOL,
        REASON_VERSION as CLIENT_REASON_VERSION,
    };
    use crate::rfb::testing::*;
    use crate::rfb::wire::MAX_BUFFERED;

    /// Bytes arriving from one peer.
    #[derive(Debug, Clone)]
    enum Ev {
        S(Vec<u8>),
        C(Vec<u8>),
    }
    use Ev::{C, S};

    fn s(b: &[u8]) -> Ev {
        S(b.to_vec())
    }
    fn c(b: &[u8]) -> Ev {
        C(b.to_vec())
    }
    #[derive(Debug, PartialEq)]
    struct Outcome {
        result: Result<(), RfbError>,
        to_server: Vec<u8>,
        to_client: Vec<u8>,
        done: bool,
        leftovers: (Vec<u8>, Vec<u8>),
    }

    /// Feeds the events in `chunk`-sized pieces (0 = whole event at once),
    /// collecting all output. Stops at the first error.
    fn run_chunked(password: &[u8], events: &[Ev], chunk: usize) -> Outcome {
        let mut p = SecurityProxy::new(password.to_vec());
        let mut out = Outcome {
            result: Ok(()),
            to_server: Vec::new(),
            to_client: Vec::new(),
            done: false,
            leftovers: (Vec::new(), Vec::new()),
        };
        'events: for ev in events {
            let (data, server) = match ev {
                S(d) => (d, true),
                C(d) => (d, false),
            };
            let pieces: Vec<&[u8]> = if chunk == 0 || data.is_empty() {
                vec![data.as_slice()]
            } else {
                data.chunks(chunk).collect()
            };
            for piece in pieces {
                let r = if server {
                    p.feed_server(piece)
                } else {
                    p.feed_client(piece)
                };
                out.to_server.extend(p.take_to_server());
                out.to_client.extend(p.take_to_client());
                // Bounded: never more than MAX_BUFFERED unparsed bytes.
                if !p.is_done() {
                    assert!(p.server_in.len() <= MAX_BUFFERED);
                    assert!(p.client.buffered() <= MAX_BUFFERED);
                }
                if r.is_err() {
                    assert!(!p.is_done() && !p.wants_server() && !p.wants_client());
                    out.result = r;
                    break 'events;
                }
                // Liveness: while running, the caller always has a side to read.
                if !p.is_done() {
                    assert!(p.wants_server() || p.wants_client(), "{p:?}");
                }
            }
        }
        out.done = p.is_done();
        if out.done {
            assert!(!p.wants_server() && !p.wants_client());
            out.leftovers = p.take_leftovers();
        }
        out
    }

    /// Runs the events whole, byte by byte and in other fragment sizes, and
    /// checks that every way of fragmenting gives the same outcome.
    fn run(password: &[u8], events: &[Ev]) -> Outcome {
        let whole = run_chunked(password, events, 0);
        for chunk in [1, 2, 3, 5, 7, 13] {
            let fragmented = run_chunked(password, events, chunk);
            assert_eq!(whole, fragmented, "fragment size {chunk}");
        }
        whole
    }

    fn happy_88() -> Vec<Ev> {
        vec![s(V8), c(V8), s(&[1, 2]), s(&CHALLENGE), s(OK), c(&[1])]
    }

    #[test]
    fn without_a_password_only_a_server_that_asks_for_none_will_do() {
        // Offered None as well: None is chosen, and the browser goes on.
        let mut p = SecurityProxy::without_password();
        p.feed_server(V8).unwrap();
        assert_eq!(p.take_to_server(), V8);
        p.feed_client(V8).unwrap();
        p.feed_server(&[2, 2, 1]).unwrap();
        assert_eq!(p.take_to_server(), [1]);
        p.feed_server(OK).unwrap();
        p.feed_client(&[1]).unwrap();
        assert!(p.is_done());
        // Only VNC Authentication: refused, saying why, in 3.8 and 3.3.
        let mut p = SecurityProxy::without_password();
        p.feed_server(V8).unwrap();
        assert_eq!(p.feed_server(&[1, 2]), Err(RfbError::PasswordNeeded));
        let mut p = SecurityProxy::without_password();
        p.feed_server(V3).unwrap();
        assert_eq!(p.feed_server(&[0, 0, 0, 2]), Err(RfbError::PasswordNeeded));
        assert!(
            RfbError::PasswordNeeded
                .to_string()
                .contains("password stored")
        );
        // Neither: the usual error.
        let mut p = SecurityProxy::without_password();
        p.feed_server(V8).unwrap();
        assert!(matches!(
            p.feed_server(&[1, 19]),
            Err(RfbError::NoCommonSecurityType { .. })
        ));
    }

    #[test]
    fn happy_path_38_server_38_client() {
        let o = run(PW, &happy_88());
        assert_eq!(o.result, Ok(()));
        assert!(o.done);
        assert_eq!(o.to_server, cat(&[V8, &[2], &RESPONSE]));
        assert_eq!(o.to_client, cat(&[V8, &[1, 1], OK]));
        assert_eq!(o.leftovers, (vec![], vec![]));
    }

    #[test]
    fn step_by_step_outputs_and_wants() {
        let mut p = SecurityProxy::new(PW.to_vec());
        assert!(p.wants_server() && !p.wants_client() && !p.is_done());
        assert!(p.take_to_client().is_empty());

        p.feed_server(V8).unwrap();
        assert_eq!(p.take_to_server(), V8);
        assert_eq!(p.take_to_client(), V8);
        assert!(p.wants_server() && p.wants_client());

        p.feed_client(V8).unwrap();
        assert!(
            p.take_to_client().is_empty(),
            "nothing before the server is done"
        );
        assert!(p.wants_server() && !p.wants_client());

        p.feed_server(&[2, 16, 2]).unwrap();
        assert_eq!(p.take_to_server(), [2]);
        p.feed_server(&CHALLENGE).unwrap();
        assert_eq!(p.take_to_server(), RESPONSE);
        assert!(p.password.is_empty(), "password wiped after use");
        p.feed_server(OK).unwrap();
        assert!(!p.wants_server() && p.wants_client());
        assert_eq!(p.take_to_client(), [1, 1]);

        p.feed_client(&[1]).unwrap();
        assert_eq!(p.take_to_client(), OK);
        assert!(p.is_done() && !p.wants_server() && !p.wants_client());
        assert_eq!(p.take_leftovers(), (vec![], vec![]));
    }

    #[test]
    fn client_version_before_server_auth_and_all_at_once() {
        // The client's version arrives before the server's security types, and
        // the whole server side arrives in one chunk.
        let o = run(
            PW,
            &[s(V8), c(V8), S(cat(&[&[1, 2], &CHALLENGE, OK])), c(&[1])],
        );
        assert!(o.done);
        assert_eq!(o.to_server, cat(&[V8, &[2], &RESPONSE]));
        assert_eq!(o.to_client, cat(&[V8, &[1, 1], OK]));
    }

    #[test]
    fn client_37() {
        let o = run(
            PW,
            &[s(V8), c(V7), s(&[1, 2]), s(&CHALLENGE), s(OK), c(&[1])],
        );
        assert_eq!(o.result, Ok(()));
        assert!(o.done);
        // No SecurityResult for a 3.7 client with None.
        assert_eq!(o.to_client, cat(&[V8, &[1, 1]]));
        assert_eq!(o.to_server, cat(&[V8, &[2], &RESPONSE]));
    }

    #[test]
    fn server_33_vnc_auth() {
        let o = run(PW, &[s(V3), c(V8), S(be(2)), s(&CHALLENGE), s(OK), c(&[1])]);
        assert_eq!(o.result, Ok(()));
        assert!(o.done);
        // No choice byte for RFB 3.3.
        assert_eq!(o.to_server, cat(&[V3, &RESPONSE]));
        assert_eq!(o.to_client, cat(&[V8, &[1, 1], OK]));
    }

    #[test]
    fn server_33_none() {
        let o = run(PW, &[s(V3), c(V8), S(be(1)), c(&[1])]);
        assert!(o.done);
        assert_eq!(o.to_server, V3);
        assert_eq!(o.to_client, cat(&[V8, &[1, 1], OK]));
    }

    #[test]
    fn server_33_failure_with_reason() {
        let o = run(
            PW,
            &[s(V3), S(cat(&[&be(0), &string(b"too many clients")]))],
        );
        assert_eq!(
            o.result,
            Err(RfbError::ServerRefused {
                reason: "too many clients".into()
            })
        );
        assert_eq!(o.to_server, V3);
    }

    #[test]
    fn server_33_unknown_type() {
        let o = run(PW, &[s(V3), S(be(16))]);
        assert_eq!(
            o.result,
            Err(RfbError::NoCommonSecurityType { offered: vec![16] })
        );
    }

    #[test]
    fn server_33_wrong_password_has_no_reason() {
        let o = run(PW, &[s(V3), c(V8), S(be(2)), s(&CHALLENGE), S(be(1))]);
        match o.result {
            Err(RfbError::AuthFailed { reason }) => assert!(reason.contains("code 1")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn server_versions_are_mapped() {
        for (line, answer) in [
            (&b"RFB 003.003\n"[..], V3),
            (b"RFB 003.004\n", V3),
            (b"RFB 003.005\n", V3),
            (b"RFB 003.006\n", V3),
            (b"RFB 003.007\n", V7),
            (b"RFB 003.008\n", V8),
            (b"RFB 003.009\n", V8),
            (b"RFB 003.889\n", V8),
            (b"RFB 003.999\n", V8),
        ] {
            let o = run(PW, &[s(line)]);
            assert_eq!(o.result, Ok(()), "{line:?}");
            assert_eq!(o.to_server, answer, "{line:?}");
            assert_eq!(o.to_client, V8, "{line:?}");
        }
    }

    #[test]
    fn server_37_offering_only_none() {
        let o = run(PW, &[s(V7), c(V8), s(&[1, 1]), c(&[1])]);
        assert!(o.done);
        // No SecurityResult from a 3.7 server for None.
        assert_eq!(o.to_server, cat(&[V7, &[1]]));
        assert_eq!(o.to_client, cat(&[V8, &[1, 1], OK]));
    }

    #[test]
    fn server_38_offering_only_none() {
        let o = run(PW, &[s(V8), c(V8), s(&[1, 1]), s(OK), c(&[1])]);
        assert!(o.done);
        assert_eq!(o.to_server, cat(&[V8, &[1]]));
        assert_eq!(o.to_client, cat(&[V8, &[1, 1], OK]));
    }

    #[test]
    fn server_38_none_refused_by_security_result() {
        let o = run(
            PW,
            &[
                s(V8),
                c(V8),
                s(&[1, 1]),
                S(cat(&[&be(1), &string(b"nope")])),
            ],
        );
        assert_eq!(
            o.result,
            Err(RfbError::AuthFailed {
                reason: "nope".into()
            })
        );
    }

    #[test]
    fn offered_none_and_vnc_auth() {
        // With a password: VNC Authentication is chosen.
        let o = run(
            PW,
            &[s(V8), c(V8), s(&[2, 1, 2]), s(&CHALLENGE), s(OK), c(&[1])],
        );
        assert!(o.done);
        assert_eq!(o.to_server, cat(&[V8, &[2], &RESPONSE]));
        // Without a password: None is chosen.
        let o = run(b"", &[s(V8), c(V8), s(&[2, 1, 2]), s(OK), c(&[1])]);
        assert!(o.done);
        assert_eq!(o.to_server, cat(&[V8, &[1]]));
    }

    #[test]
    fn empty_password_still_answers_vnc_auth_only_server() {
        let o = run(
            b"",
            &[s(V8), c(V8), s(&[1, 2]), s(&CHALLENGE), s(OK), c(&[1])],
        );
        assert!(o.done);
        assert_eq!(
            o.to_server,
            cat(&[V8, &[2], &vncauth::response(b"", &CHALLENGE)])
        );
    }

    #[test]
    fn no_common_security_type() {
        let o = run(PW, &[s(V8), c(V8), s(&[3, 16, 18, 19])]);
        assert_eq!(
            o.result,
            Err(RfbError::NoCommonSecurityType {
                offered: vec![16, 18, 19]
            })
        );
        assert_eq!(o.to_server, V8);
        assert_eq!(
            o.to_client,
            cat(&[V8, &[0], &string(CLIENT_REASON_SERVER.as_bytes())])
        );
    }

    #[test]
    fn wrong_password_reports_server_reason() {
        let o = run(
            b"wrong",
            &[
                s(V8),
                c(V8),
                s(&[1, 2]),
                s(&CHALLENGE),
                S(cat(&[&be(1), &string(b"Authentication failed")])),
            ],
        );
        assert_eq!(
            o.result,
            Err(RfbError::AuthFailed {
                reason: "Authentication failed".into()
            })
        );
        assert_eq!(
            o.to_server,
            cat(&[V8, &[2], &vncauth::response(b"wrong", &CHALLENGE)])
        );
        // The browser got a 3.8-style failure with a generic reason only.
        assert_eq!(
            o.to_client,
            cat(&[V8, &[0], &string(CLIENT_REASON_SERVER.as_bytes())])
        );
        let msg = o.result.unwrap_err().to_string();
        assert!(msg.contains("Authentication failed"), "{msg}");
    }

    #[test]
    fn wrong_password_overlong_reason_not_read() {
        // Only the length arrives; the reason is not waited for.
        let o = run(
            PW,
            &[
                s(V8),
                c(V8),
                s(&[1, 2]),
                s(&CHALLENGE),
                S(cat(&[&be(1), &be(300)])),
            ],
        );
        match o.result {
            Err(RfbError::AuthFailed { reason }) => assert!(reason.contains("300"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrong_password_37_server_has_no_reason() {
        let o = run(PW, &[s(V7), c(V8), s(&[1, 2]), s(&CHALLENGE), S(be(1))]);
        assert!(matches!(o.result, Err(RfbError::AuthFailed { .. })));
        assert_eq!(o.to_server, cat(&[V7, &[2], &RESPONSE]));
    }

    #[test]
    fn server_failure_reason_256_is_read() {
        let reason = vec![b'r'; 256];
        let o = run(PW, &[s(V8), S(cat(&[&[0], &string(&reason)]))]);
        assert_eq!(
            o.result,
            Err(RfbError::ServerRefused {
                reason: "r".repeat(256)
            })
        );
        // The client (which has only seen our version) gets a failure with a
        // generic reason.
        assert_eq!(
            o.to_client,
            cat(&[V8, &[0], &string(CLIENT_REASON_SERVER.as_bytes())])
        );
    }

    #[test]
    fn server_failure_reason_300_is_not_read() {
        // Only the header arrives: the error must not wait for 300 more bytes.
        let o = run(PW, &[s(V8), S(cat(&[&[0], &be(300)]))]);
        match &o.result {
            Err(RfbError::ServerRefused { reason }) => {
                assert!(
                    reason.contains("300") && !reason.contains("xxx"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Same when the 300 bytes are in the same chunk.
        let o2 = run(PW, &[s(V8), S(cat(&[&[0], &string(&[b'x'; 300])]))]);
        assert_eq!(o.result, o2.result);
    }

    #[test]
    fn server_failure_incomplete_reason_waits() {
        let mut p = SecurityProxy::new(PW.to_vec());
        p.feed_server(V8).unwrap();
        p.feed_server(&cat(&[&[0], &be(5), b"abc"])).unwrap();
        assert!(p.wants_server());
        assert_eq!(
            p.feed_server(b"de"),
            Err(RfbError::ServerRefused {
                reason: "abcde".into()
            })
        );
    }

    #[test]
    fn server_reason_is_sanitised() {
        let o = run(
            PW,
            &[s(V8), S(cat(&[&[0], &string(b"bad\x1b[31m\nline\xff")]))],
        );
        match o.result {
            Err(RfbError::ServerRefused { reason }) => {
                assert!(!reason.chars().any(char::is_control), "{reason:?}");
                assert!(reason.starts_with("bad\\u{1b}[31m\\nline"), "{reason:?}");
            }
            other => panic!("{other:?}"),
        }
        let o = run(PW, &[s(V8), S(cat(&[&[0], &be(0)]))]);
        assert_eq!(
            o.result,
            Err(RfbError::ServerRefused {
                reason: "(no reason given)".into()
            })
        );
    }

    #[test]
    fn bad_server_versions() {
        for line in [
            &b"RFB 004.000\n"[..],
            b"RFB 002.008\n",
            b"RFB 003.002\n",
            b"RFB 003.000\n",
            b"RFB 03.008\n\n",
            b"RFB 003.008\r",
            b"RFB 003,008\n",
            b"rfb 003.008\n",
            b"HTTP/1.1 200",
            b"RFB 00a.008\n",
            b"\0\0\0\0\0\0\0\0\0\0\0\0",
        ] {
            let o = run(PW, &[s(line)]);
            assert!(
                matches!(o.result, Err(RfbError::ServerVersion(_))),
                "{line:?}: {:?}",
                o.result
            );
            assert!(o.to_server.is_empty());
            // The client gets a version and a failure it can display.
            assert_eq!(
                o.to_client,
                cat(&[V8, &[0], &string(CLIENT_REASON_SERVER.as_bytes())])
            );
        }
        let o = run(PW, &[s(b"RFB 004.000\n")]);
        let msg = o.result.unwrap_err().to_string();
        assert!(msg.contains("RFB 004.000\\n"), "{msg}");
    }

    #[test]
    fn client_version_33_rejected() {
        let o = run(PW, &[s(V8), c(V3)]);
        assert_eq!(
            o.result,
            Err(RfbError::ClientVersion("RFB 003.003\\n".into()))
        );
        // 3.3-style failure: u32 0, then the reason.
        assert_eq!(
            o.to_client,
            cat(&[V8, &be(0), &string(CLIENT_REASON_VERSION.as_bytes())])
        );
        assert_eq!(o.to_server, V8);
    }

    #[test]
    fn other_client_versions_rejected() {
        for line in [
            &b"RFB 003.005\n"[..],
            b"RFB 003.009\n",
            b"RFB 003.889\n",
            b"RFB 004.001\n",
            b"GET / HTTP/1.",
        ] {
            let o = run(PW, &[s(V8), c(line)]);
            assert!(
                matches!(o.result, Err(RfbError::ClientVersion(_))),
                "{line:?}"
            );
            assert_eq!(
                o.to_client,
                cat(&[V8, &[0], &string(CLIENT_REASON_VERSION.as_bytes())])
            );
        }
    }

    #[test]
    fn client_picks_vnc_auth() {
        let o = run(
            PW,
            &[s(V8), c(V8), s(&[1, 2]), s(&CHALLENGE), s(OK), c(&[2])],
        );
        assert_eq!(o.result, Err(RfbError::ClientSecurityType(2)));
        assert!(!o.done);
        // 3.8 client: failed SecurityResult with a reason.
        assert_eq!(
            o.to_client,
            cat(&[
                V8,
                &[1, 1],
                &be(1),
                &string(CLIENT_REASON_SECURITY.as_bytes())
            ])
        );
        // 3.7 client: just closed.
        let o = run(
            PW,
            &[s(V8), c(V7), s(&[1, 2]), s(&CHALLENGE), s(OK), c(&[0])],
        );
        assert_eq!(o.result, Err(RfbError::ClientSecurityType(0)));
        assert_eq!(o.to_client, cat(&[V8, &[1, 1]]));
    }

    #[test]
    fn leftovers_preserved_in_same_chunk() {
        // An eager server sends SecurityResult together with (fake) ServerInit
        // bytes; the client sends its choice together with ClientInit and a
        // SetEncodings message.
        let server_init: Vec<u8> = (0u8..=40).collect();
        let client_tail = [1u8, 2, 0, 0, 1, 0, 0, 0, 0];
        let o = run(
            PW,
            &[
                s(V8),
                c(V8),
                s(&[1, 2]),
                s(&CHALLENGE),
                S(cat(&[OK, &server_init])),
                C(cat(&[&[1], &client_tail])),
            ],
        );
        assert_eq!(o.result, Ok(()));
        assert!(o.done);
        assert_eq!(o.to_client, cat(&[V8, &[1, 1], OK]));
        assert_eq!(o.leftovers, (client_tail.to_vec(), server_init));
    }

    #[test]
    fn leftovers_include_untaken_output_in_order() {
        let mut p = SecurityProxy::new(PW.to_vec());
        p.feed_server(&cat(&[V8, &[1, 2], &CHALLENGE, OK, b"SERVERINIT"]))
            .unwrap();
        p.feed_client(&cat(&[V8, &[1], &[1], b"more"])).unwrap();
        assert!(p.is_done());
        // Nothing was taken yet: the leftovers carry the handshake output first.
        let (to_server, to_client) = p.take_leftovers();
        assert_eq!(to_server, cat(&[V8, &[2], &RESPONSE, &[1], b"more"]));
        assert_eq!(to_client, cat(&[V8, &[1, 1], OK, b"SERVERINIT"]));
        assert_eq!(p.take_leftovers(), (vec![], vec![]));
    }

    #[test]
    fn large_leftovers_are_not_lost() {
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let o = run(
            PW,
            &[
                s(V8),
                c(V8),
                s(&[1, 2]),
                s(&CHALLENGE),
                s(OK),
                C(cat(&[&[1], &big])),
            ],
        );
        assert!(o.done);
        assert_eq!(o.leftovers.0, big);
    }

    #[test]
    fn feeding_after_done_appends_to_leftovers() {
        let mut p = SecurityProxy::new(PW.to_vec());
        for ev in happy_88() {
            match ev {
                S(d) => p.feed_server(&d).unwrap(),
                C(d) => p.feed_client(&d).unwrap(),
            }
        }
        assert!(p.is_done());
        let _ = p.take_leftovers();
        p.feed_client(b"abc").unwrap();
        p.feed_server(b"xyz").unwrap();
        p.feed_client(b"def").unwrap();
        assert_eq!(p.take_leftovers(), (b"abcdef".to_vec(), b"xyz".to_vec()));
    }

    #[test]
    fn take_leftovers_before_done_keeps_unparsed_input() {
        let mut p = SecurityProxy::new(PW.to_vec());
        p.feed_server(&cat(&[V8, &[1]])).unwrap();
        assert_eq!(p.take_leftovers(), (V8.to_vec(), V8.to_vec()));
        p.feed_server(&[2]).unwrap();
        assert_eq!(p.take_to_server(), [2]);
    }

    #[test]
    fn errors_are_sticky() {
        let mut p = SecurityProxy::new(PW.to_vec());
        let err = p.feed_server(b"RFB 009.000\n").unwrap_err();
        assert!(matches!(err, RfbError::ServerVersion(_)));
        assert_eq!(p.feed_server(V8), Err(err.clone()));
        assert_eq!(p.feed_client(V8), Err(err));
        assert!(!p.is_done() && !p.wants_client() && !p.wants_server());
        let (to_server, _) = p.take_leftovers();
        assert!(to_server.is_empty());
    }

    #[test]
    fn too_much_early_client_data_is_an_error() {
        // Exactly MAX_BUFFERED unparsed bytes are tolerated...
        let mut p = SecurityProxy::new(PW.to_vec());
        p.feed_client(&vec![b'x'; MAX_BUFFERED]).unwrap();
        // ...one more is not.
        assert!(matches!(p.feed_client(b"x"), Err(RfbError::Protocol(_))));

        // Also when it comes in one large chunk.
        let o = run(PW, &[s(V8), c(V8), C(vec![0; MAX_BUFFERED + 1])]);
        assert_eq!(o.result, Err(RfbError::Protocol(CLIENT_FLOOD)));
        assert_eq!(
            o.to_client,
            cat(&[V8, &[0], &string(CLIENT_REASON_PROTOCOL.as_bytes())])
        );
    }

    #[test]
    fn too_much_early_server_data_is_an_error() {
        // After authenticating, the server waits for ClientInit; a flood before
        // the client finished its handshake is refused.
        let o = run(
            PW,
            &[
                s(V8),
                s(&[1, 2]),
                s(&CHALLENGE),
                S(cat(&[OK, &vec![7; MAX_BUFFERED + 1]])),
            ],
        );
        assert_eq!(o.result, Err(RfbError::Protocol(SERVER_FLOOD)));
        // The client is told the server side failed.
        let tail = string(CLIENT_REASON_SERVER.as_bytes());
        assert!(o.to_client.ends_with(&tail));
    }

    #[test]
    fn client_bytes_before_server_version_are_kept() {
        // A client that sends its version before it saw ours still works.
        let o = run(
            PW,
            &[c(V8), s(V8), S(cat(&[&[1, 2], &CHALLENGE, OK])), c(&[1])],
        );
        assert!(o.done);
        assert_eq!(o.to_client, cat(&[V8, &[1, 1], OK]));
    }

    #[test]
    fn error_messages_are_clear() {
        let cases = [
            RfbError::ServerVersion("x".into()),
            RfbError::ClientVersion("x".into()),
            RfbError::NoCommonSecurityType { offered: vec![5] },
            RfbError::ServerRefused { reason: "r".into() },
            RfbError::AuthFailed { reason: "r".into() },
            RfbError::ClientSecurityType(2),
            RfbError::Protocol("p"),
        ];
        for e in cases {
            let msg = e.to_string();
            assert!(msg.len() > 20, "{msg}");
        }
        assert_eq!(
            RfbError::ClientSecurityType(2).to_string(),
            "the browser chose security type 2, but only type 1 (None) was offered"
        );
    }

    #[test]
    fn debug_does_not_show_password() {
        let p = SecurityProxy::new(b"hunter22".to_vec());
        let dbg = format!("{p:?}");
        assert!(
            !dbg.contains("hunter22") && !dbg.contains("104, 117"),
            "{dbg}"
        );
    }

    /// Feeds random fragments of `server` and `client` in random interleaving;
    /// must never panic, and must stay bounded.
    fn fuzz_feed(rng: &mut XorShift, server: &[u8], client: &[u8]) {
        let mut p = SecurityProxy::new(PW.to_vec());
        let (mut si, mut ci) = (0, 0);
        while si < server.len() || ci < client.len() {
            let to_server_side = ci >= client.len() || (si < server.len() && rng.next() & 1 == 0);
            let (buf, pos) = if to_server_side {
                (server, &mut si)
            } else {
                (client, &mut ci)
            };
            let n = 1 + rng.below(16.min(buf.len() - *pos));
            let piece = &buf[*pos..*pos + n];
            *pos += n;
            let r = if to_server_side {
                p.feed_server(piece)
            } else {
                p.feed_client(piece)
            };
            assert!(p.take_to_server().len() <= 64);
            assert!(p.take_to_client().len() <= 128);
            if !p.is_done() {
                assert!(p.server_in.len() <= MAX_BUFFERED && p.client.buffered() <= MAX_BUFFERED);
            }
            if r.is_err() {
                assert_eq!(r, p.feed_server(b"x"));
                break;
            }
        }
        let _ = p.take_leftovers();
        let _ = (
            p.wants_client(),
            p.wants_server(),
            p.is_done(),
            format!("{p:?}"),
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let sl = rng.below(64);
            let cl = rng.below(64);
            let server = rng.bytes(sl);
            let client = rng.bytes(cl);
            fuzz_feed(&mut rng, &server, &client);
        }
    }

    #[test]
    fn mutated_handshakes_never_panic() {
        let server_ok = cat(&[V8, &[2, 1, 2], &CHALLENGE, OK, b"init"]);
        let server_fail = cat(&[V8, &[0], &string(b"reason")]);
        let server_33 = cat(&[V3, &be(2), &CHALLENGE, &be(1)]);
        let client_ok = cat(&[V8, &[1, 1]]);
        let mut rng = XorShift(42);
        for i in 0..3000 {
            let mut server = match i % 3 {
                0 => server_ok.clone(),
                1 => server_fail.clone(),
                _ => server_33.clone(),
            };
            let mut client = client_ok.clone();
            // Flip, truncate or extend a few bytes.
            for _ in 0..1 + rng.below(3) {
                let target = if rng.next() & 1 == 0 {
                    &mut server
                } else {
                    &mut client
                };
                match rng.below(3) {
                    0 if !target.is_empty() => {
                        let at = rng.below(target.len());
                        target[at] = rng.next() as u8;
                    }
                    1 if !target.is_empty() => {
                        let len = rng.below(target.len());
                        target.truncate(len);
                    }
                    _ => {
                        let extra = rng.below(8);
                        let tail = rng.bytes(extra);
                        target.extend(tail);
                    }
                }
            }
            fuzz_feed(&mut rng, &server, &client);
        }
    }

    #[test]
    fn choose_cases() {
        assert_eq!(choose(&[2], true), Some(2));
        assert_eq!(choose(&[2], false), Some(2));
        assert_eq!(choose(&[1], true), Some(1));
        assert_eq!(choose(&[1, 2], true), Some(2));
        assert_eq!(choose(&[2, 1], false), Some(1));
        assert_eq!(choose(&[16, 1, 19], true), Some(1));
        assert_eq!(choose(&[16, 19], true), None);
        assert_eq!(choose(&[], true), None);
        assert_eq!(choose(&[258], true), None);
    }
}
