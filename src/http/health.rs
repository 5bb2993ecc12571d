//! Liveness, readiness and metrics (the root path serves the dashboard).

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// Ready while not shutting down. Reports which bus and store are in use, and says plainly when
/// state is kept in memory only.
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let shutting_down = *state.shutdown.borrow();
    let durable = state.store.kind() != "memory";
    let body = json!({
        "status": if shutting_down { "shutting_down" } else { "ready" },
        "store": state.store.kind(),
        "bus": format!("{:?}", state.config.bus.kind).to_lowercase(),
        "durable": durable,
        "degraded": state.store.degraded(),
        "catalog_items": state.catalog.len(),
        "users": state.registry.len(),
        "kafka_partitions": state.registry.assigned(),
    });
    if shutting_down {
        HttpResponse::ServiceUnavailable().json(body)
    } else {
        HttpResponse::Ok().json(body)
    }
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    if let Some(queued) = state.bus.queued_batches() {
        state.metrics.ingest_queued.set(queued as i64);
    }
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render())
}
