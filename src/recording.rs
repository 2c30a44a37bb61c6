//! Session recordings: what the browser received during a console session
//! (the proxy's side of the RFB handshake, then the VNC server's stream),
//! with timestamps, zstd-compressed, one file per session.
//!
//! The relay must never wait for the disk, so [`Recorder::record`] only
//! queues; a writer thread compresses and writes. When the queue is full or
//! the disk fails, the recording stops for good and says so in its end
//! record, instead of slowing the session.
//!
//! # Files
//!
//! `{dir}/{session_id}.vncrec.zst` ([`path_for`]): the name comes from the
//! numeric session id alone. The file is created new with mode 0600, and
//! `dir` with mode 0700 when missing.
//!
//! # Format
//!
//! The file is a sequence of zstd frames; decompressed, they are one stream
//! (all integers big-endian):
//!
//! - the magic `VNCBREC1` (8 bytes);
//! - a u32 header length (at most 64 KiB), then the [`Header`] as UTF-8
//!   JSON: `{"version":1,"session_id":…,"vm_id":…,"user":"…","node":"…",
//!   "client_addr":"…","started_at":<unix seconds>,"started_at_ms":<unix
//!   millis>}`; readers ignore fields they do not know;
//! - records: u32 milliseconds since the recording started (saturating),
//!   u32 length (1 to 1 MiB), then that many bytes, in the order the
//!   browser received them;
//! - an end record: u32 milliseconds, u32 length 0, then one status byte:
//!   0 = complete, 1 = incomplete (the recording stopped early, when the
//!   writer fell behind or the disk failed; nothing after that point was
//!   recorded). Its time is when the session ended, or when the recording
//!   stopped.
//!
//! A file without an end record (the node crashed, or the [`Recorder`] was
//! dropped without [`Recorder::finish`] and its writer could not end it)
//! reads as incomplete, up to the last whole record. The writer flushes
//! about once a second while data arrives, so a crash loses little; after
//! a few idle seconds it ends the zstd frame and frees the compressor, so an
//! idle session holds no large buffers.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime};

/// The first bytes of every decompressed recording.
pub const MAGIC: &[u8; 8] = b"VNCBREC1";
/// The format version this module writes and reads.
pub const VERSION: u32 = 1;
/// Largest header, so a reader never allocates much for a bad file.
pub const MAX_HEADER: usize = 64 << 10;
/// Largest record; larger data is split.
pub const MAX_RECORD: usize = 1 << 20;
/// The end record's status byte.
const COMPLETE: u8 = 0;
const INCOMPLETE: u8 = 1;

/// What one queued message costs beyond its data, so that many tiny
/// records cannot hold more memory than the bound suggests.
const MESSAGE_COST: usize = 64;
/// How long written data may sit in the compressor before it is flushed.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How long a quiet session keeps its compressor before the frame ends.
const IDLE_CLOSE: Duration = Duration::from_secs(5);
/// zstd's fastest regular level: the writer must keep up with the relay
/// (it falls behind at level 3 on a fast, noisy screen), and screens still
/// compress well at it.
const LEVEL: i32 = 1;

/// Who and what a recording is of; the first thing in the file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub session_id: i64,
    pub vm_id: i64,
    pub user: String,
    pub node: String,
    pub client_addr: String,
    /// Unix seconds.
    pub started_at: i64,
    /// Unix milliseconds.
    pub started_at_ms: i64,
}

/// Where the recording of a session lives: only the id names it.
pub fn path_for(dir: &Path, session_id: i64) -> PathBuf {
    dir.join(format!("{session_id}.vncrec.zst"))
}

/// Why a recording could not be started, read or purged.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    /// The file system refused; `what` says what was being done.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A recording for this session already exists; it is never replaced.
    #[error("a recording already exists at {}", .0.display())]
    Exists(PathBuf),
    /// Session ids name files, so only non-negative ones are recorded.
    #[error("session id {0} cannot name a recording")]
    BadSessionId(i64),
    /// The file is not a recording in this format.
    #[error("not a session recording: {0}")]
    Format(String),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> RecordingError {
    let what = what.into();
    move |source| RecordingError::Io { what, source }
}

/// Why a recording stopped early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stopped {
    #[error("the recording fell behind the session")]
    FellBehind,
    #[error("writing the recording failed: {0}")]
    WriteFailed(String),
}

/// How a recording ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The end record says complete and everything reached the disk.
    pub complete: bool,
    /// The file's size on disk (compressed).
    pub bytes: u64,
    /// Why it stopped early, if it did.
    pub stopped: Option<Stopped>,
}

/// From the recorder to its writer.
enum Msg {
    Data { at: u32, bytes: Vec<u8> },
    End { at: u32, complete: bool },
}

