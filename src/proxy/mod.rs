//! The console proxy: a noVNC-compatible WebSocket-to-TCP relay that
//! redeems console tokens.
//!
//! - [`request`]: where a request carries its token (query or cookie).
//! - [`reconnect`]: the console page's session answer, and the reconnect
//!   tickets that bring a single-use token's console back after a drop.
//! - [`handshake`]: the RFB security proxy over live connections, so the VNC
//!   password stays with the broker.
//! - [`relay`]: the byte loop between WebSocket and TCP.
//! - [`inspect`]: what the relay does with a session whose messages it
//!   follows (view-only, clipboard policy, input counts, recording).
//! - [`sessions`]: this node's live sessions, and which revocations apply to
//!   them.
//! - [`enforce`]: the jobs that end sessions the revocation log or the
//!   inventory's re-check no longer allows.
//!
//! Every refusal happens after the WebSocket upgrade, as a close frame with a
//! specific code and a human reason, because a browser hides the HTTP status
//! of a failed upgrade from the page. No reason tells whether an unknown
//! token ever existed.

pub mod enforce;
pub mod handshake;
pub mod inspect;
pub mod reconnect;
pub mod relay;
pub mod request;
pub mod sessions;
pub mod spice;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Response, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::any;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use self::relay::{Counts, End};
use self::sessions::{Entry, Sessions, Stop};
use crate::edge;
use crate::inventory::{Credential, Grant, Lapse};
use crate::limits::{Attempt, FailureLimiter, Refused};
use crate::protocol::Protocol;
use crate::service::{RedeemError, TokenService};
use crate::store::{
    Cause, NewSession, Opened, RecordingState, Redemption, SessionEnd, SessionLog, TicketEnd,
    TokenStore,
};
use crate::websocket::stream::{Reader, Writer};
use crate::websocket::upgrade;

/// The upgraded connection to the browser.
type Io = TokioIo<hyper::upgrade::Upgraded>;
type WsReader = Reader<ReadHalf<Io>>;
type WsWriter = Writer<WriteHalf<Io>>;

/// Close codes the console page tells apart. 4000-4999 is the range RFC 6455
/// leaves to applications.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const PROTOCOL: u16 = 1002;
    pub const NO_TOKEN: u16 = 4400;
    pub const TOKEN: u16 = 4401;
    pub const ACCESS_WITHDRAWN: u16 = 4403;
    pub const VM_GONE: u16 = 4404;
    pub const IDLE: u16 = 4408;
    pub const MOVED: u16 = 4409;
    pub const REVOKED: u16 = 4410;
    pub const TIME_LIMIT: u16 = 4411;
    pub const EXPIRED: u16 = 4412;
    pub const IN_USE: u16 = 4423;
    pub const RECONNECT_PENDING: u16 = 4425;
    pub const TOO_MANY: u16 = 4429;
    pub const VNC_HANDSHAKE: u16 = 4500;
    pub const UNREACHABLE: u16 = 4502;
    pub const UNAVAILABLE: u16 = 4503;
    pub const TIMEOUT: u16 = 4504;
    pub const RECORDING: u16 = 4507;
    /// A SPICE channel the session may not open.
    pub const CHANNEL: u16 = 4406;
}

/// Where and how this node records sessions, from `[recording]`.
#[derive(Debug, Clone, Default)]
pub struct RecordingSettings {
    /// Unset: this node records nothing.
    pub dir: Option<std::path::PathBuf>,
    /// A recording that cannot start or stops early ends its session.
    pub required: bool,
    pub queue_bytes: usize,
}

/// Proxy settings, from the `[proxy]` config section.
#[derive(Clone)]
pub struct Settings {
    pub node: String,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_message_bytes: usize,
    /// Which web origins may open consoles.
    pub origins: edge::Policy,
    /// Reverse proxies whose X-Forwarded-* headers are believed.
    pub trusted_proxies: Vec<IpAddr>,
    /// Whether this listener serves TLS (for the same-origin scheme).
    pub tls: bool,
    pub limiter: Arc<FailureLimiter>,
    pub idle_timeout: Option<Duration>,
    pub max_session: Option<Duration>,
    pub end_at_token_expiry: bool,
    /// Seconds a dropped single-use console may come back with its ticket
    /// (0: no tickets).
    pub reconnect_grace: u64,
    pub ping_interval: Option<Duration>,
    pub pong_timeout: Duration,
    /// A write to the browser (one WebSocket frame) that does not finish
    /// within this long ends the session: the browser stopped reading.
    pub client_write_timeout: Option<Duration>,
    /// Longest clipboard text passed either way.
    pub max_clipboard: u32,
    pub recording: RecordingSettings,
}

pub struct Proxy {
    /// Where the sessions are recorded.
    log: Arc<dyn SessionLog>,
    /// The revocations a new session catches up with.
    tokens: Arc<dyn TokenStore>,
    service: Arc<TokenService>,
    sessions: Arc<Sessions>,
    settings: Settings,
}

