//! Building recommendation lists for a user: the scoring request from a user's state, the
//! client-facing `RecList` from scored items, the list from the stored profile for a user whose
//! session does not run here, and impressions reported to the monitor. Shared by the session
//! actor and the HTTP handlers, so HTTP never reaches into a session.
//!
//! It sits beside the actors rather than in `recs` because it talks to the model and monitor
//! actors (their message types live with them).

use std::sync::Arc;

use super::messages::{RecFilters, SessionError};
use super::model::{Recommend, ScoredList};
use super::monitor::Impression;
use super::session::consumed::Consumed;
use super::SessionDeps;
use crate::bus::user_hash;
use crate::catalog::ItemIdx;
use crate::event::{now_ms, Context as EventContext, EventId, ItemId};
use crate::models::{HistoryItem, ScoreRequest};
use crate::recs::{RecItem, RecList, RecUpdate};
use crate::store::Profile;

/// The context segment of a request: the user's latest context, with the device overridden if
/// the request names one; without context, the current hour and the given (or `other`) device.
pub fn segment_of(context: Option<&EventContext>, device: Option<crate::event::Device>) -> usize {
    match (context, device) {
        (Some(c), None) => c.segment(),
        (Some(c), Some(d)) => EventContext { device: d, ..c.clone() }.segment(),
        (None, d) => EventContext::at_time(now_ms(), d.unwrap_or_default()).segment(),
    }
}

/// Reports the first `k` items of `update`'s list to the monitor as an impression, the first
/// time the list is shown only: a list is one impression, and the denominator of its one click.
pub fn report_impression(deps: &SessionDeps, update: &RecUpdate, k: usize) {
    if !update.show() {
        return;
    }
    let list = &update.list;
    let items = list.items.iter().take(k).filter_map(|i| deps.catalog.lookup(&i.item_id)).collect();
    let impression = Impression {
        version: Arc::from(list.model_version.as_str()),
        variant: Arc::from(list.variant.as_str()),
        items,
    };
    if !tell_monitor(deps, impression) {
        // Not counted, so not clickable either: clicks never outnumber impressions.
        update.unshow();
    }
}

/// [`report_impression`] of a list the session has just built from `scored` (all its items):
/// the items' indices and the model's shared version and variant strings as they are, without
/// looking each id up in the catalogue or copying the strings (once per published list).
pub fn report_scored_impression(deps: &SessionDeps, update: &RecUpdate, scored: &ScoredList) {
    if !update.show() {
        return;
    }
    let items = scored.items.iter().map(|s| s.item).collect();
    let impression = Impression { version: scored.version.clone(), variant: scored.variant.clone(), items };
    if !tell_monitor(deps, impression) {
        update.unshow();
    }
}

/// Leaves a report for the monitor without waiting: counted as queued, or as refused when its
/// inbox is full (serving never waits for the monitor).
pub fn tell_monitor(deps: &SessionDeps, report: impl Into<super::monitor::Reported>) -> bool {
    // Counted before it is left: the monitor may take it (and count it down) at once.
    deps.metrics.monitor_queued.inc();
    if deps.monitor_inbox.offer(report.into(), &deps.monitor) {
        true
    } else {
        deps.metrics.monitor_queued.dec();
        deps.metrics.monitor_refused.inc();
        false
    }
}

/// A scoring request from a user's state: consumed items, suppressed items and the caller's
/// filters become exclusions. `consumed` is the record of consumed items (see
/// `session::consumed`); without one (`session.consumed_max` = 0), the history's items of the
/// configured event types.
pub fn build_request<'a>(
    deps: &SessionDeps,
    history: Arc<[HistoryItem]>,
    consumed: Option<Vec<ItemIdx>>,
    suppressed: impl Iterator<Item = &'a ItemId>,
    context: Option<&EventContext>,
    k: usize,
    filters: &RecFilters,
) -> ScoreRequest {
    let excluded_types = &deps.config.session.exclude_event_types;
    let mut exclude: Vec<ItemIdx> = consumed
        .unwrap_or_else(|| history.iter().filter(|h| excluded_types.contains(&h.event_type)).map(|h| h.item).collect());
    exclude.extend(filters.exclude.iter().filter_map(|id| deps.catalog.lookup(id)));
    // Deleted, withdrawn (`available: false`) and expired items are never in any list: the
    // models test each item against the catalogue's availability bits while they rank.
    let negatives = suppressed.filter_map(|id| deps.catalog.lookup(id)).collect();
    let categories = if filters.categories.is_empty() {
        None
    } else {
        // An unknown category matches no item, which is the honest answer.
        Some(filters.categories.iter().filter_map(|c| deps.catalog.category_idx(c)).collect())
    };
    ScoreRequest { history, segment: segment_of(context, filters.device), exclude, negatives, categories, k }
}

