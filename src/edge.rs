//! What the HTTP edge says about a request, decided without I/O: which
//! `Origin` may open a console (the cross-site WebSocket hijacking
//! defence), the client's address through trusted proxies, and the token
//! in a proxy `CONNECT`'s `Proxy-Authorization`.
//!
//! A browser always sends `Origin` on a WebSocket upgrade, so a page on
//! another site cannot ride a user's cookies (or a leaked link) into a
//! console. Non-browser clients usually send none; whether that is allowed
//! is configurable.

use std::net::IpAddr;

use axum::http::HeaderMap;

/// An origin: scheme, host and port, normalised (lower case, default ports
/// made explicit, IPv6 in brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

impl Origin {
    /// Parses `scheme://host[:port]` (an `Origin` header, or the start of a
    /// URL such as `public_url`; a path after the authority is ignored).
    pub fn parse(s: &str) -> Option<Origin> {
        let (scheme, rest) = s.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" | "ws" => 80,
            "https" | "wss" => 443,
            _ => return None,
        };
        let authority = rest.split(['/', '?', '#']).next()?;
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        let (host, port) = split_host_port(authority)?;
        Some(Origin {
            scheme: match scheme.as_str() {
                "ws" => "http".into(),
                "wss" => "https".into(),
                _ => scheme,
            },
            host,
            port: port.unwrap_or(default_port),
        })
    }
}

/// Splits `host[:port]`, with IPv6 literals in brackets.
fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        v6.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse().ok()?),
        };
        (format!("[{}]", v6.to_ascii_lowercase()), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_ascii_lowercase(), Some(p.parse().ok()?)),
            None => (authority.to_ascii_lowercase(), None),
        }
    };
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'));
    valid.then_some((host, port))
}

/// The origin policy, built once from the configuration and never changed
/// by a request.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// The public URL's origin, if one is configured.
    pub public: Option<Origin>,
    /// Further allowed origins.
    pub allowed: Vec<Origin>,
    /// Whether a request without `Origin` (a non-browser client) may connect.
    pub allow_missing: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    #[error("Origin header missing")]
    Missing,
    #[error("Origin header empty or malformed")]
    Malformed,
    #[error("Origin {0} is not allowed")]
    NotAllowed(String),
}

impl Policy {
    /// Decides on a request. `host` is the request's Host header and
    /// `scheme` how the client reached us (`https` with TLS or a trusted
    /// proxy saying so); they define "same origin" only when no public URL
    /// is configured.
    pub fn check(
        &self,
        origin: Option<&[u8]>,
        host: Option<&str>,
        scheme: &str,
    ) -> Result<(), OriginError> {
        let Some(raw) = origin else {
            return if self.allow_missing {
                Ok(())
            } else {
                Err(OriginError::Missing)
            };
        };
        let text = std::str::from_utf8(raw)
            .map_err(|_| OriginError::Malformed)?
            .trim();
        let o = Origin::parse(text).ok_or(OriginError::Malformed)?;
        if self.allowed.contains(&o) {
            return Ok(());
        }
        let same = match &self.public {
            Some(public) => *public == o,
            None => host
                .and_then(|h| Origin::parse(&format!("{scheme}://{h}")))
                .is_some_and(|h| h == o),
        };
        if same {
            Ok(())
        } else {
            let shown: String = text.chars().take(100).collect();
            Err(OriginError::NotAllowed(shown))
        }
    }
}

/// The client's address: the peer, or, when the peer is a trusted reverse
/// proxy, the first address in `X-Forwarded-For` that is not itself
/// trusted, walking from the right (each proxy appends the address it got
/// the request from, so only the right end is vouched for). An entry that
/// is not an address ends the walk at the last trusted hop: what lies left
/// of it cannot be told from what a client wrote.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let Some(list) = forwarded_for else {
        return peer;
    };
    let mut hop = peer;
    for entry in list.rsplit(',') {
        match parse_forwarded_addr(entry) {
            Some(a) if trusted.contains(&a) => hop = a,
            Some(a) => return a,
            None => return hop,
        }
    }
    hop
}

