//! The session registry: user id to that user's hub (latest list and subscribers) and session
//! actor. It is a sharded concurrent map, so lookups for different users rarely meet on a lock,
//! and sessions are spread over a fixed set of arbiter threads by a stable hash of the user id.
//!
//! A hub outlives its session: an idle session stops and frees its history, while subscribers
//! keep their place and the last list; the next event or request starts a new session, which
//! rebuilds from the profile store. A hub is dropped once it has neither a session nor a
//! subscriber.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::session::SessionActor;
use super::SessionDeps;
use crate::bus::partition_of;
use crate::event::UserId;
use crate::recs::RecUpdate;

/// The latest list of one user and the channel its subscribers watch. A watch channel keeps only
/// the newest value: a slow subscriber skips stale lists instead of queueing them.
pub struct UserHub {
    pub user: UserId,
    updates: watch::Sender<Option<Arc<RecUpdate>>>,
    session: Mutex<Option<Addr<SessionActor>>>,
    seq: AtomicU64,
}

impl UserHub {
    fn new(user: UserId) -> Self {
        let (updates, _) = watch::channel(None);
        Self {
            user,
            updates,
            session: Mutex::new(None),
            seq: AtomicU64::new(0),
        }
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

    pub fn user(&self) -> &UserId {
        &self.hub.user
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
}

impl SessionRegistry {
    pub fn new(deps: Arc<SessionDeps>, arbiters: Vec<ArbiterHandle>) -> Arc<Self> {
        assert!(!arbiters.is_empty(), "at least one session arbiter");
        Arc::new(Self {
            hubs: DashMap::new(),
            arbiters,
            deps,
        })
    }

    /// The user's hub, if the registry holds one.
    pub fn hub(&self, user: &UserId) -> Option<Arc<UserHub>> {
        self.hubs.get(user).map(|h| h.clone())
    }

    /// The user's session, started (and rebuilt from the store) if it is not running. Starting
    /// happens under the map's shard lock, so two callers never start two sessions for one user.
    pub fn session(self: &Arc<Self>, user: &UserId) -> (Arc<UserHub>, Addr<SessionActor>) {
        let entry = self
            .hubs
            .entry(user.clone())
            .or_insert_with(|| Arc::new(UserHub::new(user.clone())));
        let hub = entry.value().clone();
        let mut slot = hub.session.lock();
        if let Some(addr) = slot.as_ref().filter(|a| a.connected()) {
            return (hub.clone(), addr.clone());
        }
        let arbiter = &self.arbiters[partition_of(user.as_str(), self.arbiters.len())];
        let registry = self.clone();
        let session_hub = hub.clone();
        let addr = SessionActor::start_in_arbiter(arbiter, move |_| {
            SessionActor::new(session_hub, registry)
        });
        *slot = Some(addr.clone());
        drop(slot);
        drop(entry);
        (hub, addr)
    }

    /// Subscribes to the user's updates and makes sure a session will produce a list.
    pub fn subscribe(self: &Arc<Self>, user: &UserId) -> (Subscription, Addr<SessionActor>) {
        let (hub, addr) = self.session(user);
        let rx = hub.updates.subscribe();
        (
            Subscription {
                rx: Some(rx),
                hub,
                registry: self.clone(),
            },
            addr,
        )
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
        self.hubs.remove_if(&hub.user, |_, h| {
            Arc::ptr_eq(h, hub)
                && h.subscriber_count() == 0
                && h.session.lock().as_ref().is_none_or(|a| !a.connected())
        });
    }

    /// Users the registry holds a hub for.
    pub fn len(&self) -> usize {
        self.hubs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hubs.is_empty()
    }
}
