//! QEMU as a real SPICE server, and the client side of a SPICE channel's
//! link as spice-html5 and remote-viewer speak it, over the broker's
//! WebSocket or a CONNECT tunnel.
//!
//! The client never has the password: its ticket is 128 bytes of noise,
//! which the broker throws away.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::START_TIMEOUT;
use crate::net::{free_port, port_open};
use crate::process::stop_child;
use crate::ws::{Ws, WsEnd};

pub const CHANNEL_MAIN: u8 = 1;
pub const CHANNEL_DISPLAY: u8 = 2;
pub const CHANNEL_INPUTS: u8 = 3;
pub const CHANNEL_CURSOR: u8 = 4;
pub const CHANNEL_PLAYBACK: u8 = 5;
pub const CHANNEL_RECORD: u8 = 6;
pub const CHANNEL_USBREDIR: u8 = 9;
pub const CHANNEL_PORT: u8 = 10;

pub const LINK_ERR_PERMISSION_DENIED: u32 = 7;
pub const LINK_ERR_BAD_CONNECTION_ID: u32 = 8;
pub const LINK_ERR_CHANNEL_NOT_AVAILABLE: u32 = 9;

/// QEMU (TCG, no disk, a QXL card) with its SPICE server on 127.0.0.1.
pub struct SpiceQemu {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
    pub log_path: PathBuf,
}

impl SpiceQemu {
    /// With `password` as the SPICE ticket, or none (`disable-ticketing`).
    pub fn start(password: Option<&str>) -> SpiceQemu {
        SpiceQemu::start_with(password, &[])
    }

    /// With `extra` arguments (devices that add channels).
    pub fn start_with(password: Option<&str>, extra: &[&str]) -> SpiceQemu {
        let mut last = String::new();
        for _ in 0..4 {
            match SpiceQemu::try_start(password, extra) {
                Ok(q) => return q,
                Err(e) => last = e,
            }
        }
        panic!("QEMU with SPICE did not start: {last}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn try_start(password: Option<&str>, extra: &[&str]) -> Result<SpiceQemu, String> {
        let dir = tempfile::Builder::new()
            .prefix("vncbroker-spice-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let log_path = dir.path().join("qemu.log");
        let port = free_port();
        let mut spice = format!("port={port},addr=127.0.0.1");
        let mut args: Vec<String> = Vec::new();
        match password {
            Some(pw) => {
                spice.push_str(",password-secret=spicepw");
                args.extend(["-object".into(), format!("secret,id=spicepw,data={pw}")]);
            }
            None => spice.push_str(",disable-ticketing=on"),
        }
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "accel=tcg",
                "-display",
                "none",
                "-nodefaults",
                "-vga",
                "qxl",
                "-m",
                "64",
                "-spice",
                &spice,
            ])
            .args(&args)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                File::create(&log_path).map_err(|e| e.to_string())?,
            ))
            .spawn()
            .map_err(|e| format!("spawning qemu-system-x86_64: {e}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        while !port_open(port) {
            if let Ok(Some(st)) = child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("qemu exited with {st}: {log}"));
            }
            if Instant::now() > deadline {
                stop_child(&mut child, Duration::from_secs(3));
                return Err(format!("SPICE port {port} never accepted"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(SpiceQemu {
            child,
            port,
            _dir: dir,
            log_path,
        })
    }
}

impl Drop for SpiceQemu {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(3));
    }
}

/// A byte pipe a SPICE channel runs over.
pub trait Pipe {
    fn send(&mut self, data: &[u8]) -> impl Future<Output = Result<(), String>>;
    fn recv_exact(&mut self, n: usize) -> impl Future<Output = Result<Vec<u8>, String>>;
}

impl Pipe for Ws {
    async fn send(&mut self, data: &[u8]) -> Result<(), String> {
        Ws::send(self, data).await.map_err(|e| format!("{e:?}"))
    }
    async fn recv_exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        self.read_exact(n).await.map_err(|e| match e {
            WsEnd::Closed(code, reason) => format!("closed {code} {reason}"),
            other => format!("{other:?}"),
        })
    }
}

impl Pipe for TcpStream {
    async fn send(&mut self, data: &[u8]) -> Result<(), String> {
        self.write_all(data).await.map_err(|e| e.to_string())
    }
    async fn recv_exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        let mut buf = vec![0; n];
        tokio::time::timeout(Duration::from_secs(20), self.read_exact(&mut buf))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(buf)
    }
}

/// How a link ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linked {
    Ok,
    /// The link reply carried this error (the channel was refused).
    Refused(u32),
    /// The link result was this error (the ticket was refused).
    Failed(u32),
}

/// The client's link message: auth selection, SPICE auth and the mini
/// header, as spice-html5 announces them.
pub fn link_message(connection_id: u32, channel_type: u8) -> Vec<u8> {
    link_message_for(connection_id, channel_type, 0)
}