impl Proxy {
    /// `service` redeems tokens; `log` records the sessions.
    pub fn new(
        log: Arc<dyn SessionLog>,
        tokens: Arc<dyn TokenStore>,
        service: Arc<TokenService>,
        sessions: Arc<Sessions>,
        settings: Settings,
    ) -> Proxy {
        Proxy {
            log,
            tokens,
            service,
            sessions,
            settings,
        }
    }

    /// Closes the session rows this node left open when it last stopped (a
    /// kill -9, or a database outage as sessions ended): they cannot be
    /// live any more. Called once, before the node serves.
    pub async fn close_rows_left_open(&self) {
        let node = &self.settings.node;
        match self
            .log
            .close_orphaned_sessions(node, crate::now_unix())
            .await
        {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(sessions = n, %node, "closed session rows a previous run left open")
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not close session rows a previous run left open")
            }
        }
    }
}

/// Why a connection was refused before relaying began.
#[derive(Debug)]
enum Refusal {
    NoToken,
    BadToken,
    StoreDown(String),
    Moved,
    TooMany(sessions::LimitHit),
    /// Access was withdrawn while the session was being set up.
    Stopped(Stop),
    Unreachable(String),
    Handshake(handshake::HandshakeError),
    HandshakeTimeout,
    /// The VM is exclusive and someone else is in control.
    ControlTaken,
    /// The session must be recorded and its recording could not start.
    RecordingUnavailable(String),
    /// A reconnect ticket whose session this broker still sees live.
    ReconnectPending,
    /// The SPICE link failed.
    Spice(crate::spice::link::LinkError),
    /// A SPICE channel turned away: its link error and why.
    SpiceChannel(&'static str),
}

impl Refusal {
    /// How the refusal is counted in `/metrics`.
    fn metric(&self) -> crate::metrics::Refused {
        use crate::metrics::Refused as M;
        match self {
            Refusal::NoToken => M::NoToken,
            Refusal::BadToken => M::InvalidToken,
            Refusal::StoreDown(_) => M::StoreUnavailable,
            Refusal::Moved => M::Moved,
            Refusal::TooMany(_) => M::SessionLimit,
            Refusal::Stopped(_) => M::Withdrawn,
            Refusal::Unreachable(_) => M::Unreachable,
            Refusal::Handshake(_) => M::VncHandshake,
            Refusal::HandshakeTimeout => M::HandshakeTimeout,
            Refusal::ControlTaken => M::ControlTaken,
            Refusal::RecordingUnavailable(_) => M::RecordingUnavailable,
            Refusal::ReconnectPending => M::ReconnectPending,
            Refusal::Spice(_) => M::SpiceLink,
            Refusal::SpiceChannel(_) => M::SpiceChannel,
        }
    }

    /// Operator-facing detail for the log; never sent to the client.
    fn detail(&self) -> String {
        match self {
            Refusal::StoreDown(e) | Refusal::Unreachable(e) | Refusal::RecordingUnavailable(e) => {
                e.clone()
            }
            Refusal::Handshake(e) => e.to_string(),
            Refusal::Spice(e) => e.to_string(),
            Refusal::SpiceChannel(why) => (*why).to_owned(),
            other => format!("{other:?}"),
        }
    }

