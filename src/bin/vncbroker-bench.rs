//! vncbroker-bench: measures the proxy against a direct TCP connection on
//! this machine, and the token service's mint rate.
//!
//! It starts a release `vncbroker serve` on a fresh SQLite database, TCP
//! source/sink/echo servers standing in for VNC servers, and drives both
//! paths with its own load client in the same run, so figures are ratios
//! taken under the same conditions.
//!
//! Usage: cargo run --release --bin vncbroker-bench -- [--quick] [--broker PATH] [--out FILE]
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

struct Opts {
    targets: bool,
    quick: bool,
    broker: PathBuf,
    out: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Opts> {
    let mut opts = Opts {
        targets: false,
        quick: false,
        broker: std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("vncbroker"),
        out: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--targets" => opts.targets = true,
            "--broker" => opts.broker = args.next().context("--broker PATH")?.into(),
            "--out" => opts.out = Some(args.next().context("--out FILE")?.into()),
            "-h" | "--help" => {
                println!("usage: vncbroker-bench [--quick] [--broker PATH] [--out FILE]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(opts)
}

// ---------------------------------------------------------------- servers

/// Sends 64 KiB writes as fast as the reader takes them.
async fn source_server() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let chunk = vec![0x5Au8; 64 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    Ok(addr)
}

/// Reads and discards, counting bytes.
async fn sink_server(count: Arc<AtomicU64>) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
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
        }
    });
    Ok(addr)
}

/// Echoes; greets with an RFB version line so session setup has a first byte.
async fn echo_server(greet: bool) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
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
        }
    });
    Ok(addr)
}

/// Answers each connection with the sink's byte count (8 bytes, big-endian).
async fn stats_server(count: Arc<AtomicU64>) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s
                .write_all(&count.load(Ordering::Relaxed).to_be_bytes())
                .await;
        }
    });
    Ok(addr)
}

/// `--targets`: the stand-in VNC servers, in a process of their own so the
/// direct path crosses processes just as the proxied one does. Prints the
/// ports and serves until standard input closes.
async fn run_targets() -> anyhow::Result<()> {
    let count = Arc::new(AtomicU64::new(0));
    let ports = [
        source_server().await?,
        sink_server(Arc::clone(&count)).await?,
        echo_server(false).await?,
        echo_server(true).await?,
        stats_server(count).await?,
    ];
    let line: Vec<String> = ports.iter().map(|a| a.port().to_string()).collect();
    println!("ports {}", line.join(" "));
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    Ok(())
}

/// The targets process and its ports.
struct Targets {
    _child: tokio::process::Child,
    source: SocketAddr,
    sink: SocketAddr,
    echo: SocketAddr,
    greet: SocketAddr,
    stats: SocketAddr,
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
            stats: at(4)?,
            _child: child,
        })
    }

    async fn sink_count(&self) -> anyhow::Result<u64> {
        let mut s = TcpStream::connect(self.stats).await?;
        let mut b = [0u8; 8];
        s.read_exact(&mut b).await?;
        Ok(u64::from_be_bytes(b))
    }
}

// ---------------------------------------------------------------- broker

struct Broker {
    child: tokio::process::Child,
    addr: SocketAddr,
    db: String,
    cfg: PathBuf,
    bin: PathBuf,
    _dir: tempfile::TempDir,
}

