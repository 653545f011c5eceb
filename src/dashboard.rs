//! The web dashboard: a page and its assets, built into the binary, served at `/` and
//! `/assets/...` on the admin endpoint.
//!
//! Owns: the list of static files ([`ASSETS`], read at compile time from `src/dashboard/`),
//! their routes, and the headers every one of them is served with.
//! Never: reads a file at run time or reaches the shards. The page is plain HTML, CSS and
//! JavaScript with no build step; it asks the admin API itself, with the token the operator
//! types in (sent as `Authorization: Bearer`), so these files hold nothing secret and need no
//! token (`admin.rs` exempts exactly these paths from it; the Host check still applies).
//! Invariants: every answer carries a Content-Security-Policy that allows scripts, styles,
//! images and connections from this origin only (no inline script or style, no framing, no
//! plugins, no `<base>`, no form posts), `X-Frame-Options: DENY`,
//! `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`; the page builds its
//! DOM with `textContent` only, so hostile client ids and topics stay text.

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One file of the dashboard.
#[derive(Debug)]
pub struct Asset {
    /// The exact request path it is served at.
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
    /// A hash of `body` (computed at compile time), for the ETag.
    hash: u64,
}

/// FNV-1a over `bytes`: a cheap content fingerprint for the ETag (not a security measure).
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

macro_rules! asset {
    ($path:literal, $file:literal, $content_type:literal) => {
        Asset {
            path: $path,
            content_type: $content_type,
            body: include_bytes!(concat!("dashboard/", $file)),
            hash: fnv1a(include_bytes!(concat!("dashboard/", $file))),
        }
    };
}

/// Every file the dashboard serves, and nothing else.
pub static ASSETS: &[Asset] = &[
    asset!("/", "index.html", "text/html; charset=utf-8"),
    asset!("/assets/app.css", "app.css", "text/css; charset=utf-8"),
    asset!("/assets/app.js", "app.js", "text/javascript; charset=utf-8"),
    asset!(
        "/assets/chart.js",
        "chart.js",
        "text/javascript; charset=utf-8"
    ),
    asset!("/assets/favicon.svg", "favicon.svg", "image/svg+xml"),
];

/// Scripts, styles, images and API calls from this origin only; nothing inline, no framing,
/// no `<base>`, no form submissions (the login form is handled by the script), no plugins.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'";

/// Whether `path` is one of the dashboard's static files (an exact match: `admin.rs` serves
/// these without the token).
pub fn is_static(path: &str) -> bool {
    ASSETS.iter().any(|asset| asset.path == path)
}

/// The routes of every asset, for the admin router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    ASSETS.iter().fold(Router::new(), |router, asset| {
        router.route(
            asset.path,
            get(move |headers: HeaderMap| async move { serve(asset, &headers) }),
        )
    })
}

/// `asset` with its headers; 304 without a body when the browser's copy is current. Its
/// caches must revalidate every time (`no-cache`): a new build changes the files under the
/// same names.
fn serve(asset: &'static Asset, request: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", asset.hash);
    let current = request
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.split(',').any(|tag| tag.trim() == etag));
    let mut response = if current {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let headers = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, etag);
    }
    for (name, value) in [
        (header::CACHE_CONTROL, "no-cache"),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            header::HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
        (
            header::HeaderName::from_static("cross-origin-resource-policy"),
            "same-origin",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_listed_files_are_static() {
        for path in ["/", "/assets/app.js", "/assets/app.css", "/assets/chart.js"] {
            assert!(is_static(path), "{path}");
        }
        for path in [
            "",
            "/index.html",
            "/assets",
            "/assets/",
            "/assets/app.js/",
            "/assets/../api/v1/nodes",
            "/api/v1/nodes",
            "/metrics",
            "//",
        ] {
            assert!(!is_static(path), "{path}");
        }
    }

    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let page = std::str::from_utf8(ASSETS[0].body).unwrap();
        // Every script is loaded from a file, and no element carries a style or a handler.
        assert!(!page.contains("<style"));
        assert!(!page.contains(" style="));
        assert!(!page.contains(" onclick=") && !page.contains(" onsubmit="));
        for script in page.split("<script").skip(1) {
            let (tag, rest) = script.split_once('>').unwrap();
            assert!(tag.contains(" src=\"/assets/"), "{tag}");
            assert!(rest.trim_start().starts_with("</script>"), "{tag}");
        }
        // The scripts never hand API data to the HTML parser.
        for asset in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            let text = std::str::from_utf8(asset.body).unwrap();
            for sink in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
            ] {
                assert!(!text.contains(sink), "{} uses {sink}", asset.path);
            }
        }
    }

    #[test]
    fn etags_differ_with_content() {
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
        let hashes: std::collections::BTreeSet<u64> = ASSETS.iter().map(|a| a.hash).collect();
        assert_eq!(hashes.len(), ASSETS.len());
    }
}
