//! The console page: `GET /console` opens a VM's screen in the browser with
//! noVNC's RFB module, for the token in the URL fragment (`#token=...`) or
//! query (`?token=...`).
//!
//! The page and its script live in `web/`; noVNC's modules come from the
//! `@novnc/novnc` npm package, installed from the committed lockfile. Files
//! are served only from inside those two directories: no listings, no `..`
//! or hidden names, and a symlink that leads outside is not followed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::Path as UrlPath;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// Largest static file served.
const MAX_FILE: u64 = 8 << 20;

/// Routes for the page (`/console`), its assets (`/static/`) and noVNC
/// (`/novnc/`).
pub fn router(web_root: &str, novnc_root: &str) -> Router {
    let web = Arc::new(Root::new(web_root));
    let novnc = Arc::new(Root::new(novnc_root));
    let page = Arc::clone(&web);
    Router::new()
        .route(
            "/console",
            get(move || {
                let page = Arc::clone(&page);
                async move { console_page(&page).await }
            }),
        )
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/static/{*path}",
            get(move |UrlPath(p): UrlPath<String>| {
                let web = Arc::clone(&web);
                async move { web.serve(&p).await }
            }),
        )
        .route(
            "/novnc/{*path}",
            get(move |UrlPath(p): UrlPath<String>| {
                let novnc = Arc::clone(&novnc);
                async move { novnc.serve(&p).await }
            }),
        )
}

/// A directory files are served from, resolved once.
struct Root {
    configured: PathBuf,
    canonical: Option<PathBuf>,
}

impl Root {
    fn new(dir: &str) -> Root {
        let configured = PathBuf::from(dir);
        let canonical = std::fs::canonicalize(&configured).ok();
        if canonical.is_none() {
            tracing::warn!(
                dir,
                "web directory missing; run `npm ci` in the source tree or set proxy.web_root/novnc_root"
            );
        }
        Root {
            configured,
            canonical,
        }
    }

    /// The file for a request path, if it is a regular file inside the root.
    async fn resolve(&self, rel: &str) -> Option<PathBuf> {
        let root = self.canonical.as_ref()?;
        let mut path = root.clone();
        for part in rel.split('/') {
            let bad = part.is_empty()
                || part.starts_with('.')
                || part.contains(['\\', '\0'])
                || part.len() > 255;
            if bad {
                return None;
            }
            path.push(part);
        }
        // Symlinks are resolved, then the result must still be inside.
        let real = tokio::fs::canonicalize(&path).await.ok()?;
        if !real.starts_with(root) {
            return None;
        }
        let meta = tokio::fs::metadata(&real).await.ok()?;
        (meta.is_file() && meta.len() <= MAX_FILE).then_some(real)
    }

    async fn serve(&self, rel: &str) -> Response {
        let Some(file) = self.resolve(rel).await else {
            return StatusCode::NOT_FOUND.into_response();
        };
        match tokio::fs::read(&file).await {
            Ok(body) => (
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(content_type(&file)),
                    ),
                    (
                        header::X_CONTENT_TYPE_OPTIONS,
                        HeaderValue::from_static("nosniff"),
                    ),
                    (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                ],
                body,
            )
                .into_response(),
            Err(_) => StatusCode::NOT_FOUND.into_response(),
        }
    }
}

fn content_type(file: &Path) -> &'static str {
    match file.extension().and_then(|e| e.to_str()).unwrap_or("") {
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

async fn console_page(web: &Root) -> Response {
    let path = web.configured.join("console.html");
    match tokio::fs::read(&path).await {
        Ok(html) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
                // The token travels in the fragment; never leak the URL onward.
                (header::REFERRER_POLICY, "no-referrer"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::X_FRAME_OPTIONS, "SAMEORIGIN"),
            ],
            html,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "console page missing");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the console page is not installed (run `npm ci` in the source tree, or set proxy.web_root)",
            )
                .into_response()
        }
    }
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
        let r = Root::new(root.to_str().unwrap());
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
        }
        assert_eq!(
            content_type(Path::new("x.js")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("x")), "application/octet-stream");
    }

    #[tokio::test]
    async fn a_missing_root_serves_nothing() {
        let r = Root::new("/nonexistent/vncbroker/web");
        assert!(r.resolve("console.js").await.is_none());
    }
}
