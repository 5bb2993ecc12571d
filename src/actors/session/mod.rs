//! `SessionActor`: one per active user. Holds the user's recent interactions (a ring buffer of
//! `session.history_len`), the event ids it has applied, suppressed items and the latest context;
//! applies events in order, persists them, and publishes a fresh list after every change.
//!
//! Coalescing: at most one scoring request per user is in flight. Events that arrive meanwhile
//! mark the session dirty; when the answer comes back it is discarded (it no longer reflects the
//! latest state) and one new request covers all of them. So a burst yields one push of the latest
//! state. An answer that took `session.late_list_ms` or more is pushed all the same, naming the
//! newest event it reflects, before that new request: an overloaded model still gets lists to the
//! users it is late for (`coalesce.rs`).
//!
//! Mailbox: `session.mailbox_capacity`, a soft bound: actix's `send` queues a message even into a
//! full mailbox (through a fresh sender clone; only `try_send` is refused), so what bounds a
//! session's queue is its producers: the ingest waits for each batch to be applied before it
//! takes more (`bus.queue_events`, Kafka's in-flight limit), and a request waits for its answer.
//! Lifetime: the
//! session stops after `session.idle_ttl_ms` without events or requests and is rebuilt from the
//! profile store on next use. Restart policy: none; a stopped session is simply started again.

mod attribution;
mod coalesce;
pub(super) mod consumed;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use self::attribution::{push_bounded, Interacted, ServedLists};
use self::coalesce::{Answer, Coalescer};
use self::consumed::Consumed;
use super::lists::{
    build_request, current_stored_list, make_list, report_impression, report_scored_impression, segment_of,
    seq_after_stored, tell_monitor,
};
use super::messages::{
    Applied, ApplyEvents, ApplyOutcome, EnsureList, GetRecommendations, MergeHistory, RecFilters, Release, Reload,
    SessionError, ShownElsewhere, Snapshot, StopIfIdle, TakeHistory,
};
use super::model::{Observe, Recommend, ScoredList};
use super::monitor::Activity;
use super::registry::{SessionHandle, SessionRegistry, UserHub};
use crate::bus::user_hash;
use crate::catalog::ItemIdx;
use crate::event::{now_ms, Context as EventContext, Event, EventId, ItemId};
use crate::eventlog::LoggedEvent;
use crate::models::{HistoryItem, Observation, ScoreRequest};
use crate::recs::RecUpdate;
use crate::store::{persisted_now, ConsumedItem, EventDigest, Interaction, Persisted, Profile, ProfileUpdate};

pub struct SessionActor {
    hub: Arc<UserHub>,
    registry: Arc<SessionRegistry>,
    /// Recent interactions, oldest first, with their catalogue index.
    history: VecDeque<(Interaction, ItemIdx)>,
    /// `bus::user_hash` of the user (the monitor's key and the experiment arm's), computed once.
    user_hash: u64,
    /// Every item consumed (by `session.exclude_event_types`), beyond the history window: what
    /// stays out of the lists (see `consumed.rs`).
    consumed: Consumed,
    context: Option<EventContext>,
    /// The store holds `context` as it is (nothing to send with the next append).
    context_stored: bool,
    /// Digests of the applied event ids (8 bytes each, not the id's allocation), oldest first.
    /// Searched by a scan: of the full window (`session.dedupe_window`, 1,000) about 0.4 us an
    /// event (a one-off measurement, release build, SSE2; 0.17 us with AVX2), about 20 ns at 50,
    /// where a hash set beside the queue doubled the window's memory.
    event_ids: VecDeque<EventDigest>,
    suppressed: VecDeque<ItemId>,
    /// The pushed-list request in flight, if any (see the module docs on coalescing).
    coalescer: Coalescer,
    /// Receive time of the oldest event not yet reflected in a pushed list.
    pending_since: Option<Instant>,
    /// Receive time of the oldest event applied after the pushed-list request in flight was
    /// asked (not reflected by its answer).
    unreflected_since: Option<Instant>,
    /// The last lists served to the user, newest last, for click attribution.
    served: ServedLists,
    /// When the user was erased, if ever: events from before then are never applied (replays).
    erased_at: Option<i64>,
    /// The history went to another user (`TakeHistory`): nothing to park when this stops.
    handed_over: bool,
}

