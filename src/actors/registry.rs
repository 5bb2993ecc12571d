//! The session registry: user id to that user's hub (latest list and subscribers) and session
//! actor. It is a sharded concurrent map, so lookups for different users rarely meet on a lock,
//! and sessions are spread over a fixed set of arbiter threads by a stable hash of the user id.
//!
//! A hub outlives its session: an idle session stops and frees its history, while subscribers
//! keep their place and the last list; the next event or request starts a new session, which
//! rebuilds from the profile store. A hub is dropped once it has neither a session nor a
//! subscriber.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use super::messages::Release;
use super::session::SessionActor;
use super::SessionDeps;
use crate::bus::partition_of;
use crate::event::UserId;
use crate::recs::{RecList, RecUpdate};
use crate::store::redis::FanoutCommand;

/// The latest list of one user and the channel its subscribers watch. A watch channel keeps only
/// the newest value: a slow subscriber skips stale lists instead of queueing them.
pub struct UserHub {
    pub user: UserId,
    updates: watch::Sender<Option<Arc<RecUpdate>>>,
    session: Mutex<Option<Addr<SessionActor>>>,
    seq: AtomicU64,
    /// Kafka partition the user's events arrive on (-1: not from Kafka).
    partition: AtomicI32,
    /// The user was erased: nothing more is published or stored through this hub.
    erased: AtomicBool,
}

impl UserHub {
    fn new(user: UserId) -> Self {
        let (updates, _) = watch::channel(None);
        Self {
            user,
            updates,
            session: Mutex::new(None),
            seq: AtomicU64::new(0),
            partition: AtomicI32::new(-1),
            erased: AtomicBool::new(false),
        }
    }

    /// The running session, if any.
    pub fn session(&self) -> Option<Addr<SessionActor>> {
        self.session.lock().as_ref().filter(|a| a.connected()).cloned()
    }

    /// The list most recently published, if any.
    pub fn latest(&self) -> Option<Arc<RecUpdate>> {
        self.updates.borrow().clone()
    }

    /// The next sequence number for a published list.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Makes sure numbering continues after `seq` (a list restored from the store).
    pub fn bump_seq(&self, seq: u64) {
        self.seq.fetch_max(seq, Ordering::Relaxed);
    }

    pub fn publish(&self, update: Arc<RecUpdate>) {
        self.updates.send_replace(Some(update));
    }

    pub fn subscriber_count(&self) -> usize {
        self.updates.receiver_count()
    }

    pub fn is_erased(&self) -> bool {
        self.erased.load(Ordering::Relaxed)
    }
}

/// A subscriber's hold on a user's updates. Dropping it may free the hub.
pub struct Subscription {
    rx: Option<watch::Receiver<Option<Arc<RecUpdate>>>>,
    hub: Arc<UserHub>,
    registry: Arc<SessionRegistry>,
}

impl Subscription {
    pub fn receiver(&mut self) -> &mut watch::Receiver<Option<Arc<RecUpdate>>> {
        self.rx.as_mut().expect("present until drop")
    }

    /// Moves the receiver out (for a stream adapter), so the hub counts one subscriber, not two.
    pub fn take_receiver(&mut self) -> watch::Receiver<Option<Arc<RecUpdate>>> {
        self.rx.take().expect("taken once")
    }

    pub fn user(&self) -> &UserId {
        &self.hub.user
    }

    /// The list most recently published for the user.
    pub fn latest(&self) -> Option<Arc<RecUpdate>> {
        self.hub.latest()
    }

    /// The user was erased: the stream must end.
    pub fn erased(&self) -> bool {
        self.hub.is_erased()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.rx.take();
        self.registry.release(&self.hub);
    }
}

pub struct SessionRegistry {
    hubs: DashMap<UserId, Arc<UserHub>>,
    arbiters: Vec<ArbiterHandle>,
    pub deps: Arc<SessionDeps>,
    /// Production mode: sessions start only for users whose Kafka partition this instance owns
    /// (from ingest); readers elsewhere get lists from the store and the update fan-out.
    owned_by_ingest: bool,
    /// Asks the fan-out to follow (or stop following) a user's updates from other instances.
    fanout: Option<mpsc::UnboundedSender<FanoutCommand>>,
    /// Kafka partitions assigned to this instance.
    assigned: Mutex<Vec<i32>>,
}

impl SessionRegistry {
    pub fn new(deps: Arc<SessionDeps>, arbiters: Vec<ArbiterHandle>) -> Arc<Self> {
        Self::with_mode(deps, arbiters, false, None)
    }

    /// A registry for production mode (see `owned_by_ingest`).
    pub fn with_mode(
        deps: Arc<SessionDeps>,
        arbiters: Vec<ArbiterHandle>,
        owned_by_ingest: bool,
        fanout: Option<mpsc::UnboundedSender<FanoutCommand>>,
    ) -> Arc<Self> {
        assert!(!arbiters.is_empty(), "at least one session arbiter");
        Arc::new(Self {
            hubs: DashMap::new(),
            arbiters,
            deps,
            owned_by_ingest,
            fanout,
            assigned: Mutex::new(Vec::new()),
        })
    }

    pub fn owned_by_ingest(&self) -> bool {
        self.owned_by_ingest
    }

