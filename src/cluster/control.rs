//! The control topic on the wire: creating it and publishing the desired state (`follow` reads it).
//!
//! One partition, compacted, one key ([`record::RECORD_KEY`]): the topic read from its start ends
//! with the newest desired state, and its single partition gives every instance the records in
//! one order.

use std::future::Future;
use std::time::Duration;

use rdkafka::admin::{AdminClient, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::record::{self, DesiredState, RECORD_KEY};
use crate::config::KafkaConfig;

/// Creates the control topic (one partition, compacted) if it does not exist.
pub async fn ensure_topic(config: &KafkaConfig, topic: &str) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = config.items_consumer_config().create()?;
    let new =
        NewTopic::new(topic, 1, TopicReplication::Fixed(config.replication_factor)).set("cleanup.policy", "compact");
    crate::bus::kafka::create_missing(&admin, &[new]).await
}

/// Produces desired states (idempotent, `acks=all`).
pub struct ControlPublisher {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
}

impl ControlPublisher {
    pub fn new(config: &KafkaConfig, topic: String) -> Result<Self, KafkaError> {
        Ok(Self {
            producer: config.producer_config().create()?,
            topic,
            timeout: Duration::from_millis(config.produce_timeout_ms),
        })
    }

    /// Hands `state` to the producer now, so records reach the partition in the order of the
    /// calls; the future resolves once the broker has it (within `kafka.produce_timeout_ms`).
    pub fn enqueue(&self, state: &DesiredState) -> impl Future<Output = Result<(), String>> + Send + 'static {
        let payload = record::encode(state);
        let headers = OwnedHeaders::new().insert(Header { key: "content-type", value: Some("application/json") });
        let record = FutureRecord::to(&self.topic).key(RECORD_KEY).payload(&payload).headers(headers);
        let queued = self.producer.send_result(record).map_err(|(error, _)| error.to_string());
        let timeout = self.timeout;
        async move {
            match tokio::time::timeout(timeout, queued?).await {
                Ok(Ok(Ok(_))) => Ok(()),
                Ok(Ok(Err((error, _)))) => Err(error.to_string()),
                Ok(Err(_)) => Err("the producer stopped".into()),
                Err(_) => Err(format!("no acknowledgement within {timeout:?}")),
            }
        }
    }
}
