//! Sans-IO parser and filter for the RFB session phase in the VNC server →
//! browser direction (RFC 6143 §7.3.2, §7.6, and the community extensions
//! noVNC speaks).
//!
//! [`ServerFilter`] starts right after the security handshake: the first
//! thing it reads is ServerInit (u16 width, u16 height, PIXEL_FORMAT, u32
//! name length, name), then server messages. It exists so the proxy can drop
//! the VM's clipboard (ServerCutText) by policy without ever losing track of
//! where the next message starts: it knows every message's length exactly,
//! and anything it cannot measure is an error that ends the session rather
//! than a guess.
//!
//! Messages (type byte first):
//!
//! - 0 FramebufferUpdate: rectangles, in the encodings of [`PARSEABLE`];
//! - 1 SetColourMapEntries; 2 Bell;
//! - 3 ServerCutText: plain text (length ≥ 0) or Extended Clipboard
//!   (negative length, |length| bytes); the only message that is dropped,
//!   by [`ServerRules`];
//! - 150 EndOfContinuousUpdates; 248 ServerFence (payload ≤ 64 bytes);
//!   250 xvp; 255 QEMU (sub-type 1, audio: begin, end, data).
//!
//! Any other message type, and a rectangle in an encoding outside
//! [`PARSEABLE`] (JPEG 21 and the VMware cursor included), is a
//! [`ServerStreamError`]. The proxy keeps such rectangles from arriving by
//! restricting the browser's SetEncodings with [`can_parse`].
//!
//! Rules the parser keeps:
//!
//! - Bytes are forwarded as they are parsed; only a ServerCutText header
//!   (type byte, padding, length: 8 bytes) is held back until its fate is
//!   known. Rectangle data and message bodies are skipped by count, never
//!   buffered, so a multi-megabyte raw rectangle streams through in slices.
//! - A header split across two feeds is kept in a fixed 24-byte array inside
//!   the filter; nothing is allocated for it. The desktop name (bounded by
//!   [`MAX_DESKTOP_NAME`]) is the only thing collected, because
//!   [`ServerFilter::name`] reports it.
//! - Lengths are computed in u64: no input can overflow them or make the
//!   parser panic, and after an error every later call returns it again.
//! - Pixel sizes follow the pixel format of ServerInit, then whatever the
//!   browser set with SetPixelFormat ([`ServerFilter::set_pixel_format`]).

use super::wire::PixelFormat;

/// Longest desktop name (ServerInit or DesktopName) accepted, in bytes; it
/// is kept for [`ServerFilter::name`], so it must be bounded.
/// Extended Clipboard action bit: the message carries clipboard data.
const EXT_PROVIDE: u32 = 1 << 28;

pub const MAX_DESKTOP_NAME: u32 = 64 * 1024;

/// Longest ServerFence payload RFB allows.
pub const MAX_FENCE_PAYLOAD: u8 = 64;

const ENC_RAW: i32 = 0;
const ENC_COPYRECT: i32 = 1;
const ENC_RRE: i32 = 2;
const ENC_HEXTILE: i32 = 5;
const ENC_ZLIB: i32 = 6;
const ENC_TIGHT: i32 = 7;
const ENC_ZRLE: i32 = 16;
const ENC_H264: i32 = 50;
const ENC_TIGHT_PNG: i32 = -260;
const ENC_DESKTOP_SIZE: i32 = -223;
const ENC_LAST_RECT: i32 = -224;
const ENC_CURSOR: i32 = -239;
const ENC_XCURSOR: i32 = -240;
const ENC_QEMU_EXT_KEY: i32 = -258;
const ENC_QEMU_AUDIO: i32 = -259;
const ENC_QEMU_LED: i32 = -261;
const ENC_DESKTOP_NAME: i32 = -307;
const ENC_EXT_DESKTOP_SIZE: i32 = -308;
const ENC_XVP: i32 = -309;
const ENC_FENCE: i32 = -312;
const ENC_CONTINUOUS_UPDATES: i32 = -313;
const ENC_EXT_MOUSE_BUTTONS: i32 = -316;
const ENC_EXT_CLIPBOARD: i32 = 0xC0A1_E5CE_u32 as i32;

/// The encodings (rectangle and pseudo) whose rectangles this parser
/// follows, with their names. Fence, ContinuousUpdates, xvp, QEMU audio and
/// Extended Clipboard only announce support; should one arrive as a
/// rectangle it is taken as carrying no data.
pub const PARSEABLE: &[(i32, &str)] = &[
    (ENC_RAW, "Raw"),
    (ENC_COPYRECT, "CopyRect"),
    (ENC_RRE, "RRE"),
    (ENC_HEXTILE, "Hextile"),
    (ENC_ZLIB, "Zlib"),
    (ENC_TIGHT, "Tight"),
    (ENC_ZRLE, "ZRLE"),
    (ENC_H264, "H.264"),
    (ENC_TIGHT_PNG, "TightPNG"),
    (ENC_DESKTOP_SIZE, "DesktopSize"),
    (ENC_LAST_RECT, "LastRect"),
    (ENC_CURSOR, "Cursor"),
    (ENC_XCURSOR, "XCursor"),
    (ENC_QEMU_EXT_KEY, "QEMU Extended Key Event"),
    (ENC_QEMU_AUDIO, "QEMU Audio"),
    (ENC_QEMU_LED, "QEMU LED State"),
    (ENC_DESKTOP_NAME, "DesktopName"),
    (ENC_EXT_DESKTOP_SIZE, "ExtendedDesktopSize"),
    (ENC_XVP, "xvp"),
    (ENC_FENCE, "Fence"),
    (ENC_CONTINUOUS_UPDATES, "ContinuousUpdates"),
    (ENC_EXT_MOUSE_BUTTONS, "ExtendedMouseButtons"),
    (ENC_EXT_CLIPBOARD, "Extended Clipboard"),
];

/// Known encodings this parser does not follow, named for error messages.
const UNPARSED: &[(i32, &str)] = &[
    (4, "CoRRE"),
    (8, "ZlibHex"),
    (15, "TRLE"),
    (17, "ZYWRLE"),
    (21, "JPEG"),
    (0x574d_5664, "VMware Cursor"),
    (-314, "Cursor With Alpha"),
];

/// True for the encodings in [`PARSEABLE`]: the ones the proxy may let the
/// browser ask for while it parses the server's stream.
pub fn can_parse(encoding: i32) -> bool {
    PARSEABLE.iter().any(|&(e, _)| e == encoding)
}

/// The name of an encoding, for messages; "unknown" for one not known here.
pub fn encoding_name(encoding: i32) -> &'static str {
    PARSEABLE
        .iter()
        .chain(UNPARSED)
        .find(|&&(e, _)| e == encoding)
        .map_or("unknown", |&(_, name)| name)
}

/// What the VNC server may send to the browser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerRules {
    /// false: drop ServerCutText, and its Extended Clipboard form (negative length); each counted as a dropped transfer.
    pub clipboard_from_vm: bool,
    /// Longest cut text (bytes, either form) forwarded; a longer one is dropped (counted), its body skipped as it streams; the session goes on.
    pub max_clipboard: u32,
}

/// What the filter let through and held back, for metrics and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServerCounts {
    /// Cut-text body bytes (either form) forwarded to the browser.
    pub clipboard_bytes_from_vm: u64,
    /// Cut texts dropped, by policy or for their size.
    pub dropped_clipboard: u64,
}

