//! rvol's web dashboard: one page, its script and its style, built into
//! the binary (nothing to install beside it, no server to run) and served
//! under `/ui/` by the process that shows it: an engine's admin listener
//! (its volume) or the controller (the cluster).
//!
//! # What keeps it safe
//!
//! The page is one more client of the JSON API the CLI uses, and holds no
//! data itself: the assets are served to anyone, and every read and every
//! action goes through the API's token check (`rvol_access`), so the
//! dashboard can do nothing its caller's token could not. A token typed
//! into it is kept in the tab's `sessionStorage` (gone when the tab
//! closes) and sent only as a bearer header on requests to its own
//! origin. Data reaches the page as text (`textContent`), never as markup,
//! and the Content-Security-Policy allows the page's own script and style
//! alone: a volume, snapshot or event named `<script>` shows as that and
//! runs nothing.
//!
//! # Where it works
//!
//! Every URL the page uses is relative (`../v1/volume` from `/ui/`), so it
//! works wherever the API is mounted: on a Unix socket behind a reverse
//! proxy's path prefix as well as on the listener's root.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// Which API the page drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An engine's admin API: one volume.
    Engine,
    /// The controller's API: every volume and node.
    Cluster,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Engine => "engine",
            Kind::Cluster => "cluster",
        }
    }
}

const INDEX: &str = include_str!("../assets/index.html");
const SCRIPT: &str = include_str!("../assets/app.js");
const STYLE: &str = include_str!("../assets/style.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: String) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

/// The page for `kind`: the same document, told which API it drives.
pub fn index(kind: Kind) -> String {
    INDEX.replace("{{kind}}", kind.name())
}

/// The dashboard's routes: `/ui/` (and `/ui`, redirected there), with
/// `/ui/app.js` and `/ui/style.css`. Merge them outside the API's token
/// check: they carry no data.
pub fn router<S: Clone + Send + Sync + 'static>(kind: Kind) -> Router<S> {
    Router::new()
        .route(
            "/ui",
            // Relative, so that a proxy's path prefix is kept.
            get(|| async { (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, "ui/")]) }),
        )
        .route(
            "/ui/",
            get(move || async move { asset("text/html; charset=utf-8", index(kind)) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT.to_string()) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE.to_string()) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_its_kind_and_loads_nothing_from_elsewhere() {
        for kind in [Kind::Engine, Kind::Cluster] {
            let page = index(kind);
            assert!(page.contains(&format!("data-kind=\"{}\"", kind.name())));
            assert!(!page.contains("{{"), "an unfilled placeholder");
            // Relative URLs only: the page must work under any prefix.
            for attr in ["src=\"", "href=\""] {
                for (i, _) in page.match_indices(attr) {
                    let url = &page[i + attr.len()..];
                    assert!(
                        !url.starts_with('/') && !url.starts_with("http"),
                        "{attr}{}",
                        &url[..url.len().min(40)]
                    );
                }
            }
            // No inline script: the CSP would refuse it.
            assert!(!page.contains("<script>"));
        }
        assert!(!SCRIPT.contains("innerHTML"), "data goes in as text only");
        assert!(!SCRIPT.contains("fetch(\"/"), "API URLs are relative");
    }
}
