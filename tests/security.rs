//! The hardened edge, against a running broker: Origin checks, paths,
//! WebSocket strictness, failure budgets, session limits and timers, and
//! VNC passwords sealed at rest.

use std::time::{Duration, Instant};

use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_vncbroker");

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A stand-in VNC server that greets and then echoes.
async fn greeter() -> TinyServer {
    TinyServer::start(|mut s: TcpStream| async move {
        if s.write_all(b"RFB 003.008\n").await.is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    })
    .await
}

/// A stand-in VNC server that accepts and says nothing.
async fn silent() -> TinyServer {
    TinyServer::start(|mut s: TcpStream| async move {
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
}

/// A hand-made WebSocket client, to send what well-behaved libraries won't.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Sends an upgrade request; returns the status code and the client.
    async fn upgrade(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, Raw) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        );
        let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
        if !has("sec-websocket-key") {
            req.push_str(&format!("Sec-WebSocket-Key: {KEY}\r\n"));
        }
        if !has("sec-websocket-version") {
            req.push_str("Sec-WebSocket-Version: 13\r\n");
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let head_end = tokio::time::timeout(STEP, async {
            loop {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return buf.len();
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    return p + 4;
                }
            }
        })
        .await
        .expect("no HTTP answer");
        let status = std::str::from_utf8(&buf[..head_end.min(buf.len())])
            .ok()
            .and_then(|h| h.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let rest = buf.split_off(head_end.min(buf.len()));
        (status, Raw { s, buf: rest })
    }

    async fn send_frame(&mut self, first: u8, payload: &[u8], masked: bool) {
        let mut f = vec![first];
        let mask_bit = if masked { 0x80 } else { 0 };
        if payload.len() < 126 {
            f.push(mask_bit | payload.len() as u8);
        } else {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        if masked {
            let m = [0x11, 0x22, 0x33, 0x44];
            f.extend_from_slice(&m);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        self.s.write_all(&f).await.unwrap();
    }

    /// Reads one server frame: (opcode, payload); None at EOF.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (len, hl) = match self.buf[1] & 0x7F {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if hl > 0 && self.buf.len() >= hl + len {
                    let op = self.buf[0] & 0x0F;
                    let payload = self.buf[hl..hl + len].to_vec();
                    self.buf.drain(..hl + len);
                    return Some((op, payload));
                }
            }
            let mut chunk = [0u8; 8192];
            let n = self.s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads frames until a close frame; returns its code. Pings are not
    /// answered (a client that ignores them).
    async fn close_code(&mut self, timeout: Duration) -> Option<u16> {
        tokio::time::timeout(timeout, async {
            while let Some((op, p)) = self.frame().await {
                if op == 0x8 {
                    return (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }
}

async fn session_on(broker: &Broker, vm: i64) -> Raw {
    let t = broker.mint_default(vm).await;
    let (status, mut raw) =
        Raw::upgrade(broker.port, &format!("/websockify?token={}", t.token), &[]).await;
    assert_eq!(status, 101);
    let (op, greeting) = raw.frame().await.expect("greeting");
    assert_eq!((op, greeting.as_slice()), (0x2, &b"RFB 003.008\n"[..]));
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_are_checked_on_every_upgrade() {
    let vnc = greeter().await;
    let broker = Broker::start(
        "public_url = \"https://console.example.test\"\n\
         [proxy]\nallowed_origins = [\"https://portal.example.org\"]\n",
    );
    broker.add_vm(1, vnc.port, None);
    let token = broker.mint_default(1).await.token;
    let path = format!("/websockify?token={token}");
    for (origin, want) in [
        (Some("https://console.example.test"), 101),
        (Some("https://portal.example.org"), 101),
        (None, 101),
        (Some("https://evil.example.com"), 403),
        (Some("http://console.example.test"), 403),
        (Some("null"), 403),
        (Some(""), 403),
        // The Host header names the broker, but the public URL decides.
        (Some("http://127.0.0.1"), 403),
    ] {
        let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
        let (status, _) = Raw::upgrade(broker.port, &path, &headers).await;
        assert_eq!(status, want, "origin {origin:?}");
    }
    // A refused origin used nothing: the reusable token still works.
    assert_eq!(broker.sessions().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_origin_scheme_and_forwarded_headers() {
    let vnc = greeter().await;
    // No public URL: same origin is the request's own host and scheme.
    let strict = Broker::start("[proxy]\nallow_missing_origin = false\n");
    strict.add_vm(1, vnc.port, None);
    let t = strict.mint_default(1).await.token;
    let path = format!("/websockify?token={t}");
    let own = format!("http://127.0.0.1:{}", strict.port);
    let tls_own = format!("https://127.0.0.1:{}", strict.port);
    assert_eq!(
        Raw::upgrade(strict.port, &path, &[("Origin", &own)])
            .await
            .0,
        101
    );
    assert_eq!(
        Raw::upgrade(strict.port, &path, &[]).await.0,
        403,
        "missing origin refused"
    );
    // X-Forwarded-Proto from a peer that is not a trusted proxy is ignored.
    let spoof = [("Origin", tls_own.as_str()), ("X-Forwarded-Proto", "https")];
    assert_eq!(Raw::upgrade(strict.port, &path, &spoof).await.0, 403);

    let behind = Broker::start("[http]\ntrusted_proxies = [\"127.0.0.1\"]\n");
    behind.add_vm(1, vnc.port, None);
    let t = behind.mint_default(1).await.token;
    let path = format!("/websockify?token={t}");
    let tls_own = format!("https://127.0.0.1:{}", behind.port);
    let via_proxy = [
        ("Origin", tls_own.as_str()),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-For", "198.51.100.7"),
    ];
    let (status, mut raw) = Raw::upgrade(behind.port, &path, &via_proxy).await;
    assert_eq!(status, 101);
    raw.frame().await.expect("greeting");
    drop(raw);
    let rows = behind.ended_sessions(1).await;
    assert!(rows[0].client_addr.starts_with("198.51.100.7:"), "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_paths_and_static_files() {
    let broker = Broker::start("");
    let get =
        |path: &'static str| async move { http_request(broker.port, "GET", path, &[], b"").await };
    assert_eq!(get("//evil.com/%2F..").await.status, 400);
    assert_eq!(get("///evil.com").await.status, 400);
    let js = get("/static/console.js").await;
    assert_eq!(js.status, 200);
    let ct = js
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.clone());
    assert_eq!(ct.as_deref(), Some("text/javascript; charset=utf-8"));
    for missing in [
        "/static/",
        "/static/../Cargo.toml",
        "/static/%2e%2e/Cargo.toml",
        "/static/.gitignore",
        "/novnc/",
        "/novnc/core",
    ] {
        let r = get(missing).await;
        assert_eq!(r.status, 404, "{missing}");
        assert!(
            !r.headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("location")),
            "{missing}"
        );
    }
    assert_eq!(get("/novnc/core/rfb.js").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_rules_are_strict() {
    let vnc = greeter().await;
    let broker = Broker::start("[proxy]\nmax_message_bytes = 4096\n");
    broker.add_vm(1, vnc.port, None);
    let token = broker.mint_default(1).await.token;
    let path = format!("/websockify?token={token}");

    assert_eq!(
        Raw::upgrade(broker.port, &path, &[("Sec-WebSocket-Version", "8")])
            .await
            .0,
        426
    );
    assert_eq!(
        Raw::upgrade(broker.port, &path, &[("Sec-WebSocket-Key", "short")])
            .await
            .0,
        400
    );

    // Pings are answered with the same payload.
    let mut raw = session_on(&broker, 1).await;
    raw.send_frame(0x89, b"are you there", true).await;
    assert_eq!(raw.frame().await, Some((0xA, b"are you there".to_vec())));
    // Data still flows: the echo comes back.
    raw.send_frame(0x82, b"abc", true).await;
    assert_eq!(raw.frame().await, Some((0x2, b"abc".to_vec())));

    for (what, first, payload, masked, code) in [
        ("unmasked", 0x82u8, vec![1u8; 4], false, 1002u16),
        ("reserved bit", 0xC2, vec![1; 4], true, 1002),
        ("long control frame", 0x89, vec![1; 126], true, 1002),
        ("fragmented ping", 0x09, vec![1; 4], true, 1002),
        ("oversized message", 0x82, vec![1; 5000], true, 1009),
        ("text", 0x81, b"hello".to_vec(), true, 1003),
    ] {
        let mut raw = session_on(&broker, 1).await;
        raw.send_frame(first, &payload, masked).await;
        assert_eq!(raw.close_code(STEP).await, Some(code), "{what}");
    }
}

/// The same protocol errors during the RFB security handshake (the proxy
/// answers a real Xvnc's VncAuth itself) close with the same codes, not
/// with 4500 "console unavailable": the fault is the client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_protocol_errors_in_the_vnc_handshake_close_with_1002() {
    let broker = Broker::start("[proxy]\nmax_message_bytes = 4096\n");
    for (vm, (what, first, payload, masked, code)) in (1..).zip([
        (
            "unmasked",
            0x82u8,
            b"RFB 003.008\n".to_vec(),
            false,
            1002u16,
        ),
        ("reserved bit", 0xC2, b"RFB 003.008\n".to_vec(), true, 1002),
        ("fragmented ping", 0x09, vec![1; 4], true, 1002),
        ("oversized message", 0x82, vec![1; 5000], true, 1009),
        (
            "not an RFB version",
            0x82,
            b"HTTP/1.1 200\n".to_vec(),
            true,
            1002,
        ),
    ]) {
        // A VNC server of its own each time: Xvnc blacklists an address
        // after a few handshakes that stop half-way.
        let xvnc = Xvnc::start("hPw3Kd8Q");
        broker.add_vm(vm, xvnc.port, Some("hPw3Kd8Q"));
        let mut raw = session_on(&broker, vm).await;
        raw.send_frame(first, &payload, masked).await;
        assert_eq!(raw.close_code(STEP).await, Some(code), "{what}");
    }
    assert!(broker.sessions().is_empty(), "no session was relayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_ignores_pings_is_dropped() {
    let vnc = greeter().await;
    let broker = Broker::start("[proxy]\nping_interval_secs = 1\npong_timeout_secs = 2\n");
    broker.add_vm(1, vnc.port, None);
    let mut raw = session_on(&broker, 1).await;
    let t = Instant::now();
    assert_eq!(raw.close_code(Duration::from_secs(15)).await, Some(4408));
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    let rows = broker.ended_sessions(1).await;
    assert_eq!(
        rows[0].close_reason.as_deref(),
        Some("client stopped answering pings")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_are_limited_per_address() {
    let vnc = greeter().await;
    let broker = Broker::start("[http]\nfailures_per_minute = 3\nfailure_delay_ms = 200\n");
    broker.add_vm(1, vnc.port, None);
    let good = broker.mint_default(1).await.token;

    for _ in 0..3 {
        let mut ws = broker.ws_token(&unknown_token()).await;
        assert_eq!(ws.expect_close(STEP).await.0, 4401);
    }
    // The budget is spent: refused before any lookup, even a good token.
    let (status, _) = Raw::upgrade(broker.port, &format!("/websockify?token={good}"), &[]).await;
    assert_eq!(status, 429);

    // Wrong passwords share the address's budget: the API answers 429.
    let r = post_mint(broker.port, 1, USER, USER_PW).await;
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    let call = format!(
        "<methodCall><methodName>one.vm.novnctoken</methodName><params><param><value><string>{USER}:{USER_PW}</string></value></param><param><value><int>1</int></value></param></params></methodCall>"
    );
    let r = http_request(
        broker.port,
        "POST",
        "/RPC2",
        &[("Content-Type", "text/xml".into())],
        call.as_bytes(),
    )
    .await;
    let body = String::from_utf8_lossy(&r.body);
    assert!(
        body.contains("<int>256</int>") && body.contains("Too many failed attempts"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_use_up_the_budget() {
    let broker = Broker::start("[http]\nfailures_per_minute = 2\nfailure_delay_ms = 100\n");
    broker.add_vm(1, closed_port(), None);
    let mint = |pw: &'static str| async move { post_mint(broker.port, 1, USER, pw).await.status };
    assert_eq!(mint("wrong-1").await, 401);
    assert_eq!(mint("wrong-2").await, 401);
    assert_eq!(mint(USER_PW).await, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_limits_and_timers() {
    let vnc = greeter().await;
    let quiet = silent().await;
    let broker = Broker::start("[proxy]\nmax_sessions_per_vm = 1\n");
    broker.add_vm(1, vnc.port, None);
    let _first = session_on(&broker, 1).await;
    let mut second = broker.ws_token(&broker.mint_default(1).await.token).await;
    let (code, reason) = second.expect_close(STEP).await;
    assert_eq!(code, 4429, "{reason}");
    assert!(reason.contains("too many"), "{reason}");

    let idle = Broker::start("[proxy]\nidle_timeout_secs = 1\n");
    idle.add_vm(2, quiet.port, None);
    let mut ws = idle.ws_token(&idle.mint_default(2).await.token).await;
    assert_eq!(ws.expect_close(Duration::from_secs(15)).await.0, 4408);

    let capped = Broker::start("[proxy]\nmax_session_secs = 1\n");
    capped.add_vm(2, quiet.port, None);
    let mut ws = capped.ws_token(&capped.mint_default(2).await.token).await;
    assert_eq!(ws.expect_close(Duration::from_secs(15)).await.0, 4411);

    let enforced = Broker::start("[proxy]\nend_at_token_expiry = true\n");
    enforced.add_vm(2, quiet.port, None);
    let t = enforced.mint(2, USER, USER_PW, Some(2), false).await;
    let mut ws = enforced.ws_token(&t.token).await;
    let started = Instant::now();
    assert_eq!(ws.expect_close(Duration::from_secs(15)).await.0, 4412);
    assert!(started.elapsed() < Duration::from_secs(5));
    let rows = enforced.ended_sessions(1).await;
    assert_eq!(rows[0].close_reason.as_deref(), Some("token expired"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vnc_passwords_are_sealed_at_rest() {
    const PW: &str = "Vnc-Secret-7";
    let xvnc = Xvnc::start(PW);
    let broker = Broker::start("");
    broker.add_vm(1, xvnc.port, Some(PW));
    let t = broker.mint_default(1).await;
    let mut ws = broker.ws_token(&t.token).await;
    let init = rfb_handshake(&mut ws)
        .await
        .expect("handshake with the sealed password");
    assert!(init.width > 0);
    drop(ws);
    broker.ended_sessions(1).await;

    let key = broker.dir.path().join("vncbroker.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    for suffix in ["", "-wal", "-shm"] {
        let path = broker
            .db_path
            .with_file_name(format!("vncbroker.db{suffix}"));
        if path.exists() {
            let bytes = read_file(&path);
            assert!(
                !bytes.windows(PW.len()).any(|w| w == PW.as_bytes()),
                "{} holds the password",
                path.display()
            );
        }
    }
    assert!(!broker.log().contains(PW));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_key_file_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[secrets]\nkey_file = \"{}/missing.key\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--database"])
        .arg(format!("sqlite://{}/db.sqlite", dir.path().display()))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.key"), "{err}");
}

/// A run through every path that handles a secret, with debug logging in
/// text and in JSON: no token, password or VNC password appears in any log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs() {
    const PW: &str = "Vnc-Log-Check-3";
    let xvnc = Xvnc::start(PW);
    for format in ["text", "json"] {
        let broker = Broker::start(&format!(
            "[log]\nformat = \"{format}\"\nlevel = \"debug\"\n"
        ));
        broker.add_vm(1, xvnc.port, Some(PW));
        let mut secrets: Vec<String> = vec![PW.into(), USER_PW.into()];
        // Tokens minted over JSON and XML-RPC, used, revoked, reused, expired.
        let reusable = broker.mint_default(1).await;
        let once = broker.mint(1, USER, USER_PW, Some(60), true).await;
        let short = broker.mint(1, USER, USER_PW, Some(1), false).await;
        let call = format!(
            "<methodCall><methodName>one.vm.novnctoken</methodName><params><param><value><string>{USER}:{USER_PW}</string></value></param><param><value><int>1</int></value></param></params></methodCall>"
        );
        let r = http_request(broker.port, "POST", "/RPC2", &[], call.as_bytes()).await;
        let body = String::from_utf8_lossy(&r.body).into_owned();
        let xml_token = body
            .split("<name>token</name><value><string>")
            .nth(1)
            .and_then(|t| t.split('<').next())
            .expect("a token in the XML-RPC answer")
            .to_owned();
        secrets.extend([
            reusable.token.clone(),
            once.token.clone(),
            short.token.clone(),
            xml_token,
        ]);
        for t in [&reusable.token, &once.token, &once.token] {
            let mut ws = broker.ws_token(t).await;
            let _ = rfb_handshake(&mut ws).await;
        }
        // A wrong password, a wrong token, a revocation, an expired token.
        let wrong = post_mint(broker.port, 1, USER, "not-the-Pw-4711").await;
        assert_eq!(wrong.status, 401);
        secrets.push("not-the-Pw-4711".into());
        let mut ws = broker.ws_token(&unknown_token()).await;
        ws.expect_close(STEP).await;
        broker.revoke(1, USER, USER_PW).await;
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let mut ws = broker.ws_token(&short.token).await;
        assert_eq!(ws.expect_close(STEP).await.0, 4401);

        let log = broker.log();
        assert!(
            log.contains("console session"),
            "the log is not empty ({format})"
        );
        for s in &secrets {
            assert!(!log.contains(s.as_str()), "{format} log contains a secret");
        }
    }
}
