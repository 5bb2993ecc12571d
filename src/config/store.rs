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
    /// Most profiles the embedded (memory) store keeps; past it the least recently used are
    /// evicted. The embedded store is a cache of recent users; Redis is the durable store.
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
        }
    }
}