/// [`link_message`] for channel `channel_id` of its type.
pub fn link_message_for(connection_id: u32, channel_type: u8, channel_id: u8) -> Vec<u8> {
    let mut body = connection_id.to_le_bytes().to_vec();
    body.extend_from_slice(&[channel_type, channel_id]);
    for w in [1u32, 0, 18, 0b1011] {
        body.extend_from_slice(&w.to_le_bytes());
    }
    let mut out = b"REDQ".to_vec();
    for w in [2u32, 2, body.len() as u32] {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.extend_from_slice(&body);
    out
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Links one channel with a ticket of noise: the broker's own ticket is
/// what the server checks.
pub async fn link(
    pipe: &mut impl Pipe,
    connection_id: u32,
    channel_type: u8,
) -> Result<Linked, String> {
    link_channel(pipe, connection_id, channel_type, 0).await
}

/// [`link`] for channel `channel_id` of its type.
pub async fn link_channel(
    pipe: &mut impl Pipe,
    connection_id: u32,
    channel_type: u8,
    channel_id: u8,
) -> Result<Linked, String> {
    link_as(pipe, connection_id, channel_type, channel_id, None).await
}

/// Links one channel with a real ticket for `password` (sealed with the
/// key the reply carried), or with noise.
pub async fn link_as(
    pipe: &mut impl Pipe,
    connection_id: u32,
    channel_type: u8,
    channel_id: u8,
    password: Option<&str>,
) -> Result<Linked, String> {
    pipe.send(&link_message_for(connection_id, channel_type, channel_id))
        .await?;
    let head = pipe.recv_exact(16).await?;
    if &head[..4] != b"REDQ" {
        return Err(format!("no REDQ in the reply: {head:?}"));
    }
    let body = pipe.recv_exact(word(&head, 12) as usize).await?;
    let error = word(&body, 0);
    if error != 0 {
        return Ok(Linked::Refused(error));
    }
    let mut ticket = 1u32.to_le_bytes().to_vec();
    match password {
        Some(pw) => {
            use rsa::pkcs8::DecodePublicKey;
            let key = rsa::PublicKey::from_public_key_der(&body[4..166])
                .map_err(|e| format!("the reply's key: {e}"))?;
            let mut plain = pw.as_bytes().to_vec();
            plain.push(0);
            let sealed = key
                .encrypt(
                    &mut getrandom::SysRng,
                    rsa::Oaep::<sha1::Sha1>::new(),
                    &plain,
                )
                .map_err(|e| e.to_string())?;
            ticket.extend_from_slice(&sealed);
        }
        None => ticket.extend((0..128u32).map(|i| (i * 37 + 11) as u8)),
    }
    pipe.send(&ticket).await?;
    let result = word(&pipe.recv_exact(4).await?, 0);
    Ok(if result == 0 {
        Linked::Ok
    } else {
        Linked::Failed(result)
    })
}

/// DISPLAY_INIT's body as spice-gtk sends it: cache ids and sizes.
pub const DISPLAY_INIT: [u8; 14] = [
    1, 0, 0, 0x40, 0x01, 0, 0, 0, 0, // pixmap cache 1, 20 MiB
    1, 0, 0, 0x80, 0, // glz dictionary 1, 8 Mi
];

/// Starts a linked display channel as clients do (DISPLAY_INIT) and reads
/// up to its first drawing; returns the message types it read.
pub async fn start_display(display: &mut impl Pipe) -> Result<Vec<u16>, String> {
    send_message(display, 101, &DISPLAY_INIT).await?;
    let mut kinds = Vec::new();
    // DRAW_COPY: the screen is being drawn.
    while !kinds.contains(&304) {
        if kinds.len() > 256 {
            return Err(format!("no drawing among {kinds:?}"));
        }
        kinds.push(message(display).await?.0);
    }
    Ok(kinds)
}

/// One data message (mini header): its type and body.
pub async fn message(pipe: &mut impl Pipe) -> Result<(u16, Vec<u8>), String> {
    let h = pipe.recv_exact(6).await?;
    let kind = u16::from_le_bytes([h[0], h[1]]);
    let body = pipe.recv_exact(word(&h, 2) as usize).await?;
    Ok((kind, body))
}

/// Reads the main channel up to MAIN_INIT: the session id the other
/// channels link with.
pub async fn main_init(pipe: &mut impl Pipe) -> Result<u32, String> {
    for _ in 0..16 {
        let (kind, body) = message(pipe).await?;
        if kind == 103 && body.len() >= 4 {
            return Ok(word(&body, 0));
        }
    }
    Err("no MAIN_INIT in the main channel's first messages".into())
}

/// Starts the session's other channels as clients do: ATTACH_CHANNELS,
/// answering the server's pings (its network test: a session whose test
/// never finished leaves QEMU's SPICE server stuck when it closes) until
/// CHANNELS_LIST has come and the test is done.
pub async fn attach_channels(main: &mut impl Pipe) -> Result<(), String> {
    send_message(main, 104, &[]).await?;
    // QEMU 7.2's network test is five pings.
    let (mut listed, mut pongs) = (false, 0);
    for _ in 0..64 {
        let (kind, body) = message(main).await?;
        match kind {
            // PING: PONG with its id and time.
            4 if body.len() >= 12 => {
                send_message(main, 3, &body[..12]).await?;
                pongs += 1;
            }
            104 => listed = true,
            _ => {}
        }
        if listed && pongs >= 5 {
            return Ok(());
        }
    }
    Err(format!(
        "after ATTACH_CHANNELS: channels listed {listed}, {pongs} pings"
    ))
}

/// Sends one data message (mini header).
pub async fn send_message(pipe: &mut impl Pipe, kind: u16, body: &[u8]) -> Result<(), String> {
    let mut m = kind.to_le_bytes().to_vec();
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    pipe.send(&m).await
}
