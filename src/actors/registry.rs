//! The session registry: user id to that user's hub (latest list and subscribers) and session
//! actor. It is a sharded concurrent map, so lookups for different users rarely meet on a lock,
//! and sessions are spread over a fixed set of arbiter threads by a stable hash of the user id.
//!
//! A hub outlives its session: an idle session stops and frees its history, while subscribers
//! keep their place and the last list; the next event or request starts a new session, which
//! rebuilds from the profile store. A hub is dropped once it has neither a session nor a
//! subscriber.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::messages::{
    Applied, ApplyEvents, EnsureList, GetRecommendations, MergeHistory, Release, Reload, ShownElsewhere, Snapshot,
    StopIfIdle, TakeHistory,
};
use super::SessionDeps;
use crate::bus::partition_of;
use crate::event::{Event, ItemId, UserId};
use crate::recs::{RecList, RecUpdate};
use crate::store::UpdateFanout;

/// A running session as the registry and its callers reach it, behind a trait object
/// ([`SessionMailbox`]): the registry holds these, never the session actor's own type, the way
/// the monitor reaches the trainer through a `Recipient`; so the session may call back into the
/// registry without an import cycle.
///
/// A running session's handle is its actor's address alone, shared: a clone (every event and
/// request looks its session up) is one reference count. It used to hold a `Recipient` per
/// message (nine): each is a boxed sender with two more allocations of its own, about 1 KB a
/// session, built at every session start.
#[derive(Clone)]
pub struct SessionHandle(Arc<dyn SessionMailbox>);

/// A boxed answer of a session.
pub type SessionReply<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, MailboxError>> + Send>>;

/// The messages a session takes, as its callers send them. `Addr<A>` of an actor that handles
/// them all is the one the server uses; [`SessionRecipients`] lets tests mix actors.
pub trait SessionMailbox: Send + Sync + 'static {
    fn apply(&self, msg: ApplyEvents) -> SessionReply<Applied>;
    fn recommend(&self, msg: GetRecommendations) -> SessionReply<<GetRecommendations as Message>::Result>;
    /// Refused at once when the mailbox is full.
    fn try_ensure_list(&self, msg: EnsureList) -> Result<(), SendError<EnsureList>>;
    fn snapshot(&self, msg: Snapshot) -> SessionReply<<Snapshot as Message>::Result>;
    fn take_history(&self, msg: TakeHistory) -> SessionReply<<TakeHistory as Message>::Result>;
    fn merge(&self, msg: MergeHistory) -> SessionReply<<MergeHistory as Message>::Result>;
    fn reload(&self, msg: Reload) -> SessionReply<()>;
    /// Refused at once when the mailbox is full.
    fn try_shown(&self, msg: ShownElsewhere) -> Result<(), SendError<ShownElsewhere>>;
    fn release(&self) -> SessionReply<()>;
    /// [`Self::release`] that arrives even when the mailbox is full (not for hot paths).
    fn release_now(&self);
    /// The session's `Release` recipient: what it names itself by when it stops
    /// ([`SessionRegistry::session_stopped`]). Made on each call.
    fn release_recipient(&self) -> Recipient<Release>;
    fn connected(&self) -> bool;
    /// Asks the session to stop if it is idle; dropped when the mailbox is full (the next sweep
    /// asks again).
    fn stop_if_idle(&self, msg: StopIfIdle);
}

/// An actor that takes every session message: the session actor, or a stand-in in tests.
pub trait SessionActorLike:
    Actor<Context = Context<Self>>
    + Handler<ApplyEvents>
    + Handler<GetRecommendations>
    + Handler<EnsureList>
    + Handler<Snapshot>
    + Handler<TakeHistory>
    + Handler<MergeHistory>
    + Handler<Reload>
    + Handler<ShownElsewhere>
    + Handler<Release>
    + Handler<StopIfIdle>
{
}

impl<A> SessionActorLike for A where
    A: Actor<Context = Context<A>>
        + Handler<ApplyEvents>
        + Handler<GetRecommendations>
        + Handler<EnsureList>
        + Handler<Snapshot>
        + Handler<TakeHistory>
        + Handler<MergeHistory>
        + Handler<Reload>
        + Handler<ShownElsewhere>
        + Handler<Release>
        + Handler<StopIfIdle>
{
}

impl<A: SessionActorLike> SessionMailbox for Addr<A> {
    fn apply(&self, msg: ApplyEvents) -> SessionReply<Applied> {
        Box::pin(self.send(msg))
    }
    fn recommend(&self, msg: GetRecommendations) -> SessionReply<<GetRecommendations as Message>::Result> {
        Box::pin(self.send(msg))
    }
    fn try_ensure_list(&self, msg: EnsureList) -> Result<(), SendError<EnsureList>> {
        self.try_send(msg)
    }
    fn snapshot(&self, msg: Snapshot) -> SessionReply<<Snapshot as Message>::Result> {
        Box::pin(self.send(msg))
    }
    fn take_history(&self, msg: TakeHistory) -> SessionReply<<TakeHistory as Message>::Result> {
        Box::pin(self.send(msg))
    }
    fn merge(&self, msg: MergeHistory) -> SessionReply<<MergeHistory as Message>::Result> {
        Box::pin(self.send(msg))
    }
    fn reload(&self, msg: Reload) -> SessionReply<()> {
        Box::pin(self.send(msg))
    }
    fn try_shown(&self, msg: ShownElsewhere) -> Result<(), SendError<ShownElsewhere>> {
        self.try_send(msg)
    }
    fn release(&self) -> SessionReply<()> {
        Box::pin(self.send(Release))
    }
    fn release_now(&self) {
        self.do_send(Release);
    }
    fn release_recipient(&self) -> Recipient<Release> {
        self.clone().recipient()
    }
    fn connected(&self) -> bool {
        Addr::connected(self)
    }
    fn stop_if_idle(&self, msg: StopIfIdle) {
        let _ = self.try_send(msg);
    }
}

/// One recipient per message: tests start a session from several stand-in actors.
#[derive(Clone)]
pub struct SessionRecipients {
    pub apply: Recipient<ApplyEvents>,
    pub recommend: Recipient<GetRecommendations>,
    pub ensure_list: Recipient<EnsureList>,
    pub snapshot: Recipient<Snapshot>,
    pub take_history: Recipient<TakeHistory>,
    pub merge: Recipient<MergeHistory>,
    pub reload: Recipient<Reload>,
    pub shown: Recipient<ShownElsewhere>,
    /// Also identifies the session.
    pub release: Recipient<Release>,
}

