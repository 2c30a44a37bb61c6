//! The console page: `GET /console` opens a VM's screen in the browser with
//! noVNC's RFB module, for the token in the URL fragment (`#token=...`) or
//! query (`?token=...`). `GET /replay` plays a session recording
//! (the `recording` module) with the same RFB module, for a replay token in
//! the fragment.
//!
//! The page (`web/`) and the noVNC modules it imports (`vendor/novnc/`, a
//! copy of the `@novnc/novnc` npm package pinned in `package-lock.json`) are
//! built into the binary and served from memory, so the binary alone serves
//! a working console. `proxy.web_root` and `proxy.novnc_root` replace either
//! with a directory (a restyled page, another noVNC); files are then served
//! only from inside it: no listings, no `..` or hidden names, and a symlink
//! that leads outside is not followed. For a SPICE console the page loads
//! spice-html5 instead (`vendor/spice-html5/`, from Debian's package, with
//! its licences), built in the same way under `/spice-html5/`.
//!
//! Caching: the built-in noVNC under `/novnc/<version>/` and spice-html5
//! under `/spice-html5/<version>/` are immutable, as the version names the
//! content; the page's assets (`/static/`), noVNC under `/novnc/` and
//! spice-html5 under `/spice-html5/` are revalidated with their ETag; the
//! page itself is never stored, as its URL carries the token (the replay
//! page likewise).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use sha2::{Digest, Sha256};

// WEB_FILES, NOVNC_FILES, SPICE_FILES (path, contents), NOVNC_VERSION and
// SPICE_VERSION, from build.rs.
include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// Largest file served from an override directory.
const MAX_FILE: u64 = 8 << 20;

/// For what never changes under its URL.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// For what may change under its URL: ask again, cheaply, with the ETag.
const REVALIDATE: &str = "no-cache";

/// An override directory that cannot serve the console.
#[derive(Debug, thiserror::Error)]
#[error("proxy.{key} = {dir:?}: {why}; unset {key} to serve the copy built into the binary")]
pub struct OverrideError {
    pub key: &'static str,
    pub dir: String,
    pub why: String,
}

/// Routes for the pages (`/console`, `/replay`), their assets (`/static/`),
/// noVNC (`/novnc/`), from the binary or from the override directories, and
/// spice-html5 (`/spice-html5/`), from the binary.
pub fn router(
    web_root: Option<&str>,
    novnc_root: Option<&str>,
    frame_ancestors: &[crate::edge::Origin],
) -> Result<Router, OverrideError> {
    let web = Files::new(WEB_FILES, web_root, "web_root", "console.html")?;
    let novnc = Files::new(NOVNC_FILES, novnc_root, "novnc_root", "core/rfb.js")?;
    let spice = Files::built_in(SPICE_FILES);
    tracing::info!(
        page = %web.describe(),
        novnc = %novnc.describe(),
        novnc_version = NOVNC_VERSION,
        spice_html5_version = SPICE_VERSION,
        "console page"
    );
    Ok(Router::new()
        .route("/console", get(console_page))
        .route("/replay", get(replay_page))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/static/{*path}", get(static_file))
        .route("/novnc/{*path}", get(novnc_file))
        .route("/spice-html5/{*path}", get(spice_file))
        .with_state(Arc::new(Console {
            web,
            novnc,
            spice,
            framing: Framing::of(frame_ancestors),
        })))
}

struct Console {
    web: Files,
    novnc: Files,
    spice: Files,
    framing: Framing,
}

/// Who may frame the pages: this origin, and the portals in
/// `proxy.allowed_origins`, as a CSP `frame-ancestors`; nothing else.
struct Framing {
    csp: HeaderValue,
    /// Only this origin: X-Frame-Options says so too, for old browsers.
    same_origin_only: bool,
}

impl Framing {
    fn of(origins: &[crate::edge::Origin]) -> Framing {
        let mut csp = String::from("frame-ancestors 'self'");
        for o in origins {
            csp.push_str(&format!(" {}://{}:{}", o.scheme, o.host, o.port));
        }
        Framing {
            // Origins are validated by their parser: no spaces or quotes.
            csp: HeaderValue::from_str(&csp)
                .unwrap_or(HeaderValue::from_static("frame-ancestors 'self'")),
            same_origin_only: origins.is_empty(),
        }
    }
}

