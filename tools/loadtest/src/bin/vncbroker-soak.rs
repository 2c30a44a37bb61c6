//! vncbroker-soak: many concurrent console sessions with traffic both ways
//! for a long time, checking that every byte arrives in order, that the
//! brokers' memory and file descriptors stay flat, and measuring the
//! brokers' CPU and the latency of input events under that load.
//!
//! Run it through `scripts/soak`, which builds release binaries and raises
//! the open-files limit. The default run is 10,000 sessions for 10 minutes.
//!
//! Layout: this process (the orchestrator) creates a fresh SQLite database,
//! starts `--brokers` `vncbroker serve` nodes on it, and `--workers` copies
//! of itself in `--worker` mode. Each worker runs an echo-less VNC server
//! stand-in (the "target", registered as a VM of its own) and the WebSocket
//! clients of its share of the sessions, spread over the brokers, so a
//! session's two ends live in one process and can be compared exactly:
//!
//! - the client sends an 8-byte session number, the target answers with the
//!   same 8 bytes; from then on each side sends a pseudo-random stream seeded
//!   by the session and direction, and the other side checks every byte (and
//!   a running checksum) against the same stream;
//! - `--traffic vnc` (the default) shapes the writes like a VNC session's:
//!   the target sends bursts of 1..`--burst-updates` (3) framebuffer
//!   updates of `--update-min`..`--update-max` (1 KiB..64 KiB, log-uniform),
//!   a burst every 0..2x `--update-every-ms` (15000) ms, a few ms between
//!   the updates of a burst (or `--down-rate MIB_PER_S` sets the burst
//!   interval from a total server-to-client rate over all sessions); the
//!   client sends input events, each in a WebSocket message of its own:
//!   clusters of 1..`--input-cluster` (5) 6-byte PointerEvents (a mouse
//!   move, 8..25 ms apart) or 8-byte KeyEvents (typing, 40..160 ms apart), a
//!   cluster every 0..2x `--input-every-ms` (1000) ms. The defaults give
//!   about 20 MiB/s down for 10,000 sessions and 2.7 input events per
//!   second per session;
//! - `--traffic random` sends chunks of 1..`--max-chunk` bytes
//!   (log-uniform) every 0..2x `--interval-ms` ms in each direction;
//! - input latency: every client-to-server write (an input event, or a
//!   chunk in random mode) made during the steady phase is timed from just
//!   before the client's write to the moment the target has read its last
//!   byte; each worker keeps a histogram (about 1.5% wide buckets) and hands
//!   it over at the end, and the orchestrator merges them into
//!   p50/p99/p99.9/max. Both ends run in the worker, so its own scheduling
//!   is part of the figure: each worker also records how late a 10 ms sleep
//!   of its wakes up over the same time (its event-loop lag), reported
//!   alongside;
//! - at the end both sides stop sending, wait until everything sent has
//!   arrived, and the client closes with a close frame; the target must then
//!   see the proxy's FIN. The broker's session rows must say "client closed"
//!   with exactly the bytes each side sent.
//!
//! The orchestrator samples each broker's RSS, fd count, CPU time (utime +
//! stime from /proc/PID/stat, in `getconf CLK_TCK` ticks) and
//! `vncbroker_sessions_active`, and the workers' CPU time, every 10 s;
//! prints a summary (with each node's CPU % of one core and CPU seconds per
//! GiB relayed over the steady state, the workers' CPU, and the input
//! latency); writes it as the "Soak" section of BENCHMARKS.md to `--out
//! FILE` when asked; and exits non-zero on any loss, mismatch, failed
//! session or dead process. It stops every process it started (workers also
//! exit when its pipe to them closes).
//!
//! Usage: vncbroker-soak [--sessions N] [--minutes M] [--brokers B]
//!        [--per-worker N] [--traffic vnc|random] [--update-every-ms MS]
//!        [--burst-updates N] [--update-min BYTES] [--update-max BYTES]
//!        [--down-rate MIB_PER_S] [--input-every-ms MS] [--input-cluster N]
//!        [--interval-ms MS] [--max-chunk BYTES] [--ramp-rate PER_SEC]
//!        [--max-rss-growth-pct P] [--out FILE] [--broker PATH] [--keep]

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use testkit::fd_count;
use testkit::frames::{self, Ev, FrameError};

/// The most descriptors one process may hold (the hard limit is 20,000).
const FD_BUDGET: usize = 19_000;
/// How often the orchestrator samples the brokers.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// How often a worker reports its counters.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// Bytes before the random streams: the session number, and its echo.
const HEADER: u64 = 8;

// ---------------------------------------------------------------- options

/// How the sessions' writes are sized and timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Traffic {
    /// Framebuffer-update bursts down, small input events up.
    Vnc,
    /// Random-sized chunks at random times, both ways alike.
    Random,
}

impl std::str::FromStr for Traffic {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Traffic> {
        match s {
            "vnc" => Ok(Traffic::Vnc),
            "random" => Ok(Traffic::Random),
            other => bail!("--traffic is vnc or random, not {other:?}"),
        }
    }
}

impl Traffic {
    fn name(self) -> &'static str {
        match self {
            Traffic::Vnc => "vnc",
            Traffic::Random => "random",
        }
    }
}

/// The shape of the traffic, as a worker needs it.
#[derive(Clone, Debug)]
struct Shape {
    traffic: Traffic,
    /// Random: the mean pause between chunks, and the largest chunk.
    interval_ms: u64,
    max_chunk: usize,
    /// VNC, server to client: the mean pause between bursts, the most
    /// updates in a burst, and the update sizes.
    update_every_ms: u64,
    burst_updates: u64,
    update_min: usize,
    update_max: usize,
    /// VNC, client to server: the mean pause between clusters of input
    /// events, and the most events in a cluster.
    input_every_ms: u64,
    input_cluster: u64,
}

impl Shape {
    /// The mean size of an update (log-uniform between the bounds).
    fn mean_update(&self) -> f64 {
        let (a, b) = (self.update_min as f64, self.update_max as f64);
        if b > a { (b - a) / (b / a).ln() } else { a }
    }

    /// The mean bytes of a burst of updates.
    fn mean_burst(&self) -> f64 {
        (1 + self.burst_updates) as f64 / 2.0 * self.mean_update()
    }

    /// The server-to-client bytes per second of one session, about.
    fn down_per_session(&self) -> f64 {
        match self.traffic {
            Traffic::Vnc => self.mean_burst() / (self.update_every_ms.max(1) as f64 / 1000.0),
            Traffic::Random => {
                let m = self.max_chunk as f64;
                let mean = if m > 1.0 { (m - 1.0) / m.ln() } else { 1.0 };
                mean / (self.interval_ms.max(1) as f64 / 1000.0)
            }
        }
    }

    /// The largest write of one direction.
    fn largest_write(&self, up: bool) -> usize {
        match (self.traffic, up) {
            (Traffic::Vnc, true) => KEY_EVENT.max(POINTER_EVENT),
            (Traffic::Vnc, false) => self.update_max,
            (Traffic::Random, _) => self.max_chunk,
        }
    }

    /// The worker arguments that carry it.
    fn args(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut put = |k: &str, x: String| {
            v.push(k.to_owned());
            v.push(x);
        };
        put("--traffic", self.traffic.name().into());
        put("--interval-ms", self.interval_ms.to_string());
        put("--max-chunk", self.max_chunk.to_string());
        put("--update-every-ms", self.update_every_ms.to_string());
        put("--burst-updates", self.burst_updates.to_string());
        put("--update-min", self.update_min.to_string());
        put("--update-max", self.update_max.to_string());
        put("--input-every-ms", self.input_every_ms.to_string());
        put("--input-cluster", self.input_cluster.to_string());
        v
    }

    /// Takes a worker argument that belongs to it; false if it is not one.
    fn set(&mut self, name: &str, v: &str) -> anyhow::Result<bool> {
        match name {
            "--traffic" => self.traffic = v.parse()?,
            "--interval-ms" => self.interval_ms = v.parse()?,
            "--max-chunk" => self.max_chunk = v.parse()?,
            "--update-every-ms" => self.update_every_ms = v.parse()?,
            "--burst-updates" => self.burst_updates = v.parse()?,
            "--update-min" => self.update_min = v.parse()?,
            "--update-max" => self.update_max = v.parse()?,
            "--input-every-ms" => self.input_every_ms = v.parse()?,
            "--input-cluster" => self.input_cluster = v.parse()?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The traffic, in words, for the banner and the report.
    fn describe(&self) -> String {
        match self.traffic {
            Traffic::Vnc => format!(
                "VNC-shaped traffic: server to client, bursts of 1 to {} framebuffer updates of {} to {} (log-uniform) about every {} per session; client to server, clusters of 1 to {} input events (6-byte PointerEvents 8 to 25 ms apart, or 8-byte KeyEvents 40 to 160 ms apart), a message each, about every {}",
                self.burst_updates,
                size_words(self.update_min),
                size_words(self.update_max),
                duration_words(self.update_every_ms),
                self.input_cluster,
                duration_words(self.input_every_ms),
            ),
            Traffic::Random => format!(
                "Random traffic both ways, chunks of 1 B to {} about every {} per session and direction",
                size_words(self.max_chunk),
                duration_words(self.interval_ms),
            ),
        }
    }
}

impl Default for Shape {
    fn default() -> Shape {
        Shape {
            traffic: Traffic::Vnc,
            interval_ms: 1_000,
            max_chunk: 16 * 1024,
            update_every_ms: 15_000,
            burst_updates: 3,
            update_min: 1024,
            update_max: 64 * 1024,
            input_every_ms: 1_000,
            input_cluster: 5,
        }
    }
}

/// 1024 → "1 KiB", 65536 → "64 KiB", 100 → "100 B".
fn size_words(b: usize) -> String {
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{} MiB", b >> 20)
    } else if b >= 1024 && b.is_multiple_of(1024) {
        format!("{} KiB", b >> 10)
    } else {
        format!("{b} B")
    }
}

/// 1000 → "second", 15000 → "15 s", 250 → "250 ms".
fn duration_words(ms: u64) -> String {
    if ms == 1000 {
        "second".into()
    } else if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else if ms >= 1000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{ms} ms")
    }
}

#[derive(Clone, Debug)]
struct Opts {
    sessions: usize,
    minutes: f64,
    brokers: usize,
    per_worker: usize,
    shape: Shape,
    /// A total server-to-client rate (MiB/s) to set the burst interval from.
    down_rate: Option<f64>,
    out: Option<PathBuf>,
    ramp_rate: f64,
    broker: PathBuf,
    keep: bool,
    max_rss_growth_pct: f64,
}

fn usage() -> &'static str {
    "usage: vncbroker-soak [--sessions N (10000)] [--minutes M (10)] [--brokers B (2)]\n\
     \x20      [--per-worker N (2500)] [--traffic vnc|random (vnc)]\n\
     \x20  vnc:    [--update-every-ms MS (15000)] [--burst-updates N (3)]\n\
     \x20          [--update-min BYTES (1024)] [--update-max BYTES (65536)]\n\
     \x20          [--down-rate MIB_PER_S (sets --update-every-ms from the session count)]\n\
     \x20          [--input-every-ms MS (1000)] [--input-cluster N (5)]\n\
     \x20  random: [--interval-ms MS (1000)] [--max-chunk BYTES (16384)]\n\
     \x20      [--ramp-rate SESSIONS_PER_SEC (500)] [--max-rss-growth-pct P (10)]\n\
     \x20      [--out FILE (the Soak section of BENCHMARKS.md)] [--broker PATH] [--keep]"
}

