//! vncbroker-bench: measures the proxy against a direct TCP connection,
//! against a plain relay (socat, the limit of a process that only copies
//! bytes) and against websockify 0.13 (the reference peer) on this machine,
//! plain and over TLS, with the proxies' CPU time per GiB relayed; and the
//! token service's session setup and mint rates on SQLite and PostgreSQL.
//!
//! In one run it starts:
//! - a `--targets` child process of this binary with TCP source, sink, echo,
//!   greeting and silent servers standing in for VNC servers, so the direct
//!   path crosses processes just as the proxied ones do;
//! - a release `vncbroker serve` on a fresh SQLite database;
//! - the plain relay: `socat -b65536 TCP-LISTEN:PORT,fork TCP:TARGET`, one
//!   listener per target (source, sink, echo, greeting), in one process
//!   group;
//! - websockify 0.13.0 with the TokenFile plugin, one token per target
//!   (found in .venv, /tmp/pv or target/bench-venv, else installed into
//!   target/bench-venv with pip; `--quick` skips it when it is missing);
//! - for the TLS section, a CA and a server certificate made with openssl
//!   in the work directory, and a vncbroker with `[tls]`, a websockify with
//!   `--cert`/`--key` and socat with OPENSSL-LISTEN, all with that
//!   certificate; the load client speaks TLS with rustls, trusting that CA;
//! - a private PostgreSQL server (initdb and pg_ctl on a temp dir, as an
//!   unprivileged user when run as root), unless DATABASE_URL names one, and
//!   a second broker on it;
//! - fresh brokers for the idle-session memory measurement, one and then two
//!   `serve` processes on one SQLite file;
//! - for the SPICE section, a stand-in SPICE server in the targets process
//!   (see [`spice`]), behind the same relay, websockify and broker;
//! - a broker for the session-control measurement, with a recording
//!   directory, whose VMs point at RFB-speaking targets (a framebuffer
//!   source, a sink and an update-request echo) with and without the session
//!   policies (stored password, view-only token, clipboard none, recording).
//!
//! Every path is driven by this process's own load client, repetitions
//! interleaved (direct, relay, websockify, vncbroker, direct, ...), so
//! figures are ratios taken under the same conditions; the medians are
//! reported. Around each throughput measurement's timed window the proxy's
//! CPU time is read from /proc (its process, or every process of its
//! group for the forking peers), for CPU seconds per GiB moved. The
//! Markdown report (machine, versions, results, targets met or missed, how to
//! rerun) goes to standard output and, with `--out FILE`, to FILE.
//!
//! Usage: vncbroker-bench [--quick] [--broker PATH] [--websockify PATH] [--out FILE]
//!                        [--only proxy|sqlite|postgres|idle|session-control|tls|spice]...
//!
//! For investigating: `--only` runs some sections; VNCBROKER_BENCH_LOG sets
//! the brokers' log filter; VNCBROKER_BENCH_BROKER_ENV="NAME=VALUE ..." adds
//! to their environment; VNCBROKER_BENCH_DUMP=DIR saves a broker's smaps and
//! status at each idle-session step.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use testkit::frames::{self, Ev, FrameReader};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

mod spice;

/// The source tree this binary was built from: .venv and target/ are here.
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
/// The websockify release compared against.
const WEBSOCKIFY_VERSION: &str = "0.13.0";

struct Opts {
    targets: bool,
    quick: bool,
    broker: PathBuf,
    websockify: Option<PathBuf>,
    out: Option<PathBuf>,
    /// Run only these sections (for investigating one).
    only: Vec<String>,
}

impl Opts {
    fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

const USAGE: &str = "usage: vncbroker-bench [--quick] [--broker PATH] [--websockify PATH] [--out FILE]\n\
     \x20      [--only proxy|sqlite|postgres|idle|session-control|tls|spice]...";

fn parse_args() -> anyhow::Result<Opts> {
    let mut opts = Opts {
        targets: false,
        quick: false,
        broker: std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("vncbroker"),
        websockify: None,
        out: None,
        only: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--targets" => opts.targets = true,
            "--broker" => opts.broker = args.next().context("--broker PATH")?.into(),
            "--websockify" => {
                opts.websockify = Some(args.next().context("--websockify PATH")?.into())
            }
            "--out" => opts.out = Some(args.next().context("--out FILE")?.into()),
            "--only" => {
                let s = args.next().context("--only SECTION")?;
                if ![
                    "proxy",
                    "sqlite",
                    "postgres",
                    "idle",
                    "session-control",
                    "tls",
                    "spice",
                ]
                .contains(&s.as_str())
                {
                    bail!("unknown section {s:?}\n{USAGE}");
                }
                opts.only.push(s);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(opts)
}

/// How much of everything a run does.
struct Scale {
    quick: bool,
    /// Seconds each throughput or rate measurement runs.
    secs: f64,
    /// Repetitions of each measurement; the median is reported.
    reps: usize,
    /// Round trips timed per path.
    rtt_count: usize,
    /// Tokens written into the table for the full-table measurement.
    fill: usize,
    /// Idle sessions held by one broker process, in two steps.
    idle_one: [usize; 2],
    /// Idle sessions spread over two broker processes.
    idle_two: usize,
    /// Idle sessions through websockify (a process each).
    idle_websockify: usize,
    /// Idle sessions to QEMU's VNC server, in one broker process, in two steps.
    idle_qemu: [usize; 2],
}

impl Scale {
    fn new(quick: bool) -> Scale {
        if quick {
            Scale {
                quick,
                secs: 0.3,
                reps: 1,
                rtt_count: 200,
                fill: 20_000,
                idle_one: [100, 400],
                idle_two: 500,
                idle_websockify: 20,
                idle_qemu: [20, 50],
            }
        } else {
            Scale {
                quick,
                secs: 3.0,
                reps: 5,
                rtt_count: 5000,
                fill: 1_000_000,
                idle_one: [1000, 9000],
                idle_two: 10_000,
                idle_websockify: 200,
                idle_qemu: [500, 1000],
            }
        }
    }
}

// ---------------------------------------------------------------- servers

/// Accepts forever, riding out transient errors (such as running out of
/// file descriptors for a moment).
async fn accept_loop<F>(l: TcpListener, mut each: F)
where
    F: FnMut(TcpStream),
{
    loop {
        match l.accept().await {
            Ok((s, _)) => each(s),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Sends 64 KiB writes as fast as the reader takes them.
async fn source_server() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(accept_loop(l, |mut s| {
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let chunk = vec![0x5Au8; 64 * 1024];
            while s.write_all(&chunk).await.is_ok() {}
        });
    }));
    Ok(addr)
}

/// Reads and discards, counting bytes.
async fn sink_server(count: Arc<AtomicU64>) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(accept_loop(l, move |mut s| {
        let count = Arc::clone(&count);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
    }));
    Ok(addr)
}

/// Echoes; greets with an RFB version line so session setup has a first byte.
async fn echo_server(greet: bool) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(accept_loop(l, move |mut s| {
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            if greet && s.write_all(b"RFB 003.008\n").await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }));
    Ok(addr)
}

/// Accepts and stays silent until the peer closes: the far end of an idle
/// session. With `greet`, sends the RFB version line (12 bytes) first, as a
/// VNC server does at accept, and then stays silent. Counts the connections
/// open.
async fn silent_server(open: Arc<AtomicU64>, greet: bool) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(accept_loop(l, move |mut s| {
        let open = Arc::clone(&open);
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            if greet {
                let _ = s.write_all(b"RFB 003.008\n").await;
            }
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }));
    Ok(addr)
}

/// Answers each connection with the sink's byte count, the number of
/// silent connections open and the RFB sink's byte count (8 bytes each,
/// big-endian).
async fn stats_server(
    count: Arc<AtomicU64>,
    open: Arc<AtomicU64>,
    rfb_count: Arc<AtomicU64>,
) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(accept_loop(l, move |mut s| {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&count.load(Ordering::Relaxed).to_be_bytes());
        b[8..16].copy_from_slice(&open.load(Ordering::Relaxed).to_be_bytes());
        b[16..].copy_from_slice(&rfb_count.load(Ordering::Relaxed).to_be_bytes());
        tokio::spawn(async move {
            let _ = s.write_all(&b).await;
        });
    }));
    Ok(addr)
}

/// The framebuffer the RFB targets announce.
const RFB_WIDTH: u16 = 1024;
const RFB_HEIGHT: u16 = 768;
/// The side of the RFB source's square Raw rectangles: 128 × 128 pixels of
/// 4 bytes, 64 KiB of pixel data per FramebufferUpdate.
const RFB_TILE: u16 = 128;
/// Distinct FramebufferUpdates the RFB source cycles through (4 MiB, more
/// than a level-3 zstd window, so a recording cannot just point back at the
/// previous copy).
const RFB_POOL: usize = 64;

/// What an RFB target does once the handshake is over.
#[derive(Clone, Copy)]
enum RfbMode {
    /// FramebufferUpdates of one 128 × 128 Raw rectangle, as fast as the
    /// connection takes them.
    Source,
    /// Reads and counts everything.
    Sink,
    /// Answers each 10-byte FramebufferUpdateRequest with a 20-byte
    /// FramebufferUpdate of one 1 × 1 Raw rectangle.
    Echo,
}

/// ServerInit: 1024 × 768, 32 bpp, depth 24, true colour, little-endian
/// 0x00RRGGBB, named "bench".
fn server_init() -> Vec<u8> {
    let mut b = Vec::with_capacity(29);
    b.extend_from_slice(&RFB_WIDTH.to_be_bytes());
    b.extend_from_slice(&RFB_HEIGHT.to_be_bytes());
    // bits-per-pixel, depth, big-endian, true-colour
    b.extend_from_slice(&[32, 24, 0, 1]);
    // red, green, blue max; red, green, blue shift; 3 padding bytes
    for _ in 0..3 {
        b.extend_from_slice(&255u16.to_be_bytes());
    }
    b.extend_from_slice(&[16, 8, 0, 0, 0, 0]);
    b.extend_from_slice(&5u32.to_be_bytes());
    b.extend_from_slice(b"bench");
    b
}

/// The server's side of an RFB 3.8 handshake with security type None.
async fn rfb_server_handshake(s: &mut TcpStream) -> std::io::Result<()> {
    s.write_all(b"RFB 003.008\n").await?;
    let mut version = [0u8; 12];
    s.read_exact(&mut version).await?;
    s.write_all(&[1, 1]).await?;
    let mut choice = [0u8; 1];
    s.read_exact(&mut choice).await?;
    if choice[0] != 1 {
        return Err(std::io::Error::other(
            "security type other than None chosen",
        ));
    }
    s.write_all(&0u32.to_be_bytes()).await?;
    let mut client_init = [0u8; 1];
    s.read_exact(&mut client_init).await?;
    s.write_all(&server_init()).await
}

/// A FramebufferUpdate header with one rectangle, Raw.
fn update_head(x: u16, y: u16, w: u16, h: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[2..4].copy_from_slice(&1u16.to_be_bytes());
    b[4..6].copy_from_slice(&x.to_be_bytes());
    b[6..8].copy_from_slice(&y.to_be_bytes());
    b[8..10].copy_from_slice(&w.to_be_bytes());
    b[10..12].copy_from_slice(&h.to_be_bytes());
    // encoding 0: Raw
    b
}

/// The RFB source's updates: tiles across the screen, each pixel a random
/// 24-bit colour (its padding byte zero), like an already-compressed
/// encoding for a recording's compressor.
fn source_pool() -> Vec<Vec<u8>> {
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let cols = RFB_WIDTH / RFB_TILE;
    let rows = RFB_HEIGHT / RFB_TILE;
    let px = usize::from(RFB_TILE) * usize::from(RFB_TILE);
    (0..RFB_POOL)
        .map(|i| {
            let i = i as u16;
            let (x, y) = ((i % cols) * RFB_TILE, ((i / cols) % rows) * RFB_TILE);
            let mut m = Vec::with_capacity(16 + px * 4);
            m.extend_from_slice(&update_head(x, y, RFB_TILE, RFB_TILE));
            for _ in 0..px {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let c = (rng >> 20) as u32 & 0x00FF_FFFF;
                m.extend_from_slice(&c.to_le_bytes());
            }
            m
        })
        .collect()
}

