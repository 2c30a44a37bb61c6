//! Abuse limits under attack, against the real binary and real VNC servers:
//! password floods (from one address and from many), forwarded addresses,
//! IPv6 networks, user enumeration by timing, slow bodies, connection caps,
//! and browsers that stop reading.
//!
//! Each test prints its figures on lines starting with `FIGURE` (run with
//! `--nocapture` to see them).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const VNC_PW: &str = "aBuse7Pw";

/// The floods and the timing measurement run one at a time: on a small
/// machine they would otherwise measure each other.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const MINT_PATH: &str = "/api/v1/vms/1/console-tokens";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A TCP connection to the broker from the local address `src`.
async fn connect_from(src: &str, port: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(src.parse().unwrap(), 0))?;
    socket.connect(([127, 0, 0, 1], port).into()).await
}

/// A mint request (no body) as `user` from 127.0.0.1; `None` if there is
/// no complete answer within `limit`.
async fn mint_request(port: u16, user: &str, pw: &str, limit: Duration) -> Option<Answer> {
    let auth = basic_auth(user, pw);
    request(
        None,
        port,
        "POST",
        MINT_PATH,
        &[("Authorization", auth)],
        b"",
        limit,
    )
    .await
}

/// `GET /healthz` from `src` (127.0.0.1 if `None`), answered within [`STEP`].
async fn healthz(src: Option<&str>, port: u16) -> Answer {
    request(src, port, "GET", "/healthz", &[], b"", STEP)
        .await
        .expect("an answer to GET /healthz")
}