fn parse_opts(mut args: impl Iterator<Item = String>) -> anyhow::Result<Opts> {
    let mut o = Opts {
        sessions: 10_000,
        minutes: 10.0,
        brokers: 2,
        per_worker: 2_500,
        shape: Shape::default(),
        down_rate: None,
        out: None,
        ramp_rate: 500.0,
        broker: std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("vncbroker"),
        keep: false,
        max_rss_growth_pct: 10.0,
    };
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--sessions" => o.sessions = val(&a)?.parse()?,
            "--minutes" => o.minutes = val(&a)?.parse()?,
            "--brokers" => o.brokers = val(&a)?.parse()?,
            "--per-worker" => o.per_worker = val(&a)?.parse()?,
            "--traffic" | "--interval-ms" | "--max-chunk" | "--update-every-ms"
            | "--burst-updates" | "--update-min" | "--update-max" | "--input-every-ms"
            | "--input-cluster" => {
                let v = val(&a)?;
                o.shape.set(&a, &v)?;
            }
            "--down-rate" => o.down_rate = Some(val(&a)?.parse()?),
            "--out" => o.out = Some(val(&a)?.into()),
            "--ramp-rate" => o.ramp_rate = val(&a)?.parse()?,
            "--max-rss-growth-pct" => o.max_rss_growth_pct = val(&a)?.parse()?,
            "--broker" => o.broker = val(&a)?.into(),
            "--keep" => o.keep = true,
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    if o.sessions == 0 || o.brokers == 0 || o.per_worker == 0 || o.shape.max_chunk == 0 {
        bail!("--sessions, --brokers, --per-worker and --max-chunk must be positive");
    }
    let sh = &mut o.shape;
    if sh.burst_updates == 0 || sh.input_cluster == 0 || sh.update_min == 0 {
        bail!("--burst-updates, --input-cluster and --update-min must be positive");
    }
    if sh.update_max < sh.update_min {
        bail!("--update-max must be at least --update-min");
    }
    if let Some(rate) = o.down_rate {
        if rate.is_nan() || rate <= 0.0 {
            bail!("--down-rate must be positive");
        }
        // Bursts often enough that all the sessions together send `rate`.
        let per_session = rate * 1048576.0 / o.sessions as f64;
        sh.update_every_ms = ((sh.mean_burst() / per_session * 1000.0).round() as u64).max(1);
    }
    if o.ramp_rate <= 0.0 || o.minutes < 0.0 {
        bail!("--ramp-rate must be positive and --minutes not negative");
    }
    Ok(o)
}

// ---------------------------------------------------------------- streams

/// SplitMix64.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Log-uniform in [1, max]: mostly small writes, now and then a big one.
    fn chunk(&mut self, max: usize) -> usize {
        self.log_uniform(1, max)
    }

    /// Log-uniform in [lo, hi].
    fn log_uniform(&mut self, lo: usize, hi: usize) -> usize {
        let (a, b) = (lo.max(1) as f64, hi.max(lo).max(1) as f64);
        ((a * (b / a).powf(self.unit())) as usize).clamp(lo, hi.max(lo))
    }

    /// Uniform in [lo, hi] milliseconds.
    fn ms_between(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }

    /// A random pause with mean `mean_ms`: uniform in [0, 2 x mean].
    fn jitter(&mut self, mean_ms: u64) -> Duration {
        Duration::from_millis(self.below(2 * mean_ms + 1))
    }

    /// The time left of a `jitter(mean_ms)` pause seen from a random
    /// moment (density falling linearly from 2/(2 x mean) to 0): the first
    /// pause of a stream, so that sessions start as they will go on rather
    /// than all waiting a whole pause first.
    fn residual(&mut self, mean_ms: u64) -> Duration {
        let span = 2.0 * mean_ms as f64;
        Duration::from_secs_f64(span * (1.0 - (1.0 - self.unit()).sqrt()) / 1000.0)
    }
}

/// The byte stream of one direction of one session.
struct Stream {
    rng: Rng,
    word: [u8; 8],
    pos: usize,
}

impl Stream {
    fn new(session: u64, up: bool) -> Stream {
        Stream {
            rng: Rng(session.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ if up { 0x5550 } else { 0xD0D0 }),
            word: [0; 8],
            pos: 8,
        }
    }

    #[inline]
    fn byte(&mut self) -> u8 {
        if self.pos == 8 {
            self.word = self.rng.next().to_le_bytes();
            self.pos = 0;
        }
        let b = self.word[self.pos];
        self.pos += 1;
        b
    }
}

/// A running checksum (FNV-1a, 64 bits) of a direction's bytes.
#[inline]
fn sum(acc: u64, b: u8) -> u64 {
    (acc ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
}
const SUM0: u64 = 0xCBF2_9CE4_8422_2325;

// ---------------------------------------------------------------- worker: state

/// One session as both of its ends see it.
struct Session {
    id: u64,
    broker: usize,
    addr: Mutex<String>,
    /// Client to target: sent by the client, received by the target.
    up_sent: AtomicU64,
    up_recv: AtomicU64,
    up_sum_sent: AtomicU64,
    up_sum_recv: AtomicU64,
    /// Target to client.
    down_sent: AtomicU64,
    down_recv: AtomicU64,
    down_sum_sent: AtomicU64,
    down_sum_recv: AtomicU64,
    /// The target stopped sending (down_sent is final).
    down_done: AtomicBool,
    /// The client has sent its close frame: an end from here on is expected.
    closing: AtomicBool,
    /// The target saw the proxy's FIN after the close.
    target_eof: AtomicBool,
    /// Bytes differed from the stream (checksum failure).
    corrupt: AtomicBool,
    /// Client-to-server writes on their way: the stream offset just past
    /// each one's last byte, and when it was sent if it is being timed.
    inflight: Mutex<std::collections::VecDeque<(u64, Option<Instant>)>>,
    /// The first thing that went wrong.
    error: Mutex<Option<String>>,
}

impl Session {
    fn new(id: u64, broker: usize) -> Session {
        Session {
            id,
            broker,
            addr: Mutex::new(String::new()),
            up_sent: AtomicU64::new(0),
            up_recv: AtomicU64::new(0),
            up_sum_sent: AtomicU64::new(SUM0),
            up_sum_recv: AtomicU64::new(SUM0),
            down_sent: AtomicU64::new(0),
            down_recv: AtomicU64::new(0),
            down_sum_sent: AtomicU64::new(SUM0),
            down_sum_recv: AtomicU64::new(SUM0),
            down_done: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            target_eof: AtomicBool::new(false),
            corrupt: AtomicBool::new(false),
            inflight: Mutex::new(std::collections::VecDeque::new()),
            error: Mutex::new(None),
        }
    }

    fn fail(&self, why: String) {
        let mut e = self.error.lock().unwrap();
        if e.is_none() {
            if STATS.errors.fetch_add(1, Relaxed) < 20 {
                eprintln!("soak worker: session {}: {why}", self.id);
            }
            *e = Some(why);
        }
    }

    fn failed(&self) -> bool {
        self.error.lock().unwrap().is_some()
    }
}

#[derive(Default)]
struct Stats {
    opened: AtomicU64,
    refused: AtomicU64,
    retries: AtomicU64,
    live: AtomicU64,
    closed: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
    errors: AtomicU64,
}

static STATS: Stats = Stats {
    opened: AtomicU64::new(0),
    refused: AtomicU64::new(0),
    retries: AtomicU64::new(0),
    live: AtomicU64::new(0),
    closed: AtomicU64::new(0),
    up: AtomicU64::new(0),
    down: AtomicU64::new(0),
    errors: AtomicU64::new(0),
};

/// Bytes relayed per broker, [client to server, server to client].
static BROKER_BYTES: std::sync::OnceLock<Vec<[AtomicU64; 2]>> = std::sync::OnceLock::new();

fn count_bytes(broker: usize, up: bool, n: usize) {
    if let Some(b) = BROKER_BYTES.get().and_then(|v| v.get(broker)) {
        b[usize::from(!up)].fetch_add(n as u64, Relaxed);
    }
}

/// Whether client-to-server writes are being timed (the steady phase).
static MEASURING: AtomicBool = AtomicBool::new(false);
/// The latencies of the timed writes.
static LATENCY: Mutex<Hist> = Mutex::new(Hist::new());
/// How late a short sleep of the worker wakes up, over the same time: the
/// part of the latency that is this process's own scheduling.
static LAG: Mutex<Hist> = Mutex::new(Hist::new());
/// The sleep whose lateness is `LAG`.
const LAG_PROBE: Duration = Duration::from_millis(10);

/// Sleeps `LAG_PROBE` over and over and records how late it wakes while
/// the run is measuring.
async fn probe_lag() {
    loop {
        let t = Instant::now();
        tokio::time::sleep(LAG_PROBE).await;
        if MEASURING.load(Relaxed) {
            LAG.lock()
                .unwrap()
                .record(t.elapsed().saturating_sub(LAG_PROBE));
        }
    }
}

/// A histogram of durations in microseconds: exact below 128 µs, then 64
/// buckets per power of two (each at most 1/64 of its values wide). Two
/// histograms merge by adding their counts, so percentiles over many
/// processes come from all their samples.
#[derive(Clone, Debug, Default, PartialEq)]
struct Hist {
    counts: Vec<u64>,
    n: u64,
    max_us: u64,
}

impl Hist {
    const fn new() -> Hist {
        Hist {
            counts: Vec::new(),
            n: 0,
            max_us: 0,
        }
    }

    fn bucket(us: u64) -> usize {
        if us < 128 {
            return us as usize;
        }
        let e = 63 - us.leading_zeros() as usize; // 7 and up
        let sub = ((us >> (e - 6)) & 63) as usize;
        128 + (e - 7) * 64 + sub
    }

    /// The smallest and largest value of bucket `i`.
    fn bounds(i: usize) -> (u64, u64) {
        if i < 128 {
            return (i as u64, i as u64);
        }
        let e = (i - 128) / 64 + 7;
        let sub = ((i - 128) % 64) as u64;
        let lo = (64 + sub) << (e - 6);
        (lo, lo + (1u64 << (e - 6)) - 1)
    }

    fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = Hist::bucket(us);
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        self.n += 1;
        self.max_us = self.max_us.max(us);
    }

    fn merge(&mut self, other: &Hist) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.n += other.n;
        self.max_us = self.max_us.max(other.max_us);
    }

    /// The value at quantile `q` (0..1), in microseconds: the middle of
    /// the bucket holding the sample of that rank, never above the maximum.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = Hist::bounds(i);
                return Some(((lo + hi) as f64 / 2.0).min(self.max_us as f64));
            }
        }
        Some(self.max_us as f64)
    }

    /// `n=.. max=.. BUCKET:COUNT ...`, the non-empty buckets only.
    fn encode(&self) -> String {
        let mut s = format!("n={} max={}", self.n, self.max_us);
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 {
                s.push_str(&format!(" {i}:{c}"));
            }
        }
        s
    }

    fn decode(s: &str) -> Option<Hist> {
        let mut h = Hist::new();
        for f in s.split_whitespace() {
            if let Some(v) = f.strip_prefix("n=") {
                h.n = v.parse().ok()?;
            } else if let Some(v) = f.strip_prefix("max=") {
                h.max_us = v.parse().ok()?;
            } else {
                let (i, c) = f.split_once(':')?;
                let (i, c): (usize, u64) = (i.parse().ok()?, c.parse().ok()?);
                if i > 128 + 57 * 64 {
                    return None;
                }
                if h.counts.len() <= i {
                    h.counts.resize(i + 1, 0);
                }
                h.counts[i] += c;
            }
        }
        (h.counts.iter().sum::<u64>() == h.n).then_some(h)
    }
}