impl SessionActor {
    pub fn new(hub: Arc<UserHub>, registry: Arc<SessionRegistry>) -> Self {
        let user_hash = user_hash(hub.user.as_str());
        Self {
            hub,
            registry,
            history: VecDeque::new(),
            user_hash,
            consumed: Consumed::default(),
            context: None,
            context_stored: true,
            event_ids: VecDeque::new(),
            suppressed: VecDeque::new(),
            coalescer: Coalescer::default(),
            pending_since: None,
            unreflected_since: None,
            served: ServedLists::default(),
            erased_at: None,
            handed_over: false,
        }
    }

    /// Loads the stored profile, blocking the mailbox until it is in, so no event is applied to a
    /// half-built state. A store that is down is retried with backoff: starting empty would lose
    /// the history and the ids that make replays idempotent.
    fn load_profile(&mut self, ctx: &mut Context<Self>) {
        let store = self.registry.deps.store.clone();
        let metrics = self.registry.deps.metrics.clone();
        let user = self.hub.user.clone();
        let load = async move {
            let mut delay = Duration::from_millis(50);
            loop {
                // The profile last: a parking store hands it over, and a failure after that
                // would retry without it.
                let loaded = match store.tombstone(&user).await {
                    Ok(erased) => store.claim(&user).await.map(|profile| (profile, erased)),
                    Err(error) => Err(error),
                };
                match loaded {
                    Ok(loaded) => return loaded,
                    Err(error) => {
                        metrics.store_errors.inc();
                        tracing::warn!(error = %error, user = %user, "profile not loaded; retrying");
                        actix_rt::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
        };
        ctx.wait(load.into_actor(self).map(|(profile, erased_at), act, ctx| {
            act.erased_at = erased_at;
            // Production mode: the user was erased through another instance, which could purge
            // only its own retained event log; this one (the owner of the user's partition)
            // purges what it logged before the erasure.
            if let Some(at) = erased_at {
                act.registry.deps.event_log.remove_user(&act.hub.user, at);
            }
            if let Some(profile) = profile {
                act.restore(profile);
            }
            // A cold-start list shown before this session started takes the user's click.
            if let Some((at, update)) = act.registry.deps.cold_lists.take(&act.hub.user) {
                act.served.remember(&update, at, &act.registry.deps.catalog);
            }
            if act.hub.latest().is_none() {
                act.refresh(ctx);
            }
        }));
    }

    /// Forgets the in-memory state (before reloading it from the store).
    fn reset(&mut self) {
        self.history.clear();
        self.consumed.clear();
        self.event_ids.clear();
        self.suppressed.clear();
        self.context = None;
        self.context_stored = true;
    }

    fn restore(&mut self, profile: Profile) {
        // A stored list older than the stored history (its lists were not stored while nobody
        // watched) is not shown; the next list is numbered past it (see `seq_after_stored`).
        let current = current_stored_list(&profile).cloned();
        self.hub.bump_seq(seq_after_stored(Some(&profile)));
        // The stored record of consumed items (a profile stored before it: its history's).
        self.consumed = Consumed::of_profile(&profile, &self.registry.deps.catalog, &self.registry.deps.config.session);
        // The stored window holds each id once: no search per digest (a full window of 1,000
        // would be half a million comparisons).
        for digest in profile.event_ids {
            push_bounded(&mut self.event_ids, digest, self.registry.deps.config.session.dedupe_window);
        }
        for mut interaction in profile.interactions {
            let (idx, item_id) = self.registry.deps.catalog.intern_shared(&interaction.item_id);
            interaction.item_id = item_id;
            self.push_history(interaction, idx);
        }
        self.suppressed = profile.suppressed.into();
        self.context = profile.context;
        self.context_stored = true;
        if let Some(recs) = current {
            if self.hub.latest().is_none() {
                self.hub.publish(RecUpdate::new(recs));
            }
        }
    }

    /// Records an event id; false if it was already applied.
    fn remember_id(&mut self, id: &EventId) -> bool {
        self.remember_digest(EventDigest::of(id))
    }

    fn remember_digest(&mut self, digest: EventDigest) -> bool {
        // The newer half first: a replay repeats recent ids. `contains` on slices, not an
        // iterator over the deque: two and a half times faster over a full window.
        let (older, newer) = self.event_ids.as_slices();
        if newer.contains(&digest) || older.contains(&digest) {
            return false;
        }
        push_bounded(&mut self.event_ids, digest, self.registry.deps.config.session.dedupe_window);
        true
    }

    fn push_history(&mut self, interaction: Interaction, idx: ItemIdx) {
        let session = &self.registry.deps.config.session;
        if session.consumed_max > 0 && session.exclude_event_types.contains(&interaction.event_type) {
            self.consumed.record(idx, interaction.timestamp, session.consumed_max);
        }
        push_bounded(&mut self.history, (interaction, idx), self.registry.deps.config.session.history_len);
    }

    /// The model's view of the history. Built for each use (an event builds it twice: the history
    /// before it, reported to the model, and after it, to score): a copy of 50 small entries,
    /// where keeping it between events held about 1 KB for every user.
    fn history_items(&self) -> Arc<[HistoryItem]> {
        self.history.iter().map(|(i, idx)| HistoryItem::of(i, *idx)).collect()
    }

    /// Applies events in order, skipping repeated ids. Returns what the store must append.
    fn apply(&mut self, events: Vec<Event>, ctx: &mut Context<Self>) -> (ApplyOutcome, ProfileUpdate) {
        let mut outcome = ApplyOutcome::default();
        let previous = self.history_items();
        let mut update = ProfileUpdate {
            user_id: self.hub.user.clone(),
            interactions: Vec::new(),
            context: None,
            suppressed: Vec::new(),
        };
        let mut new_items = Vec::new();
        for mut event in events {
            if self.erased_at.is_some_and(|at| event.timestamp <= at) {
                self.registry.deps.metrics.privacy_skipped.inc();
                continue;
            }
            if !self.remember_id(&event.event_id) {
                outcome.duplicates += 1;
                continue;
            }
            outcome.applied += 1;
            let (idx, item_id) = self.registry.deps.catalog.intern_shared(&event.item_id);
            event.item_id = item_id;
            let segment = event.context.segment();
            // The one copy off the wire type: from here on, every step reads this interaction.
            let (interaction, _, context) = Interaction::from_event(event);
            let logged = self.attribute(interaction, idx, segment);
            let interaction = logged.interaction.clone();
            self.registry.deps.event_log.append(logged);
            if interaction.event_type.is_negative() {
                self.suppressed.retain(|s| *s != interaction.item_id);
                self.suppressed.push_back(interaction.item_id.clone());
                while self.suppressed.len() > self.registry.deps.config.session.suppressed_len {
                    self.suppressed.pop_front();
                }
                update.suppressed.push(interaction.item_id.clone());
            }
            new_items.push(HistoryItem::of(&interaction, idx));
            update.interactions.push(interaction.clone());
            self.push_history(interaction, idx);
            self.context_stored &= self.context.as_ref().is_some_and(|previous| !carry_changes(previous, &context));
            self.context = Some(carry_over(self.context.take(), context));
        }
        // The store keeps the latest context; send it only when it changed.
        if !self.context_stored {
            update.context = self.context.clone();
            self.context_stored = true;
        }
        self.registry.deps.metrics.session_applied.add(outcome.applied as u64);
        self.registry.deps.metrics.session_duplicates.add(outcome.duplicates as u64);
        if outcome.applied > 0 {
            let observation = Observation { previous, new: new_items, segment: self.segment(None) };
            self.refresh_observing(observation, ctx);
        }
        (outcome, update)
    }

    fn segment(&self, device: Option<crate::event::Device>) -> usize {
        segment_of(self.context.as_ref(), device)
    }

    fn score_request(&mut self, k: usize, filters: &RecFilters) -> ScoreRequest {
        let history = self.history_items();
        let consumed = self.consumed_items();
        build_request(&self.registry.deps, history, consumed, self.suppressed.iter(), self.context.as_ref(), k, filters)
    }

    /// The consumed items to exclude now (`None`: the record is off, the history window excludes).
    /// "Now" for the re-show policy is the user's newest event, so a replay of old events behaves
    /// as it did live.
    fn consumed_items(&self) -> Option<Vec<ItemIdx>> {
        let session = &self.registry.deps.config.session;
        if session.consumed_max == 0 {
            return None;
        }
        let now = self.history.back().map_or_else(now_ms, |(i, _)| i.timestamp);
        Some(self.consumed.excluded(now, session.reshow_after_secs).collect())
    }

    /// Asks for a new pushed list, or marks the in-flight one stale.
    fn refresh(&mut self, ctx: &mut Context<Self>) {
        let asked = Instant::now();
        if self.coalescer.want(asked) {
            self.score_pushed(asked, None, ctx);
        }
    }

    /// [`Self::refresh`] after applying new interactions: the online model's `observation`
    /// travels with the scoring request when one goes out now (one message to the model
    /// actor, not two), and alone otherwise.
    fn refresh_observing(&mut self, observation: Observation, ctx: &mut Context<Self>) {
        let asked = Instant::now();
        if self.coalescer.want(asked) {
            self.score_pushed(asked, Some(observation), ctx);
        } else {
            // A refusal (the inbox full) is counted there.
            self.registry.deps.model.post(Observe { observation });
        }
    }

    /// After a stale or late answer: asks again for what is wanted (no new want).
    fn ask_again(&mut self, ctx: &mut Context<Self>) {
        let asked = Instant::now();
        if self.coalescer.ask_again(asked) {
            self.score_pushed(asked, None, ctx);
        }
    }

    /// Sends the pushed list's scoring request (with the online model's `observation` of what
    /// was just applied, if any), and publishes its answer unless it is stale or a `GET` pushed
    /// a list of the same state first.
    fn score_pushed(&mut self, asked: Instant, observation: Option<Observation>, ctx: &mut Context<Self>) {
        self.unreflected_since = None;
        let request = self.score_request(self.registry.deps.config.recs.default_k, &RecFilters::default());
        // The newest event the request reflects: the list names it, even if more arrive meanwhile.
        let reflected = self.history.back().map(|(i, _)| i.event_id.clone());
        let late = Duration::from_millis(self.registry.deps.config.session.late_list_ms);
        // A child of the applying span when an event caused the refresh.
        let scoring = crate::telemetry::span(|| tracing::info_span!("model_score"));
        self.registry
            .deps
            .model
            .send(Recommend { request, user: self.user_hash, observation })
            .into_actor(self)
            .map(move |result, act, ctx| {
                let _entered = scoring.enter();
                act.registry.deps.metrics.stage_model_seconds.observe_duration(asked.elapsed());
                let answer = act.coalescer.answered(Instant::now(), late);
                if answer == Answer::Stale {
                    act.registry.deps.metrics.lists_stale.inc();
                    act.ask_again(ctx);
                    return;
                }
                match result {
                    // A GET for a user with no list yet pushed its own answer meanwhile, scored
                    // from this state or a newer one: pushing this one too would change the
                    // subscribers' list (its rec_id) with nothing done; unless that list holds
                    // an item withdrawn since.
                    Ok(Ok(_)) if !act.coalescer.push() && act.pushed_list_available() => {
                        if answer == Answer::Late {
                            // The events applied since it was asked are still to be pushed.
                            if let Some(since) = act.unreflected_since.take() {
                                act.pending_since.get_or_insert(since);
                            }
                        }
                    }
                    Ok(Ok(scored)) => {
                        act.publish(scored, false, reflected);
                        if answer == Answer::Late {
                            // The events applied since it was asked are still to be pushed.
                            act.registry.deps.metrics.lists_late.inc();
                            act.pending_since = act.unreflected_since.take();
                        }
                    }
                    Ok(Err(crate::actors::model::ModelError::Overloaded)) => {
                        // A burst of users filled the model's queue (each refusal counts in
                        // liverec_model_refused_total): no warning per user, and no retry, which
                        // under a burst of new users would only feed the queue more. The list
                        // is scored on the user's next event or next GET.
                        tracing::debug!(user = %act.hub.user, "no list computed: the model is overloaded");
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(error = %error, user = %act.hub.user, "no list computed")
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, user = %act.hub.user, "model mailbox closed")
                    }
                }
                if answer == Answer::Late {
                    act.ask_again(ctx);
                }
            })
            .spawn(ctx);
    }

    /// Whether every item of the pushed list is still available. A `GET`'s first list may hold
    /// an item withdrawn while it was scored, and a withdrawal asks only the sessions whose
    /// list holds the item, not one with no list yet.
    fn pushed_list_available(&self) -> bool {
        let now = now_ms();
        self.hub
            .latest()
            .is_none_or(|u| u.list.items.iter().all(|i| self.registry.deps.catalog.is_available(&i.item_id, now)))
    }

    /// Publishes a new list to the user's streams. It counts as an impression when someone
    /// receives it: a live subscriber here or (production mode) on another instance, or the
    /// `GET` it answers (`answering`).
    /// `reflected` is the newest event the list reflects (the newest when it was asked).
    fn publish(&mut self, scored: ScoredList, answering: bool, reflected: Option<EventId>) {
        if self.hub.is_erased() {
            return;
        }
        let _span = crate::telemetry::span(|| tracing::info_span!("push")).entered();
        let list = make_list(&self.registry.deps, &self.hub.user, &scored, self.hub.next_seq(), reflected);
        let update = RecUpdate::new(list);
        self.hub.publish(update.clone());
        let delivered = answering || self.hub.subscriber_count() > 0 || self.registry.shown_elsewhere(&self.hub);
        self.record_served(&update, &scored, delivered);
        self.registry.deps.metrics.push_updates.inc();
        if let Some(since) = self.pending_since.take() {
            self.registry.deps.metrics.event_to_push_seconds.observe_duration(since.elapsed());
        }
        // Production mode: a list nobody watches is neither stored nor published (a later
        // subscriber starts from the stored profile; see `SessionRegistry::watch_appeared`).
        if self.registry.deps.store.parks_profiles() {
            // Parked with the rest of the state when the session stops.
        } else if self.registry.list_wanted(&self.hub) {
            self.registry.deps.store.save_recs(&update);
        } else {
            self.registry.deps.metrics.lists_unwatched.inc();
        }
    }

    /// Remembers a list for click attribution, and reports it to the monitor as an impression
    /// when it reached someone (a list published to no subscriber is not an impression; a `GET`
    /// that later serves it from the hub reports it then).
    fn record_served(&mut self, update: &Arc<RecUpdate>, scored: &ScoredList, delivered: bool) {
        if delivered {
            report_scored_impression(&self.registry.deps, update, scored);
        }
        self.served.remember(update, Instant::now(), &self.registry.deps.catalog);
    }

    /// Reports an applied interaction to the monitor, attributed to a served list (the one it
    /// names by `rec_id`, else the newest recent list that showed the item) or organic. Each list
    /// counts at most one click and one conversion. Returns the event log's record of it.
    fn attribute(&mut self, interaction: Interaction, item: ItemIdx, segment: usize) -> Arc<LoggedEvent> {
        let attributed = !interaction.event_type.is_negative() && self.attribute_outcome(&interaction, item);
        let logged = Arc::new(LoggedEvent {
            user: self.hub.user.clone(),
            interaction,
            item,
            segment,
            organic: !attributed,
            logged_at: now_ms(),
        });
        tell_monitor(&self.registry.deps, Activity { user: self.user_hash, event: logged.clone() });
        logged
    }

    /// Reports the click or conversion `event` makes on a served list; false when it is on no
    /// recent list (an organic event).
    fn attribute_outcome(&mut self, event: &Interaction, item_idx: ItemIdx) -> bool {
        let window = Duration::from_secs(self.registry.deps.config.monitor.attribution_window_secs);
        let interacted = Interacted {
            rec_id: event.rec_id.as_deref(),
            item: &event.item_id,
            item_idx,
            event_type: event.event_type,
            value: event.value,
        };
        let Some(outcomes) = self.served.attribute(&interacted, Instant::now(), window) else { return false };
        for outcome in outcomes {
            tell_monitor(&self.registry.deps, outcome);
        }
        true
    }

    fn profile(&self) -> Profile {
        Profile {
            interactions: self.history.iter().map(|(i, _)| i.clone()).collect(),
            context: self.context.clone(),
            event_ids: self.event_ids.iter().copied().collect(),
            suppressed: self.suppressed.iter().cloned().collect(),
            last_recs: self.hub.latest().map(|u| u.list.clone()),
            consumed: self.consumed_record(),
        }
    }

    /// The consumed record as the store keeps it (by item id).
    fn consumed_record(&self) -> Vec<ConsumedItem> {
        let (indices, times): (Vec<ItemIdx>, Vec<u32>) = self.consumed.entries().unzip();
        let mut record: Vec<ConsumedItem> = (self.registry.deps.catalog.ids_of(&indices).into_iter().zip(times))
            .map(|(item_id, at_secs)| ConsumedItem { item_id, at_secs })
            .collect();
        record.sort_unstable_by(|a, b| a.item_id.as_str().cmp(b.item_id.as_str()));
        record
    }

    /// Queues the update in the store; the returned future resolves when it is durable. A
    /// parking store gets the whole state when the session stops instead.
    fn persist(&self, update: ProfileUpdate) -> Persisted {
        if (update.interactions.is_empty() && update.suppressed.is_empty()) || self.registry.deps.store.parks_profiles()
        {
            return persisted_now();
        }
        self.registry.deps.store.append(update)
    }
}

/// Starts `hub`'s session on `arbiter`: the registry's `StartSession`, handed to it by the wiring.
pub fn start(arbiter: &ArbiterHandle, hub: Arc<UserHub>, registry: Arc<SessionRegistry>) -> SessionHandle {
    SessionHandle::of(SessionActor::start_in_arbiter(arbiter, move |_| SessionActor::new(hub, registry)))
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.registry.deps.config.session.mailbox_capacity);
        self.registry.deps.metrics.sessions_active.inc();
        self.registry.deps.metrics.sessions_started.inc();
        self.load_profile(ctx);
        // Idle sessions are stopped by the registry's sweep (StopIfIdle below); the registry
        // marked the user active when it started this session.
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        // Parked before the registry hears of the stop: a session started for the user after
        // that claims this state. An erased user's state goes nowhere.
        if self.registry.deps.store.parks_profiles() && !self.handed_over && !self.hub.is_erased() {
            let profile = self.profile();
            if !profile.is_empty() {
                self.registry.deps.store.park(&self.hub.user, profile);
            }
        }
        self.registry.deps.metrics.sessions_active.dec();
        self.registry.session_stopped(&self.hub, &ctx.address().recipient());
    }
}

