//! A time window of the events topic, read whole for training (production mode): the trainer
//! learns from every user's events, whichever instance owns them, and from what Kafka keeps
//! rather than from one process's memory.
//!
//! The window starts at the offsets for its start time on every partition (`offsets_for_times`,
//! by record timestamp) and ends at the partitions' high watermarks taken once, before reading:
//! a consistent end, so events that arrive while the window is read wait for the next run. A
//! partition is read until its end offset (or its end of partition: transaction markers take
//! offsets no record carries). No progress on any partition for [`WindowReader::stall_after`]
//! ends the read with an error; the reader demands no rate.
//!
//! Records are decoded as the Kafka ingest applies them ([`super::record::RecordDecoder`]: the
//! same validation, catalogue admission and pseudonyms); records the ingest sends to the
//! dead-letter topic, control records (reloads, lists shown elsewhere) and repeated event ids of
//! a user are skipped and counted.
//! Events of an erased user dated at or before the erasure are dropped, as a session drops them
//! (the tombstones are looked up by the caller, who knows the store). At most
//! [`WindowReader::max_events`] are kept, the newest, as the in-memory log keeps them.
//!
//! The reader blocks: it runs on the training thread, never on an actor's.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::record::{EventRecord, RecordDecoder};
use crate::catalog::Catalog;
use crate::config::KafkaConfig;
use crate::event::{now_ms, EventId, EventLimits, UserId};
use crate::eventlog::{Interaction, LoggedEvent};
use crate::privacy::Pseudonyms;

/// How long a metadata or offsets request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What one partition gave the window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionWindow {
    pub partition: i32,
    /// The first offset read (the first at or after the window's start).
    pub from_offset: i64,
    /// The partition's high watermark when the read started: the window ends before it.
    pub end_offset: i64,
    /// Events kept for training.
    pub events: usize,
}

/// Records read but not kept, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkippedRecords {
    /// Records the ingest sends to the dead-letter topic.
    pub invalid: usize,
    /// Control records: reloads and lists shown elsewhere (no event).
    pub controls: usize,
    /// Event ids a user already had in the window (a retried publish): applied once.
    pub duplicates: usize,
    /// Events of erased users dated at or before their erasure.
    pub erased: usize,
    /// The oldest events beyond `max_events`.
    pub trimmed: usize,
}

/// The window read.
pub struct Window {
    /// Oldest first, by record time; each partition's events in offset order.
    pub events: Vec<Arc<LoggedEvent>>,
    pub partitions: Vec<PartitionWindow>,
    pub skipped: SkippedRecords,
}

#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("the events topic {topic} has no partitions in the broker's metadata")]
    NoTopic { topic: String },
    #[error("reading the events topic made no progress for {secs} s (partitions still to read: {partitions:?})")]
    Stalled { secs: u64, partitions: Vec<i32> },
    #[error("cannot tell which users were erased: {0}")]
    Tombstones(Box<dyn std::error::Error + Send + Sync>),
}

/// The window consumer's context: librdkafka also reports each partition end (which the reader
/// handles) as a client error, which would otherwise be logged every time.
struct WindowContext;

impl ClientContext for WindowContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            tracing::warn!(error = %error, reason, "kafka training window consumer client error");
        }
    }
}

impl ConsumerContext for WindowContext {}

/// Reads windows of the events topic (see the module docs).
pub struct WindowReader {
    pub config: KafkaConfig,
    pub limits: EventLimits,
    pub catalog: Arc<Catalog>,
    pub pseudonyms: Arc<Pseudonyms>,
    /// Most events a window keeps (the newest): `trainer.max_events`.
    pub max_events: usize,
    /// No progress for this long ends a read with an error.
    pub stall_after: Duration,
    /// The client that asks for high watermarks (kept: they are asked for every second while a
    /// run waits for fresh events).
    watermarks: Mutex<Option<BaseConsumer<WindowContext>>>,
}

