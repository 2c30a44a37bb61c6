//! The SPICE link proxy and the main channel's filter: bytes from the
//! client and from the server, interleaved as each chunk's first byte says
//! (its top bit picks the side, the next says whether a client chunk ends
//! a WebSocket message, the rest is its length).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vncbroker::spice::link::{Framing, LinkProxy, Phase};
use vncbroker::spice::main_channel::{MainFilter, Rules, Side};

fuzz_target!(|data: &[u8]| {
    let framing = if data.first().is_some_and(|b| b & 1 == 1) {
        Framing::Messages
    } else {
        Framing::Stream
    };
    let mut link = LinkProxy::new(Some("password".into()), framing);
    let mut rest = data;
    while let [ctl, tail @ ..] = rest {
        let n = usize::from(ctl & 0x3F).min(tail.len());
        let (chunk, after) = tail.split_at(n);
        rest = after;
        let r = if ctl & 0x80 == 0 {
            link.feed_server(chunk)
        } else {
            link.feed_client(chunk, ctl & 0x40 != 0)
        };
        let _ = link.take_to_server();
        let _ = link.take_to_client();
        if r.is_err() {
            return;
        }
        match link.phase() {
            Phase::Asked(_) => link.admit(),
            Phase::Linked => break,
            _ => {}
        }
    }
    let Some(linked) = link.finish() else { return };
    let mut down = MainFilter::new(Side::FromServer, Rules { agent: false }, linked.mini_header);
    let mut up = MainFilter::new(Side::FromClient, Rules { agent: false }, linked.mini_header);
    let mut out = Vec::new();
    down.feed(&linked.to_client, &mut out);
    for (i, chunk) in rest.chunks(17).enumerate() {
        out.clear();
        if i % 2 == 0 {
            down.feed(chunk, &mut out);
        } else {
            up.feed(chunk, &mut out);
        }
        assert!(out.len() <= chunk.len() + 18);
    }
});
