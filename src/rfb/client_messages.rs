//! Sans-IO filter for the RFB session phase in the browser → VNC server
//! direction (RFC 6143 §7.3.1 and §7.5, plus the common extensions).
//!
//! The proxy relays the session after the security handshake. Left raw, the
//! browser could type into a view-only console, paste into a VM whose policy
//! forbids it, or ask the server for encodings the broker cannot follow when
//! it parses the server's stream. [`ClientFilter`] parses every client message,
//! forwards what the [`ClientRules`] allow, drops the rest whole, and counts
//! what went through ([`InputCounts`]).
//!
//! The first byte it sees is ClientInit (the shared flag), then messages:
//!
//! | type | message                      | length (type byte included)        |
//! |------|------------------------------|------------------------------------|
//! | 0    | SetPixelFormat               | 20                                 |
//! | 2    | SetEncodings                 | 4 + 4·n (rewritten, see below)     |
//! | 3    | FramebufferUpdateRequest     | 10                                 |
//! | 4    | KeyEvent                     | 8                                  |
//! | 5    | PointerEvent                 | 6                                  |
//! | 6    | ClientCutText                | 8 + text (negative length: Extended Clipboard, \|length\| bytes) |
//! | 150  | EnableContinuousUpdates      | 10                                 |
//! | 248  | ClientFence                  | 9 + payload (at most 64)           |
//! | 250  | xvp                          | 4                                  |
//! | 251  | SetDesktopSize               | 8 + 16·screens                     |
//! | 255/0| QEMU extended key event      | 12                                 |
//! | 255/1| QEMU audio                   | 4 (enable, disable), 10 (set format) |
//!
//! Anything else is an error ([`ClientStreamError`]): the length of an
//! unknown message is unknown, so the stream cannot be followed past it.
//!
//! Rules of the implementation:
//!
//! - Bytes are passed on as they arrive; only a message's header is held
//!   until it says what the message is and how long (a cut text's 8 bytes, a
//!   fence's 9, ...), and SetEncodings and SetPixelFormat are held whole
//!   (the one is rewritten, the other recorded). The held bytes never exceed
//!   a SetEncodings at [`MAX_ENCODINGS`]. Runs of forwarded messages in one
//!   input are copied in one piece, without a per-byte loop.
//! - A dropped message's bytes never reach the output. Cut-text bodies are
//!   streamed through or skipped, never buffered, whatever their length.
//! - SetEncodings is always rewritten: ExtendedMouseButtons (-316) goes, as
//!   it changes PointerEvent's length; ExtendedClipboard goes when the
//!   clipboard is closed; [`ClientRules::parseable`] filters the rest except
//!   pure client hints; Raw (0) always stays.
//! - Errors stick: after one, every call returns it again.

use super::wire::PixelFormat;

/// Most encodings one SetEncodings may list; more is a protocol error (noVNC
/// sends about 30, and the whole message is held to be rewritten).
/// The length of the run of whole KeyEvents (8 bytes) and PointerEvents
/// (6 bytes) at the start of `b`, and how many of each it holds.
fn event_run(b: &[u8]) -> (usize, u64, u64) {
    let (mut i, mut keys, mut pointers) = (0, 0u64, 0u64);
    loop {
        match b.get(i) {
            Some(4) if b.len() - i >= 8 => {
                i += 8;
                keys += 1;
            }
            Some(5) if b.len() - i >= 6 => {
                i += 6;
                pointers += 1;
            }
            _ => return (i, keys, pointers),
        }
    }
}

/// Extended Clipboard action bit: the message carries clipboard data.
const EXT_PROVIDE: u32 = 1 << 28;

pub const MAX_ENCODINGS: u16 = 1024;

/// Most bytes held between two feeds: a SetEncodings at the bound, the
/// largest header this filter waits for.
const MAX_HELD: usize = 4 + 4 * MAX_ENCODINGS as usize;

/// Longest ClientFence payload the protocol allows.
const MAX_FENCE: u8 = 64;

/// Held bytes kept allocated after use; more is given back, so an idle
/// session that once held a large SetEncodings costs little.
const KEEP_CAPACITY: usize = 64;

const ENC_RAW: i32 = 0;
/// ExtendedMouseButtons: once the server accepts it, a PointerEvent may
/// carry an extra byte, which this filter does not follow.
const ENC_EXTENDED_MOUSE_BUTTONS: i32 = -316;
/// ExtendedClipboard pseudo-encoding (0xC0A1E5CE).
const ENC_EXTENDED_CLIPBOARD: i32 = 0xC0A1_E5CE_u32 as i32;

/// What the filter lets through.
#[derive(Debug, Clone, Copy)]
pub struct ClientRules {
    /// Drop every input message: KeyEvent, PointerEvent, ClientCutText (both
    /// forms), QEMU extended key event, SetDesktopSize, xvp.
    pub view_only: bool,
    /// Send ClientInit's shared flag as 1 whatever the browser sent, so one
    /// browser cannot disconnect the others.
    pub force_shared: bool,
    /// false: drop ClientCutText, and its Extended Clipboard form (negative
    /// length), both counted as dropped transfers.
    pub clipboard_to_vm: bool,
    /// Longest cut text (bytes, either form) forwarded; a longer one is
    /// dropped and counted, the session goes on. Never buffered: its body is
    /// skipped as it streams.
    pub max_clipboard: u32,
    /// When Some, the server stream is parsed downstream: SetEncodings keeps
    /// only encodings for which this returns true, plus pure client hints
    /// (quality -32..=-23, compression -256..=-247, JPEG fine quality
    /// -512..=-412, JPEG subsampling -768..=-763). When None, all encodings
    /// are kept except ExtendedMouseButtons, and ExtendedClipboard when the
    /// clipboard is closed.
    pub parseable: Option<fn(i32) -> bool>,
}

