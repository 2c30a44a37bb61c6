//! A small built-in RFB 3.8 (VNC) server for demos and tests.
//!
//! It lets the broker be shown and tested end to end without a real VM: a
//! browser connected through the broker sees a live, animated test picture
//! (colour bars, a scrolling gradient band, a frame counter and a clock-like
//! sweeping marker) that reacts to input — a cross-hair and trail follow the
//! pointer, button 1 paints dots (button 3 clears them), pressed buttons and
//! keys light up indicators — so a person can see their input arrive.
//!
//! The protocol logic has no I/O: the handshake is the shared
//! [`ServerHandshake`] (built by [`handshake`]), and after it a [`Session`]
//! takes client bytes in and hands framebuffer updates out. The async code
//! here only moves bytes between them and a stream, and keeps the time.
//!
//! It is deliberately small and bounded: VNC Authentication only, Raw encoding
//! only, 32-bpp true-colour pixel formats only, client messages parsed strictly
//! (variable-length payloads are discarded as they arrive, never buffered), one
//! fixed-size framebuffer per connection, at most one update held at a time,
//! at most [`MAX_CONNECTIONS`] connections at a time, and at most one
//! incremental update per [`FRAME_INTERVAL`] (about 20 per second).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior};

use crate::rfb::server::{ClientError, Security, ServerHandshake, ServerInit};
use crate::rfb::vncauth::CHALLENGE_LEN;
use crate::rfb::wire::PixelFormat;

/// Framebuffer width in pixels.
pub const WIDTH: u16 = 800;
/// Framebuffer height in pixels.
pub const HEIGHT: u16 = 480;
/// Largest ClientCutText accepted (and discarded); a larger one closes the
/// connection.
pub const MAX_CUT_TEXT: u32 = 1024 * 1024;
/// Connections served at the same time; further ones wait to be accepted.
pub const MAX_CONNECTIONS: usize = 32;
/// Minimum time between two incremental framebuffer updates.
pub const FRAME_INTERVAL: Duration = Duration::from_millis(50);

const W: usize = WIDTH as usize;
const H: usize = HEIGHT as usize;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const READ_BUF_LEN: usize = 4096;

/// The format announced in ServerInit.
const SERVER_FORMAT: PixelFormat = PixelFormat::TRUE_COLOUR_32;

/// Accepts connections on `listener` forever, serving each in its own task.
///
/// Clients must authenticate with VNC Authentication using `password`; the
/// desktop is called `name`. A failing connection just ends (logged at debug
/// level); accept errors are logged and retried after a short pause.
pub async fn serve(listener: TcpListener, password: String, name: String) -> io::Result<()> {
    let password: Arc<[u8]> = Arc::from(password.into_bytes());
    let name: Arc<str> = Arc::from(name);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            // The semaphore is never closed.
            return Ok(());
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "demo VNC server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Small updates (pointer trail) should not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let password = Arc::clone(&password);
        let name = Arc::clone(&name);
        tokio::spawn(async move {
            let _permit = permit;
            match serve_connection(stream, &password, &name).await {
                Ok(()) => tracing::debug!(%peer, "demo VNC connection closed"),
                Err(e) => tracing::debug!(%peer, error = %e, "demo VNC connection ended"),
            }
        });
    }
}

/// Serves one already-accepted connection (any byte stream) until the client
/// disconnects or violates the protocol. Returns `Ok(())` on a clean
/// disconnect by the client.
pub async fn serve_connection<S>(mut stream: S, password: &[u8], name: &str) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut challenge = [0u8; CHALLENGE_LEN];
    getrandom::fill(&mut challenge)
        .map_err(|e| io::Error::other(format!("no randomness for the VNC challenge: {e}")))?;
    let hs = handshake(password, challenge, name);
    let early = tokio::time::timeout(HANDSHAKE_TIMEOUT, run_handshake(&mut stream, hs))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "RFB handshake timed out"))??;
    session(&mut stream, early).await
}

/// The demo server's handshake: VNC Authentication with `password` against
/// `challenge` (fresh random bytes for every connection), then ServerInit for
/// the desktop `name`.
pub fn handshake(password: &[u8], challenge: [u8; CHALLENGE_LEN], name: &str) -> ServerHandshake {
    ServerHandshake::new(Security::vnc_auth(password, challenge)).with_init(ServerInit {
        width: WIDTH,
        height: HEIGHT,
        format: SERVER_FORMAT,
        name: name.to_owned(),
    })
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Runs `hs` over the stream; returns the client's bytes that came after it.
/// A failure the client can be told about is written before the error
/// returns.
async fn run_handshake<S>(s: &mut S, mut hs: ServerHandshake) -> io::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; READ_BUF_LEN];
    loop {
        let out = hs.take_output();
        if !out.is_empty() {
            s.write_all(&out).await?;
        }
        if hs.is_done() {
            s.flush().await?;
            return Ok(hs.take_leftovers());
        }
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed the connection during the RFB handshake",
            ));
        }
        if let Err(e) = hs.feed(buf.get(..n).unwrap_or_default()) {
            s.write_all(&hs.take_output()).await?;
            s.flush().await?;
            let kind = match e {
                ClientError::AuthFailed => io::ErrorKind::PermissionDenied,
                _ => io::ErrorKind::InvalidData,
            };
            return Err(io::Error::new(kind, e));
        }
    }
}

/// Normal operation after the handshake: moves bytes between the stream and
/// a [`Session`], and keeps the time. `early` holds client messages that
/// arrived with the end of the handshake.
async fn session<S>(s: &mut S, early: Vec<u8>) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let mut session = Session::new();
    let mut input = early;
    let mut buf = vec![0u8; READ_BUF_LEN];
    let mut ticker = tokio::time::interval(FRAME_INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);

    loop {
        // Every complete message so far; an update asked for at once is
        // written before the next message is handled.
        let mut used = 0;
        loop {
            let rest = input.get(used..).unwrap_or_default();
            let (n, update) = session.receive(rest, start.elapsed())?;
            used += n;
            match update {
                Some(update) => s.write_all(update).await?,
                None => break,
            }
        }
        // What is left is less than one message.
        input.drain(..used.min(input.len()));

        tokio::select! {
            read = s.read(&mut buf) => {
                let n = read?;
                if n == 0 {
                    return Ok(());
                }
                input.extend_from_slice(buf.get(..n).unwrap_or_default());
            }
            _ = ticker.tick(), if session.wants_tick() => {
                if let Some(update) = session.tick(start.elapsed()) {
                    s.write_all(update).await?;
                }
            }
        }
    }
}

/// The demo's side of a connection after the handshake, without I/O: client
/// messages in, framebuffer updates out, the time given by the caller.
pub struct Session {
    screen: Screen,
    conv: Converter,
    parser: MsgParser,
    /// The area of an incremental update request not answered yet.
    pending: Option<Area>,
    /// The update being handed out.
    out: Vec<u8>,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    pub fn new() -> Session {
        Session {
            screen: Screen::new(),
            conv: Converter::server(),
            parser: MsgParser::default(),
            pending: None,
            out: Vec::new(),
        }
    }