impl SessionRecipients {
    /// The recipients of an actor that handles every session message.
    pub fn of<A: SessionActorLike>(addr: Addr<A>) -> SessionRecipients {
        SessionRecipients {
            apply: addr.clone().recipient(),
            recommend: addr.clone().recipient(),
            ensure_list: addr.clone().recipient(),
            snapshot: addr.clone().recipient(),
            take_history: addr.clone().recipient(),
            merge: addr.clone().recipient(),
            reload: addr.clone().recipient(),
            shown: addr.clone().recipient(),
            release: addr.recipient(),
        }
    }
}

impl SessionMailbox for SessionRecipients {
    fn apply(&self, msg: ApplyEvents) -> SessionReply<Applied> {
        Box::pin(self.apply.send(msg))
    }
    fn recommend(&self, msg: GetRecommendations) -> SessionReply<<GetRecommendations as Message>::Result> {
        Box::pin(self.recommend.send(msg))
    }
    fn try_ensure_list(&self, msg: EnsureList) -> Result<(), SendError<EnsureList>> {
        self.ensure_list.try_send(msg)
    }
    fn snapshot(&self, msg: Snapshot) -> SessionReply<<Snapshot as Message>::Result> {
        Box::pin(self.snapshot.send(msg))
    }
    fn take_history(&self, msg: TakeHistory) -> SessionReply<<TakeHistory as Message>::Result> {
        Box::pin(self.take_history.send(msg))
    }
    fn merge(&self, msg: MergeHistory) -> SessionReply<<MergeHistory as Message>::Result> {
        Box::pin(self.merge.send(msg))
    }
    fn reload(&self, msg: Reload) -> SessionReply<()> {
        Box::pin(self.reload.send(msg))
    }
    fn try_shown(&self, msg: ShownElsewhere) -> Result<(), SendError<ShownElsewhere>> {
        self.shown.try_send(msg)
    }
    fn release(&self) -> SessionReply<()> {
        Box::pin(self.release.send(Release))
    }
    fn release_now(&self) {
        self.release.do_send(Release);
    }
    fn release_recipient(&self) -> Recipient<Release> {
        self.release.clone()
    }
    fn connected(&self) -> bool {
        self.release.connected()
    }
    /// Stand-ins assembled from several actors are never stopped for idleness.
    fn stop_if_idle(&self, _msg: StopIfIdle) {}
}

impl SessionHandle {
    /// The handle of an actor that handles every session message (the session actor, or a
    /// stand-in in tests).
    pub fn of<A: SessionActorLike>(addr: Addr<A>) -> SessionHandle {
        SessionHandle(Arc::new(addr))
    }

    /// Whether `release` is this session's own (see [`SessionMailbox::release_recipient`]).
    pub fn is(&self, release: &Recipient<Release>) -> bool {
        self.0.release_recipient() == *release
    }

    /// Both handles reach the same session.
    pub fn same_session(&self, other: &SessionHandle) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.is(&other.0.release_recipient())
    }
}

impl From<SessionRecipients> for SessionHandle {
    fn from(recipients: SessionRecipients) -> Self {
        SessionHandle(Arc::new(recipients))
    }
}

impl std::ops::Deref for SessionHandle {
    type Target = dyn SessionMailbox;

    fn deref(&self) -> &dyn SessionMailbox {
        &*self.0
    }
}

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle").field("connected", &self.connected()).finish_non_exhaustive()
    }
}

/// Starts a user's session on an arbiter and hands back its handle. The wiring passes the session
/// module's start function in, so the registry does not depend on the session.
pub type StartSession = Arc<dyn Fn(&ArbiterHandle, Arc<UserHub>, Arc<SessionRegistry>) -> SessionHandle + Send + Sync>;

/// The latest list of one user and the channel its subscribers watch. A watch channel keeps only
/// the newest value: a slow subscriber skips stale lists instead of queueing them.
pub struct UserHub {
    pub user: UserId,
    lists: Mutex<Lists>,
    session: Mutex<Option<SessionHandle>>,
    seq: AtomicU64,
    /// Kafka partition the user's events arrive on (-1: not from Kafka).
    partition: AtomicI32,
    /// The user was erased: nothing more is published or stored through this hub.
    erased: AtomicBool,
    /// When the session was last asked for (the registry's LRU clock), for `session.max_active`.
    used: AtomicU64,
    /// The session was told to stop to make room under `session.max_active`.
    capped: AtomicBool,
    /// When the session last had an event or a request ([`clock_ms`]), for `session.idle_ttl_ms`.
    active_ms: AtomicU64,
}

impl UserHub {
    fn new(user: UserId) -> Self {
        Self {
            user,
            lists: Mutex::new(Lists::default()),
            session: Mutex::new(None),
            seq: AtomicU64::new(0),
            partition: AtomicI32::new(-1),
            erased: AtomicBool::new(false),
            used: AtomicU64::new(0),
            capped: AtomicBool::new(false),
            active_ms: AtomicU64::new(clock_ms()),
        }
    }

    /// The user's session had an event or a request just now.
    pub fn touch(&self) {
        self.active_ms.store(clock_ms(), Ordering::Relaxed);
    }

    /// How long since the session last had an event or a request.
    pub fn idle_for(&self) -> Duration {
        Duration::from_millis(clock_ms().saturating_sub(self.active_ms.load(Ordering::Relaxed)))
    }

    /// The running session, if any.
    pub fn session(&self) -> Option<SessionHandle> {
        self.session.lock().as_ref().filter(|a| a.connected()).cloned()
    }

    /// The list most recently published, if any.
    pub fn latest(&self) -> Option<Arc<RecUpdate>> {
        self.lists.lock().latest.clone()
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
        self.lists.lock().replace(Some(update));
    }

    pub fn subscriber_count(&self) -> usize {
        self.lists.lock().updates.as_ref().map_or(0, watch::Sender::receiver_count)
    }

    /// A receiver of the user's updates that has seen the latest list.
    fn watch(&self) -> watch::Receiver<Option<Arc<RecUpdate>>> {
        let mut lists = self.lists.lock();
        let Lists { latest, updates } = &mut *lists;
        updates.get_or_insert_with(|| watch::channel(latest.clone()).0).subscribe()
    }

    pub fn is_erased(&self) -> bool {
        self.erased.load(Ordering::Relaxed)
    }
}

/// A hub's latest list, and the channel its subscribers watch once there is one. The channel
/// (a watch's shared state, about 320 bytes) is made by the first subscriber: most users of a
/// busy server never have one. Both change under one lock, so a subscriber never misses a list
/// published while it joins.
#[derive(Default)]
struct Lists {
    latest: Option<Arc<RecUpdate>>,
    updates: Option<watch::Sender<Option<Arc<RecUpdate>>>>,
}

