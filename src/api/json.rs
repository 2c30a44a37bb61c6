//! `/api/v1`: the token methods as JSON over HTTP, with HTTP Basic auth.

use axum::Json;
use axum::body::Bytes;
use axum::extract::Query;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::json;

use super::ApiState;
use crate::inventory::{Credential, InventoryError};
use crate::limits::{Attempt, Refused};
use crate::service::{MintRequest, ServiceError};
use crate::store::SessionFilter;

const OPENAPI: &str = include_str!("openapi.json");

/// The optional body of a mint request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MintBody {
    ttl: Option<i64>,
    single_use: Option<bool>,
    #[serde(default)]
    view_only: bool,
}

/// A JSON error: status, a stable machine code, a human message.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Seconds for `Retry-After`, for answers that a later try may change.
    retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn retry_after(mut self, secs: u32) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "valid HTTP Basic credentials are required",
        )
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        use InventoryError as I;
        let (status, code) = match &e {
            ServiceError::Inventory(inv) => match inv {
                I::Authentication => return ApiError::unauthorized(),
                I::Authorization { .. } => (StatusCode::FORBIDDEN, "forbidden"),
                I::NoSuchVm(_) => (StatusCode::NOT_FOUND, "not_found"),
                I::NoConsole { .. } => (StatusCode::NOT_FOUND, "no_console"),
                I::NotAvailable { .. } => (StatusCode::CONFLICT, "console_unavailable"),
                I::Oned { code, .. } => match *code {
                    0x0100 => return ApiError::unauthorized(),
                    0x0200 => (StatusCode::FORBIDDEN, "forbidden"),
                    0x0400 => (StatusCode::NOT_FOUND, "not_found"),
                    0x0800 => (StatusCode::CONFLICT, "console_unavailable"),
                    0x1000 => (StatusCode::BAD_REQUEST, "bad_request"),
                    _ => (StatusCode::BAD_GATEWAY, "upstream"),
                },
                I::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                I::Busy => {
                    return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string())
                        .retry_after(1);
                }
            },
            ServiceError::NoSuchSession(_) => (StatusCode::NOT_FOUND, "not_found"),
            ServiceError::SessionOver(_) => (StatusCode::CONFLICT, "session_ended"),
            ServiceError::NotAllowed(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ServiceError::WrongProtocol { .. } => (StatusCode::CONFLICT, "wrong_protocol"),
            ServiceError::NoRecording { .. } => (StatusCode::NOT_FOUND, "no_recording"),
            ServiceError::BadParameter(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ServiceError::Store(_) | ServiceError::Unavailable(_) | ServiceError::Internal(_) => {
                if e.is_unavailable() {
                    (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
                } else {
                    (StatusCode::INTERNAL_SERVER_ERROR, "internal")
                }
            }
        };
        ApiError::new(status, code, super::client_message(&e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code, "message": self.message}}));
        let mut resp = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"vncbroker\", charset=\"UTF-8\""),
            );
        }
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Reads HTTP Basic credentials.
fn credential(headers: &HeaderMap) -> Result<Credential, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(ApiError::unauthorized)?;
    let (scheme, b64) = value.split_once(' ').ok_or_else(ApiError::unauthorized)?;
    if !scheme.eq_ignore_ascii_case("basic") || b64.len() > 8192 {
        return Err(ApiError::unauthorized());
    }
    let raw = STANDARD
        .decode(b64.trim())
        .map_err(|_| ApiError::unauthorized())?;
    let text = String::from_utf8(raw).map_err(|_| ApiError::unauthorized())?;
    Credential::from_session(&text).ok_or_else(ApiError::unauthorized)
}

/// The caller's credentials and address, with a failure charged to the
/// address until the call proves them right: an address whose failed logins
/// are used up gets 429 (after a delay, without anything checked), and one
/// whose budget is taken by logins in progress waits for them, then gets
/// 429 if they take too long.
async fn login(
    state: &ApiState,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(Credential, Attempt, IpAddr), ApiError> {
    let ip = state.client_ip(peer, headers);
    let attempt = match state.limiter.begin(ip).await {
        Ok(a) => a,
        Err(Refused::Spent) => {
            tokio::time::sleep(state.limiter.delay()).await;
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                Refused::Spent.to_string(),
            ));
        }
        Err(Refused::Busy) => {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                Refused::Busy.to_string(),
            )
            .retry_after(1));
        }
    };
    match credential(headers) {
        Ok(cred) => Ok((cred, attempt, ip)),
        Err(e) => {
            // No credential at all is not a guess.
            attempt.refund();
            Err(e)
        }
    }
}

