//! SPICE consoles: every channel is its own connection (a WebSocket from
//! spice-html5, or a CONNECT tunnel from remote-viewer), linked through the
//! sans-IO link proxy ([`crate::spice::link`]) so the SPICE password stays
//! with the broker.
//!
//! The main channel is the console: it takes a single-use token's one use,
//! is registered and limited like a VNC session, and writes the session
//! row, with the session id the server gave it. Every other channel must
//! bring the same token and that session id, found in the store (so it may
//! land on another node); it is registered as part of that session, ends
//! with its revocation, and adds its bytes to the row.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::relay::{self, Counts, End, Filter};
use super::sessions::{self, Registration};
use super::{Io, Proxy, Refusal, WsReader, WsWriter, enforce};
use crate::protocol::Protocol;
use crate::spice::link::{Framing, LinkError, LinkProxy, Phase};
use crate::spice::main_channel::{MainFilter, Rules, Side};
use crate::spice::wire::{LinkMess, channel, link_err};
use crate::store::{NewSession, Opened, Redemption, SessionEnd, TicketEnd};
use crate::websocket::frame::OpCode;
use crate::websocket::stream::{Event, ReadError};

/// The client side of one channel connection.
pub enum Client {
    /// A WebSocket (spice-html5): each message one frame.
    WebSocket(WsReader, WsWriter),
    /// A CONNECT tunnel (remote-viewer): a plain byte stream.
    Tunnel(Io),
}

/// How a link stopped short.
enum Stop {
    Refuse(Refusal),
    /// The client went away: there is nobody to tell.
    ClientGone,
}

impl From<Refusal> for Stop {
    fn from(r: Refusal) -> Stop {
        Stop::Refuse(r)
    }
}

impl From<LinkError> for Stop {
    fn from(e: LinkError) -> Stop {
        Stop::Refuse(Refusal::Spice(e))
    }
}

/// What the client sent next during the link.
enum Got {
    Data { message_end: bool },
    Ping(Vec<u8>),
}

impl Client {
    fn framing(&self) -> Framing {
        match self {
            Client::WebSocket(..) => Framing::Messages,
            Client::Tunnel(_) => Framing::Stream,
        }
    }

    /// The next bytes from the client, appended to `buf`. Cancel-safe: it
    /// writes nothing.
    async fn next(&mut self, buf: &mut Vec<u8>) -> Result<Got, Stop> {
        match self {
            Client::WebSocket(reader, _) => match reader.next().await {
                Ok(Event::Data(d)) => {
                    buf.extend_from_slice(d);
                    Ok(Got::Data {
                        message_end: reader.at_frame_end(),
                    })
                }
                Ok(Event::Ping(p)) => Ok(Got::Ping(p.to_vec())),
                Ok(Event::Pong) => Ok(Got::Data { message_end: false }),
                Ok(Event::Text) => {
                    Err(Refusal::Handshake(super::handshake::HandshakeError::TextFrame).into())
                }
                Ok(Event::Close(_)) | Err(ReadError::Eof | ReadError::Io(_)) => {
                    Err(Stop::ClientGone)
                }
                Err(ReadError::Frame(e)) => Err(Refusal::Handshake(
                    super::handshake::HandshakeError::ClientProtocol {
                        code: e.close_code(),
                        detail: e.to_string(),
                    },
                )
                .into()),
                Err(ReadError::BadClose) => Err(Stop::ClientGone),
            },
            Client::Tunnel(io) => {
                let mut chunk = [0u8; 4096];
                match io.read(&mut chunk).await {
                    Ok(0) | Err(_) => Err(Stop::ClientGone),
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        Ok(Got::Data { message_end: false })
                    }
                }
            }
        }
    }

    async fn send(&mut self, data: &[u8]) -> Result<(), Stop> {
        if data.is_empty() {
            return Ok(());
        }
        let sent = match self {
            Client::WebSocket(_, writer) => writer.send_binary(data).await,
            Client::Tunnel(io) => io.write_all(data).await,
        };
        sent.map_err(|_| Stop::ClientGone)
    }

    async fn pong(&mut self, payload: &[u8]) -> Result<(), Stop> {
        if let Client::WebSocket(_, writer) = self {
            writer
                .send(OpCode::Pong, payload)
                .await
                .map_err(|_| Stop::ClientGone)?;
        }
        Ok(())
    }

    /// Ends the connection with `code` and `reason` (a WebSocket's close
    /// frame; a tunnel just closes).
    async fn close(self, code: u16, reason: &str) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async move {
            match self {
                Client::WebSocket(_, mut writer) => {
                    let _ = writer.close(code, reason).await;
                    let _ = writer.shutdown().await;
                }
                Client::Tunnel(mut io) => {
                    let _ = io.shutdown().await;
                }
            }
        })
        .await;
    }
}

