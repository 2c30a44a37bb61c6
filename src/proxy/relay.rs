//! The relay loop: VNC server bytes out as binary WebSocket frames, browser
//! frames' payloads in as bytes.
//!
//! Each direction is its own loop and awaits its write before reading
//! again, so a slow reader on either side stops reads on the other
//! (backpressure) and no queue grows. Large buffers are lent to a session
//! only while its bytes flow (see [`crate::websocket::pool`]); nothing is
//! allocated per message: payloads are unmasked in place and written with
//! their frame header in one vectored write.
//!
//! The session's limits (idle, ping answers, maximum length, token expiry)
//! are checked in a loop that never touches the connection to the browser:
//! a browser that stops reading holds the writer in a blocked write, and
//! must still be ended on time. Pings are sent from a loop of their own,
//! and every write to the browser has a deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Mutex, Notify, watch};
use tokio::time::Instant;

use super::inspect::Broken;
use super::sessions::Stop;
use crate::metrics::SessionOutcome;
use crate::websocket::frame::OpCode;
use crate::websocket::pool::Lent;
use crate::websocket::stream::{Event, ReadError, Reader, Writer};

/// How a relay ended. Each maps to one close code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The browser closed the WebSocket.
    ClientClosed,
    /// The browser's connection went away without a close: a network drop,
    /// a killed tab. Its console may reconnect.
    ClientLost,
    /// The VNC server closed its connection.
    ServerClosed,
    /// The browser sent a text frame; only binary is spoken here.
    TextFrame,
    /// The browser broke the WebSocket protocol; the close code to send.
    ClientProtocol { code: u16, detail: String },
    /// Reading from or writing to the VNC server failed.
    ServerError(String),
    /// The broker ended the session.
    Stopped(Stop),
    /// No byte either way for the idle timeout.
    Idle,
    /// The browser stopped answering pings.
    PongTimeout,
    /// The session reached its maximum length.
    MaxDuration,
    /// The session's token expired (with end_at_token_expiry).
    TokenExpired,
    /// A write to the browser did not finish within the write timeout:
    /// the browser stopped reading.
    WriteTimeout,
    /// The browser sent an RFB message the proxy could not follow.
    ClientRfb(String),
    /// The VNC server sent an RFB message the proxy could not follow.
    ServerRfb(String),
    /// A required recording could not be written.
    RecordingFailed(String),
}

impl End {
    /// The `outcome` label this end counts under.
    pub fn outcome(&self) -> SessionOutcome {
        use crate::inventory::Lapse;
        match self {
            End::ClientClosed => SessionOutcome::ClientClosed,
            End::ClientLost => SessionOutcome::ClientLost,
            End::ServerClosed => SessionOutcome::ServerClosed,
            End::TextFrame | End::ClientProtocol { .. } | End::ClientRfb(_) => {
                SessionOutcome::ClientProtocolError
            }
            End::ServerRfb(_) => SessionOutcome::ServerProtocolError,
            End::RecordingFailed(_) => SessionOutcome::RecordingFailed,
            End::ServerError(_) => SessionOutcome::ServerError,
            End::Stopped(Stop::Revoked(_)) => SessionOutcome::Revoked,
            End::Stopped(Stop::Lapsed(Lapse::AccessLost | Lapse::CredentialRejected)) => {
                SessionOutcome::AccessWithdrawn
            }
            End::Stopped(Stop::Lapsed(Lapse::VmGone | Lapse::VmStopped)) => SessionOutcome::VmGone,
            End::Stopped(Stop::Lapsed(Lapse::VmMoved)) => SessionOutcome::VmMoved,
            End::Stopped(Stop::StoreDown) => SessionOutcome::StoreUnavailable,
            End::Stopped(Stop::Shutdown) => SessionOutcome::Shutdown,
            End::Idle => SessionOutcome::Idle,
            End::PongTimeout | End::WriteTimeout => SessionOutcome::ClientUnresponsive,
            End::MaxDuration => SessionOutcome::TimeLimit,
            End::TokenExpired => SessionOutcome::TokenExpired,
        }
    }
}