/// One partition while it is read.
struct Reading {
    partition: i32,
    from: i64,
    end: i64,
    done: bool,
    events: Vec<Arc<LoggedEvent>>,
    seen: HashSet<(UserId, EventId)>,
}

impl WindowReader {
    pub fn new(
        config: KafkaConfig,
        limits: EventLimits,
        catalog: Arc<Catalog>,
        pseudonyms: Arc<Pseudonyms>,
        max_events: usize,
        stall_after: Duration,
    ) -> Self {
        Self { config, limits, catalog, pseudonyms, max_events, stall_after, watermarks: Mutex::new(None) }
    }

    fn consumer(&self) -> Result<BaseConsumer<WindowContext>, KafkaError> {
        // assign() joins no group and nothing is committed; librdkafka still wants a group id.
        self.config
            .items_consumer_config()
            .set("group.id", format!("{}.training", self.config.group_id))
            .create_with_context(WindowContext)
    }

    /// Partitions of the events topic and their (low, high) watermarks, now.
    fn watermarks(&self, client: &BaseConsumer<WindowContext>) -> Result<Vec<(i32, i64, i64)>, WindowError> {
        let topic = &self.config.events_topic;
        let metadata = client.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        if partitions.is_empty() {
            return Err(WindowError::NoTopic { topic: topic.clone() });
        }
        partitions
            .into_iter()
            .map(|p| client.fetch_watermarks(topic, p, REQUEST_TIMEOUT).map(|(low, high)| (p, low, high)))
            .collect::<Result<_, _>>()
            .map_err(Into::into)
    }

    /// Records ever written to the events topic (the sum of its partitions' high watermarks):
    /// a count that only grows, for "so many new events since". It counts every record, reload
    /// controls and records the ingest rejects included. Blocks for a round trip or two.
    pub fn produced(&self) -> Result<u64, WindowError> {
        let mut client = self.watermarks.lock();
        if client.is_none() {
            *client = Some(self.consumer()?);
        }
        let marks = self.watermarks(client.as_ref().expect("just set"));
        if marks.is_err() {
            // A client in a bad state is rebuilt next time.
            *client = None;
        }
        Ok(marks?.iter().map(|&(_, _, high)| high.max(0) as u64).sum())
    }