/// What the recorder and its writer both see.
struct Shared {
    /// Data bytes (plus [`MESSAGE_COST`] each) queued and not yet written.
    queued: AtomicUsize,
    /// Set once by the writer when the disk fails.
    failed: OnceLock<String>,
}

/// The writer's last word.
struct Done {
    bytes: u64,
    complete: bool,
    error: Option<String>,
}

/// Records one session. Dropping it without [`Recorder::finish`] ends the
/// file as incomplete.
pub struct Recorder {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    done: tokio::sync::oneshot::Receiver<Done>,
    started: Instant,
    queue_bytes: usize,
    stopped: Option<Stopped>,
}

impl Recorder {
    /// Creates the file and starts its writer (a thread of its own, as it
    /// lives as long as the session) fed through a queue bounded to
    /// `queue_bytes`.
    pub fn start(
        dir: &Path,
        header: &Header,
        queue_bytes: usize,
    ) -> Result<Recorder, RecordingError> {
        if header.session_id < 0 {
            return Err(RecordingError::BadSessionId(header.session_id));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error(format!("creating {}", dir.display())))?;
        let path = path_for(dir, header.session_id);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => RecordingError::Exists(path.clone()),
                _ => RecordingError::Io {
                    what: format!("creating {}", path.display()),
                    source,
                },
            })?;
        Recorder::with_file(file, header, queue_bytes, FLUSH_EVERY)
    }

    /// Records into any open file (tests use `/dev/full`).
    pub(crate) fn with_file(
        file: File,
        header: &Header,
        queue_bytes: usize,
        flush_every: Duration,
    ) -> Result<Recorder, RecordingError> {
        let header = Header {
            version: VERSION,
            ..header.clone()
        };
        let json = serde_json::to_vec(&header)
            .map_err(|e| RecordingError::Format(format!("header: {e}")))?;
        if json.len() > MAX_HEADER {
            return Err(RecordingError::Format(format!(
                "a header of {} bytes is over the {MAX_HEADER}",
                json.len()
            )));
        }
        let mut preamble = Vec::with_capacity(MAGIC.len() + 4 + json.len());
        preamble.extend_from_slice(MAGIC);
        preamble.extend_from_slice(&be32(json.len()));
        preamble.extend_from_slice(&json);

        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            failed: OnceLock::new(),
        });
        let (tx, rx) = mpsc::channel();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let writer = Writer {
            sink: Sink::Idle(file),
            rx,
            shared: shared.clone(),
            flush_every,
            dirty_since: None,
            started: Instant::now(),
        };
        std::thread::Builder::new()
            .name(format!("vncrec-{}", header.session_id))
            .spawn(move || {
                let result = writer.run(preamble);
                // Nobody waits when the recorder was dropped.
                let _ = done_tx.send(result);
            })
            .map_err(io_error("starting the recording's writer"))?;
        Ok(Recorder {
            tx,
            shared,
            done,
            started: Instant::now(),
            queue_bytes,
            stopped: None,
        })
    }

    fn now_ms(&self) -> u32 {
        u32::try_from(self.started.elapsed().as_millis()).unwrap_or(u32::MAX)
    }

    /// Hands `data` (what was just sent to the browser) to the writer with
    /// the current time. Never blocks: when the queue is full or the writer
    /// has failed, the recording stops for good and this, and every later
    /// call, returns why. Data over 1 MiB becomes several records.
    pub fn record(&mut self, data: &[u8]) -> Result<(), Stopped> {
        if let Some(stopped) = &self.stopped {
            return Err(stopped.clone());
        }
        if let Some(why) = self.shared.failed.get() {
            return Err(self.stop(Stopped::WriteFailed(why.clone())));
        }
        if data.is_empty() {
            return Ok(());
        }
        let at = self.now_ms();
        let chunks = data.len().div_ceil(MAX_RECORD);
        let cost = data.len() + chunks * MESSAGE_COST;
        // Only this side adds, so what it reads is an upper bound.
        let queued = self.shared.queued.load(Ordering::Acquire);
        if queued.saturating_add(cost) > self.queue_bytes {
            return Err(self.stop(Stopped::FellBehind));
        }
        self.shared.queued.fetch_add(cost, Ordering::AcqRel);
        for chunk in data.chunks(MAX_RECORD) {
            let msg = Msg::Data {
                at,
                bytes: chunk.to_vec(),
            };
            if self.tx.send(msg).is_err() {
                let why = self.shared.failed.get().cloned();
                let why = why.unwrap_or_else(|| "the writer stopped".to_owned());
                return Err(self.stop(Stopped::WriteFailed(why)));
            }
        }
        Ok(())
    }

    /// Stops for good; the writer ends the file as incomplete now, so the
    /// end record's time is when recording stopped.
    fn stop(&mut self, why: Stopped) -> Stopped {
        let at = self.now_ms();
        let _ = self.tx.send(Msg::End {
            at,
            complete: false,
        });
        self.stopped = Some(why.clone());
        why
    }

    /// Ends the recording: writes the end record (complete, or incomplete
    /// after a stop), flushes, finishes the zstd frame, fsyncs, and waits
    /// for the writer, without blocking the runtime.
    pub async fn finish(mut self) -> Outcome {
        if self.stopped.is_none() {
            let at = self.now_ms();
            if self.tx.send(Msg::End { at, complete: true }).is_err() {
                let why = self.shared.failed.get().cloned();
                let why = why.unwrap_or_else(|| "the writer stopped".to_owned());
                self.stopped = Some(Stopped::WriteFailed(why));
            }
        }
        let done = match self.done.await {
            Ok(done) => done,
            Err(_) => Done {
                bytes: 0,
                complete: false,
                error: Some("the writer stopped".to_owned()),
            },
        };
        let stopped = match (self.stopped, done.error) {
            (Some(stopped), _) => Some(stopped),
            (None, Some(error)) => Some(Stopped::WriteFailed(error)),
            (None, None) => None,
        };
        Outcome {
            complete: done.complete && stopped.is_none(),
            bytes: done.bytes,
            stopped,
        }
    }
}