/// What went to the VNC server, and what was held back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InputCounts {
    /// KeyEvents and QEMU extended key events forwarded.
    pub key_events: u64,
    /// PointerEvents forwarded.
    pub pointer_events: u64,
    /// Bytes of the cut texts forwarded (the Extended Clipboard form counts
    /// its whole |length|-byte payload, flags included).
    pub clipboard_bytes_to_vm: u64,
    /// Input messages dropped for view-only (cut texts included).
    pub dropped_input: u64,
    /// Cut-text transfers dropped by the clipboard policy or for exceeding
    /// `max_clipboard`.
    pub dropped_clipboard: u64,
}

/// Why the browser's stream cannot be followed. Each `Display` is a sentence
/// fragment for logs and for the WebSocket close reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientStreamError {
    /// A message type this filter does not know (so neither its length).
    #[error("the browser sent an unknown RFB message type {0}")]
    UnknownMessage(u8),
    /// SetEncodings with more than [`MAX_ENCODINGS`] encodings.
    #[error(
        "the browser sent SetEncodings with {0} encodings (at most {MAX_ENCODINGS} are accepted)"
    )]
    TooManyEncodings(u16),
    /// ClientFence payload longer than the protocol's 64 bytes.
    #[error(
        "the browser sent a ClientFence with a {0}-byte payload (at most 64 bytes are allowed)"
    )]
    FenceTooLong(u8),
    /// QEMU client message (type 255) with an unknown sub-type.
    #[error("the browser sent an unknown QEMU client message sub-type {0}")]
    UnknownQemuMessage(u8),
    /// QEMU audio message with an operation other than 0, 1 or 2.
    #[error("the browser sent a QEMU audio message with unknown operation {0}")]
    BadAudioOperation(u16),
    /// ClientCutText length i32::MIN: neither a text length nor the
    /// negation of an Extended Clipboard length.
    #[error("the browser sent a ClientCutText with the invalid length -2147483648")]
    CutTextLength,
    /// Extended Clipboard message shorter than its 4-byte flags.
    #[error(
        "the browser sent an Extended Clipboard message of {0} bytes, shorter than its 4-byte flags"
    )]
    ExtendedClipboardTooShort(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for ClientInit.
    Init,
    /// Waiting for the type byte of the next message.
    Message,
    /// Inside a message whose header was dealt with: `remaining` bytes are
    /// passed on (`forward`) or skipped.
    Body { remaining: u32, forward: bool },
}

/// What a complete header is, for the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Init,
    PixelFormat,
    Encodings,
    /// Never dropped: FramebufferUpdateRequest, EnableContinuousUpdates,
    /// ClientFence, QEMU audio.
    Control,
    /// KeyEvent or QEMU extended key event.
    Key,
    Pointer,
    /// Dropped for view-only, not counted otherwise: SetDesktopSize, xvp.
    OtherInput,
    /// ClientCutText: its size, and for the Extended Clipboard form its
    /// flags (0 for plain text).
    CutText {
        size: u32,
        flags: u32,
    },
}

/// How far a message's header is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Header {
    /// At least this many bytes of the message are needed to go on.
    Need(usize),
    /// The first `len` bytes are the header; `body` more bytes follow.
    Ready { len: usize, body: u32, kind: Kind },
}

/// What happens to a complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Forward,
    Drop,
    /// Replaced by [`ClientFilter::rewrite`]'s output.
    Rewrite,
}

/// The browser → VNC server filter. See the module docs.
#[derive(Debug)]
pub struct ClientFilter {
    rules: ClientRules,
    state: State,
    /// The start of a header that straddles two feeds; empty (and
    /// unallocated) otherwise.
    held: Vec<u8>,
    counts: InputCounts,
    pixel_format: Option<PixelFormat>,
    failed: Option<ClientStreamError>,
}

impl ClientFilter {
    pub fn new(rules: ClientRules) -> ClientFilter {
        ClientFilter {
            rules,
            state: State::Init,
            held: Vec::new(),
            counts: InputCounts::default(),
            pixel_format: None,
            failed: None,
        }
    }