    fn close(&self) -> (u16, String) {
        use handshake::HandshakeError as H;
        match self {
            Refusal::NoToken => (close::NO_TOKEN, "no console token given".into()),
            Refusal::BadToken => (close::TOKEN, "token invalid or expired".into()),
            Refusal::TooMany(hit) => (close::TOO_MANY, hit.to_string()),
            Refusal::Stopped(stop) => stop_close(*stop),
            Refusal::Moved => (
                close::MOVED,
                "console unavailable: the VM moved since this link was made, ask for a new one"
                    .into(),
            ),
            Refusal::StoreDown(_) => (
                close::UNAVAILABLE,
                "console service unavailable, try again shortly".into(),
            ),
            Refusal::Unreachable(_) => (
                close::UNREACHABLE,
                "console unavailable: VM not reachable".into(),
            ),
            Refusal::Handshake(H::TextFrame) => (
                close::UNSUPPORTED_DATA,
                "text frames are not accepted".into(),
            ),
            Refusal::Handshake(H::ClientProtocol { code, .. }) => {
                (*code, "WebSocket protocol error".into())
            }
            Refusal::Handshake(H::ClientRfb(_)) => (
                close::PROTOCOL,
                "RFB protocol error from the browser".into(),
            ),
            Refusal::Handshake(H::Rfb(crate::rfb::RfbError::AuthFailed { .. })) => (
                close::VNC_HANDSHAKE,
                "console unavailable: the VNC server refused the stored password".into(),
            ),
            Refusal::Handshake(e) => (
                close::VNC_HANDSHAKE,
                trim_reason(&format!("console unavailable: {e}")),
            ),
            Refusal::HandshakeTimeout => (
                close::TIMEOUT,
                "console unavailable: the VNC handshake timed out".into(),
            ),
            Refusal::ControlTaken => (
                close::IN_USE,
                "console in use: someone else has control of this VM; a view-only link can join"
                    .into(),
            ),
            Refusal::RecordingUnavailable(_) => (
                close::RECORDING,
                "console unavailable: this session must be recorded and the recording could not start"
                    .into(),
            ),
            Refusal::ReconnectPending => (
                close::RECONNECT_PENDING,
                "reconnecting: the previous connection is still open, try again in a moment".into(),
            ),
            Refusal::Spice(crate::spice::link::LinkError::PasswordRejected) => (
                close::VNC_HANDSHAKE,
                "console unavailable: the SPICE server refused the stored password".into(),
            ),
            Refusal::Spice(
                e @ (crate::spice::link::LinkError::Client(_)
                | crate::spice::link::LinkError::ClientFlood
                | crate::spice::link::LinkError::ClientSasl),
            ) => (close::PROTOCOL, trim_reason(&format!("SPICE protocol error: {e}"))),
            Refusal::Spice(crate::spice::link::LinkError::Timeout) => (
                close::TIMEOUT,
                "console unavailable: the SPICE link timed out".into(),
            ),
            Refusal::Spice(e) => (
                close::VNC_HANDSHAKE,
                trim_reason(&format!("console unavailable: {e}")),
            ),
            Refusal::SpiceChannel(why) => (close::CHANNEL, (*why).into()),
        }
    }
}

impl End {
    fn close(&self) -> (u16, String) {
        match self {
            End::ClientClosed => (close::NORMAL, "client closed".into()),
            End::ClientLost => (close::NORMAL, "client connection lost".into()),
            End::ServerClosed => (close::NORMAL, "the VNC server closed the connection".into()),
            End::TextFrame => (
                close::UNSUPPORTED_DATA,
                "text frames are not accepted".into(),
            ),
            End::ClientProtocol { code, .. } => (*code, "WebSocket protocol error".into()),
            End::ServerError(_) => (close::UNREACHABLE, "console connection lost".into()),
            End::Stopped(stop) => stop_close(*stop),
            End::Idle => (close::IDLE, "session ended: idle too long".into()),
            End::PongTimeout => (close::IDLE, "session ended: no answer to ping".into()),
            End::WriteTimeout => (
                close::IDLE,
                "session ended: the browser stopped reading".into(),
            ),
            End::MaxDuration => (
                close::TIME_LIMIT,
                "session ended: time limit reached".into(),
            ),
            End::TokenExpired => (
                close::EXPIRED,
                "session ended: the console link expired".into(),
            ),
            End::ClientRfb(e) => (
                close::PROTOCOL,
                trim_reason(&format!("RFB protocol error: {e}")),
            ),
            End::ServerRfb(e) => (
                close::VNC_HANDSHAKE,
                trim_reason(&format!("session ended: {e}")),
            ),
            End::RecordingFailed(_) => (
                close::RECORDING,
                "session ended: its recording could not be written".into(),
            ),
        }
    }

