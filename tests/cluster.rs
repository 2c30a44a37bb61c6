//! Several nodes on one PostgreSQL database: separate `vncbroker serve`
//! processes (an API node, proxy nodes) sharing `--database postgres://...`.
//!
//! Each test gets its own database (see `testkit::pg`); the outage and
//! failover tests get PostgreSQL servers of their own, since they stop or
//! kill them. The VNC server
//! behind the proxies is a tiny TCP server here that sends the RFB version
//! and echoes; its VMs have no VNC password, so the proxies pass bytes
//! through. The WebSocket and HTTP clients are minimal raw ones.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use testkit::pg::{PgOptions, PgServer, TestDb, TestPki};

const BIN: &str = env!("CARGO_BIN_EXE_vncbroker");

const ADMIN: (&str, &str) = ("root", "root-Pw-Qx81vLmZ");
const ALICE: (&str, &str) = ("alice", "alice-Pw-Hh27cTnE");
const BOB: (&str, &str) = ("bob", "bob-Pw-Ww63pRsA");
/// VM 1 is alice's, VM 2 bob's; both point at the echo server.
const VM_ALICE: i64 = 1;
const VM_BOB: i64 = 2;

const GREETING: &[u8] = b"RFB 003.008\n";
const CLOSE_TOKEN: u16 = 4401;
const CLOSE_REVOKED: u16 = 4410;
const CLOSE_UNAVAILABLE: u16 = 4503;

/// How long a node may take to start on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// One network step in the tests (a frame, an HTTP answer).
const STEP: Duration = Duration::from_secs(10);
/// What the brief promises: revocations reach every proxy, and outages are
/// reported, within this.
const PROMPT: Duration = Duration::from_secs(2);

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---------------------------------------------------------------------------
// The VNC server stand-in
// ---------------------------------------------------------------------------

/// Sends the RFB version, then echoes.
struct EchoVnc {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl EchoVnc {
    async fn start() -> EchoVnc {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if tcp.write_all(GREETING).await.is_err() {
                        return;
                    }
                    let (mut rd, mut wr) = tcp.split();
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                });
            }
        });
        EchoVnc { port, task }
    }
}

