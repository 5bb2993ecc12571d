//! The in-process event bus: one bounded queue per partition, events routed by user id. A
//! partition holds at most `bus.queue_capacity` batches and `bus.queue_events` events (a batch
//! keeps its events' room until its consumer has applied it and drops it). Publishing reserves
//! room in every partition a batch touches before sending any of it, so a batch is queued whole
//! or refused whole (503), never half. Queued events live in memory only.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{mpsc, Semaphore};

use super::{partition_of, BusError, EventBatch, EventBus};

struct Partition {
    batches: mpsc::Sender<EventBatch>,
    /// A permit per event the partition may still take.
    events: Arc<Semaphore>,
}

pub struct MemoryBus {
    partitions: Vec<Partition>,
}

impl MemoryBus {
    /// A bus with `partitions` queues of `capacity` batches and `events` events each, and the
    /// receiving ends for the ingest actors (index = partition).
    pub fn new(partitions: usize, capacity: usize, events: usize) -> (Self, Vec<mpsc::Receiver<EventBatch>>) {
        let events = events.clamp(1, Semaphore::MAX_PERMITS);
        let (partitions, receivers) = (0..partitions.max(1))
            .map(|_| {
                let (batches, receiver) = mpsc::channel(capacity.max(1));
                (Partition { batches, events: Arc::new(Semaphore::new(events)) }, receiver)
            })
            .unzip();
        (Self { partitions }, receivers)
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
        let mut reserved = Vec::with_capacity(n);
        for (index, events) in parts.into_iter().enumerate() {
            if events.is_empty() {
                continue;
            }
            let partition = &self.partitions[index];
            // Room for the events first, then a slot in the queue; a refusal on either gives
            // back what this batch reserved so far (the permits drop with `reserved`).
            let count = u32::try_from(events.len()).unwrap_or(u32::MAX);
            let room = partition.events.clone().try_acquire_many_owned(count).map_err(|e| match e {
                tokio::sync::TryAcquireError::NoPermits => BusError::Saturated,
                tokio::sync::TryAcquireError::Closed => BusError::Closed,
            })?;
            let slot = partition.batches.try_reserve().map_err(|e| match e {
                mpsc::error::TrySendError::Full(()) => BusError::Saturated,
                mpsc::error::TrySendError::Closed(()) => BusError::Closed,
            })?;
            reserved.push((slot, room, events));
        }
        for (slot, room, events) in reserved {
            slot.send(EventBatch { events, received: batch.received, span: batch.span.clone(), room: Some(room) });
        }
        Ok(())
    }

    fn queued_batches(&self) -> Option<u64> {
        Some(self.partitions.iter().map(|p| (p.batches.max_capacity() - p.batches.capacity()) as u64).sum())
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
        EventBatch { events, received: Instant::now(), span: tracing::Span::none(), room: None }
    }

    #[actix_rt::test]
    async fn a_batch_is_queued_whole_or_refused_whole() {
        let (bus, mut receivers) = MemoryBus::new(2, 1, 100);
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

    #[actix_rt::test]
    async fn a_partition_holds_at_most_its_events_until_they_are_applied() {
        let (bus, mut receivers) = MemoryBus::new(1, 1000, 3);
        bus.publish(batch(&["a", "b"])).await.expect("room for two");
        // Two of three taken: a batch of two is refused whole, one of one fits.
        assert!(matches!(bus.publish(batch(&["c", "d"])).await, Err(BusError::Saturated)));
        bus.publish(batch(&["c"])).await.expect("room for one");
        assert!(matches!(bus.publish(batch(&["d"])).await, Err(BusError::Saturated)));
        // Taken off the queue is not enough: the room comes back when the batch is dropped,
        // which the ingest does once it has applied it.
        let first = receivers[0].try_recv().expect("queued");
        assert_eq!(first.events.len(), 2);
        assert!(matches!(bus.publish(batch(&["d"])).await, Err(BusError::Saturated)));
        drop(first);
        bus.publish(batch(&["d", "e"])).await.expect("room again");
    }

    #[test]
    fn partitions_are_stable() {
        assert_eq!(partition_of("user-1", 16), partition_of("user-1", 16));
        let spread: std::collections::HashSet<_> = (0..200).map(|i| partition_of(&format!("u{i}"), 8)).collect();
        assert_eq!(spread.len(), 8);
    }
}
