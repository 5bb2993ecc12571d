//! The event bus between producers (REST, WebSocket) and the ingest actors, behind one small
//! trait. The in-process bus is the embedded default; the Kafka bus implements the same trait.

/// The Kafka event codec (the `liverec-wire` crate).
pub use liverec_wire::codec;
pub mod items;
pub mod kafka;
pub mod kafka_window;
pub mod memory;
pub mod monitor_topic;
pub mod record;

use std::time::Instant;

use async_trait::async_trait;

use crate::event::{Event, UserId};

/// Events travelling together, with the moment the server received them.
#[derive(Debug)]
pub struct EventBatch {
    pub events: Vec<Event>,
    pub received: Instant,
    /// The span that received the batch: the trace continues through the bus.
    pub span: tracing::Span,
    /// The in-process bus's room the batch holds in its partition's queue (`bus.queue_events`),
    /// given back when the batch is dropped: once its consumer has applied it.
    pub room: Option<tokio::sync::OwnedSemaphorePermit>,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Every queue that would take the batch is full: the client should retry later.
    #[error("the event pipeline is saturated")]
    Saturated,
    /// The bus is shutting down or its consumers are gone.
    #[error("the event bus is closed")]
    Closed,
    /// The broker did not acknowledge the events in time.
    #[error("the event bus is unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Accepts a batch. Returns once the batch is safely queued: all of it, or none of it.
    async fn publish(&self, batch: EventBatch) -> Result<(), BusError>;

    /// Tells whichever instance owns `user` that the stored profile changed and its session must
    /// reload. A single process has nothing to tell.
    async fn notify_reload(&self, _user: &UserId) -> Result<(), BusError> {
        Ok(())
    }

    /// Tells whichever instance owns `user` that this one served them the list `list_json` (cut to
    /// the items shown), so the owner counts the impression and attributes clicks on it; returns
    /// once an event the user posts afterwards is sure to reach the owner after it. A single
    /// process counts its lists itself.
    async fn notify_shown(&self, _user: &UserId, _list_json: &[u8]) -> Result<(), BusError> {
        Ok(())
    }

    /// Batches accepted and not yet taken by an ingest actor, when the bus queues in process
    /// (Kafka's backlog is the consumer lag instead).
    fn queued_batches(&self) -> Option<u64> {
        None
    }
}

/// A hash of a user id that is the same in every process, run and release, so that partitions
/// and traffic splits (canaries, experiments) stay put across restarts and instances.
pub fn user_hash(user: &str) -> u64 {
    // FNV-1a: tiny, stable across Rust versions (unlike DefaultHasher's unspecified algorithm).
    user.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Stable partition of a user id (the same in every process and run).
pub fn partition_of(user: &str, partitions: usize) -> usize {
    (user_hash(user) % partitions.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_hash_is_fnv1a_and_never_moves() {
        // Reference values of 64-bit FNV-1a: a change here would move every partition and split.
        assert_eq!(user_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(user_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(partition_of("a", 7), (0xaf63_dc4c_8601_ec8cu64 % 7) as usize);
    }
}