/// A file as it is served: its bytes, type and validator.
#[derive(Clone)]
struct Asset {
    body: Bytes,
    content_type: &'static str,
    etag: HeaderValue,
}

impl Asset {
    fn new(name: &str, body: Bytes) -> Asset {
        let digest = Sha256::digest(&body);
        let etag = format!("\"{}\"", hex::encode(&digest[..16]));
        Asset {
            content_type: content_type(name),
            etag: HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\"")),
            body,
        }
    }
}

/// Where one set of files comes from.
enum Files {
    /// Built into the binary.
    Embedded(HashMap<&'static str, Asset>),
    /// An operator's directory, read on each request so edits show at once.
    Dir(Root),
}

impl Files {
    fn new(
        built_in: &'static [(&'static str, &'static [u8])],
        dir: Option<&str>,
        key: &'static str,
        needed: &str,
    ) -> Result<Files, OverrideError> {
        let Some(dir) = dir else {
            return Ok(Files::built_in(built_in));
        };
        let fail = |why: String| OverrideError {
            key,
            dir: dir.to_owned(),
            why,
        };
        let root = Root::new(dir).map_err(fail)?;
        if root.resolve_sync(needed).is_none() {
            return Err(fail(format!("it holds no {needed}")));
        }
        Ok(Files::Dir(root))
    }

    fn built_in(files: &'static [(&'static str, &'static [u8])]) -> Files {
        let files = files
            .iter()
            .map(|(name, body)| (*name, Asset::new(name, Bytes::from_static(body))))
            .collect();
        Files::Embedded(files)
    }

    fn is_embedded(&self) -> bool {
        matches!(self, Files::Embedded(_))
    }

    fn describe(&self) -> String {
        match self {
            Files::Embedded(_) => "built in".to_owned(),
            Files::Dir(root) => root.canonical.display().to_string(),
        }
    }

    async fn get(&self, rel: &str) -> Option<Asset> {
        if !plain_path(rel) {
            return None;
        }
        match self {
            Files::Embedded(files) => files.get(rel).cloned(),
            Files::Dir(root) => root.read(rel).await,
        }
    }
}

/// Whether a request path names a file the way the servers here allow:
/// non-empty parts, none hidden (so no `.` or `..`), no backslash or NUL.
fn plain_path(rel: &str) -> bool {
    rel.split('/').all(|part| {
        !(part.is_empty()
            || part.starts_with('.')
            || part.contains(['\\', '\0'])
            || part.len() > 255)
    })
}

/// A directory files are served from, resolved once.
struct Root {
    canonical: PathBuf,
}

impl Root {
    fn new(dir: &str) -> Result<Root, String> {
        let canonical = std::fs::canonicalize(dir).map_err(|e| e.to_string())?;
        if !canonical.is_dir() {
            return Err("not a directory".to_owned());
        }
        Ok(Root { canonical })
    }

    fn join(&self, rel: &str) -> Option<PathBuf> {
        if !plain_path(rel) {
            return None;
        }
        let mut path = self.canonical.clone();
        path.extend(rel.split('/'));
        Some(path)
    }

    /// Symlinks are resolved, then the result must still be inside, and a
    /// regular file no larger than [`MAX_FILE`].
    fn contained(&self, real: PathBuf, meta: &std::fs::Metadata) -> Option<PathBuf> {
        (real.starts_with(&self.canonical) && meta.is_file() && meta.len() <= MAX_FILE)
            .then_some(real)
    }

    /// The file for a request path, if it is a regular file inside the root.
    async fn resolve(&self, rel: &str) -> Option<PathBuf> {
        let real = tokio::fs::canonicalize(self.join(rel)?).await.ok()?;
        let meta = tokio::fs::metadata(&real).await.ok()?;
        self.contained(real, &meta)
    }

    fn resolve_sync(&self, rel: &str) -> Option<PathBuf> {
        let real = std::fs::canonicalize(self.join(rel)?).ok()?;
        let meta = std::fs::metadata(&real).ok()?;
        self.contained(real, &meta)
    }