/// Runs one channel connection of a SPICE console whose token `r` has been
/// redeemed.
pub async fn channel(proxy: &Proxy, mut client: Client, r: Redemption, addr: SocketAddr) {
    let mut link = LinkProxy::new(r.vnc_password.clone(), client.framing());
    let asked = match tokio::time::timeout(
        proxy.settings.handshake_timeout,
        client_link(&mut client, &mut link),
    )
    .await
    {
        Ok(Ok(asked)) => asked,
        Ok(Err(stop)) => {
            return turn_away(client, link.take_to_client(), stop, "unknown", addr).await;
        }
        Err(_) => {
            let stop = Stop::Refuse(Refusal::Spice(LinkError::Timeout));
            return turn_away(client, link.take_to_client(), stop, "unknown", addr).await;
        }
    };
    let name = channel::name(asked.channel_type);
    let admitted = if asked.channel_type == channel::MAIN {
        admit_main(proxy, &r, &asked).await
    } else {
        admit_joining(proxy, &r, &asked).await
    };
    let (registration, joins) = match admitted {
        Ok(a) => a,
        Err((code, refusal)) => {
            link.refuse(code);
            return turn_away(
                client,
                link.take_to_client(),
                Stop::Refuse(refusal),
                name,
                addr,
            )
            .await;
        }
    };
    link.admit();
    let mut stop = registration.stop.clone();
    let linked = tokio::select! {
        biased;
        why = sessions::stopped(&mut stop) => Err(Stop::Refuse(Refusal::Stopped(why))),
        linked = tokio::time::timeout(
            proxy.settings.handshake_timeout,
            server_link(proxy, &mut client, &mut link, &r),
        ) => linked.unwrap_or(Err(Stop::Refuse(Refusal::Spice(LinkError::Timeout)))),
    };
    let tcp = match linked {
        Ok(tcp) => tcp,
        Err(stop) => return turn_away(client, link.take_to_client(), stop, name, addr).await,
    };
    let Some(done) = link.finish() else {
        return;
    };
    crate::metrics::global().spice_channel(name, "linked");
    match joins {
        None => Box::pin(run_main(proxy, client, tcp, done, r, registration, addr)).await,
        Some(session_id) => {
            Box::pin(run_joined(
                proxy,
                client,
                tcp,
                done,
                r,
                registration,
                session_id,
                addr,
            ))
            .await
        }
    }
}

/// Reads the client's link message.
async fn client_link(client: &mut Client, link: &mut LinkProxy) -> Result<LinkMess, Stop> {
    let mut buf = Vec::new();
    loop {
        if let Phase::Asked(asked) = link.phase() {
            return Ok(asked.clone());
        }
        buf.clear();
        match client.next(&mut buf).await? {
            Got::Data { message_end } => link.feed_client(&buf, message_end)?,
            Got::Ping(p) => client.pong(&p).await?,
        }
    }
}

/// A refused channel: the link error it gets, and the close reason.
type Turned = (u32, Refusal);

/// The main channel takes the token's use and is registered as a session.
async fn admit_main(
    proxy: &Proxy,
    r: &Redemption,
    asked: &LinkMess,
) -> Result<(Registration, Option<i64>), Turned> {
    if asked.connection_id != 0 {
        return Err((
            link_err::BAD_CONNECTION_ID,
            Refusal::SpiceChannel(
                "a SPICE main channel cannot rejoin a session: open the console again",
            ),
        ));
    }
    // Registered first: a console the limits turn away leaves a single-use
    // token unused.
    let registration = proxy
        .sessions
        .register(super::entry(r))
        .map_err(|hit| (link_err::ERROR, Refusal::TooMany(hit)))?;
    match proxy
        .tokens
        .claim_main_channel(r.token_id, crate::now_unix())
        .await
    {
        Ok(true) => {}
        Ok(false) => return Err((link_err::PERMISSION_DENIED, Refusal::BadToken)),
        Err(e) => return Err((link_err::ERROR, Refusal::StoreDown(e.to_string()))),
    }
    enforce::catch_up(proxy.tokens.as_ref(), &registration, None).await;
    Ok((registration, None))
}

