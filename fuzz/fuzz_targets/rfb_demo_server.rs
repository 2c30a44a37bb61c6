//! The demo VNC server's side of RFB (it plays the server role): the input
//! is everything a client sends.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use vncbroker::demo::vnc;

fuzz_target!(|data: &[u8]| {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_time().build() else {
        return;
    };
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let input = data.to_vec();
        let feed = async move {
            let _ = client.write_all(&input).await;
            // Read and drop what the server says until it closes.
            let _ = client.shutdown().await;
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut client, &mut sink).await;
        };
        let serve = vnc::serve_connection(server, b"password", "fuzz");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            tokio::join!(feed, serve)
        })
        .await;
    });
});
