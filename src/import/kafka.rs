//! Producing events straight into the events topic, and the catalogue into the items topic, as
//! the server's own producer does (`bus::kafka`, `bus::items`): idempotent, `acks=all`, murmur2
//! partitioning on the key. Events are keyed by user id (one user's events stay in order on one
//! partition), JSON payloads in the event schema, without the `liverec-pseudonymized` header, so
//! the consumer pseudonymises user ids as it does for every outside producer. Items are keyed by
//! item id, their value written by `bus::items::encode`, the format every instance reads back.
//! Each record is validated first as the server would (the `[events]` limits of `--config`, the
//! server's if the same file is given): a record the consumer would refuse is reported here with
//! its line instead of going to the dead-letter topic.

use std::time::Duration;

use crate::bus::items::{encode, ItemChange};
use crate::config::Config;
use crate::event::{check_id, now_ms, EventIn, EventLimits};
use futures_util::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

use super::error::ImportError;
use super::source::{ItemOut, Reason, Rejected};

/// Attempts at producing one batch before the import stops (it can be resumed).
const ATTEMPTS: u32 = 10;

pub struct Producer {
    producer: FutureProducer,
    /// The events topic.
    pub topic: String,
    /// The items topic, when the catalogue goes to Kafka (no `--target`).
    pub items_topic: Option<String>,
    limits: EventLimits,
    timeout: Duration,
}

impl Producer {
    /// A producer for `brokers` with the rest of `config`'s `[kafka]` section (topics, client
    /// properties such as SASL settings), checking that the topics exist: the events topic, and
    /// the items topic when `items` (the catalogue goes to Kafka). The items topic is the server's
    /// `kafka.items_topic`, derived from the events topic (`topic`, else `kafka.events_topic`) as
    /// the server derives it when that setting is empty.
    pub fn new(config: &Config, brokers: &str, topic: Option<&str>, items: bool) -> Result<Producer, ImportError> {
        let mut kafka = config.kafka.clone();
        kafka.brokers = brokers.to_owned();
        if let Some(topic) = topic {
            kafka.events_topic = topic.to_owned();
        }
        let items_topic = items.then(|| kafka.items_topic_name());
        let producer: FutureProducer =
            kafka.producer_config().create().map_err(|e| ImportError::Kafka(format!("{brokers}: {e}")))?;
        let metadata = producer
            .client()
            .fetch_metadata(None, Duration::from_secs(15))
            .map_err(|e| ImportError::Kafka(format!("{brokers}: cannot read the topics' metadata: {e}")))?;
        let exists = |name: &str| {
            metadata.topics().iter().any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
        };
        if !exists(&kafka.events_topic) {
            return Err(ImportError::Usage(format!(
                "--kafka {brokers}: no topic {} (the server creates it when it starts with kafka.create_topics; \
                 or name the server's events topic with --topic, or its configuration with --config)",
                kafka.events_topic
            )));
        }
        if let Some(items_topic) = items_topic.as_deref().filter(|t| !exists(t)) {
            return Err(ImportError::Usage(format!(
                "--kafka {brokers}: no items topic {items_topic} (the server creates it when it starts with \
                 kafka.create_topics; its name is kafka.items_topic of --config, else derived from the events \
                 topic {}; or send the catalogue over REST with --target)",
                kafka.events_topic
            )));
        }
        Ok(Producer {
            producer,
            topic: kafka.events_topic,
            items_topic,
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
                Ok(valid) => records
                    .push((valid.user_id.as_str().to_owned(), serde_json::to_vec(event).expect("events serialise"))),
                Err(invalid) => rejected.push((
                    i,
                    Rejected { reason: Reason::new("invalid_event", &invalid.field), message: invalid.message },
                )),
            }
        }
        self.produce(&self.topic, &records).await?;
        Ok(rejected)
    }

    /// Validates `items` as `PUT /v1/items` does (the id's length and characters, the
    /// attributes' bounds) and produces them to the items topic; returns the ones refused, by
    /// index.
    pub async fn send_items(&self, items: &[ItemOut]) -> Result<Vec<(usize, Rejected)>, ImportError> {
        let topic =
            self.items_topic.as_deref().expect("items go to kafka only with an items topic: checked at the start");
        let mut rejected = Vec::new();
        let mut records = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let valid = check_id("item_id", &item.item_id, self.limits.max_id_len)
                .map_err(|e| Rejected { reason: Reason::new("invalid_item_id", "item_id"), message: e.message })
                .and_then(|()| {
                    item.attributes
                        .validate()
                        .map_err(|e| Rejected { reason: Reason::new("invalid_item", e.field), message: e.message })
                });
            match valid {
                Ok(()) => records.push((item.item_id.clone(), encode(&ItemChange::Put(item.attributes.clone())))),
                Err(refused) => rejected.push((i, refused)),
            }
        }
        self.produce(topic, &records).await?;
        Ok(rejected)
    }

    /// Produces `(key, payload)` records to `topic`, the whole batch again after a failure,
    /// until the broker has acknowledged every one.
    async fn produce(&self, topic: &str, records: &[(String, Vec<u8>)]) -> Result<(), ImportError> {
        let mut backoff = Duration::from_millis(250);
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            // Sent again, events keep their ids and items their values: what the broker did
            // take is applied once.
            let sends = records.iter().map(|(key, payload)| {
                let headers =
                    OwnedHeaders::new().insert(Header { key: "content-type", value: Some("application/json") });
                let record = FutureRecord::to(topic).key(key.as_str()).payload(payload).headers(headers);
                self.producer.send(record, self.timeout)
            });
            let failed: Vec<_> = join_all(sends).await.into_iter().filter_map(Result::err).collect();
            match failed.first() {
                None => return Ok(()),
                Some((error, _)) => last = error.to_string(),
            }
            tracing::debug!(error = %last, topic, "retrying a batch kafka did not acknowledge");
            actix_web::rt::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        Err(ImportError::Kafka(format!("{topic}: not acknowledged after {ATTEMPTS} attempts (last: {last})")))
    }
}
