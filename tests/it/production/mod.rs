//! Production mode against the real Apache Kafka broker and Redis server that the test command
//! starts (`scripts/services up`); the helpers they share are in `support::services` and
//! `support::restart`.

mod cluster;
mod erasure;
mod failover;
mod kafka;
mod memory;
mod shutdown;
mod store_writer;
mod watch;