/// Why the server's stream cannot be followed. Each `Display` is a sentence
/// fragment for logs and for the WebSocket close reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerStreamError {
    /// A message type this parser does not know.
    #[error("unknown server message type {0}")]
    UnknownMessage(u8),
    /// A rectangle in an encoding this parser does not follow.
    #[error(
        "the VNC server sent a rectangle in encoding {encoding} ({name}), which the proxy does not parse"
    )]
    Encoding {
        /// The rectangle's encoding number.
        encoding: i32,
        /// Its name, or "unknown".
        name: &'static str,
    },
    /// A pixel format whose pixel size RFB does not have.
    #[error("pixel format with {0} bits per pixel (RFB allows 8, 16 or 32)")]
    PixelFormat(u8),
    /// A desktop name over [`MAX_DESKTOP_NAME`].
    #[error(
        "the VNC server sent a desktop name of {0} bytes (at most {MAX_DESKTOP_NAME} are accepted)"
    )]
    NameTooLong(u32),
    /// A Tight compression-control byte with no meaning (or basic
    /// compression in TightPNG, which does not allow it).
    #[error(
        "the VNC server sent a {} rectangle with invalid compression control byte 0x{control:02x}",
        encoding_name(*encoding)
    )]
    TightControl {
        /// The control byte.
        control: u8,
        /// Tight (7) or TightPNG (-260).
        encoding: i32,
    },
    /// A Tight filter other than copy, palette, gradient.
    #[error("the VNC server sent a Tight rectangle with unknown filter {0}")]
    TightFilter(u8),
    /// A Hextile subencoding byte with bits RFB does not define.
    #[error("the VNC server sent an invalid Hextile subencoding {0}")]
    HextileSubencoding(u8),
    /// A ServerFence payload over [`MAX_FENCE_PAYLOAD`] bytes.
    #[error(
        "the VNC server sent a fence with a {0}-byte payload (at most {MAX_FENCE_PAYLOAD} allowed)"
    )]
    FenceTooLong(u8),
    /// A ServerCutText length of i32::MIN, which has no absolute value.
    #[error("the VNC server sent a cut text with the invalid length -2147483648")]
    CutTextLength,
    /// A QEMU server message other than audio.
    #[error("unknown QEMU server message sub-type {0}")]
    QemuSubtype(u8),
    /// A QEMU audio operation other than end, begin, data.
    #[error("unknown QEMU audio operation {0}")]
    QemuAudioOperation(u16),
}

type E = ServerStreamError;

/// Longest fixed-size piece read at once (ServerInit's, before the name).
const HDR_MAX: usize = 24;

/// A fixed-size piece of the stream, read whole before it is interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// u16 width, u16 height, PIXEL_FORMAT, u32 name length.
    Init,
    /// A message type byte.
    MsgType,
    /// FramebufferUpdate: pad, u16 number of rectangles.
    Update,
    /// u16 x, y, w, h, i32 encoding.
    Rect,
    /// SetColourMapEntries: pad, u16 first, u16 count.
    ColourMap,
    /// ServerCutText: 3 pad, i32 length. Held back, not forwarded at once.
    CutText,
    /// The Extended Clipboard form's u32 flags, after its held header.
    CutTextFlags,
    /// ServerFence: 3 pad, u32 flags, u8 length.
    Fence,
    /// xvp: pad, version, code.
    Xvp,
    /// QEMU server message sub-type.
    Qemu,
    /// QEMU audio: u16 operation.
    QemuAudioOp,
    /// QEMU audio data: u32 length.
    QemuAudioLen,
    /// u32 length of the data that follows (Zlib, ZRLE).
    DataLen,
    /// H.264: u32 length, u32 flags.
    H264,
    /// DesktopName: u32 length.
    NameLen,
    /// ExtendedDesktopSize: u8 screens, 3 pad.
    ExtDesktop,
    /// RRE: u32 number of subrectangles.
    Rre,
    /// Tight compression-control byte.
    TightControl,
    /// Tight filter id.
    TightFilter,
    /// Tight palette: number of colours − 1.
    TightPalette,
    /// One byte of a Tight compact length: the value so far, byte index.
    CompactLen { value: u32, index: u8 },
    /// Hextile tile subencoding.
    HextileSub,
    /// Hextile number of subrectangles.
    HextileCount,
}

impl Piece {
    fn len(self) -> usize {
        match self {
            Piece::Init => HDR_MAX,
            Piece::Rect => 12,
            Piece::Fence | Piece::H264 => 8,
            Piece::CutText => 7,
            Piece::ColourMap => 5,
            Piece::QemuAudioLen
            | Piece::DataLen
            | Piece::NameLen
            | Piece::ExtDesktop
            | Piece::CutTextFlags => 4,
            Piece::Rre => 4,
            Piece::Update | Piece::Xvp => 3,
            Piece::QemuAudioOp => 2,
            Piece::MsgType
            | Piece::Qemu
            | Piece::TightControl
            | Piece::TightFilter
            | Piece::TightPalette
            | Piece::CompactLen { .. }
            | Piece::HextileSub
            | Piece::HextileCount => 1,
        }
    }
}

/// Where the parser goes once a skipped body is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    Message,
    Rect,
    CompactLen,
    HextileCount,
    Tile,
}

/// What happens to skipped bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Forward,
    /// Forwarded, and counted as clipboard bytes.
    Clipboard,
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Read(Piece),
    /// `left` (> 0) bytes of a body to pass or drop.
    Skip {
        left: u64,
        body: Body,
        then: After,
    },
    /// `left` (> 0) bytes of a desktop name, forwarded and collected.
    Name {
        left: u32,
        then: After,
    },
}

/// The VNC server → browser stream parser and filter. See the module docs.
///
/// Feed it every byte the server sends after the security handshake and
/// write what it appends to `out` to the browser; tell it the browser's
/// SetPixelFormat as it is forwarded. An error means the stream can no
/// longer be followed: end the session.
#[derive(Debug)]
pub struct ServerFilter {
    rules: ServerRules,
    state: State,
    /// A fixed-size piece split across feeds: its first `held_len` bytes.
    held: [u8; HDR_MAX],
    held_len: u8,
    /// Set by the browser's SetPixelFormat, else ServerInit's.
    format: Option<PixelFormat>,
    framebuffer: Option<(u16, u16)>,
    name: Option<String>,
    /// The desktop name being read; empty (unallocated) otherwise.
    name_buf: Vec<u8>,
    /// Rectangles left in the current FramebufferUpdate.
    rects_left: u16,
    rect_w: u16,
    rect_h: u16,
    encoding: i32,
    /// Current Hextile tile origin within the rectangle.
    tile_x: u32,
    tile_y: u32,
    /// Bytes per Hextile subrectangle of the current tile.
    subrect_len: u64,
    counts: ServerCounts,
    failed: Option<ServerStreamError>,
    /// An Extended Clipboard message's held header while its flags are read.
    cut_head: [u8; 7],
}

impl ServerFilter {
    pub fn new(rules: ServerRules) -> ServerFilter {
        ServerFilter {
            rules,
            state: State::Read(Piece::Init),
            held: [0; HDR_MAX],
            held_len: 0,
            format: None,
            framebuffer: None,
            name: None,
            name_buf: Vec::new(),
            rects_left: 0,
            rect_w: 0,
            rect_h: 0,
            encoding: 0,
            tile_x: 0,
            tile_y: 0,
            subrect_len: 0,
            counts: ServerCounts::default(),
            cut_head: [0; 7],
            failed: None,
        }
    }

    /// The browser's SetPixelFormat, forwarded to the server: rectangles parsed after this use it.
    ///
    /// Call it as the message is forwarded: the server applies it to the
    /// updates it sends after reading it, and browsers send it before their
    /// first FramebufferUpdateRequest. A format RFB does not have (bits per
    /// pixel other than 8, 16, 32) cannot be measured, so the next feed
    /// fails.
    pub fn set_pixel_format(&mut self, format: PixelFormat) {
        if let Err(err) = check_format(&format) {
            self.failed.get_or_insert(err);
        }
        self.format = Some(format);
    }

