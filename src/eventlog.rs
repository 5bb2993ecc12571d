//! The retained event log: the recent window of applied interactions, the trainer's window in the
//! embedded mode. Sessions append every event they apply (after de-duplication, so a replayed
//! event is logged once); the log forgets events older than `trainer.window_secs` and keeps at
//! most `trainer.max_events`.
//!
//! It lives in memory, in every mode, but trains only in the embedded one: in production each
//! instance logs only the events of the partitions it owns, so the trainer reads its window from
//! the Kafka events topic instead, every partition (`bus::kafka_window`, through
//! `actors::trainer::source`; docs/production.md, "Training data"). Records are shared
//! (`Arc`): the monitor reads the same record. The log is a queue of immutable segments of
//! 4,096 records, so a snapshot for the trainer takes one pointer per segment under the lock
//! every session's append takes, and copies the records' pointers after releasing it.

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::catalog::ItemIdx;
use crate::event::{Context as EventContext, Event, EventId, EventType, ItemId, UserId};

/// One interaction a session applied: the record of it from the session onward. The session's
/// history holds it (with the item's catalogue index), the profile store persists it (its JSON
/// is the stored format: profiles written before must still load), the event log retains it in
/// a shared `Arc<LoggedEvent>` that the monitor's `Activity` carries too, and the model reads it
/// through its `HistoryItem` view (the catalogue index, type, weight and time: what inference
/// needs on its own thread).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    pub event_id: EventId,
    pub item_id: ItemId,
    pub event_type: EventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    pub timestamp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rec_id: Option<Arc<str>>,
}

impl Interaction {
    /// The record of an applied event from the session onward (the one copy off the wire type);
    /// the event's user and context go back to the caller.
    pub fn from_event(event: Event) -> (Interaction, UserId, EventContext) {
        let interaction = Interaction {
            event_id: event.event_id,
            item_id: event.item_id,
            event_type: event.event_type,
            value: event.value,
            timestamp: event.timestamp,
            rec_id: event.rec_id,
        };
        (interaction, event.user_id, event.context)
    }
}

#[cfg(test)]
impl Interaction {
    /// A view of `item` with event id `id` at time `timestamp`, for tests.
    pub fn view(id: &str, item: &str, timestamp: i64) -> Self {
        Interaction {
            event_id: EventId::from(id),
            item_id: ItemId::from(item),
            event_type: EventType::View,
            value: None,
            timestamp,
            rec_id: None,
        }
    }
}

/// One applied interaction as the log retains it for the trainer: the interaction itself, and
/// what the session knew when it applied it. It reads as the interaction (`Deref`), so
/// `event.event_type` and `event.timestamp` are the interaction's own fields.
#[derive(Clone, Debug, PartialEq)]
pub struct LoggedEvent {
    pub user: UserId,
    pub interaction: Interaction,
    /// The item's catalogue index.
    pub item: ItemIdx,
    /// Context segment (device x hour bucket), for the drift reference.
    pub segment: usize,
    /// Not a click on a served list (see the monitor's input drift).
    pub organic: bool,
    /// When the log received it (milliseconds since the Unix epoch), for the window.
    pub logged_at: i64,
}

impl Deref for LoggedEvent {
    type Target = Interaction;

    fn deref(&self) -> &Interaction {
        &self.interaction
    }
}

/// Events per sealed segment of the log.
const SEGMENT: usize = 4096;

/// The retained events, oldest first: full segments that never change again (`Arc<[..]>`, so a
/// snapshot takes a pointer to each), then the segment being filled.
#[derive(Default)]
struct Segments {
    sealed: VecDeque<Arc<[Arc<LoggedEvent>]>>,
    /// Events of `sealed[0]` already dropped (by the window or the cap): they are skipped, and
    /// freed when the whole segment goes.
    skip: usize,
    open: VecDeque<Arc<LoggedEvent>>,
    len: usize,
}

