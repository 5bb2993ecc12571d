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
    /// Events queued per partition, across its batches, before producers are told to retry:
    /// what bounds the queues' memory (a batch may hold `events.max_batch` events).
    pub queue_events: usize,
}

/// Settings of the `[kafka]` config section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub events_topic: String,
    /// The compacted catalogue topic, keyed by item id; empty: derived from `events_topic`
    /// (see [`KafkaConfig::items_topic_name`]).
    #[serde(default)]
    pub items_topic: String,
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
    /// How often the consumer tells the group it is alive; also how soon a member hears of a
    /// rebalance. Below `session_timeout_ms`.
    pub heartbeat_interval_ms: u64,
    /// How the group shares partitions (librdkafka's `partition.assignment.strategy`).
    pub assignment: Assignment,
    pub commit_interval_ms: u64,
    pub restart_backoff_initial_ms: u64,
    pub restart_backoff_max_ms: u64,
    /// Extra librdkafka properties for producer and consumer.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// How a consumer group shares the events topic's partitions. Every member of one group must use
/// the same kind: cooperative and eager members cannot share a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Assignment {
    /// Incremental: a rebalance moves only the partitions that change owner; every other
    /// partition keeps its owner and its users' sessions.
    #[serde(rename = "cooperative-sticky")]
    CooperativeSticky,
    /// Eager: every member gives up all its partitions at each rebalance, and the group consumes
    /// nothing until it has a new share (liverec's strategy before 2026-12).
    #[serde(rename = "roundrobin")]
    RoundRobin,
    /// Eager, by ranges of partition numbers.
    #[serde(rename = "range")]
    Range,
}

impl Assignment {
    /// The value of librdkafka's `partition.assignment.strategy`.
    pub fn strategy(self) -> &'static str {
        match self {
            Assignment::CooperativeSticky => "cooperative-sticky",
            Assignment::RoundRobin => "roundrobin",
            Assignment::Range => "range",
        }
    }
}

impl KafkaConfig {
    /// How long a supervised consumer waits before its run after `restarts` failures in a row:
    /// none at first, then `restart_backoff_initial_ms` doubling up to `restart_backoff_max_ms`.
    pub fn restart_backoff(&self, restarts: u32) -> std::time::Duration {
        if restarts == 0 {
            return std::time::Duration::ZERO;
        }
        let initial = self.restart_backoff_initial_ms.max(1);
        let ms = initial.saturating_mul(1 << restarts.min(20)).min(self.restart_backoff_max_ms.max(initial));
        std::time::Duration::from_millis(ms)
    }

    /// The items topic: `items_topic`, or when that is empty the events topic's name with a
    /// trailing `.events` replaced by `.items` (`liverec.events` -> `liverec.items`), or with
    /// `.items` appended when it has no such suffix.
    pub fn items_topic_name(&self) -> String {
        self.topic_beside_events(&self.items_topic, "items")
    }

    /// `named`, or when that is empty the events topic's name with a trailing `.events` replaced
    /// by `.{kind}`, or with `.{kind}` appended when it has no such suffix: the name of a topic
    /// liverec keeps beside the events topic.
    pub fn topic_beside_events(&self, named: &str, kind: &str) -> String {
        if !named.is_empty() {
            return named.to_owned();
        }
        let base = self.events_topic.strip_suffix(".events").unwrap_or(&self.events_topic);
        format!("{base}.{kind}")
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn the_items_topic_is_derived_from_the_events_topic_unless_named() {
        let mut kafka = Config::default().kafka;
        assert_eq!(kafka.items_topic_name(), "liverec.items");
        kafka.events_topic = "shop-events".into();
        assert_eq!(kafka.items_topic_name(), "shop-events.items");
        kafka.items_topic = "catalogue".into();
        assert_eq!(kafka.items_topic_name(), "catalogue");
    }

    #[test]
    fn the_restart_backoff_doubles_up_to_its_cap() {
        let mut kafka = Config::default().kafka;
        (kafka.restart_backoff_initial_ms, kafka.restart_backoff_max_ms) = (100, 1000);
        let ms = |n| kafka.restart_backoff(n).as_millis();
        assert_eq!([ms(0), ms(1), ms(2), ms(3), ms(4), ms(40)], [0, 200, 400, 800, 1000, 1000]);
    }
}