    /// The reason recorded in the sessions table.
    fn record(&self) -> String {
        match self {
            End::ClientClosed => "client closed".into(),
            End::ClientLost => "client connection lost".into(),
            End::ServerClosed => "server closed".into(),
            End::TextFrame => "client sent a text frame".into(),
            End::ClientProtocol { detail, .. } => format!("client protocol error: {detail}"),
            End::ServerError(e) => format!("server error: {e}"),
            End::Stopped(stop) => stop_record(*stop).into(),
            End::Idle => "idle timeout".into(),
            End::PongTimeout => "client stopped answering pings".into(),
            End::WriteTimeout => "client stopped reading".into(),
            End::MaxDuration => "time limit".into(),
            End::TokenExpired => "token expired".into(),
            End::ClientRfb(e) => format!("client RFB error: {e}"),
            End::ServerRfb(e) => format!("server RFB error: {e}"),
            End::RecordingFailed(e) => format!("recording failed: {e}"),
        }
    }
}

/// The close code and reason of a session the broker ended.
fn stop_close(stop: Stop) -> (u16, String) {
    let (code, reason) = match stop {
        Stop::Shutdown => (close::GOING_AWAY, "server shutting down"),
        Stop::StoreDown => (
            close::UNAVAILABLE,
            "console service unavailable, try again shortly",
        ),
        Stop::Revoked(Cause::Revoked) => (close::REVOKED, "session ended: console access revoked"),
        Stop::Revoked(Cause::SessionEnded) => (close::REVOKED, "session ended by request"),
        Stop::Revoked(Cause::VmRemoved) => (close::VM_GONE, "session ended: the VM was removed"),
        Stop::Revoked(Cause::VmChanged) => (
            close::MOVED,
            "session ended: the VM's console moved or changed",
        ),
        Stop::Revoked(Cause::UserRemoved) | Stop::Lapsed(Lapse::CredentialRejected) => (
            close::ACCESS_WITHDRAWN,
            "session ended: your account is no longer accepted",
        ),
        Stop::Revoked(Cause::AccessRemoved) | Stop::Lapsed(Lapse::AccessLost) => (
            close::ACCESS_WITHDRAWN,
            "session ended: you no longer have access to this VM",
        ),
        Stop::Lapsed(Lapse::VmGone) => (close::VM_GONE, "session ended: the VM no longer exists"),
        Stop::Lapsed(Lapse::VmStopped) => (close::VM_GONE, "session ended: the VM is not running"),
        Stop::Lapsed(Lapse::VmMoved) => (close::MOVED, "session ended: the VM moved"),
    };
    (code, reason.into())
}

/// The reason recorded in the sessions table for a session the broker ended.
fn stop_record(stop: Stop) -> &'static str {
    match stop {
        Stop::Shutdown => "server shutting down",
        Stop::StoreDown => "revocation log unavailable",
        Stop::Revoked(Cause::Revoked) => "revoked",
        Stop::Revoked(Cause::SessionEnded) => "ended by request",
        Stop::Revoked(Cause::VmRemoved) => "vm removed",
        Stop::Revoked(Cause::VmChanged) => "vm console changed",
        Stop::Revoked(Cause::UserRemoved) => "user removed",
        Stop::Revoked(Cause::AccessRemoved) => "access removed",
        Stop::Lapsed(Lapse::VmGone) => "vm gone",
        Stop::Lapsed(Lapse::VmStopped) => "vm not running",
        Stop::Lapsed(Lapse::VmMoved) => "vm moved",
        Stop::Lapsed(Lapse::AccessLost) => "access lost",
        Stop::Lapsed(Lapse::CredentialRejected) => "credential rejected",
    }
}

/// Close reasons must fit a control frame: at most 123 bytes of UTF-8.
fn trim_reason(s: &str) -> String {
    let mut end = s.len().min(123);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// The proxy's routes: `/websockify`, and (through [`upgrade_any_path`]) any
/// other path that asks for a WebSocket.
pub fn router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route("/websockify", any(upgrade))
        .route(
            "/console/session",
            axum::routing::post(reconnect::console_session),
        )
        .with_state(proxy)
}

/// `/websockify`: a request that is not a valid upgrade gets 400, 405 or
/// 426 with the reason.
pub async fn upgrade(
    State(proxy): State<Arc<Proxy>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response<Body> {
    accept(proxy, client, req).await
}

/// Any other path: a WebSocket request is proxied, a CONNECT is a SPICE
/// tunnel (remote-viewer), anything else is 404.
pub async fn upgrade_any_path(
    State(proxy): State<Arc<Proxy>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response<Body> {
    if req.method() == axum::http::Method::CONNECT {
        return tunnel(proxy, client, req).await;
    }
    if !upgrade::is_upgrade(req.headers()) {
        return StatusCode::NOT_FOUND.into_response();
    }
    accept(proxy, client, req).await
}

async fn accept(proxy: Arc<Proxy>, peer: SocketAddr, req: Request) -> Response<Body> {
    let (mut parts, _body) = req.into_parts();
    let set = &proxy.settings;
    let trusted = set.trusted_proxies.contains(&peer.ip());
    let client = SocketAddr::new(
        edge::client_ip_from(peer.ip(), &parts.headers, &set.trusted_proxies),
        peer.port(),
    );
    let proto = edge::forwarded_proto(&parts.headers).filter(|_| trusted);
    let scheme = match proto.as_deref() {
        Some(p) if p.eq_ignore_ascii_case("https") => "https",
        Some(_) => "http",
        None if set.tls => "https",
        None => "http",
    };
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = set.origins.check(
        parts.headers.get(header::ORIGIN).map(|v| v.as_bytes()),
        host,
        scheme,
    ) {
        tracing::warn!(%client, error = %e, "WebSocket upgrade refused: origin");
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let accepted = match upgrade::check(&parts.method, &parts.headers) {
        Ok(a) => a,
        Err(e) => {
            return (
                e.status(),
                [
                    (header::UPGRADE, "websocket"),
                    (header::SEC_WEBSOCKET_VERSION, "13"),
                ],
                e.to_string(),
            )
                .into_response();
        }
    };
    let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "connection cannot be upgraded",
        )
            .into_response();
    };
    // A failure is charged before the token is looked up, and refunded
    // unless the token turns out bad.
    let attempt = match charge(set, client.ip()).await {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    let cookies = || {
        parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.as_bytes())
    };
    let token = request::token(parts.uri.query(), cookies());
    let ticket = token.as_deref().and_then(|t| {
        request::cookie(
            &reconnect::cookie_name(&crate::token::hash_token(t)),
            cookies(),
        )
    });
    let asked = Asked { token, ticket };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => session(proxy, TokioIo::new(upgraded), asked, client, attempt).await,
            Err(e) => {
                attempt.refund();
                tracing::debug!(%client, error = %e, "WebSocket upgrade failed")
            }
        }
    });
    accepted.response()
}

