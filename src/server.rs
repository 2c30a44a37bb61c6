//! `vncbroker serve`: binds the listener, wires store, inventory, service,
//! proxy and routes together by the node's role, and runs until SIGTERM or
//! Ctrl-C, then drains.
//!
//! Operations: `/healthz` (the process runs), `/readyz` (the store answers
//! and the node is not draining), `/metrics` (Prometheus); SIGHUP reloads
//! the reloadable settings and the TLS files, SIGTERM drains live sessions
//! for `[server] drain_timeout_secs` before closing them with 1001.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
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
        // Every database call is timed for /metrics.
        let store = crate::metrics::TimedStore::wrap(store::open(&cfg.database).await?);
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

        let secrets = Secrets::open_for(cfg.secrets.key_file.as_deref(), &cfg.database)?;
        let inventory: Arc<dyn Inventory> = match cfg.inventory.kind {
            InventoryKind::Local => Arc::new(LocalInventory::new(
                Arc::clone(&store),
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
            cfg.http.password_checks_per_address,
            Duration::from_millis(cfg.http.failure_delay_ms),
        ));
        if cfg.inventory.kind == InventoryKind::Local {
            crate::auth::warm_up();
        }
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
        app = app
            .merge(ops_router(Arc::clone(&ops)))
            .layer(axum::middleware::from_fn(crate::console::reject_odd_paths));
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
            ops,
            header_timeout: Duration::from_millis(cfg.http.header_timeout_ms),
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
            let _ = tcp.set_nodelay(true);
            let conn = Connection {
                app: self.app.clone(),
                ops: Arc::clone(&self.ops),
                peer,
                header_timeout: self.header_timeout,
                draining: draining.clone(),
            };
            // The acceptor of the moment: a SIGHUP may have swapped it.
            match self.ops.acceptor() {
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

/// One accepted HTTP connection.
struct Connection {
    app: Router,
    ops: Arc<Ops>,
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
            ops,
            peer,
            header_timeout,
            mut draining,
        } = self;
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let refuse = ops.is_draining() && !is_ops_path(req.uri().path());
            let app = app.clone();
            async move {
                if refuse {
                    return Ok(shutting_down());
                }
                app.oneshot(req).await
            }
        });
        // A connection accepted while draining answers one request (a
        // probe, typically) and closes; the others finish the request in
        // progress when the drain starts.
        let accepted_draining = *draining.borrow();
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(!accepted_draining)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let mut conn = std::pin::pin!(conn);
        let result = if accepted_draining {
            conn.await
        } else {
            tokio::select! {
                r = conn.as_mut() => r,
                _ = async { drop(draining.wait_for(|d| *d).await) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
        }
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