/// Per-session timers. All optional; with none set a session lives until a
/// side closes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timers {
    pub idle: Option<Duration>,
    pub ping_every: Option<Duration>,
    pub pong_timeout: Duration,
    /// How long one write to the browser may take.
    pub write_timeout: Option<Duration>,
    /// When the session must end, and why.
    pub deadline: Option<(Instant, Deadline)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    MaxDuration,
    TokenExpiry,
}

/// What a session whose messages are followed does with one direction's
/// bytes: the RFB rules ([`super::inspect`]) or SPICE's main channel.
pub trait Filter {
    /// What goes on for `data` (possibly nothing, or more than came).
    fn pass<'a>(&'a mut self, data: &'a [u8]) -> Result<&'a [u8], End>;
}

/// Bytes relayed in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub to_client: u64,
    pub to_server: u64,
}

/// A write to the browser, under the write timeout: `Err` with how the
/// session ends if it fails or does not finish in time.
async fn write_to_client<'w, W, F>(
    writer: &'w Mutex<Writer<W>>,
    limit: Option<Duration>,
    write: impl FnOnce(tokio::sync::MutexGuard<'w, Writer<W>>) -> F,
) -> Result<(), End>
where
    W: AsyncWrite + Unpin,
    F: std::future::Future<Output = std::io::Result<()>>,
{
    let op = async { write(writer.lock().await).await };
    let done = match limit {
        Some(limit) => tokio::time::timeout(limit, op)
            .await
            .map_err(|_| End::WriteTimeout)?,
        None => op.await,
    };
    done.map_err(|_| End::ClientLost)
}

/// [`write_to_client`], boxed: the session's future then holds only a
/// pointer for a write that is not under way, and an idle session stays
/// small.
fn boxed_write<'w, W, F>(
    writer: &'w Mutex<Writer<W>>,
    limit: Option<Duration>,
    write: impl FnOnce(tokio::sync::MutexGuard<'w, Writer<W>>) -> F + 'w,
) -> std::pin::Pin<Box<impl std::future::Future<Output = Result<(), End>> + 'w>>
where
    W: AsyncWrite + Unpin,
    F: std::future::Future<Output = std::io::Result<()>> + 'w,
{
    Box::pin(write_to_client(writer, limit, write))
}

impl From<Broken> for End {
    fn from(b: Broken) -> End {
        match b {
            Broken::Client(e) => End::ClientRfb(e.to_string()),
            Broken::Server(e) => End::ServerRfb(e.to_string()),
            Broken::Recording(e) => End::RecordingFailed(e.to_string()),
        }
    }
}