    /// Parses `input` (any fragmentation) and appends what must go to the browser to `out`. After an error every later call returns the same error.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), ServerStreamError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let mut rest = input;
        while !rest.is_empty() {
            if let Err(err) = self.step(&mut rest, out) {
                self.failed = Some(err.clone());
                return Err(err);
            }
        }
        Ok(())
    }

    pub fn counts(&self) -> ServerCounts {
        self.counts
    }

    /// The framebuffer size: ServerInit's, then as DesktopSize and
    /// ExtendedDesktopSize change it. None before ServerInit.
    pub fn framebuffer(&self) -> Option<(u16, u16)> {
        self.framebuffer
    }

    /// The desktop name: ServerInit's, then the latest DesktopName (invalid
    /// UTF-8 replaced). None before ServerInit's name is complete.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Bytes per pixel of the current format (valid formats only get here).
    fn bpp(&self) -> u64 {
        self.format.map_or(4, |f| u64::from(f.bits_per_pixel / 8))
    }

    /// Size of a Tight pixel: 3 bytes for 24-bit true colour in 32 bits.
    fn tpixel(&self) -> u64 {
        match self.format {
            Some(f)
                if f.true_colour
                    && f.bits_per_pixel == 32
                    && f.depth == 24
                    && f.red_max == 255
                    && f.green_max == 255
                    && f.blue_max == 255 =>
            {
                3
            }
            _ => self.bpp(),
        }
    }

    /// One parsing step; consumes at least one byte of a non-empty `rest`.
    fn step(&mut self, rest: &mut &[u8], out: &mut Vec<u8>) -> Result<(), E> {
        match self.state {
            State::Skip { left, body, then } => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                let (now, tail) = rest.split_at(n);
                match body {
                    Body::Forward => out.extend_from_slice(now),
                    Body::Clipboard => {
                        out.extend_from_slice(now);
                        self.counts.clipboard_bytes_from_vm += now.len() as u64;
                    }
                    Body::Drop => {}
                }
                *rest = tail;
                let left = left.saturating_sub(now.len() as u64);
                if left == 0 {
                    self.after(then);
                } else {
                    self.state = State::Skip { left, body, then };
                }
            }
            State::Name { left, then } => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                let (now, tail) = rest.split_at(n);
                out.extend_from_slice(now);
                self.name_buf.extend_from_slice(now);
                *rest = tail;
                let left = left.saturating_sub(u32::try_from(now.len()).unwrap_or(u32::MAX));
                if left == 0 {
                    let bytes = std::mem::take(&mut self.name_buf);
                    self.name = Some(String::from_utf8_lossy(&bytes).into_owned());
                    self.after(then);
                } else {
                    self.state = State::Name { left, then };
                }
            }
            State::Read(Piece::MsgType) => {
                if let Some((&kind, tail)) = rest.split_first() {
                    *rest = tail;
                    // A cut text's type byte waits for its length.
                    self.message(kind)?;
                    if kind != 3 {
                        out.push(kind);
                    }
                }
            }
            State::Read(piece) => {
                let forward = !matches!(piece, Piece::CutText | Piece::CutTextFlags);
                if let Some(h) = self.gather(rest, piece.len(), forward, out) {
                    self.piece(piece, &h, out)?;
                }
            }
        }
        Ok(())
    }

    /// Takes the `n` bytes of a fixed-size piece from `rest`, straight from
    /// the input when they are all there, else through `held`. Returns the
    /// piece once it is complete.
    fn gather(
        &mut self,
        rest: &mut &[u8],
        n: usize,
        forward: bool,
        out: &mut Vec<u8>,
    ) -> Option<[u8; HDR_MAX]> {
        let have = usize::from(self.held_len);
        let take = n.saturating_sub(have).min(rest.len());
        let (now, tail) = rest.split_at(take);
        *rest = tail;
        if forward {
            out.extend_from_slice(now);
        }
        if have == 0 && take == n {
            let mut piece = [0; HDR_MAX];
            piece.get_mut(..n)?.copy_from_slice(now);
            return Some(piece);
        }
        self.held.get_mut(have..have + take)?.copy_from_slice(now);
        let have = have + take;
        if have < n {
            self.held_len = u8::try_from(have).unwrap_or(0);
            return None;
        }
        self.held_len = 0;
        Some(self.held)
    }

    /// Enters the body of a skipped span, or what follows it if it is empty.
    fn skip(&mut self, left: u64, body: Body, then: After) {
        if left == 0 {
            self.after(then);
        } else {
            self.state = State::Skip { left, body, then };
        }
    }

    fn after(&mut self, then: After) {
        self.state = match then {
            After::Message => State::Read(Piece::MsgType),
            After::Rect => self.next_rect(),
            After::CompactLen => State::Read(Piece::CompactLen { value: 0, index: 0 }),
            After::HextileCount => State::Read(Piece::HextileCount),
            After::Tile => {
                self.tile_x += 16;
                if self.tile_x >= u32::from(self.rect_w) {
                    self.tile_x = 0;
                    self.tile_y += 16;
                }
                if self.tile_y >= u32::from(self.rect_h) {
                    self.next_rect()
                } else {
                    State::Read(Piece::HextileSub)
                }
            }
        };
    }

    fn next_rect(&self) -> State {
        if self.rects_left == 0 {
            State::Read(Piece::MsgType)
        } else {
            State::Read(Piece::Rect)
        }
    }

    fn message(&mut self, kind: u8) -> Result<(), E> {
        self.state = match kind {
            0 => State::Read(Piece::Update),
            1 => State::Read(Piece::ColourMap),
            // Bell, EndOfContinuousUpdates: the type byte is all.
            2 | 150 => State::Read(Piece::MsgType),
            3 => State::Read(Piece::CutText),
            248 => State::Read(Piece::Fence),
            250 => State::Read(Piece::Xvp),
            255 => State::Read(Piece::Qemu),
            other => return Err(E::UnknownMessage(other)),
        };
        Ok(())
    }

    /// Interprets a complete fixed-size piece `h` (its first `piece.len()`
    /// bytes are meaningful).
    fn piece(&mut self, piece: Piece, h: &[u8; HDR_MAX], out: &mut Vec<u8>) -> Result<(), E> {
        let u16_at = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let bpp = self.bpp();
        let (w, hgt) = (u64::from(self.rect_w), u64::from(self.rect_h));
        match piece {
            Piece::Init => {
                let mut pf = [0; PixelFormat::LEN];
                pf.copy_from_slice(&h[4..4 + PixelFormat::LEN]);
                let format = PixelFormat::decode(&pf);
                check_format(&format)?;
                let len = u32_at(20);
                if len > MAX_DESKTOP_NAME {
                    return Err(E::NameTooLong(len));
                }
                self.framebuffer = Some((u16_at(0), u16_at(2)));
                // SetPixelFormat comes after ServerInit and overrides it.
                self.format.get_or_insert(format);
                self.name_state(len, After::Message);
            }
            Piece::MsgType => self.message(h[0])?,
            Piece::Update => {
                self.rects_left = u16_at(1);
                self.state = self.next_rect();
            }
            Piece::Rect => {
                self.rects_left = self.rects_left.saturating_sub(1);
                self.rect_w = u16_at(4);
                self.rect_h = u16_at(6);
                self.encoding = u32_at(8) as i32;
                self.rect(u16_at(2))?;
            }
            Piece::ColourMap => self.skip(u64::from(u16_at(3)) * 6, Body::Forward, After::Message),
            Piece::CutText => {
                let len = u32_at(3) as i32;
                if len == i32::MIN {
                    return Err(E::CutTextLength);
                }
                let size = len.unsigned_abs();
                if len <= -4 {
                    // Whether it carries text is in its flags.
                    self.cut_head.copy_from_slice(&h[..7]);
                    self.state = State::Read(Piece::CutTextFlags);
                    return Ok(());
                }
                let keep = self.rules.clipboard_from_vm && size <= self.rules.max_clipboard;
                let body = if keep {
                    out.push(3);
                    out.extend_from_slice(&h[..7]);
                    Body::Clipboard
                } else {
                    self.counts.dropped_clipboard += 1;
                    Body::Drop
                };
                self.skip(u64::from(size), body, After::Message);
            }
            Piece::CutTextFlags => {
                let head = self.cut_head;
                let size = i32::from_be_bytes([head[3], head[4], head[5], head[6]]).unsigned_abs();
                let flags = u32_at(0);
                // Only a provide carries text; capabilities, requests,
                // peeks and notifications negotiate.
                let provide = flags & EXT_PROVIDE != 0;
                let keep = self.rules.clipboard_from_vm && size <= self.rules.max_clipboard;
                let body = if keep {
                    out.push(3);
                    out.extend_from_slice(&head);
                    out.extend_from_slice(&h[..4]);
                    if provide {
                        Body::Clipboard
                    } else {
                        Body::Forward
                    }
                } else {
                    if provide {
                        self.counts.dropped_clipboard += 1;
                    }
                    Body::Drop
                };
                self.skip(u64::from(size - 4), body, After::Message);
            }
            Piece::Fence => {
                let len = h[7];
                if len > MAX_FENCE_PAYLOAD {
                    return Err(E::FenceTooLong(len));
                }
                self.skip(u64::from(len), Body::Forward, After::Message);
            }
            Piece::Xvp => self.state = State::Read(Piece::MsgType),
            Piece::Qemu => match h[0] {
                1 => self.state = State::Read(Piece::QemuAudioOp),
                other => return Err(E::QemuSubtype(other)),
            },
            Piece::QemuAudioOp => match u16_at(0) {
                0 | 1 => self.state = State::Read(Piece::MsgType),
                2 => self.state = State::Read(Piece::QemuAudioLen),
                other => return Err(E::QemuAudioOperation(other)),
            },
            Piece::QemuAudioLen => {
                self.skip(u64::from(u32_at(0)), Body::Forward, After::Message);
            }
            Piece::DataLen | Piece::H264 => {
                self.skip(u64::from(u32_at(0)), Body::Forward, After::Rect);
            }
            Piece::NameLen => {
                let len = u32_at(0);
                if len > MAX_DESKTOP_NAME {
                    return Err(E::NameTooLong(len));
                }
                self.name_state(len, After::Rect);
            }
            Piece::ExtDesktop => self.skip(u64::from(h[0]) * 16, Body::Forward, After::Rect),
            Piece::Rre => {
                self.skip(
                    u64::from(u32_at(0)) * (bpp + 8) + bpp,
                    Body::Forward,
                    After::Rect,
                );
            }
            Piece::TightControl => self.tight_control(h[0])?,
            Piece::TightFilter => match h[0] {
                // Copy, gradient: full pixels.
                0 | 2 => self.tight_data(w * hgt * self.tpixel(), 0),
                1 => self.state = State::Read(Piece::TightPalette),
                other => return Err(E::TightFilter(other)),
            },
            Piece::TightPalette => {
                let colours = u64::from(h[0]) + 1;
                let size = if colours == 2 {
                    w.div_ceil(8) * hgt
                } else {
                    w * hgt
                };
                self.tight_data(size, colours * self.tpixel());
            }
            Piece::CompactLen { value, index } => {
                let b = h[0];
                let value = if index >= 2 {
                    value | (u32::from(b) << 14)
                } else {
                    value | (u32::from(b & 0x7f) << (7 * u32::from(index)))
                };
                if index < 2 && b & 0x80 != 0 {
                    self.state = State::Read(Piece::CompactLen {
                        value,
                        index: index + 1,
                    });
                } else {
                    self.skip(u64::from(value), Body::Forward, After::Rect);
                }
            }
            Piece::HextileSub => {
                let s = h[0];
                if s > 30 {
                    return Err(E::HextileSubencoding(s));
                }
                let tw = w.saturating_sub(u64::from(self.tile_x)).min(16);
                let th = hgt.saturating_sub(u64::from(self.tile_y)).min(16);
                if s & 1 != 0 {
                    self.skip(tw * th * bpp, Body::Forward, After::Tile);
                } else {
                    let colours = bpp * u64::from((s >> 1) & 1) + bpp * u64::from((s >> 2) & 1);
                    if s & 8 != 0 {
                        self.subrect_len = if s & 16 != 0 { bpp + 2 } else { 2 };
                        self.skip(colours, Body::Forward, After::HextileCount);
                    } else {
                        self.skip(colours, Body::Forward, After::Tile);
                    }
                }
            }
            Piece::HextileCount => {
                self.skip(
                    u64::from(h[0]) * self.subrect_len,
                    Body::Forward,
                    After::Tile,
                );
            }
        }
        Ok(())
    }

    fn name_state(&mut self, len: u32, then: After) {
        if len == 0 {
            self.name = Some(String::new());
            self.after(then);
        } else {
            self.state = State::Name { left: len, then };
        }
    }

    /// A rectangle header has been read: where its data goes.
    fn rect(&mut self, y: u16) -> Result<(), E> {
        let bpp = self.bpp();
        let (w, h) = (u64::from(self.rect_w), u64::from(self.rect_h));
        match self.encoding {
            ENC_RAW => self.skip(w * h * bpp, Body::Forward, After::Rect),
            ENC_COPYRECT => self.skip(4, Body::Forward, After::Rect),
            ENC_RRE => self.state = State::Read(Piece::Rre),
            ENC_HEXTILE => {
                self.tile_x = 0;
                self.tile_y = 0;
                self.state = if w == 0 || h == 0 {
                    self.next_rect()
                } else {
                    State::Read(Piece::HextileSub)
                };
            }
            ENC_ZLIB | ENC_ZRLE => self.state = State::Read(Piece::DataLen),
            ENC_H264 => self.state = State::Read(Piece::H264),
            ENC_TIGHT | ENC_TIGHT_PNG => self.state = State::Read(Piece::TightControl),
            ENC_DESKTOP_SIZE => {
                self.framebuffer = Some((self.rect_w, self.rect_h));
                self.state = self.next_rect();
            }
            ENC_LAST_RECT => {
                self.rects_left = 0;
                self.state = self.next_rect();
            }
            ENC_CURSOR => self.skip(w * h * bpp + w.div_ceil(8) * h, Body::Forward, After::Rect),
            ENC_XCURSOR => {
                let len = if w * h > 0 {
                    6 + 2 * w.div_ceil(8) * h
                } else {
                    0
                };
                self.skip(len, Body::Forward, After::Rect);
            }
            ENC_EXT_DESKTOP_SIZE => {
                // y is the status: non-zero means a refused change.
                if y == 0 {
                    self.framebuffer = Some((self.rect_w, self.rect_h));
                }
                self.state = State::Read(Piece::ExtDesktop);
            }
            ENC_QEMU_LED => self.skip(1, Body::Forward, After::Rect),
            ENC_DESKTOP_NAME => self.state = State::Read(Piece::NameLen),
            ENC_QEMU_EXT_KEY
            | ENC_QEMU_AUDIO
            | ENC_XVP
            | ENC_FENCE
            | ENC_CONTINUOUS_UPDATES
            | ENC_EXT_MOUSE_BUTTONS
            | ENC_EXT_CLIPBOARD => self.state = self.next_rect(),
            encoding => {
                return Err(E::Encoding {
                    encoding,
                    name: encoding_name(encoding),
                });
            }
        }
        Ok(())
    }

    fn tight_control(&mut self, c: u8) -> Result<(), E> {
        let invalid = E::TightControl {
            control: c,
            encoding: self.encoding,
        };
        match c >> 4 {
            0x8 => self.skip(self.tpixel(), Body::Forward, After::Rect),
            // JPEG; PNG (TightPNG's, accepted in both as noVNC does).
            0x9 | 0xA => self.state = State::Read(Piece::CompactLen { value: 0, index: 0 }),
            kind if kind & 0x8 == 0 => {
                if self.encoding == ENC_TIGHT_PNG {
                    return Err(invalid);
                }
                if c & 0x40 != 0 {
                    self.state = State::Read(Piece::TightFilter);
                } else {
                    let (w, h) = (u64::from(self.rect_w), u64::from(self.rect_h));
                    self.tight_data(w * h * self.tpixel(), 0);
                }
            }
            _ => return Err(invalid),
        }
        Ok(())
    }

    /// Tight basic compression: `extra` bytes (a palette), then data that
    /// is `size` bytes uncompressed: raw if under 12, else compact length
    /// and zlib bytes.
    fn tight_data(&mut self, size: u64, extra: u64) {
        if size < 12 {
            self.skip(extra + size, Body::Forward, After::Rect);
        } else {
            self.skip(extra, Body::Forward, After::CompactLen);
        }
    }
}

