//! The actors: one session per active user, the model actor that batches scoring, and the ingest
//! actors that move events from the bus to sessions. Nothing here knows HTTP types.

pub mod catalog_feed;
pub mod cold_lists;
pub mod control;
pub mod ingest;
pub mod kafka_ingest;
pub mod lists;
pub mod messages;
pub mod model;
pub mod monitor;
pub mod registry;
pub mod session;
pub mod trainer;

use std::sync::Arc;

use actix::Addr;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::store::ProfileStore;
use crate::telemetry::Metrics;

/// What every session needs, shared by `Arc`.
pub struct SessionDeps {
    pub config: Arc<Config>,
    pub catalog: Arc<Catalog>,
    pub store: Arc<dyn ProfileStore>,
    pub model: model::ModelHandle,
    pub monitor: Addr<monitor::MonitorActor>,
    /// Where sessions leave their reports for the monitor ([`monitor::MonitorActor::inbox`]).
    pub monitor_inbox: Arc<monitor::MonitorInbox>,
    pub metrics: Arc<Metrics>,
    /// Recent applied events, for the trainer.
    pub event_log: Arc<crate::eventlog::EventLog>,
    /// User ids as liverec keeps them (pseudonyms when `privacy.pseudonymize` is on).
    pub pseudonyms: Arc<crate::privacy::Pseudonyms>,
    /// Cold-start lists shown to users without a session, for the session that starts later.
    pub cold_lists: Arc<cold_lists::ColdLists>,
}
