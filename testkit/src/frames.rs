//! A raw WebSocket client for load tools: the upgrade written by hand, and a
//! frame reader that hands out payload bytes in place, with no copy and no
//! allocation per message, so the client costs little beside the proxy.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// What the server sent next.
#[derive(Debug, PartialEq, Eq)]
pub enum Ev {
    /// A range of [`FrameReader::buf`] with payload bytes of a data frame.
    Data(usize, usize),
    Ping(Vec<u8>),
    Close(u16, String),
    Eof,
}

/// Why a read or an upgrade failed.
#[derive(Debug)]
pub enum FrameError {
    Io(std::io::Error),
    /// The connection ended during the upgrade.
    ClosedInUpgrade,
    /// The response head did not fit the buffer.
    HeadTooLong,
    /// Not `101`: the response head.
    Refused(String),
    /// A frame no server may send (masked, unknown opcode, long control).
    Protocol(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Io(e) => write!(f, "{e}"),
            FrameError::ClosedInUpgrade => write!(f, "closed during the upgrade"),
            FrameError::HeadTooLong => write!(f, "upgrade response too long"),
            FrameError::Refused(head) => write!(f, "upgrade refused: {head}"),
            FrameError::Protocol(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        FrameError::Io(e)
    }
}

/// Frames from the server, read into a buffer of fixed size.
pub struct FrameReader<R> {
    rd: R,
    /// The receive buffer; [`Ev::Data`] ranges point into it.
    pub buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Payload bytes left in the current data frame.
    left: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader with a receive buffer of `cap` bytes.
    pub fn new(rd: R, cap: usize) -> FrameReader<R> {
        FrameReader {
            rd,
            buf: vec![0u8; cap],
            start: 0,
            end: 0,
            left: 0,
        }
    }

    /// The stream it reads from, borrowed.
    pub fn get_ref(&self) -> &R {
        &self.rd
    }

    /// The stream it reads from.
    pub fn into_inner(self) -> R {
        self.rd
    }

    /// Gives back the last `n` bytes of the `Data` range just returned.
    pub fn unread(&mut self, n: usize) {
        self.start -= n;
        self.left += n;
    }

    /// Reads more into the buffer; false at EOF.
    async fn more(&mut self) -> std::io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.rd.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n > 0)
    }

    /// Reads the upgrade response head; the frames after it stay buffered.
    async fn read_head(&mut self) -> Result<(), FrameError> {
        let head_end = loop {
            if let Some(p) = self.buf[..self.end]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                break p + 4;
            }
            if self.end == self.buf.len() {
                return Err(FrameError::HeadTooLong);
            }
            if !self.more().await? {
                return Err(FrameError::ClosedInUpgrade);
            }
        };
        if !self.buf.starts_with(b"HTTP/1.1 101") {
            return Err(FrameError::Refused(
                String::from_utf8_lossy(&self.buf[..head_end]).into_owned(),
            ));
        }
        self.start = head_end;
        Ok(())
    }

    /// The next event: payload bytes, a ping, a close or the end.
    pub async fn next(&mut self) -> Result<Ev, FrameError> {
        loop {
            let avail = self.end - self.start;
            if self.left > 0 {
                if avail > 0 {
                    let n = avail.min(self.left);
                    let s = self.start;
                    self.start += n;
                    self.left -= n;
                    return Ok(Ev::Data(s, s + n));
                }
            } else if avail >= 2 {
                let b = &self.buf[self.start..self.end];
                let opcode = b[0] & 0x0F;
                if b[1] & 0x80 != 0 {
                    return Err(FrameError::Protocol(
                        "the server sent a masked frame".into(),
                    ));
                }
                let (len, hl) = match b[1] & 0x7F {
                    126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                    127 if b.len() >= 10 => {
                        let mut n = [0u8; 8];
                        n.copy_from_slice(&b[2..10]);
                        (u64::from_be_bytes(n) as usize, 10)
                    }
                    126 | 127 => (0, 0),
                    n => (n as usize, 2),
                };
                if hl > 0 {
                    match opcode {
                        0 | 2 => {
                            self.start += hl;
                            self.left = len;
                            continue;
                        }
                        8..=10 => {
                            if len > 125 {
                                return Err(FrameError::Protocol(format!(
                                    "a control frame of {len} bytes"
                                )));
                            }
                            if avail >= hl + len {
                                let p = self.buf[self.start + hl..self.start + hl + len].to_vec();
                                self.start += hl + len;
                                match opcode {
                                    8 => {
                                        let code = if p.len() >= 2 {
                                            u16::from_be_bytes([p[0], p[1]])
                                        } else {
                                            1005
                                        };
                                        let reason =
                                            String::from_utf8_lossy(p.get(2..).unwrap_or(&[]))
                                                .into_owned();
                                        return Ok(Ev::Close(code, reason));
                                    }
                                    9 => return Ok(Ev::Ping(p)),
                                    _ => continue,
                                }
                            }
                        }
                        other => {
                            return Err(FrameError::Protocol(format!("unexpected opcode {other}")));
                        }
                    }
                }
            }
            if !self.more().await? {
                return Ok(Ev::Eof);
            }
        }
    }
}

/// Opens `/websockify?token=TOKEN` on `addr` offering `binary`, as noVNC
/// does: the reader (with a `cap`-byte buffer, past the response head) and
/// the write half.
pub async fn connect(
    addr: SocketAddr,
    token: &str,
    cap: usize,
) -> Result<(FrameReader<OwnedReadHalf>, OwnedWriteHalf), FrameError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (rd, mut wr) = tcp.into_split();
    wr.write_all(upgrade_request(addr, token).as_bytes())
        .await?;
    let mut fr = FrameReader::new(rd, cap);
    fr.read_head().await?;
    Ok((fr, wr))
}

/// The upgrade request for `token`.
pub fn upgrade_request(addr: SocketAddr, token: &str) -> String {
    format!(
        "GET /websockify?token={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n"
    )
}

/// The head of a masked client frame of `len` payload bytes.
pub fn frame_head(opcode: u8, len: usize, mask: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14);
    f.push(0x80 | opcode);
    if len < 126 {
        f.push(0x80 | len as u8);
    } else if len < 65536 {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f
}

/// A whole masked client frame.
pub fn frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = frame_head(opcode, payload.len(), mask);
    f.reserve(payload.len());
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}
