//! `GET /v1/monitor`: what the monitor sees over its window (CTR and conversion by model version
//! and variant, coverage, diversity, novelty, business figures, drift scores, breaches): in
//! production mode the whole cluster's, with this instance's own under `local`.

use actix_web::{web, HttpResponse};

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use crate::actors::monitor::GetReport;
use crate::auth::Role;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/monitor").route(web::get().to(report)));
}

/// The monitor's report
///
/// What the monitor sees over its window: CTR and conversion by model version and variant,
/// coverage, diversity, novelty, business figures, drift scores and breaches (see
/// docs/monitoring.md). In production mode (Kafka bus) these are the whole cluster's, every
/// instance's reports merged, and the reply adds `instance` (this one's id), `instances` (each
/// instance that reported within the window, with `id` and `last_report_ms`) and `local` (the
/// same fields for this instance's traffic alone). Needs the `admin` role.
#[utoipa::path(
    get,
    path = "/v1/monitor",
    tag = "operations",
    responses(
        (status = 200, description = "The report (fields in docs/monitoring.md); in production mode also `instance`, `instances` and `local`", body = Object),
        (status = 403, description = "The credential is not an admin", body = ErrorBody),
    )
)]
pub async fn report(state: web::Data<AppState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let report = state.monitor.send(GetReport).await?;
    Ok(HttpResponse::Ok().json(report))
}