/// Charges a failure to `ip` before its token is looked up (refunded unless
/// the token turns out bad); a spent budget is answered 429, late.
async fn charge(set: &Settings, ip: IpAddr) -> Result<Attempt, Response<Body>> {
    match set.limiter.begin(ip).await {
        Ok(a) => Ok(a),
        Err(why) => {
            if why == Refused::Spent {
                tokio::time::sleep(set.limiter.delay()).await;
            }
            Err((StatusCode::TOO_MANY_REQUESTS, why.to_string()).into_response())
        }
    }
}

/// `CONNECT`: remote-viewer's way to a SPICE console through the broker, one
/// tunnel per channel, with the token as its proxy credential. The target
/// it names is ignored: the token's console is the only place it goes. A
/// bad token gets 407, so the viewer says its credential was refused.
async fn tunnel(proxy: Arc<Proxy>, peer: SocketAddr, req: Request) -> Response<Body> {
    let (mut parts, _body) = req.into_parts();
    let set = &proxy.settings;
    let client = SocketAddr::new(
        edge::client_ip_from(peer.ip(), &parts.headers, &set.trusted_proxies),
        peer.port(),
    );
    let auth_needed = |why: &'static str| {
        (
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            [(header::PROXY_AUTHENTICATE, "Basic realm=\"vncbroker\"")],
            why,
        )
            .into_response()
    };
    let token = parts
        .headers
        .get(header::PROXY_AUTHORIZATION)
        .and_then(|v| edge::proxy_credential(v.as_bytes()));
    if token.is_none() {
        return auth_needed("a console token is needed as the proxy credential");
    }
    let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "connection cannot be tunnelled",
        )
            .into_response();
    };
    let attempt = match charge(set, client.ip()).await {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    let asked = Asked {
        token,
        ticket: None,
    };
    let r = match Box::pin(redeem(&proxy, &asked, client, attempt)).await {
        Ok((r, _)) => r,
        Err(refusal) => {
            crate::metrics::global().refused(refusal.metric());
            tracing::info!(%client, detail = %refusal.detail(), "SPICE tunnel refused");
            return match refusal {
                Refusal::NoToken | Refusal::BadToken => {
                    auth_needed("console token invalid or expired")
                }
                other => (StatusCode::SERVICE_UNAVAILABLE, other.close().1).into_response(),
            };
        }
    };
    if r.protocol != Protocol::Spice {
        return (
            StatusCode::FORBIDDEN,
            "this console speaks VNC: open it in the browser",
        )
            .into_response();
    }
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let io = spice::Client::Tunnel(TokioIo::new(upgraded));
                spice::channel(&proxy, io, r, client).await
            }
            Err(e) => tracing::debug!(%client, error = %e, "SPICE tunnel not established"),
        }
    });
    StatusCode::OK.into_response()
}

/// What a WebSocket request brought: its token, and the reconnect ticket
/// the browser holds for that token's console.
struct Asked {
    token: Option<String>,
    ticket: Option<String>,
}

async fn session(proxy: Arc<Proxy>, io: Io, asked: Asked, client: SocketAddr, attempt: Attempt) {
    let (rd, wr) = tokio::io::split(io);
    let mut reader = Reader::new(rd, proxy.settings.max_message_bytes as u64);
    let mut writer = Writer::new(wr);
    // The set-up's state is boxed, and freed once the session is up: a
    // future's size is that of its largest state, and an idle session should
    // hold only what relaying needs.
    let redeemed = match Box::pin(redeem(&proxy, &asked, client, attempt)).await {
        Ok(r) => r,
        Err(refusal) => return Box::pin(refuse(writer, refusal, client)).await,
    };
    if redeemed.0.protocol == Protocol::Spice {
        let client_side = spice::Client::WebSocket(reader, writer);
        return Box::pin(spice::channel(&proxy, client_side, redeemed.0, client)).await;
    }
    let opened = Box::pin(open(&proxy, &mut reader, &mut writer, redeemed)).await;
    match opened {
        Ok(opened) => relay_session(&proxy, reader, writer, opened, client).await,
        Err(refusal) => Box::pin(refuse(writer, refusal, client)).await,
    }
}

/// Turns the browser away with the refusal's close code and reason.
async fn refuse(mut writer: WsWriter, refusal: Refusal, client: SocketAddr) {
    crate::metrics::global().refused(refusal.metric());
    let (code, reason) = refusal.close();
    tracing::info!(%client, code, detail = %refusal.detail(), "console connection refused");
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = writer.close(code, &reason).await;
        let _ = writer.shutdown().await;
    })
    .await;
}

