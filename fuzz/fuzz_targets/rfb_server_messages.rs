//! The session phase from the VNC server to the browser (ServerInit, then
//! server messages) through the clipboard filter. The input's first byte
//! picks the rules and a pixel format the browser may have set; the rest is
//! chunks, each led by its length byte. Fed in those chunks and whole, the
//! filter must give the same output, counts and outcome; the output is never
//! longer than the input, and with the clipboard fully allowed it is the
//! input itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vncbroker::rfb::server_messages::{ServerCounts, ServerFilter, ServerRules, ServerStreamError};
use vncbroker::rfb::wire::PixelFormat;

const MAX_CLIPBOARD: [u32; 4] = [0, 16, 4096, u32::MAX];

#[derive(Debug, PartialEq)]
struct Outcome {
    output: Vec<u8>,
    counts: ServerCounts,
    result: Result<(), ServerStreamError>,
}

fn format(choice: u8) -> Option<PixelFormat> {
    let base = PixelFormat::TRUE_COLOUR_32;
    match choice & 3 {
        1 => Some(PixelFormat {
            bits_per_pixel: 16,
            depth: 16,
            red_max: 31,
            green_max: 63,
            blue_max: 31,
            red_shift: 11,
            green_shift: 5,
            ..base
        }),
        2 => Some(PixelFormat {
            bits_per_pixel: 8,
            depth: 8,
            true_colour: false,
            ..base
        }),
        3 => Some(PixelFormat { depth: 32, ..base }),
        _ => None,
    }
}

fn run(rules: ServerRules, format: Option<PixelFormat>, chunks: &[&[u8]]) -> Outcome {
    let mut filter = ServerFilter::new(rules);
    if let Some(format) = format {
        filter.set_pixel_format(format);
    }
    let mut output = Vec::new();
    let mut result = Ok(());
    for chunk in chunks {
        result = filter.feed(chunk, &mut output);
        if result.is_err() {
            assert_eq!(filter.feed(b"\x02", &mut output), result, "errors stick");
            break;
        }
    }
    let _ = (filter.framebuffer(), filter.name());
    Outcome {
        output,
        counts: filter.counts(),
        result,
    }
}

fuzz_target!(|data: &[u8]| {
    let [setup, rest @ ..] = data else {
        return;
    };
    let rules = ServerRules {
        clipboard_from_vm: setup & 1 != 0,
        max_clipboard: MAX_CLIPBOARD[usize::from((setup >> 1) & 3)],
    };
    let format = format(setup >> 3);
    let mut chunks = Vec::new();
    let mut rest = rest;
    while let [len, tail @ ..] = rest {
        let (chunk, after) = tail.split_at(usize::from(*len).min(tail.len()));
        chunks.push(chunk);
        rest = after;
    }
    let whole = chunks.concat();
    let pieces = run(rules, format, &chunks);
    assert_eq!(
        pieces,
        run(rules, format, &[&whole]),
        "fragmentation changed the outcome"
    );
    assert!(pieces.output.len() <= whole.len());
    if rules.clipboard_from_vm && rules.max_clipboard == u32::MAX {
        assert!(
            whole.starts_with(&pieces.output),
            "nothing filtered, nothing changed"
        );
    }
});
