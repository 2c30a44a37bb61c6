//! `vncbroker serve`: binds the listener, wires store, inventory, service,
//! proxy and routes together by the node's role, and runs until SIGTERM or
//! Ctrl-C.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::any;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::config::InventoryKind;
use crate::inventory::opennebula::{Oned, OpenNebulaInventory};
use crate::inventory::{Inventory, LocalInventory};
use crate::limits::FailureLimiter;
use crate::proxy::sessions::{Limits as SessionLimits, Sessions};
use crate::proxy::{self, Proxy};
use crate::service::TokenService;
use crate::store;

/// A node that is bound and wired, not yet serving.
pub struct Node {
    listener: TcpListener,
    pub addr: SocketAddr,
    pub public_url: String,
    pub service: Arc<TokenService>,
    pub sessions: Arc<Sessions>,
    app: Router,
    tls: Option<TlsAcceptor>,
    header_timeout: Duration,
    background: Vec<JoinHandle<()>>,
}

impl Node {
    /// Opens the store, binds the listener and builds the routes.
    pub async fn bind(cfg: &Config) -> anyhow::Result<Node> {
        let tls = match (&cfg.tls.cert, &cfg.tls.key) {
            (Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
            _ => None,
        };
        let store = store::open(&cfg.database).await?;
        let listener = TcpListener::bind(&cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let public_url = cfg
            .public_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{addr}"));
        let node_name = cfg
            .node_name
            .clone()
            .unwrap_or_else(|| format!("{}:{}", hostname(), addr.port()));

        let inventory: Arc<dyn Inventory> = match cfg.inventory.kind {
            InventoryKind::Local => Arc::new(LocalInventory::new(
                Arc::clone(&store),
                cfg.auth_cache_ttl(),
                cfg.api.auth_cache_size,
            )),
            InventoryKind::OpenNebula => {
                let oned = Oned::new(
                    &cfg.inventory.endpoint,
                    Duration::from_millis(cfg.inventory.timeout_ms),
                )
                .map_err(anyhow::Error::msg)?;
                Arc::new(OpenNebulaInventory::new(
                    oned,
                    cfg.inventory.service_session.clone(),
                ))
            }
        };
        let service = Arc::new(TokenService::new(
            Arc::clone(&store),
            Arc::clone(&inventory),
            cfg.policy(),
            &public_url,
        ));
        let sessions = Arc::new(Sessions::with_limits(SessionLimits {
            total: cfg.proxy.max_sessions,
            per_vm: cfg.proxy.max_sessions_per_vm,
            per_user: cfg.proxy.max_sessions_per_user,
        }));
        let limiter = Arc::new(FailureLimiter::new(
            cfg.http.failures_per_minute,
            Duration::from_millis(cfg.http.failure_delay_ms),
        ));
        let mut background = vec![tokio::spawn(purge_loop(
            Arc::clone(&service),
            Duration::from_secs(cfg.tokens.purge_interval),
        ))];

        let mut app = Router::new();
        if cfg.role.serves_api() {
            app = app.merge(api::router(
                ApiState {
                    service: Arc::clone(&service),
                    limiter: Arc::clone(&limiter),
                    trusted_proxies: cfg.http.trusted_proxies.clone().into(),
                },
                cfg.api.max_body_bytes,
            ));
            if cfg.websockify_api.enabled {
                app = app.merge(api::websockify::router(
                    Arc::clone(&service),
                    cfg.websockify_api.clone(),
                ));
            }
        }
        if cfg.role.serves_proxy() {
            let proxy = Arc::new(Proxy::new(
                Arc::clone(&store),
                Arc::clone(&inventory),
                Arc::clone(&sessions),
                proxy::Settings {
                    node: node_name.clone(),
                    connect_timeout: Duration::from_millis(cfg.proxy.connect_timeout_ms),
                    handshake_timeout: Duration::from_millis(cfg.proxy.handshake_timeout_ms),
                    max_message_bytes: cfg.proxy.max_message_bytes,
                    origins: proxy::origin::Policy {
                        public: cfg
                            .public_url
                            .as_deref()
                            .and_then(proxy::origin::Origin::parse),
                        allowed: cfg
                            .proxy
                            .allowed_origins
                            .iter()
                            .filter_map(|o| proxy::origin::Origin::parse(o))
                            .collect(),
                        allow_missing: cfg.proxy.allow_missing_origin,
                    },
                    trusted_proxies: cfg.http.trusted_proxies.clone(),
                    tls: tls.is_some(),
                    limiter: Arc::clone(&limiter),
                    idle_timeout: secs(cfg.proxy.idle_timeout_secs),
                    max_session: secs(cfg.proxy.max_session_secs),
                    end_at_token_expiry: cfg.proxy.end_at_token_expiry,
                    ping_interval: secs(cfg.proxy.ping_interval_secs),
                    pong_timeout: Duration::from_secs(cfg.proxy.pong_timeout_secs),
                },
            ));
            background.push(tokio::spawn(proxy::sessions::watch_revocations(
                Arc::clone(&sessions),
                Arc::clone(&store),
                Duration::from_millis(cfg.proxy.revocation_check_ms),
            )));
            app = app
                .merge(proxy::router(Arc::clone(&proxy)))
                .merge(crate::console::router(&cfg.web_root(), &cfg.novnc_root()))
                .fallback(any(proxy::upgrade_any_path).with_state(proxy));
        }
        tracing::info!(
            %addr, %public_url, node = %node_name, role = ?cfg.role,
            database = %redact_url(&cfg.database), "vncbroker ready"
        );
        Ok(Node {
            listener,
            addr,
            public_url,
            service,
            sessions,
            app,
            tls,
            header_timeout: Duration::from_millis(cfg.http.header_timeout_ms),
            background,
        })
    }

    /// Serves until `shutdown` completes, then gives open HTTP requests a
    /// few seconds to finish.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        // Every connection holds a receiver; at shutdown each finishes its
        // current request, and `closed()` completes when the last one is gone.
        let (drain, draining) = tokio::sync::watch::channel(false);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Typically out of file descriptors: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            let _ = tcp.set_nodelay(true);
            let conn = Connection {
                app: self.app.clone(),
                peer,
                header_timeout: self.header_timeout,
                draining: draining.clone(),
            };
            match self.tls.clone() {
                None => {
                    tokio::spawn(conn.serve(tcp));
                }
                Some(acceptor) => {
                    tokio::spawn(async move {
                        // The TLS handshake shares the header deadline.
                        match tokio::time::timeout(conn.header_timeout, acceptor.accept(tcp)).await
                        {
                            Ok(Ok(tls)) => conn.serve(tls).await,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
        drop(self.listener);
        drop(draining);
        let _ = drain.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), drain.closed()).await;
        for task in self.background {
            task.abort();
        }
        tracing::info!("vncbroker stopped");
        Ok(())
    }
}

/// One accepted HTTP connection.
struct Connection {
    app: Router,
    peer: SocketAddr,
    header_timeout: Duration,
    draining: tokio::sync::watch::Receiver<bool>,
}

impl Connection {
    /// Serves HTTP/1.1 (with upgrades, for WebSockets) on `io`. A client
    /// that does not finish its request headers within the deadline is
    /// dropped, so slow handshakes cannot pile up.
    async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            app,
            peer,
            header_timeout,
            mut draining,
        } = self;
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req)
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let mut conn = std::pin::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = async { drop(draining.wait_for(|d| *d).await) } => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
        }
    }
}

/// Runs the server. Prints `listening on ADDR` on standard output once the
/// socket is bound, so scripts can use `--listen 127.0.0.1:0`.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let node = Node::bind(&cfg).await?;
    println!("listening on {}", node.addr);
    use std::io::Write;
    let _ = std::io::stdout().flush();
    node.run(shutdown_signal()).await
}

async fn purge_loop(service: Arc<TokenService>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match service.purge_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired console tokens deleted"),
            Err(e) => tracing::warn!(error = %e, "purging expired tokens failed"),
        }
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// A duration in seconds, where 0 means "off".
fn secs(n: u64) -> Option<Duration> {
    (n > 0).then(|| Duration::from_secs(n))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A database URL fit for logs: any password in it is replaced.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}/{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords_in_urls() {
        assert_eq!(
            super::redact_url("postgres://u:secret@db:5432/x"),
            "postgres://u:***@db:5432/x"
        );
        assert_eq!(super::redact_url("sqlite:///a/b.db"), "sqlite:///a/b.db");
    }
}