/// Redeems the token, or a reconnect ticket for it. `attempt` is the
/// failure charged for the token, kept if it is bad and refunded otherwise.
async fn redeem(
    proxy: &Proxy,
    asked: &Asked,
    client: SocketAddr,
    attempt: Attempt,
) -> Result<(Redemption, Option<i64>), Refusal> {
    let token = asked.token.as_deref().ok_or(Refusal::NoToken)?;
    let mut redeemed = proxy.service.redeem(token).await.map(|r| (r, None));
    // A used single-use token comes back only with its console's ticket.
    if let (Err(RedeemError::Invalid), Some(ticket)) = (&redeemed, &asked.ticket)
        && proxy.settings.reconnect_grace > 0
    {
        redeemed = proxy
            .service
            .resume(token, ticket, client.ip())
            .await
            .map(|(r, from)| (r, Some(from)));
    }
    match &redeemed {
        Err(RedeemError::Invalid) => attempt.fail(),
        _ => attempt.refund(),
    }
    let (r, resumed_from) = redeemed.map_err(|e| match e {
        RedeemError::Invalid => Refusal::BadToken,
        RedeemError::Pending => Refusal::ReconnectPending,
        RedeemError::Moved => Refusal::Moved,
        e @ (RedeemError::Store(_) | RedeemError::Inventory(_) | RedeemError::Secret { .. }) => {
            Refusal::StoreDown(e.to_string())
        }
    })?;
    tracing::debug!(%client, token_id = r.token_id, vm_id = r.vm_id, "console token accepted");
    Ok((r, resumed_from))
}

/// Registers the session, connects to its target and runs the RFB security
/// handshake if a password is stored or the session's messages are to be
/// followed.
async fn open(
    proxy: &Proxy,
    reader: &mut WsReader,
    writer: &mut WsWriter,
    (r, resumed_from): (Redemption, Option<i64>),
) -> Result<Ready, Refusal> {
    let registration = proxy
        .sessions
        .register(entry(&r))
        .map_err(Refusal::TooMany)?;
    // A revocation made since the token was redeemed ends the session
    // before it starts; one made while it is set up ends it at once.
    enforce::catch_up(proxy.tokens.as_ref(), &registration, None).await;
    let mut stop = registration.stop.clone();
    let (tcp, left) = tokio::select! {
        biased;
        why = sessions::stopped(&mut stop) => return Err(Refusal::Stopped(why)),
        tcp = connect_and_secure(proxy, reader, writer, &r) => tcp?,
    };
    Ok(Ready {
        redemption: r,
        resumed_from,
        tcp,
        left,
        registration,
    })
}

/// What the registry keeps of a session of `r`.
fn entry(r: &Redemption) -> Entry {
    let caller = r
        .caller_session
        .as_deref()
        .and_then(Credential::from_session);
    Entry {
        vm_id: r.vm_id,
        user: r.user_name.clone(),
        seen: r.revocation_seq,
        grant: Grant {
            user: r.user_name.clone(),
            host: r.target_host.clone(),
            port: r.target_port,
            protocol: r.protocol,
            caller,
        },
    }
}

/// A session ready to relay.
struct Ready {
    redemption: Redemption,
    /// The session it continues, when a reconnect ticket opened it.
    resumed_from: Option<i64>,
    tcp: TcpStream,
    /// `None` for a session left to the browser's own handshake.
    left: Option<handshake::Leftovers>,
    registration: sessions::Registration,
}

/// Connects to the token's target, within the connect timeout.
async fn connect_target(proxy: &Proxy, r: &Redemption) -> Result<TcpStream, Refusal> {
    let target = (r.target_host.as_str(), r.target_port);
    let tcp = match tokio::time::timeout(proxy.settings.connect_timeout, TcpStream::connect(target))
        .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(Refusal::Unreachable(e.to_string())),
        Err(_) => return Err(Refusal::Unreachable("connect timed out".into())),
    };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// A session's limits as relay timers, counted from `started_at`: its
/// maximum length, its token's expiry where sessions end with it, pings,
/// and `idle` (none for a channel that leaves it to its console).
fn session_timers(
    set: &Settings,
    r: &Redemption,
    started_at: i64,
    idle: Option<Duration>,
) -> relay::Timers {
    let now = tokio::time::Instant::now();
    let max_end = set
        .max_session
        .map(|d| (now + d, relay::Deadline::MaxDuration));
    let expiry_end = set.end_at_token_expiry.then(|| {
        let left = r.expires_at.saturating_sub(started_at).max(0) as u64;
        (
            now + Duration::from_secs(left),
            relay::Deadline::TokenExpiry,
        )
    });
    relay::Timers {
        idle,
        ping_every: set.ping_interval,
        pong_timeout: set.pong_timeout,
        write_timeout: set.client_write_timeout,
        deadline: [max_end, expiry_end]
            .into_iter()
            .flatten()
            .min_by_key(|d| d.0),
    }
}

