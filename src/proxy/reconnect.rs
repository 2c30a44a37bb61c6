//! Reconnect tickets: how a single-use token's console survives a dropped
//! connection.
//!
//! The console page asks `POST /console/session` (the token in a JSON body)
//! before it connects, to learn which protocol the console speaks (noVNC or
//! spice-html5 opens it), and once its session is up, what it may show: the
//! session's rules, when it ends, and for a single-use token, a ticket. The ticket travels only as
//! an `HttpOnly; Secure; SameSite=Strict` cookie on `/websockify`, so page
//! scripts and URLs never see it; only its hash is stored. When the session's
//! connection drops (not when it is closed, revoked or timed out), the
//! ticket reopens the console once, from the same address, within
//! `proxy.reconnect_grace_secs`; the new session row names the one it
//! continues. A revocation voids it: the token it belongs to must still open
//! consoles.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};

use super::Proxy;
use super::relay::End;
use super::sessions::Stop;
use crate::edge;
use crate::limits::Refused;
use crate::protocol::Protocol;
use crate::token::{self, TokenHash};

/// Largest request body: a token and a little JSON.
const MAX_BODY: usize = 4096;

/// The cookie that holds the ticket for one token's console: named by the
/// token's hash, so two consoles in one browser keep their own.
pub fn cookie_name(token: &TokenHash) -> String {
    format!("vncbroker_reconnect_{}", hex::encode(&token[..8]))
}

/// The `Set-Cookie` value for a ticket, kept no longer than its token.
fn set_cookie(name: &str, ticket: &str, max_age: i64) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "{name}={ticket}; Path=/websockify; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
        max_age.max(0)
    ))
    .ok()
}

/// Whether a session ended so that its console should come back: its
/// connection went away, or this node is shutting down. A close by the
/// browser, the VM or the broker's own rules is final.
pub fn is_drop(end: &End) -> bool {
    matches!(
        end,
        End::ClientLost | End::PongTimeout | End::WriteTimeout | End::Stopped(Stop::Shutdown)
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ask {
    token: String,
}

/// The answer to the console page.
#[derive(Serialize)]
struct Told {
    /// `vnc` or `spice`, fixed when the token was minted.
    protocol: Protocol,
    view_only: bool,
    clipboard: &'static str,
    single_use: bool,
    expires_at: i64,
    /// When the broker will end the session (its time limit, or its token's
    /// expiry where sessions end with it); `null`: no limit.
    ends_at: Option<i64>,
    /// Whether this answer set a reconnect ticket.
    reconnect_ticket: bool,
    /// How long a dropped console may come back.
    reconnect_grace_secs: u64,
}

fn refuse(status: StatusCode, why: &str) -> Response<Body> {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "error": why }).to_string(),
    )
        .into_response()
}

