//! The in-process event bus: one bounded queue per partition, events routed by user id. Publishing
//! reserves room in every partition a batch touches before sending any of it, so a batch is queued
//! whole or refused whole (503), never half. Queued events live in memory only.

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{partition_of, BusError, EventBatch, EventBus};

pub struct MemoryBus {
    partitions: Vec<mpsc::Sender<EventBatch>>,
}

impl MemoryBus {
    /// A bus with `partitions` queues of `capacity` batches, and the receiving ends for the
    /// ingest actors (index = partition).
    pub fn new(partitions: usize, capacity: usize) -> (Self, Vec<mpsc::Receiver<EventBatch>>) {
        let (senders, receivers) = (0..partitions.max(1)).map(|_| mpsc::channel(capacity.max(1))).unzip();
        (Self { partitions: senders }, receivers)
    }
}

#[async_trait]
impl EventBus for MemoryBus {
    async fn publish(&self, batch: EventBatch) -> Result<(), BusError> {
        let n = self.partitions.len();
        let mut parts: Vec<Vec<_>> = (0..n).map(|_| Vec::new()).collect();
        for event in batch.events {
            parts[partition_of(event.user_id.as_str(), n)].push(event);
        }
        let mut permits = Vec::with_capacity(n);
        for (index, events) in parts.into_iter().enumerate() {
            if events.is_empty() {
                continue;
            }
            let permit = self.partitions[index].try_reserve().map_err(|e| match e {
                mpsc::error::TrySendError::Full(()) => BusError::Saturated,
                mpsc::error::TrySendError::Closed(()) => BusError::Closed,
            })?;
            permits.push((permit, events));
        }
        for (permit, events) in permits {
            permit.send(EventBatch { events, received: batch.received, span: batch.span.clone() });
        }
        Ok(())
    }

    fn queued_batches(&self) -> Option<u64> {
        Some(self.partitions.iter().map(|p| (p.max_capacity() - p.capacity()) as u64).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventIn, EventLimits, EventType};
    use std::time::Instant;

    fn batch(users: &[&str]) -> EventBatch {
        let limits = EventLimits {
            max_id_len: 64,
            max_context_attributes: 1,
            max_context_key_len: 8,
            max_context_value_len: 8,
            ..EventLimits::default()
        };
        let events =
            users.iter().map(|u| EventIn::new(*u, "i", EventType::View).validate(&limits, 1).expect("valid")).collect();
        EventBatch { events, received: Instant::now(), span: tracing::Span::none() }
    }

    #[actix_rt::test]
    async fn a_batch_is_queued_whole_or_refused_whole() {
        let (bus, mut receivers) = MemoryBus::new(2, 1);
        // Find two users on different partitions.
        let a = "a";
        let b = (0..100).map(|i| format!("b{i}")).find(|u| partition_of(u, 2) != partition_of(a, 2)).expect("user");
        bus.publish(batch(&[a])).await.expect("room");
        // a's partition is now full: a batch touching both partitions must put nothing on b's.
        assert!(matches!(bus.publish(batch(&[&b, a])).await, Err(BusError::Saturated)));
        let b_rx = &mut receivers[partition_of(&b, 2)];
        assert!(b_rx.try_recv().is_err());
        let a_rx = &mut receivers[partition_of(a, 2)];
        assert_eq!(a_rx.try_recv().expect("queued").events.len(), 1);
    }

    #[test]
    fn partitions_are_stable() {
        assert_eq!(partition_of("user-1", 16), partition_of("user-1", 16));
        let spread: std::collections::HashSet<_> = (0..200).map(|i| partition_of(&format!("u{i}"), 8)).collect();
        assert_eq!(spread.len(), 8);
    }
}