/// Connects to the token's target and runs the RFB security handshake if a
/// password is stored or the policy needs the session's messages followed
/// (which the proxy can do only from their first byte). The leftovers are
/// `None` for a session left to the browser's own handshake.
async fn connect_and_secure(
    proxy: &Proxy,
    reader: &mut WsReader,
    writer: &mut WsWriter,
    r: &Redemption,
) -> Result<(TcpStream, Option<handshake::Leftovers>), Refusal> {
    let mut tcp = connect_target(proxy, r).await?;
    let password = r.vnc_password.as_deref();
    if password.is_none() && !r.policy.needs_inspection() {
        return Ok((tcp, None));
    }
    match tokio::time::timeout(
        proxy.settings.handshake_timeout,
        handshake::secure(reader, writer, &mut tcp, password, r.policy.record),
    )
    .await
    {
        Ok(Ok(left)) => Ok((tcp, Some(left))),
        Ok(Err(e)) => Err(Refusal::Handshake(e)),
        Err(_) => Err(Refusal::HandshakeTimeout),
    }
}

async fn relay_session(
    proxy: &Proxy,
    mut reader: WsReader,
    mut writer: WsWriter,
    ready: Ready,
    client: SocketAddr,
) {
    let Ready {
        redemption: r,
        resumed_from,
        tcp,
        left,
        mut registration,
    } = ready;
    let started_at = crate::now_unix();
    let started = std::time::Instant::now();
    let set = &proxy.settings;
    let timers = session_timers(set, &r, started_at, set.idle_timeout);
    let policy = r.policy;
    let record = NewSession {
        token_id: r.token_id,
        vm_id: r.vm_id,
        user_name: r.user_name.clone(),
        client_addr: client.to_string(),
        node: proxy.settings.node.clone(),
        started_at,
        view_only: policy.view_only,
        exclusive: policy.exclusive,
        recording: policy.record,
        resumed_from,
        protocol: r.protocol,
        spice_session_id: None,
    };
    let session_id = match proxy.log.open_session(&record).await {
        Ok(Opened::Session(id)) => Some(id),
        Ok(Opened::ControlTaken) => {
            return Box::pin(refuse(writer, Refusal::ControlTaken, client)).await;
        }
        // No console goes unrecorded: without its row a session would be
        // missing from the audit, could not be ended by its id, and
        // exclusive control could not be vouched for.
        Err(e) => {
            tracing::warn!(error = %e, "could not record the session start; console refused");
            return Box::pin(refuse(writer, Refusal::StoreDown(e.to_string()), client)).await;
        }
    };
    crate::metrics::global().session_started(Protocol::Vnc);
    let mut recorder = None;
    let mut recording = policy.record.then_some(RecordingState::Incomplete);
    if policy.record {
        match start_recording(proxy, &r, session_id, client, started_at) {
            Ok(rec) => {
                recorder = Some(rec);
                recording = Some(RecordingState::Recording);
            }
            Err(why) if set.recording.required => {
                crate::metrics::global().recording_finished("failed");
                if let Some(id) = session_id {
                    let _ = proxy
                        .log
                        .close_session(id, &refused_end(&why, recording))
                        .await;
                }
                return Box::pin(refuse(writer, Refusal::RecordingUnavailable(why), client)).await;
            }
            Err(why) => {
                crate::metrics::global().recording_finished("failed");
                tracing::warn!(session = session_id, reason = %why, "session not recorded; it goes on")
            }
        }
    }
    tracing::info!(
        session = session_id, vm_id = r.vm_id, user = %r.user_name, %client,
        node = %proxy.settings.node, view_only = policy.view_only, resumed_from,
        inspected = left.is_some(), recording = recorder.is_some(),
        "console session started"
    );
    Box::pin(enforce::catch_up(
        proxy.tokens.as_ref(),
        &registration,
        session_id,
    ))
    .await;

    let (mut tcp_rx, mut tcp_tx) = tcp.into_split();
    let mut counts = Counts::default();
    let mut sides = left.as_ref().map(|_| {
        inspect::sides(
            &policy,
            set.max_clipboard,
            recorder.take(),
            set.recording.required,
        )
    });
    // What each side sent past the handshake goes through the session's
    // rules first, like everything after it.
    let first = match (&left, sides.as_mut()) {
        (Some(left), Some((up, down))) => {
            Box::pin(first_bytes(
                left,
                up,
                down,
                &mut writer,
                &mut tcp_tx,
                &mut counts,
            ))
            .await
        }
        _ => Ok(()),
    };
    let writer = tokio::sync::Mutex::new(writer);
    let end = match first {
        Err(end) => end,
        Ok(()) => {
            relay::run(
                &mut reader,
                &writer,
                &mut tcp_rx,
                &mut tcp_tx,
                &mut registration.stop,
                timers,
                &mut counts,
                sides.as_mut().map(|(u, d)| (u, d)),
            )
            .await
        }
    };

    let (code, reason) = end.close();
    let mut writer = writer.into_inner();
    // What follows the relay is boxed (see `session`).
    let _ = Box::pin(tokio::time::timeout(Duration::from_secs(2), async {
        let _ = writer.close(code, &reason).await;
        let _ = writer.shutdown().await;
    }))
    .await;
    let _ = tcp_tx.shutdown().await;
    crate::metrics::global().session_ended(end.outcome(), started.elapsed());
    let audit = sides.as_ref().map(|(up, down)| inspect::audit(up, down));
    if let Some(rec) = sides.as_mut().and_then(|(_, down)| down.take_recorder()) {
        // Incomplete too when the recording stopped early.
        let (state, label) = if Box::pin(rec.finish()).await.complete {
            (RecordingState::Complete, "complete")
        } else {
            (RecordingState::Incomplete, "incomplete")
        };
        crate::metrics::global().recording_finished(label);
        recording = Some(state);
    }
    let end_record = SessionEnd {
        ended_at: crate::now_unix(),
        bytes_to_client: counts.to_client,
        bytes_to_server: counts.to_server,
        reason: end.record(),
        audit,
        recording,
        ticket: if !r.single_use {
            TicketEnd::NoTicket
        } else if reconnect::is_drop(&end) && set.reconnect_grace > 0 {
            TicketEnd::ValidUntil(
                crate::now_unix().saturating_add(set.reconnect_grace.min(86_400) as i64),
            )
        } else {
            TicketEnd::Void
        },
    };
    if let Some(id) = session_id
        && let Err(e) = proxy.log.close_session(id, &end_record).await
    {
        tracing::warn!(error = %e, session = id, "could not record the session end; retrying");
        // The database may be back in a moment (a lock, a failover): try a
        // few more times in the background, bounded.
        let store = Arc::clone(&proxy.log);
        let record = end_record.clone();
        tokio::spawn(async move {
            for delay in [1u64, 2, 4, 8, 16] {
                tokio::time::sleep(Duration::from_secs(delay)).await;
                if store.close_session(id, &record).await.is_ok() {
                    return;
                }
            }
            tracing::warn!(
                session = id,
                "gave up recording the session end; the row is closed when the node restarts"
            );
        });
    }
    tracing::info!(
        session = session_id, vm_id = r.vm_id, user = %r.user_name, %client,
        node = %proxy.settings.node, duration_ms = started.elapsed().as_millis() as u64,
        bytes_to_client = counts.to_client, bytes_to_server = counts.to_server,
        key_events = audit.map(|a| a.key_events),
        pointer_events = audit.map(|a| a.pointer_events),
        reason = %end_record.reason, "console session ended"
    );
    // Unregistered only once the end is recorded, so a draining server that
    // waits for its sessions to go also waits for their records.
    drop(registration);
}

