//! The console: a single-page web UI for watching and talking to a project, served at `/`.
//!
//! The page is three static files under `console/`, embedded in the binary at compile time so
//! that `agentbus serve` needs nothing beside itself and never fetches anything at run time.
//! The page only talks to the REST API of the same broker.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{guard, web, HttpRequest, HttpResponse};

/// One embedded file: its bytes, its content type and a validator computed at compile time.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: u64,
}

impl Asset {
    const fn new(body: &'static str, content_type: &'static str) -> Asset {
        Asset {
            body,
            content_type,
            etag: fnv1a(body.as_bytes()),
        }
    }
}

const INDEX_HTML: Asset = Asset::new(
    include_str!("../../console/index.html"),
    "text/html; charset=utf-8",
);
const APP_JS: Asset = Asset::new(
    include_str!("../../console/app.js"),
    "text/javascript; charset=utf-8",
);
const STYLE_CSS: Asset = Asset::new(
    include_str!("../../console/style.css"),
    "text/css; charset=utf-8",
);

/// The page loads nothing but its own files and calls nothing but this broker: a policy that
/// says so turns any injection that slipped past the page's text-only rendering into a no-op.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", get_or_head().to(index))
        .route("/console/app.js", get_or_head().to(app_js))
        .route("/console/style.css", get_or_head().to(style_css));
}

fn get_or_head() -> actix_web::Route {
    web::route().guard(guard::Any(guard::Get()).or(guard::Head()))
}

async fn index(req: HttpRequest) -> HttpResponse {
    serve(&req, &INDEX_HTML)
}

async fn app_js(req: HttpRequest) -> HttpResponse {
    serve(&req, &APP_JS)
}

async fn style_css(req: HttpRequest) -> HttpResponse {
    serve(&req, &STYLE_CSS)
}

/// `no-cache` makes the browser revalidate on every load, so a new broker build shows its own
/// console at once; the ETag keeps that revalidation to a 304 when nothing changed.
fn serve(req: &HttpRequest, asset: &Asset) -> HttpResponse {
    let etag = format!("\"{:016x}\"", asset.etag);
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    let mut response = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    response
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-cache")))
        .insert_header((header::ETAG, etag))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"));
    if fresh {
        return response.finish();
    }
    response.insert_header((header::CONTENT_TYPE, asset.content_type));
    if asset.content_type.starts_with("text/html") {
        response
            .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
            .insert_header((header::REFERRER_POLICY, "no-referrer"));
    }
    response.body(asset.body)
}

/// 64-bit FNV-1a: a cheap fingerprint of an embedded file, good enough for an ETag.
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

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::{test as actix_test, App};

    #[actix_web::test]
    async fn serves_the_page_and_its_assets() {
        let app = actix_test::init_service(App::new().configure(routes)).await;
        for (path, content_type) in [
            ("/", "text/html; charset=utf-8"),
            ("/console/app.js", "text/javascript; charset=utf-8"),
            ("/console/style.css", "text/css; charset=utf-8"),
        ] {
            let res = actix_test::call_service(
                &app,
                actix_test::TestRequest::get().uri(path).to_request(),
            )
            .await;
            assert_eq!(res.status(), 200, "{path}");
            let header = |name| res.headers().get(name).cloned().expect("header present");
            assert_eq!(header(header::CONTENT_TYPE), content_type, "{path}");
            assert_eq!(header(header::CACHE_CONTROL), "no-cache", "{path}");
            let etag = header(header::ETAG);
            let body = actix_test::read_body(res).await;
            assert!(!body.is_empty(), "{path}");

            let again = actix_test::TestRequest::get()
                .uri(path)
                .insert_header((header::IF_NONE_MATCH, etag))
                .to_request();
            let res = actix_test::call_service(&app, again).await;
            assert_eq!(res.status(), 304, "{path}");
        }
    }

    #[test]
    fn the_page_refers_to_the_served_assets() {
        assert!(INDEX_HTML.body.contains("/console/app.js"));
        assert!(INDEX_HTML.body.contains("/console/style.css"));
        assert_ne!(APP_JS.etag, STYLE_CSS.etag);
    }
}
