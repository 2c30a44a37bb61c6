//! The console page: `GET /console` opens a VM's screen in the browser with
//! noVNC's RFB module, for the token in the URL fragment (`#token=...`) or
//! query (`?token=...`).
//!
//! The page and its script live in `web/`; noVNC's modules come from the
//! `@novnc/novnc` npm package, installed from the committed lockfile.

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

/// Routes for the page (`/console`), its assets (`/static/`) and noVNC
/// (`/novnc/`).
pub fn router(web_root: &str, novnc_root: &str) -> Router {
    let page = std::path::Path::new(web_root).join("console.html");
    let serve_dir = |root: &str| {
        ServeDir::new(root)
            .append_index_html_on_directories(false)
            .redirect_to_trailing_slash(false)
    };
    Router::new()
        .route(
            "/console",
            get(move || {
                let page = page.clone();
                async move { console_page(&page).await }
            }),
        )
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .nest_service("/static", serve_dir(web_root))
        .nest_service("/novnc", serve_dir(novnc_root))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
}

async fn console_page(path: &std::path::Path) -> Response {
    match tokio::fs::read(path).await {
        Ok(html) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
                // The token travels in the fragment; never leak the URL onward.
                (header::REFERRER_POLICY, "no-referrer"),
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
