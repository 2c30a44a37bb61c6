//! `vncbroker serve`: binds the listener, wires store, inventory, service,
//! proxy and routes together by the node's role, and runs until SIGTERM or
//! Ctrl-C, then drains.
//!
//! Operations: `/healthz` (the process runs), `/readyz` (the store answers
//! and the node is not draining), `/metrics` (Prometheus); SIGHUP reloads
//! the reloadable settings and the TLS files, SIGTERM drains live sessions
//! for `[server] drain_timeout_secs` before closing them with 1001.
//!
//! Every connection is admitted against the connection caps (per client
//! address and in all) before anything is read from it; one over a cap is
//! answered 503, or 4429 on a WebSocket, and closed. Every request has
//! deadlines for its headers, its body and the whole exchange, so no
//! client holds a connection by being slow.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::config::InventoryKind;
use crate::inventory::opennebula::{Oned, OpenNebulaInventory};
use crate::inventory::{Inventory, LocalInventory};
use crate::limits::{ConnRefused, ConnSlot, ConnectionLimiter, FailureLimiter, RefusalSlot};
use crate::proxy::sessions::{Limits as SessionLimits, Sessions, Stop};
use crate::proxy::{self, Proxy};
use crate::secrets::Secrets;
use crate::service::TokenService;
use crate::store::{self, Store};

/// A node that is bound and wired, not yet serving.
pub struct Node {
    listener: TcpListener,
    pub addr: SocketAddr,
    pub public_url: String,
    pub service: Arc<TokenService>,
    pub sessions: Arc<Sessions>,
    app: Router,
    ops: Arc<Ops>,
    http: HttpTimes,
    conns: Arc<ConnectionLimiter>,
    trusted: Arc<[IpAddr]>,
    serves_proxy: bool,
    background: Vec<JoinHandle<()>>,
}

