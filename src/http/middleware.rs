//! The middleware every request passes before its handler: the connection caps and rate limits
//! of `http::limits`.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::{web, ResponseError};

use super::error::ApiError;
use super::limits::ConnectionSlot;
use super::state::AppState;

/// Refuses requests on a connection over a cap, or over a rate limit, before any handler runs;
/// probes and scrapes are exempt.
pub async fn limit(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let path = req.path();
    let exempt = matches!(path, "/healthz" | "/readyz" | "/metrics");
    if !exempt {
        if let Some(error) = req.conn_data::<ConnectionSlot>().and_then(ConnectionSlot::refusal) {
            if let Some(state) = req.app_data::<web::Data<AppState>>() {
                state.metrics.http_connections_refused.inc();
            }
            let mut response = req.into_response(error.error_response());
            response.response_mut().head_mut().set_connection_type(actix_web::http::ConnectionType::Close);
            return Ok(response.map_into_right_body());
        }
        if let Some(state) = req.app_data::<web::Data<AppState>>() {
            let credential = super::auth::credential(req.request());
            if let Err(seconds) = state.limiters.check(req.peer_addr().map(|a| a.ip()), credential.as_deref()) {
                state.metrics.http_rate_limited.inc();
                let error = ApiError {
                    retry_after: Some(seconds),
                    ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many requests; slow down")
                };
                return Ok(req.into_response(error.error_response()).map_into_right_body());
            }
        }
    }
    next.call(req).await.map(ServiceResponse::map_into_left_body)
}
