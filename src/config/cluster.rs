//! The `[cluster]` section: how the instances of one production deployment (`bus.kind = "kafka"`,
//! `store.kind = "redis"`) share the closed loop.
//!
//! A minimal version holding the keys the cluster-wide monitor reads (`instance_id`,
//! `monitor_topic`, `report_interval_ms`, and `enabled`); the leader's keys are added beside them.

use serde::{Deserialize, Serialize};

use super::bus::KafkaConfig;

/// Settings of the `[cluster]` config section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Whether the loop is the cluster's (only with the Kafka bus and the Redis store).
    pub enabled: bool,
    /// This instance's name in the cluster; empty: `<hostname>-<pid>`
    /// (see [`ClusterConfig::instance_name`]).
    pub instance_id: String,
    /// The topic every instance publishes its monitor's counts to and reads whole; empty:
    /// derived from `kafka.events_topic` (see [`ClusterConfig::monitor_topic_name`]).
    pub monitor_topic: String,
    /// How often each instance publishes what its monitor counted since the last report.
    pub report_interval_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self { enabled: true, instance_id: String::new(), monitor_topic: String::new(), report_interval_ms: 1000 }
    }
}

impl ClusterConfig {
    /// `instance_id`, or when that is empty `<hostname>-<pid>`.
    pub fn instance_name(&self) -> String {
        if !self.instance_id.is_empty() {
            return self.instance_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "liverec".to_owned());
        format!("{host}-{}", std::process::id())
    }

    /// `monitor_topic`, or when that is empty the events topic's name with a trailing `.events`
    /// replaced by `.monitor` (`liverec.events` -> `liverec.monitor`), or with `.monitor`
    /// appended when it has no such suffix (as [`KafkaConfig::items_topic_name`]).
    pub fn monitor_topic_name(&self, kafka: &KafkaConfig) -> String {
        kafka.topic_beside_events(&self.monitor_topic, "monitor")
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn the_monitor_topic_is_derived_from_the_events_topic_unless_named() {
        let mut config = Config::default();
        assert_eq!(config.cluster.monitor_topic_name(&config.kafka), "liverec.monitor");
        config.kafka.events_topic = "shop-events".into();
        assert_eq!(config.cluster.monitor_topic_name(&config.kafka), "shop-events.monitor");
        config.cluster.monitor_topic = "fleet-monitor".into();
        assert_eq!(config.cluster.monitor_topic_name(&config.kafka), "fleet-monitor");
        assert!(!config.cluster.instance_name().is_empty());
        config.cluster.instance_id = "a".into();
        assert_eq!(config.cluster.instance_name(), "a");
    }
}
