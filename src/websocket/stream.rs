//! Reading and writing frames on a live connection.
//!
//! [`Reader::next`] is cancel-safe: its state changes only after a read has
//! completed, so it can sit in a `select!` beside the VNC socket.

use std::io::{self, IoSlice};
use std::ops::{Deref, DerefMut, Range};
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::frame::{self, FrameError, OpCode};
use super::pool::Lent;

/// What a waiting reader keeps: the start of a frame header or of a control
/// frame (at most 14 and 131 bytes; payload bytes are handed out as they
/// come, never held). Reads go into a lent [`super::pool::BIG`] buffer,
/// given back whenever a read would wait; larger frames stream through in
/// pieces.
const SMALL_BUF: usize = 256;

/// The reader's buffer: lent while reading, its own small one while it
/// waits (kept beside the lent one, so going back allocates nothing).
struct Buf {
    small: Box<[u8; SMALL_BUF]>,
    lent: Option<Lent>,
}

impl Buf {
    fn new() -> Buf {
        Buf {
            small: Box::new([0u8; SMALL_BUF]),
            lent: None,
        }
    }

    /// Reads go into a lent buffer: the live bytes move there; their new
    /// place.
    fn lend(&mut self, live: Range<usize>) -> Range<usize> {
        if self.lent.is_some() {
            return live;
        }
        let mut big = Lent::take();
        big[..live.len()].copy_from_slice(&self.small[live.clone()]);
        self.lent = Some(big);
        0..live.len()
    }

    /// A waiting reader gives the lent buffer back, keeping the live bytes
    /// if they fit the small one; their new place.
    fn give_back(&mut self, live: Range<usize>) -> Range<usize> {
        match &self.lent {
            Some(big) if live.len() <= SMALL_BUF => {
                self.small[..live.len()].copy_from_slice(&big[live.clone()]);
                self.lent = None;
                0..live.len()
            }
            _ => live,
        }
    }
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.lent {
            Some(big) => big,
            None => &self.small[..],
        }
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.lent {
            Some(big) => big,
            None => &mut self.small[..],
        }
    }
}

/// One thing the browser sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Unmasked payload bytes of a binary message, as they arrived.
    Data(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    /// A close frame, with its status code if it had one.
    Close(Option<u16>),
    /// A text frame: this relay speaks binary only.
    Text,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed without a close frame")]
    Eof,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("malformed close frame")]
    BadClose,
}

enum State {
    Header,
    Payload {
        left: u64,
        mask: [u8; 4],
        offset: u64,
    },
}

/// What a parse step found, as positions in the buffer (so the borrow is
/// taken only when returning).
enum Found {
    Data(usize, usize),
    Ping(usize, usize),
    Pong,
    Close(Option<u16>),
    Text,
}

pub struct Reader<R> {
    io: R,
    buf: Buf,
    start: usize,
    end: usize,
    state: State,
    max_frame: u64,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// `max_frame` bounds a single frame's payload; larger ones are refused
    /// before their payload is read.
    pub fn new(io: R, max_frame: u64) -> Reader<R> {
        Reader {
            io,
            buf: Buf::new(),
            start: 0,
            end: 0,
            state: State::Header,
            max_frame,
        }
    }