/// `POST /console/session`: what the console page is told once its session
/// is up, with a reconnect ticket for a single-use token.
pub async fn console_session(
    State(proxy): State<Arc<Proxy>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let set = &proxy.settings;
    let client = edge::client_ip_from(peer.ip(), &headers, &set.trusted_proxies);
    let trusted = set.trusted_proxies.contains(&peer.ip());
    let scheme = match edge::forwarded_proto(&headers).filter(|_| trusted) {
        Some(p) if p.eq_ignore_ascii_case("https") => "https",
        Some(_) => "http",
        None if set.tls => "https",
        None => "http",
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    // Only a page the proxy would let open the console may ask about it.
    if set
        .origins
        .check(
            headers.get(header::ORIGIN).map(|v| v.as_bytes()),
            host,
            scheme,
        )
        .is_err()
    {
        return refuse(StatusCode::FORBIDDEN, "origin not allowed");
    }
    if body.len() > MAX_BODY {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    }
    let ask: Ask = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                &format!("expected a JSON object {{\"token\": \"...\"}}: {e}"),
            );
        }
    };
    let attempt = match set.limiter.begin(client).await {
        Ok(a) => a,
        Err(why) => {
            if why == Refused::Spent {
                tokio::time::sleep(set.limiter.delay()).await;
            }
            return refuse(StatusCode::TOO_MANY_REQUESTS, &why.to_string());
        }
    };
    let answer = proxy.service.console_session(&ask.token, client).await;
    let session = match answer {
        Ok(Some(s)) => {
            attempt.refund();
            s
        }
        Ok(None) => {
            attempt.fail();
            return refuse(StatusCode::UNAUTHORIZED, "token invalid or expired");
        }
        Err(e) => {
            attempt.refund();
            tracing::warn!(%client, error = %e, "console session answer failed");
            let status = if e.is_unavailable() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            return refuse(status, "console service unavailable, try again shortly");
        }
    };
    let ends_at = [
        session
            .started_at
            .zip(set.max_session)
            .map(|(start, max)| start.saturating_add(max.as_secs() as i64)),
        set.end_at_token_expiry.then_some(session.expires_at),
    ]
    .into_iter()
    .flatten()
    .min();
    let ticket = session.ticket.filter(|_| set.reconnect_grace > 0);
    let told = Told {
        protocol: session.protocol,
        view_only: session.view_only,
        clipboard: session.clipboard,
        single_use: session.single_use,
        expires_at: session.expires_at,
        ends_at,
        reconnect_ticket: ticket.is_some(),
        reconnect_grace_secs: set.reconnect_grace,
    };
    let mut response = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        serde_json::to_string(&told).unwrap_or_default(),
    )
        .into_response();
    if let Some(ticket) = ticket {
        let name = cookie_name(&token::hash_token(&ask.token));
        let max_age = session.expires_at - crate::now_unix();
        if let Some(v) = set_cookie(&name, &ticket, max_age) {
            response.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_is_out_of_scripts_and_other_paths() {
        let name = cookie_name(&[7u8; 32]);
        assert_eq!(name, "vncbroker_reconnect_0707070707070707");
        let v = set_cookie(&name, "abc", 90).unwrap();
        let v = v.to_str().unwrap();
        for part in [
            "HttpOnly",
            "Secure",
            "SameSite=Strict",
            "Path=/websockify",
            "Max-Age=90",
        ] {
            assert!(v.contains(part), "{v} lacks {part}");
        }
        assert!(
            set_cookie(&name, "abc", -5)
                .unwrap()
                .to_str()
                .unwrap()
                .contains("Max-Age=0")
        );
    }

    #[test]
    fn the_answer_names_the_protocol() {
        for (protocol, said) in [(Protocol::Vnc, "vnc"), (Protocol::Spice, "spice")] {
            let told = Told {
                protocol,
                view_only: true,
                clipboard: "none",
                single_use: true,
                expires_at: 100,
                ends_at: None,
                reconnect_ticket: true,
                reconnect_grace_secs: 30,
            };
            let json: serde_json::Value = serde_json::to_value(&told).unwrap();
            assert_eq!(json["protocol"], said);
            assert_eq!(json["view_only"], true);
            assert_eq!(json["ends_at"], serde_json::Value::Null);
            // What the page reads, and nothing else (the ticket is a cookie).
            let mut keys: Vec<&str> = json
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.as_str())
                .collect();
            keys.sort_unstable();
            assert_eq!(
                keys,
                [
                    "clipboard",
                    "ends_at",
                    "expires_at",
                    "protocol",
                    "reconnect_grace_secs",
                    "reconnect_ticket",
                    "single_use",
                    "view_only"
                ]
            );
        }
    }

    #[test]
    fn only_drops_come_back() {
        assert!(is_drop(&End::ClientLost));
        assert!(is_drop(&End::PongTimeout));
        assert!(is_drop(&End::Stopped(Stop::Shutdown)));
        assert!(!is_drop(&End::ClientClosed));
        assert!(!is_drop(&End::ServerClosed));
        assert!(!is_drop(&End::MaxDuration));
        assert!(!is_drop(&End::TokenExpired));
        assert!(!is_drop(&End::Idle));
        assert!(!is_drop(&End::Stopped(Stop::Revoked(
            crate::store::Cause::Revoked
        ))));
    }
}