/// An `X-Forwarded-For` entry: an address, optionally with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`) or in brackets.
fn parse_forwarded_addr(entry: &str) -> Option<IpAddr> {
    let e = entry.trim();
    if let Ok(a) = e.parse::<IpAddr>() {
        return Some(a);
    }
    if let Ok(sa) = e.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    e.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// Every `X-Forwarded-For` line, in order, as one list: a proxy that adds
/// its own line (rather than appending to the client's) must not leave only
/// the client's line read. A line that is not text becomes an entry that
/// is no address.
pub fn forwarded_for(headers: &HeaderMap) -> Option<String> {
    join_lines(headers, "x-forwarded-for")
}

/// The scheme the nearest proxy saw: the last `X-Forwarded-Proto` value.
pub fn forwarded_proto(headers: &HeaderMap) -> Option<String> {
    let all = join_lines(headers, "x-forwarded-proto")?;
    all.rsplit(',').next().map(|p| p.trim().to_owned())
}

fn join_lines(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let text = v.to_str().unwrap_or("?");
        match &mut out {
            Some(o) => {
                o.push(',');
                o.push_str(text);
            }
            None => out = Some(text.to_owned()),
        }
    }
    out
}

/// The client's address of a request, through trusted reverse proxies.
pub fn client_ip_from(peer: IpAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    client_ip(peer, forwarded_for(headers).as_deref(), trusted)
}

/// Longest `Proxy-Authorization` value looked into; a token's is under 100.
const MAX_PROXY_AUTHORIZATION: usize = 1024;

/// The user a `.vv` file's proxy credential names; its password is the
/// token. remote-viewer (GLib's HTTP proxy) sends credentials only when the
/// proxy URL has a password, so the token cannot be the user alone.
pub const PROXY_USER: &str = "vncbroker";