impl Handler<ApplyEvents> for SessionActor {
    type Result = MessageResult<ApplyEvents>;

    fn handle(&mut self, msg: ApplyEvents, ctx: &mut Self::Context) -> Self::Result {
        let span = crate::telemetry::span(
            || tracing::info_span!(parent: &msg.span, "session_apply", events = msg.events.len()),
        );
        let _entered = span.enter();
        self.hub.touch();
        self.registry.deps.metrics.stage_apply_seconds.observe_duration(msg.received.elapsed());
        let (outcome, update) = self.apply(msg.events, ctx);
        if outcome.applied > 0 && self.pending_since.is_none() {
            self.pending_since = Some(msg.received);
        }
        if outcome.applied > 0 && self.coalescer.dirty() && self.unreflected_since.is_none() {
            self.unreflected_since = Some(msg.received);
        }
        // The store queues appends in call order, so the next message need not wait for this one.
        MessageResult(Applied { outcome, persisted: self.persist(update) })
    }
}

impl Handler<Reload> for SessionActor {
    type Result = ();

    /// The stored profile changed behind this session's back (a merge on another instance):
    /// rebuild from it and push a fresh list.
    fn handle(&mut self, _msg: Reload, ctx: &mut Self::Context) {
        if self.registry.deps.store.parks_profiles() {
            // The session's state is the profile: nothing changed behind its back to reload.
            self.refresh(ctx);
            return;
        }
        self.reset();
        self.load_profile(ctx);
        ctx.wait(fut::ready(()).map(|(), act: &mut Self, ctx| act.refresh(ctx)));
    }
}

