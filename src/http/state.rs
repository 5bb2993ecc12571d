//! `AppState`: what every handler shares (the actors it talks to, the store, the bus, the
//! configuration, credentials and limits).

use std::sync::Arc;

use tokio::sync::watch;

use super::error::ApiError;
use super::limits;
use crate::actors::registry::SessionRegistry;
use crate::bus::EventBus;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::event::{check_id, UserId};
use crate::store::ProfileStore;
use crate::telemetry::Metrics;

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
    /// Where catalogue changes go: applied here, or through Kafka to every instance.
    pub items: Arc<crate::actors::catalog_feed::CatalogFeed>,
    pub metrics: Arc<Metrics>,
    /// Becomes true when the server starts shutting down; streams close on it.
    pub shutdown: watch::Receiver<bool>,
    /// The model registry (a local folder, or object storage shared by every instance).
    pub model_registry: crate::models::registry::Registry,
    /// Production mode: who leads the loop, and whether the desired serving state is applied
    /// (none in the embedded mode).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The non-personal lists (popular, trending, latest, similar), refreshed on a period.
    pub lists: Arc<super::segment_lists::SegmentLists>,
}

impl AppState {
    /// Validates a user id taken from a path or a message.
    pub fn user_id(&self, raw: &str, field: &str) -> Result<UserId, ApiError> {
        check_id(field, raw, self.config.events.max_id_len)
            .map_err(|e| ApiError::bad_request("invalid_user_id", e.message).with_field(e.field))?;
        Ok(self.pseudonyms.user(raw))
    }
}
