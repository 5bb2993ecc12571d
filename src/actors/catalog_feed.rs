//! The catalogue's changes, wherever they come from, and `CatalogConsumer`, which reads them
//! from the Kafka items topic in production mode.
//!
//! [`CatalogFeed`] is the one way into the catalogue for `PUT` and `DELETE /v1/items`. In the
//! embedded mode it applies a change at once. In production mode it produces the change to the
//! compacted items topic (`bus::items`) and answers once the broker has it; every instance's
//! `CatalogConsumer`, this one's included, then applies it. Either way the same
//! [`CatalogFeed::apply`] changes the catalogue and takes withdrawn items out of lists already
//! pushed: at once for a delete or `available: false`, at its `expires_at` otherwise (one timer
//! task for all items, not one per item).
//!
//! `CatalogConsumer` reads every partition of the items topic from the start (no consumer group:
//! every instance needs the whole catalogue), and the instance reports ready (`/readyz`) and
//! starts consuming events only once it has reached the end of every partition it found at
//! start (`liverec_catalog_loading` is 1 until then). Afterwards it follows the topic. A record
//! that cannot be applied (bad key or value, or a new item past `catalog.max_items`) goes to the
//! dead-letter topic, as a bad event does; every instance reads it, so each one sends it (the
//! copies share `liverec-source-partition` and `liverec-source-offset`).
//!
//! Supervision: the actor runs under an actix `Supervisor`. If the consumer fails (it cannot be
//! created, the topic is missing, or a fatal error) the actor stops and is restarted after a
//! capped exponential backoff (`kafka.restart_backoff_*`); restarts are counted in
//! `liverec_kafka_items_consumer_restarts_total`. A restart resumes from the offsets already
//! applied, which live in the feed, not the actor: the catalogue they describe outlives it.
//! Mailbox: the actor takes no messages; its input is the Kafka consumer itself.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::FutureExt as _;
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{watch, Notify};

use super::registry::SessionRegistry;
use crate::bus::items::{self, ItemChange, KafkaItems};
use crate::bus::kafka::{send_dead_letter, DeadLetter};
use crate::bus::BusError;
use crate::catalog::Catalog;
use crate::config::KafkaConfig;
use crate::event::{now_ms, ItemId};
use crate::telemetry::Metrics;

/// Why a change of the catalogue was refused.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// Putting the items would take the catalogue past `catalog.max_items`.
    #[error(
        "the catalogue holds {listed} items and these would add {adding}; catalog.max_items is {max}: delete items or raise catalog.max_items"
    )]
    CatalogFull { max: usize, listed: usize, adding: usize },
    /// The items topic did not take the changes.
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl FeedError {
    /// A stable code, for clients and the dead-letter topic.
    pub fn code(&self) -> &'static str {
        match self {
            FeedError::CatalogFull { .. } => "catalog_full",
            FeedError::Bus(_) => "bus_unavailable",
        }
    }
}

/// Whether `adding` new items fit in a catalogue of `listed` items capped at `max` (0: no cap).
/// Replacing items (adding none) always fits, even in a catalogue over a lowered cap.
fn room(max: usize, listed: usize, adding: usize) -> Result<(), FeedError> {
    if max > 0 && adding > 0 && listed.saturating_add(adding) > max {
        return Err(FeedError::CatalogFull { max, listed, adding });
    }
    Ok(())
}

/// What a submitted batch did to the catalogue (for a `PUT /v1/items` answer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Submitted {
    /// Items new to the catalogue (or put again after a delete).
    pub created: usize,
    /// Items whose attributes were replaced.
    pub replaced: usize,
    /// Whether this instance's catalogue shows the changes already. Always in the embedded
    /// mode; in production mode unless the items consumer took longer than
    /// `kafka.produce_timeout_ms` (the changes are in Kafka, and arrive shortly).
    pub applied_here: bool,
}

/// Items to take out of pushed lists when their `expires_at` passes, soonest first.
#[derive(Default)]
struct Expiry {
    due: Mutex<BTreeSet<(i64, ItemId)>>,
    /// Woken when an item is added, in case it is due before the one slept for.
    changed: Notify,
}

