//! Production mode against the real Apache Kafka broker and Redis server that the test command
//! starts (`scripts/services up`).

mod failover;
