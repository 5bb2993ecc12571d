//! The one error type of the HTTP API and its single mapping to responses:
//! `{"error": {"code": "...", "message": "...", "field": "..."}}` with the right status.
//! Extractor failures (path, query, JSON) are routed through the same shape.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::actors::messages::SessionError;
use crate::actors::trainer::state::TrainerError;
use crate::bus::BusError;
use crate::catalog::{InvalidItem, RefusedItem};
use crate::event::InvalidEvent;
use crate::models::registry::RegistryError;
use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable, machine-readable code.
    pub code: &'static str,
    pub message: String,
    /// The offending field, when one is to blame (`[3].item_id` in a batch).
    pub field: Option<String>,
    /// Seconds, sent as `Retry-After` with 429 and 503.
    pub retry_after: Option<u64>,
}

/// The body of every error response (and of WebSocket error messages).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code, e.g. `invalid_event`, `unauthorized`, `rate_limited`.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// The offending field, when one is to blame (`[3].item_id` in a batch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None, retry_after: None }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>, retry_after: u64) -> Self {
        Self { retry_after: Some(retry_after), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message) }
    }

    /// The JSON body, also used for WebSocket error messages.
    pub fn body_json(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error: ErrorDetail { code: self.code, message: self.message.clone(), field: self.field.clone() },
        })
        .expect("error bodies always serialise")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(seconds) = self.retry_after {
            response.insert_header((header::RETRY_AFTER, seconds.to_string()));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        response.content_type("application/json").body(self.body_json())
    }
}

impl From<InvalidEvent> for ApiError {
    fn from(e: InvalidEvent) -> Self {
        ApiError::unprocessable("invalid_event", e.message).with_field(e.field)
    }
}

impl From<liverec_wire::ws::MessageError> for ApiError {
    fn from(e: liverec_wire::ws::MessageError) -> Self {
        ApiError { field: e.field, ..ApiError::bad_request(e.code, e.message) }
    }
}

impl From<InvalidItem> for ApiError {
    fn from(e: InvalidItem) -> Self {
        ApiError::unprocessable("invalid_item", e.message).with_field(e.field)
    }
}

/// An event's item the catalogue would not take (`field` is set where the event's position is
/// known).
impl From<RefusedItem> for ApiError {
    fn from(e: RefusedItem) -> Self {
        ApiError::unprocessable(e.code(), e.to_string()).with_field("item_id")
    }
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> Self {
        match e {
            BusError::Saturated => ApiError::unavailable("overloaded", "the event pipeline is full; retry shortly", 1),
            BusError::Closed => ApiError::unavailable("shutting_down", "the server is shutting down", 5),
            BusError::Unavailable(_) => ApiError::unavailable(
                "bus_unavailable",
                "the event log did not acknowledge the events; retry with the same event ids",
                2,
            ),
        }
    }
}

/// A catalogue change refused: past `catalog.max_items`, or not acknowledged by Kafka.
impl From<crate::actors::catalog_feed::FeedError> for ApiError {
    fn from(e: crate::actors::catalog_feed::FeedError) -> Self {
        use crate::actors::catalog_feed::FeedError;
        match e {
            FeedError::CatalogFull { .. } => ApiError::unprocessable(e.code(), e.to_string()),
            FeedError::Bus(BusError::Unavailable(_)) => ApiError::unavailable(
                "bus_unavailable",
                "the items topic did not acknowledge the changes; retry (putting an item again is harmless)",
                2,
            ),
            FeedError::Bus(bus) => bus.into(),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::BadName(_) => ApiError::bad_request("invalid_model_name", error.to_string()),
            RegistryError::NotFound { .. } | RegistryError::Empty(_) => {
                ApiError::not_found("model_not_found", error.to_string())
            }
            RegistryError::Exists { .. } => ApiError::new(StatusCode::CONFLICT, "conflict", error.to_string()),
            RegistryError::Unreadable(..)
            | RegistryError::File(_)
            | RegistryError::BadUrl { .. }
            | RegistryError::Store { .. }
            | RegistryError::Cache(..)
            | RegistryError::PartSize(_)
            | RegistryError::Runtime(_)
            | RegistryError::Stopped => model_unreadable(&error),
        }
    }
}

/// A 500 for a registry or loading failure: the detail goes to the log, not to the client.
fn model_unreadable(error: &dyn std::error::Error) -> ApiError {
    tracing::error!(error = %error, "model registry error");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "model_unreadable",
        "the model registry could not be read; see the server log",
    )
}