/// The one way into the catalogue for changes (see the module docs).
pub struct CatalogFeed {
    catalog: Arc<Catalog>,
    registry: Arc<SessionRegistry>,
    metrics: Arc<Metrics>,
    /// `catalog.max_items` (0: no limit).
    max_items: usize,
    /// Production mode: the items topic changes are produced to.
    kafka: Option<KafkaItems>,
    /// How long a submit waits for this instance's consumer to apply what it produced.
    apply_wait: Duration,
    /// Next offset to read of each partition of the items topic, everything before it applied.
    applied: watch::Sender<Vec<i64>>,
    /// True once the catalogue holds what the items topic held when the instance started
    /// (at once in the embedded mode).
    loaded: watch::Sender<bool>,
    expiry: Expiry,
}

impl CatalogFeed {
    /// The embedded mode's feed: changes apply at once, and the catalogue is loaded from the start.
    pub fn embedded(
        catalog: Arc<Catalog>,
        registry: Arc<SessionRegistry>,
        metrics: Arc<Metrics>,
        max_items: usize,
    ) -> Arc<Self> {
        let feed = Self::new(catalog, registry, metrics, max_items, None, Duration::ZERO);
        feed.loaded.send_replace(true);
        Arc::new(feed)
    }

    /// Production mode's feed: changes go through `kafka`; the catalogue is loaded once a
    /// [`CatalogConsumer`] has read the items topic to its end.
    pub fn kafka(
        catalog: Arc<Catalog>,
        registry: Arc<SessionRegistry>,
        metrics: Arc<Metrics>,
        max_items: usize,
        kafka: KafkaItems,
        apply_wait: Duration,
    ) -> Arc<Self> {
        metrics.catalog_loading.set(1);
        Arc::new(Self::new(catalog, registry, metrics, max_items, Some(kafka), apply_wait))
    }

    fn new(
        catalog: Arc<Catalog>,
        registry: Arc<SessionRegistry>,
        metrics: Arc<Metrics>,
        max_items: usize,
        kafka: Option<KafkaItems>,
        apply_wait: Duration,
    ) -> Self {
        Self {
            catalog,
            registry,
            metrics,
            max_items,
            kafka,
            apply_wait,
            applied: watch::Sender::new(Vec::new()),
            loaded: watch::Sender::new(false),
            expiry: Expiry::default(),
        }
    }

    /// Becomes true once the catalogue is loaded (see [`CatalogFeed::kafka`]).
    pub fn loaded(&self) -> watch::Receiver<bool> {
        self.loaded.subscribe()
    }

