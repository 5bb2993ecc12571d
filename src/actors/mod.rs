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

/// The embedded default's session dependencies for unit tests, on the current arbiter: a
/// co-occurrence model on a thread of its own, a monitor, an unbounded memory store.
#[cfg(test)]
pub(crate) fn test_deps(config: Config) -> Arc<SessionDeps> {
    use actix::Actor;

    use crate::eventlog::EventLog;
    use crate::models::cooccurrence::CoocModel;
    use crate::models::Recommender;
    use crate::store::memory::{MemoryBounds, MemoryStore};
    use crate::store::ProfileLimits;

    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());
    let catalog = Arc::new(Catalog::new());
    let cooc = config.model.cooccurrence.clone();
    let factory: model::ModelFactory =
        Arc::new(move || -> Box<dyn Recommender> { Box::new(CoocModel::new(cooc.clone())) });
    let model = model::ModelActor::start_with(
        Box::new(CoocModel::new(config.model.cooccurrence.clone())),
        factory,
        catalog.clone(),
        metrics.clone(),
        1,
        std::time::Duration::ZERO,
        16,
    );
    let monitor = monitor::MonitorActor::new(config.monitor.clone(), catalog.clone(), metrics.clone());
    let monitor_inbox = monitor.inbox();
    let monitor = monitor.start();
    let limits = ProfileLimits::sized(8, 8, 8);
    Arc::new(SessionDeps {
        event_log: EventLog::new(60, 100),
        store: Arc::new(MemoryStore::new(limits, MemoryBounds::UNBOUNDED, metrics.clone())),
        config,
        catalog,
        model,
        monitor,
        monitor_inbox,
        metrics,
        pseudonyms: Default::default(),
        cold_lists: Arc::new(cold_lists::ColdLists::new(0)),
    })
}
