//! `vncbroker serve`: binds the listener, wires store, inventory, service,
//! proxy and routes together by the node's role, and runs until SIGTERM or
//! Ctrl-C.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::any;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::inventory::LocalInventory;
use crate::proxy::{self, Proxy, sessions::Sessions};
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
    background: Vec<JoinHandle<()>>,
}

impl Node {
    /// Opens the store, binds the listener and builds the routes.
    pub async fn bind(cfg: &Config) -> anyhow::Result<Node> {
        let store = store::open(&cfg.database).await?;
        let listener = TcpListener::bind(&cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let public_url = cfg
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        let node_name = cfg
            .node_name
            .clone()
            .unwrap_or_else(|| format!("{}:{}", hostname(), addr.port()));

        let inventory = Arc::new(LocalInventory::new(
            Arc::clone(&store),
            cfg.auth_cache_ttl(),
            cfg.api.auth_cache_size,
        ));
        let service = Arc::new(TokenService::new(
            Arc::clone(&store),
            inventory,
            cfg.policy(),
            &public_url,
        ));
        let sessions = Arc::new(Sessions::default());
        let mut background = vec![tokio::spawn(purge_loop(
            Arc::clone(&service),
            Duration::from_secs(cfg.tokens.purge_interval),
        ))];

        let mut app = Router::new();
        if cfg.role.serves_api() {
            app = app.merge(api::router(
                ApiState {
                    service: Arc::clone(&service),
                },
                cfg.api.max_body_bytes,
            ));
        }
        if cfg.role.serves_proxy() {
            let proxy = Arc::new(Proxy::new(
                Arc::clone(&store),
                Arc::clone(&sessions),
                proxy::Settings {
                    node: node_name.clone(),
                    connect_timeout: Duration::from_millis(cfg.proxy.connect_timeout_ms),
                    handshake_timeout: Duration::from_millis(cfg.proxy.handshake_timeout_ms),
                    max_message_bytes: cfg.proxy.max_message_bytes,
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
            background,
        })
    }

    /// Serves until `shutdown` completes.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let listener = self.listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(
            listener,
            self.app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await?;
        for task in self.background {
            task.abort();
        }
        tracing::info!("vncbroker stopped");
        Ok(())
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