    /// Handles client messages from the front of `input`, `elapsed` into the
    /// connection, until one asks for an update at once. Returns how many
    /// bytes it used and that update; write it out, then call again with the
    /// rest. Bytes of an incomplete message are not used. An error means the
    /// connection must be closed.
    pub fn receive(
        &mut self,
        input: &[u8],
        elapsed: Duration,
    ) -> io::Result<(usize, Option<&[u8]>)> {
        let mut used = 0;
        loop {
            let (n, msg) = self.parser.parse(input.get(used..).unwrap_or_default())?;
            if n == 0 {
                return Ok((used, None));
            }
            used += n;
            match msg {
                Some(ClientMsg::SetPixelFormat(pf)) => self.conv = Converter::new(&pf)?,
                Some(ClientMsg::UpdateRequest {
                    incremental: false,
                    area,
                }) => {
                    // Non-incremental: the client wants it all, now.
                    self.screen.render(elapsed);
                    self.screen
                        .encode_update(area, &self.conv, true, &mut self.out);
                    self.pending = None;
                    return Ok((used, Some(&self.out)));
                }
                Some(ClientMsg::UpdateRequest {
                    incremental: true,
                    area,
                }) => {
                    self.pending = Some(self.pending.map_or(area, |p| p.union(area)));
                }
                Some(ClientMsg::Key { down, keysym }) => self.screen.key(down, keysym),
                Some(ClientMsg::Pointer { buttons, x, y }) => self.screen.pointer(buttons, x, y),
                Some(ClientMsg::SetEncodings { .. } | ClientMsg::CutText { .. }) | None => {}
            }
        }
    }

    /// Whether an incremental update is waiting: then call [`tick`](Self::tick)
    /// every [`FRAME_INTERVAL`].
    pub fn wants_tick(&self) -> bool {
        self.pending.is_some()
    }

    /// The incremental update due `elapsed` into the connection, if anything
    /// in the requested area changed; otherwise the request waits for the
    /// next tick.
    pub fn tick(&mut self, elapsed: Duration) -> Option<&[u8]> {
        let area = self.pending?;
        self.screen.render(elapsed);
        if !self
            .screen
            .encode_update(area, &self.conv, false, &mut self.out)
        {
            return None;
        }
        self.pending = None;
        Some(&self.out)
    }
}

/// Turns 0x00RRGGBB pixels into the client's pixel format (32 bpp, true colour,
/// any maxima and shifts, either byte order) via per-channel lookup tables.
struct Converter {
    red: [u32; 256],
    green: [u32; 256],
    blue: [u32; 256],
    big_endian: bool,
}

impl Converter {
    /// For the format announced in ServerInit, which is always supported.
    fn server() -> Converter {
        Converter::tables(&SERVER_FORMAT)
    }

    fn new(pf: &PixelFormat) -> io::Result<Converter> {
        if pf.bits_per_pixel != 32 || !pf.true_colour {
            return Err(invalid(
                "unsupported pixel format (only 32 bpp true colour is supported)",
            ));
        }
        if pf.red_shift > 31 || pf.green_shift > 31 || pf.blue_shift > 31 {
            return Err(invalid("pixel format shift out of range"));
        }
        Ok(Converter::tables(pf))
    }

    /// The lookup tables for `pf`, whose shifts must be at most 31.
    fn tables(pf: &PixelFormat) -> Converter {
        Converter {
            red: channel_table(pf.red_max, pf.red_shift),
            green: channel_table(pf.green_max, pf.green_shift),
            blue: channel_table(pf.blue_max, pf.blue_shift),
            big_endian: pf.big_endian,
        }
    }

    fn pixel(&self, rgb: u32) -> [u8; 4] {
        let [_, r, g, b] = rgb.to_be_bytes();
        let value =
            self.red[usize::from(r)] | self.green[usize::from(g)] | self.blue[usize::from(b)];
        if self.big_endian {
            value.to_be_bytes()
        } else {
            value.to_le_bytes()
        }
    }
}

/// Maps an 8-bit channel value to `0..=max`, shifted into place.
/// `shift` must be at most 31.
fn channel_table(max: u16, shift: u8) -> [u32; 256] {
    let mut table = [0u32; 256];
    for (v, entry) in (0u32..).zip(table.iter_mut()) {
        let scaled = (v * u32::from(max) + 127) / 255;
        *entry = scaled << shift;
    }
    table
}

/// A rectangle as sent in FramebufferUpdateRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Area {
    x: u16,
    y: u16,
    w: u16,
    h: u16,
}

impl Area {
    fn is_empty(&self) -> bool {
        self.w == 0 || self.h == 0
    }

    /// Bounding box of both areas.
    fn union(self, other: Area) -> Area {
        if self.is_empty() {
            return other;
        }
        if other.is_empty() {
            return self;
        }
        let x0 = self.x.min(other.x);
        let y0 = self.y.min(other.y);
        let x1 =
            (u32::from(self.x) + u32::from(self.w)).max(u32::from(other.x) + u32::from(other.w));
        let y1 =
            (u32::from(self.y) + u32::from(self.h)).max(u32::from(other.y) + u32::from(other.h));
        Area {
            x: x0,
            y: y0,
            w: u16::try_from(x1 - u32::from(x0)).unwrap_or(u16::MAX),
            h: u16::try_from(y1 - u32::from(y0)).unwrap_or(u16::MAX),
        }
    }

    /// `(x0, y0, x1, y1)` clipped to the framebuffer, end-exclusive.
    fn clip(&self) -> (usize, usize, usize, usize) {
        let x0 = usize::from(self.x).min(W);
        let y0 = usize::from(self.y).min(H);
        let x1 = (usize::from(self.x) + usize::from(self.w)).min(W);
        let y1 = (usize::from(self.y) + usize::from(self.h)).min(H);
        (x0, y0, x1, y1)
    }
}

/// A parsed client-to-server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientMsg {
    SetPixelFormat(PixelFormat),
    /// The encodings themselves are skipped by the parser.
    SetEncodings {
        count: u16,
    },
    UpdateRequest {
        incremental: bool,
        area: Area,
    },
    Key {
        down: bool,
        keysym: u32,
    },
    Pointer {
        buttons: u8,
        x: u16,
        y: u16,
    },
    /// The text itself is skipped (discarded) by the parser.
    CutText {
        len: u32,
    },
}

/// Incremental, strictly bounded parser for client messages. Variable-length
/// payloads (the encoding list, cut text) are skipped without being buffered.
#[derive(Debug, Default)]
struct MsgParser {
    /// Payload bytes still to discard.
    skip: u64,
}

impl MsgParser {
    /// Parses at most one message from the front of `buf`. Returns how many
    /// bytes were used (0: more input needed) and the message, if one was
    /// completed. Errors mean the connection must be closed.
    fn parse(&mut self, buf: &[u8]) -> io::Result<(usize, Option<ClientMsg>)> {
        if self.skip > 0 {
            let n = buf
                .len()
                .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
            self.skip -= n as u64;
            return Ok((n, None));
        }
        let Some(&kind) = buf.first() else {
            return Ok((0, None));
        };
        let len = match kind {
            0 => 20,
            2 => 4,
            3 => 10,
            4 => 8,
            5 => 6,
            6 => 8,
            _ => return Err(invalid("unknown client message type")),
        };
        let Some(m) = buf.get(..len) else {
            return Ok((0, None));
        };
        let byte = |i: usize| m.get(i).copied().unwrap_or(0);
        let be16 = |i: usize| u16::from_be_bytes([byte(i), byte(i + 1)]);
        let be32 = |i: usize| u32::from_be_bytes([byte(i), byte(i + 1), byte(i + 2), byte(i + 3)]);
        let msg = match kind {
            0 => {
                let mut pf = [0u8; PixelFormat::LEN];
                for (i, b) in pf.iter_mut().enumerate() {
                    *b = byte(4 + i);
                }
                ClientMsg::SetPixelFormat(PixelFormat::decode(&pf))
            }
            2 => {
                let count = be16(2);
                self.skip = u64::from(count) * 4;
                ClientMsg::SetEncodings { count }
            }
            3 => ClientMsg::UpdateRequest {
                incremental: byte(1) != 0,
                area: Area {
                    x: be16(2),
                    y: be16(4),
                    w: be16(6),
                    h: be16(8),
                },
            },
            4 => ClientMsg::Key {
                down: byte(1) != 0,
                keysym: be32(4),
            },
            5 => ClientMsg::Pointer {
                buttons: byte(1),
                x: be16(2),
                y: be16(4),
            },
            _ => {
                let len = be32(4);
                if len > MAX_CUT_TEXT {
                    return Err(invalid("client cut text too long"));
                }
                self.skip = u64::from(len);
                ClientMsg::CutText { len }
            }
        };
        Ok((len, Some(msg)))
    }
}

