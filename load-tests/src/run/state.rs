//! What the tasks of a run share: the send time of every event, every subscriber's progress
//! through its users' events, and the histograms and counters the report is built from.
//!
//! How a push is matched to events: event ids are `lt<run>-<user>-<n>`, `n` counting the events
//! sent to that user. A pushed list carries `last_event_id`, the newest event of the user it
//! reflects, so a push with `n` reflects every event of that user up to `n`. Each subscriber
//! remembers, per user it watches, how far its pushes have reflected; the event-to-push latency
//! of event `k` at that subscriber is the time from sending `k` to the first push that reflects
//! it there. Bursts are coalesced by the server (one list may reflect many events), so one push
//! can record many latencies.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

use hdrhistogram::Histogram;

use crate::report::ErrorCounts;
use crate::scenario::Scenario;

/// A send time that marks an event the server refused (it can never be reflected).
pub(super) const FAILED: u64 = u64::MAX;

/// One subscription of one subscriber: which user, and how far its pushes have reflected.
pub(super) struct Watch {
    pub(super) user: usize,
    /// Events `0..acked` of the user have been reflected at this subscriber.
    pub(super) acked: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum SubKind {
    Ws,
    Sse,
    Idle,
}

pub(super) struct Subscriber {
    pub(super) kind: SubKind,
    pub(super) watches: Vec<Watch>,
    /// The stream ended before the run did.
    pub(super) closed: bool,
}

/// Everything the tasks of a run share.
pub(super) struct State {
    pub(super) start: Instant,
    pub(super) run_prefix: String,
    /// The last whole second of the load (events and requests of its final tick count in it).
    pub(super) last_second: usize,
    /// Per active user, the send time of each of their events (µs since `start`, or `FAILED`).
    pub(super) sent: Vec<Vec<u64>>,
    /// Per active user, how far the first push to any subscriber has reflected.
    pub(super) first_acked: Vec<u32>,
    pub(super) subscribers: Vec<Subscriber>,
    pub(super) e2p: Histogram<u64>,
    pub(super) e2p_first: Histogram<u64>,
    pub(super) e2p_by_second: Vec<Histogram<u64>>,
    pub(super) late_us: u64,
    pub(super) late: u64,
    pub(super) pushes: [u64; 3],
    pub(super) pushes_unexpected: u64,
    pub(super) pushes_by_second: Vec<u64>,
    pub(super) confirmed: usize,
    pub(super) requests: Histogram<u64>,
    pub(super) posts: Histogram<u64>,
    pub(super) gets: Histogram<u64>,
    pub(super) requests_by_second: Vec<Histogram<u64>>,
    pub(super) outstanding: usize,
    pub(super) errors: ErrorCounts,
}

fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant figures is a valid precision")
}

fn second_histogram() -> Histogram<u64> {
    Histogram::new(2).expect("2 significant figures is a valid precision")
}

pub(super) fn slot<T: Default>(series: &mut Vec<T>, second: usize) -> &mut T {
    if series.len() <= second {
        series.resize_with(second + 1, T::default);
    }
    &mut series[second]
}

fn hist_slot(series: &mut Vec<Histogram<u64>>, second: usize) -> &mut Histogram<u64> {
    if series.len() <= second {
        series.resize_with(second + 1, second_histogram);
    }
    &mut series[second]
}

