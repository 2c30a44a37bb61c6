//! The HTTP surface of the token service.
//!
//! - [`xmlrpc`]: `POST /RPC2`, in oned's wire conventions.
//! - [`json`]: `/api/v1`, with HTTP Basic auth.
//! - [`websockify`]: websockify's JSONTokenApi lookup, off by default.
//! - [`vv`]: remote-viewer files for SPICE consoles.

pub mod json;
pub mod vv;
pub mod websockify;
pub mod xmlrpc;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::http::HeaderMap;

use crate::limits::FailureLimiter;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};

use crate::service::{ServiceError, TokenService};

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    pub service: Arc<TokenService>,
    /// Budgets of failed logins per client address, charged before each check.
    pub limiter: Arc<FailureLimiter>,
    /// Reverse proxies whose X-Forwarded-For is believed.
    pub trusted_proxies: Arc<[IpAddr]>,
}

impl ApiState {
    /// The caller's address, through trusted reverse proxies (every
    /// `X-Forwarded-For` line counts).
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        crate::edge::client_ip_from(peer.ip(), headers, &self.trusted_proxies)
    }
}

/// The API routes. Bodies above `max_body` are refused with 413 before a
/// handler runs.
pub fn router(state: ApiState, max_body: usize) -> Router {
    Router::new()
        .route("/RPC2", post(xmlrpc::handle))
        .route(
            "/api/v1/vms/{id}/console-tokens",
            post(json::mint).delete(json::revoke),
        )
        .route("/api/v1/vms/{id}/console.vv", get(json::viewer_file))
        .route("/api/v1/sessions", get(json::sessions))
        .route("/api/v1/sessions/{id}", delete(json::end_session))
        .route("/api/v1/sessions/{id}/recording", get(json::recording))
        .route(
            "/api/v1/sessions/{id}/replay-tokens",
            post(json::replay_token),
        )
        .route("/api/v1/replay/data", get(json::replay_data))
        .route("/api/v1/openapi.json", get(json::openapi))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Logs the detail of errors whose text is not for clients, and returns the
/// message a client may see.
pub(crate) fn client_message(err: &ServiceError) -> String {
    match err {
        e if e.is_unavailable() => {
            tracing::error!(detail = %e, "store or inventory unavailable");
            "Service unavailable: a backend service cannot be reached, try again shortly".into()
        }
        ServiceError::Store(_) | ServiceError::Internal(_) => {
            tracing::error!(detail = %err, "internal error");
            "Internal error".into()
        }
        other => other.to_string(),
    }
}
