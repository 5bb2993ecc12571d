//! The `[cluster]` section: the closed loop as a property of the cluster (production mode). One
//! instance leads (a Redis lease with a fencing token) and alone trains and judges canaries;
//! every instance applies the desired serving state the leader publishes on the control topic.

use serde::{Deserialize, Serialize};

use super::bus::KafkaConfig;

/// Settings of the `[cluster]` config section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Run the loop across instances. Only has effect with `bus.kind = "kafka"` and
    /// `store.kind = "redis"` (see [`super::Config::cluster_active`]).
    pub enabled: bool,
    /// This instance's name in the lease and the control records; empty: `<hostname>-<pid>`.
    pub instance_id: String,
    /// Where clients reach this instance (e.g. `http://10.0.0.5:8080`), shown to an operator
    /// whose request reached a follower; empty: not advertised.
    pub advertise_url: String,
    /// How long the lease lasts without a renewal: a dead leader is replaced after at most this.
    pub lease_ttl_ms: u64,
    /// How often the leader renews the lease, and how often followers try to take it.
    pub renew_interval_ms: u64,
    /// The control topic (one partition, compacted, one key): the desired serving state. Empty:
    /// derived from `kafka.events_topic` (`liverec.events` -> `liverec.control`).
    pub control_topic: String,
    /// The topic every instance reports its monitor's deltas to. Empty: derived from
    /// `kafka.events_topic` (`liverec.events` -> `liverec.monitor`).
    pub monitor_topic: String,
    /// How often an instance reports its monitor's deltas.
    pub report_interval_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            instance_id: String::new(),
            advertise_url: String::new(),
            lease_ttl_ms: 10_000,
            renew_interval_ms: 2_000,
            control_topic: String::new(),
            monitor_topic: String::new(),
            report_interval_ms: 1_000,
        }
    }
}

impl ClusterConfig {
    /// `instance_id`, or `<hostname>-<pid>` when it is empty.
    pub fn instance_id(&self) -> String {
        if !self.instance_id.is_empty() {
            return self.instance_id.clone();
        }
        format!("{}-{}", hostname(), std::process::id())
    }

    /// `control_topic`, or the name derived from the events topic.
    pub fn control_topic_name(&self, kafka: &KafkaConfig) -> String {
        kafka.topic_beside_events(&self.control_topic, "control")
    }

    /// `monitor_topic`, or the name derived from the events topic.
    pub fn monitor_topic_name(&self, kafka: &KafkaConfig) -> String {
        kafka.topic_beside_events(&self.monitor_topic, "monitor")
    }

    /// Checks the values serde cannot; the message names the key.
    pub fn check(&self) -> Result<(), String> {
        if self.renew_interval_ms == 0 || self.report_interval_ms == 0 {
            return Err("cluster.renew_interval_ms and cluster.report_interval_ms must be at least 1".into());
        }
        // A leader renews at least twice within a lease: one late renewal does not cost it.
        if self.lease_ttl_ms < 2 * self.renew_interval_ms {
            return Err(format!(
                "cluster.lease_ttl_ms ({}) must be at least twice cluster.renew_interval_ms ({})",
                self.lease_ttl_ms, self.renew_interval_ms
            ));
        }
        // The lease's value holds the id and the URL on lines of their own.
        let plain = |s: &str| s.len() <= 256 && !s.chars().any(char::is_control);
        if !plain(&self.instance_id) {
            return Err("cluster.instance_id must be at most 256 characters, without control characters".into());
        }
        if !plain(&self.advertise_url)
            || !(self.advertise_url.is_empty()
                || self.advertise_url.starts_with("http://")
                || self.advertise_url.starts_with("https://"))
        {
            return Err(
                "cluster.advertise_url must be empty or an http:// or https:// URL of at most 256 characters".into()
            );
        }
        Ok(())
    }
}

/// The machine's host name (`localhost` when it cannot be read).
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer it is given.
    let status = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if status != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match String::from_utf8_lossy(&buf[..end]).trim() {
        "" => "localhost".into(),
        name => name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn topics_are_derived_from_the_events_topic_unless_named() {
        let config = Config::default();
        let (mut cluster, mut kafka) = (config.cluster, config.kafka);
        assert_eq!(cluster.control_topic_name(&kafka), "liverec.control");
        assert_eq!(cluster.monitor_topic_name(&kafka), "liverec.monitor");
        kafka.events_topic = "shop".into();
        assert_eq!(cluster.control_topic_name(&kafka), "shop.control");
        cluster.control_topic = "ctl".into();
        cluster.monitor_topic = "mon".into();
        assert_eq!(
            (cluster.control_topic_name(&kafka), cluster.monitor_topic_name(&kafka)),
            ("ctl".into(), "mon".into())
        );
    }

    #[test]
    fn the_instance_id_defaults_to_host_and_pid() {
        let mut cluster = ClusterConfig::default();
        assert!(cluster.instance_id().ends_with(&format!("-{}", std::process::id())));
        cluster.instance_id = "a".into();
        assert_eq!(cluster.instance_id(), "a");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cluster = ClusterConfig { lease_ttl_ms: 3000, renew_interval_ms: 2000, ..ClusterConfig::default() };
        assert!(cluster.check().expect_err("too short").contains("cluster.lease_ttl_ms"));
        let cluster = ClusterConfig { advertise_url: "10.0.0.1:8080".into(), ..ClusterConfig::default() };
        assert!(cluster.check().expect_err("no scheme").contains("cluster.advertise_url"));
        let cluster = ClusterConfig { instance_id: "a\nb".into(), ..ClusterConfig::default() };
        assert!(cluster.check().expect_err("newline").contains("cluster.instance_id"));
        assert!(ClusterConfig::default().check().is_ok());
    }
}