/// The deadlines of every HTTP request.
#[derive(Debug, Clone, Copy)]
struct HttpTimes {
    header: Duration,
    body: Duration,
    request: Duration,
}

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

        let secrets =
            Secrets::open_for(cfg.secrets.key_file.as_deref(), &cfg.database, &*store).await?;
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
            Arc::clone(&store),
            Arc::clone(&inventory),
            secrets.clone(),
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
        let ops = Arc::new(Ops::new(cfg, &store, &service, &sessions, tls.clone()));
        let mut background = vec![tokio::spawn(purge_loop(
            Arc::clone(&ops),
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
            // Rows this node left open when it last stopped (a kill -9, or a
            // database outage as sessions ended) cannot be live any more.
            match store
                .close_orphaned_sessions(&node_name, crate::now_unix())
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(sessions = n, node = %node_name, "closed session rows a previous run left open")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not close session rows a previous run left open")
                }
            }
            let proxy = Arc::new(Proxy::new(
                Arc::clone(&store),
                Arc::clone(&service),
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
                    client_write_timeout: secs(cfg.proxy.client_write_timeout_secs),
                },
            ));
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
                )?)
                .fallback(any(proxy::upgrade_any_path).with_state(proxy));
        }
        app = app
            .merge(ops_router(Arc::clone(&ops)))
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

    /// Serves until `shutdown` completes, then drains: the node stops being
    /// ready and takes no new sessions or API calls (probes and `/metrics`
    /// are still answered), live sessions go on until they end or
    /// `[server] drain_timeout_secs` passes (a second SIGTERM or Ctrl-C cuts
    /// it short), and the rest are closed with 1001 "server shutting down".
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        // Every connection holds a receiver; once draining, each finishes its
        // current request, and `closed()` completes when the last one is gone.
        let (drain, draining) = tokio::sync::watch::channel(false);
        self.accept_until(shutdown, &draining).await;

        self.ops.draining.store(true, Ordering::SeqCst);
        let _ = drain.send(true);
        let timeout = Duration::from_secs(self.ops.drain_timeout_secs.load(Ordering::Relaxed));
        tracing::info!(
            live_sessions = self.ops.sessions.count(),
            drain_timeout_secs = timeout.as_secs(),
            "draining: no new sessions, waiting for the live ones to end"
        );
        let sessions = &self.ops.sessions;
        let drained = async {
            tokio::select! {
                _ = async {
                    while sessions.count() > 0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                } => tracing::info!("every session has ended"),
                _ = tokio::time::sleep(timeout) => {}
                _ = second_signal() => tracing::info!("second signal: ending the sessions now"),
            }
        };
        self.accept_until(drained, &draining).await;

        let told = sessions.end_all(Stop::Shutdown);
        if told > 0 {
            tracing::info!(
                sessions = told,
                "drain time over: closing the remaining sessions"
            );
        }
        let closed = async {
            // Sessions still connecting when the drain ended register late:
            // keep telling until none is left, so each records its end.
            while sessions.count() > 0 {
                sessions.end_all(Stop::Shutdown);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        self.accept_until(
            async {
                if tokio::time::timeout(CLOSE_GRACE, closed).await.is_err() {
                    tracing::warn!(
                        sessions = sessions.count(),
                        "sessions did not finish closing in time"
                    );
                }
            },
            &draining,
        )
        .await;

        drop(self.listener);
        drop(draining);
        let _ = tokio::time::timeout(Duration::from_secs(5), drain.closed()).await;
        for task in self.background {
            task.abort();
        }
        tracing::info!("vncbroker stopped");
        Ok(())
    }

    /// Accepts connections until `until` completes.
    async fn accept_until(
        &self,
        until: impl Future<Output = ()>,
        draining: &tokio::sync::watch::Receiver<bool>,
    ) {
        let mut until = std::pin::pin!(until);
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
                _ = &mut until => return,
            };
            // Admitted before anything is read: over a cap, the connection
            // only gets its refusal (while few refusals are in progress;
            // past that it is closed at once).
            let (slot, refusal) = match self.conns.admit(peer.ip()) {
                Ok(slot) => (Some(slot), None),
                Err(why) => {
                    crate::metrics::global().connection_refused(why.label());
                    match self.conns.refusing() {
                        Some(r) => (None, Some((why, r))),
                        None => {
                            crate::metrics::global().connection_refused("unanswered");
                            tracing::debug!(%peer, "connection over a cap closed unanswered");
                            continue;
                        }
                    }
                }
            };
            let _ = tcp.set_nodelay(true);
            let conn = Connection {
                app: self.app.clone(),
                ops: Arc::clone(&self.ops),
                peer,
                http: self.http,
                draining: draining.clone(),
                conns: Arc::clone(&self.conns),
                trusted: Arc::clone(&self.trusted),
                serves_proxy: self.serves_proxy,
                slot,
                refusal,
            };
            // The acceptor of the moment: a SIGHUP may have swapped it.
            match self.ops.acceptor() {
                None => {
                    tokio::spawn(conn.serve(tcp));
                }
                Some(acceptor) => {
                    tokio::spawn(async move {
                        // The TLS handshake shares the header deadline.
                        match tokio::time::timeout(conn.http.header, acceptor.accept(tcp)).await {
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
    }
}

/// How long sessions told to close at the end of a drain get to record
/// their end before the process exits anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// How long `/readyz` waits for the store.
const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// What the operational endpoints, the purge loop and a reload share with
/// the running node.
struct Ops {
    store: Arc<dyn Store>,
    service: Arc<TokenService>,
    sessions: Arc<Sessions>,
    draining: AtomicBool,
    drain_timeout_secs: AtomicU64,
    retention_days: AtomicU32,
    /// The TLS acceptor; a SIGHUP swaps in one with the files read again.
    tls: Option<RwLock<TlsAcceptor>>,
    /// The configuration in force, to tell what a reload changes.
    config: Mutex<Config>,
}

impl Ops {
    fn new(
        cfg: &Config,
        store: &Arc<dyn Store>,
        service: &Arc<TokenService>,
        sessions: &Arc<Sessions>,
        tls: Option<TlsAcceptor>,
    ) -> Ops {
        Ops {
            store: Arc::clone(store),
            service: Arc::clone(service),
            sessions: Arc::clone(sessions),
            draining: AtomicBool::new(false),
            drain_timeout_secs: AtomicU64::new(cfg.server.drain_timeout_secs),
            retention_days: AtomicU32::new(cfg.sessions.retention_days),
            tls: tls.map(RwLock::new),
            config: Mutex::new(cfg.clone()),
        }
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    fn acceptor(&self) -> Option<TlsAcceptor> {
        self.tls
            .as_ref()
            .map(|t| t.read().unwrap_or_else(PoisonError::into_inner).clone())
    }

    /// Applies the reloadable settings of `new` (see `vncbroker.example.toml`)
    /// and logs the changes that need a restart. Everything that can fail
    /// (the certificate, the log filter) is checked first: on an error
    /// nothing changes.
    fn reload(&self, new: Config) -> anyhow::Result<()> {
        let old = self
            .config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let acceptor = match (&self.tls, &new.tls.cert, &new.tls.key) {
            (Some(_), Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
            _ => None,
        };
        tracing_subscriber::EnvFilter::try_new(&new.log.level)
            .map_err(|e| anyhow::anyhow!("log.level {:?}: {e}", new.log.level))?;

        if let (Some(slot), Some(acceptor)) = (&self.tls, acceptor) {
            *slot.write().unwrap_or_else(PoisonError::into_inner) = acceptor;
            tracing::info!("TLS certificate and key reloaded");
        }
        self.service.set_policy(new.policy());
        self.drain_timeout_secs
            .store(new.server.drain_timeout_secs, Ordering::Relaxed);
        self.retention_days
            .store(new.sessions.retention_days, Ordering::Relaxed);
        match crate::cli::reload_log_level(&new.log.level) {
            Ok(true) => {}
            Ok(false) if new.log.level != old.log.level => {
                tracing::info!("log.level not applied: RUST_LOG is set and wins")
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "log.level not applied"),
        }
        let restart = restart_needed(&old, &new);
        if !restart.is_empty() {
            tracing::warn!(
                settings = %restart.join(", "),
                "changed settings take effect only after a restart"
            );
        }
        tracing::info!(
            default_ttl = new.tokens.default_ttl,
            max_ttl = new.tokens.max_ttl,
            single_use = new.tokens.single_use,
            log_level = %new.log.level,
            drain_timeout_secs = new.server.drain_timeout_secs,
            retention_days = new.sessions.retention_days,
            "configuration reloaded"
        );
        let mut running = old;
        running.tokens.default_ttl = new.tokens.default_ttl;
        running.tokens.max_ttl = new.tokens.max_ttl;
        running.tokens.single_use = new.tokens.single_use;
        running.log.level = new.log.level.clone();
        running.server.drain_timeout_secs = new.server.drain_timeout_secs;
        running.sessions.retention_days = new.sessions.retention_days;
        if self.tls.is_some() && new.tls.cert.is_some() {
            running.tls = new.tls.clone();
        }
        *self.config.lock().unwrap_or_else(PoisonError::into_inner) = running;
        Ok(())
    }
}

/// The settings that differ between `old` and `new` other than the
/// reloadable ones (TLS counts only when it is turned on or off).
fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let strip = |c: &Config| {
        let mut c = c.clone();
        c.tokens.default_ttl = 0;
        c.tokens.max_ttl = 0;
        c.tokens.single_use = false;
        c.log.level.clear();
        c.server.drain_timeout_secs = 0;
        c.sessions.retention_days = 0;
        c.tls.cert = c.tls.cert.map(|_| String::new());
        c.tls.key = c.tls.key.map(|_| String::new());
        c
    };
    let (a, b) = (strip(old), strip(new));
    let mut changed = Vec::new();
    let mut check = |name, differs: bool| {
        if differs {
            changed.push(name);
        }
    };
    check("listen", a.listen != b.listen);
    check("public_url", a.public_url != b.public_url);
    check("database", a.database != b.database);
    check("node_name", a.node_name != b.node_name);
    check("role", a.role != b.role);
    check("tokens.purge_interval", a.tokens != b.tokens);
    check("[api]", a.api != b.api);
    check("[proxy]", a.proxy != b.proxy);
    check("[http]", a.http != b.http);
    check("[tls] (turning TLS on or off)", a.tls != b.tls);
    check("[inventory]", a.inventory != b.inventory);
    check("[websockify_api]", a.websockify_api != b.websockify_api);
    check("log.format", a.log != b.log);
    if changed.is_empty() && a != b {
        changed.push("other settings");
    }
    changed
}

/// `/healthz`, `/readyz` and `/metrics`, on every node whatever its role.
fn ops_router(ops: Arc<Ops>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ops)
}

/// Paths still answered while draining.
fn is_ops_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

/// 200 while the store answers a cheap query and the node is not draining.
async fn readyz(State(ops): State<Arc<Ops>>) -> Response {
    if ops.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    match tokio::time::timeout(READY_TIMEOUT, ops.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready").into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "not ready: the store does not answer");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response()
        }
        Err(_) => {
            tracing::warn!("not ready: the store did not answer in time");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response()
        }
    }
}

async fn metrics(State(ops): State<Arc<Ops>>) -> Response {
    let text = crate::metrics::global().render(crate::metrics::Gauges {
        sessions_active: ops.sessions.count(),
        draining: ops.is_draining(),
    });
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

/// The answer to anything but a probe while draining.
fn shutting_down() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "5"), (header::CONNECTION, "close")],
        "server shutting down",
    )
        .into_response()
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

/// How long a refused connection gets to send the request its refusal
/// answers, and to take the answer.
const REFUSAL_TIME: Duration = Duration::from_secs(2);

/// How long past the request deadline an answer may take to be written
/// before its connection is closed.
const WRITE_GRACE: Duration = Duration::from_secs(5);

/// One accepted HTTP connection.
struct Connection {
    app: Router,
    ops: Arc<Ops>,
    peer: SocketAddr,
    http: HttpTimes,
    draining: tokio::sync::watch::Receiver<bool>,
    conns: Arc<ConnectionLimiter>,
    trusted: Arc<[IpAddr]>,
    serves_proxy: bool,
    /// Its place under the connection caps.
    slot: Option<ConnSlot>,
    /// Over a cap: why, and the place its refusal is answered in.
    refusal: Option<(ConnRefused, RefusalSlot)>,
}

impl Connection {
    /// Serves HTTP/1.1 (with upgrades, for WebSockets) on `io`. A client
    /// that does not finish its request headers within the deadline is
    /// dropped, so slow handshakes cannot pile up; one whose request (body
    /// and answer included) takes longer than the request deadline is
    /// dropped too.
    async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            app,
            ops,
            peer,
            http,
            mut draining,
            conns,
            trusted,
            serves_proxy,
            slot,
            refusal,
        } = self;
        let (refused, refusal_slot) = match refusal {
            Some((why, r)) => (Some(why), Some(r)),
            None => (None, None),
        };
        let gate = Arc::new(Gate {
            app,
            ops,
            peer,
            http,
            conns,
            trusted,
            serves_proxy,
            refused,
            clock: Arc::new(Clock::default()),
            upgraded: Arc::new(Mutex::new(None)),
        });
        // The connection's places under the caps go with the socket, also
        // into a WebSocket session after an upgrade.
        let io = Held {
            io,
            _slot: slot,
            _refusal: refusal_slot,
            _forwarded: Arc::clone(&gate.upgraded),
        };
        let clock = Arc::clone(&gate.clock);
        let g = Arc::clone(&gate);
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            Arc::clone(&g).handle(req)
        });
        // A connection accepted while draining answers one request (a
        // probe, typically) and closes; the others finish the request in
        // progress when the drain starts. A refused one answers one request.
        let accepted_draining = *draining.borrow();
        let header_timeout = match refused {
            Some(_) => http.header.min(REFUSAL_TIME),
            None => http.header,
        };
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            // A refusal says `Connection: close` itself (keep-alive off would
            // spoil the upgrade that carries a 4429).
            .keep_alive(!accepted_draining)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let mut conn = std::pin::pin!(conn);
        let one_only = accepted_draining || refused.is_some();
        let serving = async {
            if one_only {
                return conn.as_mut().await;
            }
            tokio::select! {
                r = conn.as_mut() => r,
                _ = async { drop(draining.wait_for(|d| *d).await) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            }
        };
        // A request (its answer included) that outlives the deadline ends
        // the connection: a client reading its answer slowly holds nothing.
        let result = tokio::select! {
            r = serving => r,
            _ = clock.overdue(http.request + WRITE_GRACE) => {
                tracing::debug!(%peer, "request overdue: connection closed");
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
        }
    }
}

