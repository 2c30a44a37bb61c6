//! Fault injection against real processes: a node killed with SIGKILL, a
//! locked SQLite file, VNC servers that die or reset mid-session, clients
//! that vanish without a close frame, and a client that stops reading while
//! its VNC server floods.
//!
//! Every test checks that nothing is lost or leaked: relayed bytes arrive
//! in order, session rows end with the right reason and byte counts (or,
//! where nothing can record the end, stay open as documented), the broker's
//! file descriptors settle back to their baseline, and `/metrics` reports
//! no live session afterwards.
//!
//! The VNC servers are tiny TCP servers (echo, scripted, flooding) except in
//! the SIGKILL test of a real Xvnc. VMs without a stored VNC password make
//! the proxy a plain passthrough, so every byte can be accounted for.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use testkit::pg::TestDb;
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_vncbroker");

/// How fast a broken connection must be noticed and reported.
const PROMPT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------
// VNC server stand-ins that report how their connections ended
// ---------------------------------------------------------------------------

/// What a stand-in VNC server saw of the connections the proxy made to it.
#[derive(Default)]
struct Peer {
    /// Connections open right now.
    live: AtomicI64,
    /// How each finished connection ended ("eof" or "error: ...").
    ended: Mutex<Vec<String>>,
    /// Bytes written so far (the flooding servers).
    written: AtomicU64,
}

impl Peer {
    fn live(&self) -> i64 {
        self.live.load(Ordering::SeqCst)
    }

    fn ended(&self) -> Vec<String> {
        self.ended.lock().unwrap().clone()
    }

