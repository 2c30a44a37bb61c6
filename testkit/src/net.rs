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

/// A TCP forwarder to `127.0.0.1:target` whose connections can all be cut
/// at once, as a network failure would: both sockets close, no byte more
/// is passed. `POST /cut` on `control_port` cuts them too, for scripts
/// that run outside the test (a browser test's node).
pub struct CutRelay {
    pub port: u16,
    pub control_port: u16,
    links: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    /// Connections cut so far.
    pub cuts: Arc<AtomicU32>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl CutRelay {
    pub async fn start(target: u16) -> CutRelay {
        CutRelay::start_on(0, target).await
    }

    /// On a port chosen beforehand (0: any), for a peer that must know it
    /// in advance (an allowed origin in the broker's configuration).
    pub async fn start_on(port: u16, target: u16) -> CutRelay {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let control = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let control_port = control.local_addr().unwrap().port();
        let links: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let cuts = Arc::new(AtomicU32::new(0));
        let relay = {
            let links = links.clone();
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let link = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    links.lock().unwrap().push(link.abort_handle());
                }
            })
        };
        let controller = {
            let (links, cuts) = (links.clone(), cuts.clone());
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                while let Ok((mut s, _)) = control.accept().await {
                    let mut buf = [0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let asked_cut = buf[..n].starts_with(b"POST /cut ");
                    let body = if asked_cut {
                        cut_all(&links, &cuts).to_string()
                    } else {
                        "unknown".into()
                    };
                    let status = if asked_cut { "200 OK" } else { "404 Not Found" };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nAccess-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(answer.as_bytes()).await;
                }
            })
        };
        CutRelay {
            port,
            control_port,
            links,
            cuts,
            tasks: vec![relay, controller],
        }
    }

    /// Cuts every connection passing now; returns how many.
    pub fn cut(&self) -> u32 {
        cut_all(&self.links, &self.cuts)
    }
}

fn cut_all(links: &std::sync::Mutex<Vec<tokio::task::AbortHandle>>, cuts: &AtomicU32) -> u32 {
    let mut links = links.lock().unwrap();
    let mut n = 0;
    for link in links.drain(..) {
        if !link.is_finished() {
            n += 1;
        }
        link.abort();
    }
    cuts.fetch_add(n, Ordering::SeqCst);
    n
}

impl Drop for CutRelay {
    fn drop(&mut self) {
        self.cut();
        for t in &self.tasks {
            t.abort();
        }
    }
}