/// Hands out evenly spaced start times (opening and closing are paced).
struct Pacer {
    next: Mutex<tokio::time::Instant>,
    gap: Duration,
}

impl Pacer {
    fn new(per_sec: f64) -> Pacer {
        Pacer {
            next: Mutex::new(tokio::time::Instant::now()),
            gap: Duration::from_secs_f64(1.0 / per_sec),
        }
    }

    async fn wait(&self) {
        let at = {
            let mut next = self.next.lock().unwrap();
            let at = (*next).max(tokio::time::Instant::now());
            *next = at + self.gap;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

struct WorkerCfg {
    shape: Shape,
    stop: watch::Receiver<bool>,
}

/// Where one direction is in its pattern of writes.
enum Pace {
    /// Chunks of random size at random times.
    Random,
    /// Framebuffer updates (server to client); `left` more in this burst.
    Updates { left: u64 },
    /// Input events (client to server); `left` more in this cluster, which
    /// is typing (KeyEvents) or a mouse move (PointerEvents).
    Input { left: u64, key: bool },
}

/// An RFB PointerEvent and KeyEvent, in bytes.
const POINTER_EVENT: usize = 6;
const KEY_EVENT: usize = 8;

impl Pace {
    fn new(traffic: Traffic, up: bool) -> Pace {
        match (traffic, up) {
            (Traffic::Random, _) => Pace::Random,
            (Traffic::Vnc, false) => Pace::Updates { left: 0 },
            (Traffic::Vnc, true) => Pace::Input {
                left: 0,
                key: false,
            },
        }
    }

    /// The mean pause between bursts, clusters or chunks, in ms.
    fn mean_gap(&self, sh: &Shape) -> u64 {
        match self {
            Pace::Random => sh.interval_ms,
            Pace::Updates { .. } => sh.update_every_ms,
            Pace::Input { .. } => sh.input_every_ms,
        }
    }

    /// The pause before the next write, and its size.
    fn next(&mut self, sh: &Shape, rng: &mut Rng) -> (Duration, usize) {
        match self {
            Pace::Random => (rng.jitter(sh.interval_ms), rng.chunk(sh.max_chunk)),
            Pace::Updates { left } => {
                let pause = if *left == 0 {
                    *left = 1 + rng.below(sh.burst_updates);
                    rng.jitter(sh.update_every_ms)
                } else {
                    // The next update of the burst follows the client's
                    // next request: a round trip later.
                    rng.ms_between(1, 10)
                };
                *left -= 1;
                (pause, rng.log_uniform(sh.update_min, sh.update_max))
            }
            Pace::Input { left, key } => {
                let pause = if *left == 0 {
                    *left = 1 + rng.below(sh.input_cluster);
                    *key = rng.below(2) == 0;
                    rng.jitter(sh.input_every_ms)
                } else if *key {
                    rng.ms_between(40, 160)
                } else {
                    rng.ms_between(8, 25)
                };
                *left -= 1;
                (pause, if *key { KEY_EVENT } else { POINTER_EVENT })
            }
        }
    }
}

/// One direction's sending side: its stream, the running checksum of what
/// it has handed out, and the chunk being sent.
struct Outgoing {
    stream: Stream,
    pace: Pace,
    /// Nothing sent yet.
    first: bool,
    acc: u64,
    chunk: Vec<u8>,
    stop: watch::Receiver<bool>,
}

impl Outgoing {
    fn new(session: u64, up: bool, cfg: &WorkerCfg) -> Outgoing {
        Outgoing {
            stream: Stream::new(session, up),
            pace: Pace::new(cfg.shape.traffic, up),
            first: true,
            acc: SUM0,
            chunk: Vec::with_capacity(cfg.shape.largest_write(up)),
            stop: cfg.stop.clone(),
        }
    }

    /// After the pause its pattern asks for, the next write of the stream;
    /// `None` once the run says stop.
    async fn next(&mut self, cfg: &WorkerCfg, rng: &mut Rng) -> Option<&[u8]> {
        let (mut pause, n) = self.pace.next(&cfg.shape, rng);
        if std::mem::take(&mut self.first) {
            pause = rng.residual(self.pace.mean_gap(&cfg.shape));
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stopped(&mut self.stop) => return None,
        }
        self.chunk.clear();
        for _ in 0..n {
            let b = self.stream.byte();
            self.acc = sum(self.acc, b);
            self.chunk.push(b);
        }
        Some(&self.chunk)
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

// ---------------------------------------------------------------- worker: target side

/// Accepts the proxy's connections; each starts with a session number.
async fn run_target(
    listener: TcpListener,
    first: u64,
    sessions: Arc<Vec<Arc<Session>>>,
    cfg: Arc<WorkerCfg>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (sessions, cfg) = (Arc::clone(&sessions), Arc::clone(&cfg));
        tokio::spawn(async move {
            if let Err(e) = target_conn(tcp, first, &sessions, &cfg).await {
                eprintln!("soak worker: target connection: {e:#}");
                STATS.errors.fetch_add(1, Relaxed);
            }
        });
    }
}

async fn target_conn(
    mut tcp: TcpStream,
    first: u64,
    sessions: &[Arc<Session>],
    cfg: &Arc<WorkerCfg>,
) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let mut head = [0u8; 8];
    tcp.read_exact(&mut head)
        .await
        .context("reading the session number")?;
    let id = u64::from_be_bytes(head);
    let s = Arc::clone(
        id.checked_sub(first)
            .and_then(|i| sessions.get(i as usize))
            .with_context(|| format!("unknown session {id}"))?,
    );
    tcp.write_all(&head)
        .await
        .context("echoing the session number")?;
    let (mut rd, wr) = tcp.into_split();
    let sender = tokio::spawn(target_send(Arc::clone(&s), wr, Arc::clone(cfg)));

    // The client's stream, checked byte by byte.
    let mut expect = Stream::new(s.id, true);
    let mut acc = SUM0;
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => {
                if s.closing.load(Relaxed) {
                    s.target_eof.store(true, Relaxed);
                } else {
                    s.fail("the proxy closed the VNC server's connection mid-session".into());
                }
                break;
            }
            Ok(n) => n,
            Err(e) => {
                s.fail(format!("VNC server side read error: {e}"));
                break;
            }
        };
        let base = s.up_recv.load(Relaxed);
        for (i, &b) in buf[..n].iter().enumerate() {
            if b != expect.byte() && !s.corrupt.swap(true, Relaxed) {
                s.fail(format!("client-to-server byte {} differs", base + i as u64));
            }
            acc = sum(acc, b);
        }
        s.up_sum_recv.store(acc, Relaxed);
        s.up_recv.fetch_add(n as u64, Relaxed);
        STATS.up.fetch_add(n as u64, Relaxed);
        count_bytes(s.broker, true, n);
        // The writes whose last byte has now arrived.
        let now = Instant::now();
        let got = base + n as u64;
        let mut inflight = s.inflight.lock().unwrap();
        while let Some(&(end, sent)) = inflight.front() {
            if end > got {
                break;
            }
            inflight.pop_front();
            if let Some(t) = sent {
                LATENCY.lock().unwrap().record(now - t);
            }
        }
    }
    // Keep the write half until the end: dropping it would send a FIN.
    sender.abort();
    let _ = sender.await;
    Ok(())
}

async fn target_send(s: Arc<Session>, mut wr: OwnedWriteHalf, cfg: Arc<WorkerCfg>) {
    let mut rng = Rng(s.id ^ 0x7A76_6574);
    let mut out = Outgoing::new(s.id, false, &cfg);
    while let Some(chunk) = out.next(&cfg, &mut rng).await {
        let n = chunk.len();
        if let Err(e) = wr.write_all(chunk).await {
            if !s.closing.load(Relaxed) {
                s.fail(format!("VNC server side write error: {e}"));
            }
            break;
        }
        s.down_sent.fetch_add(n as u64, Relaxed);
        s.down_sum_sent.store(out.acc, Relaxed);
    }
    s.down_done.store(true, Relaxed);
    // Hold the connection open until the session ends (the task is then
    // aborted): dropping the write half would send a FIN.
    let _keep = wr;
    std::future::pending::<()>().await;
}

// ---------------------------------------------------------------- worker: client side

/// Frames from the server, over the read half of the WebSocket.
type FrameReader = frames::FrameReader<OwnedReadHalf>;

/// A masked client frame, with a mask from `rng`.
fn frame(opcode: u8, payload: &[u8], rng: &mut Rng) -> Vec<u8> {
    frames::frame(opcode, payload, (rng.next() as u32).to_be_bytes())
}

type SharedWriter = Arc<tokio::sync::Mutex<OwnedWriteHalf>>;

/// Why an attempt to open a session did not work.
enum OpenError {
    /// Worth another try (store busy, connection trouble).
    Retry(String),
    Fatal(String),
}

/// Upgrades, sends the session number and waits for its echo.
async fn open_once(
    broker: SocketAddr,
    token: &str,
    id: u64,
    rng: &mut Rng,
) -> Result<(FrameReader, OwnedWriteHalf, String), OpenError> {
    let retry = |e: std::io::Error| OpenError::Retry(e.to_string());
    let (mut fr, mut wr) = match frames::connect(broker, token, 8192).await {
        Ok(v) => v,
        Err(FrameError::HeadTooLong) => {
            return Err(OpenError::Fatal("upgrade response too long".into()));
        }
        Err(FrameError::Refused(head)) => {
            return Err(
                if head.starts_with("HTTP/1.1 503") || head.starts_with("HTTP/1.1 429") {
                    OpenError::Retry(head)
                } else {
                    OpenError::Fatal(format!("upgrade refused: {head}"))
                },
            );
        }
        Err(e) => return Err(OpenError::Retry(e.to_string())),
    };
    let addr = wr.local_addr().map_err(retry)?.to_string();
    wr.write_all(&frame(2, &id.to_be_bytes(), rng))
        .await
        .map_err(retry)?;
    let mut echo = Vec::new();
    while echo.len() < HEADER as usize {
        match fr.next().await {
            Ok(Ev::Data(s, e)) => {
                // The target's stream may follow in the same frame: take
                // the header only and leave the rest for the reader.
                let take = (e - s).min(HEADER as usize - echo.len());
                echo.extend_from_slice(&fr.buf[s..s + take]);
                fr.unread(e - s - take);
            }
            Ok(Ev::Ping(p)) => wr.write_all(&frame(10, &p, rng)).await.map_err(retry)?,
            Ok(Ev::Close(code, reason)) => {
                let why = format!("refused with {code} {reason:?}");
                return Err(if matches!(code, 4502 | 4503 | 4429 | 1001) {
                    OpenError::Retry(why)
                } else {
                    OpenError::Fatal(why)
                });
            }
            Ok(Ev::Eof) => {
                return Err(OpenError::Retry("closed before the session started".into()));
            }
            Err(e) => return Err(OpenError::Retry(format!("{e:#}"))),
        }
    }
    if echo != id.to_be_bytes() {
        return Err(OpenError::Fatal(format!(
            "session {id}: the session number came back as {echo:?}"
        )));
    }
    Ok((fr, wr, addr))
}

/// One session's client: open, send at random until told to stop, drain,
/// close with a close frame and check the proxy's and target's ends.
async fn run_session(
    s: Arc<Session>,
    broker: SocketAddr,
    token: Arc<str>,
    cfg: Arc<WorkerCfg>,
    opening: Arc<Pacer>,
    closing: Arc<Pacer>,
) {
    let mut rng = Rng(s.id ^ 0x00C1_1E47);
    opening.wait().await;
    let mut attempt = 0u32;
    let (fr, wr, addr) = loop {
        match open_once(broker, &token, s.id, &mut rng).await {
            Ok(v) => break v,
            Err(OpenError::Retry(why)) if attempt < 10 => {
                attempt += 1;
                STATS.retries.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
                let _ = why;
            }
            Err(OpenError::Retry(why)) | Err(OpenError::Fatal(why)) => {
                STATS.refused.fetch_add(1, Relaxed);
                s.fail(format!("could not open: {why}"));
                return;
            }
        }
    };
    *s.addr.lock().unwrap() = addr;
    STATS.opened.fetch_add(1, Relaxed);
    STATS.live.fetch_add(1, Relaxed);
    let wr: SharedWriter = Arc::new(tokio::sync::Mutex::new(wr));
    let reader = tokio::spawn(client_read(Arc::clone(&s), fr, Arc::clone(&wr)));

    // Send until told to stop (or the session broke).
    let mut out = Outgoing::new(s.id, true, &cfg);
    while !s.failed() {
        let Some(chunk) = out.next(&cfg, &mut rng).await else {
            break;
        };
        let n = chunk.len();
        let f = frame(2, chunk, &mut rng);
        let mut w = wr.lock().await;
        // Timed from here to the target's read of its last byte.
        let sent = MEASURING.load(Relaxed).then(Instant::now);
        let end = s.up_sent.load(Relaxed) + n as u64;
        s.inflight.lock().unwrap().push_back((end, sent));
        let result = w.write_all(&f).await;
        drop(w);
        if let Err(e) = result {
            s.fail(format!("client write error: {e}"));
            break;
        }
        s.up_sent.fetch_add(n as u64, Relaxed);
        s.up_sum_sent.store(out.acc, Relaxed);
    }
    stopped(&mut out.stop).await;

    // Drain: everything sent either way has to arrive.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let up_ok = s.up_recv.load(Relaxed) == s.up_sent.load(Relaxed);
        let down_ok =
            s.down_done.load(Relaxed) && s.down_recv.load(Relaxed) == s.down_sent.load(Relaxed);
        if (up_ok && down_ok) || s.failed() {
            break;
        }
        if Instant::now() > deadline {
            s.fail(format!(
                "not drained after 120 s: client-to-server {}/{}, server-to-client {}/{}",
                s.up_recv.load(Relaxed),
                s.up_sent.load(Relaxed),
                s.down_recv.load(Relaxed),
                s.down_sent.load(Relaxed)
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !s.failed() {
        if s.up_sum_sent.load(Relaxed) != s.up_sum_recv.load(Relaxed)
            && !s.corrupt.swap(true, Relaxed)
        {
            s.fail("client-to-server checksum differs".into());
        }
        if s.down_sum_sent.load(Relaxed) != s.down_sum_recv.load(Relaxed)
            && !s.corrupt.swap(true, Relaxed)
        {
            s.fail("server-to-client checksum differs".into());
        }
    }

    // Close: a close frame, the proxy's close frame and FIN back, and the
    // proxy's FIN at the target.
    closing.wait().await;
    s.closing.store(true, Relaxed);
    let close = frame(8, &1000u16.to_be_bytes(), &mut rng);
    let _ = wr.lock().await.write_all(&close).await;
    match tokio::time::timeout(Duration::from_secs(60), reader).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => s.fail(format!("reader task: {e}")),
        Err(_) => s.fail("no close frame and FIN from the proxy within 60 s".into()),
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !s.target_eof.load(Relaxed) && !s.failed() {
        if Instant::now() > deadline {
            s.fail("the proxy did not close the VNC server's connection within 60 s".into());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(wr);
    STATS.live.fetch_sub(1, Relaxed);
    STATS.closed.fetch_add(1, Relaxed);
}

/// Checks the target's stream, answers pings, and expects the proxy's close
/// only after ours.
async fn client_read(s: Arc<Session>, mut fr: FrameReader, wr: SharedWriter) {
    let mut expect = Stream::new(s.id, false);
    let mut acc = SUM0;
    let mut rng = Rng(s.id ^ 0x9E4D);
    let mut got_close = false;
    loop {
        let ev = match fr.next().await {
            Ok(ev) => ev,
            Err(e) => {
                if !s.closing.load(Relaxed) || !got_close {
                    s.fail(format!("client read error: {e:#}"));
                }
                return;
            }
        };
        match ev {
            Ev::Data(a, b) => {
                if got_close {
                    s.fail("data after the close frame".into());
                    return;
                }
                let base = s.down_recv.load(Relaxed);
                for (i, &x) in fr.buf[a..b].iter().enumerate() {
                    if x != expect.byte() && !s.corrupt.swap(true, Relaxed) {
                        s.fail(format!("server-to-client byte {} differs", base + i as u64));
                    }
                    acc = sum(acc, x);
                }
                s.down_sum_recv.store(acc, Relaxed);
                s.down_recv.fetch_add((b - a) as u64, Relaxed);
                STATS.down.fetch_add((b - a) as u64, Relaxed);
                count_bytes(s.broker, false, b - a);
            }
            Ev::Ping(p) => {
                let pong = frame(10, &p, &mut rng);
                let _ = wr.lock().await.write_all(&pong).await;
            }
            Ev::Close(code, reason) => {
                if !s.closing.load(Relaxed) {
                    s.fail(format!("the proxy ended the session: {code} {reason:?}"));
                    return;
                }
                if (code, reason.as_str()) != (1000, "client closed") {
                    s.fail(format!(
                        "closed with {code} {reason:?}, expected 1000 \"client closed\""
                    ));
                }
                got_close = true;
            }
            Ev::Eof => {
                if !got_close {
                    s.fail("the connection ended without a close frame".into());
                }
                return;
            }
        }
    }
}

// ---------------------------------------------------------------- worker: main

struct WorkerArgs {
    first: u64,
    count: usize,
    brokers: Vec<SocketAddr>,
    shape: Shape,
    open_rate: f64,
    results: PathBuf,
}

fn parse_worker(mut args: impl Iterator<Item = String>) -> anyhow::Result<WorkerArgs> {
    let mut w = WorkerArgs {
        first: 0,
        count: 0,
        brokers: Vec::new(),
        shape: Shape::default(),
        open_rate: 100.0,
        results: PathBuf::new(),
    };
    while let Some(a) = args.next() {
        let v = args.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--first" => w.first = v.parse()?,
            "--count" => w.count = v.parse()?,
            "--brokers" => w.brokers = v.split(',').map(|b| b.parse()).collect::<Result<_, _>>()?,
            "--open-rate" => w.open_rate = v.parse()?,
            "--results" => w.results = v.into(),
            other => {
                if !w.shape.set(other, &v)? {
                    bail!("worker: unknown argument {other:?}");
                }
            }
        }
    }
    Ok(w)
}

fn stats_line() -> String {
    let mut per_broker = String::new();
    for (i, b) in BROKER_BYTES.get().into_iter().flatten().enumerate() {
        per_broker.push_str(&format!(
            " up.{i}={} down.{i}={}",
            b[0].load(Relaxed),
            b[1].load(Relaxed)
        ));
    }
    format!(
        "stats opened={} refused={} retries={} live={} closed={} up={} down={} errors={}{per_broker}",
        STATS.opened.load(Relaxed),
        STATS.refused.load(Relaxed),
        STATS.retries.load(Relaxed),
        STATS.live.load(Relaxed),
        STATS.closed.load(Relaxed),
        STATS.up.load(Relaxed),
        STATS.down.load(Relaxed),
        STATS.errors.load(Relaxed),
    )
}

fn latency_lines() -> [String; 2] {
    [
        format!("latency {}", LATENCY.lock().unwrap().encode()),
        format!("lag {}", LAG.lock().unwrap().encode()),
    ]
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    say(&format!("target {}", listener.local_addr()?.port()));
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let token: Arc<str> = match stdin.next_line().await? {
        Some(l) if l.starts_with("token ") => l["token ".len()..].trim().into(),
        other => bail!("expected a token line, got {other:?}"),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let cfg = Arc::new(WorkerCfg {
        shape: args.shape.clone(),
        stop: stop_rx,
    });
    let _ = BROKER_BYTES.set(
        (0..args.brokers.len())
            .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
            .collect(),
    );
    let sessions: Vec<Arc<Session>> = (0..args.count)
        .map(|i| {
            let global = args.first + i as u64;
            Arc::new(Session::new(
                global,
                (global % args.brokers.len() as u64) as usize,
            ))
        })
        .collect();
    let sessions = Arc::new(sessions);
    tokio::spawn(probe_lag());
    tokio::spawn(run_target(
        listener,
        args.first,
        Arc::clone(&sessions),
        Arc::clone(&cfg),
    ));
    let opening = Arc::new(Pacer::new(args.open_rate));
    let closing = Arc::new(Pacer::new(args.open_rate));
    let mut tasks = Vec::new();
    for s in sessions.iter() {
        tasks.push(tokio::spawn(run_session(
            Arc::clone(s),
            args.brokers[s.broker],
            Arc::clone(&token),
            Arc::clone(&cfg),
            Arc::clone(&opening),
            Arc::clone(&closing),
        )));
    }
    // Ready once every session is open (or has given up).
    let mut ready = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_stats = Instant::now();
    let stop_line = loop {
        tokio::select! {
            _ = tick.tick() => {
                let settled = STATS.opened.load(Relaxed) + STATS.refused.load(Relaxed);
                if !ready && settled == args.count as u64 {
                    ready = true;
                    say(&format!("ready opened={} refused={}", STATS.opened.load(Relaxed), STATS.refused.load(Relaxed)));
                }
                if last_stats.elapsed() >= STATS_EVERY {
                    last_stats = Instant::now();
                    say(&stats_line());
                }
            }
            line = stdin.next_line() => match line? {
                Some(l) if l.trim() == "stop" => break l,
                Some(l) if l.trim() == "stats" => say(&stats_line()),
                // The steady phase: time the writes from now on.
                Some(l) if l.trim() == "measure start" => {
                    *LATENCY.lock().unwrap() = Hist::new();
                    *LAG.lock().unwrap() = Hist::new();
                    MEASURING.store(true, Relaxed);
                }
                Some(l) if l.trim() == "measure stop" => MEASURING.store(false, Relaxed),
                Some(_) => {}
                // The orchestrator is gone: so are we.
                None => std::process::exit(3),
            }
        }
    };
    let _ = stop_line;
    MEASURING.store(false, Relaxed);
    let _ = stop_tx.send(true);
    let mut all = futures_join(tasks);
    loop {
        tokio::select! {
            _ = &mut all => break,
            _ = tick.tick() => {
                if last_stats.elapsed() >= STATS_EVERY {
                    last_stats = Instant::now();
                    say(&stats_line());
                }
            }
            line = stdin.next_line() => if let Ok(None) = line { std::process::exit(3) },
        }
    }

    // Results, one JSON object per session.
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args.results)?);
    let mut corrupt = 0u64;
    let mut failed = 0u64;
    for s in sessions.iter() {
        let error = s.error.lock().unwrap().clone();
        corrupt += u64::from(s.corrupt.load(Relaxed));
        failed += u64::from(error.is_some());
        let v = json!({
            "session": s.id,
            "broker": s.broker,
            "addr": *s.addr.lock().unwrap(),
            "to_server": HEADER + s.up_sent.load(Relaxed),
            "to_client": HEADER + s.down_sent.load(Relaxed),
            "to_server_received": HEADER + s.up_recv.load(Relaxed),
            "to_client_received": HEADER + s.down_recv.load(Relaxed),
            "corrupt": s.corrupt.load(Relaxed),
            "error": error,
        });
        writeln!(out, "{v}")?;
    }
    out.flush()?;
    say(&stats_line());
    // Every timed write has arrived (or its session failed) by now.
    for l in latency_lines() {
        say(&l);
    }
    say(&format!("done failed={failed} corrupt={corrupt}"));
    Ok(())
}

/// Awaits every task (a join_all without the futures crate).
fn futures_join(
    tasks: Vec<tokio::task::JoinHandle<()>>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        for t in tasks {
            let _ = t.await;
        }
    })
}

// ---------------------------------------------------------------- orchestrator: processes

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Clock ticks per second, the unit of /proc/PID/stat's CPU times
/// (`getconf CLK_TCK`; 100 if that does not answer).
fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// CPU time (user + system) of a process so far, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / clk_tck()
}

fn nofile_soft_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

fn run_cli(
    bin: &Path,
    db: &str,
    cfg: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    testkit::broker::cli(bin, Some(cfg), db, None, args, stdin).map_err(anyhow::Error::msg)
}

struct BrokerProc {
    name: String,
    child: std::process::Child,
    pid: u32,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_broker(
    bin: &Path,
    db: &str,
    cfg: &Path,
    dir: &Path,
    name: &str,
) -> anyhow::Result<BrokerProc> {
    let log = dir.join(format!("{name}.log"));
    let mut cmd = std::process::Command::new(bin);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database",
        db,
        "--node-name",
        name,
    ])
    .arg("--config")
    .arg(cfg)
    .env_remove("RUST_LOG")
    .stderr(Stdio::from(std::fs::File::create(&log)?));
    let log_path = log.clone();
    let (child, addr) = tokio::task::spawn_blocking(move || {
        testkit::broker::spawn_serve(&mut cmd, &log_path, Duration::from_secs(30))
    })
    .await?
    .map_err(anyhow::Error::msg)?;
    Ok(BrokerProc {
        name: name.to_owned(),
        pid: child.id(),
        child,
        addr,
        log,
    })
}

