//! The opening handshake (RFC 6455 section 4.2), without I/O.

use axum::http::{HeaderMap, Method, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest, Sha1};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// What the 101 answer carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    /// The `Sec-WebSocket-Accept` value.
    pub key: String,
    /// `binary` when the client offered it (websockify's convention);
    /// noVNC 1.2 and later offers none.
    pub protocol: Option<&'static str>,
}

/// Why a request cannot be upgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    #[error("WebSocket upgrades use GET")]
    Method,
    #[error("not a WebSocket upgrade request")]
    NotUpgrade,
    #[error("only WebSocket version 13 is supported")]
    Version,
    #[error("missing or malformed Sec-WebSocket-Key")]
    Key,
}

impl UpgradeError {
    pub fn status(self) -> StatusCode {
        match self {
            UpgradeError::Method => StatusCode::METHOD_NOT_ALLOWED,
            UpgradeError::NotUpgrade | UpgradeError::Version => StatusCode::UPGRADE_REQUIRED,
            UpgradeError::Key => StatusCode::BAD_REQUEST,
        }
    }
}

/// Whether the request asks for a WebSocket at all (so other paths can
/// tell a WebSocket client from a stray browser request).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    has_token(headers, header::CONNECTION, "upgrade")
        && has_token(headers, header::UPGRADE, "websocket")
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, want: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(want)))
            .unwrap_or(false)
    })
}

/// Checks an upgrade request and computes the answer.
impl Accept {
    /// The 101 answer that completes this upgrade.
    pub fn response(&self) -> axum::http::Response<axum::body::Body> {
        use axum::http::HeaderValue;
        let mut resp = axum::http::Response::new(axum::body::Body::empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Ok(v) = HeaderValue::from_str(&self.key) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        if let Some(p) = self.protocol {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
        }
        resp
    }
}

pub fn check(method: &Method, headers: &HeaderMap) -> Result<Accept, UpgradeError> {
    if method != Method::GET {
        return Err(UpgradeError::Method);
    }
    if !is_upgrade(headers) {
        return Err(UpgradeError::NotUpgrade);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(UpgradeError::Version);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|v| v.as_bytes())
        .ok_or(UpgradeError::Key)?;
    // The key is 16 random bytes, base64: 24 characters.
    if key.len() != 24 || STANDARD.decode(key).map(|k| k.len()) != Ok(16) {
        return Err(UpgradeError::Key);
    }
    let protocol = has_token(headers, header::SEC_WEBSOCKET_PROTOCOL, "binary").then_some("binary");
    Ok(Accept {
        key: accept_key(key),
        protocol,
    })
}

/// `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID.as_bytes());
    STANDARD.encode(sha.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    const GOOD: &[(&str, &str)] = &[
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn rfc_example_key() {
        let a = check(&Method::GET, &headers(GOOD)).unwrap();
        assert_eq!(a.key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(a.protocol, None);
    }

    #[test]
    fn binary_subprotocol_is_echoed_only_when_offered() {
        let mut h = headers(GOOD);
        h.append(
            "sec-websocket-protocol",
            HeaderValue::from_static("base64, binary"),
        );
        assert_eq!(check(&Method::GET, &h).unwrap().protocol, Some("binary"));
        let mut h = headers(GOOD);
        h.append("sec-websocket-protocol", HeaderValue::from_static("base64"));
        assert_eq!(check(&Method::GET, &h).unwrap().protocol, None);
    }

    #[test]
    fn refusals() {
        assert_eq!(
            check(&Method::POST, &headers(GOOD)),
            Err(UpgradeError::Method)
        );
        assert_eq!(
            check(&Method::GET, &headers(&GOOD[1..])),
            Err(UpgradeError::NotUpgrade)
        );
        let mut v8 = headers(&[GOOD[0], GOOD[1], GOOD[3]]);
        v8.append("sec-websocket-version", HeaderValue::from_static("8"));
        assert_eq!(check(&Method::GET, &v8), Err(UpgradeError::Version));
        assert_eq!(
            check(&Method::GET, &headers(&GOOD[..3])),
            Err(UpgradeError::Key)
        );
        let mut bad = headers(&GOOD[..3]);
        bad.append(
            "sec-websocket-key",
            HeaderValue::from_static("not base64 at all!!!!!!!"),
        );
        assert_eq!(check(&Method::GET, &bad), Err(UpgradeError::Key));
        assert_eq!(UpgradeError::Version.status(), StatusCode::UPGRADE_REQUIRED);
    }
}