    async fn wait_live(&self, n: i64, what: &str) {
        let deadline = Instant::now() + STEP;
        while self.live() != n {
            assert!(
                Instant::now() < deadline,
                "{what}: the VNC server still has {} connections, expected {n}; ended: {:?}",
                self.live(),
                self.ended()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Echoes every byte; records how each connection ended.
async fn echo_target() -> (TinyServer, Arc<Peer>) {
    let peer = Arc::new(Peer::default());
    let p = Arc::clone(&peer);
    let server = TinyServer::start(move |mut s: TcpStream| {
        let p = Arc::clone(&p);
        async move {
            p.live.fetch_add(1, Ordering::SeqCst);
            let (mut r, mut w) = s.split();
            let how = match tokio::io::copy(&mut r, &mut w).await {
                Ok(_) => "eof".to_string(),
                Err(e) => format!("error: {e}"),
            };
            p.ended.lock().unwrap().push(how);
            p.live.fetch_sub(1, Ordering::SeqCst);
        }
    })
    .await;
    (server, peer)
}

/// The byte at offset `n` of the flooding servers' stream: a hash of the
/// offset, so a lost, repeated or reordered piece is caught at once.
fn pattern(n: u64) -> u8 {
    (n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

fn fill_pattern(buf: &mut [u8], from: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(from + i as u64);
    }
}

/// Writes [`pattern`] in 64 KiB writes, `total` bytes in all (`None`: until
/// a write fails), counting what the kernel took; then waits for the proxy
/// to hang up.
async fn flood_target(total: Option<u64>) -> (TinyServer, Arc<Peer>) {
    let peer = Arc::new(Peer::default());
    let p = Arc::clone(&peer);
    let server = TinyServer::start(move |mut s: TcpStream| {
        let p = Arc::clone(&p);
        async move {
            p.live.fetch_add(1, Ordering::SeqCst);
            let mut chunk = vec![0u8; 64 * 1024];
            let mut off = 0u64;
            let mut how = None;
            while total.is_none_or(|t| off < t) {
                let n = total.map_or(chunk.len() as u64, |t| (t - off).min(chunk.len() as u64));
                let n = n as usize;
                fill_pattern(&mut chunk[..n], off);
                if let Err(e) = s.write_all(&chunk[..n]).await {
                    how = Some(format!("error: {e}"));
                    break;
                }
                off += n as u64;
                p.written.store(off, Ordering::SeqCst);
            }
            let how = match how {
                Some(h) => h,
                None => {
                    let mut b = [0u8; 4096];
                    loop {
                        match s.read(&mut b).await {
                            Ok(0) => break "eof".to_string(),
                            Ok(_) => {}
                            Err(e) => break format!("error: {e}"),
                        }
                    }
                }
            };
            p.ended.lock().unwrap().push(how);
            p.live.fetch_sub(1, Ordering::SeqCst);
        }
    })
    .await;
    (server, peer)
}

// ---------------------------------------------------------------------------
// Nodes on a shared database (SQLite file or PostgreSQL)
// ---------------------------------------------------------------------------

/// A `vncbroker serve` process on a database other nodes may share.
struct Node {
    name: String,
    port: u16,
    log_path: PathBuf,
    child: Child,
}

impl Node {
    fn start(dir: &Path, config: &Path, db_url: &str, name: &str) -> Node {
        let log_path = dir.join(format!("{name}.stderr.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(BIN);
        clean_env(&mut cmd)
            .args(["serve", "--config"])
            .arg(config)
            .args(["--database", db_url, "--listen", "127.0.0.1:0"])
            .args(["--node-name", name])
            .env("RUST_LOG", "info")
            .current_dir(dir)
            .stderr(Stdio::from(log));
        let (child, addr) = spawn_serve(&mut cmd, &log_path, START_TIMEOUT)
            .unwrap_or_else(|e| panic!("node {name} did not start: {e}"));
        Node {
            name: name.to_owned(),
            port: addr.port(),
            log_path,
            child,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn kill9(&mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaping the killed node")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
        if std::thread::panicking() {
            eprintln!(
                "--- {} stderr (tail) ---\n{}\n--- end ---",
                self.name,
                tail(&self.log())
            );
        }
    }
}

/// Runs a `vncbroker` admin command against `db_url`.
fn cli(dir: &Path, config: &Path, db_url: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut cmd = Command::new(BIN);
    clean_env(&mut cmd)
        .args(args)
        .arg("--config")
        .arg(config)
        .args(["--database", db_url])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning the vncbroker CLI");
    {
        let mut w = child.stdin.take().unwrap();
        if let Some(input) = stdin {
            writeln!(w, "{input}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "vncbroker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Mints a reusable token as [`USER`] on `port`'s JSON API.
async fn mint_on(port: u16, vm: i64) -> String {
    let r = http_request(
        port,
        "POST",
        &format!("/api/v1/vms/{vm}/console-tokens"),
        &[
            ("Authorization", basic_auth(USER, USER_PW)),
            ("Content-Type", "application/json".into()),
        ],
        br#"{"ttl": 600}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    v["token"].as_str().unwrap().to_owned()
}

/// The port of a `postgres://...@host:PORT/db` URL.
fn url_port(url: &str) -> Option<u16> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let hostport = authority.rsplit('@').next()?;
    hostport.rsplit_once(':')?.1.parse().ok()
}

/// Every row of the `sessions` table of an SQLite or PostgreSQL database.
async fn session_rows(db_url: &str) -> Vec<SessionRow> {
    if let Some(path) = db_url.strip_prefix("sqlite://") {
        return sqlite_session_rows(Path::new(path));
    }
    let (client, conn) = tokio_postgres::connect(db_url, tokio_postgres::NoTls)
        .await
        .expect("connecting to PostgreSQL");
    let driver = tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT id, token_id, vm_id, user_name, client_addr, node, started_at, ended_at,
                    bytes_to_client, bytes_to_server, close_reason, resumed_from
               FROM sessions ORDER BY id",
            &[],
        )
        .await
        .expect("reading the sessions table");
    drop(client);
    let _ = driver.await;
    rows.iter()
        .map(|r| SessionRow {
            id: r.get(0),
            token_id: r.get(1),
            vm_id: r.get(2),
            user_name: r.get(3),
            client_addr: r.get(4),
            node: r.get(5),
            started_at: r.get(6),
            ended_at: r.get(7),
            bytes_to_client: r.get(8),
            bytes_to_server: r.get(9),
            close_reason: r.get(10),
            resumed_from: r.get(11),
        })
        .collect()
}

/// Polls the sessions table until `done` holds; returns those rows.
async fn wait_rows(
    db_url: &str,
    what: &str,
    done: impl Fn(&[SessionRow]) -> bool,
) -> Vec<SessionRow> {
    let deadline = Instant::now() + STEP;
    loop {
        let rows = session_rows(db_url).await;
        if done(&rows) {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; rows: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// File descriptors, memory and metrics
// ---------------------------------------------------------------------------

/// Socket inodes of TCP connections whose remote port is `port`.
fn sockets_to_port(port: u16) -> HashSet<String> {
    let mut out = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let remote = f[2].rsplit(':').next().unwrap_or("");
            if u16::from_str_radix(remote, 16).ok() == Some(port) {
                out.insert(format!("socket:[{}]", f[9]));
            }
        }
    }
    out
}

/// The process's open fds, without its connections to the database (a
/// PostgreSQL pool grows on demand and keeps its connections): the count,
/// and a listing for failure messages.
fn app_fds(pid: u32, db_port: Option<u16>) -> (usize, String) {
    let db = db_port.map(sockets_to_port).unwrap_or_default();
    let mut n = 0;
    let mut listing = String::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            let target = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            if db.contains(&target) {
                continue;
            }
            n += 1;
            listing.push_str(&format!(
                "{} -> {target}\n",
                e.file_name().to_string_lossy()
            ));
        }
    }
    (n, listing)
}

/// The fd count once it has held still for half a second.
async fn steady_fds(pid: u32, db_port: Option<u16>) -> usize {
    steady_count(|| app_fds(pid, db_port).0).await
}

/// Waits until the process holds at most `baseline` fds (database
/// connections aside) again.
async fn settle_fds(pid: u32, db_port: Option<u16>, baseline: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (now, listing) = app_fds(pid, db_port);
        if now <= baseline {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {now} fds, {baseline} before:\n{listing}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// A series' value in the node's `/metrics` (0 when absent).
async fn metric_on(port: u16, series: &str) -> f64 {
    metric(&scrape(port).await, series)
}

/// Waits for `vncbroker_sessions_active` to be 0 on the node at `port`.
async fn no_live_sessions(port: u16, what: &str) {
    let deadline = Instant::now() + STEP;
    loop {
        let n = metric_on(port, "vncbroker_sessions_active").await;
        if n == 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: vncbroker_sessions_active is still {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// A console session through the proxy at `port`, with what was sent.
struct Console {
    ws: Ws,
    /// Bytes sent (and, with the echo server, echoed) so far.
    sent: u64,
    addr: String,
}

impl Console {
    async fn open(port: u16, token: &str) -> Console {
        let ws = Ws::connect(
            port,
            &format!("/websockify?token={token}"),
            &WsOptions::binary(),
        )
        .await
        .unwrap_or_else(|e| panic!("WebSocket to port {port}: {e}"));
        let addr = ws.stream.get_ref().local_addr().unwrap().to_string();
        Console { ws, sent: 0, addr }
    }

    /// Sends `data` and expects the echo back.
    async fn echo(&mut self, data: &[u8]) {
        self.ws.send(data).await.expect("sending through the proxy");
        let back = self
            .ws
            .read_exact(data.len())
            .await
            .unwrap_or_else(|e| panic!("no echo of {} bytes: {e}", data.len()));
        assert_eq!(back, data, "the echo differs");
        self.sent += data.len() as u64;
    }

    fn tcp(&self) -> &TcpStream {
        self.ws.stream.get_ref()
    }
}

/// Exercises the node once (a mint, a refusal, a whole session) so that
/// lazily opened resources exist, then returns its steady fd count.
async fn warm_node(port: u16, pid: u32, token: &str, db_port: Option<u16>) -> usize {
    let mut bad = Ws::connect(
        port,
        &format!("/websockify?token={}", unknown_token()),
        &WsOptions::binary(),
    )
    .await
    .unwrap();
    assert_eq!(bad.expect_close(STEP).await.0, 4401);
    drop(bad);
    let mut c = Console::open(port, token).await;
    c.echo(b"warming up").await;
    c.ws.close_normal().await;
    drop(c);
    no_live_sessions(port, "after the warm-up session").await;
    steady_fds(pid, db_port).await
}

fn row_of<'a>(rows: &'a [SessionRow], node: &str, addr: &str) -> &'a SessionRow {
    rows.iter()
        .find(|r| r.node == node && r.client_addr == addr)
        .unwrap_or_else(|| panic!("no session row for {addr} on {node}: {rows:#?}"))
}

/// Each session from an `(addr, sent)` pair ended for `reason`, with `sent`
/// bytes each way (the server echoes).
fn assert_echoed_and_ended(rows: &[SessionRow], ends: &[(String, u64)], reason: &str) {
    for (addr, sent) in ends {
        let r = row_of(rows, NODE, addr);
        assert_eq!(r.close_reason.as_deref(), Some(reason), "{r:?}");
        assert_eq!(
            (r.bytes_to_client as u64, r.bytes_to_server as u64),
            (*sent, *sent),
            "{r:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 1. A node killed with SIGKILL
// ---------------------------------------------------------------------------

/// Two proxy nodes on one database, live sessions on both; node A gets
/// SIGKILL. Node B's sessions relay on, A's clients come back on B with the
/// same reusable token. A's session rows stay open: a killed process cannot
/// record an end, and no other node closes rows on its behalf.
async fn a_killed_node(db_url: &str, db_port: Option<u16>) {
    let (echo_server, echo) = echo_target().await;
    let dir = tempfile::Builder::new()
        .prefix("vncbroker-faults-")
        .tempdir()
        .unwrap();
    let config = dir.path().join("vncbroker.toml");
    std::fs::write(&config, "[tokens]\npurge_interval = 3600\n").unwrap();
    cli(
        dir.path(),
        &config,
        db_url,
        &["user", "add", USER, "--password-stdin"],
        Some(USER_PW),
    );
    let echo_port = echo_server.port.to_string();
    cli(
        dir.path(),
        &config,
        db_url,
        &vm_add_args("1", &echo_port, USER),
        None,
    );
    let mut a = Node::start(dir.path(), &config, db_url, "node-a");
    let b = Node::start(dir.path(), &config, db_url, "node-b");
    let token = mint_on(b.port, 1).await;
    warm_node(a.port, a.pid(), &token, db_port).await;
    let baseline_b = warm_node(b.port, b.pid(), &token, db_port).await;
    echo.wait_live(0, "after the warm-up").await;

    const PER_NODE: usize = 3;
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for i in 0..PER_NODE {
        let mut c = Console::open(a.port, &token).await;
        c.echo(format!("to node A, session {i}").as_bytes()).await;
        on_a.push(c);
        let mut c = Console::open(b.port, &token).await;
        c.echo(format!("to node B, session {i}").as_bytes()).await;
        on_b.push(c);
    }
    // The warm-up rows (ended) and the six live ones.
    wait_rows(db_url, "six live session rows", |rows| {
        rows.len() == 2 + 2 * PER_NODE
            && rows.iter().filter(|r| r.ended_at.is_none()).count() == 2 * PER_NODE
    })
    .await;
    assert_eq!(echo.live(), 2 * PER_NODE as i64);

    let status = a.kill9();
    let killed = Instant::now();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "node A: {status}");

    // A's clients see their connections end, without a close frame (nobody
    // was left to send one), and promptly.
    for c in &mut on_a {
        match c.ws.expect_end(PROMPT).await {
            WsEnd::Eof | WsEnd::Error(_) => {}
            other => panic!("a client of the killed node saw {other:?}"),
        }
    }
    // The kernel closed A's connections to the VNC server too.
    echo.wait_live(PER_NODE as i64, "after the kill").await;
    eprintln!(
        "kill -9: node A's clients and VNC connections closed within {:?}",
        killed.elapsed()
    );

    // B relays on.
    for round in 0..5 {
        for (i, c) in on_b.iter_mut().enumerate() {
            c.echo(format!("B session {i}, round {round}, after A died").as_bytes())
                .await;
        }
    }
    // A's clients reconnect, to B, with the same reusable token.
    let mut moved = Vec::new();
    for i in 0..PER_NODE {
        let mut c = Console::open(b.port, &token).await;
        for round in 0..3 {
            c.echo(format!("client {i} of A, now on B, round {round}").as_bytes())
                .await;
        }
        moved.push(c);
    }
    let big: Vec<u8> = (0..200_000u32).map(|i| pattern(i as u64)).collect();
    moved[0].echo(&big).await;
    on_b[0].echo(&big).await;

    let live_b: Vec<Console> = on_b.into_iter().chain(moved).collect();
    for c in &live_b {
        assert!(c.sent > 0);
    }
    let expect: Vec<(String, u64)> = live_b.iter().map(|c| (c.addr.clone(), c.sent)).collect();
    for mut c in live_b {
        c.ws.close_normal().await;
    }

    let rows = wait_rows(db_url, "node B's sessions to end", |rows| {
        rows.iter()
            .filter(|r| r.node == "node-b")
            .all(|r| r.ended_at.is_some())
            && rows.iter().filter(|r| r.node == "node-b").count() == 1 + 2 * PER_NODE
    })
    .await;
    for (addr, sent) in &expect {
        let r = row_of(&rows, "node-b", addr);
        assert_eq!(r.close_reason.as_deref(), Some("client closed"), "{r:?}");
        assert_eq!(r.bytes_to_server as u64, *sent, "{r:?}");
        assert_eq!(r.bytes_to_client as u64, *sent, "{r:?}");
    }
    // Node A: the warm-up row ended; the three killed sessions stay open,
    // with no byte counts (those are written at the end), until node A starts
    // again: nothing was left to record the end.
    for c in &on_a {
        let r = row_of(&rows, "node-a", &c.addr);
        assert_eq!(r.ended_at, None, "{r:?}");
        assert_eq!(r.close_reason, None, "{r:?}");
        assert_eq!((r.bytes_to_client, r.bytes_to_server), (0, 0), "{r:?}");
    }
    let a_rows: Vec<&SessionRow> = rows.iter().filter(|r| r.node == "node-a").collect();
    assert_eq!(a_rows.len(), 1 + PER_NODE, "{a_rows:#?}");
    assert_eq!(
        a_rows.iter().filter(|r| r.ended_at.is_some()).count(),
        1,
        "{a_rows:#?}"
    );

    echo.wait_live(0, "after node B's sessions ended").await;
    assert!(
        echo.ended().iter().all(|h| h == "eof"),
        "backend connections: {:?}",
        echo.ended()
    );
    no_live_sessions(b.port, "node B").await;
    settle_fds(b.pid(), db_port, baseline_b, "node B after its sessions").await;

    // Node A comes back under its name and closes what it left open.
    let a2 = Node::start(dir.path(), &config, db_url, "node-a");
    let rows = wait_rows(db_url, "node A's orphaned rows to close", |rows| {
        rows.iter()
            .filter(|r| r.node == "node-a")
            .all(|r| r.ended_at.is_some())
    })
    .await;
    for c in &on_a {
        let r = row_of(&rows, "node-a", &c.addr);
        assert_eq!(r.close_reason.as_deref(), Some("node restarted"), "{r:?}");
    }
    assert!(
        a2.log()
            .contains("closed session rows a previous run left open")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_sigkill_on_postgresql_spares_the_other_nodes_sessions() {
    let db = TestDb::create("faults_kill").await;
    a_killed_node(&db.url, url_port(&db.url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_sigkill_on_a_shared_sqlite_file_spares_the_other_nodes_sessions() {
    let dir = tempfile::Builder::new()
        .prefix("vncbroker-faults-db-")
        .tempdir()
        .unwrap();
    let url = format!("sqlite://{}", dir.path().join("shared.db").display());
    a_killed_node(&url, None).await;
}

// ---------------------------------------------------------------------------
// 2. The SQLite file locked by another process
// ---------------------------------------------------------------------------

/// While another process holds SQLite's write lock, a console that needs a
/// redemption is refused with 4503 once the 1.5 s busy timeout runs out;
/// running sessions need no database and relay on. A session that ends
/// during the lock cannot record its end at once: the write fails after the
/// busy timeout, is logged, and is retried in the background, so once the
/// lock goes its row is closed with the right counts, and new consoles work
/// and ends are recorded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_sqlite_file_refuses_new_consoles_with_4503_and_running_sessions_go_on() {
    let (echo_server, echo) = echo_target().await;
    // No purge during the test: it would hold the connection for the whole
    // busy timeout and delay the redemptions measured here.
    let broker = Broker::start("[tokens]\npurge_interval = 3600\n");
    broker.add_vm(1, echo_server.port, None);
    let token = broker.mint_default(1).await.token;
    let baseline = warm_node(broker.port, broker.pid(), &token, None).await;

    let mut s1 = Console::open(broker.port, &token).await;
    s1.echo(b"session 1 before the lock").await;
    let mut s2 = Console::open(broker.port, &token).await;
    s2.echo(b"session 2 before the lock").await;
    poll_until("two live session rows", STEP, || {
        let rows = broker.sessions();
        (rows.len() == 3 && rows.iter().filter(|r| r.ended_at.is_none()).count() == 2).then_some(())
    })
    .await;

    // Another process takes the write lock, as `sqlite3 db 'BEGIN EXCLUSIVE'`
    // would.
    let lock = rusqlite::Connection::open(&broker.db_path).unwrap();
    lock.busy_timeout(Duration::from_secs(10)).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();

    for attempt in 0..2 {
        let started = Instant::now();
        let mut ws = broker.ws_token(&token).await;
        let (code, reason) = ws.expect_close(Duration::from_secs(10)).await;
        let took = started.elapsed();
        eprintln!("locked: attempt {attempt} refused with {code} after {took:?}");
        assert_eq!(code, 4503, "{reason}");
        assert_eq!(reason, "console service unavailable, try again shortly");
        assert!(ws.received.is_empty());
        assert!(
            took >= Duration::from_millis(1200),
            "refused after {took:?}: before the 1.5 s busy timeout ran out"
        );
        assert!(took < PROMPT, "refused only after {took:?}");
    }
    // The running sessions relay on, both ways.
    for round in 0..5 {
        s1.echo(format!("session 1 during the lock, round {round}").as_bytes())
            .await;
        s2.echo(format!("session 2 during the lock, round {round}").as_bytes())
            .await;
    }
    let big: Vec<u8> = (0..300_000u32).map(|i| pattern(i as u64)).collect();
    s1.echo(&big).await;

    // Session 2 ends during the lock. The browser gets its close frame at
    // once; recording the end fails after the busy timeout.
    let s2_addr = s2.addr.clone();
    s2.ws.close_normal().await;
    drop(s2);
    let deadline = Instant::now() + STEP;
    while !broker.log().contains("could not record the session end") {
        assert!(Instant::now() < deadline, "no failed end record logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    poll_until("one live session", STEP, || {
        (echo.live() == 1).then_some(())
    })
    .await;
    assert_eq!(
        metric_on(broker.port, "vncbroker_sessions_active").await,
        1.0
    );

    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);

    // New consoles work again, at once.
    let mut s3 = Console::open(broker.port, &token).await;
    s3.echo(b"session 3 after the lock").await;
    s1.echo(b"session 1 after the lock").await;
    let ends = [(s1.addr.clone(), s1.sent), (s3.addr.clone(), s3.sent)];
    s1.ws.close_normal().await;
    s3.ws.close_normal().await;
    drop((s1, s3));

    // Sessions 1 and 3, and (by the retry) session 2: all four rows ended.
    let rows = poll_until("sessions 1, 2 and 3 ended", Duration::from_secs(40), || {
        let rows = broker.sessions();
        (rows.len() == 4 && rows.iter().filter(|r| r.ended_at.is_some()).count() == 4)
            .then_some(rows)
    })
    .await;
    assert_echoed_and_ended(&rows, &ends, "client closed");
    // The end that could not be written at first was written by the retry.
    let r = row_of(&rows, NODE, &s2_addr);
    assert!(r.ended_at.is_some(), "{r:?}");
    assert_eq!(r.close_reason.as_deref(), Some("client closed"), "{r:?}");
    assert!(r.bytes_to_client > 0, "{r:?}");

    let port = broker.port;
    assert_eq!(
        metric_on(
            port,
            "vncbroker_tokens_refused_total{reason=\"store_unavailable\"}"
        )
        .await,
        2.0
    );
    // The token was used before the lock, so its redemption only reads
    // (which WAL allows under another writer's lock); recording the session
    // start is the write that waits out the busy timeout, and no console
    // opens without its row.
    assert_eq!(
        metric_on(
            port,
            "vncbroker_store_errors_total{op=\"open_session\",kind=\"unavailable\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        metric_on(
            port,
            "vncbroker_store_errors_total{op=\"close_session\",kind=\"unavailable\"}"
        )
        .await,
        1.0
    );
    no_live_sessions(port, "after the lock").await;
    echo.wait_live(0, "after the lock").await;
    broker.assert_fds_settle(baseline, "after the lock").await;
}

// ---------------------------------------------------------------------------
// 3. The VNC server dies mid-session
// ---------------------------------------------------------------------------

const PRE: usize = 100_000;
const POST: usize = 10_000;
const UP: [usize; 3] = [1, 5_000, 70_000];

/// Writes PRE bytes, echoes sum(UP) bytes, writes POST bytes, then ends the
/// connection: a FIN, or with `reset` a RST once `go` is notified. Sets
/// `ended_at` when it let go.
async fn scripted_target(
    reset: bool,
    go: Arc<tokio::sync::Notify>,
    ended_at: Arc<Mutex<Option<Instant>>>,
) -> TinyServer {
    TinyServer::start(move |mut s: TcpStream| {
        let (go, ended_at) = (Arc::clone(&go), Arc::clone(&ended_at));
        async move {
            let mut pre = vec![0u8; PRE];
            fill_pattern(&mut pre, 0);
            s.write_all(&pre).await.unwrap();
            let mut left: usize = UP.iter().sum();
            let mut buf = vec![0u8; 65536];
            while left > 0 {
                let n = s.read(&mut buf[..left.min(65536)]).await.unwrap();
                assert!(n > 0, "the proxy hung up early");
                s.write_all(&buf[..n]).await.unwrap();
                left -= n;
            }
            let mut post = vec![0u8; POST];
            fill_pattern(&mut post, PRE as u64);
            s.write_all(&post).await.unwrap();
            if reset {
                go.notified().await;
                s.set_zero_linger().unwrap();
            }
            *ended_at.lock().unwrap() = Some(Instant::now());
            drop(s);
        }
    })
    .await
}

async fn a_dying_server(reset: bool) -> (u16, String, SessionRow, u64, u64) {
    let go = Arc::new(tokio::sync::Notify::new());
    let ended_at = Arc::new(Mutex::new(None));
    let target = scripted_target(reset, Arc::clone(&go), Arc::clone(&ended_at)).await;
    let broker = Broker::start("");
    broker.add_vm(1, target.port, None);
    let (warm_echo, _) = echo_target().await;
    broker.add_vm(2, warm_echo.port, None);
    let warm = broker.mint_default(2).await.token;
    let baseline = warm_node(broker.port, broker.pid(), &warm, None).await;

    let token = broker.mint_default(1).await.token;
    let mut c = Console::open(broker.port, &token).await;
    let mut want = vec![0u8; PRE];
    fill_pattern(&mut want, 0);
    assert_eq!(c.ws.read_exact(PRE).await.unwrap(), want);
    for (i, n) in UP.iter().enumerate() {
        let data: Vec<u8> = (0..*n).map(|j| (i * 31 + j) as u8).collect();
        c.echo(&data).await;
    }
    let mut post = vec![0u8; POST];
    fill_pattern(&mut post, PRE as u64);
    assert_eq!(c.ws.read_exact(POST).await.unwrap(), post);
    if reset {
        go.notify_one();
    }
    let (code, reason) = c.ws.expect_close(STEP).await;
    let after = ended_at
        .lock()
        .unwrap()
        .expect("the server let go")
        .elapsed();
    eprintln!("the server went away; the browser got {code} {reason:?} {after:?} later");
    assert!(
        after < PROMPT,
        "close frame {after:?} after the server went away"
    );
    let received = c.ws.received.len() as u64;
    let sent = c.sent;
    drop(c);

    let rows = broker.ended_sessions(2).await;
    let row = rows.last().unwrap().clone();
    no_live_sessions(broker.port, "after the server went away").await;
    broker
        .assert_fds_settle(baseline, "after the server went away")
        .await;
    (code, reason, row, received, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vnc_server_that_closes_mid_session_ends_it_with_1000_and_exact_counts() {
    let (code, reason, row, received, sent) = a_dying_server(false).await;
    assert_eq!(code, 1000);
    assert_eq!(reason, "the VNC server closed the connection");
    assert_eq!(row.close_reason.as_deref(), Some("server closed"));
    let up: usize = UP.iter().sum();
    assert_eq!(received as usize, PRE + up + POST);
    assert_eq!(sent as usize, up);
    assert_eq!(row.bytes_to_client as u64, received, "{row:?}");
    assert_eq!(row.bytes_to_server as u64, sent, "{row:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vnc_server_that_resets_mid_session_ends_it_with_4502_and_exact_counts() {
    let (code, reason, row, received, sent) = a_dying_server(true).await;
    assert_eq!(code, 4502);
    assert_eq!(reason, "console connection lost");
    let recorded = row.close_reason.clone().unwrap_or_default();
    assert!(
        recorded.starts_with("server error: ") && recorded.contains("reset"),
        "{row:?}"
    );
    let up: usize = UP.iter().sum();
    assert_eq!(received as usize, PRE + up + POST);
    assert_eq!(row.bytes_to_client as u64, received, "{row:?}");
    assert_eq!(row.bytes_to_server as u64, sent, "{row:?}");
}

/// The pid Xvnc wrote into its X display lock file.
fn xvnc_pid(display: u32) -> u32 {
    let text = std::fs::read_to_string(format!("/tmp/.X{display}-lock")).expect("Xvnc lock file");
    let pid: u32 = text.trim().parse().expect("a pid in the lock file");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "Xvnc", "pid {pid} from the lock file");
    pid
}

/// The bytes the proxy itself sends the browser in the RFB security proxy
/// handshake (version 12, security types 2, SecurityResult 4); the relay
/// counts what comes after.
const PROXY_HANDSHAKE_TO_CLIENT: u64 = 12 + 2 + 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_xvnc_killed_with_sigkill_mid_session_ends_the_session_promptly() {
    const VNC_PW: &str = "k9Faults";
    let xvnc = Xvnc::start(VNC_PW);
    let broker = Broker::start("");
    broker.add_vm(1, xvnc.port, Some(VNC_PW));
    let token = broker.mint_default(1).await.token;
    let baseline = {
        // Warm-up: a whole session through the security proxy.
        let mut ws = broker.ws_token(&token).await;
        rfb_handshake(&mut ws).await.expect("warm-up handshake");
        ws.close_normal().await;
        drop(ws);
        broker.ended_sessions(1).await;
        no_live_sessions(broker.port, "after the warm-up").await;
        steady_fds(broker.pid(), None).await
    };

    let mut ws = broker.ws_token(&token).await;
    let init = rfb_handshake(&mut ws).await.expect("handshake");
    assert_eq!((init.width, init.height), (800, 600));
    // A full-screen FramebufferUpdateRequest: Xvnc answers with the screen.
    let request = [3u8, 0, 0, 0, 0, 0, 3, 0x20, 2, 0x58];
    ws.send(&request).await.unwrap();
    let first = ws.read_exact(4).await.expect("a FramebufferUpdate");
    assert_eq!(first[0], 0, "FramebufferUpdate message type");

    let pid = xvnc_pid(xvnc.display);
    let killed = Instant::now();
    signal_pid(pid, "-KILL");
    let end = ws.expect_end(PROMPT).await;
    let took = killed.elapsed();
    eprintln!("Xvnc killed: the browser saw {end:?} after {took:?}");
    // Xvnc's sockets close with a FIN (nothing unread) or a RST (unread
    // input): 1000 or 4502, and the row says which.
    let row = broker.ended_sessions(2).await.last().unwrap().clone();
    let recorded = row.close_reason.clone().unwrap_or_default();
    match &end {
        WsEnd::Closed(1000, r) => {
            assert_eq!(r, "the VNC server closed the connection");
            assert_eq!(recorded, "server closed", "{row:?}");
        }
        WsEnd::Closed(4502, r) => {
            assert_eq!(r, "console connection lost");
            assert!(recorded.starts_with("server error: "), "{row:?}");
        }
        other => panic!("expected a close frame with 1000 or 4502, got {other:?}"),
    }
    assert!(took < PROMPT);
    // ClientInit and the update request went to the server; everything
    // after the proxy's own handshake bytes came from it.
    assert_eq!(row.bytes_to_server as usize, 1 + request.len(), "{row:?}");
    assert_eq!(
        row.bytes_to_client as u64,
        ws.received.len() as u64 - PROXY_HANDSHAKE_TO_CLIENT,
        "{row:?}"
    );
    drop(ws);
    no_live_sessions(broker.port, "after Xvnc died").await;
    broker.assert_fds_settle(baseline, "after Xvnc died").await;
}

fn signal_pid(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, "--", &pid.to_string()])
        .status()
        .expect("kill(1)");
    assert!(status.success(), "kill {sig} {pid}");
}

// ---------------------------------------------------------------------------
// 4. The client disappears without a close frame
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_vanish_without_a_close_frame_end_their_sessions_and_backends() {
    let (echo_server, echo) = echo_target().await;
    let (flood_server, flood) = flood_target(None).await;
    let broker = Broker::start("");
    broker.add_vm(1, echo_server.port, None);
    broker.add_vm(2, flood_server.port, None);
    let token = broker.mint_default(1).await.token;
    let flood_token = broker.mint_default(2).await.token;
    let baseline = warm_node(broker.port, broker.pid(), &token, None).await;
    echo.wait_live(0, "after the warm-up").await;

    // (a) A TCP reset (SO_LINGER 0) on an idle session, (b) a plain close
    // without a close frame, (c) a reset while the server floods.
    let mut reset = Console::open(broker.port, &token).await;
    let mut closed = Console::open(broker.port, &token).await;
    for i in 0..3 {
        reset.echo(format!("reset session {i}").as_bytes()).await;
        closed.echo(format!("closed session {i}").as_bytes()).await;
    }
    let big: Vec<u8> = (0..100_000u32).map(|i| pattern(i as u64)).collect();
    reset.echo(&big).await;
    let mut flooded = Console::open(broker.port, &flood_token).await;
    let head = flooded.ws.read_exact(1 << 20).await.unwrap();
    let mut want = vec![0u8; head.len()];
    fill_pattern(&mut want, 0);
    assert_eq!(head, want);
    echo.wait_live(2, "two echo sessions").await;
    flood.wait_live(1, "the flood session").await;

    let expect = [
        (reset.addr.clone(), reset.sent),
        (closed.addr.clone(), closed.sent),
    ];
    let flooded_addr = flooded.addr.clone();
    let flooded_received = flooded.ws.received.len() as u64;
    reset.tcp().set_zero_linger().unwrap();
    flooded.tcp().set_zero_linger().unwrap();
    let gone = Instant::now();
    drop(reset);
    drop(closed);
    drop(flooded);

    // The proxy notices, hangs up on the VNC servers...
    echo.wait_live(0, "the echo server's connections").await;
    flood.wait_live(0, "the flooding server's connection").await;
    eprintln!(
        "vanished clients: backends closed after {:?}; echo: {:?}; flood: {:?}",
        gone.elapsed(),
        echo.ended(),
        flood.ended()
    );
    // ...with a FIN after the last relayed byte (the echo server reads EOF);
    // the flooding server's writes fail once the proxy has gone.
    assert!(
        echo.ended().iter().all(|h| h == "eof"),
        "{:?}",
        echo.ended()
    );
    assert_eq!(flood.ended().len(), 1);

    // ...and records the ends.
    let rows = broker.ended_sessions(4).await;
    assert!(gone.elapsed() < STEP);
    assert_echoed_and_ended(&rows, &expect, "client connection lost");
    let r = row_of(&rows, NODE, &flooded_addr);
    assert_eq!(
        r.close_reason.as_deref(),
        Some("client connection lost"),
        "{r:?}"
    );
    assert_eq!(r.bytes_to_server, 0, "{r:?}");
    // What the proxy handed to the kernel: at least what arrived, at most
    // what the server wrote.
    assert!(
        (r.bytes_to_client as u64) >= flooded_received
            && (r.bytes_to_client as u64) <= flood.written.load(Ordering::SeqCst),
        "{r:?}, received {flooded_received}, written {}",
        flood.written.load(Ordering::SeqCst)
    );
    no_live_sessions(broker.port, "after vanished clients").await;
    broker
        .assert_fds_settle(baseline, "after vanished clients")
        .await;
}

// ---------------------------------------------------------------------------
// 5. A client that stops reading
// ---------------------------------------------------------------------------

/// The VNC server floods (64 KiB writes) while the browser reads nothing for
/// five seconds: the proxy stops reading from the server once its write to
/// the browser blocks, so the server's writes block too, and the proxy's
/// memory stays flat. Then the browser reads again and gets every byte, in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_gets_backpressure_not_buffering_and_loses_nothing() {
    /// More than every socket buffer on the way can hold.
    const TOTAL: u64 = 128 << 20;
    let (flood_server, flood) = flood_target(Some(TOTAL)).await;
    let (echo_server, _echo) = echo_target().await;
    let broker = Broker::start("");
    broker.add_vm(1, flood_server.port, None);
    broker.add_vm(2, echo_server.port, None);
    let warm = broker.mint_default(2).await.token;
    let baseline = warm_node(broker.port, broker.pid(), &warm, None).await;
    let rss_before = rss(broker.pid());

    let token = broker.mint_default(1).await.token;
    let mut c = Console::open(broker.port, &token).await;
    // Read nothing for five seconds.
    let stalled = Instant::now();
    let mut samples = Vec::new();
    let mut rss_peak = rss_before;
    while stalled.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        samples.push((stalled.elapsed(), flood.written.load(Ordering::SeqCst)));
        rss_peak = rss_peak.max(rss(broker.pid()));
    }
    let at_end = flood.written.load(Ordering::SeqCst);
    let two_s_before = samples
        .iter()
        .rev()
        .find(|(t, _)| *t <= Duration::from_secs(3))
        .map(|s| s.1)
        .unwrap();
    eprintln!(
        "stalled reader: the server wrote {} KiB in 5 s ({} KiB at 3 s); broker RSS {} -> peak {} KiB",
        at_end >> 10,
        two_s_before >> 10,
        rss_before >> 10,
        rss_peak >> 10
    );
    assert!(at_end > 0, "the server wrote nothing");
    assert_eq!(
        at_end, two_s_before,
        "the server's writes kept going while nobody read: {samples:?}"
    );
    assert!(
        at_end < 64 << 20,
        "{at_end} bytes went into buffers for a client that reads nothing"
    );
    assert!(
        rss_peak < rss_before + (32 << 20),
        "the broker's RSS grew from {rss_before} to {rss_peak}"
    );

    // Read again: every byte, in order, until the server has sent it all.
    let resumed = Instant::now();
    let mut got = 0u64;
    let mut expect = vec![0u8; 0];
    while got < TOTAL {
        let msg = tokio::time::timeout(STEP, c.ws.stream.next())
            .await
            .unwrap_or_else(|_| panic!("stalled at {got} of {TOTAL} bytes"))
            .expect("the stream ended")
            .expect("a WebSocket error");
        let Message::Binary(data) = msg else {
            panic!("unexpected message {msg:?} at {got}");
        };
        expect.resize(data.len(), 0);
        fill_pattern(&mut expect, got);
        if data[..] != expect[..] {
            let at = data.iter().zip(&expect).position(|(a, b)| a != b).unwrap();
            panic!("byte {} differs from what the server sent", got + at as u64);
        }
        got += data.len() as u64;
    }
    assert_eq!(got, TOTAL);
    assert_eq!(flood.written.load(Ordering::SeqCst), TOTAL);
    let rate = TOTAL as f64 / resumed.elapsed().as_secs_f64();
    eprintln!(
        "resumed reader: {} MiB in order in {:?} ({:.0} MiB/s)",
        TOTAL >> 20,
        resumed.elapsed(),
        rate / 1048576.0
    );
    // Unthrottled, the server would have written five seconds' worth at
    // that rate; it managed a small fraction before its writes blocked.
    assert!(
        (at_end as f64) < rate * 5.0 / 4.0,
        "{at_end} bytes written while stalled, against {rate:.0} bytes/s unthrottled"
    );
    let addr = c.addr.clone();
    c.ws.close_normal().await;
    drop(c);

    let rows = broker.ended_sessions(2).await;
    let r = row_of(&rows, NODE, &addr);
    assert_eq!(r.close_reason.as_deref(), Some("client closed"), "{r:?}");
    assert_eq!(
        (r.bytes_to_client as u64, r.bytes_to_server),
        (TOTAL, 0),
        "{r:?}"
    );
    flood.wait_live(0, "the flooding server").await;
    assert_eq!(flood.ended(), vec!["eof".to_string()]);
    no_live_sessions(broker.port, "after the flood").await;
    broker.assert_fds_settle(baseline, "after the flood").await;
}
