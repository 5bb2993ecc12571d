//! Where the trainer's window comes from, in each mode.
//!
//! - Embedded (`bus.kind = "memory"`): the in-memory [`EventLog`] every session appends to; one
//!   process applies every event, so its log is the whole stream.
//! - Production (`bus.kind = "kafka"`): the Kafka events topic ([`crate::bus::kafka_window`]),
//!   every partition, so a run learns from every user whichever instance owns them. Erased users'
//!   events from before their erasure are skipped, by the tombstones in the profile store.
//!
//! A run reads its window on the training thread ([`EventSource::read`]), never on the actor's.
//! The wait after a drift alarm (`trainer.fresh_events`) counts events produced meanwhile: the
//! log's appends in memory, the sum of the topic's high watermarks with Kafka (every record
//! counts, reload controls and records the ingest rejects included).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::ArbiterHandle;
use futures_util::{StreamExt as _, TryStreamExt as _};

use crate::bus::kafka_window::{Window, WindowError, WindowReader};
use crate::catalog::Catalog;
use crate::config::Config;
use crate::event::UserId;
use crate::eventlog::EventLog;
use crate::models::artifact::{PartitionEvents, SkippedEvents};
use crate::models::retrain::{EventSource, TrainingData};
use crate::privacy::Pseudonyms;
use crate::store::{ProfileStore, StoreError};

/// Reading a Kafka window that makes no progress at all for this long fails the run. A healthy
/// broker hands out records within a fetch's wait; this only catches one that is gone.
const STALL_AFTER: Duration = Duration::from_secs(120);

/// Tombstone lookups in flight at once while a window is read.
const TOMBSTONE_LOOKUPS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Kafka(#[from] WindowError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the {0} thread stopped")]
    Stopped(&'static str),
}

/// The trainer's source of events (cheap to clone).
#[derive(Clone)]
pub enum TrainingSource {
    Memory { log: Arc<EventLog>, window_secs: u64 },
    Kafka(Arc<KafkaSource>),
}

/// The events topic, and the store that knows who was erased.
pub struct KafkaSource {
    reader: WindowReader,
    window_secs: u64,
    store: Arc<dyn ProfileStore>,
    /// The thread the store's connections live on: tombstones are looked up there.
    io: ArbiterHandle,
}

impl TrainingSource {
    /// The embedded default.
    pub fn memory(log: Arc<EventLog>, window_secs: u64) -> Self {
        Self::Memory { log, window_secs }
    }

    /// Production mode: the `kafka.events_topic` of `config`.
    pub fn kafka(
        config: &Config,
        catalog: Arc<Catalog>,
        pseudonyms: Arc<Pseudonyms>,
        store: Arc<dyn ProfileStore>,
        io: ArbiterHandle,
    ) -> Self {
        let reader = WindowReader::new(
            config.kafka.clone(),
            config.events.limits(),
            catalog,
            pseudonyms,
            config.trainer.max_events,
            STALL_AFTER,
        );
        Self::Kafka(Arc::new(KafkaSource { reader, window_secs: config.trainer.window_secs, store, io }))
    }

    /// The source, as the run's history says where its window came from.
    pub fn describe(&self) -> String {
        match self {
            Self::Memory { window_secs, .. } => format!("the in-memory event log, last {window_secs} s"),
            Self::Kafka(kafka) => {
                format!("kafka topic {}, last {} s", kafka.reader.config.events_topic, kafka.window_secs)
            }
        }
    }

    /// Events produced so far, when that is known without asking anyone (the in-memory log).
    pub fn produced_now(&self) -> Option<u64> {
        match self {
            Self::Memory { log, .. } => Some(log.appended()),
            Self::Kafka(_) => None,
        }
    }

    /// Events produced so far: a count that only grows (see the module docs). With Kafka it asks
    /// the broker, on the blocking pool.
    pub fn produced(&self) -> impl Future<Output = Result<u64, SourceError>> + 'static {
        let source = self.clone();
        async move {
            match source {
                Self::Memory { log, .. } => Ok(log.appended()),
                Self::Kafka(kafka) => tokio::task::spawn_blocking(move || kafka.reader.produced())
                    .await
                    .map_err(|_| SourceError::Stopped("watermark"))?
                    .map_err(Into::into),
            }
        }
    }
}

impl KafkaSource {
    /// When each of `users` was erased (those never erased are left out), asked of the store on
    /// its own thread while this one (the training thread) waits.
    fn tombstones(&self, users: Vec<UserId>) -> Result<HashMap<UserId, i64>, SourceError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let store = self.store.clone();
        let lookups = async move {
            let found: Result<Vec<(UserId, Option<i64>)>, StoreError> = futures_util::stream::iter(users)
                .map(|user| {
                    let store = store.clone();
                    async move { store.tombstone(&user).await.map(|at| (user, at)) }
                })
                .buffer_unordered(TOMBSTONE_LOOKUPS)
                .try_collect()
                .await;
            let _ = tx.send(found);
        };
        if !self.io.spawn(lookups) {
            return Err(SourceError::Stopped("store"));
        }
        let found = rx.blocking_recv().map_err(|_| SourceError::Stopped("store"))??;
        Ok(found.into_iter().filter_map(|(user, at)| at.map(|at| (user, at))).collect())
    }
}

impl EventSource for TrainingSource {
    fn read(&self, now_ms: i64) -> Result<TrainingData, Box<dyn std::error::Error + Send + Sync>> {
        match self {
            Self::Memory { log, window_secs } => Ok(TrainingData {
                events: log.snapshot(now_ms),
                source: format!("liverec event log, last {window_secs} s"),
                partitions: Vec::new(),
                skipped: None,
            }),
            Self::Kafka(kafka) => {
                let start = now_ms - (kafka.window_secs as i64).saturating_mul(1000);
                let Window { events, partitions, skipped } =
                    kafka.reader.read(start, |users| kafka.tombstones(users))?;
                Ok(TrainingData {
                    events,
                    source: format!("kafka topic {}, last {} s", kafka.reader.config.events_topic, kafka.window_secs),
                    partitions: partitions
                        .into_iter()
                        .map(|p| PartitionEvents {
                            partition: p.partition,
                            from_offset: p.from_offset,
                            end_offset: p.end_offset,
                            events: p.events,
                        })
                        .collect(),
                    skipped: Some(SkippedEvents {
                        invalid: skipped.invalid,
                        duplicates: skipped.duplicates,
                        erased: skipped.erased,
                        trimmed: skipped.trimmed,
                    }),
                })
            }
        }
    }
}
