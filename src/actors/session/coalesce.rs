//! Coalescing of a session's scoring requests for its pushed list: at most one is in flight;
//! wanting a fresh list meanwhile joins it by marking its answer stale, and a stale answer is
//! dropped in favour of one new request that covers every change since. So a burst of events
//! yields one push of the latest state, and a list that no longer reflects it is never pushed.

/// The in-flight state of a session's pushed-list request.
#[derive(Debug, Default)]
pub(super) struct Coalescer {
    /// A scoring request for the pushed list is in flight.
    inflight: bool,
    /// State changed since the in-flight request was built.
    dirty: bool,
}

/// What to do with an answer to the in-flight request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// It reflects the latest state: publish it.
    Current,
    /// State changed while it was computed: drop it and ask again.
    Stale,
}

impl Coalescer {
    /// A fresh list is wanted. True when a request must be sent now; false when one is already in
    /// flight, which this call joins (its answer will be stale).
    pub(super) fn want(&mut self) -> bool {
        if self.inflight {
            self.dirty = true;
            return false;
        }
        self.inflight = true;
        self.dirty = false;
        true
    }

    /// The in-flight request was answered (or failed).
    pub(super) fn answered(&mut self) -> Answer {
        self.inflight = false;
        if self.dirty {
            Answer::Stale
        } else {
            Answer::Current
        }
    }

    pub(super) fn in_flight(&self) -> bool {
        self.inflight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_while_one_is_in_flight_joins_it() {
        let mut coalescer = Coalescer::default();
        assert!(coalescer.want());
        assert!(!coalescer.want());
        assert!(!coalescer.want());
        assert!(coalescer.in_flight());
    }

    #[test]
    fn a_stale_answer_is_never_published_and_one_request_covers_the_burst() {
        let mut coalescer = Coalescer::default();
        assert!(coalescer.want());
        // Two events arrive while the first list is computed.
        assert!(!coalescer.want());
        assert!(!coalescer.want());
        assert_eq!(coalescer.answered(), Answer::Stale);
        assert!(!coalescer.in_flight());
        // One new request for the latest state, whose answer is published.
        assert!(coalescer.want());
        assert_eq!(coalescer.answered(), Answer::Current);
    }

    #[test]
    fn an_answer_without_changes_meanwhile_is_current() {
        let mut coalescer = Coalescer::default();
        assert!(coalescer.want());
        assert_eq!(coalescer.answered(), Answer::Current);
        assert!(coalescer.want());
    }
}
