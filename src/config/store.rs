//! The `[store]` and `[redis]` sections: where user profiles live.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    Memory,
    Redis,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// Most profiles the embedded (memory) store keeps (of users whose session stopped: a
    /// running session holds its profile and parks it there when it stops); past it the least
    /// recently used are evicted. The embedded store is a cache of recent users; Redis is the
    /// durable store.
    pub memory_max_profiles: usize,
    /// A profile of the embedded store not read or written for this long is dropped (0: never).
    pub memory_idle_ttl_secs: u64,
    /// Most erasure tombstones the embedded store keeps; past it the oldest are dropped.
    pub memory_max_tombstones: usize,
}

impl StoreConfig {
    /// Values serde cannot check.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.memory_max_profiles == 0 {
            return Err("store.memory_max_profiles must be at least 1");
        }
        if self.memory_max_tombstones == 0 {
            return Err("store.memory_max_tombstones must be at least 1");
        }
        Ok(())
    }
}

/// Settings of the `[redis]` config section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `rediss://` for TLS). Unused when `cluster_nodes` is set.
    pub url: String,
    /// Redis Cluster: some of the cluster's nodes (`redis://host:port`, or `rediss://`), from
    /// which the store learns the rest. Empty (the default): one Redis server at `url`. In TOML an
    /// array; in the environment a comma-separated list (or a TOML array).
    #[serde(default, deserialize_with = "cluster_nodes")]
    pub cluster_nodes: Vec<String>,
    /// Prefix of every key and channel.
    pub key_prefix: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Profiles expire this long after their last write (0 = never).
    pub profile_ttl_secs: u64,
    /// Most writes sent in one pipeline.
    pub write_batch: usize,
    /// First and longest pause between retries of a failed write.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// Last-list writes kept waiting while Redis is away before the oldest are skipped (the
    /// interactions themselves are never skipped).
    pub max_pending_lists: usize,

    // ---- store writer (issue 13 item 2) ----
    /// Writer lanes, each with one pipeline in flight (users spread over them by a hash of their
    /// id, so each user's writes stay in order).
    #[serde(default = "default_write_pipelines", deserialize_with = "write_pipelines")]
    pub write_pipelines: usize,
    // ---- end store writer ----

    // ---- watched lists (issue 13 item 2) ----
    /// How long an instance's announcement that it holds subscribers of a user lasts: instances
    /// re-announce their watched users every third of it, and the owner of a user stores and
    /// publishes that user's lists only while some instance's announcement is current (or it
    /// has a subscriber itself). 0: every list is stored and published, watched or not.
    #[serde(default = "default_watch_ttl_secs", deserialize_with = "watch_ttl_secs")]
    pub watch_ttl_secs: u64,
    // ---- end watched lists ----
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            cluster_nodes: Vec::new(),
            key_prefix: "liverec".into(),
            pool_size: 8,
            profile_ttl_secs: 30 * 24 * 3600,
            write_batch: 512,
            retry_initial_ms: 50,
            retry_max_ms: 5000,
            max_pending_lists: 100_000,
            // ---- store writer (issue 13 item 2) ----
            write_pipelines: default_write_pipelines(),
            // ---- end store writer ----
            watch_ttl_secs: default_watch_ttl_secs(),
        }
    }
}

impl RedisConfig {
    /// Values serde cannot check.
    pub fn check(&self) -> Result<(), String> {
        // A brace in the prefix would end up as the keys' hash tag, putting every user on one slot.
        if self.key_prefix.contains(['{', '}']) {
            return Err(format!("redis.key_prefix must not contain '{{' or '}}' (got {:?})", self.key_prefix));
        }
        Ok(())
    }
}

/// A list of node URLs, from a TOML array or a comma-separated string (an environment variable).
fn cluster_nodes<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Nodes {
        List(Vec<String>),
        Joined(String),
    }
    let nodes: Vec<String> = match Nodes::deserialize(deserializer)? {
        Nodes::List(nodes) => nodes.into_iter().map(|n| n.trim().to_owned()).collect(),
        Nodes::Joined(joined) => joined.split(',').map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()).collect(),
    };
    for node in &nodes {
        let Some((scheme, rest)) = node.split_once("://") else {
            return Err(serde::de::Error::custom(format!(
                "redis.cluster_nodes: {node:?} is not a URL (expected redis://host:port or rediss://host:port)"
            )));
        };
        if !matches!(scheme, "redis" | "rediss") || rest.is_empty() {
            return Err(serde::de::Error::custom(format!(
                "redis.cluster_nodes: {node:?} is not a URL (expected redis://host:port or rediss://host:port)"
            )));
        }
    }
    Ok(nodes)
}

// ---- store writer (issue 13 item 2) ----
/// Most writer lanes: each holds a pool connection while its pipeline is in flight.
pub const MAX_WRITE_PIPELINES: usize = 64;

/// One lane by default: every lane runs on the one I/O thread, and on a 2-core machine one lane
/// merged more of a user's appends per call and applied 2x the events of four (docs/performance.md).
fn default_write_pipelines() -> usize {
    1
}

fn write_pipelines<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(deserializer)?;
    if !(1..=MAX_WRITE_PIPELINES).contains(&n) {
        return Err(serde::de::Error::custom(format!(
            "redis.write_pipelines must be between 1 and {MAX_WRITE_PIPELINES} (got {n})"
        )));
    }
    Ok(n)
}
// ---- end store writer ----

// ---- watched lists (issue 13 item 2) ----
/// Longest watch announcement: a watch outlives the last stream by up to this long.
pub const MAX_WATCH_TTL_SECS: u64 = 3600;

