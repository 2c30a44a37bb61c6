//! The WebSocket frame decoder: header parsing, unmasking, and the
//! streaming reader over arbitrary client bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vncbroker::websocket::frame;
use vncbroker::websocket::stream::Reader;

fuzz_target!(|data: &[u8]| {
    let _ = frame::parse_client_header(data, 1 << 20);
    let rt = tokio::runtime::Builder::new_current_thread().build();
    let Ok(rt) = rt else { return };
    rt.block_on(async {
        let mut reader = Reader::new(data, 64 * 1024);
        let mut total = 0usize;
        while let Ok(ev) = reader.next().await {
            if let vncbroker::websocket::stream::Event::Data(d) = ev {
                total += d.len();
            }
            // Never more payload out than bytes in.
            assert!(total <= data.len());
        }
    });
});
