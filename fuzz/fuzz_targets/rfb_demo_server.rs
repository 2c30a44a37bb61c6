//! The demo VNC server's side of RFB (it plays the server role), without a
//! runtime: the input's first byte picks a fragment size, the rest is
//! everything a client sends. The sans-IO handshake must give the same
//! outcome whole and in fragments; what follows it goes to the session.
//! The challenge is fixed so that the seeds can log in (password
//! "password", challenge 0x00..=0x0f).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use vncbroker::demo::vnc;
use vncbroker::rfb::server::ClientError;

const CHALLENGE: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
/// Updates rendered per input at most: each is a full-frame render.
const MAX_UPDATES: usize = 4;

#[derive(Debug, PartialEq)]
struct Outcome {
    result: Result<(), ClientError>,
    output: Vec<u8>,
    done: bool,
    leftovers: Vec<u8>,
}

fn handshake(input: &[u8], chunk: usize) -> Outcome {
    let mut hs = vnc::handshake(b"password", CHALLENGE, "fuzz");
    let mut output = hs.take_output();
    let mut result = Ok(());
    for piece in input.chunks(chunk.max(1)) {
        result = hs.feed(piece);
        output.extend(hs.take_output());
        if result.is_err() {
            break;
        }
    }
    let done = hs.is_done();
    assert!(!(done && result.is_err()));
    Outcome { result, output, done, leftovers: hs.take_leftovers() }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, input)) = data.split_first() else { return };
    let whole = handshake(input, input.len());
    let pieces = handshake(input, usize::from(ctl % 32) + 1);
    assert_eq!(whole, pieces, "fragmentation changed the outcome");
    if !whole.done {
        return;
    }
    let mut session = vnc::Session::new();
    let mut rest = whole.leftovers.as_slice();
    let mut elapsed = Duration::ZERO;
    for _ in 0..MAX_UPDATES {
        let Ok((used, update)) = session.receive(rest, elapsed) else { return };
        rest = rest.get(used..).unwrap_or_default();
        elapsed += vnc::FRAME_INTERVAL;
        if update.is_none() {
            break;
        }
    }
    if session.wants_tick() {
        let _ = session.tick(elapsed);
    }
});
