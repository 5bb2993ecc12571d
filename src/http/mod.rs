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
        ])
        .expose_headers([actix_web::http::header::RETRY_AFTER])
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

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use tokio::sync::watch;

use crate::actors::registry::SessionRegistry;
use crate::bus::EventBus;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::event::{check_id, UserId};
use crate::store::ProfileStore;
use crate::telemetry::Metrics;
use error::ApiError;

/// Everything handlers share.
#[derive(Clone)]
pub struct AppState {
    pub monitor: actix::Addr<crate::actors::monitor::MonitorActor>,
    pub trainer: actix::Addr<crate::actors::trainer::TrainerActor>,
    /// Checks credentials (see `crate::auth`).
    pub auth: Arc<crate::auth::Auth>,
    /// Rate limits per IP and per credential.
    pub limiters: Arc<limits::Limiters>,
    pub config: Arc<Config>,
    pub registry: Arc<SessionRegistry>,
    /// User ids as liverec keeps them: every id that enters goes through it.
    pub pseudonyms: Arc<crate::privacy::Pseudonyms>,
    /// Recent applied events (the trainer's window), purged on erasure.
    pub event_log: Arc<crate::eventlog::EventLog>,
    pub bus: Arc<dyn EventBus>,
    pub store: Arc<dyn ProfileStore>,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
    /// Becomes true when the server starts shutting down; streams close on it.
    pub shutdown: watch::Receiver<bool>,
}

impl AppState {
    /// Validates a user id taken from a path or a message.
    pub fn user_id(&self, raw: &str, field: &str) -> Result<UserId, ApiError> {
        check_id(field, raw, self.config.events.max_id_len)
            .map_err(|e| ApiError::bad_request("invalid_user_id", e.message).with_field(e.field))?;
        Ok(self.pseudonyms.user(raw))
    }
}

/// Registers every route and the JSON error handlers for extractors.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::PathConfig::default()
            .error_handler(|err, _| ApiError::bad_request("invalid_path", err.to_string()).into()),
    )
    .app_data(
        web::QueryConfig::default()
            .error_handler(|err, _| ApiError::bad_request("invalid_query", err.to_string()).into()),
    )
    .configure(events::configure)
    .configure(recommendations::configure)
    .configure(stream::configure)
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

/// Reads a request body up to `limit` bytes, answering 413 past it, 415 for a body that does
/// not declare itself JSON, and 408 when it does not arrive within `server.body_timeout_secs`.
pub async fn read_json_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
    use futures_util::StreamExt as _;
    let content_type = req.headers().get(actix_web::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let is_json = content_type
        .map(|ct| ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"))
        .unwrap_or(false);
    if !is_json {
        return Err(ApiError::new(
            actix_web::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as application/json",
        ));
    }
    let too_large = || {
        ApiError::new(
            actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {limit} bytes"),
        )
    };
    if let Some(length) = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if length > limit {
            return Err(too_large());
        }
    }
    let state = req.app_data::<web::Data<AppState>>();
    let seconds = state.map_or(10, |s| s.config.server.body_timeout_secs);
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    // A client that declares a body and sends none (or a trickle) must not hold the connection.
    match tokio::time::timeout(std::time::Duration::from_secs(seconds), read).await {
        Ok(body) => body,
        Err(_) => {
            if let Some(state) = state {
                state.metrics.http_body_timeouts.inc();
            }
            Err(ApiError::new(
                actix_web::http::StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the request body did not arrive within {seconds} s (server.body_timeout_secs)"),
            ))
        }
    }
}

/// Reads and decodes a JSON request body into `T`: 415/413 as [`read_json_body`], 400 for bytes
/// that are not JSON, 422 with the `invalid` code and the field for JSON of the wrong shape.
pub async fn decode_json_body<T: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
    invalid: &'static str,
) -> Result<T, ApiError> {
    let body = read_json_body(req, payload, limit).await?;
    decode_json(&body, invalid)
}

/// Decodes a JSON body already read into `T`: 400 for bytes that are not JSON (or trailing data
/// after the value), 422 with the `invalid` code and the field for JSON of the wrong shape.
pub fn decode_json<T: serde::de::DeserializeOwned>(body: &[u8], invalid: &'static str) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| error::json_error(e, invalid))?;
    de.end()
        .map_err(|e| ApiError::bad_request("malformed_json", format!("trailing data after the JSON value: {e}")))?;
    Ok(value)
}
