//! Shared harness for the integration tests: the real `vncbroker` binary,
//! real VNC servers (QEMU, TigerVNC's Xvnc), a WebSocket client, a minimal
//! HTTP/1.1 client and the browser side of the RFB handshake.
//!
//! Every process started here is killed and reaped when its handle drops,
//! also when a test panics.
#![allow(dead_code)]

pub mod pg;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vncbroker");

/// The regular user every broker starts with; owns the VMs tests add.
pub const USER: &str = "alice";
pub const USER_PW: &str = "alice-Pw-Kk93vRtY";
/// The node name written into the test config (and so into session rows).
pub const NODE: &str = "itest-node";

/// How long a broker, QEMU or Xvnc may take to come up on a loaded machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(40);
/// Default deadline for one network step (a read, a close frame...).
pub const STEP: Duration = Duration::from_secs(20);

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `<repo>/test-artifacts`, created on demand (ignored by git).
pub fn artifacts_dir() -> PathBuf {
    let d = repo_root().join("test-artifacts");
    std::fs::create_dir_all(&d).expect("creating test-artifacts");
    d
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// Whether something accepts TCP connections on 127.0.0.1:port.
pub fn port_open(port: u16) -> bool {
    StdStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)).is_ok()
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn poll_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a signal with kill(1); std only knows SIGKILL.
fn signal(target: &str, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// SIGTERM, up to `grace` to exit, then SIGKILL; always reaps.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(&child.id().to_string(), "-TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Same for a child that leads its own process group: the whole group goes.
pub fn stop_group(child: &mut Child, grace: Duration) {
    let group = format!("-{}", child.id());
    if let Ok(Some(_)) = child.try_wait() {
        // The leader is gone; stragglers in its group still get killed.
        signal(&group, "-KILL");
        return;
    }
    signal(&group, "-TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    signal(&group, "-KILL");
    let _ = child.kill();
    let _ = child.wait();
}

/// Number of open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The environment for children: no `VNCBROKER_*` overrides from outside.
fn clean_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("VNCBROKER_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

// ---------------------------------------------------------------------------
// The broker
// ---------------------------------------------------------------------------

/// A running `vncbroker serve` on a fresh database in a temp dir.
pub struct Broker {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub db_path: PathBuf,
    pub db_url: String,
    pub port: u16,
    pub log_path: PathBuf,
    child: Child,
}

/// One row of the `sessions` table.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub id: i64,
    pub token_id: Option<i64>,
    pub vm_id: i64,
    pub user_name: String,
    pub client_addr: String,
    pub node: String,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    pub bytes_to_client: i64,
    pub bytes_to_server: i64,
    pub close_reason: Option<String>,
}

/// A token as the JSON API returns it.
#[derive(Debug, Clone)]
pub struct Minted {
    pub token: String,
    pub url: String,
    pub path: String,
    pub expires_at: i64,
    pub ttl: i64,
    pub vm_id: i64,
    pub single_use: bool,
}

impl Minted {
    fn from_json(v: &Value) -> Minted {
        let s = |k: &str| {
            v[k].as_str()
                .unwrap_or_else(|| panic!("mint response lacks string {k}: {v}"))
                .to_owned()
        };
        let i = |k: &str| {
            v[k].as_i64()
                .unwrap_or_else(|| panic!("mint response lacks integer {k}: {v}"))
        };
        Minted {
            token: s("token"),
            url: s("url"),
            path: s("path"),
            expires_at: i("expires_at"),
            ttl: i("ttl"),
            vm_id: i("vm_id"),
            single_use: v["single_use"]
                .as_bool()
                .unwrap_or_else(|| panic!("mint response lacks single_use: {v}")),
        }
    }
}

impl Broker {
    /// Writes a config (plus `extra_toml`, which may hold tables such as
    /// `[proxy]`), creates the user [`USER`] and starts `serve`.
    pub fn start(extra_toml: &str) -> Broker {
        Broker::launch(extra_toml, None)
    }

    /// The same, with the server's open-files limit (soft and hard) set to
    /// `nofile` by prlimit(1).
    pub fn start_with_open_files(extra_toml: &str, nofile: u64) -> Broker {
        Broker::launch(extra_toml, Some(nofile))
    }

    fn launch(extra_toml: &str, nofile: Option<u64>) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("vncbroker-itest-")
            .tempdir()
            .expect("tempdir");
        let db_path = dir.path().join("vncbroker.db");
        let db_url = format!("sqlite://{}", db_path.display());
        assert!(db_url.starts_with("sqlite:///"));
        let config = dir.path().join("vncbroker.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ndatabase = \"{db_url}\"\nnode_name = \"{NODE}\"\n\n{extra_toml}\n"
            ),
        )
        .expect("writing the config");

        // Users first: the CLI creates and migrates the database.
        run_cli(
            &config,
            &db_url,
            dir.path(),
            &["user", "add", USER, "--password-stdin"],
            Some(USER_PW),
        );

        let log_path = dir.path().join("serve.stderr.log");
        let log = File::create(&log_path).expect("creating the log file");
        // prlimit sets the limit and execs the server: same pid.
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        clean_env(&mut cmd)
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--database", &db_url, "--listen", "127.0.0.1:0"])
            .current_dir(dir.path())
            // Verbose logs make the secrets-in-logs checks meaningful.
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().expect("spawning vncbroker serve");

        // The first stdout line, read on a thread so it can time out; the
        // thread then keeps draining stdout.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            for _ in lines {}
        });
        let first = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            other => {
                stop_child(&mut child, Duration::from_secs(2));
                panic!(
                    "vncbroker serve printed no first line ({other:?}); stderr:\n{}",
                    tail(&std::fs::read_to_string(&log_path).unwrap_or_default())
                );
            }
        };
        let port = first
            .strip_prefix("listening on 127.0.0.1:")
            .and_then(|p| p.trim_end().parse::<u16>().ok())
            .filter(|p| *p != 0);
        let Some(port) = port else {
            stop_child(&mut child, Duration::from_secs(2));
            panic!("unexpected first stdout line {first:?}");
        };
        Broker {
            dir,
            config,
            db_path,
            db_url,
            port,
            log_path,
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn fd_count(&self) -> usize {
        fd_count(self.pid())
    }

    /// Panics (with the log tail) if the server has exited.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "vncbroker exited with {status}; log:\n{}",
                tail(&self.log())
            );
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs a CLI subcommand against this broker's config and database.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> String {
        run_cli(&self.config, &self.db_url, self.dir.path(), args, stdin)
    }

    pub fn add_user(&self, name: &str, password: &str, admin: bool) {
        let mut args = vec!["user", "add", name];
        if admin {
            args.push("--admin");
        }
        args.push("--password-stdin");
        self.cli(&args, Some(password));
    }

    /// Registers VM `id` at 127.0.0.1:`port`, owned by [`USER`], with the
    /// VNC password stored if given.
    pub fn add_vm(&self, id: i64, port: u16, vnc_password: Option<&str>) {
        let id_s = id.to_string();
        let port_s = port.to_string();
        let mut args = vec![
            "vm",
            "add",
            &id_s,
            "--host",
            "127.0.0.1",
            "--port",
            &port_s,
            "--owner",
            USER,
        ];
        if vnc_password.is_some() {
            args.push("--password-stdin");
        }
        self.cli(&args, vnc_password);
    }

    /// Mints a token over the JSON API (HTTP Basic as `user`).
    pub async fn mint(
        &self,
        vm: i64,
        user: &str,
        pw: &str,
        ttl: Option<i64>,
        single_use: bool,
    ) -> Minted {
        let mut body = serde_json::Map::new();
        if let Some(ttl) = ttl {
            body.insert("ttl".into(), ttl.into());
        }
        body.insert("single_use".into(), single_use.into());
        let body = Value::Object(body).to_string();
        let r = http_request(
            self.port,
            "POST",
            &format!("/api/v1/vms/{vm}/console-tokens"),
            &[
                ("Authorization", basic_auth(user, pw)),
                ("Content-Type", "application/json".into()),
            ],
            body.as_bytes(),
        )
        .await;
        assert_eq!(
            r.status,
            201,
            "minting for VM {vm} failed: {}",
            String::from_utf8_lossy(&r.body)
        );
        let v: Value = serde_json::from_slice(&r.body).expect("mint response is JSON");
        let m = Minted::from_json(&v);
        assert_eq!(m.vm_id, vm);
        assert_eq!(m.single_use, single_use);
        m
    }

    /// Mints as [`USER`], reusable, default lifetime.
    pub async fn mint_default(&self, vm: i64) -> Minted {
        self.mint(vm, USER, USER_PW, None, false).await
    }

    /// Revokes every token of `vm` over the JSON API; returns `revoked`.
    pub async fn revoke(&self, vm: i64, user: &str, pw: &str) -> i64 {
        let r = http_request(
            self.port,
            "DELETE",
            &format!("/api/v1/vms/{vm}/console-tokens"),
            &[("Authorization", basic_auth(user, pw))],
            b"",
        )
        .await;
        assert_eq!(
            r.status,
            200,
            "revoking VM {vm} failed: {}",
            String::from_utf8_lossy(&r.body)
        );
        let v: Value = serde_json::from_slice(&r.body).expect("revoke response is JSON");
        v["revoked"]
            .as_i64()
            .unwrap_or_else(|| panic!("no revoked count in {v}"))
    }

    /// Opens a WebSocket to `path_and_query` (e.g. `/websockify?token=...`).
    pub async fn ws(&self, path_and_query: &str) -> Ws {
        Ws::connect(self.port, path_and_query, &WsOptions::default())
            .await
            .unwrap_or_else(|e| panic!("WebSocket to {path_and_query}: {e}"))
    }

    /// Opens `/websockify?token=T` offering the `binary` subprotocol, as
    /// noVNC does.
    pub async fn ws_token(&self, token: &str) -> Ws {
        Ws::connect(
            self.port,
            &format!("/websockify?token={token}"),
            &WsOptions::binary(),
        )
        .await
        .unwrap_or_else(|e| panic!("WebSocket with a token: {e}"))
    }

    /// All rows of the `sessions` table, oldest first.
    pub fn sessions(&self) -> Vec<SessionRow> {
        sqlite_session_rows(&self.db_path)
    }

    /// Waits until `count` session rows exist and all have ended.
    pub async fn ended_sessions(&self, count: usize) -> Vec<SessionRow> {
        poll_until(&format!("{count} ended session rows"), STEP, || {
            let rows = self.sessions();
            (rows.len() == count && rows.iter().all(|r| r.ended_at.is_some())).then_some(rows)
        })
        .await
    }

    /// Waits until the broker holds at most `baseline` fds again.
    pub async fn assert_fds_settle(&self, baseline: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.fd_count();
            if now <= baseline {
                return;
            }
            if Instant::now() >= deadline {
                let listing = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                    .map(|d| {
                        d.filter_map(|e| e.ok())
                            .map(|e| {
                                format!(
                                    "{} -> {}",
                                    e.file_name().to_string_lossy(),
                                    std::fs::read_link(e.path())
                                        .map(|p| p.display().to_string())
                                        .unwrap_or_default()
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default();
                panic!("{what}: the broker holds {now} fds, {baseline} before:\n{listing}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
        if std::thread::panicking() {
            eprintln!(
                "--- vncbroker stderr (tail) ---\n{}\n--- end ---",
                tail(&self.log())
            );
        }
    }
}

fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(6000);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn run_cli(config: &Path, db_url: &str, cwd: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = Command::new(BIN);
    clean_env(&mut cmd)
        .args(args)
        .arg("--config")
        .arg(config)
        .args(["--database", db_url])
        .current_dir(cwd)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning the vncbroker CLI");
    if let Some(input) = stdin {
        let mut w = child.stdin.take().unwrap();
        writeln!(w, "{input}").unwrap();
    }
    let out = child.wait_with_output().expect("waiting for the CLI");
    assert!(
        out.status.success(),
        "vncbroker {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------
// HTTP/1.1
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

pub fn basic_auth(user: &str, pw: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

/// One request on its own connection (`Connection: close`), read to EOF.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> HttpResponse {
    let fut = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await?;
        s.write_all(body).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no complete response within {STEP:?}"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    parse_response(&raw).unwrap_or_else(|| {
        panic!(
            "{method} {path}: malformed response {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n")?;
            let size_text = std::str::from_utf8(&rest[..nl]).ok()?;
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
        body = out;
    }
    Some(HttpResponse {
        status,
        headers,
        body,
    })
}

// ---------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Clone)]
pub struct WsOptions {
    /// Subprotocols to offer in `Sec-WebSocket-Protocol`.
    pub protocols: Vec<String>,
    /// A `Cookie` header.
    pub cookie: Option<String>,
}

impl WsOptions {
    pub fn binary() -> WsOptions {
        WsOptions {
            protocols: vec!["binary".into()],
            cookie: None,
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
            let tcp = TcpStream::connect(("127.0.0.1", port))
                .await
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

// ---------------------------------------------------------------------------
// RFB, browser side
// ---------------------------------------------------------------------------

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

/// A well-formed token (43 base64url characters) that was never minted.
pub fn unknown_token() -> String {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).unwrap();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

// ---------------------------------------------------------------------------
// Real VNC servers
// ---------------------------------------------------------------------------

/// QEMU (TCG, no disk) with its VNC server on 127.0.0.1, password set over QMP.
pub struct Qemu {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
    pub log_path: PathBuf,
}

impl Qemu {
    pub fn start(password: &str) -> Qemu {
        let mut last_err = String::new();
        for _ in 0..4 {
            match Qemu::try_start(password) {
                Ok(q) => return q,
                Err(e) => last_err = e,
            }
        }
        panic!("QEMU did not start: {last_err}");
    }

    fn try_start(password: &str) -> Result<Qemu, String> {
        let dir = tempfile::Builder::new()
            .prefix("vncbroker-qemu-")
            .tempdir()
            .unwrap();
        let qmp = dir.path().join("qmp.sock");
        let log_path = dir.path().join("qemu.log");
        // QEMU listens on 5900 + N; use a port the OS just handed out.
        let port = loop {
            let p = free_port();
            if p > 5900 {
                break p;
            }
        };
        let display = port - 5900;
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "accel=tcg",
                "-display",
                "none",
                "-nodefaults",
                "-vga",
                "std",
                "-m",
                "64",
                "-vnc",
                &format!("127.0.0.1:{display},password=on"),
                "-qmp",
                &format!("unix:{},server=on,wait=off", qmp.display()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(&log_path).unwrap()))
            .spawn()
            .map_err(|e| format!("spawning qemu-system-x86_64: {e}"))?;
        let fail = |child: &mut Child, why: String| {
            stop_child(child, Duration::from_secs(3));
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            Err(format!("{why}; qemu stderr: {log}"))
        };
        // QMP: wait for the socket, then set the VNC password.
        let deadline = Instant::now() + START_TIMEOUT;
        let stream = loop {
            if let Ok(Some(st)) = child.try_wait() {
                return fail(&mut child, format!("qemu exited with {st}"));
            }
            if let Ok(s) = std::os::unix::net::UnixStream::connect(&qmp) {
                break s;
            }
            if Instant::now() > deadline {
                return fail(&mut child, "no QMP socket".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut read_reply = |what: &str| -> Result<Value, String> {
            loop {
                let mut line = String::new();
                reader
                    .read_line(&mut line)
                    .map_err(|e| format!("QMP read ({what}): {e}"))?;
                if line.is_empty() {
                    return Err(format!("QMP closed ({what})"));
                }
                let v: Value =
                    serde_json::from_str(&line).map_err(|e| format!("QMP JSON {line:?}: {e}"))?;
                // Skip asynchronous events.
                if v.get("event").is_some() {
                    continue;
                }
                return Ok(v);
            }
        };
        let greeting = read_reply("greeting")?;
        if greeting.get("QMP").is_none() {
            return fail(&mut child, format!("QMP greeting {greeting}"));
        }
        for cmd in [
            serde_json::json!({"execute": "qmp_capabilities"}),
            serde_json::json!({"execute": "change-vnc-password",
                               "arguments": {"password": password}}),
        ] {
            writeln!(writer, "{cmd}").map_err(|e| format!("QMP write: {e}"))?;
            let reply = read_reply("command")?;
            if reply.get("return").is_none() {
                return fail(&mut child, format!("QMP {cmd} answered {reply}"));
            }
        }
        drop(writer);
        while !port_open(port) {
            if let Ok(Some(st)) = child.try_wait() {
                return fail(&mut child, format!("qemu exited with {st}"));
            }
            if Instant::now() > deadline {
                return fail(&mut child, format!("VNC port {port} never accepted"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Qemu {
            child,
            port,
            _dir: dir,
            log_path,
        })
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(3));
    }
}

/// TigerVNC's Xvnc on 127.0.0.1 with an 800x600 screen.
pub struct Xvnc {
    child: Child,
    pub port: u16,
    pub display: u32,
    _dir: tempfile::TempDir,
    pub log_path: PathBuf,
}

static NEXT_DISPLAY: AtomicU32 = AtomicU32::new(0);

impl Xvnc {
    /// With VNC authentication and this password.
    pub fn start(password: &str) -> Xvnc {
        Xvnc::start_with(Some(password))
    }

    /// Without authentication (`-SecurityTypes None`).
    pub fn start_no_auth() -> Xvnc {
        Xvnc::start_with(None)
    }

    fn start_with(password: Option<&str>) -> Xvnc {
        let mut last_err = String::new();
        for _ in 0..8 {
            match Xvnc::try_start(password) {
                Ok(x) => return x,
                Err(e) => last_err = e,
            }
        }
        panic!("Xvnc did not start: {last_err}");
    }

    fn next_display() -> u32 {
        // Spread test binaries apart by pid; skip displays in use.
        let base = 100 + (std::process::id() % 100) * 20;
        loop {
            let d = base + NEXT_DISPLAY.fetch_add(1, Ordering::Relaxed) % 2000;
            let lock = format!("/tmp/.X{d}-lock");
            let sock = format!("/tmp/.X11-unix/X{d}");
            if !Path::new(&lock).exists() && !Path::new(&sock).exists() {
                return d;
            }
        }
    }

    fn try_start(password: Option<&str>) -> Result<Xvnc, String> {
        let dir = tempfile::Builder::new()
            .prefix("vncbroker-xvnc-")
            .tempdir()
            .unwrap();
        let log_path = dir.path().join("xvnc.log");
        let mut security = vec!["-SecurityTypes".to_string()];
        if let Some(pw) = password {
            let pw_file = dir.path().join("passwd");
            let out = Command::new("vncpasswd")
                .arg("-f")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    writeln!(c.stdin.take().unwrap(), "{pw}")?;
                    c.wait_with_output()
                })
                .map_err(|e| format!("vncpasswd -f: {e}"))?;
            if !out.status.success() || out.stdout.is_empty() {
                return Err(format!(
                    "vncpasswd -f failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            std::fs::write(&pw_file, &out.stdout).unwrap();
            security.push("VncAuth".into());
            security.push("-PasswordFile".into());
            security.push(pw_file.display().to_string());
        } else {
            security.push("None".into());
        }
        let display = Xvnc::next_display();
        let port = free_port();
        let mut child = Command::new("Xvnc")
            .arg(format!(":{display}"))
            .args(["-rfbport", &port.to_string()])
            .args(&security)
            .args([
                "-nolisten",
                "tcp",
                "-interface",
                "127.0.0.1",
                "-geometry",
                "800x600",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(&log_path).unwrap()))
            .spawn()
            .map_err(|e| format!("spawning Xvnc: {e}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        while !port_open(port) {
            let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("Xvnc :{display} exited with {st}: {}", log()));
            }
            if Instant::now() > deadline {
                stop_child(&mut child, Duration::from_secs(3));
                return Err(format!(
                    "Xvnc :{display} never accepted on {port}: {}",
                    log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Xvnc {
            child,
            port,
            display,
            _dir: dir,
            log_path,
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// How many connections Xvnc has accepted so far (from its log).
    pub fn accepted(&self) -> usize {
        self.log().matches("Connections: accepted:").count()
    }
}

impl Drop for Xvnc {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(3));
        let _ = std::fs::remove_file(format!("/tmp/.X{}-lock", self.display));
        let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{}", self.display));
    }
}

// ---------------------------------------------------------------------------
// Misbehaving peers and the plain passthrough target
// ---------------------------------------------------------------------------

/// A TCP server that accepts connections, counts them and hands each to
/// `serve` on its own task. Dropped with the test's runtime.
pub struct TinyServer {
    pub port: u16,
    pub accepted: std::sync::Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl TinyServer {
    pub async fn start<F, Fut>(serve: F) -> TinyServer
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(AtomicU32::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s));
            }
        });
        TinyServer {
            port,
            accepted,
            task,
        }
    }

    pub fn accepted(&self) -> u32 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TinyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port on which nothing listens (bound, then released).
pub fn closed_port() -> u16 {
    let p = free_port();
    assert!(!port_open(p), "port {p} should be closed");
    p
}

/// Reads a file fully (for a small log or screenshot).
pub fn read_file(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    v
}

// ---------------------------------------------------------------------------
// Signals and exit (operations tests)
// ---------------------------------------------------------------------------

impl Broker {
    /// Sends `sig` (e.g. "-HUP", "-TERM") to the server process.
    pub fn signal(&self, sig: &str) {
        signal(&self.child.id().to_string(), sig);
    }

    /// Waits up to `timeout` for the server to exit; `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// All rows of the `sessions` table of an SQLite database, oldest first.
pub fn sqlite_session_rows(path: &Path) -> Vec<SessionRow> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("opening the database read-only");
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut st = conn
        .prepare(
            "SELECT id, token_id, vm_id, user_name, client_addr, node, started_at, ended_at,
                    bytes_to_client, bytes_to_server, close_reason
               FROM sessions ORDER BY id",
        )
        .unwrap();
    st.query_map([], |r| {
        Ok(SessionRow {
            id: r.get(0)?,
            token_id: r.get(1)?,
            vm_id: r.get(2)?,
            user_name: r.get(3)?,
            client_addr: r.get(4)?,
            node: r.get(5)?,
            started_at: r.get(6)?,
            ended_at: r.get(7)?,
            bytes_to_client: r.get(8)?,
            bytes_to_server: r.get(9)?,
            close_reason: r.get(10)?,
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}