impl Drop for EchoVnc {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

/// A running `vncbroker serve`.
struct Node {
    name: String,
    role: &'static str,
    port: u16,
    log_path: PathBuf,
    child: Child,
}

impl Node {
    async fn start(
        dir: &Path,
        db_url: &str,
        config: &Path,
        role: &'static str,
        name: &str,
    ) -> Node {
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut cmd = Command::new(BIN);
        testkit::process::clean_env(&mut cmd)
            .args(["serve", "--config"])
            .arg(config)
            .args(["--database", db_url, "--listen", "127.0.0.1:0"])
            .args(["--role", role, "--node-name", name])
            .env("RUST_LOG", "info")
            .current_dir(dir)
            .stderr(Stdio::from(log));
        let started = log_path.clone();
        let (child, addr) = tokio::task::spawn_blocking(move || {
            testkit::broker::spawn_serve(&mut cmd, &started, START_TIMEOUT)
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("node {name} did not start: {e}"));
        assert!(addr.ip().is_loopback(), "node {name} listens on {addr}");
        Node {
            name: name.to_owned(),
            role,
            port: addr.port(),
            log_path,
            child,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// How often this node's revocation listener has come up.
    fn listens(&self) -> usize {
        self.log()
            .matches("listening for revocation notices")
            .count()
    }

    async fn wait_listening(&self, times: usize) {
        let deadline = Instant::now() + STEP;
        while self.listens() < times {
            assert!(
                Instant::now() < deadline,
                "{}: revocation listener not up ({times}); log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, and wait for the exit.
    async fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("node {} did not stop on SIGTERM", self.name);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs a `vncbroker` admin command on the database.
async fn cli(db_url: &str, args: &[&str], stdin: Option<&str>) -> String {
    let db_url = db_url.to_owned();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        testkit::broker::cli(Path::new(BIN), None, &db_url, None, &args, stdin.as_deref())
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// An API node and proxy nodes on one database, with users and VMs.
struct Cluster {
    dir: tempfile::TempDir,
    db_url: String,
    config: PathBuf,
    _vnc: EchoVnc,
    api: Vec<Node>,
    proxies: Vec<Node>,
}

impl Cluster {
    /// Creates the users and VMs with the CLI, then starts `api` API nodes
    /// and `proxies` proxy nodes. `revocation_check_ms` is the proxies'
    /// periodic look: a minute makes the NOTIFY path the only prompt one.
    async fn start(db_url: &str, api: usize, proxies: usize, revocation_check_ms: u64) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("vncbroker-cluster-")
            .tempdir()
            .unwrap();
        let config = dir.path().join("vncbroker.toml");
        // The nodes' shared key for stored VNC and SPICE passwords.
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).unwrap();
        std::fs::write(
            dir.path().join("vncbroker.key"),
            base64::engine::general_purpose::STANDARD.encode(key),
        )
        .unwrap();
        std::fs::write(
            &config,
            format!(
                "[proxy]\nrevocation_check_ms = {revocation_check_ms}\n\n[secrets]\nkey_file = \"{}\"\n",
                dir.path().join("vncbroker.key").display()
            ),
        )
        .unwrap();
        let vnc = EchoVnc::start().await;
        let vnc_port = vnc.port.to_string();
        for (user, pw, admin) in [
            (ADMIN.0, ADMIN.1, true),
            (ALICE.0, ALICE.1, false),
            (BOB.0, BOB.1, false),
        ] {
            let mut args = vec!["user", "add", user];
            if admin {
                args.push("--admin");
            }
            args.push("--password-stdin");
            cli(db_url, &args, Some(pw)).await;
        }
        for (vm, owner) in [(VM_ALICE, ALICE.0), (VM_BOB, BOB.0)] {
            let id = vm.to_string();
            cli(
                db_url,
                &testkit::broker::vm_add_args(&id, &vnc_port, owner),
                None,
            )
            .await;
        }
        let mut cluster = Cluster {
            dir,
            db_url: db_url.to_owned(),
            config,
            _vnc: vnc,
            api: Vec::new(),
            proxies: Vec::new(),
        };
        cluster.start_nodes(api, proxies).await;
        cluster
    }

    async fn start_nodes(&mut self, api: usize, proxies: usize) {
        for i in 1..=api {
            let node = self.node("api", &format!("api-{i}")).await;
            self.api.push(node);
        }
        for i in 1..=proxies {
            let node = self.node("proxy", &format!("proxy-{i}")).await;
            self.proxies.push(node);
        }
    }

    async fn node(&self, role: &'static str, name: &str) -> Node {
        Node::start(self.dir.path(), &self.db_url, &self.config, role, name).await
    }

    async fn stop_nodes(&mut self) -> (usize, usize) {
        let (api, proxies) = (self.api.len(), self.proxies.len());
        for node in self.api.drain(..).chain(self.proxies.drain(..)) {
            node.stop().await;
        }
        (api, proxies)
    }

    fn api_port(&self) -> u16 {
        self.api[0].port
    }

    /// Mints over JSON on the first API node; panics unless 201.
    async fn mint(&self, who: (&str, &str), vm: i64, body: Value) -> Minted {
        let (status, body) = mint_json(self.api_port(), who, vm, &body).await;
        assert_eq!(status, 201, "mint failed: {body}");
        Minted::from(&body)
    }

    async fn wait_listening(&self, times: usize) {
        for p in &self.proxies {
            p.wait_listening(times).await;
        }
    }
}

struct Minted {
    token: String,
    expires_at: i64,
}

impl Minted {
    fn from(v: &Value) -> Minted {
        Minted {
            token: v["token"].as_str().expect("token").to_owned(),
            expires_at: v["expires_at"].as_i64().expect("expires_at"),
        }
    }
}

// ---------------------------------------------------------------------------
// A minimal HTTP/1.1 client
// ---------------------------------------------------------------------------

fn basic(who: (&str, &str)) -> String {
    let raw = format!("{}:{}", who.0, who.1);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// One request on a new connection; returns the status and the body.
async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let exchange = async {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
             Content-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.unwrap();
        raw
    };
    let raw = tokio::time::timeout(STEP, exchange)
        .await
        .unwrap_or_else(|_| panic!("no HTTP answer to {method} {path} within {STEP:?}"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

async fn mint_json(port: u16, who: (&str, &str), vm: i64, body: &Value) -> (u16, Value) {
    let auth = basic(who);
    let (status, text) = http(
        port,
        "POST",
        &format!("/api/v1/vms/{vm}/console-tokens"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &body.to_string(),
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn revoke_json(port: u16, who: (&str, &str), vm: i64) -> (u16, Value) {
    let auth = basic(who);
    let (status, text) = http(
        port,
        "DELETE",
        &format!("/api/v1/vms/{vm}/console-tokens"),
        &[("Authorization", &auth)],
        "",
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// `GET /api/v1/sessions` as `who`: (vm, user, node) of each session, sorted.
async fn sessions(port: u16, who: (&str, &str)) -> Vec<(i64, String, String)> {
    let mut out: Vec<(i64, String, String)> = session_list(port, who)
        .await
        .iter()
        .map(|s| {
            (
                s["vm_id"].as_i64().unwrap(),
                s["user"].as_str().unwrap().to_owned(),
                s["node"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

/// `GET /api/v1/sessions` as `who`: the sessions' JSON.
async fn session_list(port: u16, who: (&str, &str)) -> Vec<Value> {
    let auth = basic(who);
    let (status, text) = http(
        port,
        "GET",
        "/api/v1/sessions",
        &[("Authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["sessions"]
        .as_array()
        .unwrap_or_else(|| panic!("no sessions array: {v}"))
        .clone()
}

/// Every session's id and the one it continues, oldest first.
async fn linked_sessions(port: u16, who: (&str, &str)) -> Vec<(i64, Option<i64>)> {
    let mut out: Vec<(i64, Option<i64>)> = session_list(port, who)
        .await
        .iter()
        .map(|s| (s["id"].as_i64().unwrap(), s["resumed_from"].as_i64()))
        .collect();
    out.sort();
    out
}

/// `one.vm.novnctoken` over XML-RPC; returns the raw response.
async fn xmlrpc_mint(port: u16, who: (&str, &str), vm: i64) -> (u16, String) {
    let body = format!(
        "<?xml version=\"1.0\"?><methodCall><methodName>one.vm.novnctoken</methodName><params>\
         <param><value><string>{}:{}</string></value></param>\
         <param><value><int>{vm}</int></value></param></params></methodCall>",
        who.0, who.1
    );
    http(
        port,
        "POST",
        "/RPC2",
        &[("Content-Type", "text/xml")],
        &body,
    )
    .await
}

// ---------------------------------------------------------------------------
// A minimal WebSocket client
// ---------------------------------------------------------------------------

struct Ws {
    tcp: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug, PartialEq)]
enum Frame {
    Data(Vec<u8>),
    Close(u16, String),
    /// The connection ended without a close frame.
    Eof,
}

impl Ws {
    /// Upgrades `/websockify?token=...`; panics unless the answer is 101.
    async fn connect(port: u16, token: &str) -> Ws {
        Ws::connect_with(port, token, None).await
    }

    /// The same, with a `Cookie` header.
    async fn connect_with(port: u16, token: &str, cookie: Option<&str>) -> Ws {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let cookie = cookie
            .map(|c| format!("Cookie: {c}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET /websockify?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: binary\r\n{cookie}\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut ws = Ws {
            tcp,
            buf: Vec::new(),
        };
        let head = tokio::time::timeout(STEP, async {
            loop {
                if let Some(end) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&ws.buf[..end]).into_owned();
                    ws.buf.drain(..end + 4);
                    return head;
                }
                assert!(ws.more().await, "connection closed during the upgrade");
            }
        })
        .await
        .expect("no upgrade response");
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        ws
    }

    /// Reads more bytes; false at end of stream.
    async fn more(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn fill(&mut self, n: usize) -> bool {
        while self.buf.len() < n {
            if !self.more().await {
                return false;
            }
        }
        true
    }

    /// The next frame from the server (pings are answered and skipped).
    async fn frame(&mut self, timeout: Duration) -> Frame {
        tokio::time::timeout(timeout, async {
            loop {
                if !self.fill(2).await {
                    return Frame::Eof;
                }
                let opcode = self.buf[0] & 0x0f;
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                let (len, header) = match self.buf[1] & 0x7f {
                    126 => {
                        if !self.fill(4).await {
                            return Frame::Eof;
                        }
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 => {
                        if !self.fill(10).await {
                            return Frame::Eof;
                        }
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&self.buf[2..10]);
                        (u64::from_be_bytes(b) as usize, 10)
                    }
                    n => (n as usize, 2),
                };
                if !self.fill(header + len).await {
                    return Frame::Eof;
                }
                let payload: Vec<u8> = self.buf.drain(..header + len).skip(header).collect();
                match opcode {
                    0..=2 => return Frame::Data(payload),
                    8 => {
                        let code = if payload.len() >= 2 {
                            u16::from_be_bytes([payload[0], payload[1]])
                        } else {
                            1005
                        };
                        let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or(&[]));
                        return Frame::Close(code, reason.into_owned());
                    }
                    9 => self.send_frame(10, &payload).await,
                    _ => continue,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no frame within {timeout:?}"))
    }

    /// Reads data frames until `n` bytes have come.
    async fn read_data(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.frame(STEP).await {
                Frame::Data(d) => out.extend(d),
                other => panic!("expected {n} bytes of data, got {other:?} after {out:?}"),
            }
        }
        out
    }

    /// Reads until a close frame; its code.
    async fn close_code(&mut self, timeout: Duration) -> u16 {
        loop {
            match self.frame(timeout).await {
                Frame::Data(_) => continue,
                Frame::Close(code, _) => return code,
                Frame::Eof => panic!("connection ended without a close frame"),
            }
        }
    }

    async fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        let mask = [0x5a, 0x13, 0xc7, 0x2e];
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n < 65536 => {
                frame.push(0x80 | 126);
                frame.extend((n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend((n as u64).to_be_bytes());
            }
        }
        frame.extend(mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.tcp.write_all(&frame).await.unwrap();
    }

    /// Sends `data` and expects the echo back.
    async fn echo(&mut self, data: &[u8]) {
        self.send_frame(2, data).await;
        assert_eq!(self.read_data(data.len()).await, data, "echo");
    }

    async fn close(mut self) {
        self.send_frame(8, &1000u16.to_be_bytes()).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.frame(STEP)).await;
    }
}

/// Opens a console session: `Ok` once the VNC server's greeting came
/// through, `Err(close code)` if the proxy refused.
async fn console(port: u16, token: &str) -> Result<Ws, u16> {
    let mut ws = Ws::connect(port, token).await;
    match ws.frame(STEP).await {
        Frame::Data(mut first) => {
            if first.len() < GREETING.len() {
                first.extend(ws.read_data(GREETING.len() - first.len()).await);
            }
            assert_eq!(first, GREETING);
            Ok(ws)
        }
        Frame::Close(code, _) => Err(code),
        Frame::Eof => panic!("the proxy closed without a close frame"),
    }
}

/// Asks `port` for the console page's session answer; the reconnect
/// ticket's `name=value`.
async fn reconnect_ticket(port: u16, token: &str) -> String {
    let exchange = async {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let body = json!({ "token": token }).to_string();
        let req = format!(
            "POST /console/session HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.unwrap();
        String::from_utf8_lossy(&raw).into_owned()
    };
    let text = tokio::time::timeout(STEP, exchange)
        .await
        .expect("no answer");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no ticket in {text}"))
        .to_owned()
}

/// A console session that must open, with a working relay.
async fn open_console(node: &Node, token: &str) -> Ws {
    let mut ws = console(node.port, token)
        .await
        .unwrap_or_else(|code| panic!("{} refused the token with {code}", node.name));
    ws.echo(format!("hello from {}", node.name).as_bytes())
        .await;
    ws
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_minted_on_the_api_node_works_on_every_proxy_and_across_restarts() {
    let db = TestDb::create("cluster_restart").await;
    let mut c = Cluster::start(&db.url, 1, 2, 1000).await;
    let long = c.mint(ALICE, VM_ALICE, json!({"ttl": 600})).await;
    // Long enough to outlive the restart, short enough to watch it expire.
    let short = c.mint(ALICE, VM_ALICE, json!({"ttl": 8})).await;
    for p in &c.proxies {
        open_console(p, &long.token).await.close().await;
        open_console(p, &short.token).await.close().await;
    }

    let restart = Instant::now();
    let (api, proxies) = c.stop_nodes().await;
    c.start_nodes(api, proxies).await;
    let restart = restart.elapsed();
    eprintln!("restart: stopping and starting all nodes took {restart:?}");
    assert!(
        now_unix() < short.expires_at - 1,
        "restarting the nodes took {restart:?}, the short token expired meanwhile"
    );
    for p in &c.proxies {
        open_console(p, &long.token).await.close().await;
        open_console(p, &short.token).await.close().await;
    }

    // Until it expires, and not after.
    while now_unix() < short.expires_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in &c.proxies {
        assert_eq!(
            console(p.port, &short.token).await.err(),
            Some(CLOSE_TOKEN),
            "{}",
            p.name
        );
        open_console(p, &long.token).await.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_token_opens_one_session_across_the_cluster() {
    let db = TestDb::create("cluster_single").await;
    let c = Cluster::start(&db.url, 1, 2, 1000).await;
    let once = c
        .mint(ALICE, VM_ALICE, json!({"ttl": 600, "single_use": true}))
        .await;
    const PER_PROXY: usize = 25;
    let start = Arc::new(tokio::sync::Barrier::new(PER_PROXY * c.proxies.len()));
    let mut attempts = Vec::new();
    for p in &c.proxies {
        for _ in 0..PER_PROXY {
            let (port, token, start) = (p.port, once.token.clone(), Arc::clone(&start));
            attempts.push(tokio::spawn(async move {
                start.wait().await;
                console(port, &token).await
            }));
        }
    }
    let mut winners = Vec::new();
    let mut refusals = Vec::new();
    for a in attempts {
        match a.await.unwrap() {
            Ok(ws) => winners.push(ws),
            Err(code) => refusals.push(code),
        }
    }
    assert_eq!(winners.len(), 1, "sessions opened: {}", winners.len());
    assert!(
        refusals.iter().all(|&c| c == CLOSE_TOKEN),
        "refusals: {refusals:?}"
    );
    winners[0].echo(b"the one session relays").await;
    let all = sessions(c.api_port(), ADMIN).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].0, VM_ALICE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_on_the_api_node_ends_sessions_on_every_proxy_within_two_seconds() {
    let db = TestDb::create("cluster_revoke").await;
    // The proxies look for revocations only once a minute by themselves:
    // ending sessions in time takes the NOTIFY from the API node.
    let c = Cluster::start(&db.url, 1, 2, 60_000).await;
    c.wait_listening(1).await;
    let alice = c.mint(ALICE, VM_ALICE, json!({"ttl": 600})).await;
    let bob = c.mint(BOB, VM_BOB, json!({"ttl": 600})).await;
    let mut revoked = Vec::new();
    let mut spared = Vec::new();
    for p in &c.proxies {
        revoked.push(open_console(p, &alice.token).await);
        spared.push(open_console(p, &bob.token).await);
    }

    let started = Instant::now();
    let (status, body) = revoke_json(c.api_port(), ALICE, VM_ALICE).await;
    assert_eq!(
        (status, &body),
        (200, &json!({"revoked": 1, "sessions_ended": 2}))
    );
    for ws in &mut revoked {
        assert_eq!(ws.close_code(PROMPT * 2).await, CLOSE_REVOKED);
    }
    let took = started.elapsed();
    eprintln!("revoke: sessions on both proxies ended after {took:?}");
    assert!(took < PROMPT, "sessions ended {took:?} after the revoke");

    for ws in &mut spared {
        ws.echo(b"another VM's session goes on").await;
    }
    for p in &c.proxies {
        assert_eq!(console(p.port, &alice.token).await.err(), Some(CLOSE_TOKEN));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_every_node_are_listed_on_any_api_node() {
    let db = TestDb::create("cluster_sessions").await;
    let c = Cluster::start(&db.url, 2, 2, 1000).await;
    let alice = c.mint(ALICE, VM_ALICE, json!({"ttl": 600})).await;
    let bob = c.mint(BOB, VM_BOB, json!({"ttl": 600})).await;
    let (p1, p2) = (&c.proxies[0], &c.proxies[1]);
    let ended = open_console(p1, &alice.token).await;
    let _live = [
        open_console(p2, &alice.token).await,
        open_console(p2, &bob.token).await,
    ];
    ended.close().await;

    let row = |vm: i64, user: &str, node: &str| (vm, user.to_owned(), node.to_owned());
    let everyone = vec![
        row(VM_ALICE, ALICE.0, "proxy-1"),
        row(VM_ALICE, ALICE.0, "proxy-2"),
        row(VM_BOB, BOB.0, "proxy-2"),
    ];
    for api in &c.api {
        assert_eq!(sessions(api.port, ADMIN).await, everyone, "{}", api.name);
        assert_eq!(
            sessions(api.port, ALICE).await,
            everyone[..2].to_vec(),
            "{}",
            api.name
        );
        assert_eq!(
            sessions(api.port, BOB).await,
            everyone[2..].to_vec(),
            "{}",
            api.name
        );
    }
    // The proxies serve no API.
    let (status, _) = http(p1.port, "GET", "/api/v1/sessions", &[], "").await;
    assert_eq!(status, 404);
    assert_eq!(c.api[0].role, "api");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_fails_fast_and_the_cluster_recovers_by_itself() {
    // Its own server: this test stops it.
    let server = PgServer::start();
    let db = TestDb::on(&server, "cluster_outage").await;
    let c = Cluster::start(&db.url, 1, 2, 60_000).await;
    c.wait_listening(1).await;
    let before = c.mint(ALICE, VM_ALICE, json!({"ttl": 600})).await;
    let mut running = open_console(&c.proxies[0], &before.token).await;

    server.stop("fast");

    for p in &c.proxies {
        let started = Instant::now();
        let refused = console(p.port, &before.token).await.err();
        let took = started.elapsed();
        eprintln!("outage: {} refused a console after {took:?}", p.name);
        assert_eq!(refused, Some(CLOSE_UNAVAILABLE), "{}", p.name);
        assert!(took < PROMPT, "{}: refused after {took:?}", p.name);
    }
    let started = Instant::now();
    let (status, body) = mint_json(c.api_port(), ALICE, VM_ALICE, &json!({})).await;
    let took = started.elapsed();
    eprintln!("outage: JSON mint answered {status} after {took:?}");
    assert_eq!(status, 503, "{body}");
    assert!(took < PROMPT, "JSON mint failed after {took:?}");
    let started = Instant::now();
    let (status, body) = xmlrpc_mint(c.api_port(), ALICE, VM_ALICE).await;
    let took = started.elapsed();
    eprintln!("outage: XML-RPC mint answered after {took:?}");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("<boolean>0</boolean>") && body.contains("<int>8192</int>"),
        "expected [false, ..., 0x2000]: {body}"
    );
    assert!(took < PROMPT, "XML-RPC mint failed after {took:?}");
    // A running session needs no database.
    running.echo(b"still relaying during the outage").await;

    server.restart();
    let recovered = Instant::now();
    let after = loop {
        let (status, body) = mint_json(c.api_port(), ALICE, VM_ALICE, &json!({"ttl": 600})).await;
        if status == 201 {
            break Minted::from(&body);
        }
        assert!(
            recovered.elapsed() < Duration::from_secs(10),
            "mints still fail 10 s after the database came back: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "outage: mints work again {:?} after the restart",
        recovered.elapsed()
    );
    for p in &c.proxies {
        open_console(p, &after.token).await.close().await;
        open_console(p, &before.token).await.close().await;
    }
    running.echo(b"and after it").await;

    // The revocation listeners reconnected: a revoke still ends the running
    // session at once, with the periodic look a minute away.
    c.wait_listening(2).await;
    let started = Instant::now();
    let (status, _) = revoke_json(c.api_port(), ALICE, VM_ALICE).await;
    assert_eq!(status, 200);
    assert_eq!(running.close_code(PROMPT * 2).await, CLOSE_REVOKED);
    let took = started.elapsed();
    eprintln!("outage: after recovery, a revoke ended the session after {took:?}");
    assert!(took < PROMPT);
}

/// Polls `f` every 50 ms until it is true, or panics with `what`.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What happens to the primary in a failover test.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Failure {
    /// kill -9 of every process: connections to it are refused at once.
    Killed,
    /// SIGSTOP: its kernel still accepts connections, nothing answers.
    Hung,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_primary_dies_and_a_standby_is_promoted_the_cluster_recovers_by_itself() {
    failover(Failure::Killed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_primary_hangs_and_a_standby_is_promoted_the_cluster_recovers_by_itself() {
    failover(Failure::Hung).await;
}

/// A cluster on a primary and its standby; the primary fails as `failure`
/// says, the standby is promoted a second later, and the nodes must find it.
async fn failover(failure: Failure) {
    // A primary and a streaming standby, both with TLS, in synchronous
    // replication: a commit is acknowledged once the standby has it.
    let pki = TestPki::new();
    let primary = PgServer::start_with(&PgOptions {
        tls: Some(pki.server()),
        hba: Vec::new(),
    });
    let standby = Arc::new(PgServer::standby_of(&primary));
    let admin = primary.admin().await;
    eventually("the standby streams", STEP, || async {
        let row = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) == 1
    })
    .await;
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
        "SELECT pg_reload_conf()",
        // The test servers run with synchronous_commit = off, for speed.
        "ALTER ROLE postgres SET synchronous_commit = 'on'",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let db = TestDb::on(&primary, "failover").await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?sslmode=verify-full&sslrootcert={}\
         &target_session_attrs=read-write",
        primary.port(),
        standby.port(),
        db.name,
        pki.ca().display()
    );

    let c = Cluster::start(&url, 1, 1, 60_000).await;
    let proxy = &c.proxies[0];
    c.wait_listening(1).await;
    let before = c.mint(ALICE, VM_ALICE, json!({"ttl": 600})).await;
    let mut running = open_console(proxy, &before.token).await;
    let revoked = c.mint(BOB, VM_BOB, json!({"ttl": 600})).await;
    let (status, _) = revoke_json(c.api_port(), BOB, VM_BOB).await;
    assert_eq!(status, 200);
    // The last token handed out before the primary dies.
    let last = c.mint(ALICE, VM_ALICE, json!({"ttl": 600})).await;

    let killed = Instant::now();
    match failure {
        Failure::Killed => primary.kill_9(),
        Failure::Hung => primary.freeze(),
    }
    // Until a standby is promoted there is nowhere to write: calls fail fast
    // (a hung server only once a call has waited for it, 4 s), the nodes say
    // they are not ready, and the running session goes on.
    let fast = match failure {
        Failure::Killed => PROMPT,
        Failure::Hung => Duration::from_secs(5),
    };
    let started = Instant::now();
    let (status, body) = mint_json(c.api_port(), ALICE, VM_ALICE, &json!({})).await;
    assert_eq!(status, 503, "{body}");
    let refused = started.elapsed();
    assert!(refused < fast, "a mint failed after {refused:?}");
    assert_eq!(
        console(proxy.port, &before.token).await.err(),
        Some(CLOSE_UNAVAILABLE)
    );
    for node in c.api.iter().chain(&c.proxies) {
        let (status, _) = http(node.port, "GET", "/readyz", &[], "").await;
        assert_eq!(status, 503, "{} is ready without a primary", node.name);
        // The metrics still answer, and count the failures.
        let (status, metrics) = http(node.port, "GET", "/metrics", &[], "").await;
        assert_eq!(status, 200, "{}", node.name);
        assert!(
            metrics.contains("vncbroker_store_errors_total{"),
            "{}: no store errors counted:\n{metrics}",
            node.name
        );
    }
    running.echo(b"relaying without a primary").await;
    eprintln!(
        "failover ({failure:?}): without a primary, a mint was refused (503) after {refused:?}"
    );

    // The standby is promoted as a failover tool would, while the nodes keep
    // trying by themselves.
    let promoting = Arc::clone(&standby);
    let promoted = tokio::task::spawn_blocking(move || {
        let asked = killed.elapsed();
        promoting.promote();
        (asked, killed.elapsed())
    });
    let mut failed = 0;
    let after = loop {
        let (status, body) = mint_json(c.api_port(), ALICE, VM_ALICE, &json!({"ttl": 600})).await;
        if status == 201 {
            break Minted::from(&body);
        }
        assert_eq!(status, 503, "while failing over: {body}");
        failed += 1;
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "mints still fail 20 s after the kill: {body}\napi log:\n{}",
            c.api[0].log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = killed.elapsed();
    let (asked, promoted) = promoted.await.unwrap();
    eprintln!(
        "failover ({failure:?}): promotion asked {asked:?} after the primary failed (pg_ctl \
         promote returned after {promoted:?}); first successful mint {took:?} after the \
         failure, {:?} after the promotion was asked ({failed} mints refused with 503 meanwhile)",
        took.saturating_sub(asked)
    );
    let since_promotion = took.saturating_sub(asked);
    assert!(
        since_promotion < Duration::from_secs(5),
        "minting resumed {since_promotion:?} after the promotion was asked"
    );
    if failure == Failure::Killed {
        assert!(
            took < Duration::from_secs(5),
            "minting resumed {took:?} after the kill"
        );
    }

    // The session that was running lived through it.
    running.echo(b"relaying through the failover").await;
    // Both nodes are ready again.
    for node in c.api.iter().chain(&c.proxies) {
        eventually(&format!("{} ready again", node.name), STEP, || async {
            http(node.port, "GET", "/readyz", &[], "").await == (200, "ready".to_owned())
        })
        .await;
    }
    // Tokens handed out before the failover work, including the last one;
    // the revoked one stays revoked; the new one works.
    for token in [&before.token, &last.token, &after.token] {
        open_console(proxy, token).await.close().await;
    }
    assert_eq!(
        console(proxy.port, &revoked.token).await.err(),
        Some(CLOSE_TOKEN)
    );

    // The proxy listens on the new primary: a revoke ends the running
    // session at once.
    c.wait_listening(2).await;
    let started = Instant::now();
    let (status, _) = revoke_json(c.api_port(), ALICE, VM_ALICE).await;
    assert_eq!(status, 200);
    assert_eq!(running.close_code(PROMPT * 2).await, CLOSE_REVOKED);
    let ended = started.elapsed();
    eprintln!(
        "failover ({failure:?}): a revoke on the new primary ended the session after {ended:?}"
    );
    assert!(ended < PROMPT);
    if failure == Failure::Hung {
        primary.kill_9();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_console_comes_back_on_another_node_after_a_drop_or_a_drain() {
    let db = TestDb::create("cluster_reconnect").await;
    let mut c = Cluster::start(&db.url, 1, 2, 1000).await;
    let once = c
        .mint(ALICE, VM_ALICE, json!({"ttl": 600, "single_use": true}))
        .await;
    let (a, b) = (c.proxies[0].port, c.proxies[1].port);

    // Dropped on A: back on B with the ticket A gave.
    let ws = open_console(&c.proxies[0], &once.token).await;
    let ticket = reconnect_ticket(a, &once.token).await;
    drop(ws);
    let mut back = None;
    for _ in 0..50 {
        let mut ws = Ws::connect_with(b, &once.token, Some(&ticket)).await;
        match ws.frame(STEP).await {
            Frame::Data(_) => {
                back = Some(ws);
                break;
            }
            // A has not recorded the drop yet.
            Frame::Close(4425, _) => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("the ticket did not reopen the console on B: {other:?}"),
        }
    }
    let mut on_b = back.expect("still pending after 5 s");
    on_b.echo(b"back on node B").await;

    // B drains (a second SIGTERM closes its sessions with 1001): back on A.
    let ticket = reconnect_ticket(b, &once.token).await;
    let node_b = c.proxies.remove(1);
    let pid = node_b.child.id().to_string();
    for _ in 0..2 {
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(on_b.close_code(Duration::from_secs(40)).await, 1001);
    drop(node_b);
    let mut on_a = Ws::connect_with(a, &once.token, Some(&ticket)).await;
    assert!(
        matches!(on_a.frame(STEP).await, Frame::Data(_)),
        "the ticket did not reopen the console on A after B drained"
    );
    on_a.close().await;

    // Three rows, each continuing the one before.
    let rows = linked_sessions(c.api_port(), ADMIN).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[0].1, None);
    assert_eq!(rows[1].1, Some(rows[0].0));
    assert_eq!(rows[2].1, Some(rows[1].0));
}

/// A SPICE console whose channels land on different proxies: the main
/// channel on one records the session, another channel joins it on the
/// other through the database, a second main channel of the single-use
/// token is refused on either, and one revocation ends both within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spice_consoles_channels_join_it_from_another_proxy() {
    use testkit::spice::{self as sp, Linked};
    const PW: &str = "cluster-Spice-Pw-4q";
    let qemu = testkit::SpiceQemu::start(Some(PW));
    let db = TestDb::create("cluster_spice").await;
    let c = Cluster::start(&db.url, 1, 2, 60_000).await;
    c.wait_listening(1).await;
    let port = qemu.port.to_string();
    let mut add = testkit::broker::vm_add_password_args("3", &port, ALICE.0);
    add.extend(["--protocol", "spice"]);
    // The password is sealed with the nodes' shared key.
    testkit::broker::cli(
        Path::new(BIN),
        Some(&c.config),
        &c.db_url,
        Some(c.dir.path()),
        &add,
        Some(PW),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let once = c
        .mint(ALICE, 3, json!({"ttl": 600, "single_use": true}))
        .await;
    let path = format!("/websockify?token={}", once.token);
    let ws = |port: u16| {
        let path = path.clone();
        async move {
            testkit::Ws::connect(port, &path, &testkit::WsOptions::binary())
                .await
                .unwrap()
        }
    };
    let (a, b) = (c.proxies[0].port, c.proxies[1].port);
    let mut main = ws(a).await;
    assert_eq!(
        sp::link(&mut main, 0, sp::CHANNEL_MAIN).await.unwrap(),
        Linked::Ok
    );
    let session = sp::main_init(&mut main).await.unwrap();
    sp::attach_channels(&mut main).await.unwrap();
    let mut display = ws(b).await;
    assert_eq!(
        sp::link(&mut display, session, sp::CHANNEL_DISPLAY)
            .await
            .unwrap(),
        Linked::Ok
    );
    sp::start_display(&mut display).await.unwrap();
    for port in [a, b] {
        let mut again = ws(port).await;
        assert_eq!(
            sp::link(&mut again, 0, sp::CHANNEL_MAIN).await.unwrap(),
            Linked::Refused(sp::LINK_ERR_PERMISSION_DENIED)
        );
    }
    let at = Instant::now();
    let (status, _) = revoke_json(c.api_port(), ALICE, 3).await;
    assert_eq!(status, 200);
    for conn in [&mut main, &mut display] {
        let (code, _) = conn.expect_close(Duration::from_secs(5)).await;
        assert_eq!(code, CLOSE_REVOKED);
    }
    assert!(at.elapsed() < PROMPT, "{:?}", at.elapsed());
    let rows = session_list(c.api_port(), ADMIN).await;
    let spice: Vec<&Value> = rows.iter().filter(|r| r["vm_id"] == 3).collect();
    assert_eq!(spice.len(), 1, "one row for the console: {rows:?}");
    assert_eq!(spice[0]["protocol"], "spice");
}
