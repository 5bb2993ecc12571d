//! The HTTP API: one file per resource, each with a `configure(cfg)`, sharing [`AppState`] and the
//! single error mapping in [`error`].

pub mod admin;
pub mod auth;
pub mod dashboard;
pub mod error;
pub mod events;
pub mod health;
pub mod items;
pub mod limits;
pub mod lists;
pub mod middleware;
pub mod segment_lists;

/// CORS for pages served elsewhere (a dashboard, a shop front) that call the API: only the
/// origins in `auth.allowed_origins` (`"*"`: any), with the credential headers liverec reads.
pub fn cors(origins: &[String]) -> actix_cors::Cors {
    let cors = actix_cors::Cors::default()
        .allowed_methods(["GET", "POST", "PUT", "DELETE"])
        .allowed_headers([
            actix_web::http::header::AUTHORIZATION,
            actix_web::http::header::CONTENT_TYPE,
            actix_web::http::header::HeaderName::from_static("x-api-key"),
            actix_web::http::header::HeaderName::from_static("last-event-id"),
            actix_web::http::header::IF_NONE_MATCH,
        ])
        .expose_headers([actix_web::http::header::RETRY_AFTER, actix_web::http::header::ETAG])
        .max_age(3600)
        // The server's own pages (the dashboard): browsers send Origin on same-origin POSTs and
        // WebSocket handshakes too.
        .allowed_origin_fn(|origin, head| {
            let host = head.headers().get(actix_web::http::header::HOST).and_then(|h| h.to_str().ok());
            let origin = origin.to_str().ok().and_then(|o| o.split_once("://")).map(|(_, rest)| rest);
            host.is_some() && origin == host
        });
    if origins.iter().any(|o| o == "*") {
        return cors.allow_any_origin();
    }
    origins.iter().fold(cors, |cors, origin| cors.allowed_origin(origin))
}
pub mod monitor;
pub mod openapi;
pub mod recommendations;
pub mod stream;
pub mod users;

mod body;
mod state;

use actix_web::{web, HttpRequest, HttpResponse};

pub use body::{decode_json, decode_json_body, read_json_body};
use error::ApiError;
pub use state::AppState;

/// Registers every route and the JSON error handlers for extractors.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::PathConfig::default()
            .error_handler(|err, _| ApiError::bad_request("invalid_path", err.to_string()).into()),
    )
    .app_data(web::QueryConfig::default().error_handler(|err, _| error::query_error(&err).into()))
    .configure(events::configure)
    .configure(recommendations::configure)
    .configure(stream::configure)
    // Before the items: `/v1/items/latest` must match before `/v1/items/{item_id}`.
    .configure(lists::configure)
    .configure(items::configure)
    .configure(monitor::configure)
    .configure(users::configure)
    .configure(admin::configure)
    .configure(dashboard::configure)
    .configure(health::configure)
    .configure(openapi::configure);
}

/// A JSON body for the `405` actix-web answers (with `Allow`) when a route exists but not for the
/// request's method.
pub fn method_not_allowed<B>(
    response: actix_web::dev::ServiceResponse<B>,
) -> actix_web::Result<actix_web::middleware::ErrorHandlerResponse<B>> {
    let (req, res) = response.into_parts();
    let allow = res.headers().get(actix_web::http::header::ALLOW).cloned();
    let error = ApiError::new(
        actix_web::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.path()),
    );
    let mut res = actix_web::ResponseError::error_response(&error);
    if let Some(allow) = allow {
        res.headers_mut().insert(actix_web::http::header::ALLOW, allow);
    }
    let response = actix_web::dev::ServiceResponse::new(req, res).map_into_right_body();
    Ok(actix_web::middleware::ErrorHandlerResponse::Response(response))
}

/// JSON 404 for every unknown route.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    actix_web::ResponseError::error_response(&ApiError::not_found(
        "not_found",
        format!("no route for {} {}", req.method(), req.path()),
    ))
}