/// The client-facing items of `scored`: catalogue ids with their scores, in order.
pub fn rec_items<'a>(
    catalog: &crate::catalog::Catalog,
    scored: impl IntoIterator<Item = &'a crate::models::Scored>,
) -> Vec<RecItem> {
    let scored: Vec<&crate::models::Scored> = scored.into_iter().collect();
    let indices: Vec<ItemIdx> = scored.iter().map(|s| s.item).collect();
    catalog.ids_of(&indices).into_iter().zip(scored).map(|(item_id, s)| RecItem { item_id, score: s.score }).collect()
}

/// A client-facing list from scored items.
pub fn make_list(
    deps: &SessionDeps,
    user: &crate::event::UserId,
    scored: &ScoredList,
    seq: u64,
    last_event_id: Option<EventId>,
) -> RecList {
    let items = rec_items(&deps.catalog, &scored.items);
    RecList {
        rec_id: new_rec_id(),
        user_id: user.clone(),
        model_version: scored.version.to_string(),
        variant: scored.variant.to_string(),
        generated_at: now_ms(),
        seq,
        last_event_id,
        items,
    }
}

/// A list id: a UUID v7 (time-ordered, as `Uuid::now_v7` makes them) whose random bits come
/// from a generator per thread, seeded once from the system's randomness. `Uuid::now_v7` asks the
/// kernel (`getrandom`) for them on every call: a system call per published list, which showed in
/// profiles of the per-event path. A rec_id only has to be unique (clients echo it on the events a
/// list led to), not unpredictable.
fn new_rec_id() -> String {
    use rand::{RngCore, SeedableRng};
    thread_local! {
        static RNG: std::cell::RefCell<rand::rngs::SmallRng> = std::cell::RefCell::new({
            let mut seed = [0u8; 32];
            seed[..16].copy_from_slice(uuid::Uuid::now_v7().as_bytes());
            seed[16..].copy_from_slice(uuid::Uuid::now_v7().as_bytes());
            rand::rngs::SmallRng::from_seed(seed)
        });
    }
    let mut random = [0u8; 10];
    RNG.with(|rng| rng.borrow_mut().fill_bytes(&mut random));
    let millis = u64::try_from(now_ms()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid().to_string()
}

/// A list for a user whose session does not run here (production mode, where another instance
/// may own the user): the stored last list when it fits the request, else scored from the stored
/// profile. Store failures degrade to a list from no history rather than an error.
pub async fn list_from_store(
    deps: &SessionDeps,
    user: &crate::event::UserId,
    k: usize,
    filters: &RecFilters,
) -> Result<Arc<RecUpdate>, SessionError> {
    let profile = match deps.store.load(user).await {
        Ok(profile) => profile,
        Err(error) => {
            deps.metrics.store_errors.inc();
            tracing::warn!(error = %error, "profile unavailable; answering from no history");
            None
        }
    };
    if filters.is_empty() && k <= deps.config.recs.default_k {
        let now = now_ms();
        let stored = profile.as_ref().and_then(current_stored_list);
        // A stored list naming an item since taken out of the catalogue is scored afresh.
        if let Some(recs) = stored.filter(|l| l.items.iter().all(|i| deps.catalog.is_available(&i.item_id, now))) {
            return Ok(RecUpdate::new(recs.clone()));
        }
    }
    let (history, suppressed, context) = match &profile {
        Some(p) => (
            p.interactions
                .iter()
                .map(|i| HistoryItem::of(i, deps.catalog.intern(&i.item_id)))
                .collect::<Arc<[HistoryItem]>>(),
            p.suppressed.clone(),
            p.context.clone(),
        ),
        None => (Arc::from(Vec::new()), Vec::new(), None),
    };
    // The stored record of consumed items excludes as the session's would.
    let session = &deps.config.session;
    let consumed = profile.as_ref().filter(|_| session.consumed_max > 0).map(|p| {
        let now = p.interactions.last().map_or_else(now_ms, |i| i.timestamp);
        Consumed::of_profile(p, &deps.catalog, session).excluded(now, session.reshow_after_secs).collect()
    });
    let request = build_request(deps, history, consumed, suppressed.iter(), context.as_ref(), k, filters);
    let scored = match deps.model.send(Recommend { request, user: user_hash(user.as_str()), observation: None }).await {
        Ok(Ok(scored)) => scored,
        _ => return Err(SessionError::ModelUnavailable),
    };
    let last_event = profile.as_ref().and_then(|p| p.interactions.last()).map(|i| i.event_id.clone());
    Ok(RecUpdate::new(make_list(deps, user, &scored, seq_after_stored(profile.as_ref()), last_event)))
}

/// The stored list, if it still reflects the stored history. In production mode the owner stores
/// a user's lists only while some instance watches the user (docs/production.md), so the stored
/// list may predate events applied since: a list names the newest event it reflects, and one
/// naming another event than the newest stored one is stale.
pub fn current_stored_list(profile: &Profile) -> Option<&RecList> {
    profile
        .last_recs
        .as_ref()
        .filter(|list| list.last_event_id.as_ref() == profile.interactions.last().map(|i| &i.event_id))
}

/// The `seq` of a list computed from a stored profile: the stored list's while it is current,
/// one past it once it is stale, so a client that saw the stale one (`Last-Event-ID`) is sent the
/// new one, and never below a seq a client may have seen.
pub fn seq_after_stored(profile: Option<&Profile>) -> u64 {
    let Some(stored) = profile.and_then(|p| p.last_recs.as_ref()) else { return 0 };
    match profile.and_then(current_stored_list) {
        Some(_) => stored.seq,
        None => stored.seq + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::UserId;
    use crate::store::Interaction;

    fn profile(events: &[&str], stored: Option<(u64, &str)>) -> Profile {
        let interactions = events.iter().map(|id| Interaction::view(id, "i", 1)).collect();
        let last_recs = stored.map(|(seq, last)| RecList {
            rec_id: "r".into(),
            user_id: UserId::from("ann"),
            model_version: "v".into(),
            variant: "control".into(),
            generated_at: 1,
            seq,
            last_event_id: Some(EventId::from(last)),
            items: vec![],
        });
        Profile { interactions, last_recs, ..Profile::default() }
    }

    #[test]
    fn rec_ids_are_distinct_version_7_uuids_of_now() {
        let before = u64::try_from(now_ms()).expect("after 1970");
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| new_rec_id()).collect();
        assert_eq!(ids.len(), 10_000);
        let after = u64::try_from(now_ms()).expect("after 1970");
        for id in ids.iter().take(100) {
            let uuid = uuid::Uuid::parse_str(id).expect("a UUID");
            assert_eq!(uuid.get_version_num(), 7, "{id}");
            let (secs, nanos) = uuid.get_timestamp().expect("v7 has a timestamp").to_unix();
            let millis = secs * 1000 + u64::from(nanos) / 1_000_000;
            assert!((before..=after).contains(&millis), "{id}: {millis} not in {before}..={after}");
        }
        // Another thread's generator is seeded on its own: its ids are not this thread's.
        let theirs: Vec<String> =
            std::thread::spawn(|| (0..1_000).map(|_| new_rec_id()).collect()).join().expect("thread ran");
        assert!(theirs.iter().all(|id| !ids.contains(id)));
    }

    #[test]
    fn a_stored_list_older_than_the_stored_history_is_stale_and_numbered_past() {
        let current = profile(&["e1", "e2"], Some((7, "e2")));
        assert_eq!(current_stored_list(&current).map(|l| l.seq), Some(7));
        assert_eq!(seq_after_stored(Some(&current)), 7);
        // Events applied while nobody watched: their lists were not stored.
        let stale = profile(&["e1", "e2", "e3"], Some((7, "e2")));
        assert!(current_stored_list(&stale).is_none());
        assert_eq!(seq_after_stored(Some(&stale)), 8, "past the stale list a client may hold");
        assert_eq!(seq_after_stored(Some(&profile(&["e1"], None))), 0);
        assert_eq!(seq_after_stored(None), 0);
    }
}
