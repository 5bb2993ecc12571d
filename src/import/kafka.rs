//! Producing events straight into the events topic, as the server's own producer does
//! (`bus::kafka`): idempotent, `acks=all`, keyed by user id with murmur2 partitioning so one
//! user's events stay in order on one partition, JSON payloads in the event schema. Without the
//! `liverec-pseudonymized` header, so the consumer pseudonymises user ids as it does for every
//! outside producer. Each event is validated first with the `[events]` limits of `--config`
//! (the server's, if the same file is given): a record the consumer would refuse is reported
//! here with its line instead of going to the dead-letter topic.

use std::time::Duration;

use futures_util::future::join_all;
use liverec::config::Config;
use liverec::event::{now_ms, EventIn, EventLimits};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

use super::source::{Reason, Rejected};
use super::ImportError;

/// Attempts at producing one batch before the import stops (it can be resumed).
const ATTEMPTS: u32 = 10;

pub struct Producer {
    producer: FutureProducer,
    pub topic: String,
    limits: EventLimits,
    timeout: Duration,
}

impl Producer {
    /// A producer for `brokers` with the rest of `config`'s `[kafka]` section (topic, client
    /// properties such as SASL settings), checking that the topic exists.
    pub fn new(config: &Config, brokers: &str, topic: Option<&str>) -> Result<Producer, ImportError> {
        let mut kafka = config.kafka.clone();
        kafka.brokers = brokers.to_owned();
        let topic = topic.unwrap_or(&kafka.events_topic).to_owned();
        let producer: FutureProducer =
            kafka.producer_config().create().map_err(|e| ImportError::Kafka(format!("{brokers}: {e}")))?;
        let metadata = producer
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(15))
            .map_err(|e| ImportError::Kafka(format!("{brokers}: cannot read the topics' metadata: {e}")))?;
        let exists =
            metadata.topics().iter().any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        if !exists {
            return Err(ImportError::Usage(format!(
                "--kafka {brokers}: no topic {topic} (the server creates it when it starts with kafka.create_topics; \
                 or name the server's events topic with --topic, or its configuration with --config)"
            )));
        }
        Ok(Producer {
            producer,
            topic,
            limits: config.events.limits(),
            timeout: Duration::from_millis(kafka.produce_timeout_ms),
        })
    }

    /// Validates and produces `events`; returns the ones refused, by index.
    pub async fn send(&self, events: &[EventIn]) -> Result<Vec<(usize, Rejected)>, ImportError> {
        let now = now_ms();
        let mut rejected = Vec::new();
        let mut records = Vec::new();
        for (i, event) in events.iter().enumerate() {
            match event.clone().validate(&self.limits, now) {
                Ok(valid) => records.push((valid.user_id, serde_json::to_vec(event).expect("events serialise"))),
                Err(invalid) => rejected.push((
                    i,
                    Rejected { reason: Reason::new("invalid_event", &invalid.field), message: invalid.message },
                )),
            }
        }
        let mut backoff = Duration::from_millis(250);
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            // The whole batch again after a failure: its events keep their ids, so what the
            // broker did take is applied once.
            let sends = records.iter().map(|(user, payload)| {
                let headers =
                    OwnedHeaders::new().insert(Header { key: "content-type", value: Some("application/json") });
                let record = FutureRecord::to(&self.topic).key(user.as_str()).payload(payload).headers(headers);
                self.producer.send(record, self.timeout)
            });
            let failed: Vec<_> = join_all(sends).await.into_iter().filter_map(Result::err).collect();
            match failed.first() {
                None => return Ok(rejected),
                Some((error, _)) => last = error.to_string(),
            }
            tracing::debug!(error = %last, "retrying a batch kafka did not acknowledge");
            actix_web::rt::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        Err(ImportError::Kafka(format!("{}: not acknowledged after {ATTEMPTS} attempts (last: {last})", self.topic)))
    }
}