    /// Reads the records from `start_ms` (record time, ms since the epoch) to the partitions'
    /// ends as they are when the read starts. `erased_at` is asked once, with every user seen,
    /// for the time each of them was erased (users never erased may be left out of its answer).
    pub fn read<E>(
        &self,
        start_ms: i64,
        erased_at: impl FnOnce(Vec<UserId>) -> Result<HashMap<UserId, i64>, E>,
    ) -> Result<Window, WindowError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let topic = self.config.events_topic.clone();
        let consumer = self.consumer()?;
        let marks = self.watermarks(&consumer)?;
        let mut times = TopicPartitionList::new();
        for &(partition, _, _) in &marks {
            times.add_partition_offset(&topic, partition, Offset::Offset(start_ms))?;
        }
        let starts = consumer.offsets_for_times(times, REQUEST_TIMEOUT)?;
        // A partition the broker could not answer for would silently leave the window short.
        for element in starts.elements() {
            element.error()?;
        }
        let bound = self.max_events.max(1) as i64;
        let mut parts: Vec<Reading> = marks
            .iter()
            .map(|&(partition, low, high)| {
                // No record at or after the start: the partition has nothing in the window.
                let at = match starts.find_partition(&topic, partition).map(|e| e.offset()) {
                    Some(Offset::Offset(offset)) => offset,
                    _ => high,
                };
                // More than max_events of one partition would be trimmed anyway: not read.
                let from = at.max(low).max(high - bound).min(high);
                Reading { partition, from, end: high, done: from >= high, events: Vec::new(), seen: HashSet::new() }
            })
            .collect();
        let mut assignment = TopicPartitionList::new();
        for part in parts.iter().filter(|p| !p.done) {
            assignment.add_partition_offset(&topic, part.partition, Offset::Offset(part.from))?;
        }
        let started = Instant::now();
        let mut skipped = SkippedRecords::default();
        if assignment.count() > 0 {
            consumer.assign(&assignment)?;
            self.consume(&consumer, &mut parts, &mut skipped)?;
        }
        let users: Vec<UserId> = {
            let mut users = HashSet::new();
            for part in &parts {
                users.extend(part.events.iter().map(|e| e.user.clone()));
            }
            users.into_iter().collect()
        };
        let erased = if users.is_empty() {
            HashMap::new()
        } else {
            erased_at(users).map_err(|e| WindowError::Tombstones(e.into()))?
        };
        let per_partition: Vec<Vec<Arc<LoggedEvent>>> = parts
            .iter_mut()
            .map(|part| {
                let (kept, dropped) = drop_erased(std::mem::take(&mut part.events), &erased);
                skipped.erased += dropped;
                kept
            })
            .collect();
        let (events, sources) = merge_oldest_first(per_partition);
        let trim = events.len().saturating_sub(self.max_events.max(1));
        skipped.trimmed = trim;
        let mut counts = vec![0usize; parts.len()];
        for &source in &sources[trim..] {
            counts[source] += 1;
        }
        let events: Vec<Arc<LoggedEvent>> = events.into_iter().skip(trim).collect();
        let partitions = parts
            .iter()
            .zip(counts)
            .map(|(p, events)| PartitionWindow {
                partition: p.partition,
                from_offset: p.from,
                end_offset: p.end,
                events,
            })
            .collect::<Vec<_>>();
        tracing::info!(
            topic = %topic,
            events = events.len(),
            partitions = partitions.len(),
            invalid = skipped.invalid,
            duplicates = skipped.duplicates,
            erased = skipped.erased,
            trimmed = skipped.trimmed,
            seconds = started.elapsed().as_secs_f64(),
            "training window read from the events topic"
        );
        Ok(Window { events, partitions, skipped })
    }

    /// Polls until every partition reached its end; fails after `stall_after` without progress.
    fn consume(
        &self,
        consumer: &BaseConsumer<WindowContext>,
        parts: &mut [Reading],
        skipped: &mut SkippedRecords,
    ) -> Result<(), WindowError> {
        let decoder = RecordDecoder { limits: &self.limits, catalog: &self.catalog, pseudonyms: &self.pseudonyms };
        let index: HashMap<i32, usize> = parts.iter().enumerate().map(|(i, p)| (p.partition, i)).collect();
        let mut progressed = Instant::now();
        while parts.iter().any(|p| !p.done) {
            if progressed.elapsed() >= self.stall_after {
                let partitions = parts.iter().filter(|p| !p.done).map(|p| p.partition).collect();
                return Err(WindowError::Stalled { secs: self.stall_after.as_secs(), partitions });
            }
            let (partition, record) = match consumer.poll(Duration::from_millis(200)) {
                None => continue,
                Some(Ok(record)) => (record.partition(), Some(record)),
                Some(Err(KafkaError::PartitionEOF(partition))) => (partition, None),
                Some(Err(error)) if consumer.client().fatal_error().is_none() => {
                    tracing::warn!(error = %error, "kafka error while reading the training window; continuing");
                    continue;
                }
                Some(Err(error)) => return Err(error.into()),
            };
            let Some(part) = index.get(&partition).map(|&i| &mut parts[i]) else { continue };
            if part.done {
                continue;
            }
            progressed = Instant::now();
            match record {
                // Past the end (records that arrived after the read started), or the end itself.
                None => part.done = true,
                Some(record) if record.offset() >= part.end => part.done = true,
                Some(record) => {
                    part.take(&decoder, &record, skipped);
                    part.done = record.offset() + 1 >= part.end;
                }
            }
            if part.done {
                // Nothing more of it is needed: stop fetching it.
                let mut list = TopicPartitionList::new();
                if list.add_partition(&self.config.events_topic, partition).set_offset(Offset::End).is_ok() {
                    let _ = consumer.pause(&list);
                }
            }
        }
        Ok(())
    }
}

