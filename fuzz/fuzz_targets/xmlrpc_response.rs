//! The XML-RPC response parser (oned's answers).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vncbroker::xmlrpc as wire;

fuzz_target!(|data: &[u8]| {
    let _ = wire::parse_response(data);
});