    /// Refuses puts that would take the catalogue past `catalog.max_items`.
    fn check_room<'a>(&self, puts: impl IntoIterator<Item = &'a ItemId>) -> Result<(), FeedError> {
        if self.max_items == 0 {
            return Ok(());
        }
        room(self.max_items, self.catalog.listed(), self.catalog.unlisted(puts))
    }

    /// Makes `changes` (in order) the catalogue's: applied here in the embedded mode, produced to
    /// the items topic in production mode. The whole batch is refused if its new items would
    /// take the catalogue past `catalog.max_items`.
    pub async fn submit(&self, changes: Vec<(ItemId, ItemChange)>) -> Result<Submitted, FeedError> {
        let puts = changes.iter().filter(|(_, c)| matches!(c, ItemChange::Put(_))).map(|(id, _)| id);
        self.check_room(puts)?;
        let Some(kafka) = &self.kafka else {
            let applied = self.apply(changes, false);
            return Ok(Submitted { created: applied.created, replaced: applied.replaced, applied_here: true });
        };
        // What the changes will do, as this instance's catalogue sees it now.
        let mut counts = Submitted::default();
        let mut seen = HashSet::new();
        for (id, change) in &changes {
            if let ItemChange::Put(_) = change {
                if self.catalog.unlisted([id]) == 1 && seen.insert(id.clone()) {
                    counts.created += 1;
                } else {
                    counts.replaced += 1;
                }
            }
        }
        let landed = kafka.publish(&changes).await?;
        // Read your writes: answer once this instance's catalogue shows the changes, which the
        // consumer applies in topic order, so a later change by another instance is never
        // undone by this one.
        let mut applied = self.applied.subscribe();
        let shows = applied.wait_for(|next| {
            landed.iter().all(|&(partition, offset)| {
                usize::try_from(partition).ok().and_then(|p| next.get(p)).is_some_and(|&n| n > offset)
            })
        });
        counts.applied_here = tokio::time::timeout(self.apply_wait, shows).await.is_ok_and(|r| r.is_ok());
        if !counts.applied_here {
            tracing::debug!(changes = changes.len(), "catalogue changes in kafka, not yet applied here");
        }
        Ok(counts)
    }

    /// Applies `changes` in order to this instance's catalogue and takes withdrawn items out of
    /// the lists already pushed. With `capped`, a put of a new item past `catalog.max_items` is
    /// skipped; its position is in the answer.
    pub fn apply(&self, changes: Vec<(ItemId, ItemChange)>, capped: bool) -> Applied {
        let now = now_ms();
        let mut applied = Applied::default();
        let mut now_gone = HashSet::new();
        let mut later = Vec::new();
        for (position, (id, change)) in changes.into_iter().enumerate() {
            match change {
                ItemChange::Put(attributes) => {
                    if capped && self.check_room([&id]).is_err() {
                        applied.refused.push(position);
                        continue;
                    }
                    let leaves = if attributes.available == Some(false) { Some(now) } else { attributes.expires_at };
                    if self.catalog.put(&id, attributes).1 {
                        applied.created += 1;
                    } else {
                        applied.replaced += 1;
                    }
                    match leaves {
                        Some(at) if at > now => later.push((at, id)),
                        Some(_) => {
                            now_gone.insert(id);
                        }
                        None => {}
                    }
                }
                ItemChange::Delete => {
                    self.catalog.delete_any(&id);
                    applied.deleted += 1;
                    now_gone.insert(id);
                }
            }
        }
        if !later.is_empty() {
            self.expiry.due.lock().extend(later);
            self.expiry.changed.notify_one();
        }
        if !now_gone.is_empty() {
            // The walk over the hubs runs off the caller (a request, the consumer), on its thread.
            let registry = self.registry.clone();
            actix_rt::spawn(async move {
                let asked = registry.refresh_lists_holding(&now_gone);
                tracing::debug!(items = now_gone.len(), sessions = asked, "lists showing withdrawn items re-scored");
            });
        }
        applied
    }

    /// Takes items out of pushed lists as their `expires_at` passes: one task for all of them,
    /// asleep until the soonest. Runs until its thread stops.
    pub async fn run_expiry(self: Arc<Self>) {
        loop {
            let now = now_ms();
            let (due, next) = {
                let mut queue = self.expiry.due.lock();
                let later = queue.split_off(&(now + 1, ItemId::from("")));
                let due = std::mem::replace(&mut *queue, later);
                (due, queue.first().map(|(at, _)| *at))
            };
            // An item put again since without an expiry (or a later one) stays.
            let due: HashSet<ItemId> =
                due.into_iter().map(|(_, id)| id).filter(|id| !self.catalog.is_available(id, now)).collect();
            if !due.is_empty() {
                let asked = self.registry.refresh_lists_holding(&due);
                tracing::debug!(items = due.len(), sessions = asked, "lists showing expired items re-scored");
            }
            // notify_one keeps a wake-up given while this task was not waiting.
            let changed = self.expiry.changed.notified();
            match next {
                Some(at) => {
                    let wait = Duration::from_millis(u64::try_from(at - now).unwrap_or(0).max(1));
                    tokio::select! {
                        () = actix_rt::time::sleep(wait) => {}
                        () = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    /// Records that everything before `next` (per partition) is applied.
    fn advance(&self, next: &[i64]) {
        self.applied.send_modify(|applied| {
            if applied.len() < next.len() {
                applied.resize(next.len(), 0);
            }
            for (mine, &theirs) in applied.iter_mut().zip(next) {
                *mine = (*mine).max(theirs);
            }
        });
    }

    fn mark_loaded(&self, started: Instant) {
        if self.loaded.send_replace(true) {
            return;
        }
        self.metrics.catalog_loading.set(0);
        tracing::info!(
            items = self.catalog.listed(),
            seconds = started.elapsed().as_secs_f64(),
            "catalogue loaded from the items topic"
        );
    }
}

/// What [`CatalogFeed::apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    pub created: usize,
    pub replaced: usize,
    pub deleted: usize,
    /// Positions of puts refused by `catalog.max_items`.
    pub refused: Vec<usize>,
}

/// Reads the items topic into the catalogue (see the module docs).
pub struct CatalogConsumer {
    config: KafkaConfig,
    feed: Arc<CatalogFeed>,
    /// For the dead-letter topic.
    producer: FutureProducer,
    metrics: Arc<Metrics>,
    /// `events.max_id_len`: the bound on an item id (the record's key).
    max_id_len: usize,
    restarts: u32,
    started_at: Instant,
}

impl CatalogConsumer {
    pub fn new(
        config: KafkaConfig,
        feed: Arc<CatalogFeed>,
        producer: FutureProducer,
        metrics: Arc<Metrics>,
        max_id_len: usize,
    ) -> Self {
        Self { config, feed, producer, metrics, max_id_len, restarts: 0, started_at: Instant::now() }
    }
}

impl Actor for CatalogConsumer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let delay = self.config.restart_backoff(self.restarts);
        self.started_at = Instant::now() + delay;
        ctx.run_later(delay, |act, ctx| {
            let run = ReadItems {
                config: act.config.clone(),
                feed: act.feed.clone(),
                producer: act.producer.clone(),
                metrics: act.metrics.clone(),
                max_id_len: act.max_id_len,
            }
            .run();
            ctx.spawn(run.into_actor(act).map(|result, _act, ctx| {
                if let Err(error) = result {
                    tracing::error!(error = %error, "kafka items consumer failed; restarting");
                }
                ctx.stop();
            }));
        });
    }
}

impl Supervised for CatalogConsumer {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.metrics.kafka_items_restarts.inc();
        // A consumer that ran for a good while before failing starts over from a short backoff.
        if self.started_at.elapsed() > Duration::from_secs(60) {
            self.restarts = 0;
        }
        self.restarts = self.restarts.saturating_add(1);
    }
}