// ---------------------------------------------------------------------------
// The picture.

const BARS_END: usize = 140;
const BAND_END: usize = 180;
const BAR_COLOURS: [u32; 8] = [
    0xffffff, 0xffff00, 0x00ffff, 0x00ff00, 0xff00ff, 0xff0000, 0x0000ff, 0x000000,
];
const PANEL: u32 = 0x1c1c28;
const GRID: u32 = 0x30304a;
const TRAIL_LEN: usize = 24;
const MAX_DOTS: usize = 2048;
const CLOCK_X: i32 = 620;
const CLOCK_Y: i32 = 330;
const CLOCK_R: f32 = 110.0;
/// Never produced by rendering (colours are 0x00RRGGBB): marks pixels whose
/// contents the client does not have.
const UNKNOWN: u32 = 0xffff_ffff;

/// 3x5 digit glyphs, one 3-bit row mask per line (bit 2 = left column).
const DIGITS: [[u8; 5]; 10] = [
    [0b111, 0b101, 0b101, 0b101, 0b111],
    [0b010, 0b110, 0b010, 0b010, 0b111],
    [0b111, 0b001, 0b111, 0b100, 0b111],
    [0b111, 0b001, 0b111, 0b001, 0b111],
    [0b101, 0b101, 0b111, 0b001, 0b001],
    [0b111, 0b100, 0b111, 0b001, 0b111],
    [0b111, 0b100, 0b111, 0b101, 0b111],
    [0b111, 0b001, 0b010, 0b010, 0b010],
    [0b111, 0b101, 0b111, 0b101, 0b111],
    [0b111, 0b101, 0b111, 0b001, 0b111],
];

/// Per-connection picture state: the current frame, the client's copy of it,
/// and the (bounded) input history drawn on top.
struct Screen {
    fb: Vec<u32>,
    sent: Vec<u32>,
    pointer: Option<(i32, i32)>,
    buttons: u8,
    trail: [(i32, i32); TRAIL_LEN],
    trail_len: usize,
    trail_next: usize,
    dots: Vec<(i32, i32)>,
    dots_next: usize,
    key_down: bool,
    last_keysym: u32,
    key_presses: u32,
}

impl Screen {
    fn new() -> Screen {
        Screen {
            fb: vec![0; W * H],
            sent: vec![UNKNOWN; W * H],
            pointer: None,
            buttons: 0,
            trail: [(0, 0); TRAIL_LEN],
            trail_len: 0,
            trail_next: 0,
            dots: Vec::with_capacity(MAX_DOTS),
            dots_next: 0,
            key_down: false,
            last_keysym: 0,
            key_presses: 0,
        }
    }

    fn pointer(&mut self, buttons: u8, x: u16, y: u16) {
        let pos = (i32::from(x), i32::from(y));
        if self.pointer != Some(pos) {
            self.trail[self.trail_next] = pos;
            self.trail_next = (self.trail_next + 1) % TRAIL_LEN;
            self.trail_len = (self.trail_len + 1).min(TRAIL_LEN);
        }
        if buttons & 1 != 0 {
            // Button 1 paints; the oldest dots are recycled.
            if self.dots.len() < MAX_DOTS {
                self.dots.push(pos);
            } else if let Some(slot) = self.dots.get_mut(self.dots_next) {
                *slot = pos;
                self.dots_next = (self.dots_next + 1) % MAX_DOTS;
            }
        }
        if buttons & 4 != 0 && self.buttons & 4 == 0 {
            // Button 3 pressed: clear the painting.
            self.dots.clear();
            self.dots_next = 0;
        }
        self.pointer = Some(pos);
        self.buttons = buttons;
    }

    fn key(&mut self, down: bool, keysym: u32) {
        if down {
            self.key_presses = self.key_presses.wrapping_add(1);
            self.last_keysym = keysym;
        }
        self.key_down = down;
    }

    /// Draws the frame for time `elapsed` since the connection started.
    fn render(&mut self, elapsed: Duration) {
        let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        let frame = ms / FRAME_INTERVAL.as_millis().max(1) as u64;
        let fb = &mut self.fb;

        // Static colour bars.
        for row in fb.chunks_exact_mut(W).take(BARS_END) {
            for (x, px) in row.iter_mut().enumerate() {
                *px = BAR_COLOURS[(x * BAR_COLOURS.len() / W).min(BAR_COLOURS.len() - 1)];
            }
        }
        // A hue band scrolling to the right.
        let shift = (frame % 1536 * 12 % 1536) as usize;
        let mut band = [0u32; W];
        for (x, px) in band.iter_mut().enumerate() {
            *px = hue((x * 1536 / W + 1536 - shift) % 1536);
        }
        for row in fb
            .chunks_exact_mut(W)
            .skip(BARS_END)
            .take(BAND_END - BARS_END)
        {
            row.copy_from_slice(&band);
        }
        // Panel with a grid.
        for (y, row) in fb.chunks_exact_mut(W).enumerate().skip(BAND_END) {
            if y % 40 == 0 {
                row.fill(GRID);
            } else {
                for (x, px) in row.iter_mut().enumerate() {
                    *px = if x % 40 == 0 { GRID } else { PANEL };
                }
            }
        }

        // Frame counter.
        draw_number(fb, 24, 196, 8, frame, 0xffffff);

        // Clock face and a sweeping hand (one turn per 10 s).
        for i in 0..60 {
            let a = i as f32 * std::f32::consts::TAU / 60.0;
            let (x, y) = polar(a, CLOCK_R);
            let size = if i % 5 == 0 { 8 } else { 4 };
            fill_rect(fb, x - size / 2, y - size / 2, size, size, 0x9090a0);
        }
        let angle = (ms % 10_000) as f32 / 10_000.0 * std::f32::consts::TAU;
        for step in 0..=20 {
            let (x, y) = polar(angle, CLOCK_R * 0.85 * step as f32 / 20.0);
            fill_rect(fb, x - 2, y - 2, 5, 5, 0xe0e0e0);
        }
        let (tx, ty) = polar(angle, CLOCK_R * 0.85);
        fill_rect(fb, tx - 7, ty - 7, 15, 15, 0xffc000);
        fill_rect(fb, CLOCK_X - 5, CLOCK_Y - 5, 11, 11, 0xffffff);

        // Keyboard: lit while a key is down, the last keysym's low 16 bits,
        // and the number of key presses.
        let key_colour = if self.key_down { 0x20e040 } else { 0x304030 };
        fill_rect(fb, 24, 300, 48, 48, key_colour);
        for bit in 0..16 {
            let on = self.last_keysym >> (15 - bit) & 1 != 0;
            let colour = if on { 0x20e040 } else { 0x404050 };
            fill_rect(fb, 88 + bit * 12, 318, 10, 10, colour);
        }
        draw_number(fb, 24, 360, 5, u64::from(self.key_presses), 0x20e040);

        // Pointer buttons 1..5.
        for b in 0..5 {
            let on = self.buttons >> b & 1 != 0;
            let colour = if on { 0xff4040 } else { 0x404050 };
            fill_rect(fb, 24 + b * 36, 420, 28, 28, colour);
        }

        // Painted dots.
        for (i, &(x, y)) in self.dots.iter().enumerate() {
            fill_rect(fb, x - 4, y - 4, 8, 8, hue(i * 37 % 1536));
        }
        // Trail, oldest first, getting brighter.
        for age in (0..self.trail_len).rev() {
            let idx = (self.trail_next + TRAIL_LEN - 1 - age) % TRAIL_LEN;
            let (x, y) = self.trail[idx];
            let level = (255 - age * 180 / TRAIL_LEN) as u32;
            fill_rect(fb, x - 3, y - 3, 6, 6, level << 8 | level);
        }
        // Cross-hair at the pointer.
        if let Some((x, y)) = self.pointer {
            let colour = if self.buttons & 1 != 0 {
                0xffff00
            } else {
                0xffffff
            };
            fill_rect(fb, x - 15, y - 1, 31, 3, colour);
            fill_rect(fb, x - 1, y - 15, 3, 31, colour);
            fill_rect(fb, x - 3, y - 3, 7, 7, 0xff2020);
        }
    }