impl Broker {
    async fn start(bin: &PathBuf) -> anyhow::Result<Broker> {
        let dir = tempfile::tempdir()?;
        let db = format!("sqlite://{}", dir.path().join("bench.db").display());
        let cfg = dir.path().join("bench.toml");
        std::fs::write(&cfg, "[log]\nlevel = \"warn\"\n[tokens]\nmax_ttl = 86400\n")?;
        let mut broker = Broker {
            child: tokio::process::Command::new(bin)
                .args(["serve", "--listen", "127.0.0.1:0", "--database", &db])
                .arg("--config")
                .arg(&cfg)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?,
            addr: "127.0.0.1:0".parse()?,
            db,
            cfg,
            bin: bin.clone(),
            _dir: dir,
        };
        let stdout = broker.child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).await?;
        broker.addr = line
            .trim()
            .strip_prefix("listening on ")
            .context("no listening line")?
            .parse()?;
        broker.cli(
            &["user", "add", "bench", "--admin", "--password-stdin"],
            Some("benchpw"),
        )?;
        Ok(broker)
    }

    fn cli(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        use std::io::Write;
        let mut child = std::process::Command::new(&self.bin)
            .args(args)
            .args(["--database", &self.db])
            .arg("--config")
            .arg(&self.cfg)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(s), Some(mut pipe)) = (stdin, child.stdin.take()) {
            writeln!(pipe, "{s}")?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "vncbroker {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn add_vm(&self, id: i64, target: SocketAddr) -> anyhow::Result<()> {
        let (id, port) = (id.to_string(), target.port().to_string());
        self.cli(
            &[
                "vm",
                "add",
                &id,
                "--host",
                "127.0.0.1",
                "--port",
                &port,
                "--owner",
                "bench",
            ],
            None,
        )?;
        Ok(())
    }

    fn mint(&self, vm: i64) -> anyhow::Result<String> {
        let out = self.cli(&["token", "mint", &vm.to_string(), "--ttl", "86400"], None)?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v["token"].as_str().context("token")?.to_owned())
    }
}

// ---------------------------------------------------------------- WebSocket client

/// A minimal client: upgrade, masked binary frames out, frames in.
struct Ws {
    s: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    left: usize,
}

impl Ws {
    async fn connect(addr: SocketAddr, token: &str) -> anyhow::Result<Ws> {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let req = format!(
            "GET /websockify?token={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut end = 0;
        let head_end = loop {
            let n = s.read(&mut buf[end..]).await?;
            if n == 0 {
                bail!("closed during the upgrade");
            }
            end += n;
            if let Some(p) = buf[..end].windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        if !buf.starts_with(b"HTTP/1.1 101") {
            bail!(
                "upgrade refused: {}",
                String::from_utf8_lossy(&buf[..head_end])
            );
        }
        Ok(Ws {
            s,
            buf,
            start: head_end,
            end,
            left: 0,
        })
    }

    /// Reads payload bytes; returns how many arrived (0 on close).
    async fn read_payload(&mut self) -> anyhow::Result<usize> {
        loop {
            if self.left > 0 && self.start < self.end {
                let n = self.left.min(self.end - self.start);
                self.start += n;
                self.left -= n;
                return Ok(n);
            }
            if self.left == 0 && self.end - self.start >= 2 {
                let b = &self.buf[self.start..self.end];
                let (len, hl) = match b[1] & 0x7F {
                    126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                    127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into()?) as usize, 10),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if hl > 0 {
                    if b[0] & 0x0F == 0x8 {
                        return Ok(0);
                    }
                    self.start += hl;
                    self.left = len;
                    continue;
                }
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = self.s.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Ok(0);
            }
            self.end += n;
        }
    }

    /// Sends one masked binary frame whose payload is already masked with `MASK`.
    async fn send_masked(&mut self, masked_payload: &[u8]) -> anyhow::Result<()> {
        let mut head = Vec::with_capacity(14);
        head.push(0x82);
        let n = masked_payload.len();
        if n < 126 {
            head.push(0x80 | n as u8);
        } else if n < 65536 {
            head.push(0x80 | 126);
            head.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            head.push(0x80 | 127);
            head.extend_from_slice(&(n as u64).to_be_bytes());
        }
        head.extend_from_slice(&MASK);
        self.s.write_all(&head).await?;
        self.s.write_all(masked_payload).await?;
        Ok(())
    }
}

const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

fn masked(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8) ^ MASK[i % 4]).collect()
}

// ---------------------------------------------------------------- measurements

struct Env {
    broker: Broker,
    targets: Targets,
    secs: f64,
    reps: usize,
}

