//! Where a WebSocket request carries its token, parsed without I/O.
//!
//! websockify's convention is the `token` query parameter on any path (stock
//! noVNC sends `vnc.html?path=websockify%3Ftoken%3D...`, which arrives as
//! `/websockify?token=...`). Failing that, a `token` cookie.

/// Longest query or cookie header we look into; longer ones carry no token.
const MAX_SCAN: usize = 8192;

/// The token of a request, from its query string or, failing that, its
/// `Cookie` headers. Empty values count as absent.
pub fn token<'a>(query: Option<&str>, cookies: impl Iterator<Item = &'a [u8]>) -> Option<String> {
    if let Some(t) = query.and_then(from_query) {
        return Some(t);
    }
    cookie("token", cookies)
}

/// The value of cookie `name`, from a request's `Cookie` headers; empty
/// values count as absent.
pub fn cookie<'a>(name: &str, mut cookies: impl Iterator<Item = &'a [u8]>) -> Option<String> {
    cookies.find_map(|raw| from_cookie_header(name, raw))
}

fn from_query(query: &str) -> Option<String> {
    if query.len() > MAX_SCAN {
        return None;
    }
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

/// Reads `name=...` from one Cookie header; malformed pairs are skipped.
fn from_cookie_header(name: &str, raw: &[u8]) -> Option<String> {
    if raw.len() > MAX_SCAN {
        return None;
    }
    let text = std::str::from_utf8(raw).ok()?;
    text.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        if k.trim() != name {
            return None;
        }
        let v = v.trim().trim_matches('"');
        (!v.is_empty()).then(|| v.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(query: Option<&str>, cookies: &[&str]) -> Option<String> {
        token(query, cookies.iter().map(|c| c.as_bytes()))
    }

    #[test]
    fn query_parameter_wins() {
        assert_eq!(t(Some("token=abc"), &["token=zzz"]), Some("abc".into()));
        assert_eq!(t(Some("a=1&token=a%2Db"), &[]), Some("a-b".into()));
    }

    #[test]
    fn cookie_fallback_skips_malformed_pairs() {
        assert_eq!(t(None, &["garbage; x=1; token=abc"]), Some("abc".into()));
        assert_eq!(
            t(Some("other=1"), &["x=1", "token=\"q\""]),
            Some("q".into())
        );
        assert_eq!(t(None, &["token="]), None);
    }

    #[test]
    fn named_cookie() {
        let headers = [
            "a=1; vncbroker_reconnect_ab=t1",
            "vncbroker_reconnect_cd=t2",
        ];
        let get = |name| cookie(name, headers.iter().map(|c| c.as_bytes()));
        assert_eq!(get("vncbroker_reconnect_ab"), Some("t1".into()));
        assert_eq!(get("vncbroker_reconnect_cd"), Some("t2".into()));
        assert_eq!(get("vncbroker_reconnect"), None);
    }

    #[test]
    fn missing_or_empty_is_none() {
        assert_eq!(t(None, &[]), None);
        assert_eq!(t(Some("token="), &[]), None);
        assert_eq!(t(Some(&"token=a".repeat(5000)), &[]), None);
    }
}