impl Lists {
    fn replace(&mut self, update: Option<Arc<RecUpdate>>) {
        if let Some(updates) = &self.updates {
            updates.send_replace(update.clone());
        }
        self.latest = update;
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
    /// foldhash rather than SipHash (looked up for every event and subscription); seeded per
    /// process, so user ids an outsider picks cannot be aimed at one shard or bucket.
    hubs: DashMap<UserId, Arc<UserHub>, foldhash::fast::RandomState>,
    arbiters: Vec<ArbiterHandle>,
    start: StartSession,
    pub deps: Arc<SessionDeps>,
    /// Production mode: sessions start only for users whose Kafka partition this instance owns
    /// (from ingest); readers elsewhere get lists from the store and the update fan-out.
    owned_by_ingest: bool,
    /// Asks the fan-out to follow (or stop following) a user's updates from other instances.
    fanout: Option<Arc<dyn UpdateFanout>>,
    /// Kafka partitions assigned to this instance.
    assigned: Mutex<Vec<i32>>,
    /// The LRU clock of `UserHub::used`.
    clock: AtomicU64,
    /// Sessions started and not yet stopped (those in a hub's slot), and those of them told to
    /// stop by `make_room` (their hub `capped`). Both change only under the hub's slot lock,
    /// together with the slot, so they always agree with the slots.
    running: AtomicUsize,
    releasing: AtomicUsize,
    /// One `make_room` scan at a time; a start waits for the scan in progress, then judges the
    /// counts afresh (see `make_room`).
    scanning: Mutex<()>,
    /// Woken as sessions stop, once the counts are updated, for the starts waiting in
    /// `room_for_a_session`.
    room: tokio::sync::Notify,
}

impl SessionRegistry {
    pub fn new(deps: Arc<SessionDeps>, arbiters: Vec<ArbiterHandle>, start: StartSession) -> Arc<Self> {
        Self::with_mode(deps, arbiters, start, false, None)
    }

    /// A registry for production mode (see `owned_by_ingest`).
    pub fn with_mode(
        deps: Arc<SessionDeps>,
        arbiters: Vec<ArbiterHandle>,
        start: StartSession,
        owned_by_ingest: bool,
        fanout: Option<Arc<dyn UpdateFanout>>,
    ) -> Arc<Self> {
        assert!(!arbiters.is_empty(), "at least one session arbiter");
        let registry = Arc::new(Self {
            hubs: DashMap::default(),
            arbiters,
            start,
            deps,
            owned_by_ingest,
            fanout,
            assigned: Mutex::new(Vec::new()),
            clock: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            releasing: AtomicUsize::new(0),
            scanning: Mutex::new(()),
            room: tokio::sync::Notify::new(),
        });
        registry.start_idle_sweep();
        registry
    }

    /// Every `session.idle_ttl_ms` / 4 (5 ms to 10 s), asks the sessions whose user has been
    /// quiet for `session.idle_ttl_ms` to stop ([`StopIfIdle`]: each checks again, and one with a
    /// list being scored stays until the next sweep). One timer for the registry instead of one
    /// per session (about 160 bytes and a timer-wheel entry each). Ends with the registry.
    fn start_idle_sweep(self: &Arc<Self>) {
        let ttl = Duration::from_millis(self.deps.config.session.idle_ttl_ms.max(1));
        let period = (ttl / 4).clamp(Duration::from_millis(5), Duration::from_secs(10));
        let registry = Arc::downgrade(self);
        self.arbiters[0].spawn(async move {
            let mut ticks = actix_rt::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(registry) = registry.upgrade() else { return };
                registry.stop_idle_sessions(ttl);
            }
        });
    }

    /// Asks every session idle for `ttl` to stop. A hub's session lock is taken under the map's
    /// shard lock, in the order `make_room` takes them; the messages go once both are released.
    fn stop_idle_sessions(&self, ttl: Duration) {
        let idle: Vec<SessionHandle> =
            self.hubs.iter().filter(|hub| hub.idle_for() >= ttl).filter_map(|hub| hub.session()).collect();
        for session in idle {
            session.stop_if_idle(StopIfIdle { ttl });
        }
    }

    pub fn owned_by_ingest(&self) -> bool {
        self.owned_by_ingest
    }

    fn new_hub(&self, user: &UserId) -> Arc<UserHub> {
        if let Some(fanout) = &self.fanout {
            fanout.watch(user);
        }
        Arc::new(UserHub::new(user.clone()))
    }