/// What a worker last said.
#[derive(Default, Clone)]
struct WorkerState {
    target: Option<u16>,
    ready: Option<String>,
    stats: HashMap<String, u64>,
    latency: Option<Hist>,
    lag: Option<Hist>,
    done: Option<String>,
}

struct WorkerProc {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    state: Arc<Mutex<WorkerState>>,
    results: PathBuf,
    count: usize,
    pid: u32,
}

async fn start_worker(
    me: &Path,
    first: u64,
    count: usize,
    brokers: &[SocketAddr],
    o: &Opts,
    open_rate: f64,
    results: PathBuf,
) -> anyhow::Result<WorkerProc> {
    let list: Vec<String> = brokers.iter().map(|b| b.to_string()).collect();
    let mut child = tokio::process::Command::new(me)
        .arg("--worker")
        .args(["--first", &first.to_string(), "--count", &count.to_string()])
        .args(["--brokers", &list.join(",")])
        .args(o.shape.args())
        .args(["--open-rate", &open_rate.to_string()])
        .arg("--results")
        .arg(&results)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let stdin = child.stdin.take().context("worker stdin")?;
    let pid = child.id().context("worker pid")?;
    let state = Arc::new(Mutex::new(WorkerState::default()));
    let st = Arc::clone(&state);
    let mut lines = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut s = st.lock().unwrap();
            if let Some(p) = line.strip_prefix("target ") {
                s.target = p.trim().parse().ok();
            } else if let Some(r) = line.strip_prefix("ready ") {
                s.ready = Some(r.to_owned());
            } else if let Some(r) = line.strip_prefix("stats ") {
                s.stats = r
                    .split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
                    .collect();
            } else if let Some(r) = line.strip_prefix("latency ") {
                s.latency = Hist::decode(r);
            } else if let Some(r) = line.strip_prefix("lag ") {
                s.lag = Hist::decode(r);
            } else if let Some(r) = line.strip_prefix("done ") {
                s.done = Some(r.to_owned());
            }
        }
    });
    Ok(WorkerProc {
        child,
        stdin,
        state,
        results,
        count,
        pid,
    })
}