impl From<TrainerError> for ApiError {
    fn from(error: TrainerError) -> Self {
        let conflict = |message: String| ApiError::new(StatusCode::CONFLICT, "conflict", message);
        match error {
            // The loop's refusals, with the route that gets the operator further where there is one.
            TrainerError::ExperimentRunning => {
                conflict("an experiment is running; stop it (DELETE /v1/admin/experiments) before retraining".into())
            }
            TrainerError::NothingToPromote => conflict(
                "no canary or experiment to promote; name a version: POST /v1/admin/models/{name}/promote".into(),
            ),
            TrainerError::Disabled
            | TrainerError::Busy { .. }
            | TrainerError::BecameBusy
            | TrainerError::NothingToRollBack
            | TrainerError::NoExperiment => conflict(error.to_string()),
            TrainerError::InvalidExperiment => ApiError::bad_request("invalid_request", error.to_string()),
            TrainerError::NotLeader { .. } => ApiError::new(StatusCode::CONFLICT, "not_leader", error.to_string()),
            TrainerError::Control(_) => {
                tracing::warn!(error = %error, "control record not published");
                ApiError::unavailable("control_unavailable", "the serving state could not be published; retry", 2)
            }
            TrainerError::Version(RegistryError::BadName(_)) => {
                ApiError::bad_request("invalid_request", error.to_string())
            }
            TrainerError::Version(RegistryError::NotFound { .. } | RegistryError::Empty(_)) => {
                ApiError::not_found("model_not_found", error.to_string())
            }
            TrainerError::Version(_) | TrainerError::Unreadable(_) | TrainerError::LoadStopped(_) => {
                model_unreadable(&error)
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        tracing::warn!(error = %error, "profile store unavailable");
        ApiError::unavailable("store_unavailable", "user profiles are temporarily unavailable", 2)
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        tracing::warn!(error = %e, "session could not answer");
        ApiError::unavailable("unavailable", "recommendations are temporarily unavailable", 1)
    }
}

impl From<actix::MailboxError> for ApiError {
    fn from(e: actix::MailboxError) -> Self {
        tracing::warn!(error = %e, "actor mailbox error");
        ApiError::unavailable("unavailable", "the service is temporarily unavailable", 1)
    }
}

/// A query string `web::Query` could not read: `400 invalid_query`, with `field` the parameter
/// to blame when the message names it (serde's `unknown field `x``, `duplicate field `x``,
/// `missing field `x``, or a reader's message that starts with `` `x` ``, as the list
/// parameters' do).
pub fn query_error(error: &actix_web::error::QueryPayloadError) -> ApiError {
    let message = error.to_string();
    let error = ApiError::bad_request("invalid_query", message.clone());
    match query_field(&message) {
        Some(field) => error.with_field(field),
        None => error,
    }
}

fn query_field(message: &str) -> Option<&str> {
    let detail = message.strip_prefix("Query deserialize error: ").unwrap_or(message);
    let named = ["unknown field `", "duplicate field `", "missing field `", "`"]
        .iter()
        .find_map(|prefix| detail.strip_prefix(prefix))?;
    named.split_once('`').map(|(name, _)| name).filter(|name| !name.is_empty())
}

/// Turns a serde_json error on a request body into 400 (not JSON) or 422 (JSON of the wrong
/// shape), naming the field when serde knows it.
pub fn json_error(error: serde_path_to_error::Error<serde_json::Error>, what: &'static str) -> ApiError {
    let path = error.path().to_string();
    let inner = error.into_inner();
    match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof | serde_json::error::Category::Io => {
            ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {inner}"))
        }
        serde_json::error::Category::Data => {
            let err = ApiError::unprocessable(what, inner.to_string());
            if path.is_empty() || path == "." {
                err
            } else {
                err.with_field(path)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_errors_name_the_parameter_when_the_message_does() {
        let field = |m: &str| query_field(m).map(str::to_owned);
        assert_eq!(
            field("Query deserialize error: unknown field `colour`, expected one of `k`"),
            Some("colour".into())
        );
        assert_eq!(field("Query deserialize error: duplicate field `k`"), Some("k".into()));
        assert_eq!(field("Query deserialize error: `k` must be a whole number, not `abc`"), Some("k".into()));
        assert_eq!(field("Query deserialize error: invalid digit found in string"), None);
        assert_eq!(field("Query deserialize error: unknown variant `fridge`, expected one of `mobile`"), None);
    }
}