    /// The next event from the browser.
    pub async fn next(&mut self) -> Result<Event<'_>, ReadError> {
        let found = loop {
            if let Some(found) = self.step()? {
                break found;
            }
            self.fill().await?;
        };
        Ok(match found {
            Found::Data(s, e) => Event::Data(&self.buf[s..e]),
            Found::Ping(s, e) => Event::Ping(&self.buf[s..e]),
            Found::Pong => Event::Pong,
            Found::Close(code) => Event::Close(code),
            Found::Text => Event::Text,
        })
    }

    /// Whether the data last returned ended its frame: a client that sends
    /// each message as one frame (spice-html5 does) ends a message there.
    pub fn at_frame_end(&self) -> bool {
        matches!(self.state, State::Header | State::Payload { left: 0, .. })
    }

    /// Parses what is buffered; `None` means more bytes are needed.
    fn step(&mut self) -> Result<Option<Found>, ReadError> {
        loop {
            match self.state {
                State::Payload { left: 0, .. } => self.state = State::Header,
                State::Payload { left, mask, offset } => {
                    let avail = self.end - self.start;
                    if avail == 0 {
                        return Ok(None);
                    }
                    let n = avail.min(usize::try_from(left).unwrap_or(usize::MAX));
                    let (s, e) = (self.start, self.start + n);
                    frame::unmask(&mut self.buf[s..e], mask, offset);
                    self.start = e;
                    self.state = State::Payload {
                        left: left - n as u64,
                        mask,
                        offset: offset + n as u64,
                    };
                    let e = self.coalesce(e);
                    return Ok(Some(Found::Data(s, e)));
                }
                State::Header => {
                    let Some((h, hl)) = frame::parse_client_header(
                        &self.buf[self.start..self.end],
                        self.max_frame,
                    )?
                    else {
                        return Ok(None);
                    };
                    if h.opcode.is_control() {
                        // Control payloads are at most 125 bytes: wait until
                        // the whole frame is buffered.
                        let total = hl + h.len as usize;
                        if self.end - self.start < total {
                            return Ok(None);
                        }
                        let (s, e) = (self.start + hl, self.start + total);
                        frame::unmask(&mut self.buf[s..e], h.mask, 0);
                        self.start = e;
                        return Ok(Some(match h.opcode {
                            OpCode::Ping => Found::Ping(s, e),
                            OpCode::Pong => Found::Pong,
                            _ => Found::Close(self.close_code(s, e)?),
                        }));
                    }
                    self.start += hl;
                    if h.opcode == OpCode::Text {
                        return Ok(Some(Found::Text));
                    }
                    // Binary and continuation frames are one byte stream here.
                    self.state = State::Payload {
                        left: h.len,
                        mask: h.mask,
                        offset: 0,
                    };
                }
            }
        }
    }

    /// Appends the payloads of further data frames already buffered behind
    /// the one just returned, moving each down to `end` (so many small
    /// frames become one write to the VNC server). Stops at anything else.
    fn coalesce(&mut self, mut end: usize) -> usize {
        while let State::Payload { left: 0, .. } = self.state {
            let Ok(Some((h, hl))) =
                frame::parse_client_header(&self.buf[self.start..self.end], self.max_frame)
            else {
                break;
            };
            if !matches!(h.opcode, OpCode::Binary | OpCode::Continuation) {
                break;
            }
            let from = self.start + hl;
            let n = (self.end - from).min(usize::try_from(h.len).unwrap_or(usize::MAX));
            frame::unmask(&mut self.buf[from..from + n], h.mask, 0);
            self.buf.copy_within(from..from + n, end);
            end += n;
            self.start = from + n;
            self.state = State::Payload {
                left: h.len - n as u64,
                mask: h.mask,
                offset: n as u64,
            };
        }
        end
    }

    fn close_code(&self, s: usize, e: usize) -> Result<Option<u16>, ReadError> {
        match &self.buf[s..e] {
            [] => Ok(None),
            [_] => Err(ReadError::BadClose),
            [a, b, reason @ ..] => {
                std::str::from_utf8(reason).map_err(|_| ReadError::BadClose)?;
                Ok(Some(u16::from_be_bytes([*a, *b])))
            }
        }
    }

    async fn fill(&mut self) -> Result<(), ReadError> {
        std::future::poll_fn(|cx| {
            let live = self.buf.lend(self.start..self.end);
            (self.start, self.end) = (live.start, live.end);
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let mut read = ReadBuf::new(&mut self.buf[self.end..]);
            match Pin::new(&mut self.io).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(ReadError::Eof));
                    }
                    self.end += n;
                    Poll::Ready(Ok(()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
                Poll::Pending => {
                    // The browser went quiet: the lent buffer goes back until
                    // it sends again.
                    let live = self.buf.give_back(self.start..self.end);
                    (self.start, self.end) = (live.start, live.end);
                    Poll::Pending
                }
            }
        })
        .await
    }
}