/// The console token in a `Proxy-Authorization` header value: `Basic`
/// with user [`PROXY_USER`] and the token as password, as remote-viewer
/// sends a `.vv` file's `proxy=<scheme>://vncbroker:<token>@...`; or the
/// token as user with no password (`curl -x`-style). Anything else (another
/// scheme, another user, malformed base64) gives `None`; whether the text
/// is a token is for the caller to check.
pub fn proxy_credential(header: &[u8]) -> Option<String> {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    if header.len() > MAX_PROXY_AUTHORIZATION {
        return None;
    }
    let text = std::str::from_utf8(header).ok()?.trim();
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = STANDARD.decode(encoded.trim()).ok()?;
    let pair = String::from_utf8(raw).ok()?;
    let token = match pair.split_once(':') {
        Some((PROXY_USER, token)) => token,
        Some((token, "")) => token,
        Some(_) => return None,
        None => pair.as_str(),
    };
    (!token.is_empty()).then(|| token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(public: Option<&str>, allowed: &[&str], allow_missing: bool) -> Policy {
        Policy {
            public: public.and_then(Origin::parse),
            allowed: allowed.iter().filter_map(|a| Origin::parse(a)).collect(),
            allow_missing,
        }
    }

    #[test]
    fn proxy_credentials_as_remote_viewer_sends_them() {
        use base64::Engine;
        use base64::engine::general_purpose::STANDARD;
        let token = "0123456789abcdef".repeat(4);
        let basic = |s: &str| format!("Basic {}", STANDARD.encode(s));
        assert_eq!(
            proxy_credential(basic(&format!("{token}:")).as_bytes()),
            Some(token.clone())
        );
        assert_eq!(
            proxy_credential(basic(&token).as_bytes()),
            Some(token.clone())
        );
        // What remote-viewer sends for a `.vv` file.
        assert_eq!(
            proxy_credential(basic(&format!("vncbroker:{token}")).as_bytes()),
            Some(token.clone())
        );
        let lower = format!("basic  {} ", STANDARD.encode(format!("{token}:")));
        assert_eq!(proxy_credential(lower.as_bytes()), Some(token.clone()));
        // A password with another user is a credential of some other kind.
        assert_eq!(
            proxy_credential(basic(&format!("{token}:pw")).as_bytes()),
            None
        );
        assert_eq!(proxy_credential(basic("vncbroker:").as_bytes()), None);
        for junk in [
            String::new(),
            "Basic".into(),
            "Basic !!!".into(),
            format!("Bearer {}", STANDARD.encode(format!("{token}:"))),
            basic(":"),
            basic(""),
            format!("Basic {}", "A".repeat(2000)),
        ] {
            assert_eq!(proxy_credential(junk.as_bytes()), None, "{junk:?}");
        }
        assert_eq!(proxy_credential(b"Basic \xff\xfe"), None);
    }

    #[test]
    fn parsing_normalises() {
        let o = Origin::parse("HTTPS://Console.Example.COM").unwrap();
        assert_eq!(
            (o.scheme.as_str(), o.host.as_str(), o.port),
            ("https", "console.example.com", 443)
        );
        assert_eq!(Origin::parse("http://a:8080/path?q").unwrap().port, 8080);
        assert_eq!(
            Origin::parse("wss://a").unwrap(),
            Origin::parse("https://a:443").unwrap()
        );
        assert_eq!(Origin::parse("http://[::1]:8640").unwrap().host, "[::1]");
        for bad in [
            "",
            "null",
            "a",
            "ftp://a",
            "http://",
            "http://a:99999",
            "http://u@a",
            "http://[zz]:1",
            "http://a b",
        ] {
            assert!(Origin::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn public_url_decides_same_origin_and_scheme() {
        let p = policy(Some("https://console.example.com"), &[], true);
        assert!(
            p.check(
                Some(b"https://console.example.com"),
                Some("evil.com"),
                "http"
            )
            .is_ok()
        );
        assert!(matches!(
            p.check(
                Some(b"http://console.example.com"),
                Some("console.example.com"),
                "https"
            ),
            Err(OriginError::NotAllowed(_))
        ));
        // A Host header cannot make another origin "same".
        assert!(
            p.check(Some(b"https://evil.com"), Some("evil.com"), "https")
                .is_err()
        );
    }

    #[test]
    fn without_public_url_the_host_header_defines_same_origin() {
        let p = policy(None, &["https://portal.example.org"], true);
        assert!(
            p.check(
                Some(b"http://127.0.0.1:8640"),
                Some("127.0.0.1:8640"),
                "http"
            )
            .is_ok()
        );
        assert!(
            p.check(Some(b"http://[::1]:8640"), Some("[::1]:8640"), "http")
                .is_ok()
        );
        assert!(
            p.check(Some(b"https://portal.example.org"), Some("x"), "http")
                .is_ok()
        );
        assert!(
            p.check(
                Some(b"https://127.0.0.1:8640"),
                Some("127.0.0.1:8640"),
                "http"
            )
            .is_err()
        );
        assert!(
            p.check(
                Some(b"http://127.0.0.1:8641"),
                Some("127.0.0.1:8640"),
                "http"
            )
            .is_err()
        );
    }

    #[test]
    fn missing_empty_and_invalid() {
        assert!(
            policy(None, &[], true)
                .check(None, Some("h"), "http")
                .is_ok()
        );
        assert_eq!(
            policy(None, &[], false).check(None, Some("h"), "http"),
            Err(OriginError::Missing)
        );
        let p = policy(None, &[], true);
        assert_eq!(
            p.check(Some(b""), Some("h"), "http"),
            Err(OriginError::Malformed)
        );
        assert_eq!(
            p.check(Some(b"null"), Some("h"), "http"),
            Err(OriginError::Malformed)
        );
        assert_eq!(
            p.check(Some(b"\xff"), Some("h"), "http"),
            Err(OriginError::Malformed)
        );
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let peer: IpAddr = "192.0.2.9".parse().unwrap();
        let trusted = [proxy];
        assert_eq!(client_ip(peer, Some("1.2.3.4"), &trusted), peer);
        assert_eq!(
            client_ip(proxy, Some("1.2.3.4, 5.6.7.8"), &trusted),
            "5.6.7.8".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(proxy, Some("1.2.3.4, 10.0.0.1"), &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(proxy, Some("junk"), &trusted), proxy);
        assert_eq!(client_ip(proxy, None, &trusted), proxy);
        // Junk ends the walk: nothing left of it is believed.
        assert_eq!(client_ip(proxy, Some("1.2.3.4, junk"), &trusted), proxy);
        assert_eq!(
            client_ip(proxy, Some("1.2.3.4, [2001:db8::7]:443"), &trusted),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(proxy, Some("9.9.9.9, 5.6.7.8:1234"), &trusted),
            "5.6.7.8".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn every_forwarded_for_line_is_read_in_order() {
        use axum::http::HeaderValue;
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let mut h = HeaderMap::new();
        // The client's own line first, the proxy's line after it.
        h.append("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.append("x-forwarded-for", HeaderValue::from_static("198.51.100.7"));
        assert_eq!(
            forwarded_for(&h).as_deref(),
            Some("203.0.113.9,198.51.100.7")
        );
        assert_eq!(
            client_ip_from(proxy, &h, &[proxy]),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        // Not from a trusted proxy: the header means nothing.
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(client_ip_from(peer, &h, &[proxy]), peer);
        // A line that is not text stops the walk.
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.append("x-forwarded-for", HeaderValue::from_bytes(b"\xff").unwrap());
        assert_eq!(client_ip_from(proxy, &h, &[proxy]), proxy);

        let mut h = HeaderMap::new();
        h.append("x-forwarded-proto", HeaderValue::from_static("https"));
        h.append("x-forwarded-proto", HeaderValue::from_static("http"));
        assert_eq!(forwarded_proto(&h).as_deref(), Some("http"));
    }
}