    /// The session of a user whose events arrive on Kafka `partition`.
    pub fn session_on_partition(self: &Arc<Self>, user: &UserId, partition: i32) -> (Arc<UserHub>, SessionHandle) {
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
                    session.release_now();
                    released += 1;
                }
            }
        }
        released
    }

    /// Applies `events` to the user's session and answers what it applied. A session can stop
    /// with the events still in its mailbox (an erasure or a merge stops it, an idle one is
    /// evicted, a revoked partition releases it); its mailbox is then dropped unanswered. The
    /// events go to a fresh session instead, which rebuilds from the store (and its tombstone),
    /// so the batch always completes: applied, or skipped as erased and counted there. Waiting
    /// on an answer that never comes instead would block every later offset of a Kafka
    /// partition. `partition` is the Kafka partition the events came from, if any.
    pub async fn apply(
        self: &Arc<Self>,
        user: &UserId,
        partition: Option<i32>,
        events: Vec<Event>,
        received: std::time::Instant,
        span: tracing::Span,
    ) -> Applied {
        let mut delay = std::time::Duration::ZERO;
        loop {
            if self.hub(user).is_none_or(|hub| hub.session().is_none()) {
                self.room_for_a_session().await;
            }
            let (_, session) = match partition {
                Some(partition) => self.session_on_partition(user, partition),
                None => self.session(user),
            };
            let message = ApplyEvents { events: events.clone(), received, span: span.clone() };
            match session.apply(message).await {
                Ok(applied) => return applied,
                Err(error) => {
                    self.deps.metrics.session_apply_retries.inc();
                    tracing::debug!(user = %user, error = %error, "session stopped before applying; retrying on a fresh one");
                    // A session that stops again at once (an erasure in progress) is retried with a
                    // short, capped backoff rather than in a tight loop.
                    actix_rt::time::sleep(delay).await;
                    delay = (delay * 2).clamp(std::time::Duration::from_millis(5), std::time::Duration::from_secs(1));
                }
            }
        }
    }

    /// Adds `partitions` to those this instance owns and returns them all, in order. An eager
    /// group assigns a member's whole share after revoking everything; a cooperative one adds
    /// and revokes a few partitions at a time: both come down to adding and removing.
    pub fn add_assigned(&self, partitions: &[i32]) -> Vec<i32> {
        let mut assigned = self.assigned.lock();
        assigned.extend_from_slice(partitions);
        assigned.sort_unstable();
        assigned.dedup();
        assigned.clone()
    }

    /// Removes `partitions` from those this instance owns and returns those left, in order.
    pub fn remove_assigned(&self, partitions: &std::collections::HashSet<i32>) -> Vec<i32> {
        let mut assigned = self.assigned.lock();
        assigned.retain(|p| !partitions.contains(p));
        assigned.clone()
    }

    /// The partitions this instance owns, in order.
    pub fn assigned(&self) -> Vec<i32> {
        self.assigned.lock().clone()
    }

    /// A list another instance served `user` from the store (production mode, a control record on
    /// the user's partition, which this instance owns): counted here as an impression, once for
    /// the cluster, and kept for click attribution by the running session or, without one, for
    /// the session the user's next event starts.
    pub fn shown_by_peer(&self, user: &UserId, update: Arc<RecUpdate>) {
        let running = self.hub(user).and_then(|hub| hub.session());
        let update = match running.map(|session| session.try_shown(ShownElsewhere(update.clone()))) {
            Some(Ok(())) => return,
            // No session, or one stopping or too busy to take it: the next session takes it.
            Some(Err(_)) | None => update,
        };
        let k = update.list.items.len();
        crate::actors::lists::report_impression(&self.deps, &update, k);
        self.deps.cold_lists.remember(user, &update, k);
    }

    /// A list published by another instance: shown to local subscribers if it is newer.
    pub fn deliver_remote(&self, list: RecList) {
        // With announcements the owner counted the impression: it heard this instance's
        // announcement of the subscriber (see `shown_elsewhere`).
        let counted = self.fanout.as_ref().is_some_and(|fanout| fanout.announces());
        if self.deliver_elsewhere(list, counted) {
            self.deps.metrics.fanout_received.inc();
        }
    }

    /// A list of a user this instance does not own, for its local subscribers if it is newer:
    /// published by the owner, or scored here from the stored profile. `counted` when the owner
    /// counted its impression (shown here, never counted again); otherwise the instance that
    /// shows it counts it. Returns whether it was newer.
    pub fn deliver_elsewhere(&self, list: RecList, counted: bool) -> bool {
        let Some(hub) = self.hub(&list.user_id) else { return false };
        let newer = hub.latest().is_none_or(|current| list.seq > current.list.seq);
        if newer {
            hub.bump_seq(list.seq);
            let update = RecUpdate::new(list);
            if counted {
                update.show();
            } else if hub.subscriber_count() > 0 {
                crate::actors::lists::report_impression(&self.deps, &update, update.list.items.len());
            }
            hub.publish(update);
        }
        newer
    }

    /// Whether a subscriber on another instance receives `hub`'s lists, as its announcement says
    /// (production mode with `redis.watch_ttl_secs` > 0): the owner then counts each list it
    /// publishes as an impression, once for the cluster, and its clicks are attributed here.
    pub fn shown_elsewhere(&self, hub: &UserHub) -> bool {
        self.fanout.as_ref().is_some_and(|fanout| fanout.announced(&hub.user))
    }

    /// The user's hub, if the registry holds one.
    pub fn hub(&self, user: &UserId) -> Option<Arc<UserHub>> {
        self.hubs.get(user).map(|h| h.clone())
    }

    /// The user's session, started (and rebuilt from the store) if it is not running. Starting
    /// happens under the map's shard lock, so two callers never start two sessions for one user.
    pub fn session(self: &Arc<Self>, user: &UserId) -> (Arc<UserHub>, SessionHandle) {
        let entry = self.hubs.entry(user.clone()).or_insert_with(|| self.new_hub(user));
        let hub = entry.value().clone();
        hub.used.store(self.clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        // Work is on its way to the session: active from now, for the idle sweep.
        hub.touch();
        let mut slot = hub.session.lock();
        if let Some(addr) = slot.as_ref().filter(|a| a.connected()) {
            return (hub.clone(), addr.clone());
        }
        if slot.take().is_some() {
            // A session's mailbox closes only after it reported its stop (which empties the
            // slot), so a closed one still here never reported it: take it off the counts.
            self.forget_session(&hub);
        }
        let arbiter = &self.arbiters[partition_of(user.as_str(), self.arbiters.len())];
        let addr = (self.start)(arbiter, hub.clone(), self.clone());
        self.running.fetch_add(1, Ordering::SeqCst);
        *slot = Some(addr.clone());
        drop(slot);
        drop(entry);
        // After the shard lock is released: the scan reads every shard.
        self.make_room();
        (hub, addr)
    }

    /// Sessions running past `session.max_active` and not yet told to stop.
    fn over(&self) -> usize {
        let running = self.running.load(Ordering::SeqCst);
        running
            .saturating_sub(self.releasing.load(Ordering::SeqCst))
            .saturating_sub(self.deps.config.session.max_active)
    }

    /// Keeps at most `session.max_active` sessions: past it, the least recently used sessions
    /// (a batch of a 64th of the cap, so one scan of the hubs serves many starts) are told to
    /// stop; they rebuild from the store on their next use. The count can pass the cap by the
    /// sessions started while the stopping ones finish their current message.
    ///
    /// A caller that finds a scan in progress waits for it and then judges the counts afresh:
    /// a scan judges the counts as they were when it began, so a start that gave up on a busy
    /// scan instead could leave its own excess to nobody (and the starts waiting for room to a
    /// stop that nobody asked for).
    fn make_room(&self) {
        if self.over() == 0 {
            return;
        }
        let _scan = self.scanning.lock();
        let excess = self.over();
        if excess == 0 {
            return;
        }
        let max = self.deps.config.session.max_active;
        let running = |hub: &UserHub| !hub.capped.load(Ordering::SeqCst) && hub.session().is_some();
        let mut ages: Vec<u64> =
            self.hubs.iter().filter(|h| running(h)).map(|h| h.used.load(Ordering::Relaxed)).collect();
        let batch = excess.max(max / 64).min(ages.len());
        if batch == 0 {
            return;
        }
        let (_, &mut newest, _) = ages.select_nth_unstable(batch - 1);
        drop(ages);
        for hub in self.hubs.iter() {
            if hub.used.load(Ordering::Relaxed) > newest {
                continue;
            }
            // Under the slot lock: a session in the slot has not reported its stop yet, so the
            // stop that follows sees the flag and takes it off `releasing`.
            let slot = hub.session.lock();
            let Some(session) = slot.as_ref().filter(|s| s.connected()) else { continue };
            if !hub.capped.swap(true, Ordering::SeqCst) {
                self.releasing.fetch_add(1, Ordering::SeqCst);
                // Must arrive even when the mailbox is full; once per stopped session.
                session.release_now();
            }
        }
    }

    /// Waits while the running sessions, those told to stop included, reach `session.max_active`
    /// plus an eighth: under a burst of new users the stop messages queue behind the new users'
    /// work, and without this wait starts outran stops (a million new ids in one wave left
    /// 237,000 sessions running against a cap of 50,000). Events for running sessions never wait.
    async fn room_for_a_session(&self) {
        let max = self.deps.config.session.max_active;
        let limit = max.saturating_add((max / 8).max(1));
        loop {
            let stopped = self.room.notified();
            tokio::pin!(stopped);
            // Registered before the check, so a stop between the check and the await wakes it.
            stopped.as_mut().enable();
            if self.running.load(Ordering::SeqCst) < limit {
                return;
            }
            self.make_room();
            // The sessions over the cap have now all been told to stop, and each stop wakes this
            // (within milliseconds: a session finishes the messages in its mailbox first). A
            // safety net remains: a session still loading its profile from a store that is down
            // retries before it reads its mailbox, so its stop may not come while the store is
            // out; the start goes ahead after a second rather than stall the ingest behind it,
            // and counts in liverec_sessions_start_waits_expired_total (0 in a healthy process).
            if actix_rt::time::timeout(START_WAIT, stopped).await.is_err() {
                self.deps.metrics.sessions_start_waits_expired.inc();
                return;
            }
        }
    }

    /// Subscribes to the user's updates. In the embedded mode this starts the user's session (which
    /// produces a first list); in production mode only the owner runs sessions, so the session is
    /// returned only if it already runs here.
    pub fn subscribe(self: &Arc<Self>, user: &UserId) -> (Subscription, Option<SessionHandle>) {
        let (hub, addr) = if self.owned_by_ingest {
            let hub = self.hubs.entry(user.clone()).or_insert_with(|| self.new_hub(user)).value().clone();
            let addr = hub.session();
            (hub, addr)
        } else {
            let (hub, addr) = self.session(user);
            (hub, Some(addr))
        };
        let rx = hub.watch();
        // After the hub's channel is followed (queued first): the owner's answer finds it.
        if let Some(fanout) = &self.fanout {
            fanout.subscribed(user);
        }
        (Subscription { rx: Some(rx), hub, registry: self.clone() }, addr)
    }

    /// Users with a subscriber here (announced to every instance as watched).
    pub fn users_with_subscribers(&self) -> Vec<UserId> {
        self.hubs.iter().filter(|hub| hub.subscriber_count() > 0).map(|hub| hub.user.clone()).collect()
    }

    /// Whether the user's lists are wanted beyond this process: stored and published for other
    /// instances (production mode) only while a subscriber here or an instance's announcement
    /// watches the user; always in the embedded mode.
    pub fn list_wanted(&self, hub: &UserHub) -> bool {
        hub.subscriber_count() > 0 || self.fanout.as_ref().is_none_or(|fanout| fanout.watched(&hub.user))
    }

    /// Items left the catalogue (deleted, withdrawn, expired): every session here whose latest
    /// list shows one of them pushes a fresh list without it. One walk over the hubs, checking
    /// each latest list; returns how many sessions were asked. A watched hub whose session has
    /// stopped gets one started (its subscribers hold the list); an unwatched one without a
    /// session is left alone (its next event or subscriber scores afresh).
    pub fn refresh_lists_holding(self: &Arc<Self>, items: &std::collections::HashSet<ItemId>) -> usize {
        // Collected first: starting a session inserts into the map being walked.
        let holding: Vec<Arc<UserHub>> = self
            .hubs
            .iter()
            .filter(|hub| hub.latest().is_some_and(|u| u.list.items.iter().any(|i| items.contains(&i.item_id))))
            .map(|hub| hub.clone())
            .collect();
        let mut asked = 0;
        for hub in holding {
            let session = match hub.session() {
                Some(session) => session,
                None if hub.subscriber_count() > 0 && !self.owned_by_ingest() => self.session(&hub.user).1,
                None => continue,
            };
            // A full mailbox means the session is busy applying events: it pushes a list
            // (scored without the item) after them anyway.
            if session.try_ensure_list(EnsureList { fresh: true }).is_ok() {
                asked += 1;
            }
        }
        asked
    }

    /// Some instance newly watches `user`: its session here, if any, pushes a fresh list, which
    /// is stored and published (the lists since the last watch were not). Without a session the
    /// next event's session stores its lists, and the subscriber started from the stored profile.
    pub fn watch_appeared(&self, user: &UserId) {
        if let Some(session) = self.hub(user).and_then(|hub| hub.session()) {
            // A full mailbox means the session is busy applying events: it pushes a list anyway.
            let _ = session.try_ensure_list(EnsureList { fresh: true });
        }
    }

    /// Called by a session as it stops; `release` is its own recipient, which tells it from a
    /// newer session of the same user. The slot and both counts change together under the
    /// slot's lock, and the starts waiting for room are woken only then: a start woken earlier
    /// read this session as still on its way out, found no other session to tell to stop, and
    /// the next start waited for a stop nobody had asked for (the second-long waits of the
    /// `session.max_active` integration test).
    pub fn session_stopped(&self, hub: &Arc<UserHub>, release: &Recipient<Release>) {
        {
            let mut slot = hub.session.lock();
            if slot.as_ref().is_some_and(|s| s.is(release)) {
                *slot = None;
                if self.forget_session(hub) {
                    self.deps.metrics.sessions_capped.inc();
                }
            }
        }
        self.room.notify_waiters();
        self.release(hub);
    }

    /// Takes the session in `hub`'s slot off the counts (the caller holds the slot's lock and
    /// empties it). Returns whether it had been told to stop to make room.
    fn forget_session(&self, hub: &UserHub) -> bool {
        decrement(&self.running);
        let capped = hub.capped.swap(false, Ordering::SeqCst);
        if capped {
            decrement(&self.releasing);
        }
        capped
    }

    /// Drops the hub if it has neither a session nor a subscriber left.
    fn release(&self, hub: &Arc<UserHub>) {
        let removed = self.hubs.remove_if(&hub.user, |_, h| {
            Arc::ptr_eq(h, hub) && h.subscriber_count() == 0 && h.session.lock().as_ref().is_none_or(|a| !a.connected())
        });
        if removed.is_some() {
            if let Some(fanout) = &self.fanout {
                fanout.unwatch(&hub.user);
            }
        }
    }

    /// Erases the user on this instance: the session stops, every subscriber's stream ends, and
    /// the hub is dropped so that a later event starts afresh. Returns the subscriptions closed.
    pub async fn erase(&self, user: &UserId) -> usize {
        let Some(hub) = self.hub(user) else { return 0 };
        hub.erased.store(true, Ordering::Relaxed);
        if let Some(session) = hub.session() {
            let _ = session.release().await;
        }
        let closed = hub.subscriber_count();
        hub.lists.lock().replace(None);
        self.hubs.remove_if(user, |_, h| Arc::ptr_eq(h, &hub));
        if let Some(fanout) = &self.fanout {
            fanout.unwatch(user);
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

    /// Gives back the hub map's spare capacity once at most a quarter of it is used (a wave of
    /// users went idle): a map keeps its largest tables otherwise, 1.6 MB at 50,000 sessions.
    /// Takes each shard's write lock in turn; called by the server's housekeeping round.
    pub fn shrink(&self) -> bool {
        let capacity = self.hubs.capacity();
        if capacity < SHRINK_ABOVE || self.hubs.len() >= capacity / 4 {
            return false;
        }
        self.hubs.shrink_to_fit();
        true
    }
}

/// Longest wait of one start for a session to stop (see `room_for_a_session`). In unit tests an
/// hour, so that what they assert about a waiting start never races the give-up.
#[cfg(not(test))]
const START_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
#[cfg(test)]
const START_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Milliseconds on a monotonic clock that starts with the process: what a hub's activity is
/// dated by (8 bytes, where an `Instant` takes 16).
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

/// Below this capacity the hub map is left as it is (a few hundred kilobytes at most).
const SHRINK_ABOVE: usize = 4096;

/// Counts down, never below zero (a stop the registry did not count, e.g. of a stand-in).
fn decrement(count: &AtomicUsize) {
    let _ = count.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Barrier;

    use super::*;
    use crate::actors::messages::{Applied, SessionError};
    use crate::config::Config;
    use crate::store::{persisted_now, Profile};

    /// A session that answers every message with nothing: the registry only starts and tracks it.
    struct Idle;

    impl Actor for Idle {
        type Context = Context<Self>;
    }

    fn nothing_applied() -> Applied {
        Applied { outcome: Default::default(), persisted: persisted_now() }
    }

    impl Handler<ApplyEvents> for Idle {
        type Result = MessageResult<ApplyEvents>;
        fn handle(&mut self, _msg: ApplyEvents, _ctx: &mut Context<Self>) -> Self::Result {
            MessageResult(nothing_applied())
        }
    }

    impl Handler<GetRecommendations> for Idle {
        type Result = Result<Arc<RecUpdate>, SessionError>;
        fn handle(&mut self, _msg: GetRecommendations, _ctx: &mut Context<Self>) -> Self::Result {
            Err(SessionError::Stopped)
        }
    }

    impl Handler<EnsureList> for Idle {
        type Result = ();
        fn handle(&mut self, _msg: EnsureList, _ctx: &mut Context<Self>) {}
    }

    impl Handler<Snapshot> for Idle {
        type Result = MessageResult<Snapshot>;
        fn handle(&mut self, _msg: Snapshot, _ctx: &mut Context<Self>) -> Self::Result {
            MessageResult(Profile::default())
        }
    }

    impl Handler<TakeHistory> for Idle {
        type Result = MessageResult<TakeHistory>;
        fn handle(&mut self, _msg: TakeHistory, _ctx: &mut Context<Self>) -> Self::Result {
            MessageResult(Profile::default())
        }
    }

    impl Handler<MergeHistory> for Idle {
        type Result = MessageResult<MergeHistory>;
        fn handle(&mut self, _msg: MergeHistory, _ctx: &mut Context<Self>) -> Self::Result {
            MessageResult(nothing_applied())
        }
    }

    impl Handler<Reload> for Idle {
        type Result = ();
        fn handle(&mut self, _msg: Reload, _ctx: &mut Context<Self>) {}
    }

    impl Handler<ShownElsewhere> for Idle {
        type Result = ();
        fn handle(&mut self, _msg: ShownElsewhere, _ctx: &mut Context<Self>) {}
    }

    impl Handler<Release> for Idle {
        type Result = ();
        fn handle(&mut self, _msg: Release, ctx: &mut Context<Self>) {
            ctx.stop();
        }
    }

    impl Handler<StopIfIdle> for Idle {
        type Result = ();
        fn handle(&mut self, _msg: StopIfIdle, ctx: &mut Context<Self>) {
            ctx.stop();
        }
    }

    fn idle_handle(addr: Addr<Idle>) -> SessionHandle {
        SessionHandle::of(addr)
    }

    /// The embedded default's session dependencies, on the current arbiter.
    fn deps() -> Arc<SessionDeps> {
        crate::actors::test_deps(Config::default())
    }

    #[actix_rt::test]
    async fn the_hub_map_gives_back_its_capacity_after_a_large_drop() {
        let start: StartSession =
            Arc::new(|arbiter, _hub, _registry| idle_handle(Idle::start_in_arbiter(arbiter, |_| Idle)));
        let registry = SessionRegistry::new(deps(), vec![Arbiter::current()], start);
        for n in 0..20_000 {
            registry.hubs.insert(UserId::from(format!("u{n}").as_str()), Arc::new(UserHub::new(UserId::from("u"))));
        }
        let peak = registry.hubs.capacity();
        assert!(!registry.shrink(), "a full map is left alone");
        registry.hubs.retain(|user, _| user.0.len() < 5); // u0..u999 stay
        assert_eq!(registry.len(), 1000);
        assert!(registry.shrink());
        assert!(registry.hubs.capacity() < peak / 4, "{} of {peak}", registry.hubs.capacity());
        assert_eq!(registry.len(), 1000);
        assert!(!registry.shrink(), "nothing more to give back");
    }

    #[actix_rt::test]
    async fn concurrent_starts_for_one_user_start_one_session() {
        let started = Arc::new(AtomicUsize::new(0));
        let counting = started.clone();
        let start: StartSession = Arc::new(move |arbiter, _hub, _registry| {
            counting.fetch_add(1, Ordering::SeqCst);
            idle_handle(Idle::start_in_arbiter(arbiter, |_| Idle))
        });
        let registry = SessionRegistry::new(deps(), vec![Arbiter::current()], start);
        let user = UserId::from("u1");
        const CALLERS: usize = 8;
        let barrier = Barrier::new(CALLERS);
        let handles: Vec<SessionHandle> = std::thread::scope(|scope| {
            let callers: Vec<_> = (0..CALLERS)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        registry.session(&user).1
                    })
                })
                .collect();
            callers.into_iter().map(|c| c.join().expect("a caller thread")).collect()
        });
        assert_eq!(started.load(Ordering::SeqCst), 1);
        assert!(handles.iter().all(|h| h.same_session(&handles[0])));
        assert_eq!(registry.len(), 1);
    }

    /// A session that stops as an erasure stops it: with the events in its mailbox, unanswered.
    struct StopsOnApply;

    impl Actor for StopsOnApply {
        type Context = Context<Self>;
    }

    impl Handler<ApplyEvents> for StopsOnApply {
        type Result = ResponseActFuture<Self, Applied>;
        fn handle(&mut self, _msg: ApplyEvents, ctx: &mut Context<Self>) -> Self::Result {
            ctx.stop();
            // Never answered: the stopping actor drops it, as it drops the rest of its mailbox.
            Box::pin(fut::wrap_future(std::future::pending()))
        }
    }

    impl Handler<Release> for StopsOnApply {
        type Result = ();
        fn handle(&mut self, _msg: Release, ctx: &mut Context<Self>) {
            ctx.stop();
        }
    }

    #[actix_rt::test]
    async fn events_sent_to_a_session_that_stops_unanswered_are_applied_on_a_fresh_one() {
        let started = Arc::new(AtomicUsize::new(0));
        let applied_by_idle = Arc::new(AtomicUsize::new(0));
        let (counting, applied) = (started.clone(), applied_by_idle.clone());
        let start: StartSession = Arc::new(move |arbiter, _hub, _registry| {
            // The first session stops on its first batch; the next ones apply.
            if counting.fetch_add(1, Ordering::SeqCst) == 0 {
                let addr = StopsOnApply::start_in_arbiter(arbiter, |_| StopsOnApply);
                return SessionHandle::from(SessionRecipients {
                    apply: addr.clone().recipient(),
                    release: addr.recipient(),
                    ..SessionRecipients::of(Idle.start())
                });
            }
            applied.fetch_add(1, Ordering::SeqCst);
            idle_handle(Idle::start_in_arbiter(arbiter, |_| Idle))
        });
        let registry = SessionRegistry::new(deps(), vec![Arbiter::current()], start);
        let user = UserId::from("u1");
        let apply = registry.apply(&user, Some(3), Vec::new(), std::time::Instant::now(), tracing::Span::none());
        let applied = actix_rt::time::timeout(std::time::Duration::from_secs(60), apply)
            .await
            .expect("the batch completes instead of waiting forever on the stopped session");
        applied.persisted.await;
        assert_eq!(started.load(Ordering::SeqCst), 2, "one fresh session took the events");
        assert_eq!(applied_by_idle.load(Ordering::SeqCst), 1);
        assert_eq!(registry.deps.metrics.session_apply_retries.get(), 1);
    }

    #[actix_rt::test]
    async fn a_stopped_session_is_replaced_on_next_use() {
        let start: StartSession =
            Arc::new(|arbiter, _hub, _registry| idle_handle(Idle::start_in_arbiter(arbiter, |_| Idle)));
        let registry = SessionRegistry::new(deps(), vec![Arbiter::current()], start);
        let user = UserId::from("u1");
        let (hub, first) = registry.session(&user);
        // A stale stop (of a session that is not the hub's) leaves the running one in place.
        let other = idle_handle(Idle.start());
        registry.session_stopped(&hub, &other.release_recipient());
        assert!(hub.session().is_some_and(|s| s.same_session(&first)));
        first.release().await.expect("delivered");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while first.connected() {
            assert!(std::time::Instant::now() < deadline, "the session did not stop");
            actix_rt::task::yield_now().await;
        }
        registry.session_stopped(&hub, &first.release_recipient());
        let (_, second) = registry.session(&user);
        assert!(!second.same_session(&first));
    }

    #[actix_rt::test]
    async fn the_idle_sweep_stops_only_sessions_quiet_past_the_ttl() {
        let mut config = Config::default();
        config.session.idle_ttl_ms = 1_000;
        let start: StartSession =
            Arc::new(|arbiter, _hub, _registry| idle_handle(Idle::start_in_arbiter(arbiter, |_| Idle)));
        let registry = SessionRegistry::new(crate::actors::test_deps(config), vec![Arbiter::current()], start);
        let (_, quiet) = registry.session(&UserId::from("quiet"));
        let (busy_hub, busy) = registry.session(&UserId::from("busy"));
        // The busy user's session has something to do all along; the quiet one's never does. A
        // stall detector, not a rate: the sweep comes every quarter of the ttl.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while quiet.connected() {
            assert!(std::time::Instant::now() < deadline, "the quiet session was never stopped");
            busy_hub.touch();
            actix_rt::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(busy.connected(), "a session with recent activity keeps running");
    }

    /// A session that keeps running when told to stop, as a busy one does until its mailbox drains.
    struct Stubborn;

    impl Actor for Stubborn {
        type Context = Context<Self>;
    }

    impl Handler<ApplyEvents> for Stubborn {
        type Result = MessageResult<ApplyEvents>;
        fn handle(&mut self, _msg: ApplyEvents, _ctx: &mut Context<Self>) -> Self::Result {
            MessageResult(nothing_applied())
        }
    }

    impl Handler<Release> for Stubborn {
        type Result = ();
        fn handle(&mut self, _msg: Release, _ctx: &mut Context<Self>) {}
    }

    #[actix_rt::test]
    async fn new_users_wait_while_stopping_sessions_hold_the_cap() {
        let mut config = Config::default();
        config.session.max_active = 8;
        let start: StartSession = Arc::new(|arbiter, _hub, _registry| {
            let addr = Stubborn::start_in_arbiter(arbiter, |_| Stubborn);
            SessionHandle::from(SessionRecipients {
                apply: addr.clone().recipient(),
                release: addr.recipient(),
                ..SessionRecipients::of(Idle.start())
            })
        });
        let registry = SessionRegistry::new(crate::actors::test_deps(config), vec![Arbiter::current()], start);
        let apply = |n: usize| {
            let user = UserId::from(format!("u{n}").as_str());
            let registry = registry.clone();
            async move { registry.apply(&user, None, Vec::new(), std::time::Instant::now(), tracing::Span::none()).await }
        };
        // The cap plus an eighth start; the ninth onwards were told to stop and do not.
        for n in 0..9 {
            apply(n).await;
        }
        assert_eq!(registry.running.load(Ordering::Relaxed), 9);
        let mut waiting = Box::pin(apply(9));
        for _ in 0..100 {
            assert!(
                futures_util::FutureExt::now_or_never(&mut waiting).is_none(),
                "a tenth session started past the cap"
            );
            actix_rt::task::yield_now().await;
        }
        assert_eq!(registry.running.load(Ordering::Relaxed), 9);
        // Events for a running session do not wait.
        apply(0).await;
        // One told to stop does: the waiting start goes ahead.
        let capped = registry.hubs.iter().find(|h| h.capped.load(Ordering::Relaxed)).map(|h| h.clone());
        let capped = capped.expect("make_room told the least recently used sessions to stop");
        let release = capped.session().expect("still running").release_recipient();
        registry.session_stopped(&capped, &release);
        actix_rt::time::timeout(std::time::Duration::from_secs(60), waiting)
            .await
            .expect("the start goes ahead once a session stopped");
        assert_eq!(registry.running.load(Ordering::Relaxed), 9);
    }

    /// A session that stops when told to and reports its stop to the registry from its own
    /// thread, as the session actor does.
    struct Reporting {
        hub: Arc<UserHub>,
        registry: Arc<SessionRegistry>,
    }

    impl Actor for Reporting {
        type Context = Context<Self>;

        fn stopped(&mut self, ctx: &mut Context<Self>) {
            self.registry.session_stopped(&self.hub, &ctx.address().recipient());
        }
    }

    impl Handler<ApplyEvents> for Reporting {
        type Result = MessageResult<ApplyEvents>;
        fn handle(&mut self, _msg: ApplyEvents, _ctx: &mut Context<Self>) -> Self::Result {
            MessageResult(nothing_applied())
        }
    }

    impl Handler<Release> for Reporting {
        type Result = ();
        fn handle(&mut self, _msg: Release, ctx: &mut Context<Self>) {
            ctx.stop();
        }
    }

    /// Waits until `done` holds, failing only if `progress` stops moving for a long while (a
    /// stall, not a speed).
    async fn until_stalled(
        what: &str,
        progress: impl Fn() -> usize,
        done: impl Fn() -> bool,
        state: impl Fn() -> String,
    ) {
        const STALL: std::time::Duration = std::time::Duration::from_secs(30);
        let (mut last, mut moved) = (progress(), std::time::Instant::now());
        while !done() {
            let now = progress();
            if now != last {
                (last, moved) = (now, std::time::Instant::now());
            }
            assert!(moved.elapsed() < STALL, "{what}: no progress for {STALL:?} ({})", state());
            actix_rt::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// New users arrive in batches on several threads, far past the cap, while the sessions told
    /// to stop stop on theirs and report it. Every start goes ahead once a session stopped (none
    /// waits for a stop that is not coming: under `cfg(test)` the give-up is an hour, so such a
    /// wait stalls the test), and once every session has stopped the registry counts none
    /// running and none stopping. Before the fix, a stop woke the waiting starts before it
    /// took itself off the stopping count: a start woken at once judged that no session needed
    /// telling to stop, and the next waited for a stop nobody had asked for.
    #[actix_rt::test]
    async fn a_burst_past_the_cap_waits_only_for_stops_that_come() {
        const CALLERS: usize = 4;
        const BATCHES: usize = 40;
        const BATCH: usize = 48;
        let mut config = Config::default();
        config.session.max_active = 8;
        let shared = SessionRecipients::of(Idle.start());
        let start: StartSession = Arc::new(move |arbiter, hub, registry| {
            let addr = Reporting::start_in_arbiter(arbiter, move |_| Reporting { hub, registry });
            SessionHandle::from(SessionRecipients {
                apply: addr.clone().recipient(),
                release: addr.recipient(),
                ..shared.clone()
            })
        });
        let sessions: Vec<Arbiter> = (0..4).map(|_| Arbiter::new()).collect();
        let registry = SessionRegistry::new(
            crate::actors::test_deps(config),
            sessions.iter().map(|a| a.handle()).collect(),
            start,
        );
        let applied = Arc::new(AtomicUsize::new(0));
        let callers: Vec<Arbiter> = (0..CALLERS).map(|_| Arbiter::new()).collect();
        for (caller, arbiter) in callers.iter().enumerate() {
            let (registry, applied) = (registry.clone(), applied.clone());
            arbiter.spawn(async move {
                for batch in 0..BATCHES {
                    // One batch as the ingest actor applies it: every user's part at once.
                    let applies = (0..BATCH).map(|n| {
                        let (registry, applied) = (registry.clone(), applied.clone());
                        let user = UserId::from(format!("c{caller}-b{batch}-u{n}").as_str());
                        async move {
                            registry
                                .apply(&user, None, Vec::new(), std::time::Instant::now(), tracing::Span::none())
                                .await;
                            applied.fetch_add(1, Ordering::SeqCst);
                        }
                    });
                    futures_util::future::join_all(applies).await;
                }
            });
        }
        let state = || {
            format!(
                "{} applied, running {} ({} sessions in the hubs), releasing {} ({} told to stop)",
                applied.load(Ordering::SeqCst),
                registry.running.load(Ordering::SeqCst),
                registry.hubs.iter().filter(|h| h.session().is_some()).count(),
                registry.releasing.load(Ordering::SeqCst),
                registry.hubs.iter().filter(|h| h.capped.load(Ordering::SeqCst) && h.session().is_some()).count(),
            )
        };
        let total = CALLERS * BATCHES * BATCH;
        until_stalled(
            "the burst",
            || applied.load(Ordering::SeqCst),
            || applied.load(Ordering::SeqCst) == total,
            state,
        )
        .await;
        // Every session left is told to stop; the counts must come back to nothing.
        for hub in registry.hubs.iter() {
            if let Some(session) = hub.session() {
                session.release_now();
            }
        }
        until_stalled(
            "the last stops",
            || registry.hubs.len(),
            || registry.running.load(Ordering::SeqCst) == 0 && registry.is_empty(),
            state,
        )
        .await;
        assert_eq!(registry.releasing.load(Ordering::SeqCst), 0, "{}", state());
        for arbiter in sessions.into_iter().chain(callers) {
            arbiter.stop();
        }
    }
}