impl Handler<ShownElsewhere> for SessionActor {
    type Result = ();

    /// Another instance served this user a list from the store: one of this session's own lists
    /// (it then counts as shown, once), or one scored there, remembered here for attribution.
    fn handle(&mut self, msg: ShownElsewhere, _ctx: &mut Self::Context) {
        let ShownElsewhere(shown) = msg;
        let k = shown.list.items.len();
        match self.served.named(&shown.list.rec_id, &self.hub.user, &self.registry.deps.catalog) {
            Some(own) => report_impression(&self.registry.deps, &own, k),
            None => {
                report_impression(&self.registry.deps, &shown, k);
                self.served.remember(&shown, Instant::now(), &self.registry.deps.catalog);
            }
        }
    }
}

impl Handler<StopIfIdle> for SessionActor {
    type Result = ();

    /// Decides once the mailbox is drained: a message queued behind this one (work routed to the
    /// session meanwhile) is handled first and makes the session active again, where stopping
    /// now would drop it.
    fn handle(&mut self, msg: StopIfIdle, ctx: &mut Self::Context) {
        ctx.notify(IdleCheck(msg.ttl));
    }
}

/// [`StopIfIdle`] again, from the session to itself: run after the messages already queued.
#[derive(Message)]
#[rtype(result = "()")]
struct IdleCheck(Duration);