impl Segments {
    fn front(&self) -> Option<&Arc<LoggedEvent>> {
        match self.sealed.front() {
            Some(segment) => segment.get(self.skip),
            None => self.open.front(),
        }
    }

    fn pop_front(&mut self) {
        if let Some(segment) = self.sealed.front() {
            self.skip += 1;
            if self.skip >= segment.len() {
                self.sealed.pop_front();
                self.skip = 0;
            }
            self.len -= 1;
        } else if self.open.pop_front().is_some() {
            self.len -= 1;
        }
    }

    fn push_back(&mut self, event: Arc<LoggedEvent>) {
        self.open.push_back(event);
        self.len += 1;
        if self.open.len() >= SEGMENT {
            self.sealed.push_back(self.open.drain(..).collect());
        }
    }

    /// The newest `n` events (fewer if the log holds fewer), oldest first.
    fn newest(&self, n: usize) -> Vec<Arc<LoggedEvent>> {
        let n = n.min(self.len);
        let mut out = Vec::with_capacity(n);
        out.extend(self.open.iter().rev().take(n).cloned());
        for (i, segment) in self.sealed.iter().enumerate().rev() {
            if out.len() >= n {
                break;
            }
            let from = if i == 0 { self.skip } else { 0 };
            let wanted = n - out.len();
            out.extend(segment[from..].iter().rev().take(wanted).cloned());
        }
        out.reverse();
        out
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<LoggedEvent>> {
        let mut sealed = self.sealed.iter();
        let first = sealed.next().map(|s| &s[self.skip..]).unwrap_or_default();
        first.iter().chain(sealed.flat_map(|s| s.iter())).chain(self.open.iter())
    }
}

/// What a snapshot takes under the lock: a pointer per sealed segment and the open segment's
/// events (fewer than [`SEGMENT`]), never a copy of the whole log.
struct Pinned {
    sealed: Vec<Arc<[Arc<LoggedEvent>]>>,
    skip: usize,
    open: Vec<Arc<LoggedEvent>>,
}

pub struct EventLog {
    events: Mutex<Segments>,
    window_ms: i64,
    max_events: usize,
    appended: AtomicU64,
}

impl EventLog {
    pub fn new(window_secs: u64, max_events: usize) -> Arc<Self> {
        Arc::new(Self {
            events: Mutex::new(Segments::default()),
            window_ms: (window_secs as i64).saturating_mul(1000),
            max_events: max_events.max(1),
            appended: AtomicU64::new(0),
        })
    }

    /// Events appended since start (including those since dropped).
    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }

    pub fn append(&self, event: Arc<LoggedEvent>) {
        let mut events = self.events.lock();
        // Counted under the lock, so that `appended_since` sees the count and the log agree.
        self.appended.fetch_add(1, Ordering::Relaxed);
        let oldest = event.logged_at - self.window_ms;
        events.push_back(event);
        while events.len > self.max_events || events.front().is_some_and(|e| e.logged_at < oldest) {
            events.pop_front();
        }
    }

    /// The events appended after the first `seen` ([`EventLog::appended`]) that the log still
    /// holds, oldest first, and the count to pass next time: a reader that passes it back each
    /// time gets each event once, bar those the window or the cap dropped meanwhile (and, after
    /// an erasure removed some of the new ones, as many older ones again).
    pub fn appended_since(&self, seen: u64) -> (Vec<Arc<LoggedEvent>>, u64) {
        let events = self.events.lock();
        let now = self.appended.load(Ordering::Relaxed);
        let new = usize::try_from(now.saturating_sub(seen)).unwrap_or(usize::MAX);
        (events.newest(new), now)
    }

    /// Forgets the events that left the window by `now_ms`; returns how many.
    pub fn expire(&self, now_ms: i64) -> usize {
        let mut events = self.events.lock();
        let before = events.len;
        self.drop_expired(&mut events, now_ms);
        before - events.len
    }

