//! `GET /`: the live dashboard. Three static files compiled into the binary (no build step, nothing
//! fetched from elsewhere at run time) that poll `/metrics`, `/v1/monitor`, `/v1/admin/models` and
//! `/readyz` with relative URLs, and let a visitor watch one user's list over SSE and click in it.
//!
//! The files are served with a strong `ETag` (a hash of their bytes, computed at compile time) and
//! `Cache-Control: no-cache`: a browser revalidates on every load and gets a `304` until the binary
//! carries different files, so a new release is never hidden behind a stale cache.
//!
//! `http::configure` registers these routes before `health`'s, whose JSON index also claims `/`:
//! the first registration wins.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};

/// One embedded file.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: &'static str,
}

/// A quoted hex ETag of `bytes` (64-bit FNV-1a), evaluated at compile time.
macro_rules! asset {
    ($path:literal, $content_type:literal) => {{
        const BODY: &str = include_str!($path);
        const HASH: [u8; 18] = etag(BODY.as_bytes());
        Asset {
            body: BODY,
            content_type: $content_type,
            etag: match std::str::from_utf8(&HASH) {
                Ok(etag) => etag,
                Err(_) => panic!("an ETag is ASCII"),
            },
        }
    }};
}

const INDEX: Asset = asset!("dashboard/index.html", "text/html; charset=utf-8");
const APP_JS: Asset = asset!("dashboard/app.js", "text/javascript; charset=utf-8");
const STYLE_CSS: Asset = asset!("dashboard/style.css", "text/css; charset=utf-8");

/// Only what the page itself needs: its own scripts, styles and API, no inline code, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; object-src 'none'; \
                                       base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/").route(web::get().to(|req: HttpRequest| async move { serve(&req, &INDEX) })))
        .service(
            web::resource("/dashboard/app.js")
                .route(web::get().to(|req: HttpRequest| async move { serve(&req, &APP_JS) })),
        )
        .service(
            web::resource("/dashboard/style.css")
                .route(web::get().to(|req: HttpRequest| async move { serve(&req, &STYLE_CSS) })),
        );
}

fn serve(req: &HttpRequest, asset: &Asset) -> HttpResponse {
    let fresh = not_modified(req, asset.etag);
    let mut response = if fresh { HttpResponse::NotModified() } else { HttpResponse::Ok() };
    response
        .insert_header((header::ETAG, HeaderValue::from_static(asset.etag)))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-cache")))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
        .insert_header((header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY)));
    if fresh {
        response.finish()
    } else {
        response.content_type(asset.content_type).body(asset.body)
    }
}

/// Whether the request's `If-None-Match` names `tag` (or is `*`), by the weak comparison it asks
/// for (RFC 9110 13.1.2: a cache on the way may have weakened the tag to `W/"…"`).
pub(super) fn not_modified(req: &HttpRequest, tag: &str) -> bool {
    req.headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').map(str::trim).any(|t| t == "*" || t.trim_start_matches("W/") == tag))
}

/// `"<16 hex digits>"`: the FNV-1a hash of `bytes`, quoted as an ETag.
pub(super) const fn etag(bytes: &[u8]) -> [u8; 18] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    let mut out = [b'"'; 18];
    let mut digit = 0;
    while digit < 16 {
        let nibble = ((hash >> (60 - 4 * digit)) & 0xf) as u8;
        out[1 + digit] = if nibble < 10 { b'0' + nibble } else { b'a' + nibble - 10 };
        digit += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_quoted_hashes_that_follow_the_content() {
        assert_eq!(&etag(b""), b"\"cbf29ce484222325\"");
        assert_ne!(etag(b"a"), etag(b"b"));
        for asset in [&INDEX, &APP_JS, &STYLE_CSS] {
            assert_eq!(asset.etag.len(), 18);
            assert!(asset.etag.starts_with('"') && asset.etag.ends_with('"'));
        }
    }

    #[test]
    fn a_matching_etag_is_answered_304_without_a_body() {
        let req = actix_web::test::TestRequest::default()
            .insert_header((header::IF_NONE_MATCH, APP_JS.etag))
            .to_http_request();
        let response = serve(&req, &APP_JS);
        assert_eq!(response.status(), actix_web::http::StatusCode::NOT_MODIFIED);
        let req = actix_web::test::TestRequest::default().to_http_request();
        let response = serve(&req, &APP_JS);
        assert_eq!(response.status(), actix_web::http::StatusCode::OK);
        assert_eq!(response.headers().get(header::CONTENT_TYPE).unwrap(), "text/javascript; charset=utf-8");
        assert_eq!(response.headers().get(header::CACHE_CONTROL).unwrap(), "no-cache");
    }
}