fn be32(n: usize) -> [u8; 4] {
    // Callers pass lengths already bounded by MAX_HEADER or MAX_RECORD.
    u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes()
}

/// The file, with a zstd frame open only while data comes in.
enum Sink {
    Idle(File),
    Open(zstd::Encoder<'static, File>),
    Gone,
}

impl Sink {
    fn write_all(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        if let Sink::Idle(_) = self {
            let Sink::Idle(file) = std::mem::replace(self, Sink::Gone) else {
                return Err(io::Error::other("the file is gone"));
            };
            let mut encoder = zstd::Encoder::new(file, LEVEL)?;
            encoder.include_checksum(true)?;
            *self = Sink::Open(encoder);
        }
        let Sink::Open(encoder) = self else {
            return Err(io::Error::other("the file is gone"));
        };
        for part in parts {
            encoder.write_all(part)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Open(encoder) => encoder.flush(),
            _ => Ok(()),
        }
    }

    /// Ends the open frame and frees the compressor.
    fn close_frame(&mut self) -> io::Result<()> {
        if let Sink::Open(_) = self {
            let Sink::Open(encoder) = std::mem::replace(self, Sink::Gone) else {
                return Err(io::Error::other("the file is gone"));
            };
            let mut file = encoder.finish()?;
            file.flush()?;
            *self = Sink::Idle(file);
        }
        Ok(())
    }

    /// Ends the frame, fsyncs, and gives the file's size.
    fn finish(&mut self) -> io::Result<u64> {
        self.close_frame()?;
        let Sink::Idle(file) = self else {
            return Err(io::Error::other("the file is gone"));
        };
        file.sync_all()?;
        Ok(file.metadata()?.len())
    }
}

/// Compresses and writes on its own thread.
struct Writer {
    sink: Sink,
    rx: mpsc::Receiver<Msg>,
    shared: Arc<Shared>,
    flush_every: Duration,
    /// When the oldest unflushed data was written.
    dirty_since: Option<Instant>,
    started: Instant,
}

impl Writer {
    fn run(mut self, preamble: Vec<u8>) -> Done {
        match self.write(preamble) {
            Ok(complete) => match self.sink.finish() {
                Ok(bytes) => Done {
                    bytes,
                    complete,
                    error: None,
                },
                Err(e) => self.fail(format!("finishing: {e}")),
            },
            Err(e) => self.fail(e),
        }
    }

    /// Says why, so that the recorder stops queueing, and frees the queue.
    fn fail(self, why: String) -> Done {
        let _ = self.shared.failed.set(why.clone());
        drop(self.rx);
        let bytes = match &self.sink {
            Sink::Idle(file) => file.metadata().map(|m| m.len()).unwrap_or(0),
            Sink::Open(encoder) => encoder.get_ref().metadata().map(|m| m.len()).unwrap_or(0),
            Sink::Gone => 0,
        };
        Done {
            bytes,
            complete: false,
            error: Some(why),
        }
    }

