//! Start-up of the catalogue's feed: in process, or through the Kafka items topic with its
//! supervised consumer; and the events consumer, started only once the catalogue is loaded.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix::{Actor, Addr, Arbiter, Supervised, Supervisor};
use rdkafka::producer::FutureProducer;

use crate::actors::catalog_feed::{CatalogConsumer, CatalogFeed};
use crate::actors::registry::SessionRegistry;
use crate::bus::items::KafkaItems;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::telemetry::Metrics;

/// The feed, and in production mode (a `producer` given) its items consumer, both on `thread`
/// (the consumer and the expiry timer).
pub(super) fn start_feed(
    config: &Config,
    catalog: Arc<Catalog>,
    registry: &Arc<SessionRegistry>,
    metrics: &Arc<Metrics>,
    producer: Option<FutureProducer>,
    thread: &Arbiter,
) -> (Arc<CatalogFeed>, Option<Addr<CatalogConsumer>>) {
    let max_items = config.catalog.max_items;
    let Some(producer) = producer else {
        let feed = CatalogFeed::embedded(catalog, registry.clone(), metrics.clone(), max_items);
        thread.spawn(feed.clone().run_expiry());
        return (feed, None);
    };
    let timeout = Duration::from_millis(config.kafka.produce_timeout_ms);
    let topic = KafkaItems::new(producer.clone(), config.kafka.items_topic_name(), timeout);
    let feed = CatalogFeed::kafka(catalog, registry.clone(), metrics.clone(), max_items, topic, timeout);
    thread.spawn(feed.clone().run_expiry());
    let (kafka, reader, metrics) = (config.kafka.clone(), feed.clone(), metrics.clone());
    let max_id_len = config.events.max_id_len;
    let consumer = Supervisor::start_in_arbiter(&thread.handle(), move |_| {
        CatalogConsumer::new(kafka, reader, producer, metrics, max_id_len)
    });
    (feed, Some(consumer))
}

/// Starts the supervised actor `make` builds on `thread` once `feed` has loaded the catalogue.
/// Events name items: consumed earlier, an instance with `catalog.accept_unknown_items = false`
/// would dead-letter events naming items it has not read yet, and lists could show items deleted
/// before it started.
pub(super) fn start_when_loaded<A>(
    thread: &Arbiter,
    feed: &CatalogFeed,
    make: impl FnOnce() -> A + Send + 'static,
) -> Arc<OnceLock<Addr<A>>>
where
    A: Actor<Context = actix::Context<A>> + Supervised,
{
    let slot = Arc::new(OnceLock::new());
    let (filled, mut loaded) = (slot.clone(), feed.loaded());
    thread.spawn(async move {
        if loaded.wait_for(|loaded| *loaded).await.is_ok() {
            let _ = filled.set(Supervisor::start(move |_| make()));
        }
    });
    slot
}