const VM_SOURCE: i64 = 1;
const VM_SINK: i64 = 2;
const VM_ECHO: i64 = 3;
const VM_GREET: i64 = 4;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Bytes per second read over `conns` connections for the configured time.
async fn download(env: &Env, proxied: bool, conns: usize) -> anyhow::Result<f64> {
    let total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let token = if proxied {
        Some(env.broker.mint(VM_SOURCE)?)
    } else {
        None
    };
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (total, stop, token) = (Arc::clone(&total), Arc::clone(&stop), token.clone());
        let (broker, source) = (env.broker.addr, env.targets.source);
        tasks.push(tokio::spawn(async move {
            if let Some(t) = token {
                let mut ws = Ws::connect(broker, &t).await?;
                while !stop.load(Ordering::Relaxed) {
                    let n = ws.read_payload().await?;
                    if n == 0 {
                        break;
                    }
                    total.fetch_add(n as u64, Ordering::Relaxed);
                }
            } else {
                let mut s = TcpStream::connect(source).await?;
                let mut buf = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    total.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        }));
    }
    // Warm up, then measure.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let b0 = total.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(env.secs)).await;
    let rate = (total.load(Ordering::Relaxed) - b0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    Ok(rate)
}

/// Bytes per second the sink receives when the client sends `msg`-byte messages.
async fn upload(env: &Env, proxied: bool, msg: usize) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let token = if proxied {
        Some(env.broker.mint(VM_SINK)?)
    } else {
        None
    };
    let (broker, sink, stop2) = (env.broker.addr, env.targets.sink, Arc::clone(&stop));
    let task = tokio::spawn(async move {
        if let Some(t) = token {
            let mut ws = Ws::connect(broker, &t).await?;
            let payload = masked(msg);
            while !stop2.load(Ordering::Relaxed) {
                ws.send_masked(&payload).await?;
            }
        } else {
            let mut s = TcpStream::connect(sink).await?;
            let payload = vec![1u8; msg];
            while !stop2.load(Ordering::Relaxed) {
                s.write_all(&payload).await?;
            }
        }
        anyhow::Ok(())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let b0 = env.targets.sink_count().await?;
    tokio::time::sleep(Duration::from_secs_f64(env.secs)).await;
    let rate = (env.targets.sink_count().await? - b0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    task.abort();
    Ok(rate)
}

/// Round-trip times of a 16-byte echo, in microseconds.
async fn round_trips(env: &Env, proxied: bool, count: usize) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(count);
    if proxied {
        let mut ws = Ws::connect(env.broker.addr, &env.broker.mint(VM_ECHO)?).await?;
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
    } else {
        let mut s = TcpStream::connect(env.targets.echo).await?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 16];
        for _ in 0..count {
            let t = Instant::now();
            s.write_all(&[7u8; 16]).await?;
            s.read_exact(&mut buf).await?;
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(out)
}

/// Session setups (upgrade, redemption, backend connect, first byte) with
/// `conc` clients for the configured time: (per second, latencies in ms).
async fn session_setup(env: &Env, conc: usize) -> anyhow::Result<(f64, Vec<f64>)> {
    let token = env.broker.mint(VM_GREET)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (stop, token, addr) = (Arc::clone(&stop), token.clone(), env.broker.addr);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let mut ws = Ws::connect(addr, &token).await?;
                if ws.read_payload().await? == 0 {
                    bail!("session refused");
                }
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok(lat)
        }));
    }
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(env.secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all.len() as f64 / t0.elapsed().as_secs_f64(), all))
}

/// Mints per second over XML-RPC with keep-alive, `conc` connections.
async fn mint_rate(env: &Env, conc: usize) -> anyhow::Result<f64> {
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
        let (stop, done, req, addr) = (
            Arc::clone(&stop),
            Arc::clone(&done),
            req.clone(),
            env.broker.addr,
        );
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let d0 = done.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(env.secs)).await;
    let rate = (done.load(Ordering::Relaxed) - d0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    Ok(rate)
}