/// Keeps the charge for a wrong credential; refunds it otherwise.
fn settle<T>(attempt: Attempt, result: &Result<T, ServiceError>) {
    match result {
        Err(ServiceError::Inventory(
            InventoryError::Authentication | InventoryError::Oned { code: 0x0100, .. },
        )) => attempt.fail(),
        _ => attempt.refund(),
    }
}

/// An id in the path (`what`: "VM", "session"), or a 400 saying so.
fn path_id(raw: &str, what: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the {what} id must be an integer"),
        )
    })
}

fn vm_id(raw: &str) -> Result<i64, ApiError> {
    path_id(raw, "VM")
}

fn session_id(raw: &str) -> Result<i64, ApiError> {
    path_id(raw, "session")
}

pub async fn mint(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let vm_id = vm_id(&id)?;
    let body = body.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "bad_request"
        };
        ApiError::new(status, code, e.body_text())
    })?;
    let body: MintBody = if body.iter().all(u8::is_ascii_whitespace) {
        MintBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("invalid JSON body: {e}"),
            )
        })?
    };
    let (cred, attempt, ip) = login(&state, peer, &headers).await?;
    let request = MintRequest {
        ttl: body.ttl,
        single_use: body.single_use,
        view_only: body.view_only,
    };
    let minted = crate::auth::CLIENT
        .scope(ip, state.service.mint(&cred, vm_id, request))
        .await;
    settle(attempt, &minted);
    Ok((StatusCode::CREATED, Json(minted?)).into_response())
}

/// Query of `GET /api/v1/vms/{id}/console.vv`: the mint body's fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewerQuery {
    ttl: Option<i64>,
    single_use: Option<bool>,
    #[serde(default)]
    view_only: bool,
}

/// `GET /api/v1/vms/{id}/console.vv`: a remote-viewer file for a SPICE
/// VM, with a new token in it; a VNC VM is refused with 409. A GET, so
/// that a browser link opens the file in remote-viewer.
pub async fn viewer_file(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<ViewerQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let vm_id = vm_id(&id)?;
    let Query(q) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    // A broker whose address no client can reach writes no file, and mints
    // no token for one.
    let no_file = |e: super::vv::VvError| {
        tracing::error!(error = %e, "no remote-viewer file can be written");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("no remote-viewer file: {e}"),
        )
    };
    super::vv::proxy_origin(state.service.public_url()).map_err(no_file)?;
    let (cred, attempt, ip) = login(&state, peer, &headers).await?;
    let request = MintRequest {
        ttl: q.ttl,
        single_use: q.single_use,
        view_only: q.view_only,
    };
    let minted = crate::auth::CLIENT
        .scope(ip, state.service.mint_viewer(&cred, vm_id, request))
        .await;
    settle(attempt, &minted);
    let body = super::vv::file(&minted?, state.service.public_url()).map_err(no_file)?;
    let disposition = format!("attachment; filename=\"{}\"", super::vv::file_name(vm_id));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(super::vv::CONTENT_TYPE),
            ),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition)
                    .unwrap_or(HeaderValue::from_static("attachment")),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response())
}

pub async fn revoke(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let vm_id = vm_id(&id)?;
    let (cred, attempt, ip) = login(&state, peer, &headers).await?;
    let done = crate::auth::CLIENT
        .scope(ip, state.service.revoke(&cred, vm_id))
        .await;
    settle(attempt, &done);
    let done = done?;
    Ok(Json(json!({"revoked": done.tokens, "sessions_ended": done.sessions})).into_response())
}

/// `DELETE /api/v1/sessions/{id}`: ends one live session, on whichever node
/// runs it.
pub async fn end_session(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = session_id(&id)?;
    let (cred, attempt, ip) = login(&state, peer, &headers).await?;
    let done = crate::auth::CLIENT
        .scope(ip, state.service.end_session(&cred, id))
        .await;
    settle(attempt, &done);
    let done = done?;
    Ok(Json(json!({"session": id, "sessions_ended": done.sessions})).into_response())
}

/// Query of `GET /api/v1/sessions`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsQuery {
    vm_id: Option<i64>,
    user: Option<String>,
    since: Option<i64>,
    /// Only live sessions: who is on a VM now, in control or watching.
    #[serde(default)]
    live: bool,
    limit: Option<u32>,
}

