//! The retained event log: the recent window of applied interactions that the trainer learns
//! from. Sessions append every event they apply (after de-duplication, so a replayed event is
//! logged once); the log forgets events older than `trainer.window_secs` and keeps at most
//! `trainer.max_events`.
//!
//! It lives in memory, in every mode: in production each instance logs the events of the
//! partitions it owns (Kafka keeps the full log; see docs/monitoring.md). Records are shared
//! (`Arc`): the monitor reads the same record, and a snapshot for the trainer copies pointers,
//! not events, under the lock every session's append takes.

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::catalog::ItemIdx;
use crate::event::{EventId, EventType, ItemId, UserId};

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

pub struct EventLog {
    events: Mutex<VecDeque<Arc<LoggedEvent>>>,
    window_ms: i64,
    max_events: usize,
    appended: AtomicU64,
}

impl EventLog {
    pub fn new(window_secs: u64, max_events: usize) -> Arc<Self> {
        Arc::new(Self {
            events: Mutex::new(VecDeque::new()),
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
        self.appended.fetch_add(1, Ordering::Relaxed);
        let mut events = self.events.lock();
        let oldest = event.logged_at - self.window_ms;
        events.push_back(event);
        while events.len() > self.max_events || events.front().is_some_and(|e| e.logged_at < oldest) {
            events.pop_front();
        }
    }

    /// The events still in the window, oldest first.
    pub fn snapshot(&self, now_ms: i64) -> Vec<Arc<LoggedEvent>> {
        let oldest = now_ms - self.window_ms;
        let mut events = self.events.lock();
        while events.front().is_some_and(|e| e.logged_at < oldest) {
            events.pop_front();
        }
        events.iter().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.events.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every event of `user` logged up to `until_ms` (the user's erasure); returns how
    /// many there were.
    pub fn remove_user(&self, user: &UserId, until_ms: i64) -> usize {
        let mut events = self.events.lock();
        let before = events.len();
        events.retain(|e| &e.user != user || e.logged_at > until_ms);
        before - events.len()
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
}
