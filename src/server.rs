//! `vncbroker serve`: binds the listener, wires store, inventory, service
//! and routes together, and runs until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::inventory::LocalInventory;
use crate::service::TokenService;
use crate::store;

/// Runs the server. Prints `listening on ADDR` on standard output once the
/// socket is bound, so scripts can use `--listen 127.0.0.1:0`.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let store = store::open(&cfg.database).await?;
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let public_url = cfg
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));

    let inventory = Arc::new(LocalInventory::new(
        Arc::clone(&store),
        cfg.auth_cache_ttl(),
        cfg.api.auth_cache_size,
    ));
    let service = Arc::new(TokenService::new(
        store,
        inventory,
        cfg.policy(),
        &public_url,
    ));
    let purge = tokio::spawn(purge_loop(
        Arc::clone(&service),
        Duration::from_secs(cfg.tokens.purge_interval),
    ));

    let app = api::router(ApiState { service }, cfg.api.max_body_bytes);
    tracing::info!(%addr, %public_url, database = %redact_url(&cfg.database), "vncbroker serving");
    println!("listening on {addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();

    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await?;
    purge.abort();
    tracing::info!("vncbroker stopped");
    Ok(())
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

async fn shutdown_signal() {
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