/// What every request on one connection goes through.
struct Gate {
    app: Router,
    ops: Arc<Ops>,
    peer: SocketAddr,
    http: HttpTimes,
    conns: Arc<ConnectionLimiter>,
    trusted: Arc<[IpAddr]>,
    serves_proxy: bool,
    /// Set when the connection is over a cap: every request is refused.
    refused: Option<ConnRefused>,
    clock: Arc<Clock>,
    /// A forwarded client's place, taken by its WebSocket for as long as
    /// the connection lives.
    upgraded: Arc<Mutex<Option<ConnSlot>>>,
}

impl Gate {
    async fn handle(
        self: Arc<Self>,
        mut req: hyper::Request<Incoming>,
    ) -> Result<Response, std::convert::Infallible> {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        if let Some(why) = self.refused {
            return Ok(self.refuse(req, why));
        }
        if self.ops.is_draining() && !is_ops_path(req.uri().path()) {
            return Ok(shutting_down());
        }
        // Behind a trusted proxy each client is capped by its forwarded
        // address, request by request (the proxy's own connections are not
        // one client).
        let mut forwarded = None;
        if self.conns.caps_addresses() && self.trusted.contains(&self.peer.ip()) {
            let client =
                crate::proxy::origin::client_ip_from(self.peer.ip(), req.headers(), &self.trusted);
            if client != self.peer.ip() {
                match self.conns.admit_forwarded(client) {
                    Ok(slot) => forwarded = Some(slot),
                    Err(why) => {
                        crate::metrics::global().connection_refused(why.label());
                        return Ok(self.refuse(req, why));
                    }
                }
            }
        }
        let upgrade = crate::websocket::upgrade::is_upgrade(req.headers());
        let seq = self.clock.start();
        let (parts, body) = req.into_parts();
        let body_done = Arc::new(AtomicBool::new(body.is_end_stream()));
        let body = Body::new(Tracked {
            inner: body,
            done: Arc::clone(&body_done),
        });
        let req = axum::http::Request::from_parts(parts, body);
        let http = self.http;
        let body_late = async {
            tokio::time::sleep(http.body).await;
            if body_done.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
        };
        let resp = tokio::select! {
            resp = self.app.clone().oneshot(req) => match resp {
                Ok(resp) => resp,
                Err(never) => match never {},
            },
            _ = body_late => {
                crate::metrics::global().http_timeout("body");
                tracing::debug!(peer = %self.peer, "request body not received in time");
                (
                    StatusCode::REQUEST_TIMEOUT,
                    [(header::CONNECTION, "close")],
                    "request body not received in time",
                )
                    .into_response()
            }
            _ = tokio::time::sleep(http.request) => {
                crate::metrics::global().http_timeout("request");
                tracing::debug!(peer = %self.peer, "request not answered in time");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "5"), (header::CONNECTION, "close")],
                    "request took too long",
                )
                    .into_response()
            }
        };
        if upgrade && resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            *self.upgraded.lock().unwrap_or_else(PoisonError::into_inner) = forwarded.take();
        }
        let finish = Finish {
            clock: Arc::clone(&self.clock),
            seq,
        };
        Ok(resp.map(|inner| {
            Body::new(Finishing {
                inner,
                finish: Some(finish),
            })
        }))
    }

    /// The answer to a request over a connection cap: 503 with
    /// `Retry-After`, or, for a WebSocket on a proxy node, the upgrade and
    /// a close frame with 4429, which the console page can show (a browser
    /// hides why an upgrade failed).
    fn refuse(&self, mut req: hyper::Request<Incoming>, why: ConnRefused) -> Response {
        // Counted in /metrics; one line each would flood the log in an attack.
        tracing::debug!(client = %self.peer, reason = %why, "connection refused: over a connection cap");
        if self.serves_proxy
            && let Ok(accepted) = crate::websocket::upgrade::check(req.method(), req.headers())
            && let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>()
        {
            tokio::spawn(async move {
                let Ok(Ok(upgraded)) = tokio::time::timeout(REFUSAL_TIME, on_upgrade).await else {
                    return;
                };
                let mut w = crate::websocket::stream::Writer::new(TokioIo::new(upgraded));
                let _ = tokio::time::timeout(REFUSAL_TIME, async {
                    let _ = w.close(proxy::close::TOO_MANY, &why.to_string()).await;
                    let _ = w.shutdown().await;
                })
                .await;
            });
            return accepted.response();
        }
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5"), (header::CONNECTION, "close")],
            format!("{why}, try again later"),
        )
            .into_response()
    }
}