/// The items consumer's context: librdkafka also reports each partition end (which the loop
/// handles) as a client error, which would otherwise be logged as one every time.
struct ItemsContext;

impl ClientContext for ItemsContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            tracing::error!(error = %error, reason, "kafka items consumer client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ItemsContext {}

/// One run of the items consumer, from its creation to a failure.
struct ReadItems {
    config: KafkaConfig,
    feed: Arc<CatalogFeed>,
    producer: FutureProducer,
    metrics: Arc<Metrics>,
    max_id_len: usize,
}

impl ReadItems {
    async fn run(self) -> Result<(), KafkaError> {
        let started = Instant::now();
        let topic = self.config.items_topic_name();
        let partitions = self.partitions(&topic).await?;
        // A consumer without a group would not take an assignment; assign() joins no group and
        // nothing is committed, so every instance may share this id.
        let consumer: StreamConsumer<ItemsContext> = self
            .config
            .items_consumer_config()
            .set("group.id", format!("{}.catalog", self.config.group_id))
            .create_with_context(ItemsContext)?;
        let resume = self.feed.applied.borrow().clone();
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            let offset = match resume.get(partition as usize) {
                Some(&next) if next > 0 => Offset::Offset(next),
                _ => Offset::Beginning,
            };
            assignment.add_partition_offset(&topic, partition, offset)?;
        }
        consumer.assign(&assignment)?;
        tracing::info!(topic = %topic, partitions, "kafka items consumer started");
        let mut at_end = vec![false; partitions as usize];
        let mut next = vec![0i64; partitions as usize];
        loop {
            let first = match consumer.recv().await {
                Ok(message) => Some(message),
                Err(KafkaError::PartitionEOF(partition)) => {
                    self.reached_end(partition, &mut at_end, started);
                    None
                }
                Err(error) if consumer.client().fatal_error().is_none() => {
                    self.metrics.kafka_errors.inc();
                    tracing::warn!(error = %error, "kafka items consumption error; continuing");
                    actix_rt::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(error) => return Err(error),
            };
            let mut records: Vec<BorrowedMessage<'_>> = first.into_iter().collect();
            let mut ends = Vec::new();
            // Take whatever else is already fetched, up to the batch size, without waiting.
            while !records.is_empty() && records.len() < self.config.max_batch {
                match consumer.recv().now_or_never() {
                    Some(Ok(message)) => records.push(message),
                    // Noted after this batch is applied: the end comes after its records.
                    Some(Err(KafkaError::PartitionEOF(partition))) => {
                        ends.push(partition);
                        break;
                    }
                    Some(Err(_)) | None => break,
                }
            }
            if !records.is_empty() {
                self.apply(records, &mut next).await;
                self.feed.advance(&next);
            }
            for partition in ends {
                self.reached_end(partition, &mut at_end, started);
            }
        }
    }

    /// How many partitions the items topic has (an error while it does not exist). A topic just
    /// created may take a moment to appear in the metadata: asked a few times before failing.
    async fn partitions(&self, topic: &str) -> Result<i32, KafkaError> {
        let (config, topic) = (self.config.items_consumer_config(), topic.to_owned());
        // Metadata requests block; run on the blocking pool, off the consumer's thread.
        actix_rt::task::spawn_blocking(move || {
            let client: BaseConsumer = config.create()?;
            let mut tries = 0;
            loop {
                let metadata = client.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
                let error = match metadata.topics().iter().find(|t| t.name() == topic) {
                    Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                        return Ok(t.partitions().len() as i32)
                    }
                    Some(t) => t.error().map_or(RDKafkaErrorCode::UnknownTopicOrPartition, Into::into),
                    None => RDKafkaErrorCode::UnknownTopicOrPartition,
                };
                tries += 1;
                if tries >= 10 {
                    return Err(KafkaError::MetadataFetch(error));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .await
        .unwrap_or_else(|_| Err(KafkaError::MetadataFetch(RDKafkaErrorCode::Fail)))
    }

    fn reached_end(&self, partition: i32, at_end: &mut [bool], started: Instant) {
        if let Some(end) = usize::try_from(partition).ok().and_then(|p| at_end.get_mut(p)) {
            *end = true;
        }
        if at_end.iter().all(|&end| end) {
            self.feed.mark_loaded(started);
        }
    }

    /// Decodes and applies a batch in order; bad records go to the dead-letter topic (and are
    /// there before the batch counts as applied).
    async fn apply(&self, records: Vec<BorrowedMessage<'_>>, next: &mut Vec<i64>) {
        let mut changes = Vec::with_capacity(records.len());
        let mut sources = Vec::with_capacity(records.len());
        let mut dead = Vec::new();
        for record in &records {
            let partition = usize::try_from(record.partition()).unwrap_or(0);
            if next.len() <= partition {
                next.resize(partition + 1, 0);
            }
            next[partition] = next[partition].max(record.offset() + 1);
            match items::decode(record.key(), record.payload(), self.max_id_len) {
                Ok(change) => {
                    changes.push(change);
                    sources.push(record);
                }
                Err(bad) => dead.push(dead_letter(record, bad.code(), bad.to_string())),
            }
        }
        self.metrics.kafka_items_records.add(records.len() as u64);
        let applied = self.feed.apply(changes, true);
        for position in applied.refused {
            let full =
                FeedError::CatalogFull { max: self.feed.max_items, listed: self.feed.catalog.listed(), adding: 1 };
            dead.push(dead_letter(sources[position], full.code(), full.to_string()));
        }
        drop(sources);
        drop(records);
        for letter in dead {
            self.dead_letter(letter).await;
        }
    }

    /// Produces a bad record to the dead-letter topic; returns once the broker has it.
    async fn dead_letter(&self, letter: DeadLetter) {
        self.metrics.kafka_dead_letters.inc();
        tracing::warn!(partition = letter.partition, offset = letter.offset, code = letter.code, reason = %letter.reason, "items record sent to the dead-letter topic");
        let (topic, source) = (self.config.dead_letter_topic.clone(), self.config.items_topic_name());
        send_dead_letter(self.producer.clone(), topic, source, letter).await;
    }
}

fn dead_letter(record: &BorrowedMessage<'_>, code: &'static str, reason: String) -> DeadLetter {
    DeadLetter {
        key: record.key().map(<[u8]>::to_vec),
        payload: record.payload().map(<[u8]>::to_vec),
        partition: record.partition(),
        offset: record.offset(),
        code,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_takes_new_items_up_to_it_and_replacements_always() {
        assert!(room(3, 1, 2).is_ok());
        let full = room(3, 2, 2).expect_err("one too many");
        assert_eq!(full.code(), "catalog_full");
        let message = full.to_string();
        assert!(message.contains("catalog.max_items is 3") && message.contains("holds 2"), "{message}");
        assert!(room(3, 5, 0).is_ok(), "replacing items in a catalogue over a lowered cap");
        assert!(room(0, usize::MAX, 10).is_ok(), "0: no cap");
    }
}
