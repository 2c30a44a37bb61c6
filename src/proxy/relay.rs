//! The relay loop: WebSocket binary messages one way, TCP bytes the other.
//!
//! Each direction is its own loop, and each awaits its write before reading
//! again, so a slow reader on either side stops the reads on the other side
//! (backpressure) and no queue grows. The read buffer is fixed per session.

use axum::extract::ws::{Message, WebSocket};
use bytes::BytesMut;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;

use super::sessions::Stop;

/// Largest chunk read from the VNC server into one WebSocket message.
pub const READ_CHUNK: usize = 64 * 1024;

/// How a relay ended. Each maps to one close code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The browser closed, or its connection went away.
    ClientClosed,
    /// The VNC server closed its connection.
    ServerClosed,
    /// The browser sent a text frame; only binary is spoken here.
    TextFrame,
    /// The WebSocket broke the protocol (bad frame, too large, ...).
    ClientProtocol(String),
    /// Reading from or writing to the VNC server failed.
    ServerError(String),
    /// The broker ended the session.
    Stopped(Stop),
}

/// Bytes relayed in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub to_client: u64,
    pub to_server: u64,
}

/// Relays until either side ends or `stop` fires. Returns the halves so the
/// caller can close them with a reason.
pub async fn run(
    ws_tx: &mut SplitSink<WebSocket, Message>,
    ws_rx: &mut SplitStream<WebSocket>,
    tcp_rx: &mut OwnedReadHalf,
    tcp_tx: &mut OwnedWriteHalf,
    stop: &mut watch::Receiver<Option<Stop>>,
    counts: &mut Counts,
) -> End {
    let Counts {
        to_client,
        to_server,
    } = counts;
    let down = async {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            buf.reserve(READ_CHUNK);
            match tcp_rx.read_buf(&mut buf).await {
                Ok(0) => return End::ServerClosed,
                Ok(n) => {
                    *to_client += n as u64;
                    let chunk = buf.split().freeze();
                    if ws_tx.send(Message::Binary(chunk)).await.is_err() {
                        return End::ClientClosed;
                    }
                }
                Err(e) => return End::ServerError(e.to_string()),
            }
        }
    };
    let up = async {
        loop {
            match ws_rx.next().await {
                None | Some(Ok(Message::Close(_))) => return End::ClientClosed,
                Some(Ok(Message::Binary(data))) => {
                    if let Err(e) = tcp_tx.write_all(&data).await {
                        return End::ServerError(e.to_string());
                    }
                    *to_server += data.len() as u64;
                }
                Some(Ok(Message::Text(_))) => return End::TextFrame,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Err(e)) => return client_error(e),
            }
        }
    };
    let stopped = async {
        loop {
            if let Some(why) = *stop.borrow_and_update() {
                return End::Stopped(why);
            }
            if stop.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    };
    tokio::select! {
        end = down => end,
        end = up => end,
        end = stopped => end,
    }
}

/// Sorts a WebSocket read error into "went away" or "broke the protocol".
pub fn client_error(e: axum::Error) -> End {
    let text = e.to_string();
    let gone = [
        "Connection reset",
        "Broken pipe",
        "closed normally",
        "Connection closed",
        "without closing handshake",
    ];
    if gone.iter().any(|g| text.contains(g)) {
        End::ClientClosed
    } else {
        End::ClientProtocol(text)
    }
}
