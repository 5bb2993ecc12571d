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
}

/// Settings of the `[redis]` config section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `rediss://` for TLS).
    pub url: String,
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
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
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
        }
    }
}

// ---- store writer (issue 13 item 2) ----
/// Most writer lanes: each holds a pool connection while its pipeline is in flight.
pub const MAX_WRITE_PIPELINES: usize = 64;

fn default_write_pipelines() -> usize {
    4
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
