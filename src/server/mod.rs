//! `vncbroker serve`: a node bound and wired by its role ([`wiring`]), its
//! HTTP connections ([`connection`]), its operational endpoints and reload
//! ([`ops`], [`reload`]), and the drain when it stops.
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

mod connection;
mod ops;
mod reload;
mod wiring;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use self::connection::{Connection, HttpTimes};
use self::ops::Ops;
use crate::config::Config;
use crate::limits::ConnectionLimiter;
use crate::proxy::sessions::{Sessions, Stop};
use crate::secrets::Secrets;
use crate::service::TokenService;
use crate::shutdown::Shutdown;
use crate::store::Registry;

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

/// How long sessions told to close at the end of a drain get to record
/// their end before the process exits anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// How long HTTP connections get to finish their request once the node
/// stops.
const CONNECTION_GRACE: Duration = Duration::from_secs(5);

impl Node {
    /// Serves until `stop` completes, then drains: the node stops being
    /// ready and takes no new sessions or API calls (probes and `/metrics`
    /// are still answered), live sessions go on until they end or
    /// `[server] drain_timeout_secs` passes (a second SIGTERM or Ctrl-C cuts
    /// it short), and the rest are closed with 1001 "server shutting down".
    pub async fn run(self, stop: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        // Every HTTP connection holds a listener: once told, each finishes
        // its current request, and `finished()` completes when the last is gone.
        let connections = Shutdown::new();
        self.accept_until(stop, &connections).await;

        self.ops.start_draining();
        connections.begin();
        let timeout = self.ops.drain_timeout();
        let sessions = &self.sessions;
        tracing::info!(
            live_sessions = sessions.count(),
            drain_timeout_secs = timeout.as_secs(),
            "draining: no new sessions, waiting for the live ones to end"
        );
        let drained = async {
            tokio::select! {
                _ = sessions.emptied() => tracing::info!("every session has ended"),
                _ = tokio::time::sleep(timeout) => {}
                _ = crate::shutdown::terminate_again() => {
                    tracing::info!("second signal: ending the sessions now")
                }
            }
        };
        self.accept_until(drained, &connections).await;

        // Sessions still connecting register late: they are told at once,
        // so each records its end too.
        let told = sessions.close(Stop::Shutdown);
        if told > 0 {
            tracing::info!(
                sessions = told,
                "drain time over: closing the remaining sessions"
            );
        }
        self.accept_until(
            async {
                if tokio::time::timeout(CLOSE_GRACE, sessions.emptied())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        sessions = sessions.count(),
                        "sessions did not finish closing in time"
                    );
                }
            },
            &connections,
        )
        .await;

        drop(self.listener);
        let _ = tokio::time::timeout(CONNECTION_GRACE, connections.finished()).await;
        for task in self.background {
            task.abort();
        }
        tracing::info!("vncbroker stopped");
        Ok(())
    }

    /// Accepts connections until `until` completes.
    async fn accept_until(&self, until: impl Future<Output = ()>, shutdown: &Shutdown) {
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
                draining: shutdown.listener(),
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

/// The sealer for VNC passwords, checked against one that the store holds.
pub async fn open_secrets(cfg: &Config, store: &dyn Registry) -> anyhow::Result<Secrets> {
    let sample = store.sealed_vnc_password().await?;
    Ok(Secrets::open_for(
        cfg.secrets.key_file.as_deref(),
        &cfg.database,
        sample,
    )?)
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
    let shutdown = crate::shutdown::terminate();
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