    /// Builds a FramebufferUpdate for `area` into `out`. With `full`, the whole
    /// (clipped) area is sent; otherwise only the rows that differ from what
    /// the client has, trimmed to the changed columns, one rectangle per run of
    /// changed rows. Returns false (and leaves `out` alone) if there is nothing
    /// to send.
    fn encode_update(
        &mut self,
        area: Area,
        conv: &Converter,
        full: bool,
        out: &mut Vec<u8>,
    ) -> bool {
        let (x0, y0, x1, y1) = area.clip();
        // (x, y, w, h); at most one per row, so bounded by H.
        let mut rects: Vec<(usize, usize, usize, usize)> = Vec::new();
        if full {
            if x1 > x0 && y1 > y0 {
                rects.push((x0, y0, x1 - x0, y1 - y0));
            }
        } else {
            // Current run of changed rows: (first row, min x, max x exclusive).
            let mut run: Option<(usize, usize, usize)> = None;
            for y in y0..y1 {
                let range = y * W + x0..y * W + x1;
                let (Some(cur), Some(old)) = (self.fb.get(range.clone()), self.sent.get(range))
                else {
                    continue;
                };
                let first = cur.iter().zip(old).position(|(a, b)| a != b);
                if let Some(first) = first {
                    let last = cur
                        .iter()
                        .zip(old)
                        .rposition(|(a, b)| a != b)
                        .unwrap_or(first);
                    let (lx, rx) = (x0 + first, x0 + last + 1);
                    run = Some(match run {
                        Some((sy, min, max)) => (sy, min.min(lx), max.max(rx)),
                        None => (y, lx, rx),
                    });
                } else if let Some((sy, min, max)) = run.take() {
                    rects.push((min, sy, max - min, y - sy));
                }
            }
            if let Some((sy, min, max)) = run {
                rects.push((min, sy, max - min, y1 - sy));
            }
            if rects.is_empty() {
                return false;
            }
        }

        out.clear();
        let pixels: usize = rects.iter().map(|&(_, _, w, h)| w * h).sum();
        out.reserve(4 + rects.len() * 12 + pixels * 4);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&u16::try_from(rects.len()).unwrap_or(0).to_be_bytes());
        for &(x, y, w, h) in &rects {
            for v in [x, y, w, h] {
                out.extend_from_slice(&u16::try_from(v).unwrap_or(0).to_be_bytes());
            }
            out.extend_from_slice(&0i32.to_be_bytes()); // Raw
            for row in y..y + h {
                let range = row * W + x..row * W + x + w;
                let (Some(cur), Some(old)) = (self.fb.get(range.clone()), self.sent.get_mut(range))
                else {
                    continue;
                };
                for &px in cur {
                    out.extend_from_slice(&conv.pixel(px));
                }
                old.copy_from_slice(cur);
            }
        }
        true
    }
}

/// Screen position at `angle` (0 = 12 o'clock, clockwise) and `radius` from
/// the clock centre.
fn polar(angle: f32, radius: f32) -> (i32, i32) {
    let x = CLOCK_X as f32 + radius * angle.sin();
    let y = CLOCK_Y as f32 - radius * angle.cos();
    (x.round() as i32, y.round() as i32)
}

/// A fully saturated colour for hue `h` in `0..1536`.
fn hue(h: usize) -> u32 {
    let f = (h % 256) as u32;
    let (r, g, b) = match h % 1536 / 256 {
        0 => (255, f, 0),
        1 => (255 - f, 255, 0),
        2 => (0, 255, f),
        3 => (0, 255 - f, 255),
        4 => (f, 0, 255),
        _ => (255, 0, 255 - f),
    };
    r << 16 | g << 8 | b
}

/// Fills a rectangle, clipped to the framebuffer (any coordinates are safe).
fn fill_rect(fb: &mut [u32], x: i32, y: i32, w: i32, h: i32, colour: u32) {
    let (wi, hi) = (W as i32, H as i32);
    let x0 = x.clamp(0, wi);
    let x1 = x.saturating_add(w).clamp(0, wi);
    let y0 = y.clamp(0, hi);
    let y1 = y.saturating_add(h).clamp(0, hi);
    if x1 <= x0 || y1 <= y0 {
        return;
    }
    for row in y0 as usize..y1 as usize {
        if let Some(span) = fb.get_mut(row * W + x0 as usize..row * W + x1 as usize) {
            span.fill(colour);
        }
    }
}

