//! Liveness, readiness and metrics (the root path serves the dashboard).

use actix_web::{web, HttpResponse};
use serde::Serialize;

use super::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/healthz").route(web::get().to(healthz)))
        .service(web::resource("/readyz").route(web::get().to(readyz)))
        .service(web::resource("/metrics").route(web::get().to(metrics)));
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    status: &'static str,
}

/// Liveness
///
/// The process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    security(()),
    responses((status = 200, description = "Alive", body = Health))
)]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready`; with 503, `shutting_down`, `loading_catalog` while a production instance
    /// reads the Kafka items topic at start, or `loading_serving_version` until it has applied
    /// the newest desired serving state of the control topic (the loop across instances).
    status: &'static str,
    /// The profile store: `memory` or `redis`.
    store: &'static str,
    /// The event bus: `memory` or `kafka`.
    bus: String,
    /// False when state lives in this process's memory only (the embedded default).
    durable: bool,
    /// True while the store is unreachable and writes are being retried, Kafka ingest is
    /// stalled, or the consumer group refuses this instance; `degraded_reasons` says which.
    degraded: bool,
    /// `store_unreachable`, `kafka_ingest_stalled` (a consumed batch has not become durable for
    /// 30 s: no later offset is committed), `kafka_group_refused` (the group's other members use
    /// another `kafka.assignment`, or the brokers refuse `kafka.session_timeout_ms`: nothing is
    /// consumed here); empty when not degraded.
    degraded_reasons: Vec<&'static str>,
    catalog_items: usize,
    /// Users with a session on this instance.
    users: usize,
    /// Kafka partitions assigned to this instance (production mode).
    kafka_partitions: Vec<i32>,
}

/// Readiness
///
/// Ready once the catalogue is loaded (production mode reads the Kafka items topic at start)
/// and the desired serving state applied (production mode reads the control topic at start),
/// and while not shutting down. Reports which bus and store are in use, and says plainly when
/// state is kept in memory only.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Shutting down, or still loading the catalogue or the serving version", body = Readiness),
    )
)]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let shutting_down = *state.shutdown.borrow();
    let loading_catalog = state.metrics.catalog_loading.get() > 0;
    let loading_version = state.cluster.as_ref().is_some_and(|cluster| !cluster.applied_at_start());
    let loading = loading_catalog || loading_version;
    let mut reasons = Vec::new();
    if state.store.degraded() {
        reasons.push("store_unreachable");
    }
    if state.metrics.kafka_stalled.get() > 0 {
        reasons.push("kafka_ingest_stalled");
    }
    if state.metrics.kafka_group_refused.get() > 0 {
        reasons.push("kafka_group_refused");
    }
    let body = Readiness {
        status: if shutting_down {
            "shutting_down"
        } else if loading_catalog {
            "loading_catalog"
        } else if loading_version {
            "loading_serving_version"
        } else {
            "ready"
        },
        store: state.store.kind(),
        bus: format!("{:?}", state.config.bus.kind).to_lowercase(),
        durable: state.store.kind() != "memory",
        degraded: !reasons.is_empty(),
        degraded_reasons: reasons,
        catalog_items: state.catalog.len(),
        users: state.registry.len(),
        kafka_partitions: state.registry.assigned(),
    };
    if shutting_down || loading {
        HttpResponse::ServiceUnavailable().json(body)
    } else {
        HttpResponse::Ok().json(body)
    }
}

/// Metrics
///
/// Every metric in the Prometheus text format (docs/observability.md lists them).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security(()),
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"))
)]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    if let Some(queued) = state.bus.queued_batches() {
        state.metrics.ingest_queued.set(queued as i64);
    }
    state.metrics.eventlog_events.set(state.event_log.len() as i64);
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render())
}
