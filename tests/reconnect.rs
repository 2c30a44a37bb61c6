//! Reconnect tickets and the console page's session answer, against a real
//! Xvnc: a single-use token's console comes back once after its connection
//! drops, from the same address, within the grace, and never after a close,
//! a revocation or the grace; the answer tells the page its rules and
//! limits, and keeps the ticket out of its body.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;
use testkit::*;

const VNC_PW: &str = "rCn7Tk2W";
const INVALID: &str = "token invalid or expired";

fn setup(extra_toml: &str) -> (Xvnc, Broker) {
    let xvnc = Xvnc::start(VNC_PW);
    let broker = Broker::start(extra_toml);
    broker.add_vm(1, xvnc.port, Some(VNC_PW));
    (xvnc, broker)
}

/// `POST /console/session` for `token`, as the console page sends it.
async fn ask(broker: &Broker, token: &str, origin: Option<String>) -> HttpResponse {
    let mut headers = vec![("Content-Type", "application/json".to_string())];
    if let Some(o) = origin {
        headers.push(("Origin", o));
    }
    http_request(
        broker.port,
        "POST",
        "/console/session",
        &headers,
        serde_json::json!({ "token": token }).to_string().as_bytes(),
    )
    .await
}

/// The answer's JSON and the `name=value` of the ticket cookie it set.
async fn ticket(broker: &Broker, token: &str) -> (Value, String) {
    let r = ask(broker, token, Some(broker.base_url())).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    let cookie = r
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no ticket cookie in {:?}", r.headers));
    for part in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/websockify"] {
        assert!(cookie.contains(part), "{cookie} lacks {part}");
    }
    let pair = cookie.split(';').next().unwrap().trim().to_owned();
    let value = pair.split_once('=').unwrap().1;
    assert!(
        !String::from_utf8_lossy(&r.body).contains(value),
        "the ticket is in the answer's body"
    );
    assert!(
        !broker.log().contains(value),
        "the ticket is in the broker's log"
    );
    (body, pair)
}

/// Opens the console of `token` with `cookie`, from `from`.
async fn open(broker: &Broker, token: &str, cookie: Option<&str>, from: Option<IpAddr>) -> Ws {
    let opts = WsOptions {
        protocols: vec!["binary".into()],
        cookie: cookie.map(str::to_owned),
        from,
    };
    Ws::connect(broker.port, &format!("/websockify?token={token}"), &opts)
        .await
        .unwrap_or_else(|e| panic!("upgrade: {e}"))
}

async fn opens(broker: &Broker, token: &str, cookie: Option<&str>, from: Option<IpAddr>) -> Ws {
    let mut ws = open(broker, token, cookie, from).await;
    let init = rfb_handshake(&mut ws)
        .await
        .unwrap_or_else(|e| panic!("the console did not open: {e}"));
    assert_eq!((init.width, init.height), (800, 600));
    ws
}

