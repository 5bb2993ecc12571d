//! Coalescing of a session's scoring requests for its pushed list: at most one is in flight;
//! wanting a fresh list meanwhile joins it by marking its answer stale, and a stale answer is
//! dropped in favour of one new request that covers every change since. So a burst of events
//! yields one push of the latest state. A stale answer that took at least `late_list_ms` is
//! pushed all the same (it is newer than the pushed list) before that new request: when the
//! model is overloaded every answer is slow and most would be stale, and dropping them all left
//! busy users with no list for tens of seconds (docs/performance.md, `large-catalogue.toml`).

use std::time::{Duration, Instant};

/// The in-flight state of a session's pushed-list request, and which wants the pushed list
/// answers: a `GET` for a user with no list yet publishes its own answer, and a list asked for
/// before it, from no newer state, must not be pushed after it under a new `rec_id`.
#[derive(Debug, Default, Clone)]
pub(super) struct Coalescer {
    /// When the scoring request in flight for the pushed list was sent.
    inflight: Option<Instant>,
    /// State changed since the in-flight request was built.
    dirty: bool,
    /// Fresh lists wanted so far (calls of [`Coalescer::want`]).
    wanted: u64,
    /// Of those, how many the request in flight (or last sent) answers.
    covers: u64,
    /// Of those, how many the pushed list answers.
    pushed: u64,
}

/// What to do with an answer to the in-flight request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// It reflects the latest state: publish it.
    Current,
    /// State changed while it was computed: drop it and ask again.
    Stale,
    /// State changed while it was computed, which took at least the late bound: publish it (it
    /// reflects the state it was asked for, newer than the pushed list) and ask again.
    Late,
}

impl Coalescer {
    /// A fresh list is wanted. True when a request must be sent now; false when one is already in
    /// flight, which this call joins (its answer will be stale).
    pub(super) fn want(&mut self, now: Instant) -> bool {
        self.wanted += 1;
        self.ask_again(now)
    }

    /// After a stale or late answer: a request for what is wanted, which is no new want. True
    /// when it must be sent now (nothing in flight).
    pub(super) fn ask_again(&mut self, now: Instant) -> bool {
        if self.inflight.is_some() {
            self.dirty = true;
            return false;
        }
        self.inflight = Some(now);
        self.dirty = false;
        self.covers = self.wanted;
        true
    }

    /// An answer of the request last sent is about to be pushed: true when it answers wants the
    /// pushed list does not (false: a list scored since, from the same state or a newer one,
    /// was pushed first), and it is then the pushed list.
    pub(super) fn push(&mut self) -> bool {
        if self.covers <= self.pushed {
            return false;
        }
        self.pushed = self.covers;
        true
    }

    /// A list scored for a `GET` became the pushed list; `wanted` is [`Coalescer::wanted`] when
    /// its request was built (it answers every want made before that).
    pub(super) fn pushed_by_get(&mut self, wanted: u64) {
        self.pushed = self.pushed.max(wanted);
    }

    /// Fresh lists wanted so far, for [`Coalescer::pushed_by_get`].
    pub(super) fn wanted(&self) -> u64 {
        self.wanted
    }

    /// The in-flight request was answered (or failed) at `now`; `late` is the bound past which
    /// a stale answer is still published (zero: never).
    pub(super) fn answered(&mut self, now: Instant, late: Duration) -> Answer {
        let asked = self.inflight.take();
        if !self.dirty {
            Answer::Current
        } else if !late.is_zero() && asked.is_some_and(|asked| now.saturating_duration_since(asked) >= late) {
            Answer::Late
        } else {
            Answer::Stale
        }
    }

    pub(super) fn in_flight(&self) -> bool {
        self.inflight.is_some()
    }

