//! The Apache Kafka broker and Redis server that the test command starts (`scripts/services up`),
//! shared by the production tests: a lock so that a restart never pulls a service from under
//! another test, a configuration of names no other test uses, and reading a user's stored history
//! straight from Redis.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use deadpool_redis::redis::{self, AsyncCommands as _};
use liverec::config::{BusKind, Config, StoreKind};

use super::server::test_config;

/// Tests that restart a service take this lock for writing; every other test that uses the
/// services holds it for reading, so a restart never pulls Redis from under another test.
pub static SERVICES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Partitions of every test's events topic.
pub const PARTITIONS: i32 = 4;

/// The broker and Redis started by the test command. Missing services fail the test loudly.
pub struct Services {
    pub brokers: String,
    pub redis_url: String,
}

/// Where the services are, from the environment the test command sets.
pub fn services() -> Services {
    let get = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: run the tests with scripts/test, which starts Kafka and Redis (scripts/services up)")
        })
    };
    Services { brokers: get("LIVEREC_TEST_KAFKA_BROKERS"), redis_url: get("LIVEREC_TEST_REDIS_URL") }
}

/// A name no other test run uses: topics, consumer group and key prefix are per test.
pub fn unique(name: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_nanos();
    format!("it-{name}-{}-{nanos}", std::process::id())
}

/// The production configuration (Kafka bus, Redis store) of one test, with its own topics,
/// consumer group and key prefix.
pub fn production_config(name: &str) -> Config {
    let services = services();
    let id = unique(name);
    let mut config = test_config();
    config.bus.kind = BusKind::Kafka;
    config.store.kind = StoreKind::Redis;
    config.kafka.brokers = services.brokers;
    config.kafka.events_topic = format!("{id}.events");
    config.kafka.dead_letter_topic = format!("{id}.dlq");
    config.kafka.group_id = id.clone();
    config.kafka.partitions = PARTITIONS;
    config.kafka.commit_interval_ms = 200;
    config.kafka.session_timeout_ms = 6000;
    config.redis.url = services.redis_url;
    config.redis.key_prefix = id;
    config.redis.retry_max_ms = 500;
    config
}

/// A connection of the test's own to the Redis server.
pub async fn redis_conn(config: &Config) -> redis::aio::MultiplexedConnection {
    redis::Client::open(config.redis.url.as_str())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection")
}

/// Event ids in the user's Redis history, in stored order.
pub async fn stored_ids(mut conn: redis::aio::MultiplexedConnection, config: &Config, user: &str) -> Vec<String> {
    let key = format!("{}:{{{user}}}:h", config.redis.key_prefix);
    let entries: Vec<Vec<u8>> = conn.lrange(&key, 0, -1).await.unwrap_or_default();
    drop(conn);
    entries
        .iter()
        .map(|e| liverec::store::redis::decode_history_entry(e).expect("a stored interaction").event_id.to_string())
        .collect()
}

/// Runs `scripts/services ACTION` (stop-kafka, start-kafka, ...) and tells whether it succeeded.
pub fn services_script(action: &str) -> bool {
    Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services"))
        .arg(action)
        .status()
        .is_ok_and(|status| status.success())
}