/// `n` connections from 127.0.0.1 that send nothing, held long enough for
/// the broker to count them.
async fn idle_connections(n: usize, port: u16) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(connect_from("127.0.0.1", port).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    conns
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on its own connection from `src` (127.0.0.1 if `None`);
/// `None` if there is no complete answer within `limit`.
async fn request(
    src: Option<&str>,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
    limit: Duration,
) -> Option<Answer> {
    let fut = async {
        let mut s = connect_from(src.unwrap_or("127.0.0.1"), port).await.ok()?;
        let req = request_head(port, method, path, headers, body.len());
        s.write_all(req.as_bytes()).await.ok()?;
        s.write_all(body).await.ok()?;
        parse_answer(&read_all(&mut s).await)
    };
    tokio::time::timeout(limit, fut).await.ok().flatten()
}

fn parse_answer(raw: &[u8]) -> Option<Answer> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(Answer {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

/// Everything the peer sends until it closes (a reset ends it too).
async fn read_all<R: AsyncReadExt + Unpin>(s: &mut R) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    while let Ok(n) = s.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
    }
    raw
}

/// The status of a WebSocket upgrade request with extra headers.
async fn upgrade_status(port: u16, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(STEP, async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("an answer to the upgrade");
    // Only the head: a close frame may follow in the same read.
    let head = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(buf.len());
    std::str::from_utf8(&buf[..head])
        .ok()
        .and_then(|h| h.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn sorted(mut v: Vec<Duration>) -> Vec<Duration> {
    v.sort();
    v
}

/// The `p`-th percentile (0..=100) of sorted samples.
fn pct(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = (sorted.len() * p).div_ceil(100).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Mints as the portal (127.0.0.1, right password); the latency, or `None`
/// if it did not succeed within `limit`.
async fn timed_mint(port: u16, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let a = mint_request(port, USER, USER_PW, limit).await?;
    (a.status == 201).then(|| t.elapsed())
}

/// A browser opening the console: the WebSocket, the token's redemption and
/// the RFB handshake through the proxy to the VNC server.
async fn timed_console(broker: &Broker) -> Duration {
    let token = broker.mint_default(1).await.token;
    let t = Instant::now();
    let mut ws = broker.ws_token(&token).await;
    let init = rfb_handshake(&mut ws).await.expect("the console opens");
    assert!(init.width > 0);
    let took = t.elapsed();
    ws.close_normal().await;
    took
}

/// Makes sure this process may open `want` files (the attack tests open
/// thousands of sockets), raising the soft limit up to the hard one.
fn ensure_open_files(want: u64) {
    let text = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut nums = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .map(|n| n.parse::<u64>().unwrap_or(u64::MAX));
    let (soft, hard) = (nums.next().unwrap(), nums.next().unwrap());
    if soft >= want {
        return;
    }
    assert!(
        hard >= want,
        "the open-files hard limit ({hard}) is below the {want} this test needs"
    );
    let ok = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={hard}:{hard}"),
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "raising the open-files soft limit with prlimit");
}

// ---------------------------------------------------------------------------
// 1. The failure budget
// ---------------------------------------------------------------------------

/// 1,000 wrong passwords sent at once from one address: the budget is
/// charged before each check, so only the budget's worth are verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_wrong_passwords_are_charged_before_they_are_checked() {
    let _one_at_a_time = HEAVY.lock().await;
    const FLOOD: usize = 1000;
    const BUDGET: f64 = 10.0;
    let broker = Broker::start(
        "[http]\nfailures_per_minute = 10\nfailure_delay_ms = 100\nmax_connections_per_address = 0\n",
    );
    broker.add_vm(1, closed_port(), None);
    let port = broker.port;
    let before = metric(
        &scrape(port).await,
        "vncbroker_password_verifications_total",
    );
    let started = Instant::now();
    let tasks: Vec<_> = (0..FLOOD)
        .map(|i| {
            tokio::spawn(async move {
                mint_request(port, USER, &format!("wrong-{i}"), Duration::from_secs(90))
                    .await
                    .map(|a| a.status)
            })
        })
        .collect();
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        let key = match t.await.unwrap() {
            Some(s) => s.to_string(),
            None => "no answer in 90 s".into(),
        };
        *answers.entry(key).or_default() += 1;
    }
    let elapsed = started.elapsed();
    let ran = metric(
        &scrape(port).await,
        "vncbroker_password_verifications_total",
    ) - before;
    eprintln!(
        "FIGURE concurrent wrong passwords: {FLOOD} sent at once from one address \
         (budget {BUDGET}/min): {ran} argon2 verifications ran; answers {answers:?}; \
         all answered within {elapsed:.1?}"
    );
    assert!(
        ran <= BUDGET,
        "{ran} verifications for a budget of {BUDGET}"
    );
    assert_eq!(answers.get("401").copied().unwrap_or(0) as f64, ran);
    assert_eq!(
        answers.get("401").copied().unwrap_or(0) + answers.get("429").copied().unwrap_or(0),
        FLOOD,
        "{answers:?}"
    );
    // The budget is spent: even the right password is refused, unchecked.
    let a = mint_request(port, USER, USER_PW, STEP).await.unwrap();
    assert_eq!(a.status, 429);
}

/// A trusted proxy that adds its own `X-Forwarded-For` line (rather than
/// appending to the client's) still gets its line read; IPv6 clients share
/// a budget per /64. Both for passwords and for WebSocket tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_lines_and_ipv6_networks_cannot_buy_fresh_budgets() {
    let broker = Broker::start(
        "[http]\ntrusted_proxies = [\"127.0.0.1\"]\nfailures_per_minute = 3\nfailure_delay_ms = 50\n",
    );
    broker.add_vm(1, closed_port(), None);
    let port = broker.port;
    let wrong = |forwarded: Vec<(&'static str, String)>| async move {
        let mut headers = vec![("Authorization", basic_auth(USER, "wrong-pw"))];
        headers.extend(forwarded);
        request(None, port, "POST", MINT_PATH, &headers, b"", STEP)
            .await
            .expect("an answer")
            .status
    };

    // The client writes a fresh line each time; the proxy's line is the same.
    let mut seen = Vec::new();
    for i in 1..=5 {
        seen.push(
            wrong(vec![
                ("X-Forwarded-For", format!("203.0.113.{i}")),
                ("X-Forwarded-For", "198.51.100.7".into()),
            ])
            .await,
        );
    }
    eprintln!("FIGURE two X-Forwarded-For lines, 5 wrong passwords with budget 3: {seen:?}");
    assert_eq!(seen, [401, 401, 401, 429, 429]);

    // IPv6: every guess from another address of the same /64.
    let mut seen = Vec::new();
    for i in 1..=5 {
        seen.push(
            wrong(vec![(
                "X-Forwarded-For",
                format!("2001:db8:7:1:{i:x}:{i:x}:{i:x}:{i:x}"),
            )])
            .await,
        );
    }
    eprintln!("FIGURE one IPv6 /64, 5 wrong passwords from 5 addresses with budget 3: {seen:?}");
    assert_eq!(seen, [401, 401, 401, 429, 429]);
    assert_eq!(
        wrong(vec![("X-Forwarded-For", "2001:db8:7:2::1".into())]).await,
        401,
        "another /64 has its own budget"
    );

    // Tokens through the proxy, with the client's own line in front.
    let mut seen = Vec::new();
    for i in 1..=5 {
        let own = format!("192.0.2.{i}");
        let path = format!("/websockify?token={}", unknown_token());
        let status = upgrade_status(
            port,
            &path,
            &[
                ("X-Forwarded-For", own.as_str()),
                ("X-Forwarded-For", "198.51.100.99"),
            ],
        )
        .await;
        seen.push(status);
    }
    eprintln!("FIGURE two X-Forwarded-For lines, 5 unknown tokens with budget 3: {seen:?}");
    assert_eq!(seen, [101, 101, 101, 429, 429]);
}

/// Wrong passwords for unknown user names take as long as for known ones:
/// timing does not tell which names exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_are_answered_as_slowly_as_known_ones() {
    let _one_at_a_time = HEAVY.lock().await;
    const PAIRS: usize = 15;
    let broker = Broker::start("[http]\nfailures_per_minute = 0\n");
    broker.add_vm(1, closed_port(), None);
    let port = broker.port;
    let attempt = |user: String| async move {
        let t = Instant::now();
        let a = mint_request(port, &user, "not-the-password", STEP)
            .await
            .expect("an answer");
        assert_eq!(a.status, 401);
        t.elapsed()
    };
    // One of each first, so that neither pays for a first use.
    attempt(USER.into()).await;
    attempt("nobody-0".into()).await;
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for i in 0..PAIRS {
        known.push(attempt(USER.into()).await);
        unknown.push(attempt(format!("nobody-{}", i + 1)).await);
    }
    let (known, unknown) = (sorted(known), sorted(unknown));
    let (k, u) = (pct(&known, 50), pct(&unknown, 50));
    let ratio = u.as_secs_f64() / k.as_secs_f64();
    eprintln!(
        "FIGURE timing, {PAIRS} wrong passwords each: known user median {k:.1?} (p90 {:.1?}), \
         unknown user median {u:.1?} (p90 {:.1?}); unknown/known {ratio:.2}",
        pct(&known, 90),
        pct(&unknown, 90)
    );
    assert!(
        (0.75..=1.33).contains(&ratio),
        "unknown users answer in {u:?}, known ones in {k:?}"
    );
}

