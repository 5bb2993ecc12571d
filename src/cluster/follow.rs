//! Following the control topic: [`follow`] reads it from the start with no consumer group (every
//! instance needs every record), hands the newest record of each burst to the applier (records in
//! between are superseded: applying them would only swap models to and fro), and marks the
//! instance applied at start once it has reached the end found at start and applied what it found.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::record::{self, DesiredState};
use super::Cluster;
use crate::config::KafkaConfig;

/// Whether `topic` exists (a topic just created may take a moment to appear: asked a few times).
async fn exists(config: &KafkaConfig, topic: &str) -> Result<bool, KafkaError> {
    let (config, topic) = (config.items_consumer_config(), topic.to_owned());
    // Metadata requests block: on the blocking pool, off the cluster thread (the lease runs there).
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = config.create()?;
        for _ in 0..10 {
            let metadata = client.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            if metadata.topics().iter().any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(false)
    })
    .await
    .unwrap_or_else(|_| Err(KafkaError::MetadataFetch(RDKafkaErrorCode::Fail)))
}

/// The control consumer's context: librdkafka also reports each partition end (which the loop
/// handles) as a client error, which would otherwise be logged as one every time.
struct ControlContext;

impl ClientContext for ControlContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            tracing::error!(error = %error, reason, "kafka control consumer client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ControlContext {}

/// Reads the control topic from its start and hands each newest record to `apply`, for as long
/// as the thread runs; a failed consumer is made again after a capped backoff (counted in
/// `liverec_kafka_consumer_restarts_total`), reading from the start again (applying the same state
/// twice changes nothing).
pub async fn follow<F, Fut>(config: KafkaConfig, topic: String, cluster: Arc<Cluster>, mut apply: F)
where
    F: FnMut(DesiredState) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut restarts = 0u32;
    loop {
        tokio::time::sleep(config.restart_backoff(restarts)).await;
        let started = std::time::Instant::now();
        if let Err(error) = read(&config, &topic, &cluster, &mut apply).await {
            tracing::error!(error = %error, topic = %topic, "control topic consumer failed; restarting");
        }
        cluster.metrics.kafka_restarts.inc();
        restarts = if started.elapsed() > Duration::from_secs(60) { 1 } else { restarts.saturating_add(1) };
    }
}

async fn read<F, Fut>(config: &KafkaConfig, topic: &str, cluster: &Cluster, apply: &mut F) -> Result<(), KafkaError>
where
    F: FnMut(DesiredState) -> Fut,
    Fut: Future<Output = bool>,
{
    if !exists(config, topic).await? {
        // No control topic, so no leader has published: nothing to apply, and the instance serves
        // its configured version. Followed once it exists (the consumer is made again).
        if !cluster.applied_at_start() {
            tracing::warn!(topic = %topic, "the control topic does not exist (kafka.create_topics = false?); create it: one partition, cleanup.policy=compact");
            cluster.mark_applied_at_start();
        }
        return Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition));
    }
    // assign() joins no group and nothing is committed, so every instance may share this id.
    let consumer: StreamConsumer<ControlContext> = config
        .items_consumer_config()
        .set("group.id", format!("{}.control", config.group_id))
        .create_with_context(ControlContext)?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    tracing::info!(topic = %topic, "control topic consumer started");
    let mut caught_up = false;
    let mut newest: Option<DesiredState> = None;
    // The newest state if part of it could not be applied (a version not loadable yet), and how
    // many times it was tried: tried again after a backoff until it applies or a newer one comes.
    let mut unapplied: Option<(DesiredState, u32)> = None;
    loop {
        // Wait for the next record (or the time to try an unapplied state again), then take
        // whatever else is already fetched.
        let first = match &unapplied {
            Some((_, tries)) => tokio::select! {
                received = consumer.recv() => Some(received),
                () = tokio::time::sleep(retry_backoff(*tries)) => None,
            },
            None => Some(consumer.recv().await),
        };
        let Some(first) = first else {
            let (state, tries) = unapplied.take().expect("waited to try a state again");
            tracing::info!(tries, "applying the desired state again");
            if apply(state.clone()).await {
                cluster.metrics.cluster_control_applied.inc();
            } else {
                unapplied = Some((state, tries.saturating_add(1)));
            }
            continue;
        };
        let mut next = Some(first);
        while let Some(received) = next.take() {
            match received {
                Ok(message) => match record::decode(message.payload()) {
                    Ok(state) => {
                        if cluster.observe(&state) {
                            newest = Some(state);
                        }
                    }
                    Err(bad) => {
                        tracing::warn!(offset = message.offset(), error = %bad, "control record ignored");
                    }
                },
                Err(KafkaError::PartitionEOF(_)) => caught_up = true,
                Err(error) if consumer.client().fatal_error().is_none() => {
                    tracing::warn!(error = %error, "control topic consumption error; continuing");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => return Err(error),
            }
            next = consumer.recv().now_or_never();
        }
        if !caught_up {
            continue;
        }
        if let Some(state) = newest.take() {
            unapplied = None;
            if apply(state.clone()).await {
                cluster.metrics.cluster_control_applied.inc();
            } else {
                unapplied = Some((state, 0));
            }
        }
        if !cluster.applied_at_start() {
            cluster.mark_applied_at_start();
            tracing::info!("control topic read: serving the desired state");
        }
    }
}

/// How long to wait before trying an unapplied state again, after `tries` failed tries: 1 s,
/// doubling, at most 30 s.
fn retry_backoff(tries: u32) -> Duration {
    Duration::from_secs(1u64 << tries.min(5)).min(Duration::from_secs(30))
}
