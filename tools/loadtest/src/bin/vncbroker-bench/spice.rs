//! The SPICE section: a stand-in SPICE server for the targets process, the
//! load client's side of a link over any path, and the measurements.
//!
//! The stand-in links every channel as QEMU does on the wire (the link
//! reply with a 1024-bit RSA key, auth selection, the mini header), takes
//! any ticket, and then by channel:
//! - main, id 0: MAIN_INIT with a session id of its own, then quiet;
//! - main, id 1: MAIN_INIT, then agent data as fast as it goes, in 2 KiB
//!   chunks (the agent's largest), which the broker's main-channel filter
//!   reads message by message;
//! - display, id 0: 64 KiB drawing messages as fast as they go (the heavy
//!   channel of a real console, relayed as bytes);
//! - any other: quiet.
//!
//! The key is fixed: the stand-in never decrypts the ticket, so only the
//! broker's sealing of the stored password costs what it costs with QEMU.

use super::*;

/// A 1024-bit RSA public key as SPKI DER (162 bytes), as a SPICE server
/// sends in its link reply.
const KEY_HEX: &str = "30819f300d06092a864886f70d010101050003818d0030818902818100efbf19\
e8b8f80b47adc74bb7b17df992a49021ba8a01ed9ec7ac9969406fbae9bf6b04\
6d0a14777a185a3d550199bd6d5c081c6045607d8fa5b973ada830261a2331b0\
5f905f69497c03db946fb2e590445e97638942c98cb7b99f0046266958e47627\
bd3ce80a7c5f03cd9e3104362e2c9e149e4b4f94cfcbe71bed4b8b86d3020301\
0001";

/// The session ids the stand-in gives its main channels start here.
const FIRST_SESSION: u32 = 0x5e55_1000;

/// The password stored with the broker's SPICE VM: the broker seals it for
/// every link.
pub(super) const PASSWORD: &str = "bench-Spice-pw";

const MAIN: u8 = testkit::spice::CHANNEL_MAIN;
const DISPLAY: u8 = testkit::spice::CHANNEL_DISPLAY;

/// The agent's largest chunk (VD_AGENT_MAX_DATA_SIZE).
const AGENT_CHUNK: usize = 2048;
const DRAW_MESSAGE: usize = 64 * 1024;