/// 30 s: re-announcing every 10 s costs one PUBLISH per 10 s per ~1,000 watched users, and a
/// user stays watched (its lists stored and published) at most 30 s after its last stream ends.
fn default_watch_ttl_secs() -> u64 {
    30
}

fn watch_ttl_secs<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let n = u64::deserialize(deserializer)?;
    if n > MAX_WATCH_TTL_SECS {
        return Err(serde::de::Error::custom(format!(
            "redis.watch_ttl_secs must be between 0 (off) and {MAX_WATCH_TTL_SECS} (got {n})"
        )));
    }
    Ok(n)
}
// ---- end watched lists ----

// ---- store writer (issue 13 item 2) ----
#[cfg(test)]
mod store_writer_tests {
    use super::*;

    #[test]
    fn write_pipelines_defaults_to_one_and_refuses_zero_naming_the_key() {
        let config: RedisConfig = toml::from_str("url = \"redis://x\"\nkey_prefix = \"p\"\npool_size = 1\nprofile_ttl_secs = 0\nwrite_batch = 1\nretry_initial_ms = 1\nretry_max_ms = 1\nmax_pending_lists = 1").expect("parses");
        assert_eq!(config.write_pipelines, 1);
        let error = toml::from_str::<RedisConfig>("url = \"redis://x\"\nkey_prefix = \"p\"\npool_size = 1\nprofile_ttl_secs = 0\nwrite_batch = 1\nretry_initial_ms = 1\nretry_max_ms = 1\nmax_pending_lists = 1\nwrite_pipelines = 0")
            .expect_err("0 lanes");
        assert!(error.to_string().contains("redis.write_pipelines must be between 1 and 64"), "{error}");
    }

    #[test]
    fn watch_ttl_defaults_to_30_s_and_refuses_more_than_an_hour_naming_the_key() {
        let base = "url = \"redis://x\"\nkey_prefix = \"p\"\npool_size = 1\nprofile_ttl_secs = 0\nwrite_batch = 1\nretry_initial_ms = 1\nretry_max_ms = 1\nmax_pending_lists = 1";
        let config: RedisConfig = toml::from_str(base).expect("parses");
        assert_eq!(config.watch_ttl_secs, 30);
        let off: RedisConfig = toml::from_str(&format!("{base}\nwatch_ttl_secs = 0")).expect("0 is off");
        assert_eq!(off.watch_ttl_secs, 0);
        let error = toml::from_str::<RedisConfig>(&format!("{base}\nwatch_ttl_secs = 3601")).expect_err("too long");
        assert!(error.to_string().contains("redis.watch_ttl_secs must be between 0 (off) and 3600"), "{error}");
    }
}
// ---- end store writer ----

#[cfg(test)]
mod cluster_tests {
    use super::*;

    const BASE: &str = "url = \"redis://x\"\nkey_prefix = \"p\"\npool_size = 1\nprofile_ttl_secs = 0\nwrite_batch = 1\nretry_initial_ms = 1\nretry_max_ms = 1\nmax_pending_lists = 1\n";

    #[test]
    fn cluster_nodes_come_as_an_array_or_a_comma_separated_list_and_must_be_urls() {
        let config: RedisConfig = toml::from_str(BASE).expect("parses");
        assert!(config.cluster_nodes.is_empty(), "one server by default");
        let array: RedisConfig =
            toml::from_str(&format!("{BASE}cluster_nodes = [\"redis://a:7000\", \"rediss://b:7001\"]")).expect("array");
        assert_eq!(array.cluster_nodes, ["redis://a:7000", "rediss://b:7001"]);
        let joined: RedisConfig =
            toml::from_str(&format!("{BASE}cluster_nodes = \"redis://a:7000, redis://b:7001\"")).expect("joined");
        assert_eq!(joined.cluster_nodes, ["redis://a:7000", "redis://b:7001"]);
        let error =
            toml::from_str::<RedisConfig>(&format!("{BASE}cluster_nodes = [\"a:7000\"]")).expect_err("no scheme");
        assert!(error.to_string().contains("redis.cluster_nodes: \"a:7000\" is not a URL"), "{error}");
        let error =
            toml::from_str::<RedisConfig>(&format!("{BASE}cluster_nodes = \"http://a:7000\"")).expect_err("scheme");
        assert!(error.to_string().contains("redis.cluster_nodes"), "{error}");
    }

    #[test]
    fn cluster_nodes_come_from_the_environment_as_a_comma_separated_list() {
        use crate::config::{Config, Overrides};
        let env = |value: &str| vec![("LIVEREC_REDIS__CLUSTER_NODES".to_owned(), value.to_owned())];
        let config = Config::load_from(None, env("redis://10.0.0.1:7000,redis://10.0.0.2:7001"), &Overrides::default())
            .expect("loads");
        assert_eq!(config.redis.cluster_nodes, ["redis://10.0.0.1:7000", "redis://10.0.0.2:7001"]);
        let error = Config::load_from(None, env("10.0.0.1:7000"), &Overrides::default()).expect_err("no scheme");
        assert!(error.to_string().contains("LIVEREC_REDIS__CLUSTER_NODES"), "{error}");
        assert!(error.to_string().contains("is not a URL"), "{error}");
    }

    #[test]
    fn a_key_prefix_with_a_brace_is_refused() {
        let config = RedisConfig { key_prefix: "app{1}".into(), ..RedisConfig::default() };
        let error = config.check().expect_err("brace");
        assert!(error.contains("redis.key_prefix must not contain"), "{error}");
        assert!(RedisConfig::default().check().is_ok());
    }
}