/// When the request in progress on a connection started, so that one
/// taking too long (a client that reads its answer slowly, say) can be cut.
#[derive(Default)]
struct Clock {
    state: Mutex<(u64, Option<tokio::time::Instant>)>,
    started: tokio::sync::Notify,
}

impl Clock {
    fn start(&self) -> u64 {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.0 += 1;
        st.1 = Some(tokio::time::Instant::now());
        self.started.notify_waiters();
        st.0
    }

    fn finish(&self, seq: u64) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.0 == seq {
            st.1 = None;
        }
    }

    fn current(&self) -> Option<(u64, tokio::time::Instant)> {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.1.map(|t| (st.0, t))
    }

    /// Completes once a request has been in progress for `limit`.
    async fn overdue(&self, limit: Duration) {
        loop {
            let started = self.started.notified();
            let mut started = std::pin::pin!(started);
            started.as_mut().enable();
            match self.current() {
                None => started.await,
                Some((seq, since)) => {
                    tokio::time::sleep_until(since + limit).await;
                    if self.current().is_some_and(|(s, _)| s == seq) {
                        return;
                    }
                }
            }
        }
    }
}

/// Ends the clock's request when the answer has been sent (or dropped).
struct Finish {
    clock: Arc<Clock>,
    seq: u64,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.clock.finish(self.seq);
    }
}