    async fn read(&self, rel: &str) -> Option<Asset> {
        let file = self.resolve(rel).await?;
        let body = tokio::fs::read(&file).await.ok()?;
        Some(Asset::new(rel, Bytes::from(body)))
    }
}

fn content_type(name: &str) -> &'static str {
    let ext = Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("");
    match ext {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

async fn console_page(State(console): State<Arc<Console>>) -> Response {
    page(&console, "console.html").await
}

/// The replay of a session recording; its URL carries a token too.
async fn replay_page(State(console): State<Arc<Console>>) -> Response {
    page(&console, "replay.html").await
}

async fn page(console: &Console, name: &'static str) -> Response {
    let Some(html) = console.web.get(name).await else {
        tracing::error!(dir = %console.web.describe(), page = name, "page missing");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{name} is missing from proxy.web_root"),
        )
            .into_response();
    };
    let mut resp = (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Its URL carries the token: keep no copy anywhere.
            (header::CACHE_CONTROL, "no-store"),
            // The token travels in the fragment; never leak the URL onward.
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        html.body,
    )
        .into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, console.framing.csp.clone());
    if console.framing.same_origin_only {
        headers.insert(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("SAMEORIGIN"),
        );
    }
    resp
}

async fn static_file(
    State(console): State<Arc<Console>>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    send(console.web.get(&path).await, REVALIDATE, &headers)
}

/// `/novnc/<version>/...` for the version built in, and `/novnc/...` for
/// pages that import noVNC without one.
async fn novnc_file(
    State(console): State<Arc<Console>>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    versioned(&console.novnc, NOVNC_VERSION, &path, &headers).await
}

/// `/spice-html5/<version>/...` and `/spice-html5/...`, as for noVNC.
async fn spice_file(
    State(console): State<Arc<Console>>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    versioned(&console.spice, SPICE_VERSION, &path, &headers).await
}

/// A file of `files` under `<version>/` (cached for good when built in) or
/// under no version (revalidated).
async fn versioned(files: &Files, version: &str, path: &str, headers: &HeaderMap) -> Response {
    let under_version = path
        .strip_prefix(version)
        .and_then(|rest| rest.strip_prefix('/'));
    let (rel, caching) = match under_version {
        // An override's content is not known to match the version.
        Some(rel) if files.is_embedded() => (rel, IMMUTABLE),
        Some(rel) => (rel, REVALIDATE),
        None => (path, REVALIDATE),
    };
    send(files.get(rel).await, caching, headers)
}

/// The file, or 304 when the request's `If-None-Match` names its ETag.
fn send(asset: Option<Asset>, caching: &'static str, request: &HeaderMap) -> Response {
    let Some(asset) = asset else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let common = [
        (header::ETAG, asset.etag.clone()),
        (header::CACHE_CONTROL, HeaderValue::from_static(caching)),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
    ];
    if etag_matches(request, &asset.etag) {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        )],
        asset.body,
    )
        .into_response()
}