/// Another channel joins the live session of its token whose server gave
/// it `connection_id`, if the session's rules let it open.
async fn admit_joining(
    proxy: &Proxy,
    r: &Redemption,
    asked: &LinkMess,
) -> Result<(Registration, Option<i64>), Turned> {
    if !crate::spice::channel_allowed(asked.channel_type, &r.policy) {
        let why = match asked.channel_type {
            _ if r.policy.view_only => "channel not available: this console link is view only",
            channel::USBREDIR | channel::SMARTCARD | channel::WEBDAV => {
                "channel not available: this VM does not take the client's devices"
            }
            channel::RECORD => "channel not available: this VM does not take the microphone",
            _ => "channel not available",
        };
        return Err((link_err::CHANNEL_NOT_AVAILABLE, Refusal::SpiceChannel(why)));
    }
    let no_session = || {
        (
            link_err::BAD_CONNECTION_ID,
            Refusal::SpiceChannel("no live console session of this link for this channel"),
        )
    };
    if asked.connection_id == 0 {
        return Err(no_session());
    }
    let session_id = match proxy
        .log
        .spice_session(r.token_id, asked.connection_id)
        .await
    {
        Ok(Some(id)) => id,
        Ok(None) => return Err(no_session()),
        Err(e) => return Err((link_err::ERROR, Refusal::StoreDown(e.to_string()))),
    };
    let registration = proxy
        .sessions
        .register_channel(super::entry(r), session_id)
        .map_err(|hit| (link_err::ERROR, Refusal::TooMany(hit)))?;
    enforce::catch_up(proxy.tokens.as_ref(), &registration, Some(session_id)).await;
    Ok((registration, Some(session_id)))
}

/// Connects to the server and runs the link to its result.
async fn server_link(
    proxy: &Proxy,
    client: &mut Client,
    link: &mut LinkProxy,
    r: &Redemption,
) -> Result<TcpStream, Stop> {
    let mut tcp = super::connect_target(proxy, r).await?;
    let mut from_server = vec![0u8; 4096];
    let mut from_client = Vec::new();
    loop {
        let out = link.take_to_server();
        if !out.is_empty() {
            tcp.write_all(&out)
                .await
                .map_err(|e| Refusal::Unreachable(e.to_string()))?;
        }
        client.send(&link.take_to_client()).await?;
        if *link.phase() == Phase::Linked {
            return Ok(tcp);
        }
        from_client.clear();
        tokio::select! {
            read = tcp.read(&mut from_server) => match read {
                Ok(0) => return Err(Refusal::Unreachable(
                    "the SPICE server closed the connection during the link".into()).into()),
                Ok(n) => link.feed_server(&from_server[..n])?,
                Err(e) => return Err(Refusal::Unreachable(e.to_string()).into()),
            },
            got = client.next(&mut from_client) => match got? {
                Got::Data { message_end } => link.feed_client(&from_client, message_end)?,
                Got::Ping(p) => client.pong(&p).await?,
            },
        }
    }
}

/// Tells the client why its channel goes no further: `pending`, the link's
/// own answer (a server's refusal, an error reply), then the close.
async fn turn_away(
    mut client: Client,
    pending: Vec<u8>,
    stop: Stop,
    name: &'static str,
    addr: SocketAddr,
) {
    let Stop::Refuse(refusal) = stop else {
        tracing::debug!(client = %addr, channel = name, "SPICE client went away during the link");
        return;
    };
    crate::metrics::global().refused(refusal.metric());
    crate::metrics::global().spice_channel(name, "refused");
    let (code, reason) = refusal.close();
    tracing::info!(
        client = %addr, channel = name, code, detail = %refusal.detail(),
        "SPICE channel refused"
    );
    let _ = client.send(&pending).await;
    client.close(code, &reason).await;
}

