//! The WebSocket opening handshake checks and token extraction: the input
//! is a request head (request line, then header lines).
#![no_main]
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use vncbroker::edge as origin;
use vncbroker::proxy::request;
use vncbroker::websocket::upgrade;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(|b| *b == b' ');
    let method = Method::from_bytes(parts.next().unwrap_or_default()).unwrap_or(Method::GET);
    let target = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let mut headers = HeaderMap::new();
    for line in lines.take(64) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let _ = upgrade::check(&method, &headers);
    let _ = upgrade::is_upgrade(&headers);
    let query = target.split_once('?').map(|(_, q)| q);
    let _ = request::token(query, headers.get_all("cookie").iter().map(|v| v.as_bytes()));
    let policy = origin::Policy {
        public: origin::Origin::parse("https://console.example.com"),
        allowed: vec![],
        allow_missing: true,
    };
    let host = headers.get("host").and_then(|v| v.to_str().ok());
    let _ = policy.check(headers.get("origin").map(|v| v.as_bytes()), host, "https");
    let _ = origin::client_ip(
        "10.0.0.1".parse().unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
        headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()),
        &["10.0.0.1".parse().unwrap_or(std::net::Ipv4Addr::LOCALHOST.into())],
    );
});
