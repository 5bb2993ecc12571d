//! The event bus between producers (REST, WebSocket) and the ingest actors, behind one small
//! trait. The in-process bus is the embedded default; the Kafka bus implements the same trait.

/// The Kafka event codec (the `liverec-wire` crate).
pub use liverec_wire::codec;
pub mod kafka;
pub mod memory;

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

    /// Batches accepted and not yet taken by an ingest actor, when the bus queues in process
    /// (Kafka's backlog is the consumer lag instead).
    fn queued_batches(&self) -> Option<u64> {
        None
    }
}

/// Stable partition of a user id (the same in every process and run).
pub fn partition_of(user: &str, partitions: usize) -> usize {
    // FNV-1a: tiny, stable across Rust versions (unlike DefaultHasher's unspecified algorithm).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in user.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % partitions.max(1) as u64) as usize
}