/// Draws `n` in decimal with the 3x5 block font, each block `scale` pixels.
fn draw_number(fb: &mut [u32], x: i32, y: i32, scale: i32, n: u64, colour: u32) {
    for (i, c) in n.to_string().bytes().enumerate() {
        let Some(glyph) = DIGITS.get(usize::from(c.wrapping_sub(b'0'))) else {
            continue;
        };
        let gx = x + i as i32 * 4 * scale;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..3 {
                if bits >> (2 - col) & 1 != 0 {
                    fill_rect(
                        fb,
                        gx + col * scale,
                        y + row as i32 * scale,
                        scale,
                        scale,
                        colour,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rfb::server::{REASON_ONLY_VNC_AUTH, REASON_VERSION};
    use crate::rfb::vncauth;
    use std::net::SocketAddr;
    use tokio::net::TcpStream;

    const PASSWORD: &str = "demo-pw";
    const FULL: Area = Area {
        x: 0,
        y: 0,
        w: WIDTH,
        h: HEIGHT,
    };
    const TEST_TIMEOUT: Duration = Duration::from_secs(30);

    async fn start_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, PASSWORD.into(), "rfbwork demo".into()));
        addr
    }

    /// A minimal RFB client for the tests, keeping its own framebuffer copy
    /// in whatever pixel format it asked for.
    struct TestClient {
        s: TcpStream,
        fb: Vec<u8>,
    }

    impl TestClient {
        async fn connect(addr: SocketAddr, version: &[u8]) -> TcpStream {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut v = [0u8; 12];
            s.read_exact(&mut v).await.unwrap();
            assert_eq!(&v, b"RFB 003.008\n");
            s.write_all(version).await.unwrap();
            let mut types = [0u8; 2];
            s.read_exact(&mut types).await.unwrap();
            assert_eq!(types, [1, 2], "only VNC Authentication is offered");
            s
        }

        /// Logs in; returns the SecurityResult value (and the open stream).
        async fn authenticate(s: &mut TcpStream, password: &[u8]) -> u32 {
            s.write_all(&[2]).await.unwrap();
            let mut challenge = [0u8; 16];
            s.read_exact(&mut challenge).await.unwrap();
            s.write_all(&vncauth::response(password, &challenge))
                .await
                .unwrap();
            s.read_u32().await.unwrap()
        }

        async fn login(addr: SocketAddr, version: &[u8]) -> TestClient {
            let mut s = Self::connect(addr, version).await;
            assert_eq!(Self::authenticate(&mut s, PASSWORD.as_bytes()).await, 0);
            s.write_all(&[1]).await.unwrap(); // ClientInit, shared
            assert_eq!(s.read_u16().await.unwrap(), WIDTH);
            assert_eq!(s.read_u16().await.unwrap(), HEIGHT);
            let mut pf = [0u8; PixelFormat::LEN];
            s.read_exact(&mut pf).await.unwrap();
            assert_eq!(PixelFormat::decode(&pf), SERVER_FORMAT);
            assert_eq!(
                pf[..13],
                [32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0],
                "32bpp depth 24 little-endian true colour, shifts 16/8/0"
            );
            let len = s.read_u32().await.unwrap() as usize;
            let mut name = vec![0u8; len];
            s.read_exact(&mut name).await.unwrap();
            assert_eq!(name, b"rfbwork demo");
            TestClient {
                s,
                fb: vec![0; W * H * 4],
            }
        }

        async fn set_pixel_format(&mut self, pf: &PixelFormat) {
            let mut msg = vec![0u8, 0, 0, 0];
            msg.extend_from_slice(&pf.encode());
            self.s.write_all(&msg).await.unwrap();
        }

        async fn set_encodings(&mut self, encodings: &[i32]) {
            let mut msg = vec![2u8, 0];
            msg.extend_from_slice(&(encodings.len() as u16).to_be_bytes());
            for e in encodings {
                msg.extend_from_slice(&e.to_be_bytes());
            }
            self.s.write_all(&msg).await.unwrap();
        }

        async fn request(&mut self, incremental: bool, a: Area) {
            let mut msg = vec![3u8, u8::from(incremental)];
            for v in [a.x, a.y, a.w, a.h] {
                msg.extend_from_slice(&v.to_be_bytes());
            }
            self.s.write_all(&msg).await.unwrap();
        }

        async fn pointer(&mut self, buttons: u8, x: u16, y: u16) {
            let mut msg = vec![5u8, buttons];
            msg.extend_from_slice(&x.to_be_bytes());
            msg.extend_from_slice(&y.to_be_bytes());
            self.s.write_all(&msg).await.unwrap();
        }

        /// Reads one FramebufferUpdate, applies it, returns its rectangles.
        async fn read_update(&mut self) -> Vec<Area> {
            assert_eq!(self.s.read_u8().await.unwrap(), 0, "FramebufferUpdate");
            self.s.read_u8().await.unwrap();
            let n = self.s.read_u16().await.unwrap();
            let mut rects = Vec::new();
            for _ in 0..n {
                let a = Area {
                    x: self.s.read_u16().await.unwrap(),
                    y: self.s.read_u16().await.unwrap(),
                    w: self.s.read_u16().await.unwrap(),
                    h: self.s.read_u16().await.unwrap(),
                };
                assert_eq!(self.s.read_i32().await.unwrap(), 0, "Raw encoding");
                assert!(usize::from(a.x) + usize::from(a.w) <= W);
                assert!(usize::from(a.y) + usize::from(a.h) <= H);
                let mut data = vec![0u8; usize::from(a.w) * usize::from(a.h) * 4];
                self.s.read_exact(&mut data).await.unwrap();
                let row_len = usize::from(a.w) * 4;
                for (r, row) in data.chunks_exact(row_len.max(1)).enumerate() {
                    let start = ((usize::from(a.y) + r) * W + usize::from(a.x)) * 4;
                    self.fb[start..start + row_len].copy_from_slice(row);
                }
                rects.push(a);
            }
            rects
        }

        fn pixel(&self, x: usize, y: usize) -> [u8; 4] {
            let i = (y * W + x) * 4;
            self.fb[i..i + 4].try_into().unwrap()
        }

        /// Waits for the server to close the connection (EOF or reset),
        /// discarding anything it still sends.
        async fn expect_closed(&mut self) {
            let mut buf = vec![0u8; 65536];
            loop {
                match self.s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        }
    }

    async fn timed<F: std::future::Future<Output = ()>>(f: F) {
        tokio::time::timeout(TEST_TIMEOUT, f)
            .await
            .expect("test timed out");
    }

    #[tokio::test]
    async fn full_frame_after_handshake() {
        timed(async {
            let addr = start_server().await;
            let mut c = TestClient::login(addr, b"RFB 003.008\n").await;
            c.set_pixel_format(&SERVER_FORMAT).await;
            c.set_encodings(&[0, 1, -239, 7, 16]).await;
            c.request(false, FULL).await;
            let rects = c.read_update().await;
            assert_eq!(rects, [FULL]);
            // Colour bars, little-endian 0x00RRGGBB: white, then yellow.
            assert_eq!(c.pixel(10, 10), [0xff, 0xff, 0xff, 0]);
            assert_eq!(c.pixel(150, 10), [0x00, 0xff, 0xff, 0]);
            assert_eq!(c.pixel(790, 10), [0, 0, 0, 0]);
        })
        .await;
    }

    #[tokio::test]
    async fn client_37_is_served() {
        timed(async {
            let addr = start_server().await;
            let mut c = TestClient::login(addr, b"RFB 003.007\n").await;
            c.request(
                false,
                Area {
                    x: 10,
                    y: 20,
                    w: 30,
                    h: 40,
                },
            )
            .await;
            assert_eq!(
                c.read_update().await,
                [Area {
                    x: 10,
                    y: 20,
                    w: 30,
                    h: 40
                }]
            );
        })
        .await;
    }

    #[tokio::test]
    async fn wrong_password_gets_reason_and_close() {
        timed(async {
            let addr = start_server().await;
            let mut s = TestClient::connect(addr, b"RFB 003.008\n").await;
            assert_eq!(TestClient::authenticate(&mut s, b"wrong").await, 1);
            let len = s.read_u32().await.unwrap() as usize;
            let mut reason = vec![0u8; len];
            s.read_exact(&mut reason).await.unwrap();
            assert_eq!(reason, b"authentication failed");
            let mut c = TestClient { s, fb: Vec::new() };
            c.expect_closed().await;
        })
        .await;
    }

    #[tokio::test]
    async fn wrong_password_37_has_no_reason() {
        timed(async {
            let addr = start_server().await;
            let mut s = TestClient::connect(addr, b"RFB 003.007\n").await;
            assert_eq!(TestClient::authenticate(&mut s, b"").await, 1);
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            assert!(rest.is_empty());
        })
        .await;
    }

    #[tokio::test]
    async fn client_33_is_refused_with_reason() {
        timed(async {
            let addr = start_server().await;
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut v = [0u8; 12];
            s.read_exact(&mut v).await.unwrap();
            s.write_all(b"RFB 003.003\n").await.unwrap();
            assert_eq!(s.read_u32().await.unwrap(), 0);
            let len = s.read_u32().await.unwrap() as usize;
            let mut reason = vec![0u8; len];
            s.read_exact(&mut reason).await.unwrap();
            assert_eq!(reason, REASON_VERSION.as_bytes());
        })
        .await;
    }

    #[tokio::test]
    async fn wrong_security_type_is_refused() {
        timed(async {
            let addr = start_server().await;
            let mut s = TestClient::connect(addr, b"RFB 003.008\n").await;
            s.write_all(&[1]).await.unwrap();
            assert_eq!(s.read_u32().await.unwrap(), 1);
            let len = s.read_u32().await.unwrap() as usize;
            let mut reason = vec![0u8; len];
            s.read_exact(&mut reason).await.unwrap();
            assert_eq!(reason, REASON_ONLY_VNC_AUTH.as_bytes());
        })
        .await;
    }

    #[tokio::test]
    async fn pointer_event_changes_pixels_near_pointer() {
        timed(async {
            let addr = start_server().await;
            let mut c = TestClient::login(addr, b"RFB 003.008\n").await;
            c.set_encodings(&[0]).await;
            c.request(false, FULL).await;
            c.read_update().await;
            let (px, py) = (300usize, 430usize);
            let before = c.pixel(px, py);
            let beside = c.pixel(px + 40, py);

            c.pointer(0, px as u16, py as u16).await;
            let mut changed = false;
            for _ in 0..40 {
                c.request(true, FULL).await;
                let rects = c.read_update().await;
                let area: usize = rects
                    .iter()
                    .map(|a| usize::from(a.w) * usize::from(a.h))
                    .sum();
                assert!(area < W * H, "incremental updates carry only changes");
                if c.pixel(px, py) != before {
                    changed = true;
                    break;
                }
            }
            assert!(changed, "the pointer position shows a marker");
            // Red centre of the cross-hair (0xff2020, little-endian).
            assert_eq!(c.pixel(px, py), [0x20, 0x20, 0xff, 0]);
            // Far enough away, nothing changed.
            assert_eq!(c.pixel(px + 40, py), beside);
        })
        .await;
    }

    #[tokio::test]
    async fn big_endian_pixel_format_is_honoured() {
        timed(async {
            let addr = start_server().await;
            let mut c = TestClient::login(addr, b"RFB 003.008\n").await;
            let pf = PixelFormat {
                big_endian: true,
                red_shift: 0,
                green_shift: 8,
                blue_shift: 16,
                ..SERVER_FORMAT
            };
            c.set_pixel_format(&pf).await;
            c.request(false, FULL).await;
            c.read_update().await;
            // Yellow (r=255, g=255, b=0) -> 0x0000ffff, big-endian.
            assert_eq!(c.pixel(150, 10), [0, 0, 0xff, 0xff]);
            // Blue -> 0x00ff0000.
            assert_eq!(c.pixel(650, 10), [0, 0xff, 0, 0]);
        })
        .await;
    }

    #[tokio::test]
    async fn oversized_cut_text_closes() {
        timed(async {
            let addr = start_server().await;
            let mut c = TestClient::login(addr, b"RFB 003.008\n").await;
            let mut msg = vec![6u8, 0, 0, 0];
            msg.extend_from_slice(&(MAX_CUT_TEXT + 1).to_be_bytes());
            c.s.write_all(&msg).await.unwrap();
            c.expect_closed().await;
        })
        .await;
    }

    #[tokio::test]
    async fn large_cut_text_and_encodings_are_discarded() {
        timed(async {
            let addr = start_server().await;
            let mut c = TestClient::login(addr, b"RFB 003.008\n").await;
            let len = MAX_CUT_TEXT;
            let mut msg = vec![6u8, 0, 0, 0];
            msg.extend_from_slice(&len.to_be_bytes());
            // Text that looks like messages, to prove it is skipped.
            msg.extend(std::iter::repeat_n(3u8, len as usize));
            c.s.write_all(&msg).await.unwrap();
            let many: Vec<i32> = (0..5000).collect();
            c.set_encodings(&many).await;
            c.request(false, FULL).await;
            assert_eq!(c.read_update().await, [FULL]);
        })
        .await;
    }

    #[tokio::test]
    async fn unsupported_pixel_format_closes() {
        timed(async {
            let addr = start_server().await;
            let mut c = TestClient::login(addr, b"RFB 003.008\n").await;
            let pf = PixelFormat {
                bits_per_pixel: 16,
                depth: 16,
                ..SERVER_FORMAT
            };
            c.set_pixel_format(&pf).await;
            c.expect_closed().await;
        })
        .await;
    }

    #[tokio::test]
    async fn unknown_message_closes() {
        timed(async {
            let addr = start_server().await;
            let mut c = TestClient::login(addr, b"RFB 003.008\n").await;
            c.s.write_all(&[200, 0, 0, 0]).await.unwrap();
            c.expect_closed().await;
        })
        .await;
    }

    #[tokio::test]
    async fn serve_connection_works_on_any_stream() {
        timed(async {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let task = tokio::spawn(async move { serve_connection(server, b"pw", "duplex").await });
            let mut v = [0u8; 12];
            client.read_exact(&mut v).await.unwrap();
            client.write_all(b"RFB 003.008\n").await.unwrap();
            let mut types = [0u8; 2];
            client.read_exact(&mut types).await.unwrap();
            client.write_all(&[2]).await.unwrap();
            let mut challenge = [0u8; 16];
            client.read_exact(&mut challenge).await.unwrap();
            client
                .write_all(&vncauth::response(b"pw", &challenge))
                .await
                .unwrap();
            assert_eq!(client.read_u32().await.unwrap(), 0);
            client.write_all(&[0]).await.unwrap();
            let mut init = [0u8; 24];
            client.read_exact(&mut init).await.unwrap();
            let mut name = [0u8; 6];
            client.read_exact(&mut name).await.unwrap();
            assert_eq!(&name, b"duplex");
            drop(client);
            assert!(task.await.unwrap().is_ok(), "clean disconnect");
        })
        .await;
    }

    #[tokio::test]
    async fn pipelined_client_gets_its_update() {
        // Everything after the challenge in one write: the messages that come
        // with the end of the handshake reach the session.
        timed(async {
            let addr = start_server().await;
            let mut s = TestClient::connect(addr, b"RFB 003.008\n").await;
            s.write_all(&[2]).await.unwrap();
            let mut challenge = [0u8; 16];
            s.read_exact(&mut challenge).await.unwrap();
            let mut msg = vncauth::response(PASSWORD.as_bytes(), &challenge).to_vec();
            msg.push(1); // ClientInit
            msg.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 5, 0, 5]); // 5x5 update, now
            s.write_all(&msg).await.unwrap();
            assert_eq!(s.read_u32().await.unwrap(), 0, "SecurityResult OK");
            let mut init = [0u8; 24];
            s.read_exact(&mut init).await.unwrap();
            let mut name = vec![0u8; u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize];
            s.read_exact(&mut name).await.unwrap();
            let mut c = TestClient {
                s,
                fb: vec![0; W * H * 4],
            };
            assert_eq!(
                c.read_update().await,
                [Area {
                    x: 0,
                    y: 0,
                    w: 5,
                    h: 5
                }]
            );
        })
        .await;
    }

    #[tokio::test]
    async fn unknown_client_version_is_told_why() {
        timed(async {
            let addr = start_server().await;
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut v = [0u8; 12];
            s.read_exact(&mut v).await.unwrap();
            s.write_all(b"RFB 003.005\n").await.unwrap();
            assert_eq!(s.read_u8().await.unwrap(), 0, "no security types");
            let len = s.read_u32().await.unwrap() as usize;
            let mut reason = vec![0u8; len];
            s.read_exact(&mut reason).await.unwrap();
            assert_eq!(reason, REASON_VERSION.as_bytes());
            let mut c = TestClient { s, fb: Vec::new() };
            c.expect_closed().await;
        })
        .await;
    }

    // ----- synchronous unit tests -----

    #[test]
    fn handshake_is_the_same_in_any_fragmentation() {
        let challenge = [7u8; CHALLENGE_LEN];
        let mut input = b"RFB 003.008\n\x02".to_vec();
        input.extend_from_slice(&vncauth::response(PASSWORD.as_bytes(), &challenge));
        input.extend_from_slice(&[1, 5, 0, 0, 1, 0, 1]);
        let run = |chunk: usize| {
            let mut hs = handshake(PASSWORD.as_bytes(), challenge, "n");
            let mut out = hs.take_output();
            for piece in input.chunks(chunk) {
                hs.feed(piece).unwrap();
                out.extend(hs.take_output());
            }
            assert!(hs.is_done());
            (out, hs.take_leftovers())
        };
        let whole = run(input.len());
        assert_eq!(
            whole.1,
            [5, 0, 0, 1, 0, 1],
            "a PointerEvent after ClientInit"
        );
        assert_eq!(whole.0.len(), 12 + 2 + 16 + 4 + 24 + 1);
        for chunk in [1, 2, 5] {
            assert_eq!(run(chunk), whole, "fragment size {chunk}");
        }
    }

    #[test]
    fn session_hands_out_one_update_at_a_time() {
        let mut session = Session::new();
        let now = Duration::from_millis(100);
        let request = |incremental: bool, w: u16| {
            let mut m = vec![3u8, u8::from(incremental), 0, 0, 0, 0];
            m.extend_from_slice(&w.to_be_bytes());
            m.extend_from_slice(&1u16.to_be_bytes());
            m
        };
        let mut input = [5u8, 0, 0, 1, 0, 1].to_vec();
        input.extend(request(false, 2));
        input.extend(request(false, 3));
        input.extend(&request(true, 4)[..5]);
        let (used, update) = session.receive(&input, now).unwrap();
        assert_eq!(used, 6 + 10, "stops after the first update");
        assert_eq!(update.map(<[u8]>::len), Some(4 + 12 + 2 * 4));
        let (used2, update) = session.receive(&input[used..], now).unwrap();
        assert_eq!(used2, 10);
        assert_eq!(update.map(<[u8]>::len), Some(4 + 12 + 3 * 4));
        // Half a message: nothing used, nothing sent.
        let rest = &input[used + used2..];
        assert_eq!(session.receive(rest, now).unwrap(), (0, None));
        assert!(!session.wants_tick());
        // Incremental requests wait for a tick, and only changes are sent.
        let (_, update) = session.receive(&request(true, 800), now).unwrap();
        assert!(update.is_none());
        assert!(session.wants_tick());
        let update = session.tick(now).map(<[u8]>::to_vec).unwrap();
        assert!(
            update.len() < 4 + 12 + 800 * 4,
            "only what the client lacks"
        );
        assert!(!session.wants_tick());
        // Bad input is an error.
        assert!(session.receive(&[9], now).is_err());
    }

    fn parse_all(parser: &mut MsgParser, data: &[u8], chunk: usize) -> io::Result<Vec<ClientMsg>> {
        // Simulates the session's buffer handling with a given read size.
        let mut msgs = Vec::new();
        let mut buf = Vec::new();
        for piece in data.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            let mut off = 0;
            loop {
                let (used, msg) = parser.parse(&buf[off..])?;
                if used == 0 {
                    break;
                }
                off += used;
                msgs.extend(msg);
            }
            buf.drain(..off);
            assert!(
                buf.len() < 20,
                "never more than one partial message buffered"
            );
        }
        Ok(msgs)
    }

    fn sample_stream() -> Vec<u8> {
        let mut d = vec![0u8, 0, 0, 0];
        d.extend_from_slice(&SERVER_FORMAT.encode());
        d.extend_from_slice(&[2, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0x11]);
        d.extend_from_slice(&[3, 1, 0, 1, 0, 2, 0, 3, 0, 4]);
        d.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 0x0d]);
        d.extend_from_slice(&[5, 1, 0x12, 0x34, 0x56, 0x78]);
        d.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 5, 5, 5, 5, 5, 5]);
        d.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 0]);
        d.extend_from_slice(&[5, 0, 0, 0, 0, 0]);
        d
    }

    #[test]
    fn parser_reads_every_message_in_any_fragmentation() {
        let expected = vec![
            ClientMsg::SetPixelFormat(SERVER_FORMAT),
            ClientMsg::SetEncodings { count: 3 },
            ClientMsg::UpdateRequest {
                incremental: true,
                area: Area {
                    x: 1,
                    y: 2,
                    w: 3,
                    h: 4,
                },
            },
            ClientMsg::Key {
                down: true,
                keysym: 0xff0d,
            },
            ClientMsg::Pointer {
                buttons: 1,
                x: 0x1234,
                y: 0x5678,
            },
            ClientMsg::CutText { len: 5 },
            ClientMsg::CutText { len: 0 },
            ClientMsg::Pointer {
                buttons: 0,
                x: 0,
                y: 0,
            },
        ];
        let data = sample_stream();
        for chunk in [1, 2, 3, 7, 64, data.len()] {
            let mut p = MsgParser::default();
            assert_eq!(
                parse_all(&mut p, &data, chunk).unwrap(),
                expected,
                "chunk {chunk}"
            );
            assert_eq!(p.skip, 0);
        }
    }

    #[test]
    fn parser_rejects_bad_input() {
        let mut p = MsgParser::default();
        assert!(p.parse(&[1]).is_err(), "FixColourMapEntries is server-only");
        assert!(p.parse(&[7]).is_err());
        assert!(p.parse(&[255, 0, 0]).is_err());
        let mut p = MsgParser::default();
        let mut cut = vec![6u8, 0, 0, 0];
        cut.extend_from_slice(&(MAX_CUT_TEXT + 1).to_be_bytes());
        assert!(p.parse(&cut).is_err());
        let mut ok = vec![6u8, 0, 0, 0];
        ok.extend_from_slice(&MAX_CUT_TEXT.to_be_bytes());
        assert_eq!(
            p.parse(&ok).unwrap(),
            (8, Some(ClientMsg::CutText { len: MAX_CUT_TEXT }))
        );
        assert_eq!(p.skip, u64::from(MAX_CUT_TEXT));
        // Skipping consumes at most what is there.
        assert_eq!(p.parse(&[9; 100]).unwrap(), (100, None));
        assert_eq!(p.skip, u64::from(MAX_CUT_TEXT) - 100);
    }

    #[test]
    fn parser_needs_complete_messages() {
        let data = sample_stream();
        let mut p = MsgParser::default();
        for n in 0..20 {
            assert_eq!(p.parse(&data[..n]).unwrap(), (0, None));
        }
        assert_eq!(p.parse(&[]).unwrap(), (0, None));
    }

    #[test]
    fn parser_garbage_never_panics() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let len = (next() % 64) as usize;
            let data: Vec<u8> = (0..len).map(|_| (next() % 8) as u8).collect();
            let mut p = MsgParser::default();
            let _ = parse_all(&mut p, &data, 1 + (next() % 5) as usize);
        }
    }

    #[test]
    fn converter_formats() {
        let c = Converter::new(&SERVER_FORMAT).unwrap();
        assert_eq!(c.pixel(0x123456), [0x56, 0x34, 0x12, 0]);
        let be = Converter::new(&PixelFormat {
            big_endian: true,
            ..SERVER_FORMAT
        })
        .unwrap();
        assert_eq!(be.pixel(0x123456), [0, 0x12, 0x34, 0x56]);
        let bgr = Converter::new(&PixelFormat {
            red_shift: 0,
            green_shift: 8,
            blue_shift: 16,
            ..SERVER_FORMAT
        })
        .unwrap();
        assert_eq!(bgr.pixel(0x123456), [0x12, 0x34, 0x56, 0]);
        // Odd maxima are scaled; shifts up to 31 are fine.
        let odd = Converter::new(&PixelFormat {
            red_max: 31,
            green_max: 63,
            blue_max: 1,
            red_shift: 27,
            green_shift: 5,
            blue_shift: 31,
            ..SERVER_FORMAT
        })
        .unwrap();
        let v = u32::from_le_bytes(odd.pixel(0xffffff));
        assert_eq!(v, 31 << 27 | 63 << 5 | 1 << 31);
        assert_eq!(odd.pixel(0), [0; 4]);

        for bad in [
            PixelFormat {
                bits_per_pixel: 16,
                ..SERVER_FORMAT
            },
            PixelFormat {
                bits_per_pixel: 8,
                ..SERVER_FORMAT
            },
            PixelFormat {
                true_colour: false,
                ..SERVER_FORMAT
            },
            PixelFormat {
                red_shift: 32,
                ..SERVER_FORMAT
            },
            PixelFormat {
                blue_shift: 255,
                ..SERVER_FORMAT
            },
        ] {
            assert!(Converter::new(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn area_union_and_clip() {
        let a = Area {
            x: 10,
            y: 10,
            w: 10,
            h: 10,
        };
        let b = Area {
            x: 30,
            y: 5,
            w: 5,
            h: 5,
        };
        assert_eq!(
            a.union(b),
            Area {
                x: 10,
                y: 5,
                w: 25,
                h: 15
            }
        );
        let empty = Area {
            x: 500,
            y: 500,
            w: 0,
            h: 0,
        };
        assert_eq!(a.union(empty), a);
        assert_eq!(empty.union(a), a);
        let huge = Area {
            x: 65535,
            y: 65535,
            w: 65535,
            h: 65535,
        };
        assert_eq!(huge.clip(), (W, H, W, H));
        assert_eq!(a.union(huge).clip(), (10, 10, W, H));
        assert_eq!(FULL.clip(), (0, 0, W, H));
    }

    #[test]
    fn drawing_is_clipped() {
        let mut fb = vec![0u32; W * H];
        for (x, y, w, h) in [
            (-100, -100, 150, 150),
            (i32::MAX, i32::MAX, i32::MAX, i32::MAX),
            (i32::MIN, 0, i32::MAX, 10),
            (790, 470, 100, 100),
            (10, 10, -5, 5),
        ] {
            fill_rect(&mut fb, x, y, w, h, 7);
        }
        assert_eq!(fb[W * H - 1], 7);
        assert_eq!(fb[0], 7);
        assert_eq!(fb[W * 20 + 400], 0);
        draw_number(&mut fb, 790, 470, 8, u64::MAX, 1);
        draw_number(&mut fb, -1000, -1000, 8, 1234567890, 1);
    }

    #[test]
    fn render_is_deterministic_and_animates() {
        let mut a = Screen::new();
        let mut b = Screen::new();
        a.render(Duration::from_millis(1234));
        b.render(Duration::from_millis(1234));
        assert!(a.fb == b.fb);
        b.render(Duration::from_millis(1234 + 50));
        assert!(a.fb != b.fb, "the picture moves");
        // Colour bars are static.
        assert_eq!(a.fb[..W * BARS_END], b.fb[..W * BARS_END]);
    }

    #[test]
    fn input_changes_the_picture() {
        let t = Duration::from_secs(3);
        let mut base = Screen::new();
        base.render(t);

        let mut s = Screen::new();
        s.pointer(0, 300, 430);
        s.render(t);
        assert_eq!(s.fb[430 * W + 300], 0xff2020, "cross-hair centre");
        assert_ne!(
            s.fb[430 * W + 290],
            base.fb[430 * W + 290],
            "cross-hair arm"
        );

        // Painting with button 1 leaves dots behind after the pointer moved on
        // and the trail is gone.
        s.pointer(1, 100, 250);
        for i in 0..(TRAIL_LEN as u16 + 2) {
            s.pointer(0, 400 + i, 250);
        }
        s.render(t);
        assert_ne!(s.fb[250 * W + 100], base.fb[250 * W + 100], "painted dot");
        // Button 3 clears the painting.
        s.pointer(4, 400, 250);
        s.pointer(0, 400, 250);
        s.render(t);
        assert_eq!(s.fb[250 * W + 100], base.fb[250 * W + 100]);

        // A key press lights the indicator.
        let mut k = Screen::new();
        k.key(true, 0x61);
        k.render(t);
        assert_eq!(k.fb[320 * W + 40], 0x20e040);
        k.key(false, 0x61);
        k.render(t);
        assert_ne!(k.fb[320 * W + 40], 0x20e040);
        assert_eq!(k.key_presses, 1);
    }

    #[test]
    fn input_state_is_bounded() {
        let mut s = Screen::new();
        for i in 0..10_000u32 {
            s.pointer(1, (i % 800) as u16, (i / 800) as u16);
        }
        assert_eq!(s.dots.len(), MAX_DOTS);
        assert_eq!(s.trail_len, TRAIL_LEN);
        s.pointer(0, u16::MAX, u16::MAX);
        s.render(Duration::from_secs(u64::MAX / 2));
    }

    #[test]
    fn incremental_updates_send_only_changes() {
        let conv = Converter::new(&SERVER_FORMAT).unwrap();
        let mut s = Screen::new();
        let mut out = Vec::new();
        let t = Duration::from_millis(500);
        s.render(t);
        // Nothing sent yet: an incremental request gets everything that the
        // client lacks.
        assert!(s.encode_update(FULL, &conv, false, &mut out));
        assert_eq!(out.len(), 4 + 12 + W * H * 4);
        // Same frame again: nothing to send.
        s.render(t);
        assert!(!s.encode_update(FULL, &conv, false, &mut out));
        // A pointer move changes a small region only.
        s.pointer(0, 300, 430);
        s.render(t);
        assert!(s.encode_update(FULL, &conv, false, &mut out));
        assert_eq!(&out[..4], &[0, 0, 0, 1]);
        let rect: Vec<u16> = out[4..12]
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(rect, [285, 415, 31, 31], "the cross-hair's bounding box");
        assert_eq!(out.len(), 4 + 12 + 31 * 31 * 4);
        // A full request always sends the (clipped) area.
        assert!(s.encode_update(
            Area {
                x: 790,
                y: 470,
                w: 100,
                h: 100
            },
            &conv,
            true,
            &mut out
        ));
        assert_eq!(out.len(), 4 + 12 + 10 * 10 * 4);
        // An empty full request gets an update with no rectangles.
        assert!(s.encode_update(
            Area {
                x: 900,
                y: 0,
                w: 10,
                h: 10
            },
            &conv,
            true,
            &mut out
        ));
        assert_eq!(out, [0, 0, 0, 0]);
    }

    #[test]
    fn animation_updates_separate_rows_as_separate_rects() {
        let conv = Converter::new(&SERVER_FORMAT).unwrap();
        let mut s = Screen::new();
        let mut out = Vec::new();
        s.render(Duration::from_millis(0));
        assert!(s.encode_update(FULL, &conv, true, &mut out));
        s.render(Duration::from_millis(50));
        assert!(s.encode_update(FULL, &conv, false, &mut out));
        let n = u16::from_be_bytes([out[2], out[3]]);
        assert!(n >= 2, "band, counter and clock are separate runs: {n}");
        // Much less than a full frame.
        assert!(out.len() < W * H * 4 / 2);
    }
}