/// The end recorded for a session turned away after its row was opened.
fn refused_end(why: &str, recording: Option<RecordingState>) -> SessionEnd {
    SessionEnd {
        ended_at: crate::now_unix(),
        bytes_to_client: 0,
        bytes_to_server: 0,
        reason: format!("recording could not start: {why}"),
        audit: None,
        recording,
        ticket: TicketEnd::Void,
    }
}

/// Starts the session's recording: the file is named by the session id
/// alone, so a session without a row cannot be recorded.
fn start_recording(
    proxy: &Proxy,
    r: &Redemption,
    session_id: Option<i64>,
    client: SocketAddr,
    started_at: i64,
) -> Result<crate::recording::Recorder, String> {
    let set = &proxy.settings.recording;
    let dir = set
        .dir
        .as_deref()
        .ok_or("no [recording] dir is set on this node")?;
    let id = session_id.ok_or("the session row could not be written")?;
    let header = crate::recording::Header {
        version: 1,
        session_id: id,
        vm_id: r.vm_id,
        user: r.user_name.clone(),
        node: proxy.settings.node.clone(),
        client_addr: client.to_string(),
        started_at,
        started_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
    };
    crate::recording::Recorder::start(dir, &header, set.queue_bytes).map_err(|e| e.to_string())
}

/// Sends what each side sent past the handshake through the session's
/// rules, and records the handshake the browser saw.
async fn first_bytes(
    left: &handshake::Leftovers,
    up: &mut inspect::Upstream,
    down: &mut inspect::Downstream,
    writer: &mut WsWriter,
    tcp_tx: &mut tokio::net::tcp::OwnedWriteHalf,
    counts: &mut Counts,
) -> Result<(), End> {
    down.record_sent(&left.sent_to_client)?;
    let to_server = up.pass(&left.to_server)?;
    if !to_server.is_empty() {
        tcp_tx
            .write_all(to_server)
            .await
            .map_err(|e| End::ServerError(e.to_string()))?;
        counts.to_server += to_server.len() as u64;
    }
    let to_client = down.pass(&left.to_client)?;
    if !to_client.is_empty() {
        writer
            .send_binary(to_client)
            .await
            .map_err(|_| End::ClientLost)?;
        counts.to_client += to_client.len() as u64;
    }
    Ok(())
}
