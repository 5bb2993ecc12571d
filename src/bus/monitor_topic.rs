//! The monitor topic (production mode): every instance publishes what its monitor counted each
//! `cluster.report_interval_ms` (one small JSON record, keyed by the instance), and every
//! instance reads the whole topic into its cluster view (`actors::monitor`). Records are bytes
//! here: the monitor encodes and decodes them.
//!
//! The topic keeps records for a few monitor windows (`retention.ms`), enough for an instance
//! that starts to fill its window: it reads from the offsets of `now - window` on every
//! partition, with no consumer group and no commits (every instance reads everything).

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::KafkaConfig;
use crate::telemetry::Metrics;

/// Monitor windows the topic keeps (`retention.ms` of a topic liverec creates).
pub const RETAINED_WINDOWS: u64 = 3;

/// Creates the monitor topic if it does not exist: one partition (one small record per instance
/// per interval needs no more; the consumer reads however many a topic made by hand has),
/// deleting records after [`RETAINED_WINDOWS`] windows of `window_ms`.
pub async fn ensure_topic(config: &KafkaConfig, topic: &str, window_ms: u64) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = config.items_consumer_config().create()?;
    let retention = (window_ms * RETAINED_WINDOWS).max(60_000).to_string();
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(config.replication_factor))
        .set("cleanup.policy", "delete")
        .set("retention.ms", &retention);
    super::kafka::create_missing(&admin, &[new]).await
}

/// Produces this instance's reports, keyed by its id.
#[derive(Clone)]
pub struct MonitorPublisher {
    producer: FutureProducer,
    topic: String,
    key: String,
    timeout: Duration,
}

impl MonitorPublisher {
    pub fn new(producer: FutureProducer, topic: String, instance: String, timeout: Duration) -> Self {
        Self { producer, topic, key: instance, timeout }
    }

    /// Produces the reports from `reports` one after the other (so they land in the order they
    /// were made) until the channel closes; a report the broker refuses is logged and counted.
    pub async fn publish(self, mut reports: mpsc::Receiver<Vec<u8>>, metrics: std::sync::Arc<Metrics>) {
        while let Some(payload) = reports.recv().await {
            let record = FutureRecord::to(&self.topic).key(&self.key).payload(&payload);
            if let Err((error, _)) = self.producer.send(record, self.timeout).await {
                metrics.kafka_errors.inc();
                tracing::warn!(error = %error, topic = %self.topic, "monitor report not published");
            }
        }
    }
}

/// Reads the whole monitor topic from `from_ms` (ms since the epoch) on, handing each record's
/// payload to `reports`; returns when `reports` closes. Errors restart the consumer after the
/// Kafka backoff (`kafka.restart_backoff_*`), from the next offset it had not read, so a record
/// is merged once.
pub async fn consume(
    config: KafkaConfig,
    topic: String,
    from_ms: i64,
    reports: mpsc::Sender<Vec<u8>>,
    metrics: std::sync::Arc<Metrics>,
) {
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut restarts = 0u32;
    loop {
        tokio::time::sleep(config.restart_backoff(restarts)).await;
        match consume_once(&config, &topic, from_ms, &mut next, &reports).await {
            Ok(()) => return,
            Err(error) => {
                metrics.kafka_errors.inc();
                restarts += 1;
                tracing::warn!(error = %error, topic = %topic, restarts, "monitor topic consumer failed; restarting");
            }
        }
    }
}

async fn consume_once(
    config: &KafkaConfig,
    topic: &str,
    from_ms: i64,
    next: &mut HashMap<i32, i64>,
    reports: &mpsc::Sender<Vec<u8>>,
) -> Result<(), KafkaError> {
    let starts = start_offsets(config, topic, from_ms).await?;
    // assign() joins no group and nothing is committed; the group id is required by librdkafka.
    let consumer: StreamConsumer = config
        .items_consumer_config()
        .set("group.id", format!("{}.monitor", config.group_id))
        .set("enable.partition.eof", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for (partition, start) in starts {
        let offset = next.get(&partition).map_or(start, |&n| Offset::Offset(n));
        assignment.add_partition_offset(topic, partition, offset)?;
    }
    consumer.assign(&assignment)?;
    tracing::info!(topic, "monitor topic consumer started");
    loop {
        let message = consumer.recv().await?;
        next.insert(message.partition(), message.offset() + 1);
        let Some(payload) = message.payload() else { continue };
        if reports.send(payload.to_vec()).await.is_err() {
            return Ok(());
        }
    }
}

/// Per partition, the first offset at or after `from_ms` (the end when none is).
async fn start_offsets(config: &KafkaConfig, topic: &str, from_ms: i64) -> Result<Vec<(i32, Offset)>, KafkaError> {
    let (client_config, topic) = (config.items_consumer_config(), topic.to_owned());
    // Metadata and offset lookups block: on the blocking pool, off the arbiter's thread.
    actix_rt::task::spawn_blocking(move || {
        let client: BaseConsumer = client_config.create()?;
        let mut tries = 0;
        let partitions = loop {
            let metadata = client.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            match metadata.topics().iter().find(|t| t.name() == topic) {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                    break t.partitions().iter().map(|p| p.id()).collect::<Vec<i32>>()
                }
                _ if tries < 10 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                _ => return Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)),
            }
        };
        let mut wanted = TopicPartitionList::new();
        for &partition in &partitions {
            wanted.add_partition_offset(&topic, partition, Offset::Offset(from_ms))?;
        }
        let found = client.offsets_for_times(wanted, Duration::from_secs(10))?;
        Ok(partitions
            .into_iter()
            .map(|partition| {
                let offset = match found.find_partition(&topic, partition).map(|e| e.offset()) {
                    Some(Offset::Offset(n)) => Offset::Offset(n),
                    _ => Offset::End,
                };
                (partition, offset)
            })
            .collect())
    })
    .await
    .unwrap_or_else(|_| Err(KafkaError::MetadataFetch(RDKafkaErrorCode::Fail)))
}