pub struct Writer<W> {
    io: W,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub fn new(io: W) -> Writer<W> {
        Writer { io }
    }

    /// Sends one final frame: header and payload in vectored writes, the
    /// payload never copied.
    pub async fn send(&mut self, opcode: OpCode, payload: &[u8]) -> io::Result<()> {
        let mut head = [0u8; frame::MAX_SERVER_HEADER];
        let hl = frame::server_header(opcode, payload.len(), &mut head);
        let (mut h, mut p) = (&head[..hl], payload);
        while !h.is_empty() || !p.is_empty() {
            let n = self
                .io
                .write_vectored(&[IoSlice::new(h), IoSlice::new(p)])
                .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let from_head = n.min(h.len());
            h = &h[from_head..];
            p = &p[n - from_head..];
        }
        Ok(())
    }

    pub async fn send_binary(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send(OpCode::Binary, payload).await
    }

    /// Sends a close frame (the reason cut to fit a control frame) and
    /// flushes.
    pub async fn close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut payload = [0u8; 125];
        payload[..2].copy_from_slice(&code.to_be_bytes());
        payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
        self.send(OpCode::Close, &payload[..2 + end]).await?;
        self.io.flush().await
    }

    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.io.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    fn masked(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut v = vec![(u8::from(fin) << 7) | opcode];
        if payload.len() < 126 {
            v.push(0x80 | payload.len() as u8);
        } else {
            v.push(0x80 | 126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    /// Collects events from `wire` delivered in chunks of `chunk` bytes.
    async fn events(wire: Vec<u8>, chunk: usize) -> (Vec<u8>, Vec<String>) {
        let (mut tx, rx) = tokio::io::duplex(64);
        tokio::spawn(async move {
            for c in wire.chunks(chunk) {
                if tx.write_all(c).await.is_err() {
                    return;
                }
            }
        });
        let mut r = Reader::new(rx, 1 << 20);
        let mut data = Vec::new();
        let mut other = Vec::new();
        loop {
            match r.next().await {
                Ok(Event::Data(d)) => data.extend_from_slice(d),
                Ok(e) => other.push(format!("{e:?}")),
                Err(e) => {
                    other.push(format!("err {e}"));
                    break;
                }
            }
        }
        (data, other)
    }

    #[tokio::test]
    async fn fragmented_binary_and_interleaved_control_frames() {
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = masked(0x2, false, &payload[..300], [1, 2, 3, 4]);
        wire.extend(masked(0x9, true, b"hi", [5, 6, 7, 8]));
        wire.extend(masked(0x0, false, &payload[300..10_000], [9, 9, 9, 1]));
        wire.extend(masked(0xA, true, b"", [1, 1, 1, 1]));
        wire.extend(masked(0x0, true, &payload[10_000..], [2, 3, 4, 5]));
        wire.extend(masked(
            0x8,
            true,
            &[0x03, 0xE8, b'b', b'y', b'e'],
            [7, 7, 7, 7],
        ));
        for chunk in [1, 7, 100, 5000, 100_000] {
            let (data, other) = events(wire.clone(), chunk).await;
            assert_eq!(data, payload, "chunk {chunk}");
            assert_eq!(
                other,
                vec![
                    "Ping([104, 105])",
                    "Pong",
                    "Close(Some(1000))",
                    "err connection closed without a close frame"
                ],
                "chunk {chunk}"
            );
        }
    }

    #[tokio::test]
    async fn small_buffered_frames_come_out_as_one_chunk() {
        let mut wire = Vec::new();
        for i in 0..8u8 {
            wire.extend(masked(
                if i == 0 { 0x2 } else { 0x0 },
                i == 7,
                &[i; 100],
                [i, 1, 2, 3],
            ));
        }
        wire.extend(masked(0x9, true, b"p", [1, 2, 3, 4]));
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        tx.write_all(&wire).await.unwrap();
        let mut r = Reader::new(rx, 1 << 20);
        // Eight frames come out as far fewer chunks than frames (the buffer
        // starts small and grows), and nothing is lost or reordered.
        let expected: Vec<u8> = (0..8u8).flat_map(|i| [i; 100]).collect();
        let mut got = Vec::new();
        let mut chunks = 0;
        while got.len() < expected.len() {
            let Event::Data(d) = r.next().await.unwrap() else {
                panic!("expected data");
            };
            got.extend_from_slice(d);
            chunks += 1;
        }
        assert_eq!(got, expected);
        assert!(chunks <= 3, "{chunks} chunks for 8 frames");
        assert_eq!(r.next().await.unwrap(), Event::Ping(b"p"));
    }

    #[tokio::test]
    async fn a_burst_borrows_a_large_buffer_and_a_quiet_reader_gives_it_back() {
        let (mut tx, rx) = tokio::io::duplex(1 << 17);
        let mut r = Reader::new(rx, 1 << 20);
        let burst: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
        tx.write_all(&masked(0x2, true, &burst[..30_000], [3, 1, 4, 1]))
            .await
            .unwrap();
        tx.write_all(&masked(0x0, true, &burst[30_000..], [5, 9, 2, 6]))
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut largest = 0;
        while got.len() < burst.len() {
            let Event::Data(d) = r.next().await.unwrap() else {
                panic!("expected data");
            };
            largest = largest.max(d.len());
            got.extend_from_slice(d);
        }
        assert_eq!(got, burst);
        assert!(largest > SMALL_BUF, "largest chunk {largest}");
        assert!(r.buf.lent.is_some());
        // Nothing more comes: the reader waits, and the lent buffer is back.
        let waited = tokio::time::timeout(Duration::from_millis(20), r.next()).await;
        assert!(waited.is_err());
        assert!(r.buf.lent.is_none());
        // A frame cut in two around the wait comes through whole.
        let next = masked(0x2, true, b"after the quiet", [8, 8, 8, 8]);
        tx.write_all(&next[..4]).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(20), r.next()).await;
        assert!(waited.is_err());
        tx.write_all(&next[4..]).await.unwrap();
        assert_eq!(r.next().await.unwrap(), Event::Data(b"after the quiet"));
    }

    #[tokio::test]
    async fn text_and_unmasked_frames_are_reported() {
        let (_, other) = events(masked(0x1, true, b"hello", [1, 2, 3, 4]), 3).await;
        assert_eq!(other[0], "Text");
        let (_, other) = events(vec![0x82, 0x02, 0, 0], 4).await;
        assert_eq!(other, vec!["err client frames must be masked"]);
        let (_, other) = events(masked(0x8, true, &[3], [1, 2, 3, 4]), 9).await;
        assert_eq!(other, vec!["err malformed close frame"]);
    }

    #[tokio::test]
    async fn writer_frames_payloads_and_close_reasons() {
        let (tx, mut rx) = tokio::io::duplex(1 << 20);
        let mut w = Writer::new(tx);
        let big = vec![7u8; 70_000];
        w.send_binary(b"abc").await.unwrap();
        w.send_binary(&big).await.unwrap();
        w.close(4401, &"é".repeat(100)).await.unwrap();
        drop(w);
        let mut out = Vec::new();
        rx.read_to_end(&mut out).await.unwrap();
        assert_eq!(&out[..5], &[0x82, 3, b'a', b'b', b'c']);
        assert_eq!(&out[5..7], &[0x82, 127]);
        let close = &out[5 + 10 + 70_000..];
        assert_eq!(close[0], 0x88);
        assert!(close[1] as usize <= 125);
        assert_eq!(&close[2..4], &4401u16.to_be_bytes());
        assert!(std::str::from_utf8(&close[4..]).is_ok());
    }
}