/// One direction of the main channel, as the relay passes it.
struct MainSide {
    filter: MainFilter,
    out: Vec<u8>,
}

impl MainSide {
    fn new(side: Side, agent: bool, mini: bool) -> MainSide {
        MainSide {
            filter: MainFilter::new(side, Rules { agent }, mini),
            out: Vec::new(),
        }
    }
}

impl Filter for MainSide {
    fn pass<'a>(&'a mut self, data: &'a [u8]) -> Result<&'a [u8], End> {
        self.out.clear();
        if self.filter.filter(data, &mut self.out) {
            return Ok(data);
        }
        Ok(&self.out)
    }
}

/// The main channel: reads the session id, records the session, relays
/// through the main channel's filter, and records the end.
async fn run_main(
    proxy: &Proxy,
    mut client: Client,
    mut tcp: TcpStream,
    done: crate::spice::link::Linked,
    r: Redemption,
    mut registration: Registration,
    addr: SocketAddr,
) {
    let started = std::time::Instant::now();
    let started_at = crate::now_unix();
    let policy = r.policy;
    let mini = done.mini_header;
    // Agent data carries the clipboard, file transfers and display changes:
    // it goes only where the rules let text go, and never from a viewer.
    let mut up = MainSide::new(
        Side::FromClient,
        !policy.view_only && policy.clipboard.to_vm(),
        mini,
    );
    let mut down = MainSide::new(Side::FromServer, policy.clipboard.from_vm(), mini);
    let mut counts = Counts::default();
    // Up to MAIN_INIT, which names the session.
    let first = tokio::time::timeout(
        proxy.settings.handshake_timeout,
        until_session_id(
            &mut client,
            &mut tcp,
            &mut down,
            &done.to_client,
            &mut counts,
        ),
    )
    .await;
    let (spice_session_id, held) = match first {
        Ok(Ok(first)) => first,
        Ok(Err(stop)) => {
            return turn_away(client, Vec::new(), stop, "main", addr).await;
        }
        Err(_) => {
            let stop = Stop::Refuse(Refusal::Spice(LinkError::Timeout));
            return turn_away(client, Vec::new(), stop, "main", addr).await;
        }
    };
    if policy.record {
        if proxy.settings.recording.required {
            let why = "SPICE sessions cannot be recorded".to_string();
            crate::metrics::global().recording_finished("failed");
            let stop = Stop::Refuse(Refusal::RecordingUnavailable(why));
            return turn_away(client, Vec::new(), stop, "main", addr).await;
        }
        tracing::warn!(
            vm_id = r.vm_id,
            "SPICE session not recorded (only VNC sessions are); it goes on"
        );
    }
    let record = NewSession {
        token_id: r.token_id,
        vm_id: r.vm_id,
        user_name: r.user_name.clone(),
        client_addr: addr.to_string(),
        node: proxy.settings.node.clone(),
        started_at,
        view_only: policy.view_only,
        exclusive: policy.exclusive,
        recording: false,
        resumed_from: None,
        protocol: Protocol::Spice,
        spice_session_id: Some(spice_session_id),
    };
    let session_id = match proxy.log.open_session(&record).await {
        Ok(Opened::Session(id)) => id,
        Ok(Opened::ControlTaken) => {
            let stop = Stop::Refuse(Refusal::ControlTaken);
            return turn_away(client, Vec::new(), stop, "main", addr).await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not record the session start; console refused");
            let stop = Stop::Refuse(Refusal::StoreDown(e.to_string()));
            return turn_away(client, Vec::new(), stop, "main", addr).await;
        }
    };
    crate::metrics::global().session_started(Protocol::Spice);
    tracing::info!(
        session = session_id, vm_id = r.vm_id, user = %r.user_name, client = %addr,
        node = %proxy.settings.node, view_only = policy.view_only, protocol = "spice",
        "console session started"
    );
    enforce::catch_up(proxy.tokens.as_ref(), &registration, Some(session_id)).await;
    let end = match client.send(&held).await {
        Ok(()) => {
            counts.to_client += held.len() as u64;
            relay_channel(
                client,
                tcp,
                done.to_server,
                Some((&mut up, &mut down)),
                &mut registration,
                super::session_timers(&proxy.settings, &r, started_at, proxy.settings.idle_timeout),
                &mut counts,
            )
            .await
        }
        Err(_) => End::ClientLost,
    };
    crate::metrics::global().session_ended(end.outcome(), started.elapsed());
    let dropped = up.filter.dropped() + down.filter.dropped();
    let end_record = SessionEnd {
        ended_at: crate::now_unix(),
        bytes_to_client: counts.to_client,
        bytes_to_server: counts.to_server,
        reason: end.record(),
        audit: None,
        recording: None,
        ticket: if r.single_use {
            TicketEnd::Void
        } else {
            TicketEnd::NoTicket
        },
    };
    if let Err(e) = proxy.log.close_session(session_id, &end_record).await {
        tracing::warn!(error = %e, session = session_id, "could not record the session end");
    }
    tracing::info!(
        session = session_id, vm_id = r.vm_id, user = %r.user_name, client = %addr,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_to_client = counts.to_client, bytes_to_server = counts.to_server,
        messages_dropped = dropped, reason = %end_record.reason, protocol = "spice",
        "console session ended"
    );
    drop(registration);
}