    /// State changed since the request in flight was asked (its answer will not reflect it).
    pub(super) fn dirty(&self) -> bool {
        self.inflight.is_some() && self.dirty
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LATE: Duration = Duration::from_millis(1000);

    #[test]
    fn a_request_while_one_is_in_flight_joins_it() {
        let mut coalescer = Coalescer::default();
        let t0 = Instant::now();
        assert!(coalescer.want(t0));
        assert!(!coalescer.dirty());
        assert!(!coalescer.want(t0));
        assert!(!coalescer.want(t0));
        assert!(coalescer.in_flight() && coalescer.dirty());
    }

    #[test]
    fn a_stale_answer_is_not_published_and_one_request_covers_the_burst() {
        let mut coalescer = Coalescer::default();
        let t0 = Instant::now();
        assert!(coalescer.want(t0));
        // Two events arrive while the first list is computed, answered within the late bound.
        assert!(!coalescer.want(t0));
        assert!(!coalescer.want(t0));
        assert_eq!(coalescer.answered(t0 + LATE / 2, LATE), Answer::Stale);
        assert!(!coalescer.in_flight());
        // One new request for the latest state, whose answer is published.
        assert!(coalescer.want(t0 + LATE / 2));
        assert_eq!(coalescer.answered(t0 + LATE * 3, LATE), Answer::Current);
    }

    #[test]
    fn a_stale_answer_past_the_late_bound_is_published_and_followed_by_a_new_request() {
        let mut coalescer = Coalescer::default();
        let t0 = Instant::now();
        assert!(coalescer.want(t0));
        assert!(!coalescer.want(t0 + LATE / 4));
        assert_eq!(coalescer.answered(t0 + LATE, LATE), Answer::Late);
        assert!(!coalescer.in_flight() && !coalescer.dirty());
        // The bound counts from when the request was asked, not from the event that made it stale.
        assert!(coalescer.want(t0 + LATE));
        assert!(!coalescer.want(t0 + LATE * 2));
        assert_eq!(coalescer.answered(t0 + LATE * 2 - Duration::from_millis(1), LATE), Answer::Stale);
        // Zero turns it off.
        assert!(coalescer.want(t0));
        assert!(!coalescer.want(t0));
        assert_eq!(coalescer.answered(t0 + LATE * 100, Duration::ZERO), Answer::Stale);
    }

    #[test]
    fn a_list_a_get_pushed_first_is_not_pushed_again() {
        let t0 = Instant::now();
        // The session's first list is asked, an event joins it, a GET is scored from the event.
        let mut coalescer = Coalescer::default();
        assert!(coalescer.want(t0));
        assert!(!coalescer.want(t0));
        let get = coalescer.wanted();
        // Either the GET's answer comes first or the stale first answer does; the list asked
        // again for the event is then no news.
        for get_first in [true, false] {
            let mut c = coalescer.clone();
            if get_first {
                c.pushed_by_get(get);
            }
            assert_eq!(c.answered(t0, LATE), Answer::Stale);
            assert!(c.ask_again(t0));
            if !get_first {
                c.pushed_by_get(get);
            }
            assert_eq!(c.answered(t0, LATE), Answer::Current);
            assert!(!c.push(), "the GET's list answers the same wants");
        }
        // Without a GET the same answer is pushed, once; a later want (a catalogue change, a
        // new watcher) is pushed again although no event came.
        assert_eq!(coalescer.answered(t0, LATE), Answer::Stale);
        assert!(coalescer.ask_again(t0));
        assert_eq!(coalescer.answered(t0, LATE), Answer::Current);
        assert!(coalescer.push());
        assert!(!coalescer.push());
        assert!(coalescer.want(t0));
        assert_eq!(coalescer.answered(t0, LATE), Answer::Current);
        assert!(coalescer.push());
    }

    #[test]
    fn an_answer_without_changes_meanwhile_is_current() {
        let mut coalescer = Coalescer::default();
        let t0 = Instant::now();
        assert!(coalescer.want(t0));
        assert_eq!(coalescer.answered(t0 + LATE * 5, LATE), Answer::Current);
        assert!(coalescer.want(t0));
    }
}
