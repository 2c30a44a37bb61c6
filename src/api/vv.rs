//! Remote-viewer (`.vv`) files for SPICE consoles.
//!
//! The file sends virt-viewer through the broker as an HTTP proxy: it opens
//! `CONNECT vm-<id>:5900` on the broker's own listener with the token as the
//! proxy password (of user `vncbroker`: remote-viewer sends no credential
//! without a password), and the broker ignores the CONNECT target, taking the console
//! from the token. The SPICE password stays with the broker, so the file has
//! none; [`crate::edge::proxy_credential`] reads the token back out of the
//! `Proxy-Authorization` header.

use crate::edge::Origin;
use crate::service::ViewerMint;

/// The MIME type virt-viewer is registered for.
pub const CONTENT_TYPE: &str = "application/x-virt-viewer";

/// The placeholder port in `port=`: the broker never dials it.
const PLACEHOLDER_PORT: u16 = 5900;

/// Why no file can be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VvError {
    /// The broker's public URL is not `http(s)://host[:port]`.
    #[error("public_url {0:?} is not an http:// or https:// URL with a host")]
    PublicUrl(String),
    /// The broker's address is a wildcard, which no client can reach.
    #[error(
        "the broker's address {0} is a wildcard that remote-viewer cannot reach; set public_url"
    )]
    Wildcard(String),
    /// The token has characters that virt-viewer's URL parsing changes.
    #[error("the token is not in the lowercase form remote-viewer files need")]
    TokenForm,
}

/// The proxy a file names: `public_url`'s scheme, host and port (a path is
/// ignored, since CONNECT goes to the listener itself). Callers check it
/// before minting, so that no token is made for a file that cannot be.
pub fn proxy_origin(public_url: &str) -> Result<Origin, VvError> {
    let origin = Origin::parse(public_url.trim())
        .ok_or_else(|| VvError::PublicUrl(public_url.to_owned()))?;
    if matches!(origin.host.as_str(), "0.0.0.0" | "[::]") {
        return Err(VvError::Wildcard(origin.host));
    }
    Ok(origin)
}

/// The `.vv` file of a minted SPICE token, to be fetched through the broker
/// at `public_url`.
pub fn file(mint: &ViewerMint, public_url: &str) -> Result<String, VvError> {
    let origin = proxy_origin(public_url)?;
    let m = &mint.minted;
    let token_ok = m
        .token
        .bytes()
        .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
    if !token_ok || m.token.is_empty() {
        return Err(VvError::TokenForm);
    }
    let on_off = |b: bool| if b { 1 } else { 0 };
    let usb = on_off(mint.policy.usb_redirect && !mint.policy.view_only);
    // The port is always written: without one, virt-viewer takes 3128 for
    // http and 3129 for https, the usual proxy ports.
    Ok(format!(
        "[virt-viewer]\n\
         type=spice\n\
         host=vm-{id}\n\
         port={PLACEHOLDER_PORT}\n\
         proxy={scheme}://{user}:{token}@{host}:{port}\n\
         title=VM {id}{mode}\n\
         delete-this-file=1\n\
         toggle-fullscreen=shift+f11\n\
         release-cursor=shift+f12\n\
         secure-attention=ctrl+alt+end\n\
         enable-usbredir={usb}\n\
         enable-usb-autoshare=0\n\
         enable-smartcard=0\n",
        id = m.vm_id,
        scheme = origin.scheme,
        user = crate::edge::PROXY_USER,
        token = m.token,
        host = origin.host,
        port = origin.port,
        mode = if m.view_only { " (view only)" } else { "" },
    ))
}

/// The file name a browser saves the file under.
pub fn file_name(vm_id: i64) -> String {
    format!("vm-{vm_id}.vv")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::SessionPolicy;
    use crate::protocol::Protocol;
    use crate::service::Minted;

    fn mint(token: &str, view_only: bool, usb: bool) -> ViewerMint {
        ViewerMint {
            minted: Minted {
                token: token.into(),
                url: String::new(),
                path: String::new(),
                expires_at: 0,
                ttl: 60,
                vm_id: 7,
                single_use: true,
                view_only,
                protocol: Protocol::Spice,
            },
            policy: SessionPolicy {
                view_only,
                usb_redirect: usb,
                ..SessionPolicy::default()
            },
        }
    }

    fn keys(vv: &str) -> Vec<(&str, &str)> {
        vv.lines()
            .skip(1)
            .filter_map(|l| l.split_once('='))
            .collect()
    }

    #[test]
    fn the_file_names_the_broker_as_proxy_with_the_token_and_no_password() {
        let token = "0a1b".repeat(16);
        let vv = file(&mint(&token, false, false), "https://Console.Example.com/").unwrap();
        assert!(vv.starts_with("[virt-viewer]\n"), "{vv}");
        let k = keys(&vv);
        let get = |name: &str| k.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
        assert_eq!(get("type"), Some("spice"));
        assert_eq!(get("host"), Some("vm-7"));
        assert_eq!(get("port"), Some("5900"));
        assert_eq!(
            get("proxy"),
            Some(format!("https://{token}@console.example.com:443").as_str())
        );
        assert_eq!(get("delete-this-file"), Some("1"));
        assert_eq!(get("enable-usbredir"), Some("0"));
        assert!(get("password").is_none(), "{vv}");
        assert!(!vv.contains("password"), "{vv}");
        let vv = file(&mint(&token, false, true), "http://10.0.0.5:8640/broker").unwrap();
        assert!(
            vv.contains(&format!("\nproxy=http://vncbroker:{token}@10.0.0.5:8640\n")),
            "{vv}"
        );
        assert!(vv.contains("\nenable-usbredir=1\n"), "{vv}");
        let vv = file(&mint(&token, true, true), "http://[2001:db8::1]:8640").unwrap();
        assert!(vv.contains("@[2001:db8::1]:8640\n"), "{vv}");
        assert!(vv.contains("(view only)") && vv.contains("enable-usbredir=0"));
    }

    #[test]
    fn no_file_without_a_reachable_broker_or_with_a_mixed_case_token() {
        let token = "0a1b".repeat(16);
        assert!(matches!(
            file(&mint(&token, false, false), "ftp://x"),
            Err(VvError::PublicUrl(_))
        ));
        assert!(matches!(
            file(&mint(&token, false, false), "http://0.0.0.0:8640"),
            Err(VvError::Wildcard(_))
        ));
        assert!(matches!(
            file(&mint(&token, false, false), "http://[::]:8640"),
            Err(VvError::Wildcard(_))
        ));
        assert_eq!(
            file(&mint("AbC-_", false, false), "http://h:1"),
            Err(VvError::TokenForm)
        );
    }
}