impl Handler<IdleCheck> for SessionActor {
    type Result = ();

    fn handle(&mut self, IdleCheck(ttl): IdleCheck, ctx: &mut Self::Context) {
        if self.hub.idle_for() >= ttl && !self.coalescer.in_flight() {
            self.registry.deps.metrics.sessions_evicted.inc();
            ctx.stop();
        }
    }
}

impl Handler<Release> for SessionActor {
    type Result = ();

    fn handle(&mut self, _msg: Release, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<GetRecommendations> for SessionActor {
    type Result = ResponseActFuture<Self, Result<Arc<RecUpdate>, SessionError>>;

    fn handle(&mut self, msg: GetRecommendations, _ctx: &mut Self::Context) -> Self::Result {
        self.hub.touch();
        let request = self.score_request(msg.k, &msg.filters);
        // The newest event the request reflects: events applied while the model scores are not
        // in this list, so it must not name them.
        let reflected = self.history.back().map(|(i, _)| i.event_id.clone());
        let becomes_pushed = msg.filters.is_empty() && msg.k == self.registry.deps.config.recs.default_k;
        let wanted = self.coalescer.wanted();
        let user = self.user_hash;
        Box::pin(self.registry.deps.model.send(Recommend { request, user, observation: None }).into_actor(self).map(
            move |result, act, _| {
                let scored = match result {
                    Ok(Ok(scored)) => scored,
                    _ => return Err(SessionError::ModelUnavailable),
                };
                if becomes_pushed && act.hub.latest().is_none() {
                    act.coalescer.pushed_by_get(wanted);
                    act.publish(scored, true, reflected);
                    return act.hub.latest().ok_or(SessionError::Stopped);
                }
                let seq = act.hub.latest().map_or(0, |u| u.list.seq);
                let update = RecUpdate::new(make_list(&act.registry.deps, &act.hub.user, &scored, seq, reflected));
                act.record_served(&update, &scored, true);
                Ok(update)
            },
        ))
    }
}

impl Handler<EnsureList> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: EnsureList, ctx: &mut Self::Context) {
        self.hub.touch();
        // A list already on its way is the one asked for: marking it stale would have it
        // scored twice (every new subscriber's session starts by asking for one).
        if msg.fresh || (self.hub.latest().is_none() && !self.coalescer.in_flight()) {
            self.refresh(ctx);
        }
    }
}