impl State {
    pub(super) fn micros(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// The second of the load a time falls in; the last tick may run a hair past the end.
    pub(super) fn second(&self, at_us: u64) -> usize {
        ((at_us / 1_000_000) as usize).min(self.last_second)
    }

    /// A pushed list reached subscriber `sub`.
    pub(super) fn on_push(&mut self, sub: usize, user_id: &str, last_event_id: Option<&str>) {
        let now = self.micros();
        let kind = self.subscribers[sub].kind;
        self.pushes[kind as usize] += 1;
        *slot(&mut self.pushes_by_second, (now / 1_000_000) as usize) += 1;
        if kind == SubKind::Idle {
            return;
        }
        let Some((user, n)) = last_event_id.and_then(|id| parse_event_id(&self.run_prefix, id)) else {
            // The first list after subscribing reflects no event of this run.
            return;
        };
        let Some(w) = self.subscribers[sub].watches.iter().position(|w| w.user == user) else {
            self.pushes_unexpected += 1;
            return;
        };
        if user_id.strip_prefix("load-user-").and_then(|u| u.parse::<usize>().ok()) != Some(user) {
            self.pushes_unexpected += 1;
            return;
        }
        let Some(sent) = self.sent.get(user) else { return };
        let upto = (n + 1).min(sent.len() as u32);
        let from = self.subscribers[sub].watches[w].acked;
        for &at in sent.get(from as usize..upto as usize).unwrap_or_default() {
            if at == FAILED {
                continue;
            }
            let latency = now.saturating_sub(at);
            let _ = self.e2p.record(latency);
            let second = self.second(at);
            let _ = hist_slot(&mut self.e2p_by_second, second).record(latency);
            if latency > self.late_us {
                self.late += 1;
            }
        }
        let first_from = self.first_acked[user];
        for &at in sent.get(first_from as usize..upto as usize).unwrap_or_default() {
            if at != FAILED {
                let _ = self.e2p_first.record(now.saturating_sub(at));
            }
        }
        self.first_acked[user] = self.first_acked[user].max(upto);
        let watch = &mut self.subscribers[sub].watches[w];
        watch.acked = watch.acked.max(upto);
    }

    /// Deliveries (event x subscriber of its user) not reflected yet, for accepted events.
    pub(super) fn unreflected(&self) -> u64 {
        self.subscribers
            .iter()
            .flat_map(|s| &s.watches)
            .map(|w| self.sent[w.user][w.acked as usize..].iter().filter(|&&at| at != FAILED).count() as u64)
            .sum()
    }

    /// Accepted events whose user had subscribers, times those subscribers.
    pub(super) fn expected_deliveries(&self) -> u64 {
        self.subscribers
            .iter()
            .flat_map(|s| &s.watches)
            .map(|w| self.sent[w.user].iter().filter(|&&at| at != FAILED).count() as u64)
            .sum()
    }

    pub(super) fn record_request(&mut self, started_us: u64, latency_us: u64, post: bool) {
        let _ = self.requests.record(latency_us);
        let _ = if post { self.posts.record(latency_us) } else { self.gets.record(latency_us) };
        let second = self.second(started_us);
        let _ = hist_slot(&mut self.requests_by_second, second).record(latency_us);
    }
}

pub fn user_name(user: usize) -> String {
    format!("load-user-{user}")
}

/// `lt<run>-<user>-<n>` back to `(user, n)`, for ids of this run only.
fn parse_event_id(run_prefix: &str, id: &str) -> Option<(usize, u32)> {
    let rest = id.strip_prefix(run_prefix)?;
    let (user, n) = rest.split_once('-')?;
    Some((user.parse().ok()?, n.parse().ok()?))
}

/// The state every task of a run holds: one thread, so `Rc<RefCell<_>>` and no locks.
pub(super) type Shared = Rc<RefCell<State>>;

impl State {
    /// The state of a run that has sent nothing yet; `run_prefix` starts this run's event ids.
    pub(super) fn shared(scenario: &Scenario, run_prefix: String) -> Shared {
        Rc::new(RefCell::new(State {
            start: Instant::now(),
            run_prefix,
            last_second: (scenario.duration_secs.ceil() as usize).saturating_sub(1),
            sent: vec![Vec::new(); scenario.users],
            first_acked: vec![0; scenario.users],
            subscribers: Vec::new(),
            e2p: histogram(),
            e2p_first: histogram(),
            e2p_by_second: Vec::new(),
            late_us: (scenario.late_ms * 1000.0) as u64,
            late: 0,
            pushes: [0; 3],
            pushes_unexpected: 0,
            pushes_by_second: Vec::new(),
            confirmed: 0,
            requests: histogram(),
            posts: histogram(),
            gets: histogram(),
            requests_by_second: Vec::new(),
            outstanding: 0,
            errors: ErrorCounts::default(),
        }))
    }
}

/// Progress lines on stderr, when the run was asked for them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Progress {
    pub(super) enabled: bool,
}

impl Progress {
    pub(super) fn say(&self, line: String) {
        if self.enabled {
            eprintln!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(users: usize) -> State {
        State {
            start: Instant::now(),
            run_prefix: "lt1-".into(),
            last_second: 9,
            sent: vec![Vec::new(); users],
            first_acked: vec![0; users],
            subscribers: Vec::new(),
            e2p: histogram(),
            e2p_first: histogram(),
            e2p_by_second: Vec::new(),
            late_us: 1_000_000_000,
            late: 0,
            pushes: [0; 3],
            pushes_unexpected: 0,
            pushes_by_second: Vec::new(),
            confirmed: 0,
            requests: histogram(),
            posts: histogram(),
            gets: histogram(),
            requests_by_second: Vec::new(),
            outstanding: 0,
            errors: ErrorCounts::default(),
        }
    }

    #[test]
    fn event_ids_round_trip() {
        assert_eq!(parse_event_id("lt5-", "lt5-12-3"), Some((12, 3)));
        assert_eq!(parse_event_id("lt5-", "lt4-12-3"), None, "another run's event");
        assert_eq!(parse_event_id("lt5-", "0190-uuid"), None);
    }

    #[test]
    fn a_push_reflects_every_event_up_to_its_last_one_per_subscriber() {
        let mut s = state(2);
        s.sent[1] = vec![0, 0, FAILED, 0];
        for kind in [SubKind::Ws, SubKind::Sse] {
            s.subscribers.push(Subscriber { kind, watches: vec![Watch { user: 1, acked: 0 }], closed: false });
        }
        assert_eq!((s.expected_deliveries(), s.unreflected()), (6, 6));
        // A coalesced push of event 2 (refused: still counts as the list's newest id we sent).
        s.on_push(0, "load-user-1", Some("lt1-1-2"));
        assert_eq!(s.e2p.len(), 2, "events 0 and 1; the refused one is not a delivery");
        assert_eq!(s.e2p_first.len(), 2);
        assert_eq!(s.unreflected(), 4);
        // The same push at the other subscriber: every delivery counts, the first-push view not.
        s.on_push(1, "load-user-1", Some("lt1-1-3"));
        assert_eq!((s.e2p.len(), s.e2p_first.len()), (5, 3));
        assert_eq!(s.unreflected(), 1);
        // A stale push changes nothing; a list of another user is unexpected.
        s.on_push(1, "load-user-1", Some("lt1-1-0"));
        s.on_push(0, "load-user-0", Some("lt1-0-0"));
        assert_eq!((s.e2p.len(), s.pushes_unexpected), (5, 1));
        assert_eq!(s.pushes[SubKind::Ws as usize] + s.pushes[SubKind::Sse as usize], 4);
    }
}