/// Relays the server's first messages through the main channel's filter
/// until MAIN_INIT names the session; the bytes that carry MAIN_INIT are
/// returned, not sent, so that the client learns the session id only once
/// the session is recorded and its other channels can join it.
async fn until_session_id(
    client: &mut Client,
    tcp: &mut TcpStream,
    down: &mut MainSide,
    first: &[u8],
    counts: &mut Counts,
) -> Result<(u32, Vec<u8>), Stop> {
    let mut buf = vec![0u8; 8192];
    let mut data = first.to_vec();
    loop {
        let out = down.pass(&data).map_err(|_| Stop::ClientGone)?.to_vec();
        if let Some(id) = down.filter.session_id() {
            return Ok((id, out));
        }
        client.send(&out).await?;
        counts.to_client += out.len() as u64;
        let n = match tcp.read(&mut buf).await {
            Ok(0) => {
                return Err(Refusal::Unreachable(
                    "the SPICE server closed the main channel before MAIN_INIT".into(),
                )
                .into());
            }
            Ok(n) => n,
            Err(e) => return Err(Refusal::Unreachable(e.to_string()).into()),
        };
        data.clear();
        data.extend_from_slice(&buf[..n]);
    }
}

/// Another channel of a live session: relayed as it is, and its bytes
/// added to the session's row when it ends.
#[allow(clippy::too_many_arguments)]
async fn run_joined(
    proxy: &Proxy,
    mut client: Client,
    tcp: TcpStream,
    done: crate::spice::link::Linked,
    r: Redemption,
    mut registration: Registration,
    session_id: i64,
    addr: SocketAddr,
) {
    let kind = channel::name(done.link.channel_type);
    let mut counts = Counts::default();
    if client.send(&done.to_client).await.is_err() {
        return;
    }
    counts.to_client += done.to_client.len() as u64;
    tracing::debug!(session = session_id, channel = kind, client = %addr, "SPICE channel joined");
    let end = relay_channel::<MainSide, MainSide>(
        client,
        tcp,
        done.to_server,
        None,
        &mut registration,
        super::session_timers(&proxy.settings, &r, crate::now_unix(), None),
        &mut counts,
    )
    .await;
    if let Err(e) = proxy
        .log
        .add_channel(session_id, true, counts.to_client, counts.to_server)
        .await
    {
        tracing::warn!(error = %e, session = session_id, "could not record a SPICE channel's bytes");
    }
    tracing::debug!(
        session = session_id, channel = kind, reason = %end.record(),
        "SPICE channel ended"
    );
    drop(registration);
}