/// `If-None-Match` compares weakly: `W/"x"` matches `"x"`, and `*` anything.
fn etag_matches(request: &HeaderMap, etag: &HeaderValue) -> bool {
    let Ok(etag) = etag.to_str() else {
        return false;
    };
    request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// Paths that begin with `//` are refused with 400: they are the shape of
/// open-redirect and path-confusion tricks, and nothing here lives there.
pub async fn reject_odd_paths(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.uri().path().starts_with("//") {
        return (StatusCode::BAD_REQUEST, "bad path").into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    struct Got {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Got {
        fn header(&self, name: header::HeaderName) -> &str {
            self.headers
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        }
    }

    async fn get(app: &Router, path: &str, if_none_match: Option<&str>) -> Got {
        let mut req = axum::http::Request::get(path);
        if let Some(tag) = if_none_match {
            req = req.header(header::IF_NONE_MATCH, tag);
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Got {
            status,
            headers,
            body,
        }
    }

    fn built_in(list: &[(&str, &[u8])], name: &str) -> Bytes {
        let (_, body) = list.iter().find(|(n, _)| *n == name).unwrap();
        Bytes::copy_from_slice(body)
    }

    #[tokio::test]
    async fn built_in_files_with_their_types_and_caching() {
        let app = router(None, None, &[]).unwrap();
        let v = NOVNC_VERSION;

        let page = get(&app, "/console", None).await;
        assert_eq!(page.status, 200);
        assert_eq!(
            page.header(header::CONTENT_TYPE),
            "text/html; charset=utf-8"
        );
        assert_eq!(page.header(header::CACHE_CONTROL), "no-store");
        assert_eq!(page.header(header::REFERRER_POLICY), "no-referrer");
        assert_eq!(page.body, built_in(WEB_FILES, "console.html"));

        for (path, ty) in [
            ("/static/console.js", "text/javascript; charset=utf-8"),
            ("/static/console.css", "text/css; charset=utf-8"),
        ] {
            let r = get(&app, path, None).await;
            assert_eq!(r.status, 200, "{path}");
            assert_eq!(r.header(header::CONTENT_TYPE), ty, "{path}");
            assert_eq!(r.header(header::CACHE_CONTROL), "no-cache", "{path}");
            assert_eq!(r.header(header::X_CONTENT_TYPE_OPTIONS), "nosniff");
            assert!(r.header(header::ETAG).starts_with('"'), "{path}");
        }

        let versioned = get(&app, &format!("/novnc/{v}/core/rfb.js"), None).await;
        assert_eq!(versioned.status, 200);
        assert_eq!(
            versioned.header(header::CONTENT_TYPE),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(versioned.header(header::CACHE_CONTROL), IMMUTABLE);
        assert_eq!(versioned.body, built_in(NOVNC_FILES, "core/rfb.js"));
        // The same file without the version: same validator, revalidated.
        let plain = get(&app, "/novnc/core/rfb.js", None).await;
        assert_eq!(plain.status, 200);
        assert_eq!(plain.header(header::CACHE_CONTROL), "no-cache");
        assert_eq!(plain.header(header::ETAG), versioned.header(header::ETAG));
        let licence = get(&app, &format!("/novnc/{v}/LICENSE.txt"), None).await;
        assert_eq!(
            licence.header(header::CONTENT_TYPE),
            "text/plain; charset=utf-8"
        );

        // Every module the page loads is there, under the version.
        for (name, _) in NOVNC_FILES.iter().filter(|(n, _)| n.ends_with(".js")) {
            let r = get(&app, &format!("/novnc/{v}/{name}"), None).await;
            assert_eq!(r.status, 200, "{name}");
        }

        for missing in [
            "/static/",
            "/static/nope.js",
            "/static/../Cargo.toml",
            "/static/%2e%2e/Cargo.toml",
            "/static/.gitignore",
            "/static/console.js/",
            "/novnc/",
            "/novnc/core",
            "/novnc/core//rfb.js",
            &format!("/novnc/{v}/"),
            &format!("/novnc/{v}/core"),
            "/novnc/0.0.1/core/rfb.js",
            "/novnc/../web/console.js",
        ] {
            assert_eq!(get(&app, missing, None).await.status, 404, "{missing}");
        }
    }

    #[tokio::test]
    async fn built_in_spice_html5_with_its_licences_and_caching() {
        let app = router(None, None, &[]).unwrap();
        let v = SPICE_VERSION;
        assert_eq!(v, "0.3.0");

        let main = get(&app, &format!("/spice-html5/{v}/main.js"), None).await;
        assert_eq!(main.status, 200);
        assert_eq!(
            main.header(header::CONTENT_TYPE),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(main.header(header::CACHE_CONTROL), IMMUTABLE);
        assert_eq!(main.header(header::X_CONTENT_TYPE_OPTIONS), "nosniff");
        assert_eq!(main.body, built_in(SPICE_FILES, "main.js"));
        let body = std::str::from_utf8(&main.body).unwrap();
        assert!(body.contains("export {") && body.contains("SpiceMainConn"));
        // Without the version: the same file, revalidated.
        let plain = get(&app, "/spice-html5/main.js", None).await;
        assert_eq!(plain.status, 200);
        assert_eq!(plain.header(header::CACHE_CONTROL), "no-cache");
        assert_eq!(plain.header(header::ETAG), main.header(header::ETAG));
        let etag = main.header(header::ETAG).to_owned();
        let again = get(&app, &format!("/spice-html5/{v}/main.js"), Some(&etag)).await;
        assert_eq!(again.status, 304);

        // Every module, the third-party ones too, under the version.
        let modules: Vec<&str> = SPICE_FILES
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| n.ends_with(".js"))
            .collect();
        assert!(modules.contains(&"thirdparty/rsa.js"), "{modules:?}");
        assert!(modules.len() > 20, "{modules:?}");
        for name in modules {
            let r = get(&app, &format!("/spice-html5/{v}/{name}"), None).await;
            assert_eq!(r.status, 200, "{name}");
        }

        // The licences, readable in a browser.
        for (name, says) in [
            ("COPYING.txt", "License: LGPL-3"),
            ("COPYING.txt", "License: MIT-with-addition"),
            ("COPYING.txt", "License: BSD-3-clauses"),
            ("LGPL-3.txt", "GNU LESSER GENERAL PUBLIC LICENSE"),
            ("GPL-3.txt", "GNU GENERAL PUBLIC LICENSE"),
        ] {
            let r = get(&app, &format!("/spice-html5/{v}/{name}"), None).await;
            assert_eq!(r.status, 200, "{name}");
            assert_eq!(
                r.header(header::CONTENT_TYPE),
                "text/plain; charset=utf-8",
                "{name}"
            );
            let text = std::str::from_utf8(&r.body).unwrap();
            assert!(text.contains(says), "{name} lacks {says:?}");
        }

        for missing in [
            "/spice-html5/",
            "/spice-html5/spice.html",
            "/spice-html5/thirdparty",
            "/spice-html5/../web/console.js",
            "/spice-html5/0.0.1/main.js",
            &format!("/spice-html5/{v}/"),
            &format!("/spice-html5/{v}/thirdparty//rsa.js"),
        ] {
            assert_eq!(get(&app, missing, None).await.status, 404, "{missing}");
        }
    }

    #[test]
    fn the_page_imports_the_built_in_spice_html5_by_version() {
        let js = built_in(WEB_FILES, "spice.js");
        let js = std::str::from_utf8(&js).unwrap();
        let import = format!("from '/spice-html5/{SPICE_VERSION}/main.js'");
        assert!(js.contains(&import), "web/spice.js lacks {import}");
    }

    #[tokio::test]
    async fn the_replay_page_is_served_like_the_console_page() {
        let app = router(None, None, &[]).unwrap();
        let console = get(&app, "/console", None).await;
        let replay = get(&app, "/replay", None).await;
        assert_eq!(replay.status, 200);
        assert_eq!(replay.body, built_in(WEB_FILES, "replay.html"));
        for name in [
            header::CONTENT_TYPE,
            header::CACHE_CONTROL,
            header::REFERRER_POLICY,
            header::X_CONTENT_TYPE_OPTIONS,
            header::X_FRAME_OPTIONS,
        ] {
            assert!(!replay.header(name.clone()).is_empty(), "{name}");
            assert_eq!(
                replay.header(name.clone()),
                console.header(name.clone()),
                "{name}"
            );
        }
        assert_eq!(replay.header(header::CACHE_CONTROL), "no-store");
        assert!(replay.headers.get(header::ETAG).is_none());
        for path in ["/static/replay.js", "/static/replay.css"] {
            let r = get(&app, path, None).await;
            assert_eq!(r.status, 200, "{path}");
            assert_eq!(r.header(header::CACHE_CONTROL), "no-cache", "{path}");
        }
        let js = built_in(WEB_FILES, "replay.js");
        let js = std::str::from_utf8(&js).unwrap();
        let import = format!("from '/novnc/{NOVNC_VERSION}/core/rfb.js'");
        assert!(js.contains(&import), "web/replay.js lacks {import}");

        // An override without a replay page says so, and still serves the
        // console.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("console.html"), "<p>restyled</p>").unwrap();
        let app = router(Some(dir.path().to_str().unwrap()), None, &[]).unwrap();
        assert_eq!(get(&app, "/replay", None).await.status, 503);
        assert_eq!(get(&app, "/console", None).await.status, 200);
    }

    #[tokio::test]
    async fn only_this_origin_and_the_allowed_portals_may_frame_the_pages() {
        let alone = router(None, None, &[]).unwrap();
        let page = get(&alone, "/console", None).await;
        assert_eq!(
            page.header(header::CONTENT_SECURITY_POLICY),
            "frame-ancestors 'self'"
        );
        assert_eq!(page.header(header::X_FRAME_OPTIONS), "SAMEORIGIN");
        let portals = ["https://portal.example.com", "http://127.0.0.1:8080"]
            .map(|o| crate::edge::Origin::parse(o).unwrap());
        let framed = router(None, None, &portals).unwrap();
        for path in ["/console", "/replay"] {
            let page = get(&framed, path, None).await;
            assert_eq!(
                page.header(header::CONTENT_SECURITY_POLICY),
                "frame-ancestors 'self' https://portal.example.com:443 http://127.0.0.1:8080",
                "{path}"
            );
            // X-Frame-Options cannot name other origins; the CSP rules.
            assert_eq!(page.header(header::X_FRAME_OPTIONS), "", "{path}");
        }
    }

    #[test]
    fn the_page_imports_the_built_in_novnc_by_version() {
        let js = built_in(WEB_FILES, "console.js");
        let js = std::str::from_utf8(&js).unwrap();
        let import = format!("from '/novnc/{NOVNC_VERSION}/core/rfb.js'");
        assert!(js.contains(&import), "web/console.js lacks {import}");
    }

    #[tokio::test]
    async fn if_none_match_with_the_etag_gets_304() {
        let app = router(None, None, &[]).unwrap();
        let path = format!("/novnc/{NOVNC_VERSION}/core/rfb.js");
        let first = get(&app, &path, None).await;
        let etag = first.header(header::ETAG).to_owned();
        assert_eq!(etag.len(), 34, "{etag}");
        let weak = format!("W/{etag}");
        let listed = format!("\"0123\", {etag}");
        for tag in [etag.as_str(), weak.as_str(), listed.as_str(), "*"] {
            let r = get(&app, &path, Some(tag)).await;
            assert_eq!(r.status, 304, "{tag}");
            assert!(r.body.is_empty());
            assert_eq!(r.header(header::ETAG), etag);
            assert_eq!(r.header(header::CACHE_CONTROL), IMMUTABLE);
        }
        for tag in ["\"0123\"", "", "W/", ",,"] {
            let r = get(&app, &path, Some(tag)).await;
            assert_eq!(r.status, 200, "{tag:?}");
            assert_eq!(r.body, first.body);
        }
        // Another file's ETag does not match.
        let css = get(&app, "/static/console.css", Some(&etag)).await;
        assert_eq!(css.status, 200);
        let again = get(&app, "/static/console.css", Some(css.header(header::ETAG))).await;
        assert_eq!(again.status, 304);
        assert_eq!(again.header(header::CACHE_CONTROL), "no-cache");
    }

    #[tokio::test]
    async fn web_root_replaces_the_page_and_edits_show_at_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("console.html"), "<p>restyled</p>").unwrap();
        std::fs::write(dir.path().join("console.js"), "let a = 1;").unwrap();
        let app = router(Some(dir.path().to_str().unwrap()), None, &[]).unwrap();

        let page = get(&app, "/console", None).await;
        assert_eq!(page.status, 200);
        assert_eq!(&page.body[..], b"<p>restyled</p>");
        assert_eq!(page.header(header::CACHE_CONTROL), "no-store");
        let js = get(&app, "/static/console.js", None).await;
        assert_eq!(&js.body[..], b"let a = 1;");
        assert_eq!(js.header(header::CACHE_CONTROL), "no-cache");
        let etag = js.header(header::ETAG).to_owned();
        assert_eq!(
            get(&app, "/static/console.js", Some(&etag)).await.status,
            304
        );
        // Only the override's files: the built-in stylesheet is not there.
        assert_eq!(get(&app, "/static/console.css", None).await.status, 404);

        std::fs::write(dir.path().join("console.js"), "let a = 2;").unwrap();
        let edited = get(&app, "/static/console.js", Some(&etag)).await;
        assert_eq!(edited.status, 200);
        assert_eq!(&edited.body[..], b"let a = 2;");
        assert_ne!(edited.header(header::ETAG), etag);

        // noVNC stays the built-in one, cached for good under its version.
        let rfb = get(&app, &format!("/novnc/{NOVNC_VERSION}/core/rfb.js"), None).await;
        assert_eq!(rfb.status, 200);
        assert_eq!(rfb.header(header::CACHE_CONTROL), IMMUTABLE);
    }

    #[tokio::test]
    async fn novnc_root_replaces_novnc_and_is_revalidated() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("core")).unwrap();
        std::fs::write(dir.path().join("core/rfb.js"), "export default 1;").unwrap();
        let app = router(None, Some(dir.path().to_str().unwrap()), &[]).unwrap();
        for path in [
            format!("/novnc/{NOVNC_VERSION}/core/rfb.js"),
            "/novnc/core/rfb.js".to_owned(),
        ] {
            let r = get(&app, &path, None).await;
            assert_eq!(r.status, 200, "{path}");
            assert_eq!(&r.body[..], b"export default 1;");
            assert_eq!(r.header(header::CACHE_CONTROL), "no-cache", "{path}");
        }
        assert_eq!(get(&app, "/novnc/core/display.js", None).await.status, 404);
        // The page stays the built-in one.
        let page = get(&app, "/console", None).await;
        assert_eq!(page.body, built_in(WEB_FILES, "console.html"));
    }

    #[test]
    fn an_override_that_cannot_serve_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let f = file.to_str().unwrap();
        let cases = [
            (Some("/nonexistent/vncbroker/web"), None, "proxy.web_root"),
            (Some(d), None, "no console.html"),
            (Some(f), None, "not a directory"),
            (None, Some(d), "no core/rfb.js"),
            (None, Some("/nonexistent/novnc"), "proxy.novnc_root"),
        ];
        for (web, novnc, want) in cases {
            let Err(err) = router(web, novnc, &[]) else {
                panic!("{web:?} {novnc:?} accepted");
            };
            let text = err.to_string();
            assert!(text.contains(want), "{text}");
            assert!(text.contains("built into the binary"), "{text}");
        }
    }

    #[tokio::test]
    async fn only_regular_files_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("web");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.js"), "x").unwrap();
        std::fs::write(root.join("sub/b.css"), "y").unwrap();
        std::fs::write(root.join(".hidden"), "z").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), root.join("escape.txt")).unwrap();
        std::os::unix::fs::symlink(root.join("a.js"), root.join("inside.js")).unwrap();
        let r = Root::new(root.to_str().unwrap()).unwrap();
        assert!(r.resolve("a.js").await.is_some());
        assert!(r.resolve("sub/b.css").await.is_some());
        assert!(r.resolve("inside.js").await.is_some());
        for bad in [
            "escape.txt",
            "../secret.txt",
            "sub/../../secret.txt",
            ".hidden",
            "sub",
            "",
            "sub//b.css",
            "a.js/",
            "nope.js",
            "a\\b",
        ] {
            assert!(r.resolve(bad).await.is_none(), "{bad:?}");
            assert!(r.resolve_sync(bad).is_none(), "{bad:?}");
        }
        let embedded = Files::new(WEB_FILES, None, "web_root", "console.html").unwrap();
        for bad in ["../web/console.js", "./console.js", "", "console.js/"] {
            assert!(embedded.get(bad).await.is_none(), "{bad:?}");
        }
        assert!(embedded.get("console.js").await.is_some());
    }

    #[test]
    fn content_types() {
        for (name, ty) in [
            ("x.js", "text/javascript; charset=utf-8"),
            ("a/b.mjs", "text/javascript; charset=utf-8"),
            ("console.html", "text/html; charset=utf-8"),
            ("console.css", "text/css; charset=utf-8"),
            ("package.json", "application/json"),
            ("LICENSE.txt", "text/plain; charset=utf-8"),
            ("i.svg", "image/svg+xml"),
            ("i.png", "image/png"),
            ("AUTHORS", "application/octet-stream"),
            ("x", "application/octet-stream"),
        ] {
            assert_eq!(content_type(name), ty, "{name}");
        }
    }
}
