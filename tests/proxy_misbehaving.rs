//! Misbehaving peers: each connection ends cleanly, with a clear reason,
//! and leaves no file descriptor behind in the broker.

use std::time::{Duration, Instant};

use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VNC_PW: &str = "mPw6Hj9D";

/// Exercises the API and the proxy's refusal path once, then returns the
/// broker's fd count once it has been steady for a moment.
async fn warm_baseline(broker: &Broker, vm: i64) -> usize {
    let _ = broker.mint_default(vm).await;
    let mut ws = broker
        .ws(&format!("/websockify?token={}", unknown_token()))
        .await;
    assert_eq!(ws.expect_close(STEP).await.0, 4401);
    drop(ws);
    steady_count(|| broker.fd_count()).await
}

/// A broker with VM 1 = an Xvnc with a stored password, warmed up; and
/// its fd baseline.
async fn xvnc_setup() -> (Xvnc, Broker, usize) {
    let xvnc = Xvnc::start(VNC_PW);
    let broker = Broker::start("");
    broker.add_vm(1, xvnc.port, Some(VNC_PW));
    let baseline = warm_baseline(&broker, 1).await;
    (xvnc, broker, baseline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_refuses_connections_gives_4502_quickly() {
    // A connect timeout far above the bound below: a refusal must not wait
    // for it.
    let broker = Broker::start("[proxy]\nconnect_timeout_ms = 20000\n");
    broker.add_vm(1, closed_port(), Some(VNC_PW));
    let baseline = warm_baseline(&broker, 1).await;

    for _ in 0..3 {
        let t = broker.mint_default(1).await;
        let started = Instant::now();
        let mut ws = broker.ws_token(&t.token).await;
        let (code, reason) = ws.expect_close(STEP).await;
        let took = started.elapsed();
        assert_eq!(code, 4502, "reason: {reason}");
        assert_eq!(reason, "console unavailable: VM not reachable");
        assert!(took < Duration::from_secs(5), "refusal took {took:?}");
        assert!(ws.received.is_empty());
    }
    assert!(broker.sessions().is_empty());
    broker
        .assert_fds_settle(baseline, "after refused targets")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_protected_vm_that_speaks_garbage_gives_4500() {
    let garbage = TinyServer::start(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nServer: definitely not VNC\r\n\r\n\x00\xff\xfe")
            .await;
        // Keep the connection until the broker hangs up.
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let broker = Broker::start("");
    broker.add_vm(1, garbage.port, Some(VNC_PW));
    let baseline = warm_baseline(&broker, 1).await;

    for _ in 0..3 {
        let t = broker.mint_default(1).await;
        let mut ws = broker.ws_token(&t.token).await;
        let (code, reason) = ws.expect_close(STEP).await;
        assert_eq!(code, 4500, "reason: {reason}");
        assert!(
            reason.contains("unsupported or malformed RFB protocol version"),
            "reason: {reason}"
        );
        assert!(reason.len() <= 123, "a close reason fits a control frame");
    }
    assert_eq!(garbage.accepted(), 3);
    assert!(broker.sessions().is_empty());
    broker
        .assert_fds_settle(baseline, "after garbage-speaking targets")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_speaks_gives_4504_after_the_handshake_timeout() {
    // Accepts, then says nothing at all until the broker hangs up.
    let silent = TinyServer::start(|mut s| async move {
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let broker = Broker::start("[proxy]\nhandshake_timeout_ms = 1500\n");
    broker.add_vm(1, silent.port, Some(VNC_PW));
    let baseline = warm_baseline(&broker, 1).await;

    let t = broker.mint_default(1).await;
    let started = Instant::now();
    let mut ws = broker.ws_token(&t.token).await;
    let (code, reason) = ws.expect_close(Duration::from_secs(30)).await;
    let took = started.elapsed();
    assert_eq!(code, 4504, "reason: {reason}");
    assert_eq!(reason, "console unavailable: the VNC handshake timed out");
    assert!(
        took >= Duration::from_millis(1400),
        "closed after {took:?}, before the 1.5 s handshake timeout"
    );
    assert!(ws.received.is_empty());
    assert_eq!(silent.accepted(), 1);
    drop(ws);
    assert!(broker.sessions().is_empty());
    broker
        .assert_fds_settle(baseline, "after a silent server")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_frame_mid_session_closes_with_1003() {
    let (_xvnc, broker, baseline) = xvnc_setup().await;
    let (_, mut ws) = broker.open_console(1).await;
    ws.send_text("this is not RFB").await.unwrap();
    let (code, reason) = ws.expect_close(STEP).await;
    assert_eq!(code, 1003, "reason: {reason}");
    assert_eq!(reason, "text frames are not accepted");
    drop(ws);

    let rows = broker.ended_sessions(1).await;
    assert_eq!(
        rows[0].close_reason.as_deref(),
        Some("client sent a text frame")
    );
    broker
        .assert_fds_settle(baseline, "after a text frame")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_frame_during_the_handshake_closes_with_1003() {
    let (_xvnc, broker, baseline) = xvnc_setup().await;
    let t = broker.mint_default(1).await;
    let mut ws = broker.ws_token(&t.token).await;
    assert_eq!(ws.read_exact(12).await.unwrap(), b"RFB 003.008\n");
    ws.send_text("RFB 003.008\n").await.unwrap();
    let (code, reason) = ws.expect_close(STEP).await;
    assert_eq!(code, 1003, "reason: {reason}");
    assert!(broker.sessions().is_empty());
    drop(ws);
    broker
        .assert_fds_settle(baseline, "after a text frame in the handshake")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_an_http_request_is_dropped_after_the_header_timeout() {
    // `[http] header_timeout_ms` bounds how long a client may take to send
    // its request headers.
    let broker = Broker::start("[http]\nheader_timeout_ms = 2000\n");
    broker.add_vm(1, closed_port(), None);
    let baseline = warm_baseline(&broker, 1).await;

    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", broker.port))
        .await
        .unwrap();
    s.write_all(b"GET /websockify?token=x HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let bound = Duration::from_secs(20);
    let mut got = Vec::new();
    let ended = tokio::time::timeout(bound, async {
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let took = started.elapsed();
    assert!(
        ended.is_ok(),
        "the server kept a half-sent request open for {bound:?}"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "closed after {took:?}: before the 2 s header timeout"
    );
    // Either a bare close or an HTTP error response, nothing else.
    if !got.is_empty() {
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 4"), "unexpected answer {text:?}");
    }
    drop(s);
    broker
        .assert_fds_settle(baseline, "after a half-sent request")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_session_ends_its_session() {
    let (_xvnc, broker, baseline) = xvnc_setup().await;
    let (_, ws) = broker.open_console(1).await;
    poll_until("the session row", STEP, || {
        (broker.sessions().len() == 1).then_some(())
    })
    .await;
    assert!(broker.fd_count() > baseline, "a live session holds sockets");
    // Gone without a close frame: dropping the stream just closes the socket.
    drop(ws);

    let rows = broker.ended_sessions(1).await;
    assert!(rows[0].ended_at.is_some());
    assert_eq!(
        rows[0].close_reason.as_deref(),
        Some("client connection lost")
    );
    broker
        .assert_fds_settle(baseline, "after a vanished client")
        .await;
    broker_still_serves(&broker).await;
}

/// A new session opens after the vanished one.
async fn broker_still_serves(broker: &Broker) {
    let (_, mut ws) = broker.open_console(1).await;
    ws.close_normal().await;
}