/// Relays until either side ends, `stop` fires or a timer runs out. With
/// `inspect`, each side's bytes go through it; without, they pass as they
/// are.
#[allow(clippy::too_many_arguments)]
pub async fn run<R, W, U, D>(
    reader: &mut Reader<R>,
    writer: &Mutex<Writer<W>>,
    tcp_rx: &mut OwnedReadHalf,
    tcp_tx: &mut OwnedWriteHalf,
    stop: &mut watch::Receiver<Option<Stop>>,
    timers: Timers,
    counts: &mut Counts,
    inspect: Option<(&mut U, &mut D)>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    U: Filter,
    D: Filter,
{
    let Counts {
        to_client,
        to_server,
    } = counts;
    // Milliseconds since `start` of the last byte either way, and of the
    // last sign of life from the browser.
    let start = Instant::now();
    let since = move || start.elapsed().as_millis() as u64;
    let active = AtomicU64::new(0);
    let alive = AtomicU64::new(0);
    let ping_due = Notify::new();
    let write_limit = timers.write_timeout;
    let (mut upstream, mut downstream) = match inspect {
        Some((u, d)) => (Some(u), Some(d)),
        None => (None, None),
    };
    let down = async {
        loop {
            if let Err(e) = tcp_rx.readable().await {
                return End::ServerError(e.to_string());
            }
            // Lent while the server is sending, back as soon as it pauses:
            // an idle session holds no download buffer.
            let mut buf = Lent::take();
            loop {
                match tcp_rx.try_read(&mut buf) {
                    Ok(0) => return End::ServerClosed,
                    Ok(n) => {
                        let data = match downstream.as_deref_mut() {
                            None => &buf[..n],
                            Some(d) => match d.pass(&buf[..n]) {
                                Ok(out) => out,
                                Err(end) => return end,
                            },
                        };
                        let n = data.len();
                        if n == 0 {
                            active.store(since(), Ordering::Relaxed);
                            continue;
                        }
                        if let Err(end) = boxed_write(writer, write_limit, |mut w| async move {
                            w.send_binary(data).await
                        })
                        .await
                        {
                            return end;
                        }
                        *to_client += n as u64;
                        crate::metrics::global().bytes_to_client(n);
                        active.store(since(), Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return End::ServerError(e.to_string()),
                }
            }
        }
    };
    let up = async {
        loop {
            let event = reader.next().await;
            alive.store(since(), Ordering::Relaxed);
            match event {
                Ok(Event::Data(data)) => {
                    active.store(since(), Ordering::Relaxed);
                    let data = match upstream.as_deref_mut() {
                        None => data,
                        Some(u) => match u.pass(data) {
                            Ok(out) => out,
                            Err(end) => return end,
                        },
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if let Err(e) = tcp_tx.write_all(data).await {
                        return End::ServerError(e.to_string());
                    }
                    *to_server += data.len() as u64;
                    crate::metrics::global().bytes_to_server(data.len());
                }
                Ok(Event::Ping(p)) => {
                    if let Err(end) = boxed_write(writer, write_limit, |mut w| async move {
                        w.send(OpCode::Pong, p).await
                    })
                    .await
                    {
                        return end;
                    }
                }
                Ok(Event::Pong) => {}
                Ok(Event::Close(_)) => return End::ClientClosed,
                Err(ReadError::Eof) | Err(ReadError::Io(_)) => return End::ClientLost,
                Ok(Event::Text) => return End::TextFrame,
                Err(ReadError::Frame(e)) => {
                    return End::ClientProtocol {
                        code: e.close_code(),
                        detail: e.to_string(),
                    };
                }
                Err(e @ ReadError::BadClose) => {
                    return End::ClientProtocol {
                        code: 1002,
                        detail: e.to_string(),
                    };
                }
            }
        }
    };
    let stopped = async { End::Stopped(super::sessions::stopped(stop).await) };
    // Sends the pings the watchdog asks for. A ping waits for a write in
    // progress (never jumping into the middle of a frame), under the write
    // timeout like every other write.
    let pinger = async {
        loop {
            ping_due.notified().await;
            if let Err(end) = boxed_write(writer, write_limit, |mut w| async move {
                w.send(OpCode::Ping, b"vncbroker").await
            })
            .await
            {
                return end;
            }
        }
    };
    // The session's limits. It never waits for the browser's connection,
    // so a browser that stops reading cannot stop these clocks.
    let watchdog = async {
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut next_ping = timers.ping_every.map(|p| start + p);
        loop {
            let now = Instant::now();
            if let Some((when, why)) = timers.deadline
                && now >= when
            {
                return match why {
                    Deadline::MaxDuration => End::MaxDuration,
                    Deadline::TokenExpiry => End::TokenExpired,
                };
            }
            let idle_at = timers.idle.map(|i| at(active.load(Ordering::Relaxed)) + i);
            if idle_at.is_some_and(|t| now >= t) {
                return End::Idle;
            }
            let dead_at = timers
                .ping_every
                .map(|_| at(alive.load(Ordering::Relaxed)) + timers.pong_timeout);
            if dead_at.is_some_and(|t| now >= t) {
                return End::PongTimeout;
            }
            if let (Some(due), Some(every)) = (next_ping, timers.ping_every)
                && now >= due
            {
                // At most one ping waits to be sent.
                ping_due.notify_one();
                next_ping = Some(now + every);
            }
            let wake = [timers.deadline.map(|d| d.0), idle_at, dead_at, next_ping]
                .into_iter()
                .flatten()
                .min();
            match wake {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending::<()>().await,
            }
        }
    };
    tokio::select! {
        end = down => end,
        end = up => end,
        end = stopped => end,
        end = watchdog => end,
        end = pinger => end,
    }
}