impl Handler<Snapshot> for SessionActor {
    type Result = MessageResult<Snapshot>;

    fn handle(&mut self, _msg: Snapshot, _ctx: &mut Self::Context) -> Self::Result {
        self.hub.touch();
        MessageResult(self.profile())
    }
}

impl Handler<TakeHistory> for SessionActor {
    type Result = AtomicResponse<Self, Profile>;

    fn handle(&mut self, _msg: TakeHistory, _ctx: &mut Self::Context) -> Self::Result {
        let profile = self.profile();
        self.handed_over = true;
        self.history.clear();
        self.consumed.clear();
        self.event_ids.clear();
        self.suppressed.clear();
        let store = self.registry.deps.store.clone();
        let user = self.hub.user.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let _ = store.remove(&user).await;
            }
            .into_actor(self)
            .map(move |(), _, ctx| {
                // Stop only once the reply is on its way; stopping earlier would drop it.
                ctx.stop();
                profile
            }),
        ))
    }
}

impl Handler<MergeHistory> for SessionActor {
    type Result = MessageResult<MergeHistory>;

    fn handle(&mut self, msg: MergeHistory, ctx: &mut Self::Context) -> Self::Result {
        self.hub.touch();
        // The anonymous history happened before or around this user's own: interleave by time,
        // so the ring buffer keeps the most recent interactions of both.
        let mut merged: Vec<Interaction> = self.history.drain(..).map(|(i, _)| i).collect();
        let own: HashSet<EventId> = merged.iter().map(|i| i.event_id.clone()).collect();
        let mut outcome = ApplyOutcome::default();
        let mut update = ProfileUpdate {
            user_id: self.hub.user.clone(),
            interactions: Vec::new(),
            context: None,
            suppressed: msg.from.suppressed.clone(),
        };
        for interaction in msg.from.interactions {
            if own.contains(&interaction.event_id) || !self.remember_id(&interaction.event_id) {
                outcome.duplicates += 1;
                continue;
            }
            outcome.applied += 1;
            update.interactions.push(interaction.clone());
            merged.push(interaction);
        }
        merged.sort_by_key(|i| i.timestamp);
        for interaction in merged {
            let idx = self.registry.deps.catalog.intern(&interaction.item_id);
            self.push_history(interaction, idx);
        }
        for item in msg.from.suppressed {
            if !self.suppressed.contains(&item) {
                self.suppressed.push_back(item);
            }
        }
        if self.context.is_none() {
            self.context = msg.from.context;
        }
        update.context = self.context.clone();
        if outcome.applied > 0 || !update.suppressed.is_empty() {
            self.refresh(ctx);
        }
        // The context goes to the store with the append; with nothing to append, with the next.
        self.context_stored = !update.interactions.is_empty() || !update.suppressed.is_empty();
        MessageResult(Applied { outcome, persisted: self.persist(update) })
    }
}

