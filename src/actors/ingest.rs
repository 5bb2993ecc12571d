//! `IngestActor`: one per bus partition. Takes event batches off its partition's queue, splits
//! them by user (keeping each user's order), hands each user's events to that user's session and
//! waits until every session has applied and persisted them before taking the next batch. That
//! wait is the backpressure: when sessions fall behind, the partition queue fills and producers
//! are told to retry (503) instead of memory growing without bound.
//!
//! Mailbox: the partition queue itself (`bus.queue_capacity` batches, `bus.queue_events` events
//! until applied). Restart policy: the actor has no state of its own; if it stops, the queue's
//! sender side sees it closed and publishing fails with `BusError::Closed`.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use futures_util::future::join_all;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::registry::SessionRegistry;
use crate::bus::EventBatch;
use crate::event::{Event, UserId};

pub struct IngestActor {
    pub partition: usize,
    registry: Arc<SessionRegistry>,
    queue: Option<mpsc::Receiver<EventBatch>>,
}

impl IngestActor {
    pub fn new(partition: usize, registry: Arc<SessionRegistry>, queue: mpsc::Receiver<EventBatch>) -> Self {
        Self { partition, registry, queue: Some(queue) }
    }
}

impl Actor for IngestActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(queue) = self.queue.take() {
            ctx.add_stream(ReceiverStream::new(queue));
        }
    }
}

/// Groups events by user, keeping first-seen user order and each user's event order.
fn by_user(events: Vec<Event>) -> Vec<(UserId, Vec<Event>)> {
    let mut groups: Vec<(UserId, Vec<Event>)> = Vec::new();
    let mut position: HashMap<UserId, usize> = HashMap::new();
    for event in events {
        match position.get(&event.user_id) {
            Some(&i) => groups[i].1.push(event),
            None => {
                position.insert(event.user_id.clone(), groups.len());
                groups.push((event.user_id.clone(), vec![event]));
            }
        }
    }
    groups
}

impl StreamHandler<EventBatch> for IngestActor {
    fn handle(&mut self, batch: EventBatch, ctx: &mut Self::Context) {
        let (received, span, room) = (batch.received, batch.span, batch.room);
        let registry = self.registry.clone();
        // Wait (blocking this actor's stream, not the thread) until every session has the events.
        // `apply` completes every user's part, on a fresh session if the first one stopped (an
        // erasure in progress), so an accepted event is never dropped unanswered.
        let applied = async move {
            // Each user's part yields the future of its persistence on purpose: all users are
            // applied first, then their writes are awaited together.
            #[allow(clippy::async_yields_async)]
            let applies = by_user(batch.events).into_iter().map(|(user, events)| {
                let (registry, span) = (registry.clone(), span.clone());
                async move { registry.apply(&user, None, events, received, span).await.persisted }
            });
            let persisted = join_all(applies).await;
            join_all(persisted).await;
            // The batch's room in the bus (`bus.queue_events`) is free once it is applied.
            drop(room);
        };
        ctx.wait(applied.into_actor(self));
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {
        tracing::debug!(partition = self.partition, "ingest queue closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventIn, EventLimits, EventType};

    #[test]
    fn groups_keep_order() {
        let limits = EventLimits {
            max_id_len: 8,
            max_context_attributes: 0,
            max_context_key_len: 1,
            max_context_value_len: 1,
            ..EventLimits::default()
        };
        let ev = |u: &str, i: &str| EventIn::new(u, i, EventType::View).validate(&limits, 1).expect("valid");
        let groups = by_user(vec![ev("b", "1"), ev("a", "2"), ev("b", "3")]);
        let shape: Vec<(String, Vec<String>)> =
            groups.iter().map(|(u, es)| (u.to_string(), es.iter().map(|e| e.item_id.to_string()).collect())).collect();
        assert_eq!(shape, vec![("b".into(), vec!["1".into(), "3".into()]), ("a".into(), vec!["2".into()])]);
    }
}
