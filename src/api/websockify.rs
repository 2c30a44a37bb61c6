//! `GET /api/v1/websockify/{token}`: websockify's JSONTokenApi plugin
//! protocol, so stock websockify can redeem vncbroker tokens.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, routing::get};
use serde::Deserialize;
use serde_json::json;

use crate::config::WebsockifyApiConfig;
use crate::service::TokenService;

#[derive(Clone)]
struct LookupState {
    service: Arc<TokenService>,
    cfg: Arc<WebsockifyApiConfig>,
}

#[derive(Deserialize)]
struct SecretQuery {
    secret: Option<String>,
}

/// The route, for nodes that enable it.
pub fn router(service: Arc<TokenService>, cfg: WebsockifyApiConfig) -> Router {
    Router::new()
        .route("/api/v1/websockify/{token}", get(lookup))
        .with_state(LookupState {
            service,
            cfg: Arc::new(cfg),
        })
}

/// Compares without leaking the position of the first difference.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn lookup(
    State(st): State<LookupState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
    Query(q): Query<SecretQuery>,
) -> Response {
    let by_secret = match (&st.cfg.secret, &q.secret) {
        (Some(want), Some(got)) => same_secret(want, got),
        _ => false,
    };
    if !by_secret && !st.cfg.allow.contains(&client.ip()) {
        tracing::warn!(%client, "websockify token lookup refused: no secret and address not allowed");
        return (
            StatusCode::FORBIDDEN,
            Json(json!({"error": {"code": "forbidden", "message": "not allowed"}})),
        )
            .into_response();
    }
    match st.service.redeem_target(&token).await {
        Ok(Some((host, port))) => Json(json!({"host": host, "port": port})).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"code": "not_found", "message": "token invalid or expired"}})),
        )
            .into_response(),
        Err(crate::service::ServiceError::BadParameter(why)) => (
            StatusCode::CONFLICT,
            Json(json!({"error": {"code": "wrong_protocol", "message": why}})),
        )
            .into_response(),
        Err(e) => {
            let msg = super::client_message(&e);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": {"code": "unavailable", "message": msg}})),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_compare_whole() {
        assert!(super::same_secret("abcdefgh", "abcdefgh"));
        assert!(!super::same_secret("abcdefgh", "abcdefgx"));
        assert!(!super::same_secret("abcdefgh", "abcdefg"));
    }
}
