//! The web dashboard: plain HTML, CSS and JavaScript (no framework, no build step) under
//! `crates/tuchka-controller/ui/`, built into the binary and served at `/ui/` by the
//! controller itself — no other web server, nothing fetched from the internet.
//!
//! The assets are public (a browser cannot send a bearer token with a page load); they hold no
//! data. The page takes the API token from its URL fragment (`/ui/#token=…`, what `tuchka ui`
//! prints: browsers never send a fragment to a server, so it reaches no log), keeps it in
//! `sessionStorage` and calls the same-origin API with `Authorization: Bearer`, like the CLI.
//! Live updates come from `GET /v1/events` read with `fetch()` as a stream — `EventSource`
//! cannot send the header, and a token in a query string would be logged by proxies — see
//! docs/dashboard.md. Every answer carries a strict Content-Security-Policy (only this origin's
//! scripts, styles and API), and is revalidated by its ETag.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use tuchka_api::UiLogin;

use crate::error::Error;
use crate::state::Controller;

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../ui/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../ui/app.js"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../ui/style.css"),
    },
];

/// The policy of every dashboard answer: this origin only, no inline code, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// ETags of the assets (sha256 of their bytes), computed once.
fn etag(i: usize) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let d = tuchka_core::digest::sha256_hex(a.body.as_bytes());
                format!("\"{}\"", &d[..16])
            })
            .collect()
    });
    tags.get(i).map(String::as_str).unwrap_or("\"\"")
}

fn serve(i: usize, headers: &HeaderMap) -> Response {
    let Some(a) = ASSETS.get(i) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let tag = etag(i);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let common = [
        (header::ETAG, HeaderValue::from_static(tag)),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(a.content_type),
        )],
        a.body,
    )
        .into_response()
}

/// `GET /ui/`: the page.
pub async fn index(headers: HeaderMap) -> Response {
    serve(0, &headers)
}

/// `GET /` and `GET /ui`: to the page.
pub async fn to_index() -> Redirect {
    Redirect::to("/ui/")
}

/// `GET /ui/{file}`: a script or style sheet of the page.
pub async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().position(|a| a.name == file) {
        Some(i) => serve(i, &headers),
        None => Error::NoRoute(format!("GET /ui/{file}")).into_response(),
    }
}

/// Where the dashboard is and the link that logs in to it (users only: the link carries the
/// API token).
pub fn login(ctl: &Controller) -> UiLogin {
    let join = ctl.config().join.as_ref();
    let url = join.map(|j| format!("{}/ui/", j.url.trim_end_matches('/')));
    UiLogin {
        link: url
            .as_ref()
            .map(|u| format!("{u}#token={}", ctl.api_token())),
        url,
        fingerprint: join.map(|j| j.fingerprint.clone()),
    }
}
