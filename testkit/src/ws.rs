//! A WebSocket client (tokio-tungstenite) that reads the binary messages as
//! one byte stream, as noVNC does.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::STEP;

#[derive(Debug, Default, Clone)]
pub struct WsOptions {
    /// Subprotocols to offer in `Sec-WebSocket-Protocol`.
    pub protocols: Vec<String>,
    /// A `Cookie` header.
    pub cookie: Option<String>,
    /// The address to connect from (another loopback address, say), if not
    /// the system's choice.
    pub from: Option<std::net::IpAddr>,
}

impl WsOptions {
    pub fn binary() -> WsOptions {
        WsOptions {
            protocols: vec!["binary".into()],
            ..WsOptions::default()
        }
    }
}

/// How a WebSocket read ended other than with data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEnd {
    /// A close frame (code, reason).
    Closed(u16, String),
    /// A close frame without a code.
    ClosedNoCode,
    /// The connection ended without a close frame.
    Eof,
    Timeout,
    Error(String),
    /// The RFB conversation went wrong (browser-side view).
    Rfb(String),
}

impl std::fmt::Display for WsEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

/// A WebSocket client that treats the binary messages as one byte stream,
/// as noVNC does, and keeps every byte it received.
pub struct Ws {
    pub stream: WebSocketStream<TcpStream>,
    /// The subprotocol the server selected, if any.
    pub protocol: Option<String>,
    buf: Vec<u8>,
    /// Every binary byte received so far.
    pub received: Vec<u8>,
    /// Every close reason received (for leak checks).
    pub close: Option<(u16, String)>,
}

impl Ws {
    pub async fn connect(port: u16, path_and_query: &str, opts: &WsOptions) -> Result<Ws, String> {
        let mut req = format!("ws://127.0.0.1:{port}{path_and_query}")
            .into_client_request()
            .map_err(|e| e.to_string())?;
        if !opts.protocols.is_empty() {
            req.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_str(&opts.protocols.join(", ")).unwrap(),
            );
        }
        if let Some(c) = &opts.cookie {
            req.headers_mut()
                .insert("Cookie", HeaderValue::from_str(c).unwrap());
        }
        let fut = async {
            let to = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let tcp = match opts.from {
                None => TcpStream::connect(to).await,
                Some(ip) => {
                    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
                    socket
                        .bind(std::net::SocketAddr::new(ip, 0))
                        .map_err(|e| format!("bind {ip}: {e}"))?;
                    socket.connect(to).await
                }
            }
            .map_err(|e| format!("connect: {e}"))?;
            tokio_tungstenite::client_async(req, tcp)
                .await
                .map_err(|e| format!("WebSocket handshake: {e}"))
        };
        let (stream, resp) = tokio::time::timeout(STEP, fut)
            .await
            .map_err(|_| "WebSocket upgrade timed out".to_string())??;
        let protocol = resp
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap_or("<non-ascii>").to_owned());
        Ok(Ws {
            stream,
            protocol,
            buf: Vec::new(),
            received: Vec::new(),
            close: None,
        })
    }

    /// Wraps a WebSocket opened some other way (on a socket with special
    /// options, say).
    pub fn from_stream(stream: WebSocketStream<TcpStream>, protocol: Option<String>) -> Ws {
        Ws {
            stream,
            protocol,
            buf: Vec::new(),
            received: Vec::new(),
            close: None,
        }
    }

    pub async fn send(&mut self, data: &[u8]) -> Result<(), WsEnd> {
        tokio::time::timeout(STEP, self.stream.send(Message::binary(data.to_vec())))
            .await
            .map_err(|_| WsEnd::Timeout)?
            .map_err(|e| WsEnd::Error(e.to_string()))
    }

    pub async fn send_text(&mut self, text: &str) -> Result<(), WsEnd> {
        tokio::time::timeout(STEP, self.stream.send(Message::text(text)))
            .await
            .map_err(|_| WsEnd::Timeout)?
            .map_err(|e| WsEnd::Error(e.to_string()))
    }

    /// Sends a normal close frame (1000).
    pub async fn close_normal(&mut self) {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        let _ = tokio::time::timeout(
            STEP,
            self.stream.close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            })),
        )
        .await;
    }

    /// The next message, as bytes appended to the buffer; `Err` when the
    /// connection ends.
    async fn fill(&mut self, deadline: Instant) -> Result<(), WsEnd> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = match tokio::time::timeout(left, self.stream.next()).await {
                Err(_) => return Err(WsEnd::Timeout),
                Ok(None) => return Err(self.end_without_frame()),
                Ok(Some(Err(e))) => {
                    use tokio_tungstenite::tungstenite::Error as E;
                    return Err(match e {
                        E::ConnectionClosed | E::AlreadyClosed => self.end_without_frame(),
                        E::Protocol(p) if p.to_string().contains("without closing handshake") => {
                            WsEnd::Eof
                        }
                        other => WsEnd::Error(other.to_string()),
                    });
                }
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Binary(b) => {
                    self.received.extend_from_slice(&b);
                    self.buf.extend_from_slice(&b);
                    return Ok(());
                }
                Message::Close(Some(f)) => {
                    let c = (u16::from(f.code), f.reason.to_string());
                    self.close = Some(c.clone());
                    return Err(WsEnd::Closed(c.0, c.1));
                }
                Message::Close(None) => return Err(WsEnd::ClosedNoCode),
                Message::Text(t) => {
                    return Err(WsEnd::Rfb(format!("unexpected text frame {t:?}")));
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    fn end_without_frame(&self) -> WsEnd {
        match &self.close {
            Some((c, r)) => WsEnd::Closed(*c, r.clone()),
            None => WsEnd::Eof,
        }
    }

    /// Exactly `n` bytes of the binary stream.
    pub async fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, WsEnd> {
        let deadline = Instant::now() + STEP;
        while self.buf.len() < n {
            self.fill(deadline).await?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads (and discards) binary data until the connection ends; returns
    /// how it ended. Panics on a timeout.
    pub async fn expect_end(&mut self, timeout: Duration) -> WsEnd {
        let deadline = Instant::now() + timeout;
        loop {
            match self.fill(deadline).await {
                Ok(()) => self.buf.clear(),
                Err(WsEnd::Timeout) => panic!("the connection did not end within {timeout:?}"),
                Err(end) => return end,
            }
        }
    }

    /// The close frame's code and reason; panics if the connection ends
    /// otherwise or not within `timeout`.
    pub async fn expect_close(&mut self, timeout: Duration) -> (u16, String) {
        match self.expect_end(timeout).await {
            WsEnd::Closed(code, reason) => (code, reason),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}
