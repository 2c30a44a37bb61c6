//! The RFB security proxy's handshake state machine, in both roles: bytes
//! from the VNC server (it acts as a client) and from the browser (it acts
//! as a server), interleaved as the input's first byte of each chunk says.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vncbroker::rfb::SecurityProxy;

fuzz_target!(|data: &[u8]| {
    let mut sp = SecurityProxy::new(b"password".to_vec());
    let mut rest = data;
    while let [ctl, tail @ ..] = rest {
        let n = usize::from(ctl & 0x3F).min(tail.len());
        let (chunk, after) = tail.split_at(n);
        let r = if ctl & 0x80 == 0 { sp.feed_server(chunk) } else { sp.feed_client(chunk) };
        let _ = sp.take_to_server();
        let _ = sp.take_to_client();
        if r.is_err() {
            break;
        }
        if sp.is_done() {
            let _ = sp.take_leftovers();
        }
        rest = after;
    }
});
