//! Token redemption in the proxy: single use under a race, reuse, expiry,
//! revocation of a live session, where the token may travel, the
//! subprotocol, and the session record.

use std::time::{Duration, Instant};

use testkit::*;

const VNC_PW: &str = "tPw5Lm2Q";
const INVALID: &str = "token invalid or expired";

/// A broker with VM 1 = an Xvnc with a stored password.
fn setup(extra_toml: &str) -> (Xvnc, Broker) {
    let xvnc = Xvnc::start(VNC_PW);
    let broker = Broker::start(extra_toml);
    broker.add_vm(1, xvnc.port, Some(VNC_PW));
    (xvnc, broker)
}

async fn refused(broker: &Broker, path: &str, opts: &WsOptions) -> (u16, String) {
    let mut ws = Ws::connect(broker.port, path, opts)
        .await
        .unwrap_or_else(|e| panic!("{path}: the upgrade itself must succeed: {e}"));
    let end = rfb_handshake(&mut ws).await;
    match end {
        Err(WsEnd::Closed(code, reason)) => {
            assert!(
                ws.received.is_empty(),
                "{path}: refused, yet RFB bytes were sent"
            );
            (code, reason)
        }
        other => panic!("{path}: expected a close frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_token_opens_exactly_one_of_20_concurrent_sessions() {
    let (xvnc, broker) = setup("");
    let t = broker.mint(1, USER, USER_PW, None, true).await;
    let accepted_before = xvnc.accepted();

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let port = broker.port;
        let token = t.token.clone();
        tasks.spawn(async move {
            let mut ws = Ws::connect(
                port,
                &format!("/websockify?token={token}"),
                &WsOptions::binary(),
            )
            .await
            .expect("upgrade");
            let r = rfb_handshake(&mut ws).await;
            (r, ws)
        });
    }
    let mut winners = Vec::new();
    let mut refusals = 0;
    while let Some(res) = tasks.join_next().await {
        let (r, ws) = res.expect("task");
        match r {
            Ok(init) => {
                assert_eq!((init.width, init.height), (800, 600));
                winners.push(ws);
            }
            Err(WsEnd::Closed(4401, reason)) => {
                assert_eq!(reason, INVALID);
                refusals += 1;
            }
            Err(other) => panic!("unexpected outcome: {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "successful handshakes");
    assert_eq!(refusals, 19, "4401 refusals");
    // Every refusal happened before the proxy dialled out, and all 20 are
    // settled, so the backend's count is final.
    assert_eq!(
        xvnc.accepted() - accepted_before,
        1,
        "connections Xvnc accepted; log:\n{}",
        xvnc.log()
    );
    let rows = broker.sessions();
    assert_eq!(rows.len(), 1, "{rows:?}");

    // And the token stays used.
    let (code, _) = refused(
        &broker,
        &format!("/websockify?token={}", t.token),
        &WsOptions::binary(),
    )
    .await;
    assert_eq!(code, 4401);
    for mut ws in winners {
        ws.close_normal().await;
    }
    broker.ended_sessions(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reusable_token_works_twice_in_a_row() {
    let (_xvnc, broker) = setup("");
    let t = broker.mint_default(1).await;
    assert!(!t.single_use);
    for round in 1..=2 {
        let mut ws = broker.ws_token(&t.token).await;
        let init = rfb_handshake(&mut ws)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!((init.width, init.height), (800, 600));
        ws.close_normal().await;
        let (code, _) = ws.expect_close(STEP).await;
        assert_eq!(code, 1000, "round {round}");
        broker.ended_sessions(round).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_like_an_unknown_one() {
    let (_xvnc, broker) = setup("");
    let t = broker.mint(1, USER, USER_PW, Some(1), false).await;
    assert_eq!(t.ttl, 1);
    // Wait (not an assertion) until the token's lifetime is over.
    poll_until("the token's expiry", Duration::from_secs(10), || {
        (now_unix() > t.expires_at).then_some(())
    })
    .await;
    let expired = refused(
        &broker,
        &format!("/websockify?token={}", t.token),
        &WsOptions::binary(),
    )
    .await;
    let unknown = refused(
        &broker,
        &format!("/websockify?token={}", unknown_token()),
        &WsOptions::binary(),
    )
    .await;
    assert_eq!(expired, (4401, INVALID.to_string()));
    assert_eq!(expired, unknown, "expired and unknown must look the same");
    assert!(broker.sessions().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_ends_a_live_session_with_4410_within_2_seconds() {
    let (_xvnc, broker) = setup("");
    let (t, mut ws) = broker.open_console(1).await;
    poll_until("the session row", STEP, || {
        (broker.sessions().len() == 1).then_some(())
    })
    .await;

    let started = Instant::now();
    assert_eq!(broker.revoke(1, USER, USER_PW).await, 1);
    let (code, reason) = ws.expect_close(Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert_eq!(code, 4410, "reason: {reason}");
    assert_eq!(reason, "session ended: console access revoked");
    assert!(
        took < Duration::from_millis(2500),
        "the session ended {took:?} after the revocation"
    );
    let rows = broker.ended_sessions(1).await;
    assert_eq!(rows[0].close_reason.as_deref(), Some("revoked"));
    assert!(rows[0].ended_at.unwrap() >= rows[0].started_at);

    // The revoked token opens nothing any more.
    let (code, _) = refused(
        &broker,
        &format!("/websockify?token={}", t.token),
        &WsOptions::binary(),
    )
    .await;
    assert_eq!(code, 4401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_malformed_tokens_are_refused() {
    let (_xvnc, broker) = setup("");
    let none = WsOptions::binary();
    let (code, reason) = refused(&broker, "/websockify", &none).await;
    assert_eq!((code, reason.as_str()), (4400, "no console token given"));
    let (code, _) = refused(&broker, "/websockify?token=", &none).await;
    assert_eq!(code, 4400, "an empty token counts as none");
    for bad in [
        "not-a-token!",
        "abc",
        "%00%01",
        &"A".repeat(44),
        &format!("{}*", &unknown_token()[..42]),
    ] {
        let (code, reason) = refused(&broker, &format!("/websockify?token={bad}"), &none).await;
        assert_eq!((code, reason.as_str()), (4401, INVALID), "token {bad:?}");
    }
    assert!(broker.sessions().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_may_come_in_a_cookie_or_on_any_path() {
    let (_xvnc, broker) = setup("");
    let t = broker.mint_default(1).await;

    let opts = WsOptions {
        protocols: vec!["binary".into()],
        cookie: Some(format!("theme=dark; token={}", t.token)),
        ..WsOptions::default()
    };
    let mut ws = Ws::connect(broker.port, "/websockify", &opts)
        .await
        .unwrap();
    let init = rfb_handshake(&mut ws).await.expect("cookie token");
    assert_eq!((init.width, init.height), (800, 600));
    ws.close_normal().await;

    let mut ws = Ws::connect(
        broker.port,
        &format!("/some/other/path?x=1&token={}", t.token),
        &WsOptions::binary(),
    )
    .await
    .unwrap();
    let init = rfb_handshake(&mut ws).await.expect("token on another path");
    assert_eq!((init.width, init.height), (800, 600));
    ws.close_normal().await;

    let rows = broker.ended_sessions(2).await;
    assert!(rows.iter().all(|r| r.vm_id == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_subprotocol_is_echoed_only_when_offered() {
    let (_xvnc, broker) = setup("");
    let t = broker.mint_default(1).await;
    let path = format!("/websockify?token={}", t.token);

    let mut offered = Ws::connect(broker.port, &path, &WsOptions::binary())
        .await
        .unwrap();
    assert_eq!(offered.protocol.as_deref(), Some("binary"));
    rfb_handshake(&mut offered).await.expect("with binary");
    offered.close_normal().await;

    let mut plain = Ws::connect(broker.port, &path, &WsOptions::default())
        .await
        .unwrap();
    assert_eq!(plain.protocol, None);
    rfb_handshake(&mut plain)
        .await
        .expect("without a subprotocol");
    plain.close_normal().await;
    broker.ended_sessions(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_session_is_recorded() {
    let (_xvnc, broker) = setup("");
    let t = broker.mint_default(1).await;
    let before = now_unix();
    let mut ws = broker.ws_token(&t.token).await;
    let init = rfb_handshake(&mut ws).await.expect("handshake");
    // One framebuffer update each way, so both counts are real traffic.
    let mut req = vec![3u8, 0, 0, 0, 0, 0];
    req.extend_from_slice(&init.width.to_be_bytes());
    req.extend_from_slice(&init.height.to_be_bytes());
    ws.send(&req).await.unwrap();
    assert_eq!(ws.read_exact(1).await.unwrap(), [0], "FramebufferUpdate");
    ws.close_normal().await;
    let (code, _) = ws.expect_close(STEP).await;
    assert_eq!(code, 1000);

    let rows = broker.ended_sessions(1).await;
    let r = &rows[0];
    assert_eq!(r.vm_id, 1);
    assert_eq!(r.user_name, USER);
    assert_eq!(r.node, NODE);
    assert!(r.token_id.is_some());
    assert!(
        r.client_addr.starts_with("127.0.0.1:"),
        "client_addr {}",
        r.client_addr
    );
    assert!(r.started_at >= before - 1 && r.started_at <= now_unix());
    assert!(r.ended_at.unwrap() >= r.started_at);
    // ClientInit (1) + the update request (10) went up; ServerInit and the
    // update came down.
    assert!(r.bytes_to_server >= 11, "{r:?}");
    assert!(r.bytes_to_client > 24, "{r:?}");
    assert_eq!(r.close_reason.as_deref(), Some("client closed"));
}