/// The context of an event, with what it leaves out (no device, no country, no attributes)
/// taken from the last known one: an event without `context` does not make a phone "other".
fn carry_over(previous: Option<EventContext>, mut new: EventContext) -> EventContext {
    if let Some(previous) = previous {
        if new.device == crate::event::Device::Other {
            new.device = previous.device;
        }
        new.country = new.country.or(previous.country);
        if new.attributes.is_empty() {
            new.attributes = previous.attributes;
        }
    }
    new
}

/// Whether [`carry_over`] of `previous` and `new` differs from `previous`: compared field by
/// field, so the session keeps no copy of the context last stored.
fn carry_changes(previous: &EventContext, new: &EventContext) -> bool {
    let device = new.device != crate::event::Device::Other && new.device != previous.device;
    let country = new.country.is_some() && new.country != previous.country;
    let attributes = !new.attributes.is_empty() && new.attributes != previous.attributes;
    device || country || attributes || new.hour != previous.hour || new.weekday != previous.weekday
}

#[cfg(test)]
mod tests {
    use actix::Arbiter;

    use super::*;
    use crate::actors::registry::SessionRegistry;
    use crate::config::Config;
    use crate::event::{EventType, UserId};

    fn view(user: &str, id: &str) -> ApplyEvents {
        let event = Event {
            event_id: EventId::from(id),
            user_id: UserId::from(user),
            item_id: ItemId::from("item-1"),
            event_type: EventType::View,
            value: None,
            timestamp: now_ms(),
            rec_id: None,
            context: EventContext::default(),
        };
        ApplyEvents { events: vec![event], received: Instant::now(), span: tracing::Span::none() }
    }