fn key() -> Vec<u8> {
    (0..KEY_HEX.len() / 2)
        .filter_map(|i| u8::from_str_radix(&KEY_HEX[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// A mini-header message.
fn message(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut m = kind.to_le_bytes().to_vec();
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    m
}

/// `n` messages of `kind`, `total` bytes each with their headers, bodies
/// of changing bytes.
fn stream_of(kind: u16, total: usize, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(total * n);
    for i in 0..n {
        let body: Vec<u8> = (0..total - 6)
            .map(|j| {
                (j as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(i as u32) as u8
            })
            .collect();
        out.extend(message(kind, &body));
    }
    out
}

/// The stand-in SPICE server; each connection is one channel.
pub(super) async fn server() -> anyhow::Result<SocketAddr> {
    let key: Arc<Vec<u8>> = Arc::new(key());
    anyhow::ensure!(key.len() == 162, "the stand-in's key is not 162 bytes");
    // SPICE_MSG_MAIN_AGENT_DATA, and DRAW_COPY for the display.
    let agent = Arc::new(stream_of(114, AGENT_CHUNK + 6, 256));
    let draw = Arc::new(stream_of(304, DRAW_MESSAGE, 16));
    let sessions = Arc::new(AtomicU64::new(u64::from(FIRST_SESSION)));
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(accept_loop(l, move |s| {
        let (key, agent, draw, sessions) = (
            Arc::clone(&key),
            Arc::clone(&agent),
            Arc::clone(&draw),
            Arc::clone(&sessions),
        );
        tokio::spawn(async move {
            let _ = channel(s, &key, &agent, &draw, &sessions).await;
        });
    }));
    Ok(addr)
}

async fn channel(
    mut s: TcpStream,
    key: &[u8],
    agent: &[u8],
    draw: &[u8],
    sessions: &AtomicU64,
) -> anyhow::Result<()> {
    s.set_nodelay(true)?;
    let mut head = [0u8; 16];
    s.read_exact(&mut head).await?;
    anyhow::ensure!(&head[..4] == b"REDQ", "not SPICE");
    let size = u32::from_le_bytes([head[12], head[13], head[14], head[15]]) as usize;
    anyhow::ensure!((18..=4096).contains(&size), "link message of {size} bytes");
    let mut body = vec![0u8; size];
    s.read_exact(&mut body).await?;
    let (kind, id) = (body[4], body[5]);
    // The reply: no error, the key, one common caps word (auth selection,
    // SPICE auth, mini header) right after the fixed part.
    let mut reply = b"REDQ".to_vec();
    for w in [2u32, 2, 4 + 162 + 12 + 4] {
        reply.extend_from_slice(&w.to_le_bytes());
    }
    reply.extend_from_slice(&0u32.to_le_bytes());
    reply.extend_from_slice(key);
    for w in [1u32, 0, 4 + 162 + 12, 0b1011] {
        reply.extend_from_slice(&w.to_le_bytes());
    }
    s.write_all(&reply).await?;
    // The mechanism word and the ticket, taken as they come.
    let mut ticket = [0u8; 4 + 128];
    s.read_exact(&mut ticket).await?;
    s.write_all(&0u32.to_le_bytes()).await?;
    if kind == MAIN {
        let session = sessions.fetch_add(1, Ordering::Relaxed) as u32;
        let mut init = session.to_le_bytes().to_vec();
        init.resize(32, 0);
        s.write_all(&message(103, &init)).await?;
    }
    match (kind, id) {
        (MAIN, 1) => loop {
            s.write_all(agent).await?;
        },
        (DISPLAY, 0) => loop {
            s.write_all(draw).await?;
        },
        _ => {
            let mut sink = [0u8; 4096];
            while s.read(&mut sink).await? > 0 {}
            Ok(())
        }
    }
}

impl testkit::spice::Pipe for Conn {
    async fn send(&mut self, data: &[u8]) -> Result<(), String> {
        match self {
            Conn::Ws(ws) => ws.send_plain(data).await.map_err(|e| format!("{e:#}")),
            Conn::Raw(s) => s.write_all(data).await.map_err(|e| e.to_string()),
        }
    }

    async fn recv_exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        let mut out = vec![0u8; n];
        match self {
            Conn::Ws(ws) => ws
                .read_exact(&mut out)
                .await
                .map_err(|e| format!("{e:#}"))?,
            Conn::Raw(s) => {
                s.read_exact(&mut out).await.map_err(|e| e.to_string())?;
            }
        }
        Ok(out)
    }
}

/// Opens and links one channel on `via`.
async fn link(via: &Via, connection_id: u32, kind: u8, id: u8) -> anyhow::Result<Conn> {
    let mut c = via.open(256 * 1024, true).await?;
    match testkit::spice::link_channel(&mut c, connection_id, kind, id)
        .await
        .map_err(anyhow::Error::msg)?
    {
        testkit::spice::Linked::Ok => Ok(c),
        other => bail!("the {kind}/{id} channel did not link: {other:?}"),
    }
}

/// A console: its main channel, linked, and the session id it was given.
async fn console(via: &Via, streaming: bool) -> anyhow::Result<(Conn, u32)> {
    let mut main = link(via, 0, MAIN, u8::from(streaming)).await?;
    let session = testkit::spice::main_init(&mut main)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok((main, session))
}

/// Bytes per second read from one channel for `secs`, with the proxy's CPU
/// time: the display channel of a quiet console, or a streaming main.
async fn channel_download(
    via: &Via,
    display: bool,
    secs: f64,
    cpu: Option<Proc>,
) -> anyhow::Result<Flow> {
    let (main, session) = console(via, !display).await?;
    let conn = if display {
        link(via, session, DISPLAY, 0).await?
    } else {
        main
    };
    let total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (t, s) = (Arc::clone(&total), Arc::clone(&stop));
    let task = tokio::spawn(async move {
        let mut conn = conn;
        match &mut conn {
            Conn::Ws(ws) => {
                while !s.load(Ordering::Relaxed) {
                    let n = ws.read_payload().await?;
                    if n == 0 {
                        bail!("the channel closed");
                    }
                    t.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            Conn::Raw(r) => {
                let mut buf = vec![0u8; 256 * 1024];
                while !s.load(Ordering::Relaxed) {
                    let n = r.read(&mut buf).await?;
                    if n == 0 {
                        bail!("the channel closed");
                    }
                    t.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        anyhow::Ok(())
    });
    rate_cpu(
        &total,
        Duration::from_millis(200),
        secs,
        &stop,
        vec![task],
        cpu,
    )
    .await
}

/// Channel links per second for `secs`, one after the other, each a new
/// connection that links a (quiet) display channel to a live console and
/// closes; and each link's time in milliseconds.
async fn link_rate(via: &Via, secs: f64) -> anyhow::Result<(f64, Vec<f64>)> {
    let (_main, session) = console(via, false).await?;
    let mut lat = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        drop(link(via, session, DISPLAY, 1).await?);
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((lat.len() as f64 / t0.elapsed().as_secs_f64(), lat))
}

/// The SPICE rows: the display and main channels' download and the link
/// rate, beside direct TCP, the plain relay and websockify relaying the
/// same SPICE bytes without looking at them.
pub(super) async fn section(
    rep: &mut Report,
    sc: &Scale,
    targets: &Targets,
    broker: &Broker,
    relay: Option<&Relay>,
    wsfy: Option<&Websockify>,
) -> anyhow::Result<()> {
    let (reps, secs) = (sc.reps, sc.secs);
    let paths = || Paths {
        vias: [
            Some(Via::Direct(targets.spice)),
            relay.and_then(|r| r.via("spice").ok()),
            wsfy.map(|w| w.via("spice")),
            broker.via(VM_SPICE).ok(),
        ],
        procs: [
            None,
            relay.map(|r| Proc::Group(r.pgid())),
            wsfy.map(|w| Proc::Group(w.pgid())),
            broker.pid().ok().map(Proc::Pid),
        ],
        relay,
        wsfy,
    };
    for (display, name) in [
        (true, "SPICE display channel, 64 KiB drawing messages"),
        (
            false,
            "SPICE main channel, 2 KiB agent-data messages (filtered)",
        ),
    ] {
        let res = interleave(rep, name, reps, &paths(), |via, p| async move {
            channel_download(&via, display, secs, p).await
        })
        .await?;
        flow_rows(rep, name, &res, false);
    }

    let name = "SPICE channel link, 1 client (password sealed per link)";
    let res = interleave(rep, name, reps, &paths(), |via, _| async move {
        link_rate(&via, secs).await
    })
    .await?;
    setup_row(rep, name, &res)?;
    Ok(())
}