    fn new_hub(&self, user: &UserId) -> Arc<UserHub> {
        if let Some(fanout) = &self.fanout {
            let _ = fanout.send(FanoutCommand::Watch(user.clone()));
        }
        Arc::new(UserHub::new(user.clone()))
    }

    /// The session of a user whose events arrive on Kafka `partition`.
    pub fn session_on_partition(self: &Arc<Self>, user: &UserId, partition: i32) -> (Arc<UserHub>, Addr<SessionActor>) {
        let (hub, addr) = self.session(user);
        hub.partition.store(partition, Ordering::Relaxed);
        (hub, addr)
    }

    /// Stops the sessions of users on `partitions` (revoked from this instance). Returns how many.
    pub fn release_partitions(&self, partitions: &std::collections::HashSet<i32>) -> usize {
        let mut released = 0;
        for hub in self.hubs.iter() {
            if partitions.contains(&hub.partition.load(Ordering::Relaxed)) {
                if let Some(session) = hub.session() {
                    // Not on a hot path; the message must arrive even if the mailbox is full.
                    session.do_send(Release);
                    released += 1;
                }
            }
        }
        released
    }

    pub fn set_assigned(&self, partitions: Vec<i32>) {
        *self.assigned.lock() = partitions;
    }

    pub fn assigned(&self) -> Vec<i32> {
        self.assigned.lock().clone()
    }

    /// A list published by another instance: shown to local subscribers if it is newer.
    pub fn deliver_remote(&self, list: RecList) {
        let Some(hub) = self.hub(&list.user_id) else { return };
        let newer = hub.latest().is_none_or(|current| list.seq > current.list.seq);
        if newer {
            hub.bump_seq(list.seq);
            hub.publish(RecUpdate::new(list));
            self.deps.metrics.fanout_received.inc();
        }
    }

    /// The user's hub, if the registry holds one.
    pub fn hub(&self, user: &UserId) -> Option<Arc<UserHub>> {
        self.hubs.get(user).map(|h| h.clone())
    }

    /// The user's session, started (and rebuilt from the store) if it is not running. Starting
    /// happens under the map's shard lock, so two callers never start two sessions for one user.
    pub fn session(self: &Arc<Self>, user: &UserId) -> (Arc<UserHub>, Addr<SessionActor>) {
        let entry = self.hubs.entry(user.clone()).or_insert_with(|| self.new_hub(user));
        let hub = entry.value().clone();
        let mut slot = hub.session.lock();
        if let Some(addr) = slot.as_ref().filter(|a| a.connected()) {
            return (hub.clone(), addr.clone());
        }
        let arbiter = &self.arbiters[partition_of(user.as_str(), self.arbiters.len())];
        let registry = self.clone();
        let session_hub = hub.clone();
        let addr = SessionActor::start_in_arbiter(arbiter, move |_| SessionActor::new(session_hub, registry));
        *slot = Some(addr.clone());
        drop(slot);
        drop(entry);
        (hub, addr)
    }

    /// Subscribes to the user's updates. In the embedded mode this starts the user's session (which
    /// produces a first list); in production mode only the owner runs sessions, so the session is
    /// returned only if it already runs here.
    pub fn subscribe(self: &Arc<Self>, user: &UserId) -> (Subscription, Option<Addr<SessionActor>>) {
        let (hub, addr) = if self.owned_by_ingest {
            let hub = self.hubs.entry(user.clone()).or_insert_with(|| self.new_hub(user)).value().clone();
            let addr = hub.session();
            (hub, addr)
        } else {
            let (hub, addr) = self.session(user);
            (hub, Some(addr))
        };
        let rx = hub.updates.subscribe();
        (Subscription { rx: Some(rx), hub, registry: self.clone() }, addr)
    }

    /// Called by a session as it stops.
    pub(super) fn session_stopped(&self, hub: &Arc<UserHub>, addr: &Addr<SessionActor>) {
        {
            let mut slot = hub.session.lock();
            if slot.as_ref() == Some(addr) {
                *slot = None;
            }
        }
        self.release(hub);
    }

    /// Drops the hub if it has neither a session nor a subscriber left.
    fn release(&self, hub: &Arc<UserHub>) {
        let removed = self.hubs.remove_if(&hub.user, |_, h| {
            Arc::ptr_eq(h, hub) && h.subscriber_count() == 0 && h.session.lock().as_ref().is_none_or(|a| !a.connected())
        });
        if removed.is_some() {
            if let Some(fanout) = &self.fanout {
                let _ = fanout.send(FanoutCommand::Unwatch(hub.user.clone()));
            }
        }
    }

    /// Erases the user on this instance: the session stops, every subscriber's stream ends, and
    /// the hub is dropped so that a later event starts afresh. Returns the subscriptions closed.
    pub async fn erase(&self, user: &UserId) -> usize {
        let Some(hub) = self.hub(user) else { return 0 };
        hub.erased.store(true, Ordering::Relaxed);
        if let Some(session) = hub.session() {
            let _ = session.send(super::messages::Release).await;
        }
        let closed = hub.subscriber_count();
        hub.updates.send_replace(None);
        self.hubs.remove_if(user, |_, h| Arc::ptr_eq(h, &hub));
        if let Some(fanout) = &self.fanout {
            let _ = fanout.send(FanoutCommand::Unwatch(user.clone()));
        }
        closed
    }

    /// Users the registry holds a hub for.
    pub fn len(&self) -> usize {
        self.hubs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hubs.is_empty()
    }
}