async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        anyhow::Ok(String::from_utf8_lossy(&raw).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .context("HTTP timeout")?
}

async fn sessions_active(addr: SocketAddr) -> Option<u64> {
    let text = http_get(addr, "/metrics").await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("vncbroker_sessions_active "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

// ---------------------------------------------------------------- orchestrator: run

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    Ramp,
    Steady,
    Close,
    After,
}

struct Sample {
    t: Duration,
    phase: Phase,
    rss: Vec<u64>,
    fds: Vec<usize>,
    active: Vec<Option<u64>>,
    cpu: Vec<f64>,
    /// The workers' CPU seconds so far, all together.
    worker_cpu: f64,
    /// Bytes relayed so far, as the workers last reported: in all, and per
    /// broker (client to server, server to client).
    up: u64,
    down: u64,
    node_bytes: Vec<(u64, u64)>,
}

struct Run {
    o: Opts,
    dir: tempfile::TempDir,
    brokers: Vec<BrokerProc>,
    workers: Vec<WorkerProc>,
    samples: Vec<Sample>,
    started: Instant,
    problems: Vec<String>,
    /// The machine's load averages (1, 5, 15 min) as the run began.
    load_start: Option<String>,
}

impl Run {
    async fn sample(&mut self, phase: Phase) {
        let mut s = Sample {
            t: self.started.elapsed(),
            phase,
            rss: Vec::new(),
            fds: Vec::new(),
            active: Vec::new(),
            cpu: Vec::new(),
            worker_cpu: self.workers.iter().map(|w| cpu_secs(w.pid)).sum(),
            up: 0,
            down: 0,
            node_bytes: Vec::new(),
        };
        for b in &self.brokers {
            s.rss.push(rss_bytes(b.pid));
            s.fds.push(fd_count(b.pid));
            s.active.push(sessions_active(b.addr).await);
            s.cpu.push(cpu_secs(b.pid));
        }
        let agg = |k: &str| -> u64 {
            self.workers
                .iter()
                .map(|w| w.state.lock().unwrap().stats.get(k).copied().unwrap_or(0))
                .sum()
        };
        s.up = agg("up");
        s.down = agg("down");
        s.node_bytes = (0..self.brokers.len())
            .map(|i| (agg(&format!("up.{i}")), agg(&format!("down.{i}"))))
            .collect();
        let mut line = format!(
            "[{:>6.0}s {:<6}] live {:>6} | client->server {:>10} | server->client {:>10} | errors {}",
            s.t.as_secs_f64(),
            format!("{phase:?}").to_lowercase(),
            agg("live"),
            mib(agg("up")),
            mib(agg("down")),
            agg("errors"),
        );
        let prev = self.samples.last();
        for (i, b) in self.brokers.iter().enumerate() {
            let cpu = prev
                .map(|p| {
                    let dt = (s.t - p.t).as_secs_f64();
                    if dt > 0.5 {
                        format!("{:.0}%", (s.cpu[i] - p.cpu[i]) / dt * 100.0)
                    } else {
                        "-".into()
                    }
                })
                .unwrap_or_else(|| "-".into());
            line.push_str(&format!(
                " | {} RSS {} fds {} active {} cpu {}",
                b.name,
                mib(s.rss[i]),
                s.fds[i],
                s.active[i].map_or("?".into(), |a| a.to_string()),
                cpu
            ));
        }
        if let Some(p) = prev {
            let dt = (s.t - p.t).as_secs_f64();
            if dt > 0.5 {
                line.push_str(&format!(
                    " | clients cpu {:.0}%",
                    (s.worker_cpu - p.worker_cpu) / dt * 100.0
                ));
            }
        }
        println!("{line}");
        self.samples.push(s);
    }

    /// Problems with the processes: any that exited.
    fn check_alive(&mut self) -> bool {
        let mut ok = true;
        for b in &mut self.brokers {
            if let Ok(Some(st)) = b.child.try_wait() {
                self.problems.push(format!(
                    "broker {} exited: {st} (log {})",
                    b.name,
                    b.log.display()
                ));
                ok = false;
            }
        }
        for (i, w) in self.workers.iter_mut().enumerate() {
            if let Ok(Some(st)) = w.child.try_wait()
                && w.state.lock().unwrap().done.is_none()
            {
                self.problems.push(format!("worker {i} exited early: {st}"));
                ok = false;
            }
        }
        ok
    }

    /// Samples every 10 s until `until` holds or `limit` passes; false on a
    /// dead process or a timeout.
    async fn phase(
        &mut self,
        phase: Phase,
        limit: Duration,
        until: impl Fn(&Run) -> bool,
        interrupt: &mut watch::Receiver<bool>,
    ) -> bool {
        let end = Instant::now() + limit;
        let mut next = Instant::now();
        loop {
            if *interrupt.borrow() {
                self.problems.push("interrupted".into());
                return false;
            }
            if !self.check_alive() {
                return false;
            }
            if until(self) {
                return true;
            }
            if Instant::now() >= next {
                self.sample(phase).await;
                next += SAMPLE_EVERY;
            }
            if Instant::now() >= end {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = interrupt.changed() => {}
            }
        }
    }

    async fn stop_all(&mut self) {
        for w in &mut self.workers {
            let _ = w.child.start_kill();
            let _ = w.child.wait().await;
        }
        // All asked at once, then each given the rest of 40 s to drain.
        for b in &self.brokers {
            testkit::process::signal(&b.pid.to_string(), "-TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(40);
        for b in &mut self.brokers {
            let grace = deadline.saturating_duration_since(Instant::now());
            testkit::process::stop_child(&mut b.child, grace);
        }
    }
}

async fn orchestrate(o: Opts) -> anyhow::Result<bool> {
    let per_broker = o.sessions.div_ceil(o.brokers);
    if per_broker * 2 + 100 > FD_BUDGET {
        bail!(
            "{per_broker} sessions per broker need {} fds, over the {FD_BUDGET} budget: use more --brokers",
            per_broker * 2 + 100
        );
    }
    if o.per_worker * 2 + 100 > FD_BUDGET {
        bail!("--per-worker {} needs too many fds", o.per_worker);
    }
    let need = (per_broker.max(o.per_worker) * 2 + 100) as u64;
    match nofile_soft_limit() {
        Some(l) if l < need => bail!(
            "the open-files limit is {l}, {need} needed: run through scripts/soak, or `ulimit -n $(ulimit -Hn)` first"
        ),
        _ => {}
    }
    if !o.broker.is_file() {
        bail!(
            "no broker binary at {} (build it, or pass --broker)",
            o.broker.display()
        );
    }
    let me = std::env::current_exe()?;
    let dir = tempfile::Builder::new()
        .prefix("vncbroker-soak-")
        .tempdir()?;
    let db = format!("sqlite://{}", dir.path().join("soak.db").display());
    let cfg = dir.path().join("soak.toml");
    std::fs::write(
        &cfg,
        // Every client runs on this host: one address, so no failure
        // budget and no connection cap per address.
        "[log]\nlevel = \"warn\"\n[tokens]\nmax_ttl = 86400\npurge_interval = 60\n\
         [http]\nfailures_per_minute = 0\nmax_connections_per_address = 0\n",
    )?;
    run_cli(
        &o.broker,
        &db,
        &cfg,
        &["user", "add", "soak", "--admin", "--password-stdin"],
        Some("soak-Pw-7tQ2xLmV"),
    )?;

    let workers_n = o.sessions.div_ceil(o.per_worker);
    println!(
        "soak: {} sessions over {} brokers and {} client processes, {} min steady",
        o.sessions, o.brokers, workers_n, o.minutes
    );
    println!(
        "soak: {}; about {:.1} MiB/s server to client in all",
        o.shape.describe(),
        o.shape.down_per_session() * o.sessions as f64 / 1048576.0
    );
    println!("soak: working directory {}", dir.path().display());

    let mut run = Run {
        o: o.clone(),
        dir,
        brokers: Vec::new(),
        workers: Vec::new(),
        samples: Vec::new(),
        started: Instant::now(),
        problems: Vec::new(),
        load_start: load_average(),
    };
    let (int_tx, mut interrupt) = watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("soak: interrupted, cleaning up");
        let _ = int_tx.send(true);
    });

    let result = drive(&mut run, &me, &db, &cfg, &mut interrupt).await;
    if let Err(e) = &result {
        run.problems.push(format!("{e:#}"));
    }
    run.stop_all().await;
    let ok = run.problems.is_empty();
    for p in &run.problems {
        println!("PROBLEM: {p}");
    }
    if ok && !o.keep {
        let _ = run.dir.close();
    } else {
        let kept = run.dir.keep();
        println!("soak: logs and database kept in {}", kept.display());
    }
    Ok(ok)
}

async fn drive(
    run: &mut Run,
    me: &Path,
    db: &str,
    cfg: &Path,
    interrupt: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let o = run.o.clone();
    for i in 0..o.brokers {
        let b = start_broker(
            &o.broker,
            db,
            cfg,
            run.dir.path(),
            &format!("soak-{}", i + 1),
        )
        .await?;
        println!("soak: broker {} pid {} on {}", b.name, b.pid, b.addr);
        run.brokers.push(b);
    }
    let addrs: Vec<SocketAddr> = run.brokers.iter().map(|b| b.addr).collect();
    let workers_n = o.sessions.div_ceil(o.per_worker);
    let open_rate = o.ramp_rate / workers_n as f64;
    let mut first = 0usize;
    for i in 0..workers_n {
        let count = o.per_worker.min(o.sessions - first);
        let results = run.dir.path().join(format!("worker-{i}.jsonl"));
        let w = start_worker(me, first as u64, count, &addrs, &o, open_rate, results).await?;
        run.workers.push(w);
        first += count;
    }
    // The brokers at rest, before any session: past their start-up work
    // (a broker makes its dummy password hash, about 19 MiB of argon2
    // memory, on a thread of its own), once RSS holds still for 0.5 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last: Vec<u64> = run.brokers.iter().map(|b| rss_bytes(b.pid)).collect();
    let mut still_since = Instant::now();
    while Instant::now() < deadline && still_since.elapsed() < Duration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now: Vec<u64> = run.brokers.iter().map(|b| rss_bytes(b.pid)).collect();
        if now != last {
            still_since = Instant::now();
            last = now;
        }
    }
    run.sample(Phase::Idle).await;
    let idle_fds: Vec<usize> = run.samples[0].fds.clone();
    // Each worker's target becomes a VM with a reusable token.
    for (i, w) in run.workers.iter_mut().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(p) = w.state.lock().unwrap().target {
                break p;
            }
            if Instant::now() > deadline {
                bail!("worker {i} did not report its target port");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let vm = (i + 1).to_string();
        run_cli(
            &o.broker,
            db,
            cfg,
            &testkit::broker::vm_add_args(&vm, &port.to_string(), "soak"),
            None,
        )?;
        let minted = run_cli(
            &o.broker,
            db,
            cfg,
            &["token", "mint", &vm, "--ttl", "86400"],
            None,
        )?;
        let v: serde_json::Value = serde_json::from_str(&minted)?;
        let token = v["token"].as_str().context("no token in the mint output")?;
        w.stdin
            .write_all(format!("token {token}\n").as_bytes())
            .await?;
    }
    let ramp_limit = Duration::from_secs_f64(o.sessions as f64 / o.ramp_rate * 3.0 + 120.0);
    let ramp_start = Instant::now();
    let all_ready = |r: &Run| {
        r.workers
            .iter()
            .all(|w| w.state.lock().unwrap().ready.is_some())
    };
    if !run
        .phase(Phase::Ramp, ramp_limit, all_ready, interrupt)
        .await
    {
        bail!("not every session opened within {ramp_limit:?}");
    }
    println!(
        "soak: all sessions settled after {:.1} s",
        ramp_start.elapsed().as_secs_f64()
    );
    // Fresh worker counters for the first steady sample, which the phase
    // takes at once.
    tokio::time::sleep(STATS_EVERY + Duration::from_millis(200)).await;
    let steady_from = run.samples.len();

    let steady = Duration::from_secs_f64(o.minutes * 60.0);
    let steady_start = Instant::now();
    let never = |_: &Run| false;
    // Input events are timed over the steady phase only.
    for w in &mut run.workers {
        w.stdin.write_all(b"measure start\n").await?;
    }
    run.phase(Phase::Steady, steady, never, interrupt).await;
    for w in &mut run.workers {
        let _ = w.stdin.write_all(b"measure stop\n").await;
    }
    if !run.problems.is_empty() {
        bail!("the run broke off during the steady phase");
    }
    println!(
        "soak: {:.1} min of steady traffic done; stopping",
        steady_start.elapsed().as_secs_f64() / 60.0
    );
    run.sample(Phase::Steady).await;
    let steady_to = run.samples.len() - 1;
    for w in &mut run.workers {
        w.stdin.write_all(b"stop\n").await?;
    }
    let close_limit = Duration::from_secs_f64(o.sessions as f64 / o.ramp_rate * 3.0 + 300.0);
    let all_done = |r: &Run| {
        r.workers
            .iter()
            .all(|w| w.state.lock().unwrap().done.is_some())
    };
    if !run
        .phase(Phase::Close, close_limit, all_done, interrupt)
        .await
    {
        bail!("the workers did not finish within {close_limit:?}");
    }
    // The brokers let go of every session.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut active = 0;
        for b in &run.brokers {
            active += sessions_active(b.addr).await.unwrap_or(u64::MAX / 4);
        }
        if active == 0 {
            break;
        }
        if Instant::now() > deadline {
            run.problems.push(format!(
                "{active} sessions still active in the brokers 60 s after the end"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Give the fd counts a moment to settle, then the final sample.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && run
            .brokers
            .iter()
            .zip(&idle_fds)
            .any(|(b, idle)| fd_count(b.pid) > *idle)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    run.sample(Phase::After).await;
    run.check_alive();

    report(run, db, &idle_fds, steady_from, steady_to)
}

// ---------------------------------------------------------------- orchestrator: report

/// A session row: ended_at, bytes to the client, bytes to the server, reason.
type RecordedSession = (Option<i64>, i64, i64, Option<String>);

fn report(
    run: &mut Run,
    db: &str,
    idle_fds: &[usize],
    steady_from: usize,
    steady_to: usize,
) -> anyhow::Result<()> {
    let o = run.o.clone();
    // The workers' view.
    let mut results = Vec::new();
    for w in &run.workers {
        let text = std::fs::read_to_string(&w.results)
            .with_context(|| format!("reading {}", w.results.display()))?;
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        if rows.len() != w.count {
            run.problems.push(format!(
                "{} has {} sessions, expected {}",
                w.results.display(),
                rows.len(),
                w.count
            ));
        }
        results.extend(rows);
    }
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let opened = results
        .iter()
        .filter(|r| !r["addr"].as_str().unwrap_or("").is_empty())
        .count();
    let failed: Vec<&serde_json::Value> =
        results.iter().filter(|r| !r["error"].is_null()).collect();
    let corrupt = results
        .iter()
        .filter(|r| r["corrupt"].as_bool().unwrap_or(false))
        .count();
    let lost = results
        .iter()
        .filter(|r| {
            n(r, "to_server") != n(r, "to_server_received")
                || n(r, "to_client") != n(r, "to_client_received")
        })
        .count();
    let up: u64 = results.iter().map(|r| n(r, "to_server")).sum();
    let down: u64 = results.iter().map(|r| n(r, "to_client")).sum();
    let retries: u64 = run
        .workers
        .iter()
        .map(|w| {
            w.state
                .lock()
                .unwrap()
                .stats
                .get("retries")
                .copied()
                .unwrap_or(0)
        })
        .sum();

    // The brokers' records.
    let path = db.strip_prefix("sqlite://").context("database path")?;
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    let mut rows: HashMap<(String, String), RecordedSession> = HashMap::new();
    let mut st = conn.prepare("SELECT node, client_addr, ended_at, bytes_to_client, bytes_to_server, close_reason FROM sessions")?;
    let mut q = st.query([])?;
    let mut row_count = 0usize;
    while let Some(r) = q.next()? {
        row_count += 1;
        rows.insert(
            (r.get(0)?, r.get(1)?),
            (r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?),
        );
    }
    let mut row_problems = Vec::new();
    for r in &results {
        let addr = r["addr"].as_str().unwrap_or("");
        if addr.is_empty() {
            continue;
        }
        let node = format!("soak-{}", n(r, "broker") + 1);
        match rows.get(&(node.clone(), addr.to_owned())) {
            None => row_problems.push(format!(
                "session {}: no row for {addr} on {node}",
                n(r, "session")
            )),
            Some((ended, to_client, to_server, reason)) => {
                let want = (n(r, "to_client") as i64, n(r, "to_server") as i64);
                if ended.is_none()
                    || reason.as_deref() != Some("client closed")
                    || (*to_client, *to_server) != want
                {
                    row_problems.push(format!(
                        "session {}: row says ended {ended:?}, reason {reason:?}, to client {to_client}, to server {to_server}; sent {} / {}",
                        n(r, "session"),
                        want.0,
                        want.1
                    ));
                }
            }
        }
    }
    if row_count != opened {
        row_problems.push(format!("{row_count} session rows for {opened} sessions"));
    }
    let unrecorded: usize = run
        .brokers
        .iter()
        .map(|b| {
            std::fs::read_to_string(&b.log)
                .unwrap_or_default()
                .matches("could not record the session")
                .count()
        })
        .sum();

    let (from, to) = (&run.samples[steady_from], &run.samples[steady_to]);
    let secs = (to.t - from.t).as_secs_f64().max(1e-3);
    let (steady_up, steady_down) = (
        to.up.saturating_sub(from.up),
        to.down.saturating_sub(from.down),
    );
    println!();
    println!("==================== soak summary ====================");
    println!(
        "load average (1/5/15 min): {} at the start, {} now",
        run.load_start.as_deref().unwrap_or("?"),
        load_average().as_deref().unwrap_or("?")
    );
    println!(
        "sessions: {} requested, {opened} opened ({retries} retried attempts), {} failed",
        o.sessions,
        failed.len()
    );
    println!(
        "bytes client->server: {up} ({}); {:.2} MiB/s over {secs:.0} s of steady state",
        mib(up),
        steady_up as f64 / 1048576.0 / secs
    );
    println!(
        "bytes server->client: {down} ({}); {:.2} MiB/s over {secs:.0} s of steady state",
        mib(down),
        steady_down as f64 / 1048576.0 / secs
    );
    println!("checksum failures: {corrupt}");
    println!("sessions with bytes missing at the other end: {lost}");
    println!(
        "session rows: {row_count}; mismatches with what was sent, or not ended \"client closed\": {}",
        row_problems.len()
    );
    println!("\"could not record the session\" warnings in broker logs: {unrecorded}");
    for f in failed.iter().take(10) {
        println!(
            "  failed session {}: {}",
            n(f, "session"),
            f["error"].as_str().unwrap_or("")
        );
    }
    for p in row_problems.iter().take(10) {
        println!("  {p}");
    }
    // CPU over the steady state, and the input latency.
    let node_cpu: Vec<(f64, f64, u64)> = (0..run.brokers.len())
        .map(|i| {
            let cpu = to.cpu[i] - from.cpu[i];
            let relayed = |s: &Sample| s.node_bytes.get(i).map_or(0, |(u, d)| u + d);
            let bytes = relayed(to).saturating_sub(relayed(from));
            let per_gib = if bytes > 0 {
                cpu / (bytes as f64 / (1u64 << 30) as f64)
            } else {
                f64::NAN
            };
            (cpu / secs * 100.0, per_gib, bytes)
        })
        .collect();
    let worker_cpu_pct = (to.worker_cpu - from.worker_cpu) / secs * 100.0;
    let mut latency = Hist::new();
    let mut lag = Hist::new();
    let mut latency_missing = 0;
    for w in &run.workers {
        let st = w.state.lock().unwrap();
        match (&st.latency, &st.lag) {
            (Some(h), Some(l)) => {
                latency.merge(h);
                lag.merge(l);
            }
            _ => latency_missing += 1,
        }
    }
    if latency_missing > 0 {
        run.problems.push(format!(
            "{latency_missing} client processes did not report their latency histogram"
        ));
    }
    let what = match o.shape.traffic {
        Traffic::Vnc => "input events",
        Traffic::Random => "client-to-server chunks",
    };
    println!(
        "latency of {what} (client write to the target's read of the last byte), {} timed over the steady state: {}",
        latency.n,
        latency_words(&latency)
    );
    println!(
        "client processes' own scheduling: a {} ms sleep woke late by {}",
        LAG_PROBE.as_millis(),
        latency_words(&lag)
    );
    println!(
        "CPU over the steady state ({} ticks/s; % of one core):",
        clk_tck()
    );
    for (b, (pct, per_gib, bytes)) in run.brokers.iter().zip(&node_cpu) {
        println!(
            "  {}: {pct:.1}%, {per_gib:.2} CPU s per GiB relayed ({} relayed)",
            b.name,
            mib(*bytes)
        );
    }
    println!(
        "  client processes ({}): {worker_cpu_pct:.1}% in all",
        run.workers.len()
    );
    println!();
    println!("broker memory and descriptors (sampled every 10 s):");
    for (i, b) in run.brokers.iter().enumerate() {
        let series: Vec<u64> = run.samples.iter().map(|s| s.rss[i]).collect();
        let peak = series.iter().copied().max().unwrap_or(0);
        let idle = run.samples.first().map_or(0, |s| s.rss[i]);
        let s_from = run.samples[steady_from].rss[i];
        let s_to = run.samples[steady_to].rss[i];
        let after = run.samples.last().map_or(0, |s| s.rss[i]);
        let fds_peak = run.samples.iter().map(|s| s.fds[i]).max().unwrap_or(0);
        let fds_after = run.samples.last().map_or(0, |s| s.fds[i]);
        println!(
            "  {}: RSS idle {} | steady start {} | steady end {} | peak {} | after close {}; fds idle {} peak {} after {}",
            b.name,
            mib(idle),
            mib(s_from),
            mib(s_to),
            mib(peak),
            mib(after),
            idle_fds[i],
            fds_peak,
            fds_after
        );
        // Each session's fixed buffers are touched page by page as larger
        // reads come, so RSS climbs early in the steady phase and levels
        // off; a leak keeps climbing. Judge the second half.
        let mid = steady_from + (steady_to - steady_from) / 2;
        let s_mid = run.samples[mid].rss[i];
        let growth = s_to.saturating_sub(s_mid);
        let allowed = (s_mid as f64 * o.max_rss_growth_pct / 100.0) as u64 + (16 << 20);
        println!(
            "    second half of the steady phase: {} -> {} ({:+.1} MiB, allowed +{})",
            mib(s_mid),
            mib(s_to),
            (s_to as f64 - s_mid as f64) / 1048576.0,
            mib(allowed)
        );
        if growth > allowed {
            run.problems.push(format!(
                "{}: RSS grew by {} in the second half of the steady phase (allowed {})",
                b.name,
                mib(growth),
                mib(allowed)
            ));
        }
        if fds_after > idle_fds[i] + 8 {
            run.problems.push(format!(
                "{}: {} fds after the run, {} idle before",
                b.name, fds_after, idle_fds[i]
            ));
        }
    }
    println!("  RSS over time (MiB):");
    for s in &run.samples {
        let cols: Vec<String> = s
            .rss
            .iter()
            .map(|r| format!("{:>8.1}", *r as f64 / 1048576.0))
            .collect();
        println!(
            "    {:>6.0}s {:<6} {}",
            s.t.as_secs_f64(),
            format!("{:?}", s.phase).to_lowercase(),
            cols.join(" ")
        );
    }

    if opened != o.sessions {
        run.problems.push(format!(
            "{} of {} sessions did not open",
            o.sessions - opened,
            o.sessions
        ));
    }
    if !failed.is_empty() {
        run.problems
            .push(format!("{} sessions failed", failed.len()));
    }
    if corrupt > 0 {
        run.problems.push(format!("{corrupt} checksum failures"));
    }
    if lost > 0 {
        run.problems.push(format!("{lost} sessions lost bytes"));
    }
    if !row_problems.is_empty() {
        run.problems
            .push(format!("{} session record problems", row_problems.len()));
    }
    if let Some(out) = &o.out {
        let md = Markdown {
            run,
            idle_fds,
            steady_from,
            steady_to,
            opened,
            failed: failed.len(),
            retries,
            corrupt,
            lost,
            row_count,
            row_problems: row_problems.len(),
            up,
            down,
            secs,
            steady_up,
            steady_down,
            node_cpu: &node_cpu,
            worker_cpu_pct,
            latency: &latency,
            lag: &lag,
            per_node: &results
                .iter()
                .filter(|r| !r["addr"].as_str().unwrap_or("").is_empty())
                .fold(vec![0u64; run.brokers.len()], |mut v, r| {
                    if let Some(c) = v.get_mut(n(r, "broker") as usize) {
                        *c += 1;
                    }
                    v
                }),
        }
        .render();
        match std::fs::write(out, md) {
            Ok(()) => println!("soak: wrote the Soak section to {}", out.display()),
            Err(e) => run
                .problems
                .push(format!("could not write {}: {e}", out.display())),
        }
    }
    Ok(())
}

/// A latency histogram in words: p50, p99, p99.9 and the maximum.
fn latency_words(h: &Hist) -> String {
    if h.n == 0 {
        return "none timed".into();
    }
    let q = |q: f64| ms_words(h.quantile(q).unwrap_or(0.0));
    format!(
        "p50 {}, p99 {}, p99.9 {}, max {}",
        q(0.5),
        q(0.99),
        q(0.999),
        ms_words(h.max_us as f64)
    )
}

/// Microseconds as milliseconds, to about three figures.
fn ms_words(us: f64) -> String {
    let ms = us / 1000.0;
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

/// 10000 → "10,000".
fn thousands(n: u64) -> String {
    let d = n.to_string();
    let mut out = String::new();
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// 2 → "two"; numbers past ten as digits.
fn count_words(n: usize) -> String {
    const W: [&str; 11] = [
        "no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    ];
    W.get(n).map_or_else(|| n.to_string(), |w| (*w).to_owned())
}

/// A rate in MiB/s, to about three figures.
fn rate_words(bytes: u64, secs: f64) -> String {
    let r = bytes as f64 / 1048576.0 / secs;
    if r >= 10.0 {
        format!("{r:.1} MiB/s")
    } else if r >= 1.0 {
        format!("{r:.2} MiB/s")
    } else {
        format!("{r:.3} MiB/s")
    }
}

/// One value per node, "a / b / c"; one value when they are all the same.
fn per_node<T: PartialEq>(v: &[T], show: impl Fn(&T) -> String) -> String {
    if v.windows(2).all(|w| w[0] == w[1]) && !v.is_empty() {
        show(&v[0])
    } else {
        v.iter().map(show).collect::<Vec<_>>().join(" / ")
    }
}

/// The 1, 5 and 15 minute load averages, "2.10 2.30 2.04".
fn load_average() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// The output of a command run here, trimmed, if it worked.
fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The figures of a run, for the "Soak" section of BENCHMARKS.md.
struct Markdown<'a> {
    run: &'a Run,
    idle_fds: &'a [usize],
    steady_from: usize,
    steady_to: usize,
    opened: usize,
    failed: usize,
    retries: u64,
    corrupt: usize,
    lost: usize,
    row_count: usize,
    row_problems: usize,
    up: u64,
    down: u64,
    secs: f64,
    steady_up: u64,
    steady_down: u64,
    /// Per node: CPU % of one core, CPU seconds per GiB, bytes relayed.
    node_cpu: &'a [(f64, f64, u64)],
    worker_cpu_pct: f64,
    latency: &'a Hist,
    /// The client processes' event-loop lag over the same time.
    lag: &'a Hist,
    /// Sessions opened on each node.
    per_node: &'a [u64],
}

impl Markdown<'_> {
    fn render(&self) -> String {
        let run = self.run;
        let o = &run.o;
        let nodes = run.brokers.len();
        let minutes = if o.minutes == 1.0 {
            "1 minute".to_owned()
        } else {
            format!("{} minutes", o.minutes)
        };
        let date = command_output("date", &["-u", "+%Y-%m-%d"]).unwrap_or_else(|| "?".into());
        let commit = match command_output("git", &["rev-parse", "--short", "HEAD"]) {
            Some(c) => {
                let dirty =
                    command_output("git", &["status", "--porcelain", "--untracked-files=no"])
                        .is_some_and(|s| !s.is_empty());
                if dirty {
                    format!("{c} (with local changes)")
                } else {
                    c
                }
            }
            None => "?".into(),
        };
        let mut md = String::new();
        md.push_str("## Soak\n\n");
        md.push_str(&format!(
            "From `scripts/soak` ({} sessions, {minutes}; kept when `scripts/bench` rewrites the sections above), run on {date} at commit {commit} on this machine (load average, 1/5/15 min, {} at the start and {} at the end; the machine is shared):\n\n",
            thousands(o.sessions as u64),
            run.load_start.as_deref().unwrap_or("?"),
            load_average().as_deref().unwrap_or("?"),
        ));

        // Sessions.
        // 2 fds per session and about 100 of the broker's own, rounded down.
        let fd_cap = (20_000 - 100) / 2;
        md.push_str(&format!(
            "- {} of {} sessions opened over {} `serve` node{} on one SQLite file ({} each; one process may hold at most about {} sessions under the 20,000 open-files limit), {} failed, {} retried.\n",
            thousands(self.opened as u64),
            thousands(o.sessions as u64),
            count_words(nodes),
            if nodes == 1 { "" } else { "s" },
            per_node(self.per_node, |n| thousands(*n)),
            thousands(fd_cap as u64 / 100 * 100),
            thousands(self.failed as u64),
            thousands(self.retries),
        ));

        // Traffic.
        let steady = |b: u64| rate_words(b, self.secs);
        let mib_total = |b: u64| {
            let m = b as f64 / 1048576.0;
            if m >= 100.0 {
                format!("{} MiB", thousands(m.round() as u64))
            } else {
                format!("{m:.1} MiB")
            }
        };
        let what = match o.shape.traffic {
            Traffic::Vnc => "input events",
            Traffic::Random => "client-to-server chunks",
        };
        md.push_str(&format!(
            "- {}: {} client to server and {} server to client; {} client to server and {} server to client over {:.0} s of steady state, with {} {what} timed ({} per second).\n",
            o.shape.describe(),
            mib_total(self.up),
            mib_total(self.down),
            steady(self.steady_up),
            steady(self.steady_down),
            self.secs,
            thousands(self.latency.n),
            thousands((self.latency.n as f64 / self.secs).round() as u64),
        ));

        // Checks.
        let rows = if self.row_problems == 0 && self.row_count == self.opened {
            format!(
                "all {} session rows ended \"client closed\" with exactly the bytes each side sent",
                thousands(self.row_count as u64)
            )
        } else {
            format!(
                "{} session rows, {} of them not ended \"client closed\" with exactly the bytes each side sent (or missing)",
                thousands(self.row_count as u64),
                thousands(self.row_problems as u64)
            )
        };
        md.push_str(&format!(
            "- Every byte checked in order at the other end: {} checksum failures, {} sessions with bytes missing; {rows}.\n",
            thousands(self.corrupt as u64),
            thousands(self.lost as u64),
        ));

        // Memory and descriptors.
        let samples = &run.samples;
        let mid = self.steady_from + (self.steady_to - self.steady_from) / 2;
        let col = |k: usize| -> Vec<u64> { samples[k].rss.clone() };
        let rss = |v: &Vec<u64>| per_node(v, |b| format!("{:.1}", *b as f64 / 1048576.0));
        let idle = col(0);
        let up = col(self.steady_from);
        let end = col(self.steady_to);
        let after = col(samples.len() - 1);
        let growth: Vec<f64> = (0..nodes)
            .map(|i| (end[i] as f64 - samples[mid].rss[i] as f64) / 1048576.0)
            .collect();
        let stable = (0..nodes).all(|i| {
            let m = samples[mid].rss[i];
            end[i].saturating_sub(m)
                <= (m as f64 * o.max_rss_growth_pct / 100.0) as u64 + (16 << 20)
        });
        let names = run
            .brokers
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>()
            .join(" / ");
        let fds: Vec<String> = (0..nodes)
            .map(|i| {
                let peak = samples.iter().map(|s| s.fds[i]).max().unwrap_or(0);
                let last = samples.last().map_or(0, |s| s.fds[i]);
                format!(
                    "{} → {} → {}",
                    thousands(self.idle_fds[i] as u64),
                    thousands(peak as u64),
                    thousands(last as u64)
                )
            })
            .collect();
        md.push_str(&format!(
            "- Broker memory (VmRSS), per node ({names}): {} MiB idle; {} MiB when all sessions were up; {} MiB at the end of {minutes}, of which {} MiB over the second half ({}); {} MiB after all sessions closed. File descriptors {}.\n",
            rss(&idle),
            rss(&up),
            rss(&end),
            per_node(&growth, |g| format!("{g:+.1}")),
            if stable { "stable" } else { "growing" },
            rss(&after),
            per_node(&fds, |s| s.clone()),
        ));

        // CPU.
        let pct: Vec<String> = self
            .node_cpu
            .iter()
            .map(|(p, _, _)| {
                if *p >= 10.0 {
                    format!("{p:.0}%")
                } else {
                    format!("{p:.1}%")
                }
            })
            .collect();
        let per_gib: Vec<String> = self
            .node_cpu
            .iter()
            .map(|(_, g, _)| format!("{g:.1}"))
            .collect();
        md.push_str(&format!(
            "- Broker CPU (user + system) over the steady state, per node ({names}): {} of one core; {} CPU seconds per GiB relayed (both ways). The client processes ({} of them: the WebSocket clients and the VNC server stand-ins, on the same cores) used {:.1}% of one core in all.\n",
            per_node(&pct, |s| s.clone()),
            per_node(&per_gib, |s| s.clone()),
            count_words(run.workers.len()),
            self.worker_cpu_pct,
        ));

        // Latency.
        let (first, sent) = match o.shape.traffic {
            Traffic::Vnc => ("Input-event latency", "an input event"),
            Traffic::Random => ("Client-to-server chunk latency", "a chunk"),
        };
        md.push_str(&format!(
            "- {first}, from the client's write of {sent} to the VNC server stand-in's read of its last byte, over the {} timed in the steady state: {}. Both ends run in the client processes, so this includes their own scheduling under the load: over the same time a {} ms sleep there woke late by {}.\n",
            thousands(self.latency.n),
            latency_words(self.latency),
            LAG_PROBE.as_millis(),
            latency_words(self.lag),
        ));

        if !run.problems.is_empty() {
            md.push_str(&format!(
                "- **The run failed**: {}.\n",
                run.problems.join("; ")
            ));
        }
        md
    }
}

// ---------------------------------------------------------------- main

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--worker") {
        args.next();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let result = parse_worker(args).and_then(|w| rt.block_on(worker(w)));
        if let Err(e) = result {
            eprintln!("soak worker: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let opts = match parse_opts(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e:#}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(orchestrate(opts)) {
        Ok(true) => println!("RESULT: PASS"),
        Ok(false) => {
            // The problems were collected in the run; print them.
            println!("RESULT: FAIL");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("soak: {e:#}");
            println!("RESULT: FAIL");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_hold_their_values() {
        for us in (0..5000u64).chain([1 << 20, (1 << 20) + 12345, u64::MAX >> 8]) {
            let (lo, hi) = Hist::bounds(Hist::bucket(us));
            assert!(lo <= us && us <= hi, "{us} outside [{lo}, {hi}]");
            // At most 1/64 of the value wide.
            assert!((hi - lo) * 64 <= us.max(1), "{us}: [{lo}, {hi}] too wide");
        }
        // Buckets follow each other without gaps.
        for i in 0..(128 + 20 * 64) {
            assert_eq!(Hist::bounds(i).1 + 1, Hist::bounds(i + 1).0, "bucket {i}");
        }
    }

    #[test]
    fn histograms_merge_and_travel_as_text() {
        let mut a = Hist::new();
        let mut b = Hist::new();
        for us in 1..=900u64 {
            a.record(Duration::from_micros(us));
        }
        for us in 901..=1000u64 {
            b.record(Duration::from_micros(us * 10));
        }
        let b = Hist::decode(&b.encode()).expect("decodes");
        a.merge(&b);
        assert_eq!(a.n, 1000);
        assert_eq!(a.max_us, 10_000);
        let p50 = a.quantile(0.5).unwrap();
        assert!((495.0..=505.0).contains(&p50), "p50 {p50}");
        let p95 = a.quantile(0.95).unwrap();
        assert!((9_350.0..=9_650.0).contains(&p95), "p95 {p95}");
        assert_eq!(a.quantile(1.0), Some(10_000.0));
        assert_eq!(Hist::new().quantile(0.5), None);
        assert_eq!(Hist::decode("n=2 max=5 5:1"), None, "counts must add up");
    }

    #[test]
    fn vnc_pace_sizes() {
        let sh = Shape::default();
        let mut rng = Rng(7);
        let mut down = Pace::new(Traffic::Vnc, false);
        let mut up = Pace::new(Traffic::Vnc, true);
        for _ in 0..10_000 {
            let (_, n) = down.next(&sh, &mut rng);
            assert!(
                (sh.update_min..=sh.update_max).contains(&n),
                "update of {n}"
            );
            let (_, n) = up.next(&sh, &mut rng);
            assert!(n == POINTER_EVENT || n == KEY_EVENT, "event of {n}");
        }
    }

    #[test]
    fn first_pauses_average_two_thirds_of_the_mean() {
        // The residual of a pause uniform in [0, 2m] has mean 2m/3.
        let mut rng = Rng(11);
        let n = 100_000;
        let total: f64 = (0..n).map(|_| rng.residual(900).as_secs_f64()).sum();
        let mean_ms = total / n as f64 * 1000.0;
        assert!((590.0..=610.0).contains(&mean_ms), "mean {mean_ms}");
        assert!((0..1000).all(|_| rng.residual(900) <= Duration::from_millis(1800)));
    }

    #[test]
    fn words() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(10_015), "10,015");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(size_words(65536), "64 KiB");
        assert_eq!(size_words(1000), "1000 B");
        assert_eq!(duration_words(1000), "second");
        assert_eq!(duration_words(15000), "15 s");
        assert_eq!(per_node(&[3, 3], |n| n.to_string()), "3");
        assert_eq!(per_node(&[3, 4], |n| n.to_string()), "3 / 4");
    }
}