/// An answer body that ends its request on the clock when it is done.
struct Finishing {
    inner: Body,
    finish: Option<Finish>,
}

impl HttpBody for Finishing {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.finish = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that says when it has all arrived.
struct Tracked {
    inner: Incoming,
    done: Arc<AtomicBool>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.done.store(true, Ordering::SeqCst);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's I/O, holding its places under the connection caps for as
/// long as the socket lives.
struct Held<I> {
    io: I,
    _slot: Option<ConnSlot>,
    _refusal: Option<RefusalSlot>,
    _forwarded: Arc<Mutex<Option<ConnSlot>>>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Held<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Held<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Reads the configuration again, as at start; [`serve`] calls it on SIGHUP.
pub type ReloadConfig = Box<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

/// Runs the server. Prints `listening on ADDR` on standard output once the
/// socket is bound, so scripts can use `--listen 127.0.0.1:0`. SIGTERM (or
/// Ctrl-C) drains and stops it; SIGHUP reloads the configuration through
/// `reload`.
pub async fn serve(cfg: Config, reload: ReloadConfig) -> anyhow::Result<()> {
    let node = Node::bind(&cfg).await?;
    // Handlers go in before the address is announced, so a signal sent as
    // soon as it is never meets the default action (which ends the process).
    let shutdown = shutdown_signal();
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| anyhow::anyhow!("installing the SIGHUP handler: {e}"))?;
    let reloader = tokio::spawn(reload_on_sighup(hup, Arc::clone(&node.ops), reload));
    println!("listening on {}", node.addr);
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let result = node.run(shutdown).await;
    reloader.abort();
    result
}

async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    ops: Arc<Ops>,
    reload: ReloadConfig,
) {
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        if let Err(e) = reload().and_then(|cfg| ops.reload(cfg)) {
            tracing::error!(
                error = %format!("{e:#}"),
                "configuration reload failed; the running configuration is kept"
            );
        }
    }
}