// ---------------------------------------------------------------------------
// 2. The password verifier's own pool
// ---------------------------------------------------------------------------

/// A flood of wrong passwords from many addresses (so no budget stops it):
/// 1,000 at once, then each of the 1,000 senders again every 2 s, each
/// guess from a new address, while a portal mints with its cached
/// credential and browsers open consoles. The verifier's queue fills and
/// answers "busy", and neither the mints nor the token redemptions wait
/// behind argon2 (without its own pool, the guesses took every blocking
/// thread the database needs, for minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_flood_delays_neither_cached_mints_nor_token_redemption() {
    let _one_at_a_time = HEAVY.lock().await;
    const FLOOD: usize = 1000;
    const FLOOD_FOR: Duration = Duration::from_secs(6);
    ensure_open_files(4000);
    let xvnc = Xvnc::start(VNC_PW);
    let broker = Broker::start("[http]\ntrusted_proxies = [\"127.0.0.2\"]\n");
    broker.add_vm(1, xvnc.port, Some(VNC_PW));
    let port = broker.port;
    // The portal's credential is checked once, then cached.
    broker.mint_default(1).await;
    let quiet_mint = pct(
        &sorted(futures_in_turn(10, || timed_mint(port, STEP)).await),
        50,
    );
    let quiet_console = timed_console(&broker).await;
    let before = scrape(port).await;

    // 1,000 senders, each from a new address every time.
    let next = Arc::new(AtomicUsize::new(0));
    let answers = Arc::new(std::sync::Mutex::new(BTreeMap::<String, usize>::new()));
    let until = Instant::now() + FLOOD_FOR;
    let flooders: Vec<_> = (0..FLOOD)
        .map(|_| {
            let (next, answers) = (Arc::clone(&next), Arc::clone(&answers));
            tokio::spawn(async move {
                while Instant::now() < until {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let from = format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255);
                    let a = request(
                        Some("127.0.0.2"),
                        port,
                        "POST",
                        MINT_PATH,
                        &[
                            ("Authorization", basic_auth(USER, "flood-guess")),
                            ("X-Forwarded-For", from),
                        ],
                        b"",
                        Duration::from_secs(60),
                    )
                    .await;
                    let key = a.map_or("none".into(), |a| a.status.to_string());
                    *answers.lock().unwrap().entry(key).or_default() += 1;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Meanwhile: the portal mints every 50 ms, and browsers open consoles.
    let mints = tokio::spawn(async move {
        let mut v = Vec::new();
        while Instant::now() + Duration::from_millis(500) < until {
            v.push(timed_mint(port, Duration::from_secs(30)).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        v
    });
    let mut consoles = Vec::new();
    for _ in 0..4 {
        consoles.push(
            tokio::time::timeout(Duration::from_secs(30), timed_console(&broker))
                .await
                .ok(),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mints = mints.await.unwrap();
    for f in flooders {
        f.await.unwrap();
    }
    let after = scrape(port).await;
    let ran = metric(&after, "vncbroker_password_verifications_total")
        - metric(&before, "vncbroker_password_verifications_total");
    let busy = metric(&after, "vncbroker_password_checks_busy_total")
        - metric(&before, "vncbroker_password_checks_busy_total");
    let answers = answers.lock().unwrap().clone();
    let failed_mints = mints.iter().filter(|m| m.is_none()).count();
    let mint_times = sorted(mints.iter().flatten().copied().collect());
    eprintln!(
        "FIGURE password flood: {} wrong passwords from {} addresses over {FLOOD_FOR:?}, \
         {FLOOD} at once, then each sender again every 2 s; answers {answers:?}; {ran} argon2 verifications ran, \
         {busy} answered busy. Portal mints during the flood: {} ok, {failed_mints} failed, \
         p50 {:.1?}, p99 {:.1?}, max {:.1?} (quiet: p50 {quiet_mint:.1?}). \
         Console opens (redeem + RFB handshake) during the flood: {consoles:.1?} (quiet: {quiet_console:.1?})",
        next.load(Ordering::Relaxed),
        next.load(Ordering::Relaxed),
        mint_times.len(),
        pct(&mint_times, 50),
        pct(&mint_times, 99),
        mint_times.last().copied().unwrap_or_default(),
    );
    assert_eq!(failed_mints, 0);
    assert!(mint_times.len() >= 10, "{} mints", mint_times.len());
    assert!(pct(&mint_times, 99) < Duration::from_secs(1));
    for c in &consoles {
        assert!(
            c.is_some_and(|c| c < Duration::from_secs(2)),
            "a console took {c:?} to open during the flood"
        );
    }
    assert!(busy > 0.0, "the flood never filled the verifier's queue");
}

/// Runs `n` futures one after the other; their `Some` results.
async fn futures_in_turn<F, Fut>(n: usize, f: F) -> Vec<Duration>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<Duration>>,
{
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(f().await.expect("a quiet mint"));
    }
    v
}

// ---------------------------------------------------------------------------
// 3. Connections
// ---------------------------------------------------------------------------

/// 5,000 connections from 127.0.0.2, each sending `POST /RPC2` with a
/// 1 MiB Content-Length and then one byte, against a broker whose
/// open-files limit is 4,096 (without the caps, that many connections take
/// every descriptor and nobody else is accepted): the cap per address holds
/// all but 256 off, the body deadline ends those, and meanwhile a portal on
/// 127.0.0.1 mints within a second and a browser opens a console.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_from_one_address_are_capped_and_lock_nobody_out() {
    slow_body_attack("", Some(4096), 256).await;
}

/// The same 5,000 slow bodies all held at once (the cap per address raised
/// out of the way): the server still serves others at once, and the body
/// deadline ends every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_held_slow_bodies_lock_nobody_out_and_all_end() {
    slow_body_attack("[http]\nmax_connections_per_address = 10000\n", None, 5000).await;
}

async fn slow_body_attack(config: &str, open_files: Option<u64>, cap: usize) {
    let _one_at_a_time = HEAVY.lock().await;
    const ATTACK: usize = 5000;
    ensure_open_files(ATTACK as u64 + 1000);
    let xvnc = Xvnc::start(VNC_PW);
    let broker = match open_files {
        Some(n) => Broker::start_with_open_files(config, n),
        None => Broker::start(config),
    };
    broker.add_vm(1, xvnc.port, Some(VNC_PW));
    let port = broker.port;
    broker.mint_default(1).await;

    /// How one attacking connection ended: after how long, with what answer.
    struct Ended {
        after: Duration,
        status: Option<u16>,
        retry_after: Option<String>,
    }
    let head: &'static [u8] = b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: 1048576\r\n\r\n<";
    let silent = Arc::new(AtomicUsize::new(0));
    let opened = Instant::now();
    let mut readers = Vec::new();
    let mut connect_failed = 0;
    let (mut most_open, mut most_fds) = (0.0f64, 0);
    for _ in 0..ATTACK / 100 {
        let batch: Vec<_> = (0..100)
            .map(|_| {
                tokio::spawn(async move {
                    let mut s = tokio::time::timeout(
                        Duration::from_secs(5),
                        connect_from("127.0.0.2", port),
                    )
                    .await
                    .ok()?
                    .ok()?;
                    s.write_all(head).await.ok()?;
                    Some((s, Instant::now()))
                })
            })
            .collect();
        for t in batch {
            let Some((mut s, sent)) = t.await.unwrap() else {
                connect_failed += 1;
                continue;
            };
            // Each connection is watched until it ends; until its first
            // byte or its end it counts as silent (held).
            let silent = Arc::clone(&silent);
            silent.fetch_add(1, Ordering::SeqCst);
            readers.push(tokio::spawn(async move {
                let raw = tokio::time::timeout(Duration::from_secs(40), read_all(&mut s))
                    .await
                    .unwrap_or_default();
                silent.fetch_sub(1, Ordering::SeqCst);
                let answer = parse_answer(&raw);
                Ended {
                    after: sent.elapsed(),
                    status: answer.as_ref().map(|a| a.status),
                    retry_after: answer.and_then(|a| a.header("retry-after").map(str::to_owned)),
                }
            }));
        }
        let m = scrape(port).await;
        most_open = most_open.max(metric(&m, "vncbroker_connections_open"));
        most_fds = most_fds.max(broker.fd_count());
    }
    let open_took = opened.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = silent.load(Ordering::SeqCst);
    let metrics = scrape(port).await;
    eprintln!(
        "FIGURE slow bodies: {ATTACK} attempted from 127.0.0.2 in {open_took:.1?} \
         (broker open-files limit {open_files:?}, at most {cap} to be held); {} connected, {connect_failed} could not; \
         {held} held open at the end; broker holds {} fds (at most {most_fds}); \
         vncbroker_connections_open {} (at most {most_open})",
        readers.len(),
        broker.fd_count(),
        metric(&metrics, "vncbroker_connections_open"),
    );
    assert!(held <= cap, "{held} slow connections held");
    // The broker's own count (the scrape's connection included).
    assert!(
        most_open <= cap as f64 + 1.0,
        "{most_open} connections open at once"
    );

    // While they are held: the portal mints, a browser opens a console.
    let mut mints = Vec::new();
    for _ in 0..20 {
        mints.push(timed_mint(port, Duration::from_secs(10)).await);
    }
    let console = tokio::time::timeout(Duration::from_secs(20), timed_console(&broker))
        .await
        .ok();
    let still_held = silent.load(Ordering::SeqCst);
    let ok: Vec<_> = sorted(mints.iter().flatten().copied().collect());
    eprintln!(
        "FIGURE slow bodies held ({still_held} still open): portal mints {} of 20 ok, \
         p50 {:.1?}, max {:.1?}; console opened in {console:.1?}",
        ok.len(),
        pct(&ok, 50),
        ok.last().copied().unwrap_or_default()
    );
    assert_eq!(ok.len(), 20, "{mints:?}");
    assert!(ok.iter().all(|t| *t < Duration::from_secs(1)), "{ok:?}");
    assert!(console.is_some(), "no console during the attack");

    // Every attacking connection ends: refused at once (503), or cut by the
    // body deadline (10 s by default) with 408.
    let mut by_status: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let mut retry_after = None;
    for r in readers {
        let e = r.await.unwrap();
        if e.retry_after.is_some() {
            retry_after = e.retry_after;
        }
        let key = e.status.map_or("closed".into(), |s| s.to_string());
        by_status.entry(key).or_default().push(e.after);
    }
    let summary: Vec<String> = by_status
        .iter_mut()
        .map(|(k, v)| {
            v.sort();
            format!(
                "{k}: {} (ended after {:.1?} to {:.1?})",
                v.len(),
                v[0],
                v[v.len() - 1]
            )
        })
        .collect();
    eprintln!("FIGURE slow bodies ended: {summary:?}; refusals say Retry-After {retry_after:?}");
    let refused = by_status.get("503").map_or(0, Vec::len);
    let cut = by_status.get("408").map_or(Vec::new(), Clone::clone);
    // At most `cap` at a time, each for the body deadline.
    let windows = open_took.as_secs() as usize / 10 + 2;
    assert!(!cut.is_empty() && cut.len() <= cap * windows, "{summary:?}");
    assert_eq!(cut.len() + refused + connect_failed, ATTACK, "{summary:?}");
    if cap < ATTACK {
        assert!(retry_after.is_some(), "a refusal says when to retry");
    }
    assert!(
        cut.iter().all(|t| *t < Duration::from_secs(13)),
        "{summary:?}"
    );
    let metrics = scrape(port).await;
    assert!(metric(&metrics, "vncbroker_http_timeouts_total{kind=\"body\"}") >= 1.0);
}

/// Over the cap per address, HTTP gets 503 with Retry-After and a
/// WebSocket gets close code 4429; a trusted proxy is not capped as one
/// client, but the clients behind it are, by their forwarded address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_refuse_clearly_and_look_through_trusted_proxies() {
    let direct = Broker::start("[http]\nmax_connections_per_address = 3\n");
    let port = direct.port;
    let idle = idle_connections(3, port).await;
    let a = healthz(None, port).await;
    assert_eq!(a.status, 503, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.header("retry-after"), Some("5"));
    let mut ws = Ws::connect(port, "/websockify?token=x", &WsOptions::default())
        .await
        .expect("the refusal is a WebSocket");
    let (code, reason) = ws.expect_close(STEP).await;
    eprintln!(
        "FIGURE over the cap per address: HTTP 503 (Retry-After 5), WebSocket close {code} {reason:?}"
    );
    assert_eq!(code, 4429);
    assert!(reason.contains("too many connections"), "{reason}");
    // Another address is not affected; and a freed place is free again.
    let a = healthz(Some("127.0.0.3"), port).await;
    assert_eq!(a.status, 200);
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = healthz(None, port).await;
    assert_eq!(a.status, 200);

    // Behind a trusted proxy.
    let behind = Broker::start(
        "[http]\ntrusted_proxies = [\"127.0.0.1\"]\nmax_connections_per_address = 3\nbody_timeout_ms = 20000\n",
    );
    let port = behind.port;
    let proxy_conns = idle_connections(6, port).await;
    let a = healthz(None, port).await;
    assert_eq!(a.status, 200, "the proxy itself is not one capped client");
    // Three slow requests in progress for one forwarded client...
    let mut slow = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.1", port).await.unwrap();
        s.write_all(
            b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.9\r\nContent-Length: 100\r\n\r\n<",
        )
        .await
        .unwrap();
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let forwarded = |client: &'static str| async move {
        request(
            None,
            port,
            "GET",
            "/healthz",
            &[("X-Forwarded-For", client.into())],
            b"",
            STEP,
        )
        .await
        .unwrap()
        .status
    };
    let same = forwarded("198.51.100.9").await;
    let other = forwarded("198.51.100.10").await;
    eprintln!(
        "FIGURE behind a trusted proxy: 6 proxy connections admitted; a client with 3 requests \
         in progress gets {same}, another client {other}"
    );
    assert_eq!(same, 503);
    assert_eq!(other, 200);
    drop(slow);
    drop(proxy_conns);
}

/// The body deadline answers 408; the request deadline cuts a request whose
/// body trickles in under the body deadline's radar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_and_request_deadlines() {
    let body = Broker::start("[http]\nbody_timeout_ms = 1500\n");
    let mut s = connect_from("127.0.0.1", body.port).await.unwrap();
    let t = Instant::now();
    s.write_all(b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n<")
        .await
        .unwrap();
    let raw = tokio::time::timeout(Duration::from_secs(10), read_all(&mut s))
        .await
        .expect("the slow body is cut");
    let body_took = t.elapsed();
    let a = parse_answer(&raw).expect("an answer");
    assert_eq!(a.status, 408);

    let whole = Broker::start("[http]\nbody_timeout_ms = 60000\nrequest_timeout_ms = 2000\n");
    let mut s = connect_from("127.0.0.1", whole.port).await.unwrap();
    let t = Instant::now();
    s.write_all(b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        .await
        .unwrap();
    // A byte every 200 ms: the connection is never idle.
    let (mut rd, mut wr) = s.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if wr.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let raw = tokio::time::timeout(Duration::from_secs(10), read_all(&mut rd))
        .await
        .expect("the trickling request is cut");
    let request_took = t.elapsed();
    trickle.abort();
    let a = parse_answer(&raw).expect("an answer");
    assert_eq!(a.status, 503);
    assert!(a.header("retry-after").is_some());
    eprintln!(
        "FIGURE deadlines: a slow body got 408 after {body_took:.1?} (body deadline 1.5 s); \
         a trickling body got 503 after {request_took:.1?} (request deadline 2 s)"
    );
    assert!(body_took < Duration::from_secs(4));
    assert!(request_took < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------
// 4. Browsers that stop reading
// ---------------------------------------------------------------------------

/// A browser whose TCP window is zero (it stopped reading while the VNC
/// server sends): the session must still end by the limit under test, its
/// record must say why, and its session slot (one per VM here) must be
/// free again. Returns how long the browser lasted once it stopped.
async fn stalled_browser_is_ended(
    broker: &Broker,
    ttl: Option<i64>,
    want_reason: &str,
) -> Duration {
    let token = broker.mint(1, USER, USER_PW, ttl, false).await.token;

    // A small receive buffer, so the window closes soon.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket
        .connect(([127, 0, 0, 1], broker.port).into())
        .await
        .unwrap();
    let url = format!("ws://127.0.0.1:{}/websockify?token={token}", broker.port);
    let (stream, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
    let mut ws = Ws::from_stream(stream, None);
    let init = rfb_handshake(&mut ws).await.expect("the console opens");
    // Ask for the whole screen, many times over, and read nothing more.
    for _ in 0..16 {
        let mut req = vec![3u8, 0, 0, 0, 0, 0];
        req.extend_from_slice(&init.width.to_be_bytes());
        req.extend_from_slice(&init.height.to_be_bytes());
        ws.send(&req).await.unwrap();
    }
    let stalled = Instant::now();
    // The relay's write to the browser blocks once the buffers between are
    // full; from then on only the limits can end the session.
    let rows = poll_until(
        &format!("the stalled session ends ({want_reason})"),
        Duration::from_secs(40),
        || {
            let rows = broker.sessions();
            (rows.len() == 1 && rows[0].ended_at.is_some()).then_some(rows)
        },
    )
    .await;
    let lasted = stalled.elapsed();
    assert_eq!(rows[0].close_reason.as_deref(), Some(want_reason));
    // The VM's one session slot is free: another browser gets in.
    let freed = Instant::now() + STEP;
    while metric(&scrape(broker.port).await, "vncbroker_sessions_active") > 0.0 {
        assert!(
            Instant::now() < freed,
            "the stalled session still holds its slot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let next = broker.mint_default(1).await.token;
    let mut ws2 = broker.ws_token(&next).await;
    rfb_handshake(&mut ws2)
        .await
        .expect("a new session after the stalled one");
    ws2.close_normal().await;
    drop(ws);
    lasted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_that_stops_reading_is_still_ended_by_every_limit() {
    let _one_at_a_time = HEAVY.lock().await;
    let xvnc = Xvnc::start_no_auth();
    // Pings every second, so a ping is due (and, without its own loop,
    // would wait on the stalled writer) before each limit comes up.
    let cases = [
        "client_write_timeout_secs = 2\nping_interval_secs = 0\n",
        "client_write_timeout_secs = 0\nping_interval_secs = 1\npong_timeout_secs = 3\n",
        "client_write_timeout_secs = 0\nping_interval_secs = 1\npong_timeout_secs = 60\nidle_timeout_secs = 2\n",
        "client_write_timeout_secs = 0\nping_interval_secs = 1\npong_timeout_secs = 60\nmax_session_secs = 3\n",
        "client_write_timeout_secs = 0\nping_interval_secs = 1\npong_timeout_secs = 60\nend_at_token_expiry = true\n",
    ];
    // Started first: starting blocks, and must not stall the others.
    let brokers: Vec<Broker> = cases
        .iter()
        .map(|proxy| {
            let b = Broker::start(&format!("[proxy]\nmax_sessions_per_vm = 1\n{proxy}"));
            b.add_vm(1, xvnc.port, None);
            b
        })
        .collect();
    let (write, pong, idle, max, expiry) = tokio::join!(
        stalled_browser_is_ended(&brokers[0], None, "client stopped reading"),
        stalled_browser_is_ended(&brokers[1], None, "client stopped answering pings"),
        stalled_browser_is_ended(&brokers[2], None, "idle timeout"),
        stalled_browser_is_ended(&brokers[3], None, "time limit"),
        stalled_browser_is_ended(&brokers[4], Some(4), "token expired"),
    );
    eprintln!(
        "FIGURE zero-window browser ended after (limit, plus up to 2 s for the close frame \
         that cannot be sent): write timeout 2 s: {write:.1?}; pong timeout 3 s: {pong:.1?}; \
         idle 2 s: {idle:.1?}; max length 3 s: {max:.1?}; token expiry 4 s: {expiry:.1?}"
    );
    for (what, lasted, limit) in [
        ("write timeout", write, 2),
        ("pong timeout", pong, 3),
        ("idle", idle, 2),
        ("max length", max, 3),
        ("token expiry", expiry, 4),
    ] {
        assert!(
            lasted < Duration::from_secs(limit + 6),
            "{what}: the stalled browser lasted {lasted:?}"
        );
    }
}