fn mib(bytes_per_sec: f64) -> String {
    format!("{:.0} MiB/s", bytes_per_sec / (1024.0 * 1024.0))
}

async fn repeat<F, Fut>(reps: usize, mut f: F) -> anyhow::Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<f64>>,
{
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        v.push(f().await?);
    }
    Ok(median(&mut v))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = parse_args()?;
    if opts.targets {
        return run_targets().await;
    }
    let env = Env {
        broker: Broker::start(&opts.broker).await?,
        targets: Targets::start().await?,
        secs: if opts.quick { 0.5 } else { 3.0 },
        reps: if opts.quick { 1 } else { 5 },
    };
    env.broker.add_vm(VM_SOURCE, env.targets.source)?;
    env.broker.add_vm(VM_SINK, env.targets.sink)?;
    env.broker.add_vm(VM_ECHO, env.targets.echo)?;
    env.broker.add_vm(VM_GREET, env.targets.greet)?;

    let mut rows: Vec<(String, String, String, String)> = Vec::new();
    let reps = env.reps;

    for conns in [1usize, 16] {
        let direct = repeat(reps, || download(&env, false, conns)).await?;
        let proxied = repeat(reps, || download(&env, true, conns)).await?;
        rows.push((
            format!("download, {conns} connection(s), 64 KiB writes"),
            mib(direct),
            mib(proxied),
            format!("{:.2} x direct", proxied / direct),
        ));
    }
    for msg in [1024usize, 64 * 1024] {
        let direct = repeat(reps, || upload(&env, false, msg)).await?;
        let proxied = repeat(reps, || upload(&env, true, msg)).await?;
        rows.push((
            format!("upload, {} KiB messages", msg / 1024),
            mib(direct),
            mib(proxied),
            format!("{:.2} x direct", proxied / direct),
        ));
    }
    let n = if opts.quick { 200 } else { 5000 };
    let mut direct = round_trips(&env, false, n).await?;
    let mut proxied = round_trips(&env, true, n).await?;
    let (d50, d99) = (percentile(&mut direct, 0.5), percentile(&mut direct, 0.99));
    let (p50, p99) = (
        percentile(&mut proxied, 0.5),
        percentile(&mut proxied, 0.99),
    );
    rows.push((
        "round trip, 16-byte echo (p50 / p99)".into(),
        format!("{d50:.0} / {d99:.0} µs"),
        format!("{p50:.0} / {p99:.0} µs"),
        format!("+{:.0} µs at p50", p50 - d50),
    ));
    let (rate, mut lat) = session_setup(&env, 4).await?;
    rows.push((
        "session setup, SQLite, 4 clients (rate, p50 / p99)".into(),
        "-".into(),
        format!(
            "{rate:.0}/s, {:.2} / {:.2} ms",
            percentile(&mut lat, 0.5),
            percentile(&mut lat, 0.99)
        ),
        "-".into(),
    ));
    let mints = repeat(reps, || mint_rate(&env, 4)).await?;
    rows.push((
        "token minting, XML-RPC keep-alive, SQLite, 4 connections".into(),
        "-".into(),
        format!("{mints:.0}/s"),
        "-".into(),
    ));

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
    let mut md = String::new();
    md.push_str(&format!(
        "Machine: {cores} cores, {cpu}. vncbroker {}. {} run: medians of {} repetitions of {:.1} s each.\n\n",
        env!("CARGO_PKG_VERSION"),
        if opts.quick { "Quick" } else { "Full" },
        reps,
        env.secs
    ));
    md.push_str("| measure | direct TCP | vncbroker | ratio |\n|---|---|---|---|\n");
    for (a, b, c, d) in &rows {
        md.push_str(&format!("| {a} | {b} | {c} | {d} |\n"));
    }
    print!("{md}");
    if let Some(out) = opts.out {
        std::fs::write(&out, &md)?;
    }
    Ok(())
}
