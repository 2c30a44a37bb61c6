//! The browser → VNC server session filter: the first two bytes choose the
//! rules, then each chunk's length is the low six bits of the byte before it.
//! Whatever the input, it must not panic, and the output may only grow by the
//! rewrites (SetEncodings' Raw, ClientInit's flag).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vncbroker::rfb::client_messages::{ClientFilter, ClientRules};

/// Some encodings parseable downstream, Raw and ExtendedClipboard among
/// them, so both sides of the filter run.
fn parseable(e: i32) -> bool {
    e == 0xC0A1_E5CE_u32 as i32 || (0..=16).contains(&e) || e % 3 == 0
}

fuzz_target!(|data: &[u8]| {
    let [bits, max, tail @ ..] = data else {
        return;
    };
    let mut rest = tail;
    let rules = ClientRules {
        view_only: bits & 1 != 0,
        force_shared: bits & 2 != 0,
        clipboard_to_vm: bits & 4 != 0,
        max_clipboard: if bits & 16 != 0 {
            u32::MAX
        } else {
            u32::from(*max)
        },
        parseable: if bits & 8 != 0 { Some(parseable) } else { None },
    };
    let mut filter = ClientFilter::new(rules);
    let mut out = Vec::new();
    let mut fed = 0usize;
    while let [ctl, tail @ ..] = rest {
        let n = usize::from(ctl & 0x3F).min(tail.len());
        let (chunk, after) = tail.split_at(n);
        fed += chunk.len();
        let result = filter.feed(chunk, &mut out);
        let _ = filter.take_pixel_format();
        let _ = filter.counts();
        assert!(out.len() <= 2 * fed + 1);
        if let Err(err) = result {
            assert_eq!(filter.feed(b"\x03", &mut out), Err(err));
            break;
        }
        rest = after;
    }
});