impl Reading {
    /// Decodes one record and keeps its event if the ingest would apply it.
    fn take(&mut self, decoder: &RecordDecoder<'_>, record: &impl Message, skipped: &mut SkippedRecords) {
        // The record's time stands for the ingest's "now" (it consumed the record about then).
        let at = record.timestamp().to_millis().unwrap_or_else(now_ms);
        let event = match decoder.decode(record, at) {
            EventRecord::Event(event) => event,
            EventRecord::Reload(_) | EventRecord::Shown(..) => {
                skipped.controls += 1;
                return;
            }
            EventRecord::Invalid { .. } => {
                skipped.invalid += 1;
                return;
            }
        };
        if !self.seen.insert((event.user_id.clone(), event.event_id.clone())) {
            skipped.duplicates += 1;
            return;
        }
        let item = decoder.catalog.intern(&event.item_id);
        let segment = event.context.segment();
        // Whether a session attributed the event to a served list depends on what it had served
        // (not in the record); an event that names its list (`rec_id`) is the one that surely was.
        let organic = event.event_type.is_negative() || event.rec_id.is_none();
        let (interaction, user, _) = Interaction::from_event(event);
        self.events.push(Arc::new(LoggedEvent { user, interaction, item, segment, organic, logged_at: at }));
    }
}

/// Drops the events of erased users dated at or before their erasure (as a session skips them);
/// returns the rest and how many were dropped.
pub fn drop_erased(events: Vec<Arc<LoggedEvent>>, erased: &HashMap<UserId, i64>) -> (Vec<Arc<LoggedEvent>>, usize) {
    if erased.is_empty() {
        return (events, 0);
    }
    let before = events.len();
    let kept: Vec<_> = events.into_iter().filter(|e| erased.get(&e.user).is_none_or(|&at| e.timestamp > at)).collect();
    let dropped = before - kept.len();
    (kept, dropped)
}