fn check_format(format: &PixelFormat) -> Result<(), E> {
    match format.bits_per_pixel {
        8 | 16 | 32 => Ok(()),
        other => Err(E::PixelFormat(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rfb::testing::{XorShift, be, cat};

    const ALLOW: ServerRules = ServerRules {
        clipboard_from_vm: true,
        max_clipboard: u32::MAX,
    };
    const BLOCK: ServerRules = ServerRules {
        clipboard_from_vm: false,
        max_clipboard: u32::MAX,
    };

    const RGB16: PixelFormat = PixelFormat {
        bits_per_pixel: 16,
        depth: 16,
        big_endian: false,
        true_colour: true,
        red_max: 31,
        green_max: 63,
        blue_max: 31,
        red_shift: 11,
        green_shift: 5,
        blue_shift: 0,
    };

    fn be16(n: u16) -> Vec<u8> {
        n.to_be_bytes().to_vec()
    }

    fn init(w: u16, h: u16, format: PixelFormat, name: &[u8]) -> Vec<u8> {
        cat(&[
            &be16(w),
            &be16(h),
            &format.encode(),
            &be(name.len() as u32),
            name,
        ])
    }

    fn rect(w: u16, h: u16, encoding: i32, data: &[u8]) -> Vec<u8> {
        cat(&[
            &be16(1),
            &be16(0),
            &be16(w),
            &be16(h),
            &encoding.to_be_bytes(),
            data,
        ])
    }

    fn update(rects: &[Vec<u8>]) -> Vec<u8> {
        cat(&[&[0, 0], &be16(rects.len() as u16), &rects.concat()])
    }

    /// Tight's 1–3 byte length.
    fn compact(n: usize) -> Vec<u8> {
        assert!(n < 1 << 22);
        if n < 0x80 {
            vec![n as u8]
        } else if n < 0x4000 {
            vec![(n as u8 & 0x7f) | 0x80, (n >> 7) as u8]
        } else {
            vec![
                (n as u8 & 0x7f) | 0x80,
                ((n >> 7) as u8 & 0x7f) | 0x80,
                (n >> 14) as u8,
            ]
        }
    }

    fn filler(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    fn cut_text(text: &[u8]) -> Vec<u8> {
        cat(&[&[3, 0, 0, 0], &be(text.len() as u32), text])
    }

    fn extended_cut(body: &[u8]) -> Vec<u8> {
        cat(&[&[3, 0, 0, 0], &(-(body.len() as i32)).to_be_bytes(), body])
    }

    /// Tight rectangles of every kind, for a 32-bit depth-24 format
    /// (TPIXEL 3) unless `tp` says otherwise.
    fn tight_rects(enc: i32, tp: usize) -> Vec<Vec<u8>> {
        let mut rects = vec![
            // Fill.
            rect(10, 10, enc, &cat(&[&[0x80], &filler(tp)])),
            // JPEG, 1-, 2- and 3-byte lengths.
            rect(8, 8, enc, &cat(&[&[0x90], &compact(5), &filler(5)])),
            rect(64, 64, enc, &cat(&[&[0x91], &compact(300), &filler(300)])),
            rect(
                200,
                200,
                enc,
                &cat(&[&[0x92], &compact(20000), &filler(20000)]),
            ),
            // PNG.
            rect(8, 8, enc, &cat(&[&[0xA0], &compact(9), &filler(9)])),
        ];
        if enc == ENC_TIGHT {
            rects.extend([
                // Basic, no filter byte: 2×1 pixels, under 12 bytes raw.
                rect(2, 1, enc, &cat(&[&[0x00], &filler(2 * tp)])),
                // Basic, no filter, zlib with a length: 4×4.
                rect(4, 4, enc, &cat(&[&[0x10], &compact(17), &filler(17)])),
                // Copy filter, raw (1×3 pixels).
                rect(1, 3, enc, &cat(&[&[0x40, 0], &filler(3 * tp)])),
                // Copy filter, zlib.
                rect(30, 2, enc, &cat(&[&[0x41, 0], &compact(40), &filler(40)])),
                // Palette of 2: 1 bit a pixel; 20×4 → 3·4 = 12 bytes: zlib.
                rect(
                    20,
                    4,
                    enc,
                    &cat(&[&[0x60, 1, 1], &filler(2 * tp), &compact(6), &filler(6)]),
                ),
                // Palette of 2, 9×1 → 2 bytes raw.
                rect(
                    9,
                    1,
                    enc,
                    &cat(&[&[0x60, 1, 1], &filler(2 * tp), &filler(2)]),
                ),
                // Palette of 5: a byte a pixel; 3×3 raw.
                rect(
                    3,
                    3,
                    enc,
                    &cat(&[&[0x70, 1, 4], &filler(5 * tp), &filler(9)]),
                ),
                // Palette of 256, 16×16 zlib.
                rect(
                    16,
                    16,
                    enc,
                    &cat(&[
                        &[0x40, 1, 255],
                        &filler(256 * tp),
                        &compact(33),
                        &filler(33),
                    ]),
                ),
                // Gradient, zlib.
                rect(5, 5, enc, &cat(&[&[0x40, 2], &compact(12), &filler(12)])),
            ]);
        }
        rects
    }

    /// A 20×18 Hextile rectangle (2×2 tiles, the right and bottom ones
    /// partial) using every subencoding kind, 4 bytes a pixel.
    fn hextile() -> Vec<u8> {
        let tiles = cat(&[
            // Raw: 16×16 pixels.
            &[1],
            &filler(16 * 16 * 4),
            // Background only.
            &[2],
            &filler(4),
            // Background, foreground, 2 plain subrects.
            &[2 | 4 | 8, 0, 0, 0, 1, 0, 0, 0, 2, 2],
            &filler(4),
            // Coloured subrects (3), no colours: 3 × (4 + 2).
            &[8 | 16, 3],
            &filler(18),
        ]);
        rect(20, 18, ENC_HEXTILE, &tiles)
    }

    /// A stream using every message and encoding kind, in segments; true
    /// marks a cut text.
    fn stream() -> Vec<(Vec<u8>, bool)> {
        let ext_screen = cat(&[&be(7), &be16(0), &be16(0), &be16(800), &be16(600), &be(0)]);
        let mut rects = vec![
            rect(3, 2, ENC_RAW, &filler(24)),
            rect(3, 2, ENC_COPYRECT, &[0, 1, 0, 2]),
            rect(8, 8, ENC_RRE, &cat(&[&be(2), &filler(4 + 2 * 12)])),
            hextile(),
            rect(0, 5, ENC_HEXTILE, &[]),
            rect(64, 64, ENC_ZLIB, &cat(&[&be(10), &filler(10)])),
            rect(64, 64, ENC_ZRLE, &cat(&[&be(1000), &filler(1000)])),
            rect(64, 64, ENC_H264, &cat(&[&be(33), &be(1), &filler(33)])),
            rect(9, 3, ENC_CURSOR, &filler(9 * 3 * 4 + 2 * 3)),
            rect(9, 3, ENC_XCURSOR, &filler(6 + 2 * 2 * 3)),
            rect(0, 0, ENC_XCURSOR, &[]),
            rect(1024, 768, ENC_DESKTOP_SIZE, &[]),
            rect(
                800,
                600,
                ENC_EXT_DESKTOP_SIZE,
                &cat(&[&[1, 0, 0, 0], &ext_screen]),
            ),
            rect(0, 0, ENC_QEMU_EXT_KEY, &[]),
            rect(0, 0, ENC_QEMU_LED, &[5]),
            rect(0, 0, ENC_QEMU_AUDIO, &[]),
            rect(0, 0, ENC_DESKTOP_NAME, &cat(&[&be(4), b"new\xff"])),
            rect(0, 0, ENC_EXT_MOUSE_BUTTONS, &[]),
            rect(0, 0, ENC_CONTINUOUS_UPDATES, &[]),
            rect(0, 0, ENC_FENCE, &[]),
            rect(0, 0, ENC_XVP, &[]),
        ];
        rects.extend(tight_rects(ENC_TIGHT, 3));
        rects.extend(tight_rects(ENC_TIGHT_PNG, 3));
        let last = cat(&[
            &[0, 0, 0xff, 0xff],
            &rect(1, 1, ENC_RAW, &filler(4)),
            &rect(0, 0, ENC_LAST_RECT, &[]),
        ]);
        vec![
            (init(640, 480, PixelFormat::TRUE_COLOUR_32, b"vm-7"), false),
            (update(&rects), false),
            (update(&[]), false),
            (last, false),
            (cat(&[&[1, 0], &be16(0), &be16(3)]), false),
            (filler(18), false),
            (vec![2], false),
            (cut_text(b"hello from the vm"), true),
            (vec![150], false),
            (
                cat(&[&[248, 0, 0, 0], &be(0x8000_0001), &[3], b"abc"]),
                false,
            ),
            (vec![248, 0, 0, 0, 0, 0, 0, 0, 0], false),
            (extended_cut(&cat(&[&be((1 << 24) | 1), &filler(20)])), true),
            (vec![250, 0, 1, 1], false),
            (vec![255, 1, 0, 1], false),
            (cat(&[&[255, 1, 0, 2], &be(8), &filler(8)]), false),
            (vec![255, 1, 0, 0], false),
            (cut_text(b""), true),
            (vec![2], false),
        ]
    }

    fn whole(segments: &[(Vec<u8>, bool)]) -> Vec<u8> {
        segments.iter().flat_map(|(b, _)| b.clone()).collect()
    }

    fn without_cut_texts(segments: &[(Vec<u8>, bool)]) -> Vec<u8> {
        segments
            .iter()
            .filter(|(_, cut)| !cut)
            .flat_map(|(b, _)| b.clone())
            .collect()
    }

    /// Feeds `data` in pieces of `chunk` bytes (0: all at once).
    fn run(
        rules: ServerRules,
        data: &[u8],
        chunk: usize,
    ) -> (Vec<u8>, ServerCounts, Result<(), E>, ServerFilter) {
        let mut f = ServerFilter::new(rules);
        let mut out = Vec::new();
        let size = if chunk == 0 { data.len().max(1) } else { chunk };
        let mut result = Ok(());
        for piece in data.chunks(size) {
            result = f.feed(piece, &mut out);
            if result.is_err() {
                break;
            }
        }
        (out, f.counts(), result, f)
    }

    const CHUNKS: [usize; 7] = [0, 1, 2, 3, 5, 7, 13];

    #[test]
    fn allowed_stream_passes_byte_for_byte() {
        let segments = stream();
        let data = whole(&segments);
        // The plain text; the stream's Extended Clipboard message only
        // negotiates (no provide flag), so it carries no text.
        let cut_bytes = 17;
        for chunk in CHUNKS {
            let (out, counts, result, f) = run(ALLOW, &data, chunk);
            assert_eq!(result, Ok(()), "chunk {chunk}");
            assert!(out == data, "chunk {chunk}: output differs");
            assert_eq!(
                counts,
                ServerCounts {
                    clipboard_bytes_from_vm: cut_bytes,
                    dropped_clipboard: 0
                }
            );
            assert_eq!(f.state, State::Read(Piece::MsgType), "at a boundary");
            assert_eq!(f.held_len, 0);
            assert_eq!(f.framebuffer(), Some((800, 600)));
            assert_eq!(f.name(), Some("new\u{fffd}"));
        }
    }

    #[test]
    fn only_extended_clipboard_provides_count_as_text() {
        let provide = extended_cut(&[0x10, 0, 0, 1, b'a', b'b', b'c']);
        let caps = extended_cut(&[0x01, 0, 0, 1, 0, 0, 0, 16]);
        let data = cat(&[&init(1, 1, RGB16, b""), &caps, &provide]);
        for chunk in CHUNKS {
            let (out, counts, result, _) = run(ALLOW, &data, chunk);
            assert_eq!(result, Ok(()));
            assert_eq!(out, data, "chunk {chunk}");
            assert_eq!(counts.clipboard_bytes_from_vm, 3, "chunk {chunk}");
            let (out, counts, _, _) = run(BLOCK, &data, chunk);
            assert_eq!(out, init(1, 1, RGB16, b""), "chunk {chunk}");
            assert_eq!(
                counts.dropped_clipboard, 1,
                "chunk {chunk}: the provide only"
            );
        }
    }

    #[test]
    fn blocked_stream_loses_only_cut_texts() {
        let segments = stream();
        let data = whole(&segments);
        let expected = without_cut_texts(&segments);
        for chunk in CHUNKS {
            let (out, counts, result, _) = run(BLOCK, &data, chunk);
            assert_eq!(result, Ok(()), "chunk {chunk}");
            assert!(out == expected, "chunk {chunk}: output differs");
            assert_eq!(
                counts,
                ServerCounts {
                    clipboard_bytes_from_vm: 0,
                    dropped_clipboard: 2
                }
            );
        }
    }

    #[test]
    fn random_fragmentation_gives_the_same_result() {
        let data = whole(&stream());
        let (expected, expected_counts, _, _) = run(BLOCK, &data, 0);
        let mut rng = XorShift(7);
        for _ in 0..50 {
            let mut f = ServerFilter::new(BLOCK);
            let mut out = Vec::new();
            let mut at = 0;
            while at < data.len() {
                let n = 1 + rng.below(40.min(data.len() - at));
                f.feed(&data[at..at + n], &mut out).unwrap();
                at += n;
            }
            assert!(out == expected);
            assert_eq!(f.counts(), expected_counts);
        }
    }

    #[test]
    fn server_init_is_read() {
        let data = init(1280, 720, RGB16, b"my desktop");
        let mut f = ServerFilter::new(ALLOW);
        let mut out = Vec::new();
        assert_eq!(f.framebuffer(), None);
        f.feed(&data[..30], &mut out).unwrap();
        assert_eq!(f.framebuffer(), Some((1280, 720)));
        assert_eq!(f.name(), None, "name still incomplete");
        f.feed(&data[30..], &mut out).unwrap();
        assert_eq!(f.name(), Some("my desktop"));
        assert_eq!(f.format, Some(RGB16));
        assert_eq!(out, data);
        assert_eq!(f.name_buf.capacity(), 0, "name buffer released");
        // 16 bpp from ServerInit: a 2×2 raw rect is 8 bytes.
        let more = cat(&[&update(&[rect(2, 2, ENC_RAW, &filler(8))]), &[2]]);
        f.feed(&more, &mut out).unwrap();
        assert_eq!(f.state, State::Read(Piece::MsgType));
    }

    #[test]
    fn empty_name_and_name_limit() {
        let (_, _, result, f) = run(ALLOW, &init(1, 1, RGB16, b""), 0);
        assert_eq!(result, Ok(()));
        assert_eq!(f.name(), Some(""));
        let name = vec![b'n'; MAX_DESKTOP_NAME as usize];
        let (out, _, result, f) = run(ALLOW, &init(1, 1, RGB16, &name), 1000);
        assert_eq!(result, Ok(()));
        assert_eq!(out.len(), 24 + name.len());
        assert_eq!(f.name().map(str::len), Some(name.len()));
        let mut too_long = init(1, 1, RGB16, b"");
        too_long[20..24].copy_from_slice(&be(MAX_DESKTOP_NAME + 1));
        let (_, _, result, _) = run(ALLOW, &too_long, 0);
        assert_eq!(result, Err(E::NameTooLong(MAX_DESKTOP_NAME + 1)));
        let desktop_name = cat(&[
            &init(1, 1, RGB16, b"x"),
            &update(&[rect(0, 0, ENC_DESKTOP_NAME, &be(u32::MAX))]),
        ]);
        let (_, _, result, _) = run(ALLOW, &desktop_name, 0);
        assert_eq!(result, Err(E::NameTooLong(u32::MAX)));
    }

    #[test]
    fn pixel_format_switch_changes_rect_sizes() {
        let head = init(100, 100, PixelFormat::TRUE_COLOUR_32, b"");
        // 16 bpp: raw 3×2 = 12 bytes; Tight fill and palette use 2-byte pixels.
        let body = cat(&[
            &update(&[
                rect(3, 2, ENC_RAW, &filler(12)),
                rect(4, 4, ENC_TIGHT, &[0x80, 9, 9]),
                rect(
                    3,
                    3,
                    ENC_TIGHT,
                    &cat(&[&[0x40, 1, 2], &filler(3 * 2), &filler(9)]),
                ),
                rect(2, 2, ENC_CURSOR, &filler(2 * 2 * 2 + 2)),
            ]),
            &cut_text(b"after"),
        ]);
        for chunk in CHUNKS {
            let mut f = ServerFilter::new(BLOCK);
            let mut out = Vec::new();
            f.feed(&head, &mut out).unwrap();
            f.set_pixel_format(RGB16);
            for piece in body.chunks(if chunk == 0 { body.len() } else { chunk }) {
                f.feed(piece, &mut out).unwrap();
            }
            assert_eq!(out, cat(&[&head, &body[..body.len() - 13]]));
            assert_eq!(
                f.counts().dropped_clipboard,
                1,
                "cut text found after the rects"
            );
        }
    }

    #[test]
    fn tight_pixel_is_three_bytes_only_for_24_bit_true_colour() {
        let mut f = ServerFilter::new(ALLOW);
        f.set_pixel_format(PixelFormat::TRUE_COLOUR_32);
        assert_eq!(f.tpixel(), 3);
        let mut pf = PixelFormat::TRUE_COLOUR_32;
        pf.depth = 32;
        f.set_pixel_format(pf);
        assert_eq!(f.tpixel(), 4);
        let mut pf = PixelFormat::TRUE_COLOUR_32;
        pf.red_max = 1023;
        f.set_pixel_format(pf);
        assert_eq!(f.tpixel(), 4);
        let mut pf = PixelFormat::TRUE_COLOUR_32;
        pf.true_colour = false;
        f.set_pixel_format(pf);
        assert_eq!(f.tpixel(), 4);
        f.set_pixel_format(RGB16);
        assert_eq!(f.tpixel(), 2);
    }

    #[test]
    fn invalid_pixel_formats_end_the_stream() {
        let mut pf = PixelFormat::TRUE_COLOUR_32;
        pf.bits_per_pixel = 24;
        let (_, _, result, _) = run(ALLOW, &init(1, 1, pf, b""), 0);
        assert_eq!(result, Err(E::PixelFormat(24)));
        let mut f = ServerFilter::new(ALLOW);
        let mut out = Vec::new();
        f.feed(&init(1, 1, RGB16, b""), &mut out).unwrap();
        pf.bits_per_pixel = 0;
        f.set_pixel_format(pf);
        assert_eq!(f.feed(&[2], &mut out), Err(E::PixelFormat(0)));
    }

    #[test]
    fn oversized_cut_text_is_dropped_and_the_session_goes_on() {
        let rules = ServerRules {
            clipboard_from_vm: true,
            max_clipboard: 5,
        };
        let data = cat(&[
            &init(1, 1, RGB16, b""),
            &cut_text(b"12345"),
            &cut_text(b"123456"),
            &extended_cut(&filler(6)),
            &extended_cut(&filler(5)),
            &[2],
            &cut_text(&filler(100_000)),
            &[150],
        ]);
        let expected = cat(&[
            &init(1, 1, RGB16, b""),
            &cut_text(b"12345"),
            &extended_cut(&filler(5)),
            &[2, 150],
        ]);
        for chunk in CHUNKS.into_iter().chain([4096]) {
            let (out, counts, result, _) = run(rules, &data, chunk);
            assert_eq!(result, Ok(()));
            assert_eq!(out, expected, "chunk {chunk}");
            assert_eq!(
                counts,
                ServerCounts {
                    // "12345"; the forwarded extended message is no provide.
                    clipboard_bytes_from_vm: 5,
                    // "123456" and the 100,000 bytes; the dropped extended
                    // message carried no text.
                    dropped_clipboard: 2
                }
            );
        }
    }

    #[test]
    fn cut_text_header_is_held_until_its_length_is_known() {
        let mut f = ServerFilter::new(ALLOW);
        let mut out = Vec::new();
        f.feed(&init(1, 1, RGB16, b""), &mut out).unwrap();
        out.clear();
        let msg = cut_text(b"abc");
        f.feed(&msg[..7], &mut out).unwrap();
        assert!(out.is_empty());
        f.feed(&msg[7..9], &mut out).unwrap();
        assert_eq!(out, msg[..9]);
        f.feed(&msg[9..], &mut out).unwrap();
        // Other headers are forwarded as they arrive.
        f.feed(&[0, 0, 0], &mut out).unwrap();
        f.feed(&[1, 0, 0], &mut out).unwrap();
        assert_eq!(out, cat(&[&msg, &[0, 0, 0, 1, 0, 0]]));
    }

    #[test]
    fn big_raw_rect_streams_in_slices() {
        let (w, h) = (1920u16, 1080u16);
        let pixels = filler(usize::from(w) * usize::from(h) * 4);
        let data = cat(&[
            &init(w, h, PixelFormat::TRUE_COLOUR_32, b""),
            &update(&[rect(w, h, ENC_RAW, &pixels)]),
            &cut_text(b"x"),
        ]);
        let (out, counts, result, f) = run(BLOCK, &data, 64 * 1024);
        assert_eq!(result, Ok(()));
        assert_eq!(out.len(), data.len() - 9);
        assert_eq!(counts.dropped_clipboard, 1);
        assert_eq!(f.held_len, 0);
    }

    #[test]
    fn idle_filter_is_small() {
        assert!(std::mem::size_of::<ServerFilter>() <= 256);
        let f = ServerFilter::new(ALLOW);
        assert_eq!(f.name_buf.capacity(), 0);
    }

    fn after_init(tail: &[u8]) -> Result<(), E> {
        let data = cat(&[&init(64, 64, PixelFormat::TRUE_COLOUR_32, b"d"), tail]);
        let results: Vec<_> = CHUNKS.iter().map(|&c| run(ALLOW, &data, c).2).collect();
        assert!(results.windows(2).all(|w| w[0] == w[1]), "{results:?}");
        results[0].clone()
    }

    #[test]
    fn errors() {
        assert_eq!(after_init(&[77]), Err(E::UnknownMessage(77)));
        assert_eq!(after_init(&[4]), Err(E::UnknownMessage(4)));
        assert_eq!(
            after_init(&update(&[rect(1, 1, 21, &[])])),
            Err(E::Encoding {
                encoding: 21,
                name: "JPEG"
            })
        );
        assert_eq!(
            after_init(&update(&[rect(1, 1, 0x574d_5664, &[])])),
            Err(E::Encoding {
                encoding: 0x574d_5664,
                name: "VMware Cursor"
            })
        );
        assert_eq!(
            after_init(&update(&[rect(1, 1, 12345, &[])])),
            Err(E::Encoding {
                encoding: 12345,
                name: "unknown"
            })
        );
        for control in [0xB0, 0xC0, 0xF3] {
            assert_eq!(
                after_init(&update(&[rect(1, 1, ENC_TIGHT, &[control])])),
                Err(E::TightControl {
                    control,
                    encoding: ENC_TIGHT
                })
            );
        }
        assert_eq!(
            after_init(&update(&[rect(1, 1, ENC_TIGHT_PNG, &[0x40])])),
            Err(E::TightControl {
                control: 0x40,
                encoding: ENC_TIGHT_PNG
            })
        );
        assert_eq!(
            after_init(&update(&[rect(1, 1, ENC_TIGHT, &[0x40, 3])])),
            Err(E::TightFilter(3))
        );
        assert_eq!(
            after_init(&update(&[rect(1, 1, ENC_HEXTILE, &[31])])),
            Err(E::HextileSubencoding(31))
        );
        assert_eq!(
            after_init(&[248, 0, 0, 0, 0, 0, 0, 0, 65]),
            Err(E::FenceTooLong(65))
        );
        assert_eq!(
            after_init(&cat(&[&[248, 0, 0, 0, 0, 0, 0, 0, 64], &filler(64), &[2]])),
            Ok(())
        );
        assert_eq!(
            after_init(&cat(&[&[3, 0, 0, 0], &i32::MIN.to_be_bytes()])),
            Err(E::CutTextLength)
        );
        assert_eq!(after_init(&[255, 2]), Err(E::QemuSubtype(2)));
        assert_eq!(after_init(&[255, 1, 0, 3]), Err(E::QemuAudioOperation(3)));
    }

    #[test]
    fn errors_stick() {
        let mut f = ServerFilter::new(ALLOW);
        let mut out = Vec::new();
        f.feed(&init(1, 1, RGB16, b""), &mut out).unwrap();
        let before = out.len();
        let err = f.feed(&[77, 2, 2], &mut out).unwrap_err();
        assert_eq!(f.feed(&[2], &mut out), Err(err.clone()));
        assert_eq!(f.feed(&[], &mut out), Err(err));
        assert_eq!(out.len(), before, "the bad type byte is not forwarded");
    }

    #[test]
    fn error_texts_are_clear() {
        assert_eq!(
            E::Encoding {
                encoding: 21,
                name: encoding_name(21)
            }
            .to_string(),
            "the VNC server sent a rectangle in encoding 21 (JPEG), which the proxy does not parse"
        );
        assert_eq!(
            E::UnknownMessage(77).to_string(),
            "unknown server message type 77"
        );
        assert_eq!(
            E::TightControl {
                control: 0xb0,
                encoding: ENC_TIGHT
            }
            .to_string(),
            "the VNC server sent a Tight rectangle with invalid compression control byte 0xb0"
        );
        assert!(E::NameTooLong(70000).to_string().contains("70000 bytes"));
        assert!(E::FenceTooLong(65).to_string().contains("65-byte"));
    }

    #[test]
    fn parseable_list() {
        for (encoding, name) in PARSEABLE {
            assert!(can_parse(*encoding));
            assert_eq!(encoding_name(*encoding), *name);
        }
        for encoding in [0, 1, 5, 6, 7, 16, 50, -260, -223, -224, -239, -240, -258] {
            assert!(can_parse(encoding), "{encoding}");
        }
        for encoding in [-259, -261, -307, -308, -309, -312, -313, -316] {
            assert!(can_parse(encoding), "{encoding}");
        }
        assert!(can_parse(0xC0A1_E5CE_u32 as i32));
        for encoding in [21, 0x574d_5664, 4, 15, -32, -256, 3, 100] {
            assert!(!can_parse(encoding), "{encoding}");
        }
        // Every parseable encoding is accepted in a rectangle (the
        // zero-length pseudo-encodings at least do not fail).
        for &(encoding, _) in PARSEABLE {
            let data = cat(&[
                &init(1, 1, RGB16, b""),
                &[0, 0, 0, 1],
                &rect(0, 0, encoding, &[]),
            ]);
            let (_, _, result, _) = run(ALLOW, &data, 0);
            assert_eq!(result, Ok(()), "{encoding}");
        }
    }

    /// Feeds `data` in random pieces; checks the invariants that hold for
    /// any input and returns the output.
    fn fuzz_feed(rng: &mut XorShift, rules: ServerRules, data: &[u8]) -> Vec<u8> {
        let mut f = ServerFilter::new(rules);
        if rng.next() & 3 == 0 {
            f.set_pixel_format(RGB16);
        }
        let mut out = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let n = 1 + rng.below(32.min(data.len() - at));
            let r = f.feed(&data[at..at + n], &mut out);
            at += n;
            assert!(out.len() <= at, "output never exceeds input");
            assert!(usize::from(f.held_len) < HDR_MAX);
            assert!(f.name_buf.len() <= MAX_DESKTOP_NAME as usize);
            if let Err(err) = r {
                let len = out.len();
                assert_eq!(f.feed(b"\x02", &mut out), Err(err));
                assert_eq!(out.len(), len);
                break;
            }
        }
        let _ = (f.counts(), f.framebuffer(), f.name(), format!("{f:?}"));
        if rules == ALLOW {
            assert!(data.starts_with(&out), "allowed: output is the input");
        }
        out
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let head = init(64, 48, PixelFormat::TRUE_COLOUR_32, b"g");
        for i in 0..3000 {
            let len = rng.below(200);
            let mut data = rng.bytes(len);
            if i % 2 == 0 {
                data = cat(&[&head, &data]);
            }
            let rules = if i % 3 == 0 { BLOCK } else { ALLOW };
            fuzz_feed(&mut rng, rules, &data);
        }
    }

    #[test]
    fn mutated_streams_never_panic() {
        let valid = whole(&stream());
        let mut rng = XorShift(42);
        for i in 0..400 {
            let mut data = valid.clone();
            for _ in 0..1 + rng.below(4) {
                match rng.below(3) {
                    0 => {
                        let at = rng.below(data.len());
                        data[at] = rng.next() as u8;
                    }
                    1 => {
                        let len = rng.below(data.len());
                        data.truncate(len.max(1));
                    }
                    _ => {
                        let at = rng.below(data.len());
                        let extra = rng.below(8);
                        let bytes = rng.bytes(extra);
                        data.splice(at..at, bytes);
                    }
                }
            }
            let rules = if i % 2 == 0 { BLOCK } else { ALLOW };
            fuzz_feed(&mut rng, rules, &data);
        }
    }
}