    /// Polls until `done`, failing after a minute without it.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            actix_rt::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[actix_rt::test]
    async fn work_queued_behind_an_idle_stop_is_applied_and_keeps_the_session() {
        let ttl = Duration::from_secs(2);
        let mut config = Config::default();
        // The registry's own sweep never comes during the test: the test sends the stops.
        config.session.idle_ttl_ms = 3_600_000;
        let registry =
            SessionRegistry::new(crate::actors::test_deps(config), vec![Arbiter::current()], Arc::new(start));
        let (hub, session) = registry.session(&UserId::from("u"));
        until("the user idle for the ttl", || hub.idle_for() >= ttl).await;
        // Both queued before the session runs again: the event comes after the stop.
        session.stop_if_idle(StopIfIdle { ttl });
        let applied = session.apply(view("u", "e1")).await.expect("the event is applied, not dropped by the stop");
        assert_eq!(applied.outcome.applied, 1);
        assert!(session.connected(), "the event made the session active again");
        assert_eq!(registry.deps.metrics.sessions_evicted.get(), 0);

        // Idle again with nothing queued: it stops.
        until("the user idle for the ttl again", || hub.idle_for() >= ttl).await;
        session.stop_if_idle(StopIfIdle { ttl });
        until("the idle session stopped", || !session.connected()).await;
        assert_eq!(registry.deps.metrics.sessions_evicted.get(), 1);
    }
}
