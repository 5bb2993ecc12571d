//! The `[bus]` and `[kafka]` sections: how events travel from the API to the sessions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusKind {
    Memory,
    Kafka,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    pub kind: BusKind,
    /// Partitions of the in-process bus (one ingest actor each).
    pub partitions: usize,
    /// Batches queued per partition before producers are told to retry.
    pub queue_capacity: usize,
}

/// Settings of the `[kafka]` config section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub events_topic: String,
    pub dead_letter_topic: String,
    pub group_id: String,
    pub client_id: String,
    pub create_topics: bool,
    pub partitions: i32,
    pub replication_factor: i32,
    pub max_batch: usize,
    pub max_inflight_events: usize,
    pub produce_timeout_ms: u64,
    pub compression: String,
    pub linger_ms: u64,
    pub session_timeout_ms: u64,
    pub commit_interval_ms: u64,
    pub restart_backoff_initial_ms: u64,
    pub restart_backoff_max_ms: u64,
    /// Extra librdkafka properties for producer and consumer.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}