async fn refused(
    broker: &Broker,
    token: &str,
    cookie: Option<&str>,
    from: Option<IpAddr>,
) -> (u16, String) {
    let mut ws = open(broker, token, cookie, from).await;
    match rfb_handshake(&mut ws).await {
        Err(WsEnd::Closed(code, reason)) => (code, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Drops the connection without a WebSocket close, as a network would.
fn cut(ws: Ws) {
    drop(ws);
}

const OTHER_ADDRESS: [u8; 4] = [127, 0, 0, 2];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_console_comes_back_once_with_its_ticket_after_a_drop() {
    let (_xvnc, broker) = setup("");
    let t = broker.mint(1, USER, USER_PW, None, true).await;
    let ws = opens(&broker, &t.token, None, None).await;
    let (told, cookie) = ticket(&broker, &t.token).await;
    assert_eq!(told["reconnect_ticket"], true);
    assert_eq!(told["reconnect_grace_secs"], 30);
    assert_eq!(told["single_use"], true);

    // The token alone opens nothing more; the ticket waits while the
    // session is live.
    assert_eq!(
        refused(&broker, &t.token, None, None).await,
        (4401, INVALID.into())
    );
    let (code, _) = refused(&broker, &t.token, Some(&cookie), None).await;
    assert_eq!(code, 4425);

    cut(ws);
    let rows = broker.ended_sessions(1).await;
    assert_eq!(
        rows[0].close_reason.as_deref(),
        Some("client connection lost")
    );

    // Not from another address, not without the token's own name.
    let other = Some(IpAddr::from(OTHER_ADDRESS));
    assert_eq!(
        refused(&broker, &t.token, Some(&cookie), other).await.0,
        4401
    );
    let foreign = broker.mint(1, USER, USER_PW, None, true).await;
    let mut fws = opens(&broker, &foreign.token, None, None).await;
    let (_, foreign_cookie) = ticket(&broker, &foreign.token).await;
    fws.close_normal().await;
    broker.ended_sessions(2).await;
    let (foreign_name, _) = foreign_cookie.split_once('=').unwrap();
    let (_, value) = cookie.split_once('=').unwrap();
    let swapped = format!("{foreign_name}={value}");
    assert_eq!(
        refused(&broker, &foreign.token, Some(&swapped), None)
            .await
            .0,
        4401
    );

    // Back, once, in a row that names the session it continues.
    let mut back = opens(&broker, &t.token, Some(&cookie), None).await;
    let rows = broker.sessions();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2].resumed_from, Some(rows[0].id));
    assert_eq!(rows[2].token_id, rows[0].token_id);
    back.close_normal().await;
    broker.ended_sessions(3).await;
    assert_eq!(
        refused(&broker, &t.token, Some(&cookie), None).await.0,
        4401
    );

    // The API shows the link too.
    let r = broker.api_get("/api/v1/sessions", USER, USER_PW).await;
    let list: Value = serde_json::from_slice(&r.body).unwrap();
    let linked = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["resumed_from"].as_i64() == Some(rows[0].id))
        .count();
    assert_eq!(linked, 1, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_drops_takes_a_new_ticket_each_time() {
    let (_xvnc, broker) = setup("");
    let t = broker.mint(1, USER, USER_PW, None, true).await;
    let mut ws = opens(&broker, &t.token, None, None).await;
    for round in 1..=3 {
        let (_, cookie) = ticket(&broker, &t.token).await;
        cut(ws);
        broker.ended_sessions(round).await;
        ws = opens(&broker, &t.token, Some(&cookie), None).await;
    }
    let rows = broker.sessions();
    assert_eq!(rows.len(), 4);
    for pair in rows.windows(2) {
        assert_eq!(pair[1].resumed_from, Some(pair[0].id));
    }
    ws.close_normal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_or_a_revocation_voids_the_ticket() {
    let (_xvnc, broker) = setup("");
    // Closed by the browser: no reconnect.
    let t = broker.mint(1, USER, USER_PW, None, true).await;
    let mut ws = opens(&broker, &t.token, None, None).await;
    let (_, cookie) = ticket(&broker, &t.token).await;
    ws.close_normal().await;
    broker.ended_sessions(1).await;
    assert_eq!(
        refused(&broker, &t.token, Some(&cookie), None).await,
        (4401, INVALID.into())
    );

    // Dropped, then revoked within the grace: no reconnect.
    let t = broker.mint(1, USER, USER_PW, None, true).await;
    let ws = opens(&broker, &t.token, None, None).await;
    let (_, cookie) = ticket(&broker, &t.token).await;
    cut(ws);
    broker.ended_sessions(2).await;
    broker.revoke(1, USER, USER_PW).await;
    assert_eq!(
        refused(&broker, &t.token, Some(&cookie), None).await,
        (4401, INVALID.into())
    );

    // Revoked while live: the session ends with 4410 and its ticket goes.
    let t = broker.mint(1, USER, USER_PW, None, true).await;
    let mut ws = opens(&broker, &t.token, None, None).await;
    let (_, cookie) = ticket(&broker, &t.token).await;
    broker.revoke(1, USER, USER_PW).await;
    assert_eq!(ws.expect_close(STEP).await.0, 4410);
    broker.ended_sessions(3).await;
    assert_eq!(
        refused(&broker, &t.token, Some(&cookie), None).await.0,
        4401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ticket_lapses_with_the_grace() {
    let (_xvnc, broker) = setup("[proxy]\nreconnect_grace_secs = 1\n");
    let t = broker.mint(1, USER, USER_PW, None, true).await;
    let ws = opens(&broker, &t.token, None, None).await;
    let (told, cookie) = ticket(&broker, &t.token).await;
    assert_eq!(told["reconnect_grace_secs"], 1);
    cut(ws);
    broker.ended_sessions(1).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        refused(&broker, &t.token, Some(&cookie), None).await.0,
        4401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_tells_the_page_its_rules_and_limits_and_refuses_bad_asks() {
    let (_xvnc, broker) = setup("[proxy]\nmax_session_secs = 600\n");
    let t = broker.mint(1, USER, USER_PW, None, false).await;
    // A reusable token needs no ticket; before its session, no end either.
    let r = ask(&broker, &t.token, Some(broker.base_url())).await;
    assert_eq!(r.status, 200);
    let told: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(told["reconnect_ticket"], false);
    assert_eq!(told["ends_at"], Value::Null);
    // The page learns which client to open the console with before it does.
    assert_eq!(told["protocol"], "vnc");
    let mut ws = opens(&broker, &t.token, None, None).await;
    let r = ask(&broker, &t.token, Some(broker.base_url())).await;
    assert!(
        !r.headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("set-cookie")),
        "a reusable token got a ticket"
    );
    let told: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(told["protocol"], "vnc");
    assert_eq!(told["view_only"], false);
    assert_eq!(told["clipboard"], "both");
    assert_eq!(told["expires_at"], t.expires_at);
    let started = broker.sessions()[0].started_at;
    assert_eq!(told["ends_at"], started + 600);

    // Bad asks get a clear status and reason.
    let r = ask(&broker, &unknown_token(), Some(broker.base_url())).await;
    assert_eq!(r.status, 401);
    let r = ask(&broker, &t.token, Some("https://elsewhere.example".into())).await;
    assert_eq!(r.status, 403);
    for body in [
        "",
        "{",
        "[]",
        "{\"token\": 5}",
        "{\"token\": \"x\", \"more\": 1}",
    ] {
        let r = http_request(
            broker.port,
            "POST",
            "/console/session",
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 400, "{body:?}");
        assert!(
            String::from_utf8_lossy(&r.body).contains("token"),
            "{body:?}"
        );
    }
    let huge = format!("{{\"token\": \"{}\"}}", "a".repeat(10_000));
    let r = http_request(
        broker.port,
        "POST",
        "/console/session",
        &[],
        huge.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 413);
    ws.close_normal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_by_its_time_limit_does_not_come_back() {
    let (_xvnc, broker) = setup("[proxy]\nmax_session_secs = 2\n");
    let t = broker.mint(1, USER, USER_PW, None, true).await;
    let mut ws = opens(&broker, &t.token, None, None).await;
    let (told, cookie) = ticket(&broker, &t.token).await;
    assert!(told["ends_at"].as_i64().is_some(), "{told}");
    assert_eq!(ws.expect_close(STEP).await.0, 4411);
    broker.ended_sessions(1).await;
    assert_eq!(
        refused(&broker, &t.token, Some(&cookie), None).await,
        (4401, INVALID.into())
    );
}
