//! The XML-RPC request parser (`POST /RPC2` bodies).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vncbroker::xmlrpc as wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(call) = wire::parse_call(data) {
        // Whatever parses must encode again without trouble.
        let _ = wire::response(&wire::Value::Array(call.params));
    }
});
