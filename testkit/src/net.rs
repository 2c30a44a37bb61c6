//! Ports on 127.0.0.1, and a tiny TCP server for peers that misbehave.

use std::net::{TcpListener as StdListener, TcpStream as StdStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// Whether something accepts TCP connections on 127.0.0.1:port.
pub fn port_open(port: u16) -> bool {
    StdStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)).is_ok()
}

/// A TCP server that accepts connections, counts them and hands each to
/// `serve` on its own task. Dropped with the test's runtime.
pub struct TinyServer {
    pub port: u16,
    pub accepted: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl TinyServer {
    pub async fn start<F, Fut>(serve: F) -> TinyServer
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(AtomicU32::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s));
            }
        });
        TinyServer {
            port,
            accepted,
            task,
        }
    }

    pub fn accepted(&self) -> u32 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TinyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port on which nothing listens (bound, then released).
pub fn closed_port() -> u16 {
    let p = free_port();
    assert!(!port_open(p), "port {p} should be closed");
    p
}
