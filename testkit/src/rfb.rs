//! RFB, browser side: the handshake noVNC makes through the proxy.

use crate::ws::{Ws, WsEnd};

/// What ServerInit said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInit {
    pub width: u16,
    pub height: u16,
    /// From the server's pixel format.
    pub bits_per_pixel: u8,
    pub name: String,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The browser side of the handshake through the proxy: expects RFB 3.8,
/// answers 3.8, expects exactly security type 1 (None), chooses it, expects
/// SecurityResult OK, sends ClientInit (shared) and reads ServerInit.
pub async fn rfb_handshake(ws: &mut Ws) -> Result<ServerInit, WsEnd> {
    let version = ws.read_exact(12).await?;
    if version != b"RFB 003.008\n" {
        return Err(WsEnd::Rfb(format!(
            "ProtocolVersion {:?}",
            String::from_utf8_lossy(&version)
        )));
    }
    ws.send(b"RFB 003.008\n").await?;
    let n = ws.read_exact(1).await?[0] as usize;
    if n == 0 {
        let len = be32(&ws.read_exact(4).await?) as usize;
        let reason = ws.read_exact(len.min(4096)).await?;
        return Err(WsEnd::Rfb(format!(
            "connection refused: {}",
            String::from_utf8_lossy(&reason)
        )));
    }
    let types = ws.read_exact(n).await?;
    if types != [1] {
        return Err(WsEnd::Rfb(format!("security types offered: {types:?}")));
    }
    ws.send(&[1]).await?;
    let result = be32(&ws.read_exact(4).await?);
    if result != 0 {
        return Err(WsEnd::Rfb(format!("SecurityResult {result}")));
    }
    ws.send(&[1]).await?; // ClientInit, shared
    let head = ws.read_exact(24).await?;
    let width = u16::from_be_bytes([head[0], head[1]]);
    let height = u16::from_be_bytes([head[2], head[3]]);
    let name_len = be32(&head[20..24]) as usize;
    if name_len > 4096 {
        return Err(WsEnd::Rfb(format!("desktop name of {name_len} bytes")));
    }
    let name = ws.read_exact(name_len).await?;
    Ok(ServerInit {
        width,
        height,
        bits_per_pixel: head[4],
        name: String::from_utf8_lossy(&name).into_owned(),
    })
}