    /// Writes until the end record; returns whether it said complete.
    fn write(&mut self, preamble: Vec<u8>) -> Result<bool, String> {
        self.sink
            .write_all(&[&preamble])
            .and_then(|()| self.sink.flush())
            .map_err(|e| format!("writing the header: {e}"))?;
        loop {
            let msg = match self.dirty_since {
                Some(since) => {
                    let wait = self.flush_every.saturating_sub(since.elapsed());
                    self.rx.recv_timeout(wait)
                }
                None if matches!(self.sink, Sink::Open(_)) => self.rx.recv_timeout(IDLE_CLOSE),
                None => self
                    .rx
                    .recv()
                    .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            };
            match msg {
                Ok(Msg::Data { at, bytes }) => {
                    self.sink
                        .write_all(&[&at.to_be_bytes(), &be32(bytes.len()), &bytes])
                        .map_err(|e| format!("writing: {e}"))?;
                    let cost = bytes.len() + MESSAGE_COST;
                    drop(bytes);
                    self.shared.queued.fetch_sub(cost, Ordering::AcqRel);
                    let since = *self.dirty_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.flush_every {
                        self.flush()?;
                    }
                }
                Ok(Msg::End { at, complete }) => {
                    self.end(at, complete)?;
                    return Ok(complete);
                }
                Err(mpsc::RecvTimeoutError::Timeout) if self.dirty_since.is_some() => {
                    self.flush()?;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.sink
                        .close_frame()
                        .map_err(|e| format!("ending a frame: {e}"))?;
                }
                // Dropped without finish: what was queued is written; the
                // session's end is not known.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let at = u32::try_from(self.started.elapsed().as_millis()).unwrap_or(u32::MAX);
                    self.end(at, false)?;
                    return Ok(false);
                }
            }
        }
    }

    fn flush(&mut self) -> Result<(), String> {
        self.dirty_since = None;
        self.sink.flush().map_err(|e| format!("flushing: {e}"))
    }

    fn end(&mut self, at: u32, complete: bool) -> Result<(), String> {
        let status = if complete { COMPLETE } else { INCOMPLETE };
        self.sink
            .write_all(&[&at.to_be_bytes(), &0u32.to_be_bytes(), &[status]])
            .map_err(|e| format!("writing the end: {e}"))
    }
}

/// How a read of the decompressed stream went.
enum Fill {
    Full,
    /// The stream ended (or stopped decoding) after this many bytes.
    Short(usize),
}

/// Reads the decompressed stream; a truncated or damaged compressed file
/// reads as a short stream, while the file system's own errors are errors.
fn fill(input: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<Fill, RecordingError> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => return Ok(Fill::Short(got)),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error().is_some() => {
                return Err(RecordingError::Io {
                    what: format!("reading {}", path.display()),
                    source: e,
                });
            }
            // zstd's own: a cut frame or damaged data.
            Err(_) => return Ok(Fill::Short(got)),
        }
    }
    Ok(Fill::Full)
}

type Decoder = zstd::Decoder<'static, io::BufReader<File>>;

fn open_stream(path: &Path) -> Result<Decoder, RecordingError> {
    let file = File::open(path).map_err(io_error(format!("opening {}", path.display())))?;
    zstd::Decoder::new(file).map_err(io_error(format!("opening {}", path.display())))
}

/// Reads the magic; anything else is not a recording.
fn read_magic(input: &mut Decoder, path: &Path) -> Result<(), RecordingError> {
    let mut magic = [0u8; 8];
    match fill(input, &mut magic, path)? {
        Fill::Full if &magic == MAGIC => Ok(()),
        Fill::Full => Err(RecordingError::Format(format!(
            "{} does not start with {}",
            path.display(),
            String::from_utf8_lossy(MAGIC)
        ))),
        Fill::Short(_) => Err(RecordingError::Format(format!(
            "{} is empty, damaged or not zstd",
            path.display()
        ))),
    }
}

