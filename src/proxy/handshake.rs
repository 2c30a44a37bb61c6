//! Drives the RFB security proxy ([`crate::rfb::SecurityProxy`]) over the
//! two live connections until the VNC server has accepted the stored
//! password and the browser has been told "no authentication needed".

use axum::extract::ws::{Message, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::rfb::{RfbError, SecurityProxy};

/// Why the handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Rfb(#[from] RfbError),
    #[error("the browser went away during the VNC handshake")]
    ClientGone,
    #[error("the browser sent a text frame")]
    TextFrame,
    #[error("WebSocket error during the VNC handshake: {0}")]
    ClientProtocol(String),
    #[error("the VNC server closed the connection during the handshake")]
    ServerClosed,
    #[error("VNC server I/O error during the handshake: {0}")]
    ServerIo(String),
}

/// Runs the handshake; on success every byte that arrived past its end has
/// already been forwarded, so the caller starts relaying at once.
pub async fn secure(
    ws: &mut WebSocket,
    tcp: &mut TcpStream,
    password: &str,
) -> Result<(), HandshakeError> {
    let mut sp = SecurityProxy::new(password.as_bytes().to_vec());
    let mut buf = [0u8; 4096];
    loop {
        if sp.is_done() {
            let (to_server, to_client) = sp.take_leftovers();
            write_server(tcp, &to_server).await?;
            send_client(ws, to_client).await?;
            return Ok(());
        }
        write_server(tcp, &sp.take_to_server()).await?;
        send_client(ws, sp.take_to_client()).await?;
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
            m = ws.recv(), if want_client => match m {
                None | Some(Ok(Message::Close(_))) => return Err(HandshakeError::ClientGone),
                Some(Ok(Message::Binary(data))) => sp.feed_client(&data),
                Some(Ok(Message::Text(_))) => return Err(HandshakeError::TextFrame),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
                Some(Err(e)) => return Err(HandshakeError::ClientProtocol(e.to_string())),
            },
        };
        if let Err(e) = fed {
            // The state machine queued a failure message for the browser;
            // deliver it if we can, the close frame follows anyway.
            let _ = send_client(ws, sp.take_to_client()).await;
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

async fn send_client(ws: &mut WebSocket, data: Vec<u8>) -> Result<(), HandshakeError> {
    if data.is_empty() {
        return Ok(());
    }
    ws.send(Message::Binary(data.into()))
        .await
        .map_err(|_| HandshakeError::ClientGone)
}