/// Relays a linked channel until either side ends it or the broker does,
/// and closes the client with the end's code.
#[allow(clippy::too_many_arguments)]
async fn relay_channel<U: Filter, D: Filter>(
    client: Client,
    tcp: TcpStream,
    early: Vec<u8>,
    sides: Option<(&mut U, &mut D)>,
    registration: &mut Registration,
    timers: relay::Timers,
    counts: &mut Counts,
) -> End {
    let (mut tcp_rx, mut tcp_tx) = tcp.into_split();
    let (mut up, mut down) = match sides {
        Some((u, d)) => (Some(u), Some(d)),
        None => (None, None),
    };
    if !early.is_empty() {
        let data = match up.as_deref_mut() {
            Some(u) => match u.pass(&early) {
                Ok(d) => d.to_vec(),
                Err(end) => return end,
            },
            None => early,
        };
        if let Err(e) = tcp_tx.write_all(&data).await {
            return End::ServerError(e.to_string());
        }
        counts.to_server += data.len() as u64;
    }
    let sides = match (up, down.take()) {
        (Some(u), Some(d)) => Some((u, d)),
        _ => None,
    };
    match client {
        Client::WebSocket(mut reader, writer) => {
            let writer = tokio::sync::Mutex::new(writer);
            let end = relay::run(
                &mut reader,
                &writer,
                &mut tcp_rx,
                &mut tcp_tx,
                &mut registration.stop,
                timers,
                counts,
                sides,
            )
            .await;
            let (code, reason) = match end {
                End::ServerClosed => (
                    super::close::NORMAL,
                    "the SPICE server closed the channel".into(),
                ),
                _ => end.close(),
            };
            let client = Client::WebSocket(reader, writer.into_inner());
            client.close(code, &reason).await;
            let _ = tcp_tx.shutdown().await;
            end
        }
        Client::Tunnel(io) => {
            let (rd, wr) = tokio::io::split(io);
            let end = tunnel(
                rd,
                wr,
                &mut tcp_rx,
                &mut tcp_tx,
                &mut registration.stop,
                timers,
                counts,
                sides,
            )
            .await;
            let _ = tcp_tx.shutdown().await;
            end
        }
    }
}

/// The relay for a CONNECT tunnel: bytes both ways, through the filters,
/// until a side closes, the broker ends the session or its deadline comes.
#[allow(clippy::too_many_arguments)]
async fn tunnel<U: Filter, D: Filter>(
    mut rd: ReadHalf<Io>,
    mut wr: WriteHalf<Io>,
    tcp_rx: &mut tokio::net::tcp::OwnedReadHalf,
    tcp_tx: &mut tokio::net::tcp::OwnedWriteHalf,
    stop: &mut tokio::sync::watch::Receiver<Option<sessions::Stop>>,
    timers: relay::Timers,
    counts: &mut Counts,
    mut sides: Option<(&mut U, &mut D)>,
) -> End {
    let mut from_client = vec![0u8; 16 * 1024];
    let mut from_server = vec![0u8; 64 * 1024];
    let deadline = timers.deadline;
    let end = loop {
        let until = async {
            match deadline {
                Some((at, why)) => {
                    tokio::time::sleep_until(at).await;
                    why
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            why = sessions::stopped(stop) => break End::Stopped(why),
            why = until => break match why {
                relay::Deadline::MaxDuration => End::MaxDuration,
                relay::Deadline::TokenExpiry => End::TokenExpired,
            },
            read = rd.read(&mut from_client) => {
                let n = match read {
                    Ok(0) => break End::ClientClosed,
                    Ok(n) => n,
                    Err(_) => break End::ClientLost,
                };
                let data = match sides.as_mut() {
                    Some((u, _)) => match u.pass(&from_client[..n]) {
                        Ok(d) => d,
                        Err(end) => break end,
                    },
                    None => &from_client[..n],
                };
                if let Err(e) = tcp_tx.write_all(data).await {
                    break End::ServerError(e.to_string());
                }
                counts.to_server += data.len() as u64;
                crate::metrics::global().bytes_to_server(data.len());
            }
            read = tcp_rx.read(&mut from_server) => {
                let n = match read {
                    Ok(0) => break End::ServerClosed,
                    Ok(n) => n,
                    Err(e) => break End::ServerError(e.to_string()),
                };
                let data = match sides.as_mut() {
                    Some((_, d)) => match d.pass(&from_server[..n]) {
                        Ok(d) => d,
                        Err(end) => break end,
                    },
                    None => &from_server[..n],
                };
                if wr.write_all(data).await.is_err() {
                    break End::ClientLost;
                }
                counts.to_client += data.len() as u64;
                crate::metrics::global().bytes_to_client(data.len());
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), wr.shutdown()).await;
    end
}