/// A VNC server that speaks RFB: the handshake, then `mode`. `count` is
/// the sink's byte counter.
async fn rfb_server(mode: RfbMode, count: Arc<AtomicU64>) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let pool = Arc::new(match mode {
        RfbMode::Source => source_pool(),
        _ => Vec::new(),
    });
    tokio::spawn(accept_loop(l, move |mut s| {
        let _ = s.set_nodelay(true);
        let (count, pool) = (Arc::clone(&count), Arc::clone(&pool));
        tokio::spawn(async move {
            if rfb_server_handshake(&mut s).await.is_err() {
                return;
            }
            match mode {
                RfbMode::Source => {
                    for m in pool.iter().cycle() {
                        if s.write_all(m).await.is_err() {
                            break;
                        }
                    }
                }
                RfbMode::Sink => {
                    let mut buf = vec![0u8; 256 * 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                RfbMode::Echo => {
                    let mut answer = update_head(0, 0, 1, 1).to_vec();
                    answer.extend_from_slice(&[0x33, 0x66, 0x99, 0]);
                    let mut s = BufReader::new(s);
                    let mut req = [0u8; 10];
                    while s.read_exact(&mut req).await.is_ok() {
                        if req[0] != 3 || s.get_mut().write_all(&answer).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }));
    Ok(addr)
}

/// `--targets`: the stand-in VNC servers, in a process of their own. Prints
/// the ports and serves until standard input closes.
async fn run_targets() -> anyhow::Result<()> {
    let count = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicU64::new(0));
    let rfb_count = Arc::new(AtomicU64::new(0));
    let ports = [
        source_server().await?,
        sink_server(Arc::clone(&count)).await?,
        echo_server(false).await?,
        echo_server(true).await?,
        silent_server(Arc::clone(&open), false).await?,
        stats_server(count, Arc::clone(&open), Arc::clone(&rfb_count)).await?,
        rfb_server(RfbMode::Source, Arc::clone(&rfb_count)).await?,
        rfb_server(RfbMode::Sink, Arc::clone(&rfb_count)).await?,
        rfb_server(RfbMode::Echo, rfb_count).await?,
        silent_server(open, true).await?,
        spice::server().await?,
    ];
    let line: Vec<String> = ports.iter().map(|a| a.port().to_string()).collect();
    println!("ports {}", line.join(" "));
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    Ok(())
}

/// The targets process and its ports.
struct Targets {
    child: tokio::process::Child,
    source: SocketAddr,
    sink: SocketAddr,
    echo: SocketAddr,
    greet: SocketAddr,
    silent: SocketAddr,
    stats: SocketAddr,
    rfb_source: SocketAddr,
    rfb_sink: SocketAddr,
    rfb_echo: SocketAddr,
    /// Greets (the RFB version line), then silent; counted with `silent`.
    greet_silent: SocketAddr,
    /// The stand-in SPICE server (see [`spice`]).
    spice: SocketAddr,
}

impl Targets {
    async fn start() -> anyhow::Result<Targets> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("--targets")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).await?;
        let ports: Vec<u16> = line
            .trim()
            .strip_prefix("ports ")
            .context("no ports line")?
            .split(' ')
            .map(|p| p.parse())
            .collect::<Result<_, _>>()?;
        let at = |i: usize| -> anyhow::Result<SocketAddr> {
            Ok(SocketAddr::from((
                [127, 0, 0, 1],
                *ports.get(i).context("port")?,
            )))
        };
        Ok(Targets {
            source: at(0)?,
            sink: at(1)?,
            echo: at(2)?,
            greet: at(3)?,
            silent: at(4)?,
            stats: at(5)?,
            rfb_source: at(6)?,
            rfb_sink: at(7)?,
            rfb_echo: at(8)?,
            greet_silent: at(9)?,
            spice: at(10)?,
            child,
        })
    }

    /// (bytes the sink received, silent connections open).
    async fn stats(&self) -> anyhow::Result<(u64, u64)> {
        let b = self.all_stats().await?;
        Ok((b[0], b[1]))
    }

    /// Bytes the RFB sink received past its handshakes.
    async fn rfb_sunk(&self) -> anyhow::Result<u64> {
        Ok(self.all_stats().await?[2])
    }

    async fn all_stats(&self) -> anyhow::Result<[u64; 3]> {
        let mut s = TcpStream::connect(self.stats).await?;
        let mut b = [0u8; 24];
        s.read_exact(&mut b).await?;
        let at = |i: usize| -> anyhow::Result<u64> {
            Ok(u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into()?))
        };
        Ok([at(0)?, at(1)?, at(2)?])
    }

    /// Waits until exactly `want` connections to the silent and greeting-
    /// then-silent targets are open.
    async fn wait_silent(&self, want: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let open = self.stats().await?.1;
            if open == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{open} connections reached the silent target, {want} expected");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---------------------------------------------------------------- broker

/// Configuration for every broker the bench starts: quiet, long token
/// lifetimes, no failure budget and no connection cap per address (the load
/// client reuses one address), and pings on (the default 30 s) but no pong
/// deadline within a run, since the idle clients do not answer them.
const BROKER_CONFIG: &str = "[tokens]\nmax_ttl = 86400\n\
                             [http]\nfailures_per_minute = 0\nmax_connections_per_address = 0\n\
                             [proxy]\nping_interval_secs = 30\npong_timeout_secs = 3600\n";

/// Extra environment for the `serve` processes, for experiments:
/// `$VNCBROKER_BENCH_BROKER_ENV`, space-separated NAME=VALUE pairs (such as
/// `TOKIO_WORKER_THREADS=1 MALLOC_ARENA_MAX=2`).
fn broker_env() -> Vec<(String, String)> {
    std::env::var("VNCBROKER_BENCH_BROKER_ENV")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The brokers' log level: `warn`, or `$VNCBROKER_BENCH_LOG`.
fn broker_log_level() -> String {
    std::env::var("VNCBROKER_BENCH_LOG").unwrap_or_else(|_| "warn".into())
}

struct Broker {
    child: std::process::Child,
    addr: SocketAddr,
    db: String,
    cfg: PathBuf,
    bin: PathBuf,
    log: PathBuf,
}

impl Broker {
    /// Starts `vncbroker serve` on `db`, its config and log named `name` in `dir`.
    async fn spawn(bin: &Path, db: &str, dir: &Path, name: &str) -> anyhow::Result<Broker> {
        Broker::spawn_logging(bin, db, dir, name, &broker_log_level()).await
    }

    /// The same, logging at `level` (a tracing filter).
    async fn spawn_logging(
        bin: &Path,
        db: &str,
        dir: &Path,
        name: &str,
        level: &str,
    ) -> anyhow::Result<Broker> {
        Broker::spawn_configured(bin, db, dir, name, level, "").await
    }

    /// The same, with `extra` (more TOML sections) after the bench's
    /// configuration.
    async fn spawn_configured(
        bin: &Path,
        db: &str,
        dir: &Path,
        name: &str,
        level: &str,
        extra: &str,
    ) -> anyhow::Result<Broker> {
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, format!("{BROKER_CONFIG}{extra}"))?;
        let log = dir.join(format!("{name}.log"));
        let mut cmd = std::process::Command::new(bin);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--node-name", name])
            .args(["--database", db])
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", level)
            .envs(broker_env())
            .stderr(std::fs::File::create(&log)?);
        let log_path = log.clone();
        let (child, addr) = tokio::task::spawn_blocking(move || {
            testkit::broker::spawn_serve(&mut cmd, &log_path, Duration::from_secs(60))
        })
        .await?
        .map_err(anyhow::Error::msg)?;
        watchdog(&child.id().to_string(), child.id(), &cfg.to_string_lossy());
        Ok(Broker {
            child,
            addr,
            db: db.to_owned(),
            cfg,
            bin: bin.to_owned(),
            log,
        })
    }

    /// A broker on a database of its own: the admin user and the VMs added.
    async fn create(
        bin: &Path,
        db: &str,
        dir: &Path,
        name: &str,
        targets: &Targets,
    ) -> anyhow::Result<Broker> {
        let broker = Broker::spawn(bin, db, dir, name).await?;
        broker.setup(targets)?;
        Ok(broker)
    }

    /// Adds the admin user and the VMs to a new database.
    fn setup(&self, targets: &Targets) -> anyhow::Result<()> {
        self.cli(
            &["user", "add", "bench", "--admin", "--password-stdin"],
            Some("benchpw"),
        )?;
        for (vm, target) in [
            (VM_SOURCE, targets.source),
            (VM_SINK, targets.sink),
            (VM_ECHO, targets.echo),
            (VM_GREET, targets.greet),
            (VM_SILENT, targets.silent),
        ] {
            self.add_vm(vm, target)?;
        }
        Ok(())
    }

    fn pid(&self) -> anyhow::Result<u32> {
        Ok(self.child.id())
    }

    fn cli(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        testkit::broker::cli(&self.bin, Some(&self.cfg), &self.db, None, args, stdin)
            .map_err(anyhow::Error::msg)
    }

    fn add_vm(&self, id: i64, target: SocketAddr) -> anyhow::Result<()> {
        let (id, port) = (id.to_string(), target.port().to_string());
        self.cli(&testkit::broker::vm_add_args(&id, &port, "bench"), None)?;
        Ok(())
    }

    /// A SPICE VM with the stand-in's password stored.
    fn add_spice_vm(&self, id: i64, target: SocketAddr) -> anyhow::Result<()> {
        let (id, port) = (id.to_string(), target.port().to_string());
        let mut args = testkit::broker::vm_add_password_args(&id, &port, "bench");
        args.extend(["--protocol", "spice"]);
        self.cli(&args, Some(spice::PASSWORD))?;
        Ok(())
    }

    fn mint(&self, vm: i64) -> anyhow::Result<String> {
        let out = self.cli(&["token", "mint", &vm.to_string(), "--ttl", "86400"], None)?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v["token"].as_str().context("token")?.to_owned())
    }

    fn via(&self, vm: i64) -> anyhow::Result<Via> {
        Ok(Via::Ws(self.addr, self.mint(vm)?))
    }

    /// Stops it and reports what it logged, if it died.
    async fn stop(mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            eprintln!(
                "note: broker exited early ({status}): {}",
                tail(&std::fs::read_to_string(&self.log).unwrap_or_default())
            );
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

const VM_SOURCE: i64 = 1;
const VM_SINK: i64 = 2;
const VM_ECHO: i64 = 3;
const VM_GREET: i64 = 4;
const VM_SILENT: i64 = 5;
/// Idle sessions: the target that greets and then stays silent.
const VM_IDLE_GREET: i64 = 6;
/// Idle sessions: QEMU's VNC server, added by the idle section itself.
const VM_QEMU: i64 = 7;
/// The stand-in SPICE server, with a stored password.
const VM_SPICE: i64 = 8;

// ---------------------------------------------------------------- websockify

/// websockify, in a process group of its own (it forks a process per
/// connection), killed as a group at the end.
struct Websockify {
    child: std::process::Child,
    addr: SocketAddr,
    version: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Websockify {
    /// Starts `bin` with the TokenFile plugin, a token named after each
    /// target, and waits until it listens.
    async fn start(
        bin: &Path,
        version: String,
        tokens: &[(&str, SocketAddr)],
        extra: &[&std::ffi::OsStr],
    ) -> anyhow::Result<Websockify> {
        let dir = tempfile::Builder::new()
            .prefix("vncbroker-bench-websockify-")
            .tempdir()?;
        let token_dir = dir.path().join("tokens");
        std::fs::create_dir(&token_dir)?;
        for (name, addr) in tokens {
            std::fs::write(token_dir.join(name), format!("{name}: {addr}\n"))?;
        }
        let port = testkit::free_port();
        let log = dir.path().join("websockify.log");
        let out = std::fs::File::create(&log)?;
        let child = std::process::Command::new(bin)
            .args(["--token-plugin", "TokenFile", "--token-source"])
            .arg(&token_dir)
            .args(extra)
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut w = Websockify {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            version,
            log,
            _dir: dir,
        };
        // Should this process die without dropping it, end the group.
        watchdog(&format!("-{}", w.child.id()), w.child.id(), "websockify");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(w.addr).await.is_ok() {
                return Ok(w);
            }
            if let Some(status) = w.child.try_wait()? {
                bail!(
                    "websockify exited ({status}): {}",
                    tail(&std::fs::read_to_string(&w.log).unwrap_or_default())
                );
            }
            if Instant::now() > deadline {
                bail!("websockify did not listen within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn via(&self, token: &str) -> Via {
        Via::Ws(self.addr, token.to_owned())
    }

    /// The process group: websockify and its per-connection children.
    fn pgid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until websockify has no connection process left.
    async fn wait_alone(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while group_memory(self.pgid()).0 > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts a process, in a process group of its own (which Ctrl-C spares),
/// that waits for this one to end and then kills `target` (a pid, or a
/// process group as `-PGID`) if process `pid`'s command line still contains
/// `mark`, so nothing outlives a bench killed without cleaning up.
fn watchdog(target: &str, pid: u32, mark: &str) {
    let script = r#"while [ -e "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; do sleep 0.5; done
grep -q -- "$4" "/proc/$3/cmdline" 2>/dev/null && env kill -s KILL -- "$2""#;
    let _ = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("vncbroker-bench-watchdog")
        .arg(std::process::id().to_string())
        .arg(target)
        .arg(pid.to_string())
        .arg(mark)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
}

/// Waits until websockify's connection processes of the last measurement
/// are gone, so they take no CPU from the next one.
async fn settle(wsfy: Option<&Websockify>) {
    if let Some(w) = wsfy {
        w.wait_alone(Duration::from_secs(5)).await;
    }
}

impl Drop for Websockify {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- the plain relay

/// The socat that stands for a plain relay: `socat -b65536`, one forking
/// listener per target, all in one process group (each connection is a
/// process of its own), killed as a group at the end.
struct Relay {
    children: Vec<std::process::Child>,
    /// The listener for each target, by name.
    ports: Vec<(String, SocketAddr)>,
    version: String,
}

const SOCAT: &str = "/usr/bin/socat";

impl Relay {
    /// Starts a listener per target; with `tls` (cert, key), OPENSSL-LISTEN.
    async fn start(
        targets: &[(&str, SocketAddr)],
        tls: Option<(&Path, &Path)>,
    ) -> anyhow::Result<Relay> {
        let bin = if Path::new(SOCAT).is_file() {
            SOCAT
        } else {
            "socat"
        };
        let version = first_line_matching(bin, &["-V"], "socat version")
            .map(|l| {
                l.split_whitespace()
                    .nth(2)
                    .unwrap_or("unknown version")
                    .to_owned()
            })
            .context("socat is not installed (Debian: apt-get install socat)")?;
        let mut r = Relay {
            children: Vec::new(),
            ports: Vec::new(),
            version,
        };
        for (name, target) in targets {
            let port = testkit::free_port();
            let listen = match tls {
                Some((cert, key)) => format!(
                    "OPENSSL-LISTEN:{port},bind=127.0.0.1,cert={},key={},verify=0,reuseaddr,fork",
                    cert.display(),
                    key.display()
                ),
                None => format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"),
            };
            let group = r.children.first().map_or(0, |c| c.id() as i32);
            let child = std::process::Command::new(bin)
                .arg("-b65536")
                .arg(&listen)
                .arg(format!("TCP:{target}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(group)
                .spawn()
                .with_context(|| format!("starting {bin}"))?;
            if group == 0 {
                // Should this process die without dropping it, end the group.
                watchdog(&format!("-{}", child.id()), child.id(), "socat");
            }
            r.children.push(child);
            r.ports
                .push(((*name).to_owned(), SocketAddr::from(([127, 0, 0, 1], port))));
        }
        // Listening: a port taken shows in /proc/net/tcp; a test connection
        // would start a relay process for nothing.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !r.ports.iter().all(|(_, a)| listening(a.port())) {
            for c in &mut r.children {
                if let Some(status) = c.try_wait()? {
                    bail!("socat exited ({status})");
                }
            }
            if Instant::now() > deadline {
                bail!("socat did not listen within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(r)
    }

    fn addr(&self, name: &str) -> anyhow::Result<SocketAddr> {
        self.ports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .with_context(|| format!("no relay listener for {name}"))
    }

    fn via(&self, name: &str) -> anyhow::Result<Via> {
        Ok(Via::Relay(self.addr(name)?))
    }

    fn pgid(&self) -> u32 {
        self.children.first().map_or(0, |c| c.id())
    }

    /// The listeners (their connection processes are forked from them).
    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.id()).collect()
    }

    /// Waits until only the listeners are left: socat lingers half a second
    /// after one side closes (its -t default).
    async fn wait_alone(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while group_pids(self.pgid()).len() > self.children.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let group = format!("-{}", self.pgid());
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

/// Whether something listens on 127.0.0.1:`port` (from /proc/net/tcp).
fn listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
        })
    })
}

/// The first line of `cmd args`' output (standard output, else standard
/// error) that contains `mark`.
fn first_line_matching(cmd: &str, args: &[&str], mark: &str) -> Option<String> {
    let out = std::process::Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find(|l| l.contains(mark))
        .map(|l| l.trim().to_owned())
}

/// A CA and a server certificate for 127.0.0.1 that it signed, made with
/// openssl in `dir`: (CA, server certificate, server key), PEM.
fn make_certs(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .context("running openssl (Debian: apt-get install openssl)")?;
        if !out.status.success() {
            bail!(
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    let ec = [
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let with =
        |more: &[&str]| -> Vec<String> { ec.iter().chain(more).map(|s| (*s).to_owned()).collect() };
    let ca = with(&[
        "-x509",
        "-keyout",
        "bench-ca.key",
        "-out",
        "bench-ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=vncbroker bench CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&ca.iter().map(String::as_str).collect::<Vec<_>>())?;
    let req = with(&[
        "-keyout",
        "bench-server.key",
        "-out",
        "bench-server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&req.iter().map(String::as_str).collect::<Vec<_>>())?;
    std::fs::write(
        dir.join("bench-server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "bench-server.csr",
        "-CA",
        "bench-ca.pem",
        "-CAkey",
        "bench-ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "bench-server.ext",
        "-out",
        "bench-server.pem",
    ])?;
    Ok((
        dir.join("bench-ca.pem"),
        dir.join("bench-server.pem"),
        dir.join("bench-server.key"),
    ))
}

/// Waits until the peers' connection processes of the last measurement
/// are gone, so they take no CPU from the next one.
async fn settle_peers(relay: Option<&Relay>, wsfy: Option<&Websockify>) {
    settle(wsfy).await;
    if let Some(r) = relay {
        r.wait_alone(Duration::from_secs(5)).await;
    }
}

/// The version of the websockify installed in the virtual environment
/// `bin` belongs to, from its dist-info directory.
fn websockify_version(bin: &Path) -> Option<String> {
    let venv = bin.parent()?.parent()?;
    for lib in std::fs::read_dir(venv.join("lib")).ok()?.flatten() {
        let Ok(entries) = std::fs::read_dir(lib.path().join("site-packages")) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(v) = name
                .strip_prefix("websockify-")
                .and_then(|v| v.strip_suffix(".dist-info"))
            {
                return Some(v.to_owned());
            }
        }
    }
    None
}

/// websockify 0.13: `explicit` if given, else the first found in the
/// project's .venv, /tmp/pv or target/bench-venv.
fn locate_websockify(explicit: Option<&Path>) -> Option<(PathBuf, String)> {
    if let Some(bin) = explicit {
        let v = websockify_version(bin).unwrap_or_else(|| "unknown version".into());
        return Some((bin.to_owned(), v));
    }
    let candidates = [
        Path::new(REPO).join(".venv/bin/websockify"),
        PathBuf::from("/tmp/pv/bin/websockify"),
        bench_venv().join("bin/websockify"),
    ];
    candidates.into_iter().find_map(|bin| {
        let v = websockify_version(&bin)?;
        (bin.is_file() && v == WEBSOCKIFY_VERSION).then_some((bin, v))
    })
}

fn bench_venv() -> PathBuf {
    Path::new(REPO).join("target/bench-venv")
}

/// Installs websockify 0.13.0 from PyPI into target/bench-venv.
fn install_websockify() -> anyhow::Result<PathBuf> {
    let venv = bench_venv();
    eprintln!(
        "installing websockify {WEBSOCKIFY_VERSION} into {}",
        venv.display()
    );
    let ok = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .stdout(Stdio::null())
        .status()
        .context("running python3 -m venv")?
        .success();
    if !ok {
        bail!("python3 -m venv {} failed", venv.display());
    }
    let ok = std::process::Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .arg(format!("websockify=={WEBSOCKIFY_VERSION}"))
        .stdout(Stdio::null())
        .status()
        .context("running pip")?
        .success();
    if !ok {
        bail!("pip install websockify=={WEBSOCKIFY_VERSION} failed");
    }
    Ok(venv.join("bin/websockify"))
}

// ---------------------------------------------------------------- PostgreSQL

/// The database the PostgreSQL broker uses, and what to undo at the end.
struct Pg {
    url: String,
    version: String,
    /// A database this run created on someone else's server (DATABASE_URL).
    created: Option<(String, String)>,
    /// The server itself, when this run started it (dropped last).
    _server: Option<testkit::pg::PgServer>,
}

impl Pg {
    async fn start() -> anyhow::Result<Pg> {
        let (server, admin) = match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => (None, url),
            _ => {
                let s = testkit::pg::PgServer::start();
                let admin = s.admin_url();
                (Some(s), admin)
            }
        };
        let name = format!("vncbroker_bench_{}", std::process::id());
        let client = pg_connect(&admin).await?;
        let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
        let (url, created) = match client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
        {
            Ok(()) => {
                let url = testkit::pg::with_database(&admin, &name);
                let created = server.is_none().then(|| (admin.clone(), name));
                (url, created)
            }
            Err(e) if server.is_none() => {
                eprintln!("note: cannot create a database in DATABASE_URL ({e}); using it as is");
                (admin.clone(), None)
            }
            Err(e) => bail!("CREATE DATABASE: {e}"),
        };
        Ok(Pg {
            url,
            version: version
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
            created,
            _server: server,
        })
    }

    /// Removes what this run put on someone else's server.
    async fn clean_up(&self) {
        match &self.created {
            Some((admin, name)) => {
                if let Ok(c) = pg_connect(admin).await {
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
                        .await;
                }
            }
            None if self._server.is_none() => {
                if let Ok(c) = pg_connect(&self.url).await {
                    let _ = c
                        .batch_execute("DELETE FROM tokens WHERE user_name = 'bench-fill'")
                        .await;
                }
            }
            None => {}
        }
    }
}

async fn pg_connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(conn);
    Ok(client)
}

// ---------------------------------------------------------------- filling the token table

/// Writes `n` unrelated live tokens (random 32-byte hashes) straight into
/// the broker's SQLite database, in one transaction.
fn fill_sqlite(path: &Path, n: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut c = rusqlite::Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(60))?;
    let now = now_unix();
    let tx = c.transaction()?;
    {
        let mut st = tx.prepare(
            "INSERT INTO tokens (token_hash, vm_id, target_host, target_port, user_name, \
             created_at, expires_at) VALUES (randomblob(32), ?1, '127.0.0.1', 5900, 'bench-fill', ?2, ?3)",
        )?;
        for i in 0..n {
            st.execute(rusqlite::params![
                1000 + (i % 1000) as i64,
                now,
                now + 86400
            ])?;
        }
    }
    tx.commit()?;
    // Fold the WAL into the database now, not during the measurement.
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    c.execute_batch("ANALYZE")?;
    Ok(t.elapsed())
}

/// The same on PostgreSQL, with one INSERT ... SELECT over generate_series.
async fn fill_postgres(url: &str, n: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let c = pg_connect(url).await?;
    let now = now_unix();
    let salt = format!("{}-{}", std::process::id(), now);
    c.batch_execute(&format!(
        "INSERT INTO tokens (token_hash, vm_id, target_host, target_port, user_name, created_at, expires_at) \
         SELECT sha256(convert_to('{salt}-' || i, 'UTF8')), 1000 + i % 1000, '127.0.0.1', 5900, \
                'bench-fill', {now}, {exp} \
         FROM generate_series(1, {n}) AS i",
        exp = now + 86400
    ))
    .await?;
    // VACUUM cannot run in the implicit transaction of a multi-statement batch.
    c.batch_execute("VACUUM ANALYZE tokens").await?;
    Ok(t.elapsed())
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------- WebSocket client

/// A byte stream the client reads and writes: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// The frame reader of a plain or a TLS connection.
enum Frames {
    Tcp(FrameReader<tokio::net::tcp::OwnedReadHalf>),
    Tls(FrameReader<Reader>),
}

impl Frames {
    async fn next(&mut self) -> Result<Ev, frames::FrameError> {
        match self {
            Frames::Tcp(f) => f.next().await,
            Frames::Tls(f) => f.next().await,
        }
    }

    fn buf(&self) -> &[u8] {
        match self {
            Frames::Tcp(f) => &f.buf,
            Frames::Tls(f) => &f.buf,
        }
    }

    fn unread(&mut self, n: usize) {
        match self {
            Frames::Tcp(f) => f.unread(n),
            Frames::Tls(f) => f.unread(n),
        }
    }
}

/// The kit's raw client: upgrade, masked binary frames out, frames in.
struct Ws {
    fr: Frames,
    wr: Writer,
}

impl Ws {
    /// Connects with a receive buffer of `cap` bytes.
    async fn connect(addr: SocketAddr, token: &str, cap: usize) -> anyhow::Result<Ws> {
        let (fr, wr) = frames::connect(addr, token, cap).await?;
        Ok(Ws {
            fr: Frames::Tcp(fr),
            wr: Box::new(wr),
        })
    }

    /// The same over TLS (WSS): the upgrade request written and its
    /// response head read byte by byte, so no frame byte is read past it.
    async fn connect_tls(
        addr: SocketAddr,
        token: &str,
        cap: usize,
        tls: &tokio_rustls::TlsConnector,
    ) -> anyhow::Result<Ws> {
        let mut s = tls_connect(addr, tls).await?;
        s.write_all(frames::upgrade_request(addr, token).as_bytes())
            .await?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > 8192 {
                bail!("upgrade response too long");
            }
            let mut b = [0u8; 1];
            if s.read(&mut b).await? == 0 {
                bail!("closed during the upgrade");
            }
            head.push(b[0]);
        }
        if !head.starts_with(b"HTTP/1.1 101") {
            bail!("upgrade refused: {}", String::from_utf8_lossy(&head));
        }
        let (rd, wr) = tokio::io::split(s);
        let rd: Reader = Box::new(rd);
        Ok(Ws {
            fr: Frames::Tls(FrameReader::new(rd, cap)),
            wr: Box::new(wr),
        })
    }

    /// Reads payload bytes; returns how many arrived (0 on close).
    async fn read_payload(&mut self) -> anyhow::Result<usize> {
        loop {
            match self.fr.next().await? {
                Ev::Data(a, b) => return Ok(b - a),
                Ev::Ping(_) => {}
                Ev::Close(..) | Ev::Eof => return Ok(0),
            }
        }
    }

    /// Sends one masked binary frame whose payload is already masked with
    /// `MASK`: header and payload in one vectored write, as a browser sends
    /// a message in one segment (two writes would make every message two
    /// segments, and the proxy would wake for the header alone).
    async fn send_masked(&mut self, masked_payload: &[u8]) -> anyhow::Result<()> {
        let head = frames::frame_head(2, masked_payload.len(), MASK);
        let (mut h, mut p) = (&head[..], masked_payload);
        while !h.is_empty() || !p.is_empty() {
            let n = self
                .wr
                .write_vectored(&[std::io::IoSlice::new(h), std::io::IoSlice::new(p)])
                .await?;
            if n == 0 {
                anyhow::bail!("connection closed while sending");
            }
            let from_head = n.min(h.len());
            h = &h[from_head..];
            p = &p[n - from_head..];
        }
        Ok(())
    }

    /// Sends `data` in one binary frame, masking it here.
    async fn send_plain(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.send_masked(&mask(data)).await
    }

    /// Fills `out` from the payloads of the frames that arrive; what is
    /// left of the last frame stays buffered.
    async fn read_exact(&mut self, out: &mut [u8]) -> anyhow::Result<()> {
        let mut got = 0;
        while got < out.len() {
            match self.fr.next().await? {
                Ev::Data(a, b) => {
                    let n = (b - a).min(out.len() - got);
                    out[got..got + n].copy_from_slice(&self.fr.buf()[a..a + n]);
                    if b - a > n {
                        self.fr.unread(b - a - n);
                    }
                    got += n;
                }
                Ev::Ping(_) => {}
                Ev::Close(code, reason) => bail!("the broker closed the session: {code} {reason}"),
                Ev::Eof => bail!("the broker closed the connection"),
            }
        }
        Ok(())
    }
}

const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

fn masked(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8) ^ MASK[i % 4]).collect()
}

/// `data` masked with `MASK`, as a frame's payload goes on the wire.
fn mask(data: &[u8]) -> Vec<u8> {
    data.iter()
        .enumerate()
        .map(|(i, b)| b ^ MASK[i % 4])
        .collect()
}

/// How a measurement reaches its target: straight over TCP, through the
/// plain relay (socat, raw TCP), or through a WebSocket proxy (vncbroker or
/// websockify) with a token; the last two also over TLS.
#[derive(Clone)]
enum Via {
    Direct(SocketAddr),
    Relay(SocketAddr),
    Ws(SocketAddr, String),
    /// Raw bytes in TLS: the TLS relay.
    Tls(SocketAddr, Arc<tokio_rustls::TlsConnector>),
    /// WebSocket over TLS.
    Wss(SocketAddr, String, Arc<tokio_rustls::TlsConnector>),
}

/// An open connection on a [`Via`]: raw bytes, or WebSocket frames.
enum Conn {
    Raw(Box<dyn Io>),
    Ws(Ws),
}

impl Via {
    /// Connects; `nodelay` for raw TCP (the WebSocket client always sets
    /// it), `cap` the WebSocket receive buffer.
    async fn open(&self, cap: usize, nodelay: bool) -> anyhow::Result<Conn> {
        Ok(match self {
            Via::Direct(addr) | Via::Relay(addr) => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(nodelay)?;
                Conn::Raw(Box::new(s))
            }
            Via::Tls(addr, tls) => Conn::Raw(Box::new(tls_connect(*addr, tls).await?)),
            Via::Ws(addr, token) => Conn::Ws(Ws::connect(*addr, token, cap).await?),
            Via::Wss(addr, token, tls) => Conn::Ws(Ws::connect_tls(*addr, token, cap, tls).await?),
        })
    }
}

/// A TLS connection to 127.0.0.1 (TCP_NODELAY, as the WebSocket client).
async fn tls_connect(
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    Ok(tls.connect(name, tcp).await?)
}

/// A TLS client that trusts `ca` (PEM) alone.
fn tls_connector(ca: &Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The protocol version and cipher suite a TLS connection to `addr`
/// settles on, for the notes.
async fn tls_suite(addr: SocketAddr, tls: &tokio_rustls::TlsConnector) -> String {
    match tls_connect(addr, tls).await {
        Ok(s) => {
            let (_, c) = s.get_ref();
            let v = c
                .protocol_version()
                .map_or("?".into(), |v| format!("{v:?}"));
            let suite = c
                .negotiated_cipher_suite()
                .map_or("?".into(), |cs| format!("{:?}", cs.suite()));
            format!("{v} {suite}")
        }
        Err(e) => format!("handshake failed: {e:#}"),
    }
}

// ---------------------------------------------------------------- CPU time

/// Whose CPU time a measurement takes: one process (with its threads), or
/// every process of a process group (websockify and socat fork one per
/// connection).
#[derive(Clone, Copy)]
enum Proc {
    Pid(u32),
    Group(u32),
}

/// Clock ticks per second of /proc/PID/stat's times, from `getconf CLK_TCK`
/// (100 if that fails).
fn clock_ticks() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        first_line("getconf", &["CLK_TCK"])
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// A process's stat fields after "(comm)": state, ppid, pgrp, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// user + system ticks of a process's stat fields (utime, stime).
fn ticks_of(fields: &[String]) -> u64 {
    let at = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    at(11) + at(12)
}

/// user + system ticks of each process `p` covers, by pid.
fn cpu_ticks(p: Proc) -> std::collections::HashMap<u32, u64> {
    let mut out = std::collections::HashMap::new();
    match p {
        Proc::Pid(pid) => {
            if let Some(f) = stat_fields(pid) {
                out.insert(pid, ticks_of(&f));
            }
        }
        Proc::Group(pgid) => {
            for pid in group_pids(pgid) {
                if let Some(f) = stat_fields(pid) {
                    out.insert(pid, ticks_of(&f));
                }
            }
        }
    }
    out
}

/// The live (not zombie) processes of process group `pgid`.
fn group_pids(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Some(f) = stat_fields(pid) else {
            continue;
        };
        if f.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid)
            && f.first().is_some_and(|s| s != "Z")
        {
            out.push(pid);
        }
    }
    out
}

/// CPU seconds spent since `before` by the processes `p` covers now (a
/// process started since counts from zero).
fn cpu_since(p: Proc, before: &std::collections::HashMap<u32, u64>) -> f64 {
    let ticks: u64 = cpu_ticks(p)
        .iter()
        .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum();
    ticks as f64 / clock_ticks()
}

// ---------------------------------------------------------------- measurements

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// A throughput figure: payload bytes per second, and the proxy's CPU
/// seconds per GiB moved when its processes were sampled.
#[derive(Clone, Copy)]
struct Flow {
    rate: f64,
    cpu: Option<f64>,
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Bytes per second read over `conns` connections for `secs`; the CPU time
/// of `cpu` sampled around the same window.
async fn download(via: &Via, conns: usize, secs: f64, cpu: Option<Proc>) -> anyhow::Result<Flow> {
    let total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (total, stop, via) = (Arc::clone(&total), Arc::clone(&stop), via.clone());
        tasks.push(tokio::spawn(async move {
            match via.open(256 * 1024, false).await? {
                Conn::Ws(mut ws) => {
                    while !stop.load(Ordering::Relaxed) {
                        let n = ws.read_payload().await?;
                        if n == 0 {
                            break;
                        }
                        total.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                Conn::Raw(mut s) => {
                    let mut buf = vec![0u8; 256 * 1024];
                    while !stop.load(Ordering::Relaxed) {
                        let n = s.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        total.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    rate_cpu(&total, Duration::from_millis(200), secs, &stop, tasks, cpu).await
}

/// How fast `count` grows per second over `secs`, after `warmup`; then
/// `stop` is set, and the `tasks` that ended are checked for errors (the
/// others, stuck in a read, are aborted).
async fn rate_of(
    count: &AtomicU64,
    warmup: Duration,
    secs: f64,
    stop: &AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
) -> anyhow::Result<f64> {
    Ok(rate_cpu(count, warmup, secs, stop, tasks, None).await?.rate)
}

/// The same, with the CPU time of `cpu` over the window, per GiB counted.
async fn rate_cpu(
    count: &AtomicU64,
    warmup: Duration,
    secs: f64,
    stop: &AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    cpu: Option<Proc>,
) -> anyhow::Result<Flow> {
    tokio::time::sleep(warmup).await;
    let cpu0 = cpu.map(cpu_ticks);
    let t0 = Instant::now();
    let c0 = count.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let moved = (count.load(Ordering::Relaxed) - c0) as f64;
    let took = t0.elapsed().as_secs_f64();
    let spent = cpu.zip(cpu0.as_ref()).map(|(p, c0)| cpu_since(p, c0));
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        if t.is_finished() {
            t.await??;
        } else {
            t.abort();
        }
    }
    Ok(Flow {
        rate: moved / took,
        cpu: spent.filter(|_| moved > 0.0).map(|c| c / (moved / GIB)),
    })
}

/// Bytes per second the sink receives when the client sends `msg`-byte
/// messages (WebSocket frames, or writes of raw bytes); the CPU time of
/// `cpu` sampled around the same window.
async fn upload(
    via: &Via,
    targets: &Targets,
    msg: usize,
    secs: f64,
    cpu: Option<Proc>,
) -> anyhow::Result<Flow> {
    let stop = Arc::new(AtomicBool::new(false));
    let (via, stop2) = (via.clone(), Arc::clone(&stop));
    let task = tokio::spawn(async move {
        match via.open(4096, true).await? {
            Conn::Ws(mut ws) => {
                let payload = masked(msg);
                while !stop2.load(Ordering::Relaxed) {
                    ws.send_masked(&payload).await?;
                }
            }
            Conn::Raw(mut s) => {
                let payload = vec![1u8; msg];
                while !stop2.load(Ordering::Relaxed) {
                    s.write_all(&payload).await?;
                }
            }
        }
        anyhow::Ok(())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu0 = cpu.map(cpu_ticks);
    let t0 = Instant::now();
    let b0 = targets.stats().await?.0;
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let moved = (targets.stats().await?.0 - b0) as f64;
    let took = t0.elapsed().as_secs_f64();
    let spent = cpu.zip(cpu0.as_ref()).map(|(p, c0)| cpu_since(p, c0));
    stop.store(true, Ordering::Relaxed);
    if task.is_finished() {
        task.await??;
    } else {
        task.abort();
    }
    Ok(Flow {
        rate: moved / took,
        cpu: spent.filter(|_| moved > 0.0).map(|c| c / (moved / GIB)),
    })
}

/// Round-trip times of a 16-byte echo, in microseconds.
async fn round_trips(via: &Via, count: usize) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(count);
    match via.open(4096, true).await? {
        Conn::Ws(mut ws) => {
            let payload = masked(16);
            for _ in 0..count {
                let t = Instant::now();
                ws.send_masked(&payload).await?;
                let mut got = 0;
                while got < 16 {
                    let n = ws.read_payload().await?;
                    if n == 0 {
                        bail!("echo closed");
                    }
                    got += n;
                }
                out.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Conn::Raw(mut s) => {
            let mut buf = [0u8; 16];
            for _ in 0..count {
                let t = Instant::now();
                s.write_all(&[7u8; 16]).await?;
                s.read_exact(&mut buf).await?;
                out.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    Ok(out)
}

/// Session setups (connect, upgrade, token redemption, backend connect,
/// first byte from the VNC server) with `conc` clients for `secs`:
/// (per second, latencies in ms). Raw paths: connect and the 12-byte
/// greeting.
async fn session_setup(via: &Via, conc: usize, secs: f64) -> anyhow::Result<(f64, Vec<f64>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (stop, via) = (Arc::clone(&stop), via.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match via.open(4096, false).await? {
                    Conn::Ws(mut ws) => {
                        if ws.read_payload().await? == 0 {
                            bail!("session refused");
                        }
                    }
                    Conn::Raw(mut s) => {
                        let mut b = [0u8; 12];
                        s.read_exact(&mut b).await?;
                    }
                }
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok(lat)
        }));
    }
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all.len() as f64 / t0.elapsed().as_secs_f64(), all))
}

/// Mints per second over XML-RPC with keep-alive, `conc` connections.
async fn mint_rate(addr: SocketAddr, conc: usize, secs: f64) -> anyhow::Result<f64> {
    let body = "<?xml version=\"1.0\"?><methodCall><methodName>one.vm.novnctoken</methodName><params>\
                <param><value><string>bench:benchpw</string></value></param>\
                <param><value><int>4</int></value></param></params></methodCall>";
    let req = format!(
        "POST /RPC2 HTTP/1.1\r\nHost: bench\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (stop, done, req) = (Arc::clone(&stop), Arc::clone(&done), req.clone());
        tasks.push(tokio::spawn(async move {
            let s = TcpStream::connect(addr).await?;
            let mut s = BufReader::new(s);
            while !stop.load(Ordering::Relaxed) {
                s.get_mut().write_all(req.as_bytes()).await?;
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if s.read_line(&mut line).await? == 0 {
                        bail!("closed");
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse()?;
                    }
                }
                let mut body = vec![0u8; len];
                s.read_exact(&mut body).await?;
                if !String::from_utf8_lossy(&body).contains("<boolean>1</boolean>") {
                    bail!("mint failed: {}", String::from_utf8_lossy(&body));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    rate_of(&done, Duration::from_millis(300), secs, &stop, tasks).await
}

/// What an idle session does before it holds still.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Idle {
    /// Nothing past the upgrade (the target is silent).
    Silent,
    /// Reads the target's RFB version line (12 bytes, one binary frame).
    Greeted,
    /// The browser's RFB 3.8 handshake (security type None, shared), one
    /// full-screen FramebufferUpdateRequest and the update that answers it.
    Rfb,
}

/// Opens an upgraded session, does what `kind` says, and keeps it: nothing
/// is read after that.
async fn idle_session(addr: SocketAddr, token: &str, kind: Idle) -> anyhow::Result<Ws> {
    let ws = match kind {
        Idle::Silent => Ws::connect(addr, token, 1024).await?,
        Idle::Greeted => {
            let mut ws = Ws::connect(addr, token, 1024).await?;
            let mut version = [0u8; 12];
            ws.read_exact(&mut version).await?;
            if &version != b"RFB 003.008\n" {
                bail!("greeted with {:?}", String::from_utf8_lossy(&version));
            }
            ws
        }
        Idle::Rfb => rfb_first_screen(addr, token).await?,
    };
    Ok(ws)
}

/// Through the proxy, as a browser: the RFB 3.8 handshake (security type
/// None, shared ClientInit), then one FramebufferUpdateRequest for the whole
/// screen (incremental 0) and the FramebufferUpdate that answers it, read to
/// its end. No SetEncodings is sent, so the server answers in Raw at its
/// own pixel format.
async fn rfb_first_screen(addr: SocketAddr, token: &str) -> anyhow::Result<Ws> {
    let (mut ws, init) = rfb_handshake(addr, token, 64 * 1024).await?;
    let (w, h) = (
        u16::from_be_bytes([init[0], init[1]]),
        u16::from_be_bytes([init[2], init[3]]),
    );
    let bytes_pp = usize::from(init[4] / 8).max(1);

    let mut req = vec![3u8, 0, 0, 0, 0, 0];
    req.extend_from_slice(&w.to_be_bytes());
    req.extend_from_slice(&h.to_be_bytes());
    ws.send_plain(&req).await?;
    loop {
        let mut kind = [0u8; 1];
        ws.read_exact(&mut kind).await?;
        match kind[0] {
            0 => break,
            // Bell.
            2 => {}
            // SetColourMapEntries: padding, first colour, count, 6 bytes each.
            1 => {
                let mut head = [0u8; 5];
                ws.read_exact(&mut head).await?;
                let count = usize::from(u16::from_be_bytes([head[3], head[4]]));
                ws_skip(&mut ws, count * 6).await?;
            }
            // ServerCutText: 3 bytes of padding, length, text.
            3 => {
                let mut head = [0u8; 7];
                ws.read_exact(&mut head).await?;
                ws_skip(&mut ws, u32::from_be_bytes(head[3..7].try_into()?) as usize).await?;
            }
            other => bail!("server message type {other} before the first update"),
        }
    }
    let mut head = [0u8; 3];
    ws.read_exact(&mut head).await?;
    let rects = u16::from_be_bytes([head[1], head[2]]);
    for _ in 0..rects {
        let mut r = [0u8; 12];
        ws.read_exact(&mut r).await?;
        let rw = usize::from(u16::from_be_bytes([r[4], r[5]]));
        let rh = usize::from(u16::from_be_bytes([r[6], r[7]]));
        match i32::from_be_bytes(r[8..12].try_into()?) {
            // Raw.
            0 => ws_skip(&mut ws, rw * rh * bytes_pp).await?,
            // CopyRect: the source position.
            1 => ws_skip(&mut ws, 4).await?,
            // DesktopSize: nothing follows.
            -223 => {}
            // LastRect: the update ends here.
            -224 => break,
            other => bail!("a rectangle in encoding {other}, not asked for"),
        }
    }
    Ok(ws)
}

/// Reads and drops `n` payload bytes.
async fn ws_skip(ws: &mut Ws, mut n: usize) -> anyhow::Result<()> {
    while n > 0 {
        match ws.fr.next().await? {
            Ev::Data(a, b) => {
                let take = (b - a).min(n);
                if b - a > take {
                    ws.fr.unread(b - a - take);
                }
                n -= take;
            }
            Ev::Ping(_) => {}
            Ev::Close(code, reason) => bail!("the broker closed the session: {code} {reason}"),
            Ev::Eof => bail!("the broker closed the connection"),
        }
    }
    Ok(())
}

/// Opens `n` idle sessions of `kind` through `addr` into `held`, in chunks
/// of 500, 32 at a time, waiting after each chunk until they have all
/// reached the silent (or greeting) target: sessions arrive at a steady
/// pace, not as one burst of thousands of pending redemptions. An RFB
/// session is whole when its first screen has arrived, so those chunks
/// (of 100) are not waited for. `logs` are the brokers' logs, for saying
/// why if some never arrive. On failure `held` keeps the chunks opened.
async fn hold_idle(
    held: &mut Vec<Ws>,
    targets: &Targets,
    (addr, token, kind): (SocketAddr, &str, Idle),
    n: usize,
    logs: &[&Path],
) -> anyhow::Result<()> {
    let mut left = n;
    while left > 0 {
        let chunk = left.min(if kind == Idle::Rfb { 100 } else { 500 });
        match open_idle(addr, token, chunk, kind).await {
            Ok(opened) => held.extend(opened),
            Err(e) => {
                let why: Vec<String> = logs.iter().map(|l| log_summary(l)).collect();
                bail!(
                    "{e:#} (opening sessions {} to {}); the brokers logged: {}",
                    held.len() + 1,
                    held.len() + chunk,
                    why.join("; ")
                );
            }
        }
        left -= chunk;
        if kind == Idle::Rfb {
            continue;
        }
        if let Err(e) = targets
            .wait_silent(held.len() as u64, Duration::from_secs(60))
            .await
        {
            let why: Vec<String> = logs.iter().map(|l| log_summary(l)).collect();
            bail!("{e}; the brokers logged: {}", why.join("; "));
        }
    }
    Ok(())
}

/// What a broker's log says about refused or failed sessions.
fn log_summary(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused") || l.contains("WARN") || l.contains("ERROR"))
        .collect();
    let mut out = format!("{}: {} refusals or warnings", path.display(), bad.len());
    for l in bad.iter().take(3) {
        let _ = write!(out, " | {}", l.chars().take(300).collect::<String>());
    }
    out
}

/// Copies a process's smaps and status to $VNCBROKER_BENCH_DUMP, when set,
/// for working out where idle-session memory goes.
fn dump_memory(pid: u32, label: &str) {
    let Ok(dir) = std::env::var("VNCBROKER_BENCH_DUMP") else {
        return;
    };
    let _ = std::fs::create_dir_all(&dir);
    for f in ["smaps", "status"] {
        let _ = std::fs::copy(
            format!("/proc/{pid}/{f}"),
            Path::new(&dir).join(format!("{label}.{f}")),
        );
    }
}

/// Opens `n` idle sessions of `kind` through `addr`, 32 at a time; RFB
/// sessions 2 at a time, since QEMU listens with a backlog of 1: a
/// connection past a full accept queue is left half-open (the broker's end
/// established, QEMU's never accepted), waiting for a greeting that never
/// comes. Each session has a minute; on a failure the others are stopped.
async fn open_idle(addr: SocketAddr, token: &str, n: usize, kind: Idle) -> anyhow::Result<Vec<Ws>> {
    let at_once = if kind == Idle::Rfb { 2 } else { 32 };
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..at_once.min(n.max(1)) {
        let (next, token) = (Arc::clone(&next), token.to_owned());
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let one =
                    tokio::time::timeout(Duration::from_secs(60), idle_session(addr, &token, kind))
                        .await;
                match one {
                    Ok(s) => mine.push(s?),
                    Err(_) => bail!("a session was not set up within 60 s"),
                }
            }
            anyhow::Ok(mine)
        }));
    }
    let mut all = Vec::with_capacity(n);
    let mut failed = None;
    for w in &mut workers {
        match w.await {
            Ok(Ok(mine)) => all.extend(mine),
            Ok(Err(e)) => failed = Some(e),
            Err(e) => failed = Some(e.into()),
        }
        if failed.is_some() {
            break;
        }
    }
    match failed {
        Some(e) => {
            for w in &workers {
                w.abort();
            }
            Err(e)
        }
        None => Ok(all),
    }
}

// ---------------------------------------------------------------- process memory

/// A `kB` field of a /proc file, in KiB.
fn proc_kib(path: &str, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    proc_kib(&format!("/proc/{pid}/status"), "VmRSS:").context("reading VmRSS")
}

fn threads(pid: u32) -> u64 {
    proc_kib(&format!("/proc/{pid}/status"), "Threads:").unwrap_or(0)
}

/// Waits for a broker's memory to settle once its sessions are open: the
/// blocking-pool threads that the burst of redemptions started exit after
/// tokio's 10 s keep-alive (a full run waits that out; --quick does not).
/// Returns (RSS KiB, threads).
async fn settled(pid: u32, quick: bool) -> anyhow::Result<(u64, u64)> {
    tokio::time::sleep(Duration::from_millis(if quick { 500 } else { 11_000 })).await;
    Ok((rss_kib(pid)?, threads(pid)))
}

/// (processes, total PSS KiB, total RSS KiB) of process group `pgid`.
fn group_memory(pgid: u32) -> (usize, u64, u64) {
    let (mut n, mut pss, mut rss) = (0, 0, 0);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After "(comm)": state, ppid, pgrp, ...
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = after.split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse::<u32>().ok()) != Some(pgid) || fields[0] == "Z" {
            continue;
        }
        n += 1;
        pss += proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:").unwrap_or(0);
        rss += proc_kib(&format!("/proc/{pid}/status"), "VmRSS:").unwrap_or(0);
    }
    (n, pss, rss)
}

/// /proc/self/limits' open-files (soft, hard).
fn fd_limits() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    let mut it = line["Max open files".len()..].split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Raises this process's soft open-files limit to the hard one (with
/// prlimit(1), so no unsafe code), before any child is started: the
/// brokers, the targets and this client each hold one or two descriptors
/// per idle session.
fn raise_fd_limit() -> Option<(u64, u64)> {
    let (soft, hard) = fd_limits()?;
    if soft < hard {
        let _ = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={hard}:{hard}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    fd_limits()
}

// ---------------------------------------------------------------- the report

/// One line of the results table.
struct Row {
    measure: String,
    direct: String,
    relay: String,
    websockify: String,
    broker: String,
    vs_direct: String,
    vs_relay: String,
    vs_websockify: String,
}

impl Row {
    fn new(measure: impl Into<String>, broker: impl Into<String>) -> Row {
        Row {
            measure: measure.into(),
            direct: "-".into(),
            relay: "-".into(),
            websockify: "-".into(),
            broker: broker.into(),
            vs_direct: "-".into(),
            vs_relay: "-".into(),
            vs_websockify: "-".into(),
        }
    }
}

/// One line of the CPU table: seconds of CPU per GiB moved, by proxy.
struct CpuRow {
    measure: String,
    tls: bool,
    relay: Option<f64>,
    websockify: Option<f64>,
    broker: Option<f64>,
}

/// One target from the issue, beside the figure measured.
struct Goal {
    what: String,
    target: String,
    figure: String,
    met: Option<bool>,
}

fn goal(what: &str, target: &str, figure: String, met: Option<bool>) -> Goal {
    Goal {
        what: what.into(),
        target: target.into(),
        figure,
        met,
    }
}

/// One idle-session memory figure.
struct Mem {
    what: String,
    procs: String,
    at_zero: String,
    at_n: String,
    per_session: String,
    threads: String,
}

fn mib(bytes_per_sec: f64) -> String {
    let m = bytes_per_sec / (1024.0 * 1024.0);
    if m >= 100.0 {
        format!("{m:.0} MiB/s")
    } else if m >= 10.0 {
        format!("{m:.1} MiB/s")
    } else {
        format!("{m:.2} MiB/s")
    }
}

fn mem(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}×", a / b)
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Setup figures: rate and latency percentiles.
struct Setup {
    rate: f64,
    p50: f64,
    p99: f64,
}

impl Setup {
    fn show(&self) -> String {
        format!(
            "{:.0}/s, p50 {:.2} / p99 {:.2} ms",
            self.rate, self.p50, self.p99
        )
    }
}

/// `reps` interleaved session-setup runs on each path, medians of rate;
/// latency percentiles over all the runs of a path.
async fn setups(
    vias: &[&Via],
    reps: usize,
    secs: f64,
    wsfy: Option<&Websockify>,
) -> anyhow::Result<Vec<Setup>> {
    let mut rates = vec![Vec::new(); vias.len()];
    let mut lats = vec![Vec::new(); vias.len()];
    for _ in 0..reps {
        for (i, via) in vias.iter().enumerate() {
            let (r, l) = session_setup(via, 4, secs).await?;
            rates[i].push(r);
            lats[i].extend(l);
            settle(wsfy).await;
        }
    }
    Ok(rates
        .iter_mut()
        .zip(lats.iter_mut())
        .map(|(r, l)| Setup {
            rate: median(r),
            p50: percentile(l, 0.5),
            p99: percentile(l, 0.99),
        })
        .collect())
}

fn first_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()?
            .trim()
            .to_owned(),
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

fn yes_no(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "**met**",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

// ---------------------------------------------------------------- the run

/// Everything the report is made of.
#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    /// The TLS table (its direct columns unused).
    tls: Vec<Row>,
    cpu: Vec<CpuRow>,
    tls_notes: Vec<String>,
    relay_version: Option<String>,
    goals: Vec<Goal>,
    memory: Vec<Mem>,
    /// The session-control table and what it says about itself.
    session: Vec<ScRow>,
    session_notes: Vec<String>,
    notes: Vec<String>,
    websockify_version: Option<String>,
    postgres_version: Option<String>,
}

/// The paths compared, in the order each repetition measures them.
const DIRECT: usize = 0;
const RELAY: usize = 1;
const WSFY: usize = 2;
const BROKER: usize = 3;
const PATH_NAMES: [&str; 4] = ["direct TCP", "the relay (socat)", "websockify", "vncbroker"];

/// One measurement's paths: how each reaches the target (None: not run)
/// and whose CPU time to sample; the peers, to let their connection
/// processes end between measurements.
struct Paths<'a> {
    vias: [Option<Via>; 4],
    procs: [Option<Proc>; 4],
    relay: Option<&'a Relay>,
    wsfy: Option<&'a Websockify>,
}

impl<'a> Paths<'a> {
    /// The plain-TCP paths to target `name` (`vm` on the broker).
    fn plain(
        targets: &Targets,
        name: &str,
        vm: i64,
        broker: &Broker,
        relay: Option<&'a Relay>,
        wsfy: Option<&'a Websockify>,
    ) -> anyhow::Result<Paths<'a>> {
        let direct = match name {
            "source" => targets.source,
            "sink" => targets.sink,
            "echo" => targets.echo,
            _ => targets.greet,
        };
        Ok(Paths {
            vias: [
                Some(Via::Direct(direct)),
                relay.and_then(|r| r.via(name).ok()),
                wsfy.map(|w| w.via(name)),
                Some(broker.via(vm)?),
            ],
            procs: [
                None,
                relay.map(|r| Proc::Group(r.pgid())),
                wsfy.map(|w| Proc::Group(w.pgid())),
                Some(Proc::Pid(broker.pid()?)),
            ],
            relay,
            wsfy,
        })
    }
}

/// Runs `f` on each path in turn, `reps` times: each path's results. A
/// peer (relay, websockify) that fails is left out from then on, with a
/// note; a failure on direct TCP or vncbroker is the measurement's.
async fn interleave<T, F, Fut>(
    rep: &mut Report,
    what: &str,
    reps: usize,
    paths: &Paths<'_>,
    mut f: F,
) -> anyhow::Result<[Option<Vec<T>>; 4]>
where
    F: FnMut(Via, Option<Proc>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut out: [Option<Vec<T>>; 4] = Default::default();
    for (o, v) in out.iter_mut().zip(&paths.vias) {
        if v.is_some() {
            *o = Some(Vec::new());
        }
    }
    for _ in 0..reps {
        for i in 0..4 {
            let Some(via) = &paths.vias[i] else { continue };
            if out[i].is_none() {
                continue;
            }
            let r = f(via.clone(), paths.procs[i]).await;
            let peer = i == RELAY || i == WSFY;
            if peer {
                settle_peers(paths.relay, paths.wsfy).await;
            }
            match r {
                Ok(v) => {
                    if let Some(o) = &mut out[i] {
                        o.push(v);
                    }
                }
                Err(e) if peer => {
                    rep.notes
                        .push(format!("{what}: {} failed: {e:#}", PATH_NAMES[i]));
                    out[i] = None;
                }
                Err(e) => return Err(e.context(format!("{what}, {}", PATH_NAMES[i]))),
            }
        }
    }
    Ok(out)
}

/// The medians of a path's throughput figures (rate and CPU separately).
fn flow_median(v: &Option<Vec<Flow>>) -> Option<Flow> {
    let v = v.as_ref().filter(|v| !v.is_empty())?;
    let mut r: Vec<f64> = v.iter().map(|f| f.rate).collect();
    let mut c: Vec<f64> = v.iter().filter_map(|f| f.cpu).collect();
    Some(Flow {
        rate: median(&mut r),
        cpu: (!c.is_empty()).then(|| median(&mut c)),
    })
}

fn or_not_run<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or("not run".into(), f)
}

/// A throughput row of the Results (or TLS) table, and the CPU row beside
/// it; (relay, websockify, vncbroker) figures returned for the goals.
fn flow_rows(
    rep: &mut Report,
    measure: &str,
    res: &[Option<Vec<Flow>>; 4],
    tls: bool,
) -> [Option<Flow>; 4] {
    let f: [Option<Flow>; 4] = std::array::from_fn(|i| flow_median(&res[i]));
    let b = f[BROKER].map_or(f64::NAN, |b| b.rate);
    let row = Row {
        measure: measure.to_owned(),
        direct: if tls {
            "-".into()
        } else {
            or_not_run(f[DIRECT], |d| mib(d.rate))
        },
        relay: or_not_run(f[RELAY], |r| mib(r.rate)),
        websockify: or_not_run(f[WSFY], |w| mib(w.rate)),
        broker: or_not_run(f[BROKER], |b| mib(b.rate)),
        vs_direct: if tls {
            "-".into()
        } else {
            or_not_run(f[DIRECT], |d| ratio(b, d.rate))
        },
        vs_relay: or_not_run(f[RELAY], |r| ratio(b, r.rate)),
        vs_websockify: or_not_run(f[WSFY], |w| ratio(b, w.rate)),
    };
    if tls {
        rep.tls.push(row);
    } else {
        rep.rows.push(row);
    }
    let cpu = |i: usize| f[i].and_then(|x| x.cpu);
    rep.cpu.push(CpuRow {
        measure: format!("{}{measure}", if tls { "TLS: " } else { "" }),
        tls,
        relay: cpu(RELAY),
        websockify: cpu(WSFY),
        broker: cpu(BROKER),
    });
    f
}

/// The CPU goals, one per row of the CPU table: vncbroker's CPU per GiB at
/// most 1.1× the relay's (the TLS relay's over TLS).
fn cpu_goals(rep: &mut Report) {
    let mut goals = Vec::new();
    for r in &rep.cpu {
        let relay = if r.tls {
            "the TLS relay"
        } else {
            "the plain relay"
        };
        let (fig, met) = match (r.broker, r.relay) {
            (Some(b), Some(x)) => (
                format!("{} vs {} ({})", cpu_gib(b), cpu_gib(x), ratio(b, x)),
                Some(b <= 1.1 * x),
            ),
            (Some(b), None) => (format!("{}; the relay not measured", cpu_gib(b)), None),
            _ => ("not measured".into(), None),
        };
        goals.push(goal(
            &format!("CPU per GiB relayed, {}", r.measure),
            &format!("≤ 1.1× {relay}'s"),
            fig,
            met,
        ));
    }
    rep.goals.extend(goals);
}

fn cpu_gib(secs: f64) -> String {
    format!("{secs:.2} s/GiB")
}

/// A goal of vncbroker's rate at least `times` × a peer's.
fn ratio_goal(rep: &mut Report, what: &str, target: &str, b: f64, peer: Option<f64>, times: f64) {
    rep.goals.push(goal(
        what,
        target,
        peer.map_or("not run".into(), |p| ratio(b, p)),
        peer.map(|p| b >= times * p),
    ));
}

/// Measurements on the main SQLite broker, beside direct TCP, the plain
/// relay and websockify.
async fn proxy_section(
    rep: &mut Report,
    sc: &Scale,
    targets: &Targets,
    broker: &Broker,
    relay: Option<&Relay>,
    wsfy: Option<&Websockify>,
) -> anyhow::Result<()> {
    let (reps, secs) = (sc.reps, sc.secs);

    for conns in [1usize, 16] {
        let paths = Paths::plain(targets, "source", VM_SOURCE, broker, relay, wsfy)?;
        let name = if conns == 1 {
            "download, 1 connection, 64 KiB writes".to_owned()
        } else {
            format!("download, {conns} connections, 64 KiB writes")
        };
        let res = interleave(rep, &name, reps, &paths, |via, p| async move {
            download(&via, conns, secs, p).await
        })
        .await?;
        let f = flow_rows(rep, &name, &res, false);
        let (b, d) = (
            f[BROKER].map_or(f64::NAN, |x| x.rate),
            f[DIRECT].map_or(f64::NAN, |x| x.rate),
        );
        rep.goals.push(goal(
            &name,
            "≥ 0.9× direct",
            ratio(b, d),
            Some(b >= 0.9 * d),
        ));
    }

    for msg in [1024usize, 64 * 1024] {
        let paths = Paths::plain(targets, "sink", VM_SINK, broker, relay, wsfy)?;
        let name = format!("upload, {} KiB masked messages", msg / 1024);
        let res = interleave(rep, &name, reps, &paths, |via, p| async move {
            upload(&via, targets, msg, secs, p).await
        })
        .await?;
        let f = flow_rows(rep, &name, &res, false);
        let rate = |i: usize| f[i].map(|x| x.rate);
        let b = rate(BROKER).unwrap_or(f64::NAN);
        if msg == 1024 {
            ratio_goal(rep, &name, "≥ 3× websockify", b, rate(WSFY), 3.0);
            ratio_goal(
                rep,
                &name,
                "≥ 0.8× the plain relay (1 KiB writes)",
                b,
                rate(RELAY),
                0.8,
            );
        } else {
            ratio_goal(rep, &name, "≥ 0.8× direct", b, rate(DIRECT), 0.8);
            ratio_goal(
                rep,
                &name,
                "≥ 0.9× the plain relay (64 KiB writes)",
                b,
                rate(RELAY),
                0.9,
            );
        }
    }

    // Round trips: the samples of each path, taken in interleaved slices;
    // then again with every process on one CPU, which takes the cost of
    // waking a process on the other CPU out of the figures.
    round_trip_rows(rep, sc, targets, broker, relay, wsfy, false).await?;
    let mut pids = vec![std::process::id(), broker.pid()?];
    pids.extend(targets.child.id());
    pids.extend(wsfy.map(Websockify::pgid));
    pids.extend(relay.map(Relay::pids).unwrap_or_default());
    let all = cpus_allowed();
    let one = all.split([',', '-']).next().unwrap_or("0").to_owned();
    if pin(&pids, &one) {
        let r = round_trip_rows(rep, sc, targets, broker, relay, wsfy, true).await;
        pin(&pids, &all);
        r?;
    } else {
        rep.rows.push(Row::new(
            "round trip, 16-byte echo, all processes on one CPU (p50 / p99)",
            "not run (taskset failed)",
        ));
    }

    // Session setup on the (nearly) empty token table, with one client and
    // with four.
    for conc in [1usize, 4] {
        let paths = Paths::plain(targets, "greet", VM_GREET, broker, relay, wsfy)?;
        let clients = if conc == 1 {
            "1 client".to_owned()
        } else {
            format!("{conc} clients")
        };
        let name = format!("session setup, SQLite, {clients}");
        let res = interleave(rep, &name, reps, &paths, |via, _| async move {
            session_setup(&via, conc, secs).await
        })
        .await?;
        let (b, d) = setup_row(rep, &name, &res)?;
        let over = b.p50 - d.p50;
        let (want, goal_rate) = if conc == 1 {
            ("≥ 2,000/s", 2000.0)
        } else {
            ("≥ 5,000/s", 5000.0)
        };
        rep.goals.push(goal(
            &format!("session setup, SQLite, {clients}, rate"),
            want,
            format!("{:.0}/s", b.rate),
            Some(b.rate >= goal_rate),
        ));
        rep.goals.push(goal(
            &format!("session setup, SQLite, {clients}, p50 over direct TCP"),
            "≤ 0.5 ms",
            format!("{over:+.2} ms (p50 {:.2} vs {:.2} ms)", b.p50, d.p50),
            Some(over <= 0.5),
        ));
        if conc == 4 {
            rep.goals.push(goal(
                "session setup, SQLite, 4 clients, rate (the first goal)",
                "≥ 1000/s",
                format!("{:.0}/s", b.rate),
                Some(b.rate >= 1000.0),
            ));
            rep.goals.push(goal(
                "session setup, SQLite, 4 clients, p99 latency",
                "≤ 10 ms",
                format!("{:.2} ms", b.p99),
                Some(b.p99 <= 10.0),
            ));
        }
    }
    Ok(())
}

/// One setup run: its rate, and each setup's time in milliseconds.
type SetupRun = (f64, Vec<f64>);

/// Each path's session-setup figures (the median rate, percentiles over
/// every run's latencies) as a row of the table; vncbroker's and direct
/// TCP's figures.
fn setup_row(
    rep: &mut Report,
    name: &str,
    res: &[Option<Vec<SetupRun>>; 4],
) -> anyhow::Result<(Setup, Setup)> {
    let mut s: [Option<Setup>; 4] = std::array::from_fn(|i| {
        res[i].as_ref().filter(|v| !v.is_empty()).map(|runs| {
            let mut rates: Vec<f64> = runs.iter().map(|r| r.0).collect();
            let mut lats: Vec<f64> = runs.iter().flat_map(|r| r.1.iter().copied()).collect();
            Setup {
                rate: median(&mut rates),
                p50: percentile(&mut lats, 0.5),
                p99: percentile(&mut lats, 0.99),
            }
        })
    });
    let (Some(b), Some(d)) = (s[BROKER].take(), s[DIRECT].take()) else {
        bail!("{name}: no figures");
    };
    rep.rows.push(Row {
        measure: name.to_owned(),
        direct: d.show(),
        relay: or_not_run(s[RELAY].as_ref(), Setup::show),
        websockify: or_not_run(s[WSFY].as_ref(), Setup::show),
        broker: b.show(),
        vs_direct: format!(
            "{} rate; p50 {:+.2} ms",
            ratio(b.rate, d.rate),
            b.p50 - d.p50
        ),
        vs_relay: or_not_run(s[RELAY].as_ref(), |r| {
            format!(
                "{} rate; p50 {:+.2} ms",
                ratio(b.rate, r.rate),
                b.p50 - r.p50
            )
        }),
        vs_websockify: or_not_run(s[WSFY].as_ref(), |w| {
            format!("{} rate", ratio(b.rate, w.rate))
        }),
    });
    Ok((b, d))
}

/// Round-trip rows and the target: each path's samples taken in
/// interleaved slices.
async fn round_trip_rows(
    rep: &mut Report,
    sc: &Scale,
    targets: &Targets,
    broker: &Broker,
    relay: Option<&Relay>,
    wsfy: Option<&Websockify>,
    pinned: bool,
) -> anyhow::Result<()> {
    let paths = Paths::plain(targets, "echo", VM_ECHO, broker, relay, wsfy)?;
    let slice = (sc.rtt_count / sc.reps).max(1);
    let how = if pinned {
        ", all processes on one CPU"
    } else {
        ""
    };
    let name = format!("round trip, 16-byte echo{how}");
    let res = interleave(rep, &name, sc.reps, &paths, |via, _| async move {
        round_trips(&via, slice).await
    })
    .await?;
    let p: [Option<(f64, f64)>; 4] = std::array::from_fn(|i| {
        res[i].as_ref().filter(|v| !v.is_empty()).map(|v| {
            let mut all: Vec<f64> = v.concat();
            (percentile(&mut all, 0.5), percentile(&mut all, 0.99))
        })
    });
    let (Some((b50, b99)), Some((d50, d99))) = (p[BROKER], p[DIRECT]) else {
        bail!("{name}: no figures");
    };
    let show = |(p50, p99): (f64, f64)| format!("{p50:.1} / {p99:.1} µs");
    let added = |(o50, _): (f64, f64)| format!("{:+.1} µs at p50", b50 - o50);
    rep.rows.push(Row {
        measure: format!("{name} (p50 / p99)"),
        direct: show((d50, d99)),
        relay: or_not_run(p[RELAY], show),
        websockify: or_not_run(p[WSFY], show),
        broker: show((b50, b99)),
        vs_direct: added((d50, d99)),
        vs_relay: or_not_run(p[RELAY], added),
        vs_websockify: or_not_run(p[WSFY], added),
    });
    rep.goals.push(goal(
        &name,
        "≤ 25 µs added at p50 over direct",
        format!("{:+.1} µs", b50 - d50),
        Some(b50 - d50 <= 25.0),
    ));
    Ok(())
}

/// This process's allowed CPUs, as a list taskset understands ("0-1").
fn cpus_allowed() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| "0".into())
}

/// Sets the CPU affinity of every thread of each process (and so of the
/// processes and threads they start afterwards) with taskset(1).
fn pin(pids: &[u32], cpus: &str) -> bool {
    pids.iter().all(|pid| {
        std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Session setup on a token table of `sc.fill` other tokens, against the
/// (nearly) empty table's figures; `separate_baseline` when those are a
/// measurement of their own, not already a row.
fn full_table_row(
    rep: &mut Report,
    db: &str,
    sc: &Scale,
    empty: &Setup,
    full: &Setup,
    fill: Duration,
    separate_baseline: bool,
) {
    let slower = empty.rate / full.rate;
    if separate_baseline {
        rep.rows.push(Row::new(
            format!("session setup, {db}, empty token table, 4 clients"),
            format!("{}, the broker alone just before the fill", empty.show()),
        ));
    }
    rep.rows.push(Row::new(
        format!(
            "session setup, {db}, {} tokens in the table, 4 clients",
            thousands(sc.fill)
        ),
        format!(
            "{}; {slower:.2}× the empty table's time per setup",
            full.show()
        ),
    ));
    rep.goals.push(goal(
        &format!(
            "session setup, {db}, {} tokens vs empty table",
            thousands(sc.fill)
        ),
        "≤ 1.5× slower",
        format!("{slower:.2}× (p50 {:.2} vs {:.2} ms)", full.p50, empty.p50),
        Some(slower <= 1.5),
    ));
    rep.notes.push(format!(
        "{db}: {} tokens written straight into the table in {:.1} s before the full-table measurement.",
        thousands(sc.fill),
        fill.as_secs_f64()
    ));
}

/// PostgreSQL session setup with 4 clients in the BENCHMARKS.md before the
/// relay, TLS and CPU measurements were added: the figure not to regress.
const PG_SETUP_BEFORE: f64 = 1539.0;

/// Session setup and minting on PostgreSQL.
async fn postgres_section(
    rep: &mut Report,
    sc: &Scale,
    bin: &Path,
    work: &Path,
    targets: &Targets,
) -> anyhow::Result<()> {
    let pg = Pg::start().await?;
    rep.postgres_version = Some(pg.version.clone());
    let result = async {
        let broker = Broker::create(bin, &pg.url, work, "postgres", targets).await?;
        let via = broker.via(VM_GREET)?;
        session_setup(&via, 4, 0.5).await?;
        let empty = setups(&[&via], sc.reps, sc.secs, None).await?.remove(0);
        rep.rows.push(Row::new(
            "session setup, PostgreSQL, 4 clients",
            empty.show(),
        ));
        rep.goals.push(goal(
            "session setup, PostgreSQL, 4 clients, no regression",
            &format!("≥ {PG_SETUP_BEFORE:.0}/s (the previous BENCHMARKS.md)"),
            format!("{:.0}/s", empty.rate),
            Some(empty.rate >= PG_SETUP_BEFORE),
        ));
        mint_section(rep, sc, broker.addr, "PostgreSQL", 2000.0).await?;
        let took = fill_postgres(&pg.url, sc.fill).await?;
        session_setup(&via, 4, 0.5).await?;
        let full = setups(&[&via], sc.reps, sc.secs, None).await?.remove(0);
        full_table_row(rep, "PostgreSQL", sc, &empty, &full, took, false);
        broker.stop().await;
        anyhow::Ok(())
    }
    .await;
    pg.clean_up().await;
    result
}

// ---------------------------------------------------------------- session control

/// The session policies measured against the plain relay, each on VMs of
/// its own on one broker.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// No password stored, no policy: relayed without looking at it.
    Plain,
    /// A VNC password stored: the proxy runs the security handshake and
    /// follows (and counts) the browser's messages.
    Password,
    /// A view-only token on a VM with a stored password: input is dropped.
    ViewOnly,
    /// `--clipboard none`: the server's stream is parsed too.
    ClipboardNone,
    /// `--record yes`: what the browser receives is recorded.
    Recorded,
}

impl Policy {
    const ALL: [Policy; 5] = [
        Policy::Plain,
        Policy::Password,
        Policy::ViewOnly,
        Policy::ClipboardNone,
        Policy::Recorded,
    ];

    fn label(self) -> &'static str {
        match self {
            Policy::Plain => "plain relay",
            Policy::Password => "password stored",
            Policy::ViewOnly => "view-only token",
            Policy::ClipboardNone => "clipboard none",
            Policy::Recorded => "recorded",
        }
    }

    /// Its VM for `mode` (0 source, 1 sink, 2 echo).
    fn vm(self, mode: usize) -> i64 {
        100 + 10 * self as i64 + mode as i64
    }

    fn password(self) -> bool {
        matches!(self, Policy::Password | Policy::ViewOnly)
    }
}

/// One line of the session-control table: a figure per policy, in
/// [`Policy::ALL`]'s order.
struct ScRow {
    measure: String,
    cells: Vec<String>,
}

/// A session-control broker: its VMs, and a token for each.
struct ScBroker {
    broker: Broker,
    /// Tokens by policy and mode.
    tokens: Vec<[String; 3]>,
}

impl ScBroker {
    async fn start(bin: &Path, work: &Path, targets: &Targets) -> anyhow::Result<ScBroker> {
        let rec_dir = work.join("recordings");
        // A JSON string is a TOML basic string for any path.
        let extra = format!(
            "[recording]\ndir = {}\n",
            serde_json::to_string(&rec_dir.to_string_lossy())?
        );
        let db = sqlite_url(&work.join("session-control.db"));
        let broker = Broker::spawn_configured(
            bin,
            &db,
            work,
            "session-control",
            &broker_log_level(),
            &extra,
        )
        .await?;
        broker.cli(
            &["user", "add", "bench", "--admin", "--password-stdin"],
            Some("benchpw"),
        )?;
        let mut tokens = Vec::new();
        for p in Policy::ALL {
            let mut mine: [String; 3] = Default::default();
            for (mode, target) in [targets.rfb_source, targets.rfb_sink, targets.rfb_echo]
                .into_iter()
                .enumerate()
            {
                let (id, port) = (p.vm(mode).to_string(), target.port().to_string());
                let mut args = testkit::broker::vm_add_args(&id, &port, "bench");
                if p.password() {
                    args.push("--password-stdin");
                }
                match p {
                    Policy::ClipboardNone => args.extend(["--clipboard", "none"]),
                    Policy::Recorded => args.extend(["--record", "yes"]),
                    _ => {}
                }
                broker.cli(&args, p.password().then_some("benchvnc"))?;
                let mut mint = vec!["token", "mint", &id, "--ttl", "86400"];
                if p == Policy::ViewOnly {
                    mint.push("--view-only");
                }
                let v: serde_json::Value = serde_json::from_str(&broker.cli(&mint, None)?)?;
                mine[mode] = v["token"].as_str().context("token")?.to_owned();
            }
            tokens.push(mine);
        }
        Ok(ScBroker { broker, tokens })
    }

    fn token(&self, p: Policy, mode: usize) -> &str {
        &self.tokens[p as usize][mode]
    }

    /// The session rows of `vm`, once every one has ended and its
    /// recording is no longer being written (or after 15 s).
    async fn ended_sessions(&self, vm: i64) -> anyhow::Result<Vec<serde_json::Value>> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = self.broker.cli(
                &[
                    "sessions",
                    "--vm",
                    &vm.to_string(),
                    "--json",
                    "--limit",
                    "10000",
                ],
                None,
            )?;
            let rows: Vec<serde_json::Value> = serde_json::from_str(&out)?;
            let live = rows.iter().any(|r| {
                r["ended_at"].is_null() || r["recording_state"].as_str() == Some("recording")
            });
            if !live || Instant::now() > deadline {
                return Ok(rows);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Connects through the broker and goes through the RFB handshake as a
/// browser does (RFB 3.8, security type None, shared), up to the end of
/// ServerInit.
async fn rfb_connect(addr: SocketAddr, token: &str, cap: usize) -> anyhow::Result<Ws> {
    Ok(rfb_handshake(addr, token, cap).await?.0)
}

/// The handshake of [`rfb_connect`]; with the ServerInit header (size,
/// pixel format, name length).
async fn rfb_handshake(
    addr: SocketAddr,
    token: &str,
    cap: usize,
) -> anyhow::Result<(Ws, [u8; 24])> {
    let mut ws = Ws::connect(addr, token, cap).await?;
    let mut version = [0u8; 12];
    ws.read_exact(&mut version).await?;
    if !version.starts_with(b"RFB 003.") {
        bail!(
            "not an RFB version: {:?}",
            String::from_utf8_lossy(&version)
        );
    }
    ws.send_plain(b"RFB 003.008\n").await?;
    let mut n = [0u8; 1];
    ws.read_exact(&mut n).await?;
    if n[0] == 0 {
        // The server refused, with a reason.
        let mut len = [0u8; 4];
        ws.read_exact(&mut len).await?;
        let mut why = vec![0u8; (u32::from_be_bytes(len) as usize).min(4096)];
        ws.read_exact(&mut why).await?;
        bail!("the VNC server refused: {}", String::from_utf8_lossy(&why));
    }
    let mut types = vec![0u8; usize::from(n[0])];
    ws.read_exact(&mut types).await?;
    if !types.contains(&1) {
        bail!("security types {types:?} offered, None expected");
    }
    ws.send_plain(&[1]).await?;
    let mut result = [0u8; 4];
    ws.read_exact(&mut result).await?;
    if result != [0; 4] {
        bail!("SecurityResult {result:?}");
    }
    ws.send_plain(&[1]).await?;
    let mut init = [0u8; 24];
    ws.read_exact(&mut init).await?;
    let name_len = u32::from_be_bytes(init[20..24].try_into()?) as usize;
    if name_len > 4096 {
        bail!("a desktop name of {name_len} bytes");
    }
    let mut name = vec![0u8; name_len];
    ws.read_exact(&mut name).await?;
    Ok((ws, init))
}

/// Bytes per second of FramebufferUpdates read from an RFB session.
async fn rfb_download(addr: SocketAddr, token: &str, secs: f64) -> anyhow::Result<f64> {
    let total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (t, s, token) = (Arc::clone(&total), Arc::clone(&stop), token.to_owned());
    let task = tokio::spawn(async move {
        let mut ws = rfb_connect(addr, &token, 256 * 1024).await?;
        while !s.load(Ordering::Relaxed) {
            let n = ws.read_payload().await?;
            if n == 0 {
                bail!("the session ended while downloading");
            }
            t.fetch_add(n as u64, Ordering::Relaxed);
        }
        anyhow::Ok(())
    });
    rate_of(&total, Duration::from_millis(200), secs, &stop, vec![task]).await
}

/// `len` bytes of whole PointerEvents moving across the screen.
fn pointer_events(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for i in 0..len / 6 {
        let (x, y) = ((i * 7 % 1024) as u16, (i * 5 % 768) as u16);
        out.push(5);
        out.push(0);
        out.extend_from_slice(&x.to_be_bytes());
        out.extend_from_slice(&y.to_be_bytes());
    }
    out
}

/// Messages of `msg` bytes of PointerEvents sent for `secs`: (bytes per
/// second arriving at the RFB sink, bytes per second the client got off).
async fn rfb_upload(
    addr: SocketAddr,
    token: &str,
    targets: &Targets,
    msg: usize,
    secs: f64,
) -> anyhow::Result<(f64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (st, se, token) = (Arc::clone(&stop), Arc::clone(&sent), token.to_owned());
    let task = tokio::spawn(async move {
        let mut ws = rfb_connect(addr, &token, 4096).await?;
        let payload = mask(&pointer_events(msg));
        while !st.load(Ordering::Relaxed) {
            ws.send_masked(&payload).await?;
            se.fetch_add(payload.len() as u64, Ordering::Relaxed);
        }
        anyhow::Ok(())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let (b0, s0) = (targets.rfb_sunk().await?, sent.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (b1, s1) = (targets.rfb_sunk().await?, sent.load(Ordering::Relaxed));
    let took = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if task.is_finished() {
        task.await??;
    } else {
        task.abort();
    }
    Ok(((b1 - b0) as f64 / took, (s1 - s0) as f64 / took))
}

/// Round trips of a FramebufferUpdateRequest (10 bytes) and its
/// FramebufferUpdate (20 bytes), in microseconds.
async fn rfb_round_trips(addr: SocketAddr, token: &str, count: usize) -> anyhow::Result<Vec<f64>> {
    let mut ws = rfb_connect(addr, token, 4096).await?;
    // Incremental, at (0, 0), 1 × 1.
    let request = mask(&[3, 1, 0, 0, 0, 0, 0, 1, 0, 1]);
    let mut answer = [0u8; 20];
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        ws.send_masked(&request).await?;
        ws.read_exact(&mut answer).await?;
        out.push(t.elapsed().as_secs_f64() * 1e6);
        if answer[0] != 0 {
            bail!(
                "message type {} where a FramebufferUpdate was due",
                answer[0]
            );
        }
    }
    Ok(out)
}

/// How the recordings of `vm`'s sessions ended, as "2 of 3 complete, 1
/// incomplete", and whether any stopped early.
fn recording_summary(rows: &[serde_json::Value]) -> (String, bool) {
    let state = |want: &str| {
        rows.iter()
            .filter(|r| r["recording_state"].as_str() == Some(want))
            .count()
    };
    let (complete, incomplete) = (state("complete"), state("incomplete"));
    let mut s = format!("{complete} of {} complete", rows.len());
    if incomplete > 0 {
        let _ = write!(s, ", {incomplete} incomplete (the writer fell behind)");
    }
    let other = rows.len() - complete - incomplete;
    if other > 0 {
        let _ = write!(s, ", {other} without a final state");
    }
    (s, complete < rows.len())
}

/// Each repetition's order of the policies: rotated by one every time, so
/// none is always measured first.
fn rotation(rep: usize) -> impl Iterator<Item = Policy> {
    let n = Policy::ALL.len();
    (0..n).map(move |i| Policy::ALL[(rep + i) % n])
}

/// A recorded session's figure, saying so when its recording stopped early
/// (the rest of the session was relayed unrecorded).
fn behind(fig: String, fell_behind: bool) -> String {
    if fell_behind {
        format!("{fig}; the recording fell behind and stopped")
    } else {
        fig
    }
}

/// The session policies' cost against the plain relay: download, upload
/// and round trips through one broker, each policy on VMs of its own, the
/// repetitions interleaved across policies.
async fn session_control_section(
    rep: &mut Report,
    sc: &Scale,
    bin: &Path,
    work: &Path,
    targets: &Targets,
) -> anyhow::Result<()> {
    let scb = ScBroker::start(bin, work, targets).await?;
    let addr = scb.broker.addr;
    let (reps, secs) = (sc.reps, sc.secs);
    let n = Policy::ALL.len();
    let others = [Policy::ViewOnly, Policy::ClipboardNone, Policy::Recorded];
    let times = |r: f64| format!("{r:.2}×");
    // Recording outcomes per measure, for the notes.
    let mut recorded = Vec::new();

    // Download.
    let mut down = vec![Vec::new(); n];
    for r in 0..reps {
        for p in rotation(r) {
            down[p as usize].push(rfb_download(addr, scb.token(p, 0), secs).await?);
        }
    }
    let down: Vec<f64> = down.iter_mut().map(|v| median(v)).collect();
    let plain = down[0];
    let (summary, down_behind) =
        recording_summary(&scb.ended_sessions(Policy::Recorded.vm(0)).await?);
    recorded.push(("download", summary));
    rep.session.push(ScRow {
        measure: "download, 1 connection, 128 × 128 Raw updates".into(),
        cells: Policy::ALL
            .iter()
            .map(|&p| match p {
                Policy::Plain => mib(plain),
                _ => behind(
                    format!(
                        "{} ({})",
                        mib(down[p as usize]),
                        times(down[p as usize] / plain)
                    ),
                    p == Policy::Recorded && down_behind,
                ),
            })
            .collect(),
    });

    // Upload.
    let mut up_ratio = vec![Vec::new(); n];
    for msg in [1020usize, 65532] {
        let (mut arrived, mut sent) = (vec![Vec::new(); n], vec![Vec::new(); n]);
        for r in 0..reps {
            for p in rotation(r) {
                let (a, s) = rfb_upload(addr, scb.token(p, 1), targets, msg, secs).await?;
                arrived[p as usize].push(a);
                sent[p as usize].push(s);
            }
        }
        let arrived: Vec<f64> = arrived.iter_mut().map(|v| median(v)).collect();
        let sent: Vec<f64> = sent.iter_mut().map(|v| median(v)).collect();
        let plain = arrived[0];
        let kib = if msg < 4096 { "1 KiB" } else { "64 KiB" };
        rep.session.push(ScRow {
            measure: format!("upload, {kib} messages of PointerEvents ({msg} bytes)"),
            cells: Policy::ALL
                .iter()
                .map(|&p| {
                    let i = p as usize;
                    match p {
                        Policy::Plain => mib(plain),
                        Policy::ViewOnly => format!(
                            "input dropped: {} taken from the browser, {} reached the VM",
                            mib(sent[i]),
                            mib(arrived[i])
                        ),
                        _ => format!("{} ({})", mib(arrived[i]), times(arrived[i] / plain)),
                    }
                })
                .collect(),
        });
        for p in Policy::ALL {
            up_ratio[p as usize].push((kib, arrived[p as usize] / plain));
        }
        if arrived[Policy::ViewOnly as usize] > 0.0 {
            rep.notes.push(format!(
                "Session control: {} of PointerEvents from a view-only session reached the VM ({kib} messages).",
                mib(arrived[Policy::ViewOnly as usize])
            ));
        }
    }
    let (summary, up_behind) =
        recording_summary(&scb.ended_sessions(Policy::Recorded.vm(1)).await?);
    recorded.push(("upload", summary));
    if up_behind {
        for r in rep.session.iter_mut().rev().take(2) {
            let c = &mut r.cells[Policy::Recorded as usize];
            *c = behind(std::mem::take(c), true);
        }
    }
    // The control session's rows count the input the proxy followed.
    let rows = scb.ended_sessions(Policy::Password.vm(1)).await?;
    let counted: u64 = rows
        .iter()
        .filter_map(|r| r["pointer_events"].as_u64())
        .sum();

    // Round trips: each policy's samples taken in interleaved slices.
    let slice = (sc.rtt_count / reps).max(1);
    let mut rtt = vec![Vec::new(); n];
    for r in 0..reps {
        for p in rotation(r) {
            rtt[p as usize].extend(rfb_round_trips(addr, scb.token(p, 2), slice).await?);
        }
    }
    let rtt: Vec<(f64, f64)> = rtt
        .iter_mut()
        .map(|v| (percentile(v, 0.5), percentile(v, 0.99)))
        .collect();
    let plain50 = rtt[0].0;
    let (summary, rtt_behind) =
        recording_summary(&scb.ended_sessions(Policy::Recorded.vm(2)).await?);
    recorded.push(("round trip", summary));
    rep.session.push(ScRow {
        measure: "round trip, FramebufferUpdateRequest → 1 × 1 update (p50 / p99)".into(),
        cells: Policy::ALL
            .iter()
            .map(|&p| {
                let (p50, p99) = rtt[p as usize];
                let fig = format!("{p50:.1} / {p99:.1} µs");
                match p {
                    Policy::Plain => fig,
                    _ => behind(
                        format!("{fig} ({} of plain's p50)", times(p50 / plain50)),
                        p == Policy::Recorded && rtt_behind,
                    ),
                }
            })
            .collect(),
    });

    // The goals: each policy keeps 0.8× of the plain session.
    for p in others {
        let i = p as usize;
        let d = down[i] / plain;
        let recorded_here = |b: bool| p == Policy::Recorded && b;
        rep.goals.push(goal(
            &format!("{} session, download", p.label()),
            "≥ 0.8× the plain session",
            behind(times(d), recorded_here(down_behind)),
            Some(d >= 0.8),
        ));
        if p != Policy::ViewOnly {
            let figs: Vec<String> = up_ratio[i]
                .iter()
                .map(|(kib, r)| format!("{kib} {}", times(*r)))
                .collect();
            rep.goals.push(goal(
                &format!("{} session, upload", p.label()),
                "≥ 0.8× the plain session",
                behind(figs.join(", "), recorded_here(up_behind)),
                Some(up_ratio[i].iter().all(|(_, r)| *r >= 0.8)),
            ));
        }
        let r = plain50 / rtt[i].0;
        rep.goals.push(goal(
            &format!("{} session, round trip", p.label()),
            "≥ 0.8× the plain session (p50 at most 1.25× its time)",
            behind(
                format!("{} ({:.1} vs {:.1} µs)", times(r), rtt[i].0, plain50),
                recorded_here(rtt_behind),
            ),
            Some(r >= 0.8),
        ));
    }
    let shown: Vec<String> = recorded
        .iter()
        .map(|(what, s)| format!("{what}: {s}"))
        .collect();
    rep.session_notes.push(format!(
        "Recordings of the recorded sessions, from their rows (`vncbroker sessions --json`, `recording_state`): {}.",
        shown.join("; ")
    ));
    rep.session_notes.push(format!(
        "The password-stored upload sessions' rows counted {} PointerEvents followed by the proxy.",
        thousands(counted as usize)
    ));
    scb.broker.stop().await;
    Ok(())
}

/// Broker RSS with idle sessions: to a target that greets with the RFB
/// version line and then stays silent (what the target is judged on), and
/// to one that stays silent from the start (for comparison), in one
/// process and then two on one SQLite file; then after a full RFB handshake
/// and first screen with QEMU's VNC server. A part that fails is noted and
/// the others still run.
async fn idle_section(
    rep: &mut Report,
    sc: &Scale,
    bin: &Path,
    work: &Path,
    targets: &Targets,
    fd_soft: u64,
) -> anyhow::Result<()> {
    // One broker holds two descriptors per session.
    let cap = (fd_soft.saturating_sub(200) / 2) as usize;
    if sc.idle_one[1] > cap {
        rep.notes.push(format!(
            "The open-files limit ({fd_soft}) held one broker to {cap} idle sessions, not {}.",
            sc.idle_one[1]
        ));
    }
    let mut failed = Vec::new();

    let large = sc.idle_one[1].min(cap);
    match idle_brokers(rep, sc, bin, work, targets, cap, Idle::Greeted).await {
        Ok((per, _)) => rep.goals.push(goal(
            &format!(
                "memory per idle session at {} in one process, after the RFB greeting",
                thousands(large)
            ),
            "≤ 8 KiB",
            format!("{per:.1} KiB"),
            Some(per <= 8.0),
        )),
        Err(e) => {
            rep.notes.push(format!(
                "Idle sessions to the greeting target failed: {e:#}"
            ));
            rep.goals.push(goal(
                &format!(
                    "memory per idle session at {} in one process, after the RFB greeting",
                    thousands(large)
                ),
                "≤ 8 KiB",
                "failed".into(),
                None,
            ));
            failed.push("greeting target");
        }
    }

    let total = sc.idle_two.min(2 * cap);
    let silent_goal = format!(
        "memory per idle session at {} over two processes, silent target",
        thousands(total)
    );
    match idle_brokers(rep, sc, bin, work, targets, cap, Idle::Silent).await {
        Ok((_, per)) => rep.goals.push(goal(
            &silent_goal,
            "≤ 16 KiB",
            format!("{per:.1} KiB"),
            Some(per <= 16.0),
        )),
        Err(e) => {
            rep.notes
                .push(format!("Idle sessions to the silent target failed: {e:#}"));
            rep.goals
                .push(goal(&silent_goal, "≤ 16 KiB", "failed".into(), None));
            failed.push("silent target");
        }
    }

    if let Err(e) = idle_qemu(rep, sc, bin, work, targets, cap).await {
        rep.notes.push(format!(
            "Idle sessions with QEMU's VNC server failed: {e:#}"
        ));
        failed.push("QEMU");
    }
    if !failed.is_empty() {
        bail!(
            "idle sessions failed with the {} (see the notes)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// One `serve` process with `idle_one` sessions of `kind` (in two steps),
/// then two on one SQLite file with `idle_two` between them; a row for
/// each. Returns the KiB per session at the larger one-process step and
/// over the two processes.
async fn idle_brokers(
    rep: &mut Report,
    sc: &Scale,
    bin: &Path,
    work: &Path,
    targets: &Targets,
    cap: usize,
    kind: Idle,
) -> anyhow::Result<(f64, f64)> {
    let (vm, name, label) = match kind {
        Idle::Greeted => (VM_IDLE_GREET, "idle-greet", "greeting target"),
        _ => (VM_SILENT, "idle-silent", "silent target"),
    };
    let [mut small, mut large] = sc.idle_one;
    large = large.min(cap);
    small = small.min(large);
    let db = sqlite_url(&work.join(format!("{name}.db")));
    let settle = Duration::from_secs(if sc.quick { 30 } else { 120 });
    // What an earlier part left open must have closed.
    targets.wait_silent(0, settle).await?;

    // Refusals are logged at info: keep them, to say why if sessions fail.
    let level = std::env::var("VNCBROKER_BENCH_LOG")
        .unwrap_or_else(|_| "warn,vncbroker::proxy=info".into());
    let one = Broker::spawn_logging(bin, &db, work, &format!("{name}-1"), &level).await?;
    one.setup(targets)?;
    one.add_vm(VM_IDLE_GREET, targets.greet_silent)?;
    let token = one.mint(vm)?;
    let pid = one.pid()?;
    // Let the start-up settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (zero, t_zero) = (rss_kib(pid)?, threads(pid));
    dump_memory(pid, &format!("{name}-one-0"));
    let mut held = Vec::new();
    let via = (one.addr, token.as_str(), kind);
    hold_idle(&mut held, targets, via, small, &[&one.log]).await?;
    let (at_small, t_small) = settled(pid, sc.quick).await?;
    dump_memory(pid, &format!("{name}-one-{small}"));
    hold_idle(&mut held, targets, via, large - small, &[&one.log]).await?;
    let (at_large, t_large) = settled(pid, sc.quick).await?;
    dump_memory(pid, &format!("{name}-one-{large}"));
    drop(held);
    targets.wait_silent(0, settle).await?;
    one.stop().await;
    for (n, at, t) in [(small, at_small, t_small), (large, at_large, t_large)] {
        rep.memory.push(Mem {
            what: format!("vncbroker, {} idle sessions, {label}", thousands(n)),
            procs: "1".into(),
            at_zero: mem(zero),
            at_n: mem(at),
            per_session: per_session(zero, (small, at_small), (n, at)),
            threads: format!("{t_zero} → {t}"),
        });
    }
    let per_large = at_large.saturating_sub(zero) as f64 / large.max(1) as f64;

    // Two serve nodes on one SQLite file, half the sessions each.
    let total = sc.idle_two.min(2 * cap);
    let half = total / 2;
    let a = Broker::spawn_logging(bin, &db, work, &format!("{name}-2a"), &level).await?;
    let b = Broker::spawn_logging(bin, &db, work, &format!("{name}-2b"), &level).await?;
    let (pa, pb) = (a.pid()?, b.pid()?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (za, zb) = (rss_kib(pa)?, rss_kib(pb)?);
    let (tza, tzb) = (threads(pa), threads(pb));
    let mut held = Vec::new();
    let logs = [a.log.as_path(), b.log.as_path()];
    hold_idle(&mut held, targets, (a.addr, &token, kind), half, &logs).await?;
    hold_idle(
        &mut held,
        targets,
        (b.addr, &token, kind),
        total - half,
        &logs,
    )
    .await?;
    let (ra, ta) = settled(pa, sc.quick).await?;
    let (rb, tb) = (rss_kib(pb)?, threads(pb));
    dump_memory(pa, &format!("{name}-two-a-{half}"));
    drop(held);
    targets.wait_silent(0, settle).await?;
    a.stop().await;
    b.stop().await;
    let grown = ra.saturating_sub(za) + rb.saturating_sub(zb);
    let per = grown as f64 / total.max(1) as f64;
    rep.memory.push(Mem {
        what: format!(
            "vncbroker, {} idle sessions over two processes, {label}",
            thousands(total)
        ),
        procs: format!("2 ({} + {})", thousands(half), thousands(total - half)),
        at_zero: format!("{} + {}", mem(za), mem(zb)),
        at_n: format!("{} + {}", mem(ra), mem(rb)),
        threads: format!("{tza} + {tzb} → {ta} + {tb}"),
        per_session: format!(
            "{per:.1} KiB ({:.1} / {:.1} KiB per process)",
            ra.saturating_sub(za) as f64 / half.max(1) as f64,
            rb.saturating_sub(zb) as f64 / (total - half).max(1) as f64
        ),
    });
    Ok((per_large, per))
}

/// KiB per session at step `(n, at)` from the start at `zero`; past the
/// first step `(small, at_small)`, also what each session after it added.
fn per_session(zero: u64, (small, at_small): (usize, u64), (n, at): (usize, u64)) -> String {
    let mut per = format!(
        "{:.1} KiB",
        at.saturating_sub(zero) as f64 / n.max(1) as f64
    );
    if n > small {
        let _ = write!(
            per,
            " ({:.1} KiB each from {} to {})",
            at.saturating_sub(at_small) as f64 / (n - small) as f64,
            thousands(small),
            thousands(n)
        );
    }
    per
}

/// QEMU with its VNC server on 127.0.0.1 (no password: security type
/// None), the guest paused before its first instruction (`-S`), so the
/// screen stays as it is: nothing to send once a client has had it.
struct IdleQemu {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
}

impl IdleQemu {
    /// Starts it taking up to `clients` VNC clients at once (QEMU's
    /// `connections`, 32 by default).
    async fn start(work: &Path, clients: usize) -> anyhow::Result<IdleQemu> {
        let log = work.join("idle-qemu.log");
        // QEMU listens on 5900 + display; take a port the OS just handed out.
        let port = loop {
            let p = testkit::net::free_port();
            if p > 5900 {
                break p;
            }
        };
        let mut child = std::process::Command::new("qemu-system-x86_64")
            .args(["-machine", "accel=tcg", "-display", "none", "-nodefaults"])
            .args(["-vga", "std", "-m", "64", "-S", "-vnc"])
            .arg(format!("127.0.0.1:{},connections={clients}", port - 5900))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "QEMU exited ({status}): {}",
                    tail(&std::fs::read_to_string(&log).unwrap_or_default())
                );
            }
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("QEMU's VNC server never accepted on port {port}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(IdleQemu { child, port, log })
    }

    /// Why it is gone, if it is.
    fn exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        Some(format!(
            "QEMU exited ({status}): {}",
            tail(&std::fs::read_to_string(&self.log).unwrap_or_default())
        ))
    }
}

impl Drop for IdleQemu {
    fn drop(&mut self) {
        testkit::process::stop_child(&mut self.child, Duration::from_secs(3));
    }
}

/// How many of `held` the far end has not closed.
fn still_open(held: &[Ws]) -> usize {
    let mut b = [0u8; 1];
    held.iter()
        .filter(|ws| match &ws.fr {
            Frames::Tcp(f) => !matches!(f.get_ref().try_read(&mut b), Ok(0)),
            Frames::Tls(_) => true,
        })
        .count()
}

/// One broker with `idle_qemu` sessions (in two steps) to QEMU's VNC
/// server, each through the RFB handshake and its first full screen. If
/// QEMU stops taking sessions, the sessions it took are measured and the
/// count it stopped at is noted.
async fn idle_qemu(
    rep: &mut Report,
    sc: &Scale,
    bin: &Path,
    work: &Path,
    targets: &Targets,
    cap: usize,
) -> anyhow::Result<()> {
    let Some(version) = first_line("qemu-system-x86_64", &["--version"]) else {
        rep.notes.push(
            "qemu-system-x86_64 was not found: the idle sessions with QEMU's VNC server were not measured."
                .into(),
        );
        rep.memory.push(Mem {
            what: "vncbroker, idle sessions to QEMU's VNC server".into(),
            procs: "-".into(),
            at_zero: "not run".into(),
            at_n: "not run".into(),
            per_session: "-".into(),
            threads: "-".into(),
        });
        return Ok(());
    };
    // "QEMU emulator version 7.2.22 (Debian ...)"
    let version = version
        .split_whitespace()
        .nth(3)
        .unwrap_or("(version unknown)")
        .to_owned();
    let [mut small, mut large] = sc.idle_qemu;
    large = large.min(cap);
    small = small.min(large);
    let mut qemu = IdleQemu::start(work, large).await?;

    let level = std::env::var("VNCBROKER_BENCH_LOG")
        .unwrap_or_else(|_| "warn,vncbroker::proxy=info".into());
    let db = sqlite_url(&work.join("idle-qemu.db"));
    let one = Broker::spawn_logging(bin, &db, work, "idle-qemu", &level).await?;
    one.setup(targets)?;
    one.add_vm(VM_QEMU, SocketAddr::from(([127, 0, 0, 1], qemu.port)))?;
    let token = one.mint(VM_QEMU)?;
    let pid = one.pid()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (zero, t_zero) = (rss_kib(pid)?, threads(pid));
    dump_memory(pid, "idle-qemu-0");

    let via = (one.addr, token.as_str(), Idle::Rfb);
    let mut held = Vec::new();
    let mut steps = Vec::new();
    let mut stopped = None;
    for n in [small, large] {
        if n == 0 || n <= held.len() {
            continue;
        }
        let left = n - held.len();
        if let Err(e) = hold_idle(&mut held, targets, via, left, &[&one.log]).await {
            stopped = Some(match qemu.exited() {
                Some(why) => format!("{e:#}; {why}"),
                None => format!("{e:#}"),
            });
        }
        if held.is_empty() {
            break;
        }
        let (at, t) = settled(pid, sc.quick).await?;
        dump_memory(pid, &format!("idle-qemu-{}", held.len()));
        steps.push((held.len(), at, t, still_open(&held)));
        if stopped.is_some() {
            break;
        }
    }
    drop(held);
    one.stop().await;
    drop(qemu);

    if let Some(why) = &stopped {
        rep.notes.push(format!(
            "QEMU {version}'s VNC server (connections={large}) stopped taking sessions: {why}"
        ));
    }
    let first = steps.first().map(|&(n, at, ..)| (n, at)).unwrap_or((0, 0));
    for &(n, at, t, open) in &steps {
        let mut what = format!(
            "vncbroker, {} idle sessions to QEMU {version}'s VNC server, after the handshake and first screen",
            thousands(n)
        );
        if open < n {
            let _ = write!(what, " ({} of them still open)", thousands(open));
        }
        rep.memory.push(Mem {
            what,
            procs: "1".into(),
            at_zero: mem(zero),
            at_n: mem(at),
            per_session: per_session(zero, first, (n, at)),
            threads: format!("{t_zero} → {t}"),
        });
    }
    let what = |n: usize| {
        format!(
            "memory per idle session at {} in one process, QEMU {version}'s VNC server after the handshake and first screen",
            thousands(n)
        )
    };
    match steps.last() {
        Some(&(n, at, ..)) => {
            let per = at.saturating_sub(zero) as f64 / n.max(1) as f64;
            rep.goals.push(goal(
                &what(n),
                "≤ 8 KiB (the greeting's goal)",
                format!("{per:.1} KiB"),
                Some(per <= 8.0),
            ));
        }
        None => {
            rep.goals.push(goal(
                &what(large),
                "≤ 8 KiB (the greeting's goal)",
                "failed".into(),
                None,
            ));
        }
    }
    match stopped {
        Some(why) if steps.is_empty() => bail!("{why}"),
        _ => Ok(()),
    }
}

/// websockify's memory with idle sessions: the PSS of all its processes.
async fn idle_websockify(
    rep: &mut Report,
    sc: &Scale,
    w: &Websockify,
    targets: &Targets,
) -> anyhow::Result<()> {
    let n = sc.idle_websockify;
    w.wait_alone(Duration::from_secs(10)).await;
    let (_, pss0, rss0) = group_memory(w.pgid());
    let held = open_idle(w.addr, "silent", n, Idle::Silent).await?;
    targets
        .wait_silent(n as u64, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (procs, pss, rss) = group_memory(w.pgid());
    drop(held);
    targets.wait_silent(0, Duration::from_secs(60)).await?;
    rep.memory.push(Mem {
        what: format!(
            "websockify {}, {} idle sessions, silent target",
            w.version,
            thousands(n)
        ),
        procs: format!("{procs} (one per session)"),
        at_zero: format!("PSS {} (RSS {})", mem(pss0), mem(rss0)),
        at_n: format!("PSS {} (RSS sum {})", mem(pss), mem(rss)),
        per_session: format!(
            "{:.0} KiB PSS",
            pss.saturating_sub(pss0) as f64 / n.max(1) as f64
        ),
        threads: "1 per process".into(),
    });
    Ok(())
}

/// Finds websockify 0.13, installing it in a full run; starts it.
async fn start_websockify(opts: &Opts, rep: &mut Report, targets: &Targets) -> Option<Websockify> {
    let found = match find_websockify(opts) {
        Ok(f) => Some(f),
        Err(why) => {
            rep.notes.push(why);
            None
        }
    };
    let (bin, version) = found?;
    let tokens = [
        ("source", targets.source),
        ("sink", targets.sink),
        ("echo", targets.echo),
        ("greet", targets.greet),
        ("silent", targets.silent),
        ("spice", targets.spice),
    ];
    match Websockify::start(&bin, version, &tokens, &[]).await {
        Ok(w) => {
            rep.websockify_version = Some(w.version.clone());
            rep.notes.push(format!(
                "websockify: {} with the TokenFile plugin, one token per target.",
                bin.display()
            ));
            Some(w)
        }
        Err(e) => {
            rep.notes.push(format!("websockify did not start: {e:#}"));
            None
        }
    }
}

/// websockify 0.13, found, or installed in a full run; or why not.
fn find_websockify(opts: &Opts) -> Result<(PathBuf, String), String> {
    match locate_websockify(opts.websockify.as_deref()) {
        Some(f) => Ok(f),
        None if opts.quick => Err(format!(
            "websockify {WEBSOCKIFY_VERSION} is not installed: skipped in --quick \
             (a full run installs it into target/bench-venv)."
        )),
        None => install_websockify()
            .map(|bin| (bin, WEBSOCKIFY_VERSION.to_owned()))
            .map_err(|e| format!("websockify could not be installed: {e:#}")),
    }
}

/// WSS download and upload through vncbroker and websockify, each with the
/// same certificate, against socat's TLS relay; the proxies' CPU per GiB.
async fn tls_section(
    opts: &Opts,
    rep: &mut Report,
    sc: &Scale,
    work: &Path,
    targets: &Targets,
) -> anyhow::Result<()> {
    let (reps, secs) = (sc.reps, sc.secs);
    let (ca, cert, key) = make_certs(work)?;
    let tls = Arc::new(tls_connector(&ca)?);
    // A JSON string is a TOML basic string for any path.
    let json = |p: &Path| serde_json::to_string(&p.to_string_lossy());
    let extra = format!("[tls]\ncert = {}\nkey = {}\n", json(&cert)?, json(&key)?);
    let broker = Broker::spawn_configured(
        &opts.broker,
        &sqlite_url(&work.join("tls.db")),
        work,
        "tls",
        &broker_log_level(),
        &extra,
    )
    .await?;
    broker.setup(targets)?;
    let list = [("source", targets.source), ("sink", targets.sink)];
    let relay = match Relay::start(&list, Some((&cert, &key))).await {
        Ok(r) => Some(r),
        Err(e) => {
            rep.tls_notes
                .push(format!("The TLS relay (socat) did not start: {e:#}"));
            None
        }
    };
    let wsfy = match find_websockify(opts) {
        Ok((bin, version)) => {
            let args = [
                std::ffi::OsStr::new("--cert"),
                cert.as_os_str(),
                std::ffi::OsStr::new("--key"),
                key.as_os_str(),
            ];
            match Websockify::start(&bin, version, &list, &args).await {
                Ok(w) => Some(w),
                Err(e) => {
                    rep.tls_notes
                        .push(format!("websockify with TLS did not start: {e:#}"));
                    None
                }
            }
        }
        Err(why) => {
            rep.tls_notes.push(why);
            None
        }
    };
    let relay_at = |name: &str| relay.as_ref().and_then(|r| r.addr(name).ok());
    let paths = |name: &str, vm: i64| -> anyhow::Result<Paths<'_>> {
        Ok(Paths {
            vias: [
                None,
                relay_at(name).map(|a| Via::Tls(a, Arc::clone(&tls))),
                wsfy.as_ref()
                    .map(|w| Via::Wss(w.addr, name.to_owned(), Arc::clone(&tls))),
                Some(Via::Wss(broker.addr, broker.mint(vm)?, Arc::clone(&tls))),
            ],
            procs: [
                None,
                relay.as_ref().map(|r| Proc::Group(r.pgid())),
                wsfy.as_ref().map(|w| Proc::Group(w.pgid())),
                Some(Proc::Pid(broker.pid()?)),
            ],
            relay: relay.as_ref(),
            wsfy: wsfy.as_ref(),
        })
    };

    let mut suites = vec![format!("vncbroker {}", tls_suite(broker.addr, &tls).await)];
    if let Some(w) = &wsfy {
        suites.push(format!("websockify {}", tls_suite(w.addr, &tls).await));
    }
    if let Some(a) = relay_at("source") {
        suites.push(format!("socat {}", tls_suite(a, &tls).await));
    }
    rep.tls_notes.push(format!(
        "Negotiated with the bench's client: {}.",
        suites.join("; ")
    ));
    settle_peers(relay.as_ref(), wsfy.as_ref()).await;

    let name = "WSS download, 1 connection, 64 KiB writes";
    let res = interleave(
        rep,
        name,
        reps,
        &paths("source", VM_SOURCE)?,
        |via, p| async move { download(&via, 1, secs, p).await },
    )
    .await?;
    let f = flow_rows(rep, name, &res, true);
    tls_goals(rep, name, &f);

    for msg in [64 * 1024usize, 1024] {
        let name = format!("WSS upload, {} KiB masked messages", msg / 1024);
        let res = interleave(
            rep,
            &name,
            reps,
            &paths("sink", VM_SINK)?,
            |via, p| async move { upload(&via, targets, msg, secs, p).await },
        )
        .await?;
        let f = flow_rows(rep, &name, &res, true);
        tls_goals(rep, &name, &f);
    }
    drop(wsfy);
    drop(relay);
    broker.stop().await;
    Ok(())
}

/// The TLS goals: vncbroker ≥ 1.0× the TLS relay and ≥ 1.5× websockify.
fn tls_goals(rep: &mut Report, name: &str, f: &[Option<Flow>; 4]) {
    let rate = |i: usize| f[i].map(|x| x.rate);
    let b = rate(BROKER).unwrap_or(f64::NAN);
    ratio_goal(rep, name, "≥ 1.0× the TLS relay", b, rate(RELAY), 1.0);
    ratio_goal(rep, name, "≥ 1.5× websockify", b, rate(WSFY), 1.5);
}

/// The plain relay, one socat listener per stand-in target.
async fn start_relay(rep: &mut Report, targets: &Targets) -> Option<Relay> {
    let list = [
        ("source", targets.source),
        ("sink", targets.sink),
        ("echo", targets.echo),
        ("greet", targets.greet),
        ("spice", targets.spice),
    ];
    match Relay::start(&list, None).await {
        Ok(r) => {
            rep.relay_version = Some(r.version.clone());
            Some(r)
        }
        Err(e) => {
            rep.notes
                .push(format!("The plain relay (socat) did not start: {e:#}"));
            None
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = parse_args()?;
    if opts.targets {
        return run_targets().await;
    }
    let work = tempfile::Builder::new()
        .prefix("vncbroker-bench-")
        .tempdir()?;
    let result = run(&opts, work.path()).await;
    if result.is_err() {
        let kept = work.keep();
        eprintln!("the brokers' logs are kept in {}", kept.display());
    }
    result
}

/// Runs the sections, writes the report (also when a section failed), and
/// fails if one did.
async fn run(opts: &Opts, work: &Path) -> anyhow::Result<()> {
    let (fd_soft, fd_hard) = raise_fd_limit().unwrap_or((1024, 1024));
    let sc = Scale::new(opts.quick);
    let load_start = loadavg();
    let t_start = Instant::now();
    let mut rep = Report::default();
    let mut failed = Vec::new();

    let extra = broker_env();
    if !extra.is_empty() {
        let shown: Vec<String> = extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
        rep.notes.push(format!(
            "The brokers ran with extra environment (VNCBROKER_BENCH_BROKER_ENV): {}.",
            shown.join(" ")
        ));
    }
    if !opts.only.is_empty() {
        rep.notes.push(format!(
            "Only these sections ran: {}.",
            opts.only.join(", ")
        ));
    }
    let targets = Targets::start().await?;
    let wsfy = if opts.runs("proxy") || opts.runs("idle") || opts.runs("spice") {
        start_websockify(opts, &mut rep, &targets).await
    } else {
        None
    };

    let relay = if opts.runs("proxy") || opts.runs("spice") {
        start_relay(&mut rep, &targets).await
    } else {
        None
    };

    if (opts.runs("proxy") || opts.runs("sqlite") || opts.runs("spice"))
        && let Err(e) = sqlite_sections(
            opts,
            &mut rep,
            &sc,
            work,
            &targets,
            relay.as_ref(),
            wsfy.as_ref(),
        )
        .await
    {
        rep.notes.push(format!("SQLite measurements failed: {e:#}"));
        failed.push(e);
    }

    drop(relay);

    if opts.runs("tls") {
        eprintln!("measuring over TLS");
        if let Err(e) = tls_section(opts, &mut rep, &sc, work, &targets).await {
            rep.notes.push(format!("TLS measurements failed: {e:#}"));
            failed.push(e);
        }
    }

    if opts.runs("session-control") {
        eprintln!("measuring the session policies against the plain relay");
        if let Err(e) = session_control_section(&mut rep, &sc, &opts.broker, work, &targets).await {
            rep.notes
                .push(format!("Session-control measurements failed: {e:#}"));
            failed.push(e);
        }
    }

    if opts.runs("postgres") {
        eprintln!("measuring on PostgreSQL");
        if let Err(e) = postgres_section(&mut rep, &sc, &opts.broker, work, &targets).await {
            rep.notes
                .push(format!("PostgreSQL measurements not run: {e:#}"));
            for name in [
                "session setup, PostgreSQL, 4 clients".to_owned(),
                "token minting, XML-RPC keep-alive, PostgreSQL, 4 connections".to_owned(),
                format!(
                    "session setup, PostgreSQL, {} tokens in the table, 4 clients",
                    thousands(sc.fill)
                ),
            ] {
                if !rep.rows.iter().any(|r| r.measure == name) {
                    rep.rows.push(Row::new(name, "not run"));
                }
            }
            if !rep
                .goals
                .iter()
                .any(|g| g.what == "token minting, PostgreSQL")
            {
                rep.goals.push(goal(
                    "token minting, PostgreSQL",
                    "≥ 2000/s",
                    "not run".into(),
                    None,
                ));
            }
            let pg_goal = "session setup, PostgreSQL, 4 clients, no regression";
            if !rep.goals.iter().any(|g| g.what == pg_goal) {
                rep.goals.push(goal(
                    pg_goal,
                    &format!("≥ {PG_SETUP_BEFORE:.0}/s (the previous BENCHMARKS.md)"),
                    "not run".into(),
                    None,
                ));
            }
            failed.push(e);
        }
    }

    if opts.runs("idle") {
        eprintln!("measuring memory with idle sessions");
        if let Err(e) = idle_section(&mut rep, &sc, &opts.broker, work, &targets, fd_soft).await {
            rep.notes
                .push(format!("Idle-session measurements failed: {e:#}"));
            failed.push(e);
        }
        let w = match &wsfy {
            Some(w) => idle_websockify(&mut rep, &sc, w, &targets).await,
            None => Err(anyhow::anyhow!("websockify not running")),
        };
        if let Err(e) = w {
            rep.memory.push(Mem {
                what: format!(
                    "websockify, {} idle sessions, silent target",
                    thousands(sc.idle_websockify)
                ),
                procs: "-".into(),
                at_zero: "not run".into(),
                at_n: "not run".into(),
                per_session: "-".into(),
                threads: "-".into(),
            });
            if wsfy.is_some() {
                rep.notes
                    .push(format!("websockify idle sessions failed: {e:#}"));
                failed.push(e);
            }
        }
    }
    drop(wsfy);

    cpu_goals(&mut rep);
    let md = render(
        &rep,
        &sc,
        opts,
        &load_start,
        t_start.elapsed(),
        (fd_soft, fd_hard),
    );
    print!("{md}");
    if let Some(out) = &opts.out {
        // The soak section is written by scripts/soak runs, not by this
        // harness: keep it.
        let mut md = md;
        if let Ok(old) = std::fs::read_to_string(out)
            && let Some(at) = old.find("\n## Soak")
        {
            md.push_str(&old[at..]);
        }
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    match failed.into_iter().next() {
        Some(e) => Err(e.context("a measurement failed (the report says which)")),
        None => Ok(()),
    }
}

/// The mint rate on `backend`, the median of the repetitions, against its
/// goal of `goal` per second.
async fn mint_section(
    rep: &mut Report,
    sc: &Scale,
    addr: SocketAddr,
    backend: &str,
    goal_rate: f64,
) -> anyhow::Result<()> {
    let mut m = Vec::new();
    for _ in 0..sc.reps {
        m.push(mint_rate(addr, 4, sc.secs).await?);
    }
    let mints = median(&mut m);
    rep.rows.push(Row::new(
        format!("token minting, XML-RPC keep-alive, {backend}, 4 connections"),
        format!("{mints:.0}/s"),
    ));
    rep.goals.push(goal(
        &format!("token minting, {backend}"),
        &format!("≥ {goal_rate:.0}/s"),
        format!("{mints:.0}/s"),
        Some(mints >= goal_rate),
    ));
    Ok(())
}

/// The main SQLite broker: throughput, round trips and session setup beside
/// direct TCP and websockify, the mint rate, and the full token table.
async fn sqlite_sections(
    opts: &Opts,
    rep: &mut Report,
    sc: &Scale,
    work: &Path,
    targets: &Targets,
    relay: Option<&Relay>,
    wsfy: Option<&Websockify>,
) -> anyhow::Result<()> {
    let main_db = work.join("main.db");
    let broker =
        Broker::create(&opts.broker, &sqlite_url(&main_db), work, "sqlite", targets).await?;
    if opts.runs("proxy") {
        eprintln!("measuring throughput, round trips and session setup");
        proxy_section(rep, sc, targets, &broker, relay, wsfy).await?;

        eprintln!("measuring the mint rate on SQLite");
        mint_section(rep, sc, broker.addr, "SQLite", 5000.0).await?;
    }
    if opts.runs("spice") {
        eprintln!("measuring SPICE channels");
        broker.add_spice_vm(VM_SPICE, targets.spice)?;
        spice::section(rep, sc, targets, &broker, relay, wsfy).await?;
    }
    if opts.runs("sqlite") {
        eprintln!(
            "filling the SQLite token table with {} tokens",
            thousands(sc.fill)
        );
        // The baseline: the broker alone, on the table as it is (a few tokens).
        let via = broker.via(VM_GREET)?;
        session_setup(&via, 4, 0.5).await?;
        let empty = setups(&[&via], sc.reps, sc.secs, None).await?.remove(0);
        let took = fill_sqlite(&main_db, sc.fill)?;
        session_setup(&via, 4, 0.5).await?;
        let full = setups(&[&via], sc.reps, sc.secs, None).await?.remove(0);
        full_table_row(rep, "SQLite", sc, &empty, &full, took, true);
    }
    broker.stop().await;
    Ok(())
}

fn render(
    rep: &Report,
    sc: &Scale,
    opts: &Opts,
    load_start: &str,
    took: Duration,
    fds: (u64, u64),
) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_total = proc_kib("/proc/meminfo", "MemTotal:").unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let broker_version = first_line(&opts.broker.to_string_lossy(), &["--version"])
        .unwrap_or_else(|| "vncbroker (version unknown)".into());
    let commit = first_line("git", &["-C", REPO, "rev-parse", "--short", "HEAD"]);
    let dirty = std::process::Command::new("git")
        .args(["-C", REPO, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    let rustc = first_line("rustc", &["--version"]).unwrap_or_else(|| "unknown".into());
    let wv = rep
        .websockify_version
        .clone()
        .unwrap_or_else(|| "not run".into());

    let mut md = String::new();
    let _ = writeln!(md, "# vncbroker benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `scripts/bench` (tools/loadtest/src/bin/vncbroker-bench.rs); do not edit by hand, rerun it.\n"
    );
    let _ = writeln!(md, "## Run\n");
    let _ = writeln!(
        md,
        "- Machine: {cores} cores, {cpu}, {:.1} GiB memory, Linux {kernel}; open files {} (soft) / {} (hard).",
        mem_total as f64 / 1024.0 / 1024.0,
        fds.0,
        fds.1
    );
    let _ = writeln!(
        md,
        "- Load average (1/5/15 min) at the start: {load_start}; at the end: {}. The machine is shared; figures move with its load.",
        loadavg()
    );
    let _ = writeln!(
        md,
        "- Versions: {broker_version}{} (release build), websockify {wv}, PostgreSQL {}, {rustc}.",
        match commit {
            Some(c) => format!(" at {c}{}", if dirty { " with local changes" } else { "" }),
            None => String::new(),
        },
        rep.postgres_version.as_deref().unwrap_or("not run"),
    );
    let _ = writeln!(
        md,
        "- {} run: each figure is the median of {} interleaved repetition(s) of {:.1} s (direct, plain relay, websockify, vncbroker in turn); round trips pool {} samples per path; idle-session memory is measured once. The whole run took {:.0} s.",
        if sc.quick {
            "Quick (`--quick`)"
        } else {
            "Full"
        },
        sc.reps,
        sc.secs,
        sc.rtt_count,
        took.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "- Rerun: `scripts/bench` (builds release, writes BENCHMARKS.md); `scripts/bench --quick --out /tmp/bench.md` for a check under a minute. Needs python3 with venv (websockify is installed into target/bench-venv when missing), socat, openssl, initdb/pg_ctl (or DATABASE_URL), and prlimit.\n"
    );

    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(md, "| target | goal | measured | |\n|---|---|---|---|");
    for g in &rep.goals {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            g.what,
            g.target,
            g.figure,
            yes_no(g.met)
        );
    }
    let met = rep.goals.iter().filter(|g| g.met == Some(true)).count();
    let _ = writeln!(md, "\n{met} of {} targets met.\n", rep.goals.len());

    let rv = rep
        .relay_version
        .as_deref()
        .map_or("socat -b65536, not run".to_owned(), |v| {
            format!("socat {v} -b65536")
        });
    let _ = writeln!(md, "## Results\n");
    let _ = writeln!(
        md,
        "| measure | direct TCP | plain relay ({rv}) | websockify {wv} | vncbroker | vncbroker vs direct | vncbroker vs relay | vncbroker vs websockify |\n|---|---|---|---|---|---|---|---|"
    );
    for r in &rep.rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.measure,
            r.direct,
            r.relay,
            r.websockify,
            r.broker,
            r.vs_direct,
            r.vs_relay,
            r.vs_websockify
        );
    }
    if !rep.tls.is_empty() {
        let _ = writeln!(md, "\n## TLS\n");
        let _ = writeln!(
            md,
            "WSS through vncbroker (`[tls] cert`/`key`) and websockify (`--cert`/`--key`), against socat's `OPENSSL-LISTEN` (`-b65536`, `verify=0`) relaying raw bytes in TLS, the TLS relay; one certificate (P-256, signed by a CA the bench's rustls client trusts alone) for all three. Medians of {} interleaved repetition(s) of {:.1} s (relay, websockify, vncbroker in turn).\n",
            sc.reps, sc.secs
        );
        let _ = writeln!(
            md,
            "| measure | TLS relay (socat OPENSSL-LISTEN) | websockify {wv} | vncbroker | vncbroker vs relay | vncbroker vs websockify |\n|---|---|---|---|---|---|"
        );
        for r in &rep.tls {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                r.measure, r.relay, r.websockify, r.broker, r.vs_relay, r.vs_websockify
            );
        }
        for n in &rep.tls_notes {
            let _ = writeln!(md, "\n- {n}");
        }
    }
    if !rep.cpu.is_empty() {
        let _ = writeln!(md, "\n## CPU per GiB relayed\n");
        let _ = writeln!(
            md,
            "User + system CPU seconds of the proxy per GiB of payload moved, from /proc/PID/stat (utime + stime, {} ticks a second) read just before and just after each timed window while its connections are open: vncbroker's `serve` process (all its threads); websockify and socat, every process of their process group (each forks a process per connection). The medians of the repetitions. The bench's own client and the stand-in servers are not counted.\n",
            clock_ticks()
        );
        let _ = writeln!(
            md,
            "| measure | relay (socat) | websockify {wv} | vncbroker | vncbroker vs relay |\n|---|---|---|---|---|"
        );
        let c = |v: Option<f64>| v.map_or("-".into(), cpu_gib);
        for r in &rep.cpu {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                r.measure,
                c(r.relay),
                c(r.websockify),
                c(r.broker),
                r.broker
                    .zip(r.relay)
                    .map_or("-".into(), |(b, r)| ratio(b, r))
            );
        }
    }
    if !rep.session.is_empty() {
        let _ = writeln!(md, "\n## Session control\n");
        let _ = writeln!(
            md,
            "The session policies against the plain relay, all on one vncbroker, each on VMs of its own whose stand-in VNC servers speak RFB 3.8 (security type None; ServerInit 1024 × 768, 32 bpp). The bench's client does the browser's handshake through the proxy (RFB 3.8, None, shared ClientInit) before each measurement, then: download reads FramebufferUpdates of one 128 × 128 Raw rectangle (64 KiB of random 24-bit pixels, from a pool of 64 distinct updates) sent as fast as the connection takes them; upload sends masked messages of whole PointerEvents (1020 and 65532 bytes), counted at the VNC server; a round trip is one 10-byte FramebufferUpdateRequest answered by a 20-byte update of a 1 × 1 Raw rectangle. Plain relay: no password stored and no policy, relayed without looking at it (the VNC server and the client do the handshake between them). Password stored: the proxy runs the security handshake (picking None, the only type offered) and follows and counts the browser's messages. View-only token: a token minted with `--view-only` on a VM with a stored password; input is dropped, so its upload shows the rate at which the proxy took and dropped it. Clipboard none: `--clipboard none` (no password), so the server's stream is parsed too, to drop cut texts. Recorded: `--record yes` (no password) with a `[recording] dir` and the default 8 MiB queue; when the writer falls behind, the recording stops, is marked incomplete and the session goes on unrecorded, so a figure marked so is mostly that of the unrecorded relay (the recordings' states are below). Medians of {} interleaved repetition(s) of {:.1} s (the policies in turn, their order rotated at each repetition); round trips pool {} samples per policy. In brackets: the ratio to the plain relay (for round trips, the variant's p50 time over the plain relay's).\n",
            sc.reps, sc.secs, sc.rtt_count
        );
        let _ = write!(md, "| measure |");
        for p in Policy::ALL {
            let _ = write!(md, " {} |", p.label());
        }
        let _ = writeln!(md, "\n|---|---|---|---|---|---|");
        for r in &rep.session {
            let _ = writeln!(md, "| {} | {} |", r.measure, r.cells.join(" | "));
        }
        let _ = writeln!(md);
        for n in &rep.session_notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    let _ = writeln!(md, "\n## Memory with idle sessions\n");
    let _ = writeln!(
        md,
        "Idle: upgraded and relaying, then holding still, opened 32 at a time. Greeting target: the target sends the RFB version line (`RFB 003.008\\n`, 12 bytes) at accept, as a VNC server does, and then stays silent; each client reads it through the proxy (one binary frame) and holds, so the relay has had something to carry from the server (the target is judged on these rows). Silent target: the target accepts and never sends, so nothing is relayed (for comparison). Both in chunks of 500, each waited for at the target. QEMU: `qemu-system-x86_64 -S -nodefaults -vga std -m 64 -display none -vnc 127.0.0.1:N,connections=C` (no password, so security type None; guest paused, so the screen is static; C is the session count, as QEMU takes 32 clients by default); each client does the browser's RFB 3.8 handshake through the proxy (None, shared ClientInit), sends one FramebufferUpdateRequest for the whole screen (incremental 0; no SetEncodings, so QEMU answers in Raw, 1.2 MB for the 640 × 480 × 32 bpp screen of a guest that has not set a mode), reads the update to its end and holds, 2 at a time (QEMU listens with a backlog of 1), in chunks of 100; only the broker's memory is counted, not QEMU's. vncbroker: VmRSS of each `serve` process, one alone and then two `serve` nodes on one SQLite file (the open-files limit keeps one process under 10,000 sessions), read once the blocking-pool threads that the openings started have exited (a full run waits 11 s; --quick 0.5 s). websockify (silent target): the PSS of its process group (it forks a process per connection).\n"
    );
    let _ = writeln!(
        md,
        "| idle sessions | processes | at 0 sessions | with the sessions | memory per session | threads |\n|---|---|---|---|---|---|"
    );
    for m in &rep.memory {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            m.what, m.procs, m.at_zero, m.at_n, m.per_session, m.threads
        );
    }
    let _ = writeln!(md, "\n## Method\n");
    for line in [
        "Stand-in VNC servers (source, sink, echo, greeting, silent) run in a child process of the bench; direct TCP, the plain relay, websockify and vncbroker reach the same ones, driven by the bench's own client.",
        "Plain relay: socat with a 64 KiB buffer (`socat -b65536 TCP-LISTEN:PORT,bind=127.0.0.1,reuseaddr,fork TCP:TARGET`), one listener per stand-in target, forking a process per connection; the client sends and receives raw bytes through it, with no WebSocket framing and no token, so it is the cost of a second process copying the bytes, the floor for any proxy. Its upload sends raw writes of the same sizes as the WebSocket messages; its session setup is connect, socat's fork and connect to the target, and the greeting.",
        "Download: 64 KiB writes from the source read for the measured time after a 200 ms warm-up. Upload: masked binary frames of the size given, each frame in one write (raw writes of that size for direct TCP and the relay), counted at the sink; every client socket has TCP_NODELAY, as a browser's WebSocket does, so each message is its own segment on every path. Round trip: one 16-byte message echoed at a time; measured as the processes fall, then again with every process involved (bench, stand-in servers, broker, relay, websockify) pinned to one CPU with taskset, which leaves out the cost of waking a process on the other CPU (large in a virtual machine).",
        "Session setup: 1 client, then 4, in a loop of connect, WebSocket upgrade, token redemption, backend connect and the server's first byte (the RFB greeting); the token is reusable, so every setup writes the token and session rows. Direct TCP is connect and first byte. Rates are medians of the repetitions, p50 and p99 over all their setups; \"p50 over direct TCP\" is vncbroker's p50 less direct TCP's. The PostgreSQL rows (4 clients) are compared with 1539/s, the figure in BENCHMARKS.md before these measures were added.",
        "TLS: WSS download (1 connection) and upload (64 KiB and 1 KiB masked messages) through vncbroker with `[tls] cert`/`key` and websockify with `--cert`/`--key`; the TLS relay is socat's `OPENSSL-LISTEN:PORT,cert=…,key=…,verify=0,reuseaddr,fork` to the same targets, raw bytes in TLS (the same sizes for upload). One P-256 certificate for 127.0.0.1, signed by a CA made for the run, serves all three; the client is rustls (ring), trusting that CA alone, so each side pays for TLS as a browser's connection would make it.",
        "CPU per GiB relayed: user + system time (utime + stime in /proc/PID/stat, in clock ticks from `getconf CLK_TCK`) of the proxy, read just before and just after each throughput measurement's timed window, while its connections are open, over the payload bytes that window moved. vncbroker: its `serve` process, every thread. websockify and socat: every live process in their process group (the listener and the process forked for each connection), each one's time since the first reading (a process started since counts from zero). Medians of the repetitions; tick granularity (10 ms) makes --quick figures coarse.",
        "Minting: one.vm.novnctoken over XML-RPC with HTTP keep-alive from 4 connections (the password check is cached, as in production).",
        "SPICE: a stand-in SPICE server in the targets process links each channel as QEMU's does on the wire (link reply with a 1024-bit RSA key, auth selection, mini header), takes any ticket, and gives each main channel a session id in MAIN_INIT. The VM on vncbroker has a stored password, so the broker seals it with the link's key (RSA-OAEP) for every channel, as with QEMU; on the other paths the client sends a ticket of its own. Display channel: after a quiet main channel, the display channel of the same session reads 64 KiB drawing messages as fast as they come (relayed as bytes after the link). Main channel: after MAIN_INIT the stand-in sends 2 KiB agent-data messages (the agent's chunk size), which vncbroker's main-channel filter reads message by message. Channel link: one client links a display channel of a live console, closes it and links the next, each a new connection (WebSocket upgrade, token redemption, the session lookup in the store, the sealed ticket, the link result). websockify and socat relay the same SPICE bytes without looking at them (how Sunstone served spice-html5).",
        "The full-table measurement writes unrelated live tokens (random 32-byte hashes) straight into the running broker's database with SQL, then measures session setup again on the same broker.",
    ] {
        let _ = writeln!(md, "- {line}");
    }
    for n in &rep.notes {
        let _ = writeln!(md, "- {n}");
    }
    md
}