/// How long a revocation stays in the log.
const REVOCATION_LOG_SECS: i64 = 86_400;

/// Deletes expired tokens and, with `[sessions] retention_days`, session
/// records that ended longer ago than that.
async fn purge_loop(ops: Arc<Ops>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match ops.service.purge_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired console tokens deleted"),
            Err(e) => tracing::warn!(error = %e, "purging expired tokens failed"),
        }
        // Every proxy follows the log within seconds; a day covers a node
        // that lost the database for a while.
        let day_old = crate::now_unix().saturating_sub(REVOCATION_LOG_SECS);
        if let Err(e) = ops.store.purge_revocations(day_old).await {
            tracing::warn!(error = %e, "purging old revocations failed");
        }
        let days = ops.retention_days.load(Ordering::Relaxed);
        if days > 0 {
            let before = crate::now_unix().saturating_sub(i64::from(days) * 86_400);
            match ops.store.purge_sessions(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    deleted = n,
                    retention_days = days,
                    "old session records deleted"
                ),
                Err(e) => tracing::warn!(error = %e, "deleting old session records failed"),
            }
        }
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C). The handlers are installed when
/// this is called, not when the future is first polled.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        let wait = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = wait(term) => {},
            _ = wait(int) => {},
        }
        tracing::info!("shutting down");
    }
}

/// A further SIGTERM or SIGINT, during the drain.
async fn second_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
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
