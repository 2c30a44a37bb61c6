//! What the running node shares with its operators: `/healthz`, `/readyz`
//! and `/metrics`, the draining flag, and a reload's effects.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_rustls::TlsAcceptor;

use super::reload::{Reloadable, restart_needed};
use crate::config::Config;
use crate::proxy::sessions::Sessions;
use crate::service::TokenService;
use crate::store::Health;

/// How long `/readyz` waits for the store.
const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// What the operational endpoints, the connections and a reload share with
/// the running node.
pub(super) struct Ops {
    health: Arc<dyn Health>,
    service: Arc<TokenService>,
    sessions: Arc<Sessions>,
    draining: AtomicBool,
    drain_timeout_secs: AtomicU64,
    /// The TLS acceptor; a SIGHUP swaps in one with the files read again.
    tls: Option<RwLock<TlsAcceptor>>,
    /// The configuration in force, to tell what a reload changes.
    config: Mutex<Config>,
}

impl Ops {
    pub fn new(
        cfg: &Config,
        health: Arc<dyn Health>,
        service: &Arc<TokenService>,
        sessions: &Arc<Sessions>,
        tls: Option<TlsAcceptor>,
    ) -> Ops {
        service.set_retention_days(cfg.sessions.retention_days);
        service.set_defaults(cfg.session_defaults());
        service.set_recording_retention_days(cfg.recording.retention_days);
        Ops {
            health,
            service: Arc::clone(service),
            sessions: Arc::clone(sessions),
            draining: AtomicBool::new(false),
            drain_timeout_secs: AtomicU64::new(cfg.server.drain_timeout_secs),
            tls: tls.map(RwLock::new),
            config: Mutex::new(cfg.clone()),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// From now on the node is not ready, and answers only probes.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs.load(Ordering::Relaxed))
    }

    pub fn acceptor(&self) -> Option<TlsAcceptor> {
        self.tls
            .as_ref()
            .map(|t| t.read().unwrap_or_else(PoisonError::into_inner).clone())
    }

    /// Applies the reloadable settings of `new` (see [`Reloadable`]) and
    /// logs the changes that need a restart. Everything that can fail (the
    /// certificate, the log filter) is checked first: on an error nothing
    /// changes.
    pub fn reload(&self, new: Config) -> anyhow::Result<()> {
        let old = self
            .config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut wanted = Reloadable::of(&new);
        let acceptor = match (&self.tls, &wanted.tls.cert, &wanted.tls.key) {
            (Some(_), Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
            _ => None,
        };
        crate::logging::check_level(&wanted.log_level).map_err(anyhow::Error::msg)?;

        if let (Some(slot), Some(acceptor)) = (&self.tls, acceptor) {
            *slot.write().unwrap_or_else(PoisonError::into_inner) = acceptor;
            tracing::info!("TLS certificate and key reloaded");
        } else {
            // TLS turned on or off takes a restart: the files in force stay.
            wanted.tls = old.tls.clone();
        }
        self.service.set_policy(new.policy());
        self.service.set_defaults(new.session_defaults());
        self.service
            .set_recording_retention_days(wanted.recording_retention_days);
        self.service.set_retention_days(wanted.retention_days);
        self.drain_timeout_secs
            .store(wanted.drain_timeout_secs, Ordering::Relaxed);
        match crate::logging::reload_level(&wanted.log_level) {
            Ok(true) => {}
            Ok(false) if wanted.log_level != old.log.level => {
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
            default_ttl = wanted.default_ttl,
            max_ttl = wanted.max_ttl,
            single_use = wanted.single_use,
            log_level = %wanted.log_level,
            drain_timeout_secs = wanted.drain_timeout_secs,
            retention_days = wanted.retention_days,
            "configuration reloaded"
        );
        let mut running = old;
        wanted.put(&mut running);
        *self.config.lock().unwrap_or_else(PoisonError::into_inner) = running;
        Ok(())
    }
}

/// `/healthz`, `/readyz` and `/metrics`, on every node whatever its role.
pub(super) fn router(ops: Arc<Ops>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ops)
}

/// Paths still answered while draining.
pub(super) fn is_ops_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

/// 200 while the store answers a cheap query and the node is not draining.
async fn readyz(State(ops): State<Arc<Ops>>) -> Response {
    if ops.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    match tokio::time::timeout(READY_TIMEOUT, ops.health.ping()).await {
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
pub(super) fn shutting_down() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "5"), (header::CONNECTION, "close")],
        "server shutting down",
    )
        .into_response()
}
