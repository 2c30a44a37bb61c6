//! The OpenNebula VM document parser, and the console rules applied to
//! whatever it parses.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vncbroker::inventory::opennebula::vmdoc;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(doc) = vmdoc::parse(text)
    {
        let _ = doc.vnc_target();
    }
});