/// Merges partitions (each in offset order) into one list, oldest record time first, each
/// partition's order kept (so each user's events stay in the order the ingest applies them);
/// also returns the partition index of each event.
pub fn merge_oldest_first(parts: Vec<Vec<Arc<LoggedEvent>>>) -> (Vec<Arc<LoggedEvent>>, Vec<usize>) {
    let total = parts.iter().map(Vec::len).sum();
    let mut events = Vec::with_capacity(total);
    let mut sources = Vec::with_capacity(total);
    let mut heads: Vec<std::iter::Peekable<std::vec::IntoIter<Arc<LoggedEvent>>>> =
        parts.into_iter().map(|p| p.into_iter().peekable()).collect();
    let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<(i64, usize)>> = heads
        .iter_mut()
        .enumerate()
        .filter_map(|(i, h)| h.peek().map(|e| std::cmp::Reverse((e.logged_at, i))))
        .collect();
    while let Some(std::cmp::Reverse((_, i))) = heap.pop() {
        let event = heads[i].next().expect("a partition in the heap has a head");
        events.push(event);
        sources.push(i);
        if let Some(next) = heads[i].peek() {
            heap.push(std::cmp::Reverse((next.logged_at, i)));
        }
    }
    (events, sources)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, ItemId};

    fn event(user: &str, id: &str, at: i64) -> Arc<LoggedEvent> {
        Arc::new(LoggedEvent {
            user: UserId::from(user),
            interaction: Interaction {
                event_id: EventId::from(id),
                item_id: ItemId::from("i"),
                event_type: EventType::View,
                value: None,
                timestamp: at,
                rec_id: None,
            },
            item: 0,
            segment: 0,
            organic: true,
            logged_at: at,
        })
    }

    fn ids(events: &[Arc<LoggedEvent>]) -> Vec<String> {
        events.iter().map(|e| e.event_id.to_string()).collect()
    }

    #[test]
    fn an_erased_users_events_up_to_the_erasure_are_dropped_and_later_ones_kept() {
        let events =
            vec![event("ann", "a1", 100), event("bob", "b1", 150), event("ann", "a2", 200), event("ann", "a3", 300)];
        let erased = HashMap::from([(UserId::from("ann"), 200)]);
        let (kept, dropped) = drop_erased(events, &erased);
        assert_eq!(dropped, 2);
        assert_eq!(ids(&kept), ["b1", "a3"], "bob is not erased; ann's event after the erasure stays");
    }

    /// What the ingest would not apply is not trained on: a record it dead-letters, a reload
    /// control and a user's repeated event id (a retried publish) are skipped and counted.
    #[test]
    fn only_events_the_ingest_would_apply_are_kept_once_each() {
        use crate::bus::kafka::{CONTROL_HEADER, CONTROL_RELOAD, PSEUDONYMIZED_HEADER};
        use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
        let record = |offset: i64, payload: &str, headers: OwnedHeaders| {
            let (key, at) = (Some(b"ann".to_vec()), Timestamp::CreateTime(1_700_000_000_000 + offset));
            OwnedMessage::new(Some(payload.as_bytes().to_vec()), key, "t".into(), at, 0, offset, Some(headers))
        };
        let ours = || OwnedHeaders::new().insert(Header { key: PSEUDONYMIZED_HEADER, value: Some("1") });
        let view = |id: &str| format!(r#"{{"user_id":"ann","item_id":"i1","event_type":"view","event_id":"{id}"}}"#);
        let (limits, catalog, pseudonyms) = (EventLimits::default(), Catalog::new(), Pseudonyms::default());
        let decoder = RecordDecoder { limits: &limits, catalog: &catalog, pseudonyms: &pseudonyms };
        let mut part = Reading { partition: 0, from: 0, end: 5, done: false, events: Vec::new(), seen: HashSet::new() };
        let mut skipped = SkippedRecords::default();
        let reload = OwnedHeaders::new().insert(Header { key: CONTROL_HEADER, value: Some(CONTROL_RELOAD) });
        for (offset, payload, headers) in [
            (0, view("e1"), ours()),
            (1, r#"{"user_id":"ann"}"#.to_owned(), ours()),
            (2, view("e1"), ours()),
            (3, String::new(), reload),
            (4, view("e2"), ours()),
        ] {
            part.take(&decoder, &record(offset, &payload, headers), &mut skipped);
        }
        assert_eq!(ids(&part.events), ["e1", "e2"]);
        assert_eq!(skipped, SkippedRecords { invalid: 1, controls: 1, duplicates: 1, ..SkippedRecords::default() });
        assert_eq!(part.events[0].logged_at, 1_700_000_000_000, "logged at the record's time");
        assert_eq!(Some(part.events[1].item), catalog.lookup(&ItemId::from("i1")), "interned");
    }

    #[test]
    fn partitions_merge_oldest_first_keeping_each_partitions_order() {
        // Partition 1 holds a record whose time is earlier than the one before it (two
        // producers' clocks): it stays after it, since the ingest applies it after.
        let p0 = vec![event("a", "p0-1", 10), event("a", "p0-2", 30)];
        let p1 = vec![event("b", "p1-1", 20), event("b", "p1-2", 5), event("b", "p1-3", 40)];
        let (merged, sources) = merge_oldest_first(vec![p0, Vec::new(), p1]);
        assert_eq!(ids(&merged), ["p0-1", "p1-1", "p1-2", "p0-2", "p1-3"]);
        assert_eq!(sources, [0, 2, 2, 0, 2]);
    }
}