    /// Parses `input` (any fragmentation), appends what must go to the VNC
    /// server to `out`. After an error every later call returns the same
    /// error; what preceded the bad message in the same call is still
    /// appended.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), ClientStreamError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let result = self.process(input, out);
        if let Err(err) = &result {
            self.failed = Some(err.clone());
            self.held = Vec::new();
        }
        result
    }

    /// The pixel format of the last SetPixelFormat forwarded since the
    /// previous call (the downstream parser needs it).
    pub fn take_pixel_format(&mut self) -> Option<PixelFormat> {
        self.pixel_format.take()
    }

    pub fn counts(&self) -> InputCounts {
        self.counts
    }

    fn process(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), ClientStreamError> {
        let mut pos = self.finish_held(input, out)?;
        // input[run..pos] is forwarded and not copied yet, so runs of passed
        // messages are copied at once.
        let mut run = pos;
        while let Some(rest) = input.get(pos..).filter(|r| !r.is_empty()) {
            if let State::Body { remaining, forward } = self.state {
                let n = rest.len().min(remaining as usize);
                if !forward {
                    flush(out, input, run, pos);
                    run = pos + n;
                }
                pos += n;
                // n <= remaining, so both fit.
                let remaining = remaining - n as u32;
                self.state = if remaining == 0 {
                    State::Message
                } else {
                    State::Body { remaining, forward }
                };
                continue;
            }
            // Input events are most of a session's messages and have fixed
            // lengths: a run of them is counted and passed in one sweep.
            if self.state == State::Message && !self.rules.view_only {
                let (n, keys, pointers) = event_run(rest);
                if n > 0 {
                    self.counts.key_events += keys;
                    self.counts.pointer_events += pointers;
                    pos += n;
                    continue;
                }
            }
            let header = match self.header(rest) {
                Ok(header) => header,
                Err(err) => {
                    flush(out, input, run, pos);
                    return Err(err);
                }
            };
            match header {
                Header::Need(_) => {
                    // Shorter than a header, so within MAX_HELD.
                    debug_assert!(rest.len() < MAX_HELD);
                    flush(out, input, run, pos);
                    self.held.extend_from_slice(rest);
                    return Ok(());
                }
                Header::Ready { len, body, kind } => {
                    let head = rest.get(..len).unwrap_or(rest);
                    match self.settle(kind, head, body) {
                        Verdict::Forward => {}
                        Verdict::Drop => {
                            flush(out, input, run, pos);
                            run = pos + len;
                        }
                        Verdict::Rewrite => {
                            flush(out, input, run, pos);
                            self.rewrite(kind, head, out);
                            run = pos + len;
                        }
                    }
                    pos += len;
                }
            }
        }
        flush(out, input, run, pos.min(input.len()));
        Ok(())
    }

    /// Completes a header held from the previous feed with the start of
    /// `input`; returns how many bytes of `input` it took.
    fn finish_held(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ClientStreamError> {
        let mut pos = 0;
        while !self.held.is_empty() {
            match self.header(&self.held)? {
                Header::Need(need) => {
                    let want = need.saturating_sub(self.held.len());
                    let piece = input.get(pos..).unwrap_or_default();
                    let piece = piece.get(..want).unwrap_or(piece);
                    if piece.is_empty() {
                        break;
                    }
                    self.held.extend_from_slice(piece);
                    pos += piece.len();
                }
                Header::Ready { len, body, kind } => {
                    // Topped up to exactly what each step needed, so the
                    // held bytes are this header and nothing more.
                    debug_assert_eq!(len, self.held.len());
                    let held = std::mem::take(&mut self.held);
                    match self.settle(kind, &held, body) {
                        Verdict::Forward => out.extend_from_slice(&held),
                        Verdict::Drop => {}
                        Verdict::Rewrite => self.rewrite(kind, &held, out),
                    }
                    if held.capacity() <= KEEP_CAPACITY {
                        self.held = held;
                        self.held.clear();
                    }
                }
            }
        }
        Ok(pos)
    }

    /// What the header at the start of `b` (not empty) says, as far as `b`
    /// goes.
    fn header(&self, b: &[u8]) -> Result<Header, ClientStreamError> {
        let ready = |len, body, kind| Ok(Header::Ready { len, body, kind });
        let whole = |len: usize, kind| {
            if b.len() < len {
                Ok(Header::Need(len))
            } else {
                ready(len, 0, kind)
            }
        };
        let Some(&kind) = b.first() else {
            return Ok(Header::Need(1));
        };
        if self.state == State::Init {
            return ready(1, 0, Kind::Init);
        }
        match kind {
            0 => whole(4 + PixelFormat::LEN, Kind::PixelFormat),
            2 => match peek_u16(b, 2) {
                None => Ok(Header::Need(4)),
                Some(n) if n > MAX_ENCODINGS => Err(ClientStreamError::TooManyEncodings(n)),
                Some(n) => whole(4 + 4 * usize::from(n), Kind::Encodings),
            },
            3 => ready(1, 9, Kind::Control),
            4 => ready(1, 7, Kind::Key),
            5 => ready(1, 5, Kind::Pointer),
            6 => match peek_u32(b, 4).map(|l| l as i32) {
                None => Ok(Header::Need(8)),
                Some(i32::MIN) => Err(ClientStreamError::CutTextLength),
                Some(l) if l < 0 && l.unsigned_abs() < 4 => Err(
                    ClientStreamError::ExtendedClipboardTooShort(l.unsigned_abs()),
                ),
                // The Extended Clipboard form's flags say whether it carries
                // text (provide) or only negotiates.
                Some(l) if l < 0 => match peek_u32(b, 8) {
                    None => Ok(Header::Need(12)),
                    Some(flags) => ready(
                        12,
                        l.unsigned_abs() - 4,
                        Kind::CutText {
                            size: l.unsigned_abs(),
                            flags,
                        },
                    ),
                },
                Some(l) => ready(
                    8,
                    l.unsigned_abs(),
                    Kind::CutText {
                        size: l.unsigned_abs(),
                        flags: 0,
                    },
                ),
            },
            150 => ready(1, 9, Kind::Control),
            248 => match b.get(8) {
                None => Ok(Header::Need(9)),
                Some(&l) if l > MAX_FENCE => Err(ClientStreamError::FenceTooLong(l)),
                Some(&l) => ready(9, u32::from(l), Kind::Control),
            },
            250 => ready(1, 3, Kind::OtherInput),
            251 => match b.get(6) {
                Some(&n) if b.len() >= 8 => ready(8, 16 * u32::from(n), Kind::OtherInput),
                _ => Ok(Header::Need(8)),
            },
            255 => match b.get(1) {
                None => Ok(Header::Need(2)),
                Some(0) => ready(2, 10, Kind::Key),
                Some(1) => match peek_u16(b, 2) {
                    None => Ok(Header::Need(4)),
                    Some(0 | 1) => ready(4, 0, Kind::Control),
                    Some(2) => ready(4, 6, Kind::Control),
                    Some(op) => Err(ClientStreamError::BadAudioOperation(op)),
                },
                Some(&sub) => Err(ClientStreamError::UnknownQemuMessage(sub)),
            },
            other => Err(ClientStreamError::UnknownMessage(other)),
        }
    }

    /// Applies the rules to a complete header: counts, records, and sets the
    /// state for the body that follows.
    fn settle(&mut self, kind: Kind, head: &[u8], body: u32) -> Verdict {
        let rules = self.rules;
        let counts = &mut self.counts;
        let verdict = match kind {
            Kind::Init if rules.force_shared && head != [1] => Verdict::Rewrite,
            Kind::Init | Kind::Control => Verdict::Forward,
            Kind::PixelFormat => {
                if let Some(pf) = head.get(4..).and_then(|b| b.try_into().ok()) {
                    self.pixel_format = Some(PixelFormat::decode(pf));
                }
                Verdict::Forward
            }
            Kind::Encodings => Verdict::Rewrite,
            Kind::Key | Kind::Pointer | Kind::OtherInput | Kind::CutText { .. }
                if rules.view_only =>
            {
                counts.dropped_input += 1;
                Verdict::Drop
            }
            Kind::Key => {
                counts.key_events += 1;
                Verdict::Forward
            }
            Kind::Pointer => {
                counts.pointer_events += 1;
                Verdict::Forward
            }
            Kind::OtherInput => Verdict::Forward,
            Kind::CutText { size, flags } => {
                // Only text counts: a plain cut text, or an Extended
                // Clipboard provide (its payload after the flags); the
                // capability, request, peek and notify messages carry none.
                let text = match flags {
                    0 => Some(size),
                    f if f & EXT_PROVIDE != 0 => Some(size.saturating_sub(4)),
                    _ => None,
                };
                if rules.clipboard_to_vm && size <= rules.max_clipboard {
                    counts.clipboard_bytes_to_vm += u64::from(text.unwrap_or(0));
                    Verdict::Forward
                } else {
                    if text.is_some() {
                        counts.dropped_clipboard += 1;
                    }
                    Verdict::Drop
                }
            }
        };
        self.state = if body == 0 {
            State::Message
        } else {
            State::Body {
                remaining: body,
                forward: verdict != Verdict::Drop,
            }
        };
        verdict
    }

    /// Appends the replacement of a header `settle` chose to rewrite.
    fn rewrite(&self, kind: Kind, head: &[u8], out: &mut Vec<u8>) {
        match kind {
            Kind::Init => out.push(1),
            Kind::Encodings => self.rewrite_encodings(head, out),
            // settle rewrites nothing else; pass it on unchanged.
            _ => out.extend_from_slice(head),
        }
    }

    /// SetEncodings with the encodings the rules keep, Raw always among them,
    /// and the matching count.
    fn rewrite_encodings(&self, head: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[2, 0, 0, 0]);
        let mut kept: u16 = 0;
        let mut raw = false;
        let list = head.get(4..).unwrap_or_default();
        for bytes in list.chunks_exact(4) {
            let Ok(bytes) = <[u8; 4]>::try_from(bytes) else {
                continue;
            };
            let enc = i32::from_be_bytes(bytes);
            if self.keeps(enc) {
                raw |= enc == ENC_RAW;
                out.extend_from_slice(&bytes);
                kept = kept.saturating_add(1);
            }
        }
        if !raw {
            out.extend_from_slice(&ENC_RAW.to_be_bytes());
            kept = kept.saturating_add(1);
        }
        // At most MAX_ENCODINGS + 1, far below u16::MAX.
        if let Some(count) = out.get_mut(start + 2..start + 4) {
            count.copy_from_slice(&kept.to_be_bytes());
        }
    }

    /// Whether SetEncodings keeps `enc`.
    fn keeps(&self, enc: i32) -> bool {
        match enc {
            ENC_RAW => true,
            ENC_EXTENDED_MOUSE_BUTTONS => false,
            ENC_EXTENDED_CLIPBOARD if !self.rules.clipboard_to_vm => false,
            _ if is_client_hint(enc) => true,
            _ => self.rules.parseable.is_none_or(|parseable| parseable(enc)),
        }
    }
}

