//! Drives the RFB security proxy ([`crate::rfb::SecurityProxy`]) over the
//! two live connections until the VNC server has accepted the stored
//! password and the browser has been told "no authentication needed".

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::rfb::{RfbError, SecurityProxy};
use crate::websocket::frame::OpCode;
use crate::websocket::stream::{Event, ReadError, Reader, Writer};

/// Why the handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Rfb(#[from] RfbError),
    #[error("the browser went away during the VNC handshake")]
    ClientGone,
    #[error("the browser sent a text frame")]
    TextFrame,
    /// The browser broke the WebSocket protocol; the close code to send.
    #[error("WebSocket error during the VNC handshake: {detail}")]
    ClientProtocol { code: u16, detail: String },
    /// The browser's RFB bytes were not a valid handshake.
    #[error("the browser broke the RFB handshake: {0}")]
    ClientRfb(RfbError),
    #[error("the VNC server closed the connection during the handshake")]
    ServerClosed,
    #[error("VNC server I/O error during the handshake: {0}")]
    ServerIo(String),
}

/// What the handshake leaves to the relay: the bytes each side sent past
/// its end (ClientInit, ServerInit and on), and what the browser was sent.
#[derive(Debug, Default)]
pub struct Leftovers {
    pub to_server: Vec<u8>,
    pub to_client: Vec<u8>,
    /// The handshake as the browser received it, where `keep_sent` asked.
    pub sent_to_client: Vec<u8>,
}

/// Runs the handshake with `password`, or, without one, with a server that
/// asks for none. The bytes past its end are handed back, not forwarded:
/// the caller's relay is the first to see them.
pub async fn secure<R, W>(
    reader: &mut Reader<R>,
    writer: &mut Writer<W>,
    tcp: &mut TcpStream,
    password: Option<&str>,
    keep_sent: bool,
) -> Result<Leftovers, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut sp = match password {
        Some(p) => SecurityProxy::new(p.as_bytes().to_vec()),
        None => SecurityProxy::without_password(),
    };
    let mut buf = [0u8; 4096];
    let mut sent = Vec::new();
    loop {
        write_server(tcp, &sp.take_to_server()).await?;
        let out = sp.take_to_client();
        if keep_sent {
            sent.extend_from_slice(&out);
        }
        send_client(writer, &out).await?;
        if sp.is_done() {
            // The handshake's own output is out; what is left is what each
            // side sent past its end.
            let (to_server, to_client) = sp.take_leftovers();
            return Ok(Leftovers {
                to_server,
                to_client,
                sent_to_client: sent,
            });
        }
        let (want_server, want_client) = (sp.wants_server(), sp.wants_client());
        if !want_server && !want_client {
            return Err(RfbError::Protocol("handshake stalled").into());
        }
        let fed = tokio::select! {
            r = tcp.read(&mut buf), if want_server => match r {
                Ok(0) => return Err(HandshakeError::ServerClosed),
                Ok(n) => sp.feed_server(&buf[..n]),
                Err(e) => return Err(HandshakeError::ServerIo(e.to_string())),
            },
            ev = reader.next(), if want_client => match ev {
                Ok(Event::Data(data)) => {
                    if let Err(e) = sp.feed_client(data) {
                        let _ = send_client(writer, &sp.take_to_client()).await;
                        return Err(HandshakeError::ClientRfb(e));
                    }
                    Ok(())
                }
                Ok(Event::Ping(p)) => {
                    let mut pong = [0u8; 125];
                    let n = p.len();
                    pong[..n].copy_from_slice(p);
                    writer.send(OpCode::Pong, &pong[..n]).await.map_err(|_| HandshakeError::ClientGone)?;
                    Ok(())
                }
                Ok(Event::Pong) => Ok(()),
                Ok(Event::Close(_)) | Err(ReadError::Eof) | Err(ReadError::Io(_)) => {
                    return Err(HandshakeError::ClientGone)
                }
                Ok(Event::Text) => return Err(HandshakeError::TextFrame),
                Err(ReadError::Frame(e)) => {
                    return Err(HandshakeError::ClientProtocol {
                        code: e.close_code(),
                        detail: e.to_string(),
                    })
                }
                Err(e @ ReadError::BadClose) => {
                    return Err(HandshakeError::ClientProtocol {
                        code: super::close::PROTOCOL,
                        detail: e.to_string(),
                    })
                }
            },
        };
        if let Err(e) = fed {
            // The state machine queued a failure message for the browser;
            // deliver it if we can, the close frame follows anyway.
            let _ = send_client(writer, &sp.take_to_client()).await;
            return Err(e.into());
        }
    }
}

async fn write_server(tcp: &mut TcpStream, data: &[u8]) -> Result<(), HandshakeError> {
    if data.is_empty() {
        return Ok(());
    }
    tcp.write_all(data)
        .await
        .map_err(|e| HandshakeError::ServerIo(e.to_string()))
}

async fn send_client<W: AsyncWrite + Unpin>(
    writer: &mut Writer<W>,
    data: &[u8],
) -> Result<(), HandshakeError> {
    if data.is_empty() {
        return Ok(());
    }
    writer
        .send_binary(data)
        .await
        .map_err(|_| HandshakeError::ClientGone)
}
