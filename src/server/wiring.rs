//! Wiring a node: the store, the inventory, the token service and the
//! proxy, put together by the node's role, and the listener bound. Only the
//! parts it builds touch the database.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::any;
use tokio::net::TcpListener;

use super::Node;
use super::connection::HttpTimes;
use super::ops::{self, Ops};
use crate::api::{self, ApiState};
use crate::config::{Config, InventoryKind};
use crate::inventory::opennebula::{Oned, OpenNebulaInventory};
use crate::inventory::{Inventory, LocalInventory};
use crate::limits::{ConnectionLimiter, FailureLimiter};
use crate::proxy::sessions::{Limits as SessionLimits, Sessions};
use crate::proxy::{self, Proxy};
use crate::service::TokenService;
use crate::store;

impl Node {
    /// Opens the store, binds the listener and builds the routes.
    pub async fn bind(cfg: &Config) -> anyhow::Result<Node> {
        let tls = match (&cfg.tls.cert, &cfg.tls.key) {
            (Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
            _ => None,
        };
        // Every database call is timed for /metrics.
        let store = store::TimedStore::wrap(store::open(&cfg.database).await?);
        let listener = listen(&cfg.listen)
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

        let secrets = super::open_secrets(cfg, &*store).await?;
        let inventory: Arc<dyn Inventory> = match cfg.inventory.kind {
            InventoryKind::Local => Arc::new(LocalInventory::new(
                store.clone(),
                secrets.clone(),
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
            store.clone(),
            store.clone(),
            Arc::clone(&inventory),
            secrets.clone(),
            cfg.policy(),
            &public_url,
        ));
        service.set_recordings(crate::service::Recordings {
            dir: cfg.recording.dir.as_ref().map(std::path::PathBuf::from),
            owner_can_view: cfg.recording.owner_can_view,
            retention_days: cfg.recording.retention_days,
        });
        let sessions = Arc::new(Sessions::with_limits(SessionLimits {
            total: cfg.proxy.max_sessions,
            per_vm: cfg.proxy.max_sessions_per_vm,
            per_user: cfg.proxy.max_sessions_per_user,
        }));
        let limiter = Arc::new(FailureLimiter::new(
            cfg.http.failures_per_minute,
            Duration::from_millis(cfg.http.failure_delay_ms),
        ));
        if cfg.inventory.kind == InventoryKind::Local {
            crate::auth::verifier().set_per_address(cfg.http.password_checks_per_address as usize);
            crate::auth::warm_up();
        }
        let max_connections = match cfg.http.max_connections {
            0 => crate::limits::auto_max_connections(
                crate::limits::open_files_limit().unwrap_or(1024),
            ),
            n => n,
        };
        let conns = Arc::new(ConnectionLimiter::new(
            max_connections,
            cfg.http.max_connections_per_address,
            cfg.http.trusted_proxies.clone(),
        ));
        let ops = Arc::new(Ops::new(
            cfg,
            store.clone(),
            &service,
            &sessions,
            tls.clone(),
        ));
        let mut background = vec![tokio::spawn(crate::service::purge_loop(
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
        // The routes so far are the APIs': count and time their requests.
        app = app.layer(axum::middleware::from_fn(crate::metrics::track_api));
        if cfg.role.serves_proxy() {
            // The portals that may open consoles may also frame the page.
            let portals: Vec<crate::edge::Origin> = cfg
                .proxy
                .allowed_origins
                .iter()
                .filter_map(|o| crate::edge::Origin::parse(o))
                .collect();
            let proxy = Arc::new(Proxy::new(
                store.clone(),
                store.clone(),
                Arc::clone(&service),
                Arc::clone(&sessions),
                proxy::Settings {
                    node: node_name.clone(),
                    connect_timeout: Duration::from_millis(cfg.proxy.connect_timeout_ms),
                    handshake_timeout: Duration::from_millis(cfg.proxy.handshake_timeout_ms),
                    max_message_bytes: cfg.proxy.max_message_bytes,
                    origins: crate::edge::Policy {
                        public: cfg
                            .public_url
                            .as_deref()
                            .and_then(crate::edge::Origin::parse),
                        allowed: portals.clone(),
                        allow_missing: cfg.proxy.allow_missing_origin,
                    },
                    trusted_proxies: cfg.http.trusted_proxies.clone(),
                    tls: tls.is_some(),
                    limiter: Arc::clone(&limiter),
                    idle_timeout: secs(cfg.proxy.idle_timeout_secs),
                    max_session: secs(cfg.proxy.max_session_secs),
                    end_at_token_expiry: cfg.proxy.end_at_token_expiry,
                    reconnect_grace: cfg.proxy.reconnect_grace_secs,
                    ping_interval: secs(cfg.proxy.ping_interval_secs),
                    pong_timeout: Duration::from_secs(cfg.proxy.pong_timeout_secs),
                    client_write_timeout: secs(cfg.proxy.client_write_timeout_secs),
                    max_clipboard: cfg.proxy.max_clipboard_bytes,
                    recording: proxy::RecordingSettings {
                        dir: cfg.recording.dir.as_ref().map(std::path::PathBuf::from),
                        required: cfg.recording.required,
                        queue_bytes: cfg.recording.queue_bytes,
                    },
                },
            ));
            proxy.close_rows_left_open().await;
            background.push(tokio::spawn(proxy::enforce::watch_revocations(
                Arc::clone(&sessions),
                store.clone(),
                Duration::from_millis(cfg.proxy.revocation_check_ms),
            )));
            if let Some(every) = secs(cfg.proxy.recheck_interval_secs) {
                background.push(tokio::spawn(proxy::enforce::recheck(
                    Arc::clone(&sessions),
                    Arc::clone(&service),
                    every,
                )));
            }
            app = app
                .merge(proxy::router(Arc::clone(&proxy)))
                .merge(crate::console::router(
                    cfg.proxy.web_root.as_deref(),
                    cfg.proxy.novnc_root.as_deref(),
                    &portals,
                )?)
                .fallback(any(proxy::upgrade_any_path).with_state(proxy));
        }
        app = app
            .merge(ops::router(Arc::clone(&ops)))
            .layer(axum::middleware::from_fn(crate::console::reject_odd_paths));
        tracing::info!(
            %addr, %public_url, node = %node_name, role = ?cfg.role,
            database = %cfg.database_redacted(),
            max_connections, max_connections_per_address = cfg.http.max_connections_per_address,
            "vncbroker ready"
        );
        Ok(Node {
            listener,
            addr,
            public_url,
            service,
            sessions,
            app,
            ops,
            http: HttpTimes {
                header: Duration::from_millis(cfg.http.header_timeout_ms),
                body: Duration::from_millis(cfg.http.body_timeout_ms),
                request: Duration::from_millis(cfg.http.request_timeout_ms),
            },
            conns,
            trusted: cfg.http.trusted_proxies.clone().into(),
            serves_proxy: cfg.role.serves_proxy(),
            background,
        })
    }
}

/// Connections the kernel may queue before they are accepted. A burst of
/// connections (a flood, many browsers at once) that overflows the queue
/// makes every client behind it, wanted or not, wait a second for its SYN
/// to be sent again; the kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` (host:port, the first address that works) with
/// [`LISTEN_BACKLOG`].
async fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("the address resolves to nothing")))
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