/// Pseudo-encodings that only tell the server how to encode (quality,
/// compression, JPEG fine quality and subsampling): they change nothing in
/// the shape of the server's messages.
fn is_client_hint(enc: i32) -> bool {
    matches!(enc, -32..=-23 | -256..=-247 | -512..=-412 | -768..=-763)
}

/// Appends `input[from..to]` (nothing if the range is empty or off the end).
fn flush(out: &mut Vec<u8>, input: &[u8], from: usize, to: usize) {
    if let Some(bytes) = input.get(from..to) {
        out.extend_from_slice(bytes);
    }
}

fn peek_u16(b: &[u8], at: usize) -> Option<u16> {
    let bytes = <[u8; 2]>::try_from(b.get(at..at.checked_add(2)?)?).ok()?;
    Some(u16::from_be_bytes(bytes))
}

fn peek_u32(b: &[u8], at: usize) -> Option<u32> {
    super::wire::peek_u32(b, at)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{XorShift, cat};
    use super::*;

    /// Whole, byte by byte, and in the odd sizes that split every header.
    const CHUNKS: [usize; 7] = [usize::MAX, 1, 2, 3, 5, 7, 13];

    const VMWARE_CURSOR: i32 = 0x574d_5664;

    fn open() -> ClientRules {
        ClientRules {
            view_only: false,
            force_shared: false,
            clipboard_to_vm: true,
            max_clipboard: u32::MAX,
            parseable: None,
        }
    }

    const PF: PixelFormat = PixelFormat {
        bits_per_pixel: 16,
        depth: 16,
        big_endian: true,
        true_colour: true,
        red_max: 31,
        green_max: 63,
        blue_max: 31,
        red_shift: 11,
        green_shift: 5,
        blue_shift: 0,
    };

    fn set_pixel_format(pf: &PixelFormat) -> Vec<u8> {
        cat(&[&[0, 0, 0, 0], &pf.encode()])
    }

    fn set_encodings(list: &[i32]) -> Vec<u8> {
        let mut m = vec![2, 0];
        m.extend_from_slice(&(list.len() as u16).to_be_bytes());
        for e in list {
            m.extend_from_slice(&e.to_be_bytes());
        }
        m
    }

    fn fbu_request() -> Vec<u8> {
        vec![3, 1, 0, 0, 0, 0, 4, 0, 3, 0]
    }

    fn key(down: u8, sym: u32) -> Vec<u8> {
        cat(&[&[4, down, 0, 0], &sym.to_be_bytes()])
    }

    fn pointer(mask: u8, x: u16, y: u16) -> Vec<u8> {
        cat(&[&[5, mask], &x.to_be_bytes(), &y.to_be_bytes()])
    }

    fn cut(text: &[u8]) -> Vec<u8> {
        cat(&[&[6, 0, 0, 0], &(text.len() as u32).to_be_bytes(), text])
    }

    /// Extended Clipboard: `payload` is flags and what follows.
    fn ext_cut(payload: &[u8]) -> Vec<u8> {
        let len = -(payload.len() as i32);
        cat(&[&[6, 0, 0, 0], &len.to_be_bytes(), payload])
    }

    fn continuous_updates() -> Vec<u8> {
        vec![150, 1, 0, 0, 0, 0, 4, 0, 3, 0]
    }

    fn fence(payload: &[u8]) -> Vec<u8> {
        cat(&[&[248, 0, 0, 0, 0x80, 0, 0, 3, payload.len() as u8], payload])
    }

    fn xvp(code: u8) -> Vec<u8> {
        vec![250, 0, 1, code]
    }

    fn desktop_size(screens: u8) -> Vec<u8> {
        let mut m = vec![251, 0, 4, 0, 3, 0, screens, 0];
        for i in 0..screens {
            m.extend_from_slice(&[0, 0, 0, i, 0, 0, 0, 0, 4, 0, 3, 0, 0, 0, 0, 0]);
        }
        m
    }

    fn qemu_key(down: u16, sym: u32, code: u32) -> Vec<u8> {
        cat(&[
            &[255, 0],
            &down.to_be_bytes(),
            &sym.to_be_bytes(),
            &code.to_be_bytes(),
        ])
    }

    fn audio(op: u16) -> Vec<u8> {
        cat(&[&[255, 1], &op.to_be_bytes()])
    }

    fn audio_format() -> Vec<u8> {
        vec![255, 1, 0, 2, 3, 2, 0, 0, 0xac, 0x44]
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Class {
        /// Never dropped.
        Keep,
        /// Dropped for view-only.
        Input,
        /// A cut text: dropped for view-only or by the clipboard rules.
        Cut,
    }

    /// One of every message, SetEncodings already in the form the rewrite
    /// leaves alone under open rules.
    fn session() -> Vec<(Class, Vec<u8>)> {
        use Class::*;
        vec![
            (Keep, set_pixel_format(&PF)),
            (
                Keep,
                set_encodings(&[16, 7, 0, -223, -224, -26, VMWARE_CURSOR]),
            ),
            (Keep, fbu_request()),
            (Input, key(1, 0x61)),
            (Input, pointer(1, 100, 200)),
            (Cut, cut(b"hello")),
            (Cut, ext_cut(&[0x10, 0, 0, 1, 9, 9, 9])),
            (Keep, continuous_updates()),
            (Keep, fence(b"abc")),
            (Keep, fence(b"")),
            (Input, xvp(2)),
            (Input, desktop_size(2)),
            (Input, qemu_key(1, 0x62, 30)),
            (Keep, audio(0)),
            (Keep, audio_format()),
            (Keep, audio(1)),
            (Input, key(0, 0x61)),
            (Cut, cut(b"")),
            (Input, pointer(0, 101, 201)),
            (Keep, fbu_request()),
        ]
    }

    fn stream(init: u8, messages: &[(Class, Vec<u8>)]) -> Vec<u8> {
        let mut s = vec![init];
        for (_, m) in messages {
            s.extend_from_slice(m);
        }
        s
    }

    fn only(init: u8, keep: impl Fn(Class) -> bool) -> Vec<u8> {
        let kept: Vec<_> = session().into_iter().filter(|(c, _)| keep(*c)).collect();
        stream(init, &kept)
    }

    #[derive(Debug, PartialEq, Eq)]
    struct Run {
        result: Result<(), ClientStreamError>,
        out: Vec<u8>,
        counts: InputCounts,
        pixel_format: Option<PixelFormat>,
    }

    fn run_sizes(rules: ClientRules, input: &[u8], sizes: &mut dyn FnMut() -> usize) -> Run {
        let mut f = ClientFilter::new(rules);
        let mut out = Vec::new();
        let mut result = Ok(());
        let mut rest = input;
        while !rest.is_empty() {
            let (piece, after) = rest.split_at(sizes().clamp(1, rest.len()));
            rest = after;
            result = f.feed(piece, &mut out);
            assert!(f.held.len() <= MAX_HELD);
            if let Err(err) = &result {
                // Errors stick, and add nothing.
                let before = out.len();
                assert_eq!(f.feed(&[3; 10], &mut out).as_ref(), Err(err));
                assert_eq!(f.feed(&[], &mut out).as_ref(), Err(err));
                assert_eq!(out.len(), before);
                assert!(f.held.is_empty());
                break;
            }
        }
        Run {
            result,
            out,
            counts: f.counts(),
            pixel_format: f.take_pixel_format(),
        }
    }

    fn run(rules: ClientRules, input: &[u8], chunk: usize) -> Run {
        run_sizes(rules, input, &mut || chunk)
    }

    /// Runs `input` in every chunk size of [`CHUNKS`]; they must agree.
    fn run_all(rules: ClientRules, input: &[u8]) -> Run {
        let whole = run(rules, input, usize::MAX);
        for chunk in CHUNKS {
            assert_eq!(run(rules, input, chunk), whole, "chunk size {chunk}");
        }
        whole
    }

    #[test]
    fn open_rules_forward_byte_identical() {
        let input = stream(0, &session());
        let r = run_all(open(), &input);
        assert_eq!(r.result, Ok(()));
        assert_eq!(r.out, input);
        assert_eq!(
            r.counts,
            InputCounts {
                key_events: 3,
                pointer_events: 2,
                // "hello", and the provide's payload after its flags.
                clipboard_bytes_to_vm: 5 + 3,
                dropped_input: 0,
                dropped_clipboard: 0,
            }
        );
        assert_eq!(r.pixel_format, Some(PF));
    }

    #[test]
    fn view_only_drops_exactly_the_input() {
        let rules = ClientRules {
            view_only: true,
            ..open()
        };
        let r = run_all(rules, &stream(0, &session()));
        assert_eq!(r.result, Ok(()));
        assert_eq!(r.out, only(0, |c| c == Class::Keep));
        let dropped = session().iter().filter(|(c, _)| *c != Class::Keep).count();
        assert_eq!(
            r.counts,
            InputCounts {
                dropped_input: dropped as u64,
                ..InputCounts::default()
            }
        );
        assert_eq!(r.pixel_format, Some(PF));
    }

    #[test]
    fn blocked_clipboard_drops_both_forms() {
        let rules = ClientRules {
            clipboard_to_vm: false,
            ..open()
        };
        let r = run_all(rules, &stream(1, &session()));
        assert_eq!(r.out, only(1, |c| c != Class::Cut));
        assert_eq!(r.counts.dropped_clipboard, 3);
        assert_eq!(r.counts.clipboard_bytes_to_vm, 0);
        assert_eq!((r.counts.key_events, r.counts.pointer_events), (3, 2));
        assert_eq!(r.counts.dropped_input, 0);
    }

    #[test]
    fn oversized_cut_text_is_skipped_and_the_session_goes_on() {
        let rules = ClientRules {
            max_clipboard: 5,
            ..open()
        };
        let big = vec![b'x'; 100_000];
        let input = cat(&[
            &[0],
            &cut(b"hello"),
            &cut(b"hello world"),
            &ext_cut(&[0x10, 0, 0, 1, 7, 7]),
            &ext_cut(&[0, 0, 0, 1, 7]),
            &cut(&big),
            &key(1, 0x61),
            &ext_cut(&big),
            &pointer(0, 1, 1),
        ]);
        let r = run_all(rules, &input);
        assert_eq!(r.result, Ok(()));
        assert_eq!(
            r.out,
            cat(&[
                &[0],
                &cut(b"hello"),
                &ext_cut(&[0, 0, 0, 1, 7]),
                &key(1, 0x61),
                &pointer(0, 1, 1)
            ])
        );
        assert_eq!(r.counts.dropped_clipboard, 4);
        // "hello"; the forwarded extended message is no provide, so no text.
        assert_eq!(r.counts.clipboard_bytes_to_vm, 5);
        assert_eq!((r.counts.key_events, r.counts.pointer_events), (1, 1));
    }

    #[test]
    fn cut_text_bodies_stream_without_buffering() {
        let big: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
        for (max, forwarded) in [(u32::MAX, true), (1000, false)] {
            let rules = ClientRules {
                max_clipboard: max,
                ..open()
            };
            let input = cat(&[&[1], &cut(&big), &key(1, 2)]);
            let mut f = ClientFilter::new(rules);
            let mut out = Vec::new();
            for piece in input.chunks(4093) {
                let before = out.len();
                f.feed(piece, &mut out).unwrap();
                assert!(f.held.capacity() <= KEEP_CAPACITY);
                // Passed on as it arrives (or not at all).
                if forwarded {
                    assert_eq!(out.len() - before, piece.len());
                } else {
                    assert!(out.len() - before <= 9);
                }
            }
            let expected = if forwarded {
                input.clone()
            } else {
                cat(&[&[1], &key(1, 2)])
            };
            assert_eq!(out, expected);
        }
    }

    #[test]
    fn client_init_shared_flag() {
        let forced = ClientRules {
            force_shared: true,
            ..open()
        };
        let tail = cat(&[&fbu_request(), &key(1, 5)]);
        for init in [0u8, 1, 7] {
            let input = cat(&[&[init], &tail]);
            assert_eq!(run_all(forced, &input).out, cat(&[&[1], &tail]));
            assert_eq!(run_all(open(), &input).out, input);
        }
    }

    fn encodings_out(rules: ClientRules, list: &[i32]) -> Vec<u8> {
        let r = run_all(rules, &cat(&[&[1], &set_encodings(list)]));
        assert_eq!(r.result, Ok(()));
        r.out
    }

    fn expect_encodings(rules: ClientRules, list: &[i32], expected: &[i32]) {
        assert_eq!(
            encodings_out(rules, list),
            cat(&[&[1], &set_encodings(expected)]),
            "{list:?}"
        );
    }

    #[test]
    fn set_encodings_rewrites() {
        // Raw appended when missing.
        expect_encodings(open(), &[], &[0]);
        expect_encodings(open(), &[16, 7], &[16, 7, 0]);
        // ExtendedMouseButtons always goes.
        expect_encodings(open(), &[16, -316, 7], &[16, 7, 0]);
        expect_encodings(open(), &[0, -316], &[0]);
        expect_encodings(open(), &[-316, -316], &[0]);
        // Without a parser downstream everything else stays, in order.
        let all = [
            7,
            0,
            VMWARE_CURSOR,
            ENC_EXTENDED_CLIPBOARD,
            -223,
            0x7fff_ffff,
        ];
        expect_encodings(open(), &all, &all);
        // ExtendedClipboard only goes with the clipboard closed.
        let closed = ClientRules {
            clipboard_to_vm: false,
            ..open()
        };
        expect_encodings(
            closed,
            &[ENC_EXTENDED_CLIPBOARD, 16, ENC_EXTENDED_CLIPBOARD],
            &[16, 0],
        );
        // The padding byte is sent as 0.
        let r = run_all(open(), &[1, 2, 0xff, 0, 1, 0, 0, 0, 0]);
        assert_eq!(r.out, cat(&[&[1], &set_encodings(&[0])]));
    }

    #[test]
    fn set_encodings_with_a_parser_downstream() {
        fn parseable(e: i32) -> bool {
            matches!(e, 1 | 16 | ENC_EXTENDED_CLIPBOARD)
        }
        let rules = ClientRules {
            parseable: Some(parseable),
            ..open()
        };
        let hints = [
            -32, -23, -256, -247, -512, -412, -768, -763, -26, -250, -500,
        ];
        let not_hints = [-33, -22, -257, -246, -513, -411, -769, -762];
        let list = [
            &[7, 16, VMWARE_CURSOR, -223, 1, -316, ENC_EXTENDED_CLIPBOARD][..],
            &hints,
            &not_hints,
        ]
        .concat();
        let expected = [&[16, 1, ENC_EXTENDED_CLIPBOARD][..], &hints, &[0]].concat();
        expect_encodings(rules, &list, &expected);
        // The parser cannot reject Raw.
        fn nothing(_: i32) -> bool {
            false
        }
        let strict = ClientRules {
            parseable: Some(nothing),
            clipboard_to_vm: false,
            ..open()
        };
        expect_encodings(strict, &[5, 0, -24, ENC_EXTENDED_CLIPBOARD], &[0, -24]);
        expect_encodings(strict, &[5], &[0]);
    }

    #[test]
    fn set_encodings_is_bounded() {
        let at_bound = vec![0; usize::from(MAX_ENCODINGS)];
        let input = cat(&[&[1], &set_encodings(&at_bound)]);
        let r = run_all(open(), &input);
        assert_eq!(r.out, input);
        let over = vec![0; usize::from(MAX_ENCODINGS) + 1];
        let r = run_all(open(), &cat(&[&[1], &key(1, 1), &set_encodings(&over)]));
        assert_eq!(r.result, Err(ClientStreamError::TooManyEncodings(1025)));
        assert_eq!(r.out, cat(&[&[1], &key(1, 1)]));
        // The error comes with the count, before the list is sent.
        let mut f = ClientFilter::new(open());
        let mut out = Vec::new();
        f.feed(&[1, 2, 0], &mut out).unwrap();
        assert_eq!(
            f.feed(&[0xff, 0xff], &mut out),
            Err(ClientStreamError::TooManyEncodings(0xffff))
        );
    }

    #[test]
    fn errors() {
        use ClientStreamError::*;
        let cases: Vec<(Vec<u8>, ClientStreamError)> = vec![
            (vec![77], UnknownMessage(77)),
            (vec![1], UnknownMessage(1)),
            (vec![7], UnknownMessage(7)),
            (vec![149], UnknownMessage(149)),
            (vec![249], UnknownMessage(249)),
            (vec![252], UnknownMessage(252)),
            (vec![254], UnknownMessage(254)),
            (vec![255, 2], UnknownQemuMessage(2)),
            (vec![255, 255], UnknownQemuMessage(255)),
            (vec![255, 1, 0, 3], BadAudioOperation(3)),
            (vec![255, 1, 1, 0], BadAudioOperation(256)),
            (
                cat(&[&[248, 0, 0, 0, 0, 0, 0, 0, 65], &[0; 65]]),
                FenceTooLong(65),
            ),
            (vec![248, 0, 0, 0, 0, 0, 0, 0, 255], FenceTooLong(255)),
            (vec![6, 0, 0, 0, 0x80, 0, 0, 0], CutTextLength),
            (
                vec![6, 0, 0, 0, 0xff, 0xff, 0xff, 0xfd, 0, 0, 0],
                ExtendedClipboardTooShort(3),
            ),
            (
                vec![6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
                ExtendedClipboardTooShort(1),
            ),
        ];
        let good = cat(&[&[0], &key(1, 9), &fbu_request()]);
        for (bad, err) in cases {
            let r = run_all(open(), &cat(&[&good, &bad, &key(0, 9)]));
            assert_eq!(r.result, Err(err), "{bad:?}");
            // What came before is passed on; nothing of the bad message is.
            assert_eq!(r.out, good);
            assert_eq!(r.counts.key_events, 1);
        }
        assert_eq!(
            UnknownMessage(77).to_string(),
            "the browser sent an unknown RFB message type 77"
        );
    }

    #[test]
    fn limits_just_inside_are_accepted() {
        let input = cat(&[
            &[0],
            &fence(&[9; 64]),
            &ext_cut(&[0, 0, 0, 0]),
            &desktop_size(255),
            &desktop_size(0),
            &cut(&[]),
        ]);
        let r = run_all(open(), &input);
        assert_eq!((r.result, r.out), (Ok(()), input));
    }

    #[test]
    fn error_texts_are_clear() {
        use ClientStreamError::*;
        for err in [
            UnknownMessage(9),
            TooManyEncodings(2000),
            FenceTooLong(99),
            UnknownQemuMessage(3),
            BadAudioOperation(4),
            CutTextLength,
            ExtendedClipboardTooShort(2),
        ] {
            let text = err.to_string();
            assert!(text.starts_with("the browser sent "), "{text}");
            assert!(text.len() > 40, "{text}");
        }
    }

    #[test]
    fn last_pixel_format_is_taken_once() {
        let mut f = ClientFilter::new(open());
        let mut out = Vec::new();
        assert_eq!(f.take_pixel_format(), None);
        let first = set_pixel_format(&PixelFormat::TRUE_COLOUR_32);
        let second = set_pixel_format(&PF);
        f.feed(&cat(&[&[1], &first, &second[..7]]), &mut out)
            .unwrap();
        assert_eq!(f.take_pixel_format(), Some(PixelFormat::TRUE_COLOUR_32));
        assert_eq!(f.take_pixel_format(), None);
        f.feed(&second[7..], &mut out).unwrap();
        f.feed(&first, &mut out).unwrap();
        f.feed(&second, &mut out).unwrap();
        assert_eq!(f.take_pixel_format(), Some(PF));
        assert_eq!(f.take_pixel_format(), None);
    }

    #[test]
    fn runs_of_events_pass_in_one_piece() {
        let mut input = vec![1];
        for i in 0..10_000u16 {
            input.extend(pointer(0, i, i));
            input.extend(key((i & 1) as u8, u32::from(i)));
        }
        let mut f = ClientFilter::new(open());
        let mut out = Vec::new();
        f.feed(&input, &mut out).unwrap();
        assert_eq!(out, input);
        assert_eq!(
            (f.counts().pointer_events, f.counts().key_events),
            (10_000, 10_000)
        );
        assert_eq!(f.held.capacity(), 0);
    }

    #[test]
    fn an_idle_filter_is_small() {
        let mut f = ClientFilter::new(open());
        assert!(std::mem::size_of::<ClientFilter>() <= 160);
        assert_eq!(f.held.capacity(), 0);
        // A straddling SetEncodings at the bound is held, then given back.
        let input = cat(&[&[1], &set_encodings(&[0; 1024])]);
        let mut out = Vec::new();
        f.feed(&input[..100], &mut out).unwrap();
        f.feed(&input[100..], &mut out).unwrap();
        assert_eq!(out, input);
        assert_eq!(f.held.capacity(), 0);
    }

    /// A random message, mostly well-formed; the mutations come later.
    fn random_message(rng: &mut XorShift) -> Vec<u8> {
        let special = [0, -316, ENC_EXTENDED_CLIPBOARD, VMWARE_CURSOR, -26, 16, 7];
        match rng.below(16) {
            0 => set_pixel_format(&PF),
            1 => {
                let n = rng.below(12);
                let list: Vec<i32> = (0..n)
                    .map(|_| match rng.below(3) {
                        0 => rng.next() as i32,
                        _ => special[rng.below(special.len())],
                    })
                    .collect();
                set_encodings(&list)
            }
            2 => fbu_request(),
            3 => key(1, rng.next() as u32),
            4 => pointer(rng.next() as u8, 1, 2),
            5 => {
                let len = rng.below(40);
                cut(&rng.bytes(len))
            }
            6 => {
                let len = 4 + rng.below(40);
                ext_cut(&rng.bytes(len))
            }
            7 => continuous_updates(),
            8 => {
                let len = rng.below(70);
                fence(&rng.bytes(len))
            }
            9 => xvp(rng.next() as u8),
            10 => desktop_size(rng.below(4) as u8),
            11 => qemu_key(1, 2, 3),
            12 => audio(rng.below(4) as u16),
            13 => audio_format(),
            14 => {
                let len = rng.below(8);
                rng.bytes(len)
            }
            _ => vec![rng.next() as u8],
        }
    }

    fn random_rules(rng: &mut XorShift) -> ClientRules {
        fn even(e: i32) -> bool {
            e % 2 == 0
        }
        let bits = rng.next();
        ClientRules {
            view_only: bits & 1 != 0,
            force_shared: bits & 2 != 0,
            clipboard_to_vm: bits & 4 != 0,
            max_clipboard: (bits >> 8) as u32 % 48,
            parseable: if bits & 8 != 0 { Some(even) } else { None },
        }
    }

    #[test]
    fn garbage_never_panics_and_chunking_never_matters() {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for round in 0..3000 {
            let rules = random_rules(&mut rng);
            let mut input = vec![rng.next() as u8];
            if round % 4 == 0 {
                // Pure noise.
                let len = rng.below(200);
                input.extend(rng.bytes(len));
            } else {
                for _ in 0..rng.below(20) {
                    input.extend(random_message(&mut rng));
                }
                for _ in 0..rng.below(3) {
                    if !input.is_empty() {
                        let at = rng.below(input.len());
                        input[at] = rng.next() as u8;
                    }
                }
            }
            let whole = run(rules, &input, usize::MAX);
            let mut sizes = || 1 + rng.below(17);
            let pieces = run_sizes(rules, &input, &mut sizes);
            assert_eq!(pieces, whole, "{input:?}");
            assert!(whole.out.len() <= 2 * input.len());
        }
    }
}