/// Reads a recording, decompressing as it goes; a truncated file reads up
/// to its last whole record and reports itself incomplete.
pub struct Reader {
    input: Decoder,
    path: PathBuf,
    header: Header,
    complete: Option<bool>,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Reader, RecordingError> {
        let mut input = open_stream(path)?;
        read_magic(&mut input, path)?;
        let short = || RecordingError::Format(format!("{} ends in its header", path.display()));
        let mut len = [0u8; 4];
        let Fill::Full = fill(&mut input, &mut len, path)? else {
            return Err(short());
        };
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_HEADER {
            return Err(RecordingError::Format(format!(
                "a header of {len} bytes is over the {MAX_HEADER}"
            )));
        }
        let mut json = vec![0u8; len];
        let Fill::Full = fill(&mut input, &mut json, path)? else {
            return Err(short());
        };
        let header: Header = serde_json::from_slice(&json)
            .map_err(|e| RecordingError::Format(format!("header: {e}")))?;
        if header.version != VERSION {
            return Err(RecordingError::Format(format!(
                "version {} (this reads {VERSION})",
                header.version
            )));
        }
        Ok(Reader {
            input,
            path: path.to_owned(),
            header,
            complete: None,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next record as (milliseconds since the start, data), or `None`
    /// after the last one.
    pub fn next_record(&mut self) -> Result<Option<(u32, Vec<u8>)>, RecordingError> {
        if self.complete.is_some() {
            return Ok(None);
        }
        let mut head = [0u8; 8];
        let Fill::Full = fill(&mut self.input, &mut head, &self.path)? else {
            return self.truncated();
        };
        let at = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if len == 0 {
            return self.end();
        }
        if len > MAX_RECORD {
            return Err(RecordingError::Format(format!(
                "a record of {len} bytes is over the {MAX_RECORD}"
            )));
        }
        let mut data = vec![0u8; len];
        let Fill::Full = fill(&mut self.input, &mut data, &self.path)? else {
            return self.truncated();
        };
        Ok(Some((at, data)))
    }

    fn truncated(&mut self) -> Result<Option<(u32, Vec<u8>)>, RecordingError> {
        self.complete = Some(false);
        Ok(None)
    }

    /// The end record's status; complete also needs the compressed stream
    /// to end cleanly, its checksum checked.
    fn end(&mut self) -> Result<Option<(u32, Vec<u8>)>, RecordingError> {
        let mut status = [0u8; 1];
        let Fill::Full = fill(&mut self.input, &mut status, &self.path)? else {
            return self.truncated();
        };
        let complete = match status[0] {
            COMPLETE => true,
            INCOMPLETE => false,
            other => return Err(RecordingError::Format(format!("end status {other}"))),
        };
        // A cut checksum reads short as well, so the stream must end
        // cleanly for the status to stand.
        let mut after = [0u8; 1];
        self.complete = Some(loop {
            match self.input.read(&mut after) {
                Ok(0) => break complete,
                Ok(_) => {
                    return Err(RecordingError::Format(
                        "data after the end record".to_owned(),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error().is_some() => {
                    return Err(RecordingError::Io {
                        what: format!("reading {}", self.path.display()),
                        source: e,
                    });
                }
                Err(_) => break false,
            }
        });
        Ok(None)
    }

    /// Whether the recording is complete; known after the last record.
    pub fn complete(&self) -> Option<bool> {
        self.complete
    }
}

/// Writes the decompressed stream of `path` to `out`, for offline tools and
/// the replay page (which cannot decompress zstd). A truncated file gives
/// what it holds. Returns the bytes written.
pub fn decompress_to(path: &Path, out: &mut impl Write) -> Result<u64, RecordingError> {
    let mut input = open_stream(path)?;
    read_magic(&mut input, path)?;
    let write_error = io_error("writing the decompressed recording");
    out.write_all(MAGIC).map_err(write_error)?;
    let mut total = MAGIC.len() as u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let (n, more) = match fill(&mut input, &mut buf, path)? {
            Fill::Full => (buf.len(), true),
            Fill::Short(n) => (n, false),
        };
        out.write_all(&buf[..n])
            .map_err(io_error("writing the decompressed recording"))?;
        total += n as u64;
        if !more {
            return Ok(total);
        }
    }
}

/// Whether a file name is a recording's: `<digits>.vncrec.zst`.
fn is_recording_name(name: &str) -> bool {
    name.strip_suffix(".vncrec.zst")
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
}

/// Deletes recordings (regular files named `<digits>.vncrec.zst` in `dir`)
/// last modified before `before`; returns how many. A missing `dir` holds
/// none.
pub fn purge(dir: &Path, before: SystemTime) -> Result<u64, RecordingError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_error(format!("listing {}", dir.display()))(e)),
    };
    let mut purged = 0;
    for entry in entries {
        let entry = entry.map_err(io_error(format!("listing {}", dir.display())))?;
        if !entry.file_name().to_str().is_some_and(is_recording_name) {
            continue;
        }
        let path = entry.path();
        // Not followed: a symlink is not a recording.
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(format!("reading {}", path.display()))(e)),
        };
        let modified = meta
            .modified()
            .map_err(io_error(format!("reading {}", path.display())))?;
        if !meta.is_file() || modified >= before {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => purged += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(format!("deleting {}", path.display()))(e)),
        }
    }
    Ok(purged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn header(session_id: i64) -> Header {
        Header {
            version: VERSION,
            session_id,
            vm_id: 42,
            user: "alice".to_owned(),
            node: "node-1".to_owned(),
            client_addr: "192.0.2.7:50000".to_owned(),
            started_at: 1_700_000_000,
            started_at_ms: 1_700_000_000_123,
        }
    }

    type Records = Vec<(u32, Vec<u8>)>;

    fn read_all(path: &Path) -> (Header, Records, Option<bool>) {
        let mut reader = Reader::open(path).unwrap();
        let mut records = Vec::new();
        while let Some(record) = reader.next_record().unwrap() {
            records.push(record);
        }
        (reader.header().clone(), records, reader.complete())
    }

    /// Data zstd cannot shrink, so sizes on disk follow sizes recorded.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn datas(records: &[(u32, Vec<u8>)]) -> Vec<&[u8]> {
        records.iter().map(|(_, d)| d.as_slice()).collect()
    }

    #[test]
    fn a_recorder_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<Recorder>();
        send::<Reader>();
    }

    #[tokio::test]
    async fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recorder::start(dir.path(), &header(7), 1 << 20).unwrap();
        rec.record(b"RFB 003.008\n").unwrap();
        rec.record(b"").unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        rec.record(&[1, 2, 3]).unwrap();
        let outcome = rec.finish().await;
        assert!(outcome.complete, "{outcome:?}");
        assert_eq!(outcome.stopped, None);
        let path = path_for(dir.path(), 7);
        assert_eq!(outcome.bytes, std::fs::metadata(&path).unwrap().len());

        let (h, records, complete) = read_all(&path);
        assert_eq!(h, header(7));
        assert_eq!(datas(&records), [&b"RFB 003.008\n"[..], &[1, 2, 3]]);
        assert!(records[1].0 >= records[0].0 + 30, "{:?}", records[1].0);
        assert_eq!(complete, Some(true));

        // The decompressed stream is the documented format, byte for byte.
        let mut raw = Vec::new();
        let n = decompress_to(&path, &mut raw).unwrap();
        assert_eq!(n, raw.len() as u64);
        assert_eq!(&raw[..8], MAGIC);
        let hlen = u32::from_be_bytes(raw[8..12].try_into().unwrap()) as usize;
        let json: serde_json::Value = serde_json::from_slice(&raw[12..12 + hlen]).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["session_id"], 7);
        assert_eq!(json["started_at_ms"], 1_700_000_000_123i64);
        let first = &raw[12 + hlen..];
        assert_eq!(&first[4..8], &12u32.to_be_bytes());
        assert_eq!(&first[8..20], b"RFB 003.008\n");
        let end = &raw[raw.len() - 9..];
        assert_eq!(&end[4..], &[0, 0, 0, 0, COMPLETE]);
    }

    #[tokio::test]
    async fn data_over_a_mebibyte_is_split() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recorder::start(dir.path(), &header(1), 8 << 20).unwrap();
        let big = noise(MAX_RECORD * 2 + 5, 3);
        rec.record(&big).unwrap();
        let exact = noise(MAX_RECORD, 4);
        rec.record(&exact).unwrap();
        assert!(rec.finish().await.complete);
        let (_, records, complete) = read_all(&path_for(dir.path(), 1));
        let lens: Vec<usize> = records.iter().map(|(_, d)| d.len()).collect();
        assert_eq!(lens, [MAX_RECORD, MAX_RECORD, 5, MAX_RECORD]);
        let joined: Vec<u8> = records[..3].iter().flat_map(|(_, d)| d.clone()).collect();
        assert_eq!(joined, big);
        assert_eq!(records[3].1, exact);
        assert_eq!(complete, Some(true));
    }

    #[tokio::test]
    async fn private_modes_and_never_an_existing_file() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("recordings/node-1");
        let rec = Recorder::start(&dir, &header(9), 1024).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path_for(&dir, 9)), 0o600);
        assert!(rec.finish().await.complete);

        let before = std::fs::read(path_for(&dir, 9)).unwrap();
        let err = Recorder::start(&dir, &header(9), 1024).err().unwrap();
        assert!(
            matches!(err, RecordingError::Exists(ref p) if *p == path_for(&dir, 9)),
            "{err}"
        );
        assert_eq!(std::fs::read(path_for(&dir, 9)).unwrap(), before);

        let err = Recorder::start(&dir, &header(-1), 1024).err().unwrap();
        assert!(matches!(err, RecordingError::BadSessionId(-1)), "{err}");
        // The name is the id's alone.
        assert_eq!(path_for(Path::new("/r"), 12), Path::new("/r/12.vncrec.zst"));
    }

    #[tokio::test]
    async fn a_full_queue_stops_the_recording_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recorder::start(dir.path(), &header(3), 200).unwrap();
        rec.record(b"first").unwrap();
        assert_eq!(rec.record(&[0; 300]), Err(Stopped::FellBehind));
        assert_eq!(rec.record(b"x"), Err(Stopped::FellBehind));
        let outcome = rec.finish().await;
        assert!(!outcome.complete);
        assert_eq!(outcome.stopped, Some(Stopped::FellBehind));
        let (_, records, complete) = read_all(&path_for(dir.path(), 3));
        assert_eq!(datas(&records), [&b"first"[..]]);
        assert_eq!(complete, Some(false));
    }

    #[tokio::test]
    async fn a_writer_that_cannot_keep_up_fills_the_queue() {
        // A FIFO nobody reads yet: the writer blocks once it is full.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("no mkfifo; skipped");
            return;
        }
        // Read-write, so that opening does not wait for a reader.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .unwrap();
        let mut rec = Recorder::with_file(file, &header(4), 1 << 20, Duration::ZERO).unwrap();
        let mut sent = Vec::new();
        let mut stopped = None;
        for i in 0..1000 {
            let data = noise(16 << 10, i);
            match rec.record(&data) {
                Ok(()) => sent.push(data),
                Err(e) => {
                    stopped = Some(e);
                    break;
                }
            }
        }
        assert_eq!(stopped, Some(Stopped::FellBehind));
        // Drain the FIFO, so the writer can write what was queued.
        let mut out = std::fs::File::open(&fifo).unwrap();
        let drained = std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = out.read_to_end(&mut all);
            all
        });
        let outcome = rec.finish().await;
        assert!(!outcome.complete);
        assert_eq!(outcome.stopped, Some(Stopped::FellBehind));
        // The writer has closed its end, so the drain sees the end.
        let copy = dir.path().join("copy.vncrec.zst");
        let all = drained.join().unwrap();
        std::fs::write(&copy, all).unwrap();
        let (_, records, complete) = read_all(&copy);
        assert_eq!(
            datas(&records),
            sent.iter().map(Vec::as_slice).collect::<Vec<_>>()
        );
        assert_eq!(complete, Some(false));
    }

    #[tokio::test]
    async fn a_failing_disk_stops_the_recording() {
        let full = match std::fs::OpenOptions::new().write(true).open("/dev/full") {
            Ok(file) => file,
            Err(e) => {
                eprintln!("no /dev/full ({e}); skipped");
                return;
            }
        };
        let mut rec = Recorder::with_file(full, &header(5), 1 << 20, Duration::ZERO).unwrap();
        let mut result = Ok(());
        for _ in 0..500 {
            result = rec.record(b"frame");
            if result.is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let Err(Stopped::WriteFailed(why)) = result else {
            panic!("still recording: {result:?}");
        };
        assert!(why.contains("No space left"), "{why}");
        assert_eq!(rec.record(b"more"), Err(Stopped::WriteFailed(why.clone())));
        let outcome = rec.finish().await;
        assert!(!outcome.complete);
        assert_eq!(outcome.stopped, Some(Stopped::WriteFailed(why)));
    }

    #[tokio::test]
    async fn a_failing_disk_shows_in_finish() {
        let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
            return;
        };
        let rec = Recorder::with_file(full, &header(6), 1 << 20, FLUSH_EVERY).unwrap();
        let outcome = rec.finish().await;
        assert!(!outcome.complete);
        assert!(
            matches!(&outcome.stopped, Some(Stopped::WriteFailed(w)) if w.contains("No space left")),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn a_truncated_file_reads_as_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recorder::start(dir.path(), &header(8), 1 << 20).unwrap();
        let sent: Vec<Vec<u8>> = (0..20).map(|i| noise(100 + i * 20, i as u64)).collect();
        for data in &sent {
            rec.record(data).unwrap();
        }
        assert!(rec.finish().await.complete);
        let path = path_for(dir.path(), 8);
        let whole = std::fs::read(&path).unwrap();
        let mut full_stream = Vec::new();
        decompress_to(&path, &mut full_stream).unwrap();

        let cut = dir.path().join("cut");
        let mut readable = 0;
        for len in 0..whole.len() {
            std::fs::write(&cut, &whole[..len]).unwrap();
            let mut stream = Vec::new();
            match decompress_to(&cut, &mut stream) {
                Ok(_) => assert!(full_stream.starts_with(&stream), "cut at {len}"),
                Err(e) => assert!(matches!(e, RecordingError::Format(_)), "cut at {len}: {e}"),
            }
            let mut reader = match Reader::open(&cut) {
                Ok(reader) => reader,
                Err(RecordingError::Format(_)) => continue,
                Err(e) => panic!("cut at {len}: {e}"),
            };
            readable += 1;
            let mut got = Vec::new();
            while let Some((_, data)) = reader.next_record().unwrap() {
                got.push(data);
            }
            assert_eq!(reader.complete(), Some(false), "cut at {len}");
            assert_eq!(got[..], sent[..got.len()], "cut at {len}");
        }
        // The header is flushed on its own, so most cuts are readable.
        assert!(readable > whole.len() / 2, "{readable} of {}", whole.len());
    }

    #[test]
    fn garbage_is_a_format_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.vncrec.zst");
        let plain_header = {
            let mut v = MAGIC.to_vec();
            v.extend_from_slice(&5u32.to_be_bytes());
            v.extend_from_slice(b"nope!");
            v
        };
        let huge_header = {
            let mut v = MAGIC.to_vec();
            v.extend_from_slice(&u32::MAX.to_be_bytes());
            v
        };
        let wrong_version = {
            let json = serde_json::to_vec(&Header {
                version: 2,
                ..header(1)
            })
            .unwrap();
            let mut v = MAGIC.to_vec();
            v.extend_from_slice(&be32(json.len()));
            v.extend_from_slice(&json);
            v
        };
        let cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"hello, world".to_vec(),
            noise(5000, 9),
            zstd::encode_all(&b"VNCBREC0 and more"[..], 3).unwrap(),
            zstd::encode_all(&b"VNC"[..], 3).unwrap(),
            zstd::encode_all(&plain_header[..], 3).unwrap(),
            zstd::encode_all(&huge_header[..], 3).unwrap(),
            zstd::encode_all(&wrong_version[..], 3).unwrap(),
        ];
        for (i, bytes) in cases.iter().enumerate() {
            std::fs::write(&path, bytes).unwrap();
            let err = Reader::open(&path).err();
            assert!(
                matches!(err, Some(RecordingError::Format(_))),
                "{i}: {err:?}"
            );
            if i < 5 {
                let err = decompress_to(&path, &mut Vec::new()).err();
                assert!(
                    matches!(err, Some(RecordingError::Format(_))),
                    "{i}: {err:?}"
                );
            }
        }
        // A record over the limit, after a good header.
        let json = serde_json::to_vec(&header(1)).unwrap();
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&be32(json.len()));
        v.extend_from_slice(&json);
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&be32(MAX_RECORD + 1));
        std::fs::write(&path, zstd::encode_all(&v[..], 3).unwrap()).unwrap();
        let mut reader = Reader::open(&path).unwrap();
        assert!(matches!(
            reader.next_record(),
            Err(RecordingError::Format(_))
        ));
        let missing = Reader::open(&dir.path().join("none")).err();
        assert!(
            matches!(missing, Some(RecordingError::Io { .. })),
            "{missing:?}"
        );
    }

    #[tokio::test]
    async fn a_dropped_recorder_ends_the_file_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recorder::start(dir.path(), &header(2), 1 << 20).unwrap();
        rec.record(b"kept").unwrap();
        drop(rec);
        let path = path_for(dir.path(), 2);
        let ended = |stream: &[u8]| stream.ends_with(&[0, 0, 0, 0, INCOMPLETE]);
        for _ in 0..500 {
            let mut stream = Vec::new();
            if decompress_to(&path, &mut stream).is_ok() && ended(&stream) {
                let (_, records, complete) = read_all(&path);
                assert_eq!(datas(&records), [&b"kept"[..]]);
                assert_eq!(complete, Some(false));
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the writer did not end the file");
    }

    #[tokio::test]
    async fn a_running_recording_is_readable_on_disk() {
        // What a crashed node leaves: the records flushed so far.
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recorder::start(dir.path(), &header(10), 1 << 20).unwrap();
        rec.record(b"before the crash").unwrap();
        tokio::time::sleep(FLUSH_EVERY + Duration::from_millis(500)).await;
        let (_, records, complete) = read_all(&path_for(dir.path(), 10));
        assert_eq!(datas(&records), [&b"before the crash"[..]]);
        assert_eq!(complete, Some(false));
        assert!(rec.finish().await.complete);
    }

    #[test]
    fn purge_deletes_only_old_recordings() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in [
            "1.vncrec.zst",
            "22.vncrec.zst",
            "x1.vncrec.zst",
            ".vncrec.zst",
            "-3.vncrec.zst",
            "4.vncrec.zst.tmp",
            "5.vncrec",
            "notes.txt",
        ] {
            std::fs::write(d.join(name), "x").unwrap();
        }
        std::fs::create_dir(d.join("6.vncrec.zst")).unwrap();
        std::os::unix::fs::symlink(d.join("notes.txt"), d.join("7.vncrec.zst")).unwrap();
        let names = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        let all = names(d);
        // Nothing is older than a time long past.
        assert_eq!(purge(d, SystemTime::UNIX_EPOCH).unwrap(), 0);
        assert_eq!(names(d), all);
        let later = SystemTime::now() + Duration::from_secs(60);
        assert_eq!(purge(d, later).unwrap(), 2);
        let left = names(d);
        assert!(!left.contains(&"1.vncrec.zst".to_owned()));
        assert!(!left.contains(&"22.vncrec.zst".to_owned()));
        assert_eq!(left.len(), all.len() - 2);
        assert_eq!(purge(&d.join("missing"), later).unwrap(), 0);
    }
}