/// Most sessions one listing returns.
pub const MAX_SESSIONS_LISTED: u32 = 1000;

pub async fn sessions(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<SessionsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let (cred, attempt, ip) = login(&state, peer, &headers).await?;
    let filter = SessionFilter {
        vm_id: q.vm_id,
        user: q.user,
        since: q.since,
        live: q.live,
        limit: q.limit.unwrap_or(100).min(MAX_SESSIONS_LISTED),
    };
    let list = crate::auth::CLIENT
        .scope(ip, state.service.sessions(&cred, filter))
        .await;
    settle(attempt, &list);
    Ok(Json(json!({ "sessions": list? })).into_response())
}

/// `GET /api/v1/sessions/{id}/recording`: the recording file as written
/// (zstd; `vncbroker recording export` or `zstd -d` decompresses it).
pub async fn recording(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = session_id(&id)?;
    let (cred, attempt, ip) = login(&state, peer, &headers).await?;
    let path = crate::auth::CLIENT
        .scope(ip, state.service.recording(&cred, id))
        .await;
    settle(attempt, &path);
    let file = tokio::fs::File::open(path?).await.map_err(|e| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_recording",
            format!("the recording cannot be read: {e}"),
        )
    })?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/zstd"),
            ),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&format!("attachment; filename=\"session-{id}.vncrec.zst\""))
                    .unwrap_or(HeaderValue::from_static("attachment")),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response())
}

/// `POST /api/v1/sessions/{id}/replay-tokens`: a short-lived token for the
/// replay page, so no credential goes into a URL.
pub async fn replay_token(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = session_id(&id)?;
    let (cred, attempt, ip) = login(&state, peer, &headers).await?;
    let token = crate::auth::CLIENT
        .scope(ip, state.service.replay_token(&cred, id))
        .await;
    settle(attempt, &token);
    Ok((StatusCode::CREATED, Json(token?)).into_response())
}

/// `GET /api/v1/replay/data` with `Authorization: Bearer <replay token>`:
/// the recording decompressed, for the replay page (browsers cannot
/// decompress zstd).
pub async fn replay_data(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ip = state.client_ip(peer, &headers);
    let attempt = state.limiter.begin(ip).await.map_err(|why| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            why.to_string(),
        )
    })?;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        attempt.refund();
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a replay token is needed: Authorization: Bearer <token>",
        ));
    };
    let path = match state.service.replay(token).await {
        Ok(Some(path)) => {
            attempt.refund();
            path
        }
        Ok(None) => {
            attempt.fail();
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the replay token is invalid or has expired; ask for a new one",
            ));
        }
        Err(e) => {
            attempt.refund();
            return Err(e.into());
        }
    };
    // Decompressed on a blocking thread into a pipe whose bound holds it
    // back while the client reads slowly.
    let (rd, wr) = tokio::io::duplex(64 * 1024);
    tokio::task::spawn_blocking(move || {
        let mut out = tokio_util::io::SyncIoBridge::new(wr);
        if let Err(e) = crate::recording::decompress_to(&path, &mut out) {
            tracing::warn!(error = %e, path = %path.display(), "replaying a recording failed");
        }
    });
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(rd));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials() {
        let mut h = HeaderMap::new();
        assert!(credential(&h).is_err());
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic YWxpY2U6cHc6eA=="),
        );
        let c = credential(&h).ok().unwrap();
        assert_eq!((c.user.as_str(), c.secret.as_str()), ("alice", "pw:x"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer YWxpY2U6cHc="),
        );
        assert!(credential(&h).is_err());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert!(credential(&h).is_err());
    }

    #[test]
    fn openapi_document_is_valid_json_with_our_paths() {
        let v: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(v["openapi"].as_str().unwrap().starts_with("3."));
        assert!(v["paths"]["/api/v1/vms/{id}/console-tokens"]["post"].is_object());
        assert!(v["paths"]["/api/v1/vms/{id}/console-tokens"]["delete"].is_object());
        assert!(v["paths"]["/api/v1/vms/{id}/console.vv"]["get"].is_object());
        let token = &v["components"]["schemas"]["ConsoleToken"];
        assert_eq!(
            token["properties"]["protocol"]["enum"],
            json!(["vnc", "spice"])
        );
    }
}