    fn drop_expired(&self, events: &mut Segments, now_ms: i64) {
        let oldest = now_ms - self.window_ms;
        while events.front().is_some_and(|e| e.logged_at < oldest) {
            events.pop_front();
        }
    }

    /// The events still in the window, oldest first. The lock every session's append takes is
    /// held to drop expired events and to pin the segments (a few hundred pointers for half a
    /// million events); the copy into one list happens after it is released.
    pub fn snapshot(&self, now_ms: i64) -> Vec<Arc<LoggedEvent>> {
        let pinned = {
            let mut events = self.events.lock();
            self.drop_expired(&mut events, now_ms);
            Pinned {
                sealed: events.sealed.iter().cloned().collect(),
                skip: events.skip,
                open: events.open.iter().cloned().collect(),
            }
        };
        let mut out = Vec::with_capacity(pinned.sealed.iter().map(|s| s.len()).sum::<usize>() + pinned.open.len());
        for (i, segment) in pinned.sealed.iter().enumerate() {
            let from = if i == 0 { pinned.skip } else { 0 };
            out.extend(segment[from..].iter().cloned());
        }
        out.extend(pinned.open);
        out
    }

    pub fn len(&self) -> usize {
        self.events.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every event of `user` logged up to `until_ms` (the user's erasure); returns how
    /// many there were. Rebuilds the segments (an erasure is rare; appends wait meanwhile).
    pub fn remove_user(&self, user: &UserId, until_ms: i64) -> usize {
        let mut events = self.events.lock();
        let before = events.len;
        if !events.iter().any(|e| &e.user == user && e.logged_at <= until_ms) {
            return 0;
        }
        let kept: Vec<Arc<LoggedEvent>> =
            events.iter().filter(|e| &e.user != user || e.logged_at > until_ms).cloned().collect();
        let mut rebuilt = Segments::default();
        for event in kept {
            rebuilt.push_back(event);
        }
        *events = rebuilt;
        before - events.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(user: &str, at: i64) -> Arc<LoggedEvent> {
        Arc::new(LoggedEvent {
            user: UserId::from(user),
            interaction: Interaction {
                event_id: EventId::from(format!("{user}-{at}").as_str()),
                item_id: ItemId::from("i1"),
                event_type: EventType::View,
                value: None,
                timestamp: at,
                rec_id: None,
            },
            item: 1,
            segment: 0,
            organic: true,
            logged_at: at,
        })
    }

    #[test]
    fn keeps_the_window_and_the_cap() {
        let log = EventLog::new(10, 3);
        for at in [0, 1_000, 2_000, 3_000] {
            log.append(event("a", at));
        }
        assert_eq!(log.len(), 3, "capped");
        assert_eq!(log.snapshot(3_000).first().map(|e| e.logged_at), Some(1_000));
        assert_eq!(log.snapshot(12_500).len(), 1, "older than ten seconds are gone");
        log.append(event("b", 12_600));
        assert_eq!(log.remove_user(&UserId::from("a"), i64::MAX), 1);
        assert_eq!(log.snapshot(12_600).len(), 1);
        // An erasure at 13,500 takes what was logged before it, not what came after.
        log.append(event("a", 13_000));
        log.append(event("a", 14_000));
        assert_eq!(log.remove_user(&UserId::from("a"), 13_500), 1);
        assert_eq!(log.snapshot(14_000).iter().filter(|e| e.user.as_str() == "a").count(), 1);
    }

    #[test]
    fn a_reader_of_appended_since_sees_each_event_once_across_segments() {
        let log = EventLog::new(1_000_000, 3 * SEGMENT);
        let mut seen = 0;
        let mut read = Vec::new();
        for round in 0..4i64 {
            for at in 0..(SEGMENT as i64 + 7) {
                log.append(event("a", round * 100_000 + at));
            }
            let (new, count) = log.appended_since(seen);
            seen = count;
            read.extend(new.iter().map(|e| e.logged_at));
        }
        let expected: Vec<i64> =
            (0..4i64).flat_map(|round| (0..(SEGMENT as i64 + 7)).map(move |at| round * 100_000 + at)).collect();
        assert_eq!(read, expected);
        assert!(log.appended_since(seen).0.is_empty());
    }

    /// The log as it was before segments (one deque under the lock), as a reference.
    struct Reference {
        events: VecDeque<Arc<LoggedEvent>>,
        window_ms: i64,
        max_events: usize,
    }

    impl Reference {
        fn append(&mut self, event: Arc<LoggedEvent>) {
            let oldest = event.logged_at - self.window_ms;
            self.events.push_back(event);
            while self.events.len() > self.max_events || self.events.front().is_some_and(|e| e.logged_at < oldest) {
                self.events.pop_front();
            }
        }
        fn snapshot(&mut self, now_ms: i64) -> Vec<Arc<LoggedEvent>> {
            let oldest = now_ms - self.window_ms;
            while self.events.front().is_some_and(|e| e.logged_at < oldest) {
                self.events.pop_front();
            }
            self.events.iter().cloned().collect()
        }
        fn remove_user(&mut self, user: &UserId, until_ms: i64) -> usize {
            let before = self.events.len();
            self.events.retain(|e| &e.user != user || e.logged_at > until_ms);
            before - self.events.len()
        }
    }

    #[test]
    fn segments_keep_the_window_the_cap_and_erasures_of_a_single_deque() {
        for (window_secs, max_events) in [(30, 10_000), (5, 100_000), (1_000, 9_000)] {
            let log = EventLog::new(window_secs, max_events);
            let mut reference = Reference { events: VecDeque::new(), window_ms: window_secs as i64 * 1000, max_events };
            // A fixed pseudo-random walk: appends at rising times, snapshots, and erasures.
            let mut state = 0x2545_f491_4f6c_dd1du64;
            let mut next = |n: u64| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state % n
            };
            let mut now = 0i64;
            for step in 0..60_000 {
                now += next(3) as i64;
                let user = format!("u{}", next(40));
                let event = event(&user, now);
                log.append(event.clone());
                reference.append(event);
                if step % 7_919 == 0 {
                    let at = now - next(20_000) as i64;
                    assert_eq!(
                        log.remove_user(&UserId::from(user.as_str()), at),
                        reference.remove_user(&UserId::from(user.as_str()), at),
                        "erasure at step {step}"
                    );
                }
                if step % 4_999 == 0 {
                    let later = now + next(40_000) as i64;
                    let (got, want) = (log.snapshot(later), reference.snapshot(later));
                    assert_eq!(got.len(), want.len(), "snapshot at step {step}");
                    assert!(got.iter().zip(&want).all(|(a, b)| Arc::ptr_eq(a, b)), "same events in order");
                }
                assert_eq!(log.len(), reference.events.len(), "length at step {step}");
            }
            let (got, want) = (log.snapshot(now), reference.snapshot(now));
            assert!(got.len() == want.len() && got.iter().zip(&want).all(|(a, b)| Arc::ptr_eq(a, b)));
        }
    }

    #[test]
    fn a_snapshot_pins_segments_under_the_lock_rather_than_copying_every_event() {
        let log = EventLog::new(1_000_000, 500_000);
        for at in 0..100_000 {
            log.append(event("a", at));
        }
        let events = log.events.lock();
        assert!(events.sealed.len() <= 100_000 / SEGMENT, "full segments are sealed");
        assert!(events.open.len() < SEGMENT, "at most one segment is open");
    }

    #[test]
    fn expire_drops_what_left_the_window_without_an_append() {
        let log = EventLog::new(10, 100);
        for at in [0, 1_000, 2_000] {
            log.append(event("a", at));
        }
        assert_eq!(log.expire(5_000), 0, "all within ten seconds");
        assert_eq!(log.expire(11_500), 2, "the first two left the window");
        assert_eq!(log.len(), 1);
    }
}
