//! The proxy against real VNC servers: QEMU and TigerVNC's Xvnc.
//!
//! With a VNC password stored, the browser is offered only security type
//! None and the broker authenticates to the server itself; without one, the
//! server's own security types pass through untouched.

use testkit::*;

/// Distinctive passwords (VNC uses at most 8 characters), so that any leak
/// into the log or onto the wire is found by a plain substring search.
const QEMU_PW: &str = "qPw7Zx3K";
const XVNC_PW: &str = "xPw4Rt8M";

fn assert_no_leak(broker: &Broker, ws: &Ws, secret: &str) {
    let log = broker.log();
    assert!(
        !log.is_empty(),
        "the broker's stderr log is empty, so the leak check would prove nothing"
    );
    assert!(
        !log.contains(secret),
        "the VNC password appears in the broker's log"
    );
    let needle = secret.as_bytes();
    assert!(
        !ws.received.windows(needle.len()).any(|w| w == needle),
        "the VNC password appears in the bytes sent to the browser"
    );
    if let Some((_, reason)) = &ws.close {
        assert!(
            !reason.contains(secret),
            "the VNC password is in a close reason"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_console_through_the_proxy_uses_the_stored_password() {
    let qemu = Qemu::start(QEMU_PW);
    let broker = Broker::start("");
    broker.add_vm(1, qemu.port, Some(QEMU_PW));
    let t = broker.mint_default(1).await;

    let mut ws = broker.ws_token(&t.token).await;
    assert_eq!(ws.protocol.as_deref(), Some("binary"));
    let init = rfb_handshake(&mut ws)
        .await
        .expect("the browser-side handshake through the proxy");
    assert_eq!(init.name, "QEMU", "ServerInit came from QEMU");
    assert!(init.width > 0 && init.height > 0, "{init:?}");

    // A framebuffer update proves the relay runs after the handshake.
    // FramebufferUpdateRequest, non-incremental, whole screen.
    let mut req = vec![3u8, 0, 0, 0, 0, 0];
    req.extend_from_slice(&init.width.to_be_bytes());
    req.extend_from_slice(&init.height.to_be_bytes());
    ws.send(&req).await.unwrap();
    let msg = ws.read_exact(1).await.expect("a message after the request");
    assert_eq!(msg[0], 0, "FramebufferUpdate expected");

    ws.close_normal().await;
    let rows = broker.ended_sessions(1).await;
    assert_eq!(rows[0].vm_id, 1);
    assert_no_leak(&broker, &ws, QEMU_PW);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xvnc_console_through_the_proxy_uses_the_stored_password() {
    let xvnc = Xvnc::start(XVNC_PW);
    let broker = Broker::start("");
    broker.add_vm(2, xvnc.port, Some(XVNC_PW));
    let t = broker.mint_default(2).await;

    let mut ws = broker.ws_token(&t.token).await;
    let init = rfb_handshake(&mut ws)
        .await
        .expect("the browser-side handshake through the proxy");
    assert!(!init.name.is_empty(), "{init:?}");
    assert_eq!((init.width, init.height), (800, 600), "{init:?}");
    ws.close_normal().await;
    broker.ended_sessions(1).await;
    assert_no_leak(&broker, &ws, XVNC_PW);
    assert!(
        xvnc.log().contains("Connections: accepted"),
        "Xvnc saw the connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_stored_password_is_refused_with_4500() {
    let xvnc = Xvnc::start(XVNC_PW);
    let broker = Broker::start("");
    let wrong = "wrongPw1";
    broker.add_vm(3, xvnc.port, Some(wrong));
    let t = broker.mint_default(3).await;

    let mut ws = broker.ws_token(&t.token).await;
    // The broker authenticates to the server before offering the browser
    // anything, so the browser gets an RFB refusal (no security types and a
    // generic reason), then the close frame.
    assert_eq!(ws.read_exact(12).await.unwrap(), b"RFB 003.008\n");
    ws.send(b"RFB 003.008\n").await.unwrap();
    assert_eq!(ws.read_exact(1).await.unwrap(), [0], "no security types");
    let len = ws.read_exact(4).await.unwrap();
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let rfb_reason = String::from_utf8(ws.read_exact(len).await.unwrap()).unwrap();
    assert_eq!(rfb_reason, "authentication with the VNC server failed");
    let (code, reason) = ws.expect_close(STEP).await;
    assert_eq!(code, 4500, "reason: {reason}");
    assert!(
        reason.contains("VNC server refused the stored password"),
        "reason: {reason}"
    );
    // No session was recorded: the console never opened.
    assert!(broker.sessions().is_empty(), "{:?}", broker.sessions());
    assert_no_leak(&broker, &ws, wrong);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_stored_password_the_servers_security_types_pass_through() {
    let xvnc = Xvnc::start_no_auth();
    let broker = Broker::start("");
    broker.add_vm(4, xvnc.port, None);
    let t = broker.mint_default(4).await;

    let mut ws = broker.ws_token(&t.token).await;
    let init = rfb_handshake(&mut ws)
        .await
        .expect("Xvnc's own None handshake through the relay");
    assert_eq!((init.width, init.height), (800, 600), "{init:?}");
    assert!(!init.name.is_empty());
    // The type list came from Xvnc itself: it logged the version exchange.
    assert!(
        xvnc.log().contains("Client needs protocol version 3.8"),
        "Xvnc log:\n{}",
        xvnc.log()
    );
    ws.close_normal().await;
    let rows = broker.ended_sessions(1).await;
    assert_eq!(rows[0].close_reason.as_deref(), Some("client closed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_stored_password_bytes_are_relayed_verbatim() {
    // A plain target: sends the RFB greeting, then echoes what it gets back
    // reversed, which no VNC server does; the proxy must not interfere.
    let target = TinyServer::start(|mut s| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if s.write_all(b"RFB 003.008\n").await.is_err() {
            return;
        }
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                return;
            }
            let mut out = buf[..n].to_vec();
            out.reverse();
            if s.write_all(&out).await.is_err() {
                return;
            }
        }
    })
    .await;
    let broker = Broker::start("");
    broker.add_vm(5, target.port, None);
    let t = broker.mint_default(5).await;

    let mut ws = broker.ws_token(&t.token).await;
    assert_eq!(ws.read_exact(12).await.unwrap(), b"RFB 003.008\n");
    ws.send(b"hello, not RFB").await.unwrap();
    assert_eq!(ws.read_exact(14).await.unwrap(), b"BFR ton ,olleh");
    ws.close_normal().await;
    let rows = broker.ended_sessions(1).await;
    assert_eq!(target.accepted(), 1);
    assert_eq!(rows[0].bytes_to_server, 14);
    assert_eq!(rows[0].bytes_to_client, 26);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_cross_the_relay_intact_both_ways() {
    let xvnc = Xvnc::start(XVNC_PW);
    let broker = Broker::start("");
    broker.add_vm(6, xvnc.port, Some(XVNC_PW));
    let t = broker.mint_default(6).await;
    let mut ws = broker.ws_token(&t.token).await;
    let init = rfb_handshake(&mut ws).await.expect("handshake");
    let bpp = usize::from(init.bits_per_pixel / 8);
    assert!(bpp > 0, "{init:?}");

    // Up: a 256 KiB ClientCutText in one WebSocket message.
    let text_len: usize = 256 * 1024;
    let mut cut = vec![6u8, 0, 0, 0];
    cut.extend_from_slice(&(text_len as u32).to_be_bytes());
    cut.extend((0..text_len).map(|i| b'a' + (i % 26) as u8));
    ws.send(&cut).await.unwrap();

    // Down: the whole 800x600 screen in Raw encoding (about 1.9 MB),
    // parsed byte for byte.
    ws.send(&[2, 0, 0, 1, 0, 0, 0, 0]).await.unwrap(); // SetEncodings [Raw]
    let mut req = vec![3u8, 0, 0, 0, 0, 0];
    req.extend_from_slice(&init.width.to_be_bytes());
    req.extend_from_slice(&init.height.to_be_bytes());
    ws.send(&req).await.unwrap();
    let head = ws.read_exact(4).await.unwrap();
    assert_eq!(head[0], 0, "FramebufferUpdate");
    let rects = u16::from_be_bytes([head[2], head[3]]);
    let mut area = 0usize;
    for _ in 0..rects {
        let r = ws.read_exact(12).await.unwrap();
        let w = usize::from(u16::from_be_bytes([r[4], r[5]]));
        let h = usize::from(u16::from_be_bytes([r[6], r[7]]));
        let encoding = i32::from_be_bytes([r[8], r[9], r[10], r[11]]);
        assert_eq!(encoding, 0, "only Raw was asked for");
        ws.read_exact(w * h * bpp).await.unwrap();
        area += w * h;
    }
    assert_eq!(area, 800 * 600, "the update covers the screen");

    ws.close_normal().await;
    let rows = broker.ended_sessions(1).await;
    let r = &rows[0];
    let up = (cut.len() + 1 + 8 + 10) as i64; // + ClientInit, SetEncodings, request
    assert_eq!(r.bytes_to_server, up, "{r:?}");
    assert!(r.bytes_to_client >= (800 * 600 * bpp) as i64, "{r:?}");
    assert!(xvnc.log().contains("Connections: accepted"));
}
