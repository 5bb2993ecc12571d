//! The items a user consumed, kept beyond the history window so that they stay out of the
//! user's lists (`session.consumed_max`, `session.reshow_after_secs`).
//!
//! The history ring buffer holds the last `session.history_len` interactions, which is what the
//! model reads; exclusion used to read it too, so an item fell back into the lists once 50 newer
//! events pushed it out (on MovieLens-100K, 371 of 943 users had already-rated items in their
//! served top 10). This record keeps every consumed item instead: 8 bytes an item (the catalogue
//! index and the last time, in seconds), sorted by item for lookups and merges, bounded by
//! `consumed_max` (the oldest consumptions are forgotten first). An exact set rather than a Bloom
//! filter: a false positive would hide an item the user never saw, and at 8 bytes an item the
//! exact set costs about what a Bloom filter with a useful error rate would.
//!
//! The profile store keeps the same record by item id (`Profile::consumed`, updated by every
//! append), so a session rebuilt from the store (after eviction, a restart, or on the instance
//! that takes over the user's partition) starts from it rather than from the stored history.

use crate::catalog::{Catalog, ItemIdx};
use crate::config::SessionConfig;
use crate::store::{consumed_secs as secs, Profile};

/// One consumed item and when it was last consumed (seconds since the epoch, saturated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    item: ItemIdx,
    at_secs: u32,
}

/// The consumed items of one user, sorted by item.
#[derive(Clone, Debug, Default)]
pub struct Consumed {
    entries: Vec<Entry>,
}

impl Consumed {
    /// Records that `item` was consumed at `timestamp_ms`, keeping at most `max` items (the ones
    /// consumed longest ago go first).
    pub fn record(&mut self, item: ItemIdx, timestamp_ms: i64, max: usize) {
        let at_secs = secs(timestamp_ms);
        match self.entries.binary_search_by_key(&item, |e| e.item) {
            Ok(i) => self.entries[i].at_secs = self.entries[i].at_secs.max(at_secs),
            Err(i) => self.entries.insert(i, Entry { item, at_secs }),
        }
        // Past `max` by one at most: the entry consumed longest ago goes (ties: the lower item).
        while self.entries.len() > max {
            let oldest = self.entries.iter().enumerate().min_by_key(|(_, e)| (e.at_secs, e.item)).map(|(i, _)| i);
            let Some(i) = oldest else { break };
            self.entries.remove(i);
        }
    }

    /// The record a stored profile gives: its stored record and the consuming interactions of
    /// its history (a profile stored before the record has only those). Empty when
    /// `session.consumed_max` is 0.
    pub fn of_profile(profile: &Profile, catalog: &Catalog, session: &SessionConfig) -> Self {
        let mut consumed = Self::default();
        if session.consumed_max == 0 {
            return consumed;
        }
        let stored = profile.consumed.iter().map(|c| (catalog.intern(&c.item_id), c.at_secs));
        consumed.restore(stored, session.consumed_max);
        for interaction in profile.interactions.iter().filter(|i| session.exclude_event_types.contains(&i.event_type)) {
            consumed.record(catalog.intern(&interaction.item_id), interaction.timestamp, session.consumed_max);
        }
        consumed
    }

    /// Adds a stored record (items and their times in seconds) in one pass, keeping at most
    /// `max` items, the ones consumed most recently: a sort, not one insertion each (10,000
    /// insertions into a sorted vector move some 400 MB).
    pub fn restore(&mut self, stored: impl IntoIterator<Item = (ItemIdx, u32)>, max: usize) {
        self.entries.extend(stored.into_iter().map(|(item, at_secs)| Entry { item, at_secs }));
        // By item, the latest time first, so that `dedup` keeps it.
        self.entries.sort_unstable_by(|a, b| a.item.cmp(&b.item).then(b.at_secs.cmp(&a.at_secs)));
        self.entries.dedup_by_key(|e| e.item);
        if self.entries.len() > max {
            // The newest `max`, by the order `record` forgets in (time, then item).
            self.entries.sort_unstable_by_key(|e| std::cmp::Reverse((e.at_secs, e.item)));
            self.entries.truncate(max);
            self.entries.sort_unstable_by_key(|e| e.item);
        }
    }

    /// Every item and when it was last consumed (seconds), by item.
    pub fn entries(&self) -> impl Iterator<Item = (ItemIdx, u32)> + '_ {
        self.entries.iter().map(|e| (e.item, e.at_secs))
    }

    /// The items to exclude from a list requested when the user's newest event is at `now_ms`:
    /// all of them, or with `reshow_after_secs > 0` those consumed less than that long before.
    pub fn excluded(&self, now_ms: i64, reshow_after_secs: u64) -> impl Iterator<Item = ItemIdx> + '_ {
        let cutoff = if reshow_after_secs == 0 {
            None
        } else {
            Some(i64::from(secs(now_ms)) - i64::try_from(reshow_after_secs).unwrap_or(i64::MAX))
        };
        self.entries.iter().filter(move |e| cutoff.is_none_or(|c| i64::from(e.at_secs) > c)).map(|e| e.item)
    }

    #[cfg(test)]
    pub fn contains(&self, item: ItemIdx) -> bool {
        self.entries.binary_search_by_key(&item, |e| e.item).is_ok()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_every_item_up_to_the_cap_and_forgets_the_oldest_first() {
        let mut c = Consumed::default();
        for item in 0..100u32 {
            // Item 7 is consumed again late: it must survive the eviction of its old time.
            c.record(item, i64::from(item) * 1000, 1000);
        }
        c.record(7, 500_000, 1000);
        assert_eq!(c.len(), 100);
        assert!((0..100).all(|i| c.contains(i)));
        c.record(100, 200_000, 90);
        assert_eq!(c.len(), 90);
        assert!(c.contains(7) && c.contains(100) && c.contains(99));
        // The eleven oldest (0..=11 but 7) went.
        assert!((0..=11).filter(|&i| i != 7).all(|i| !c.contains(i)));
        assert!(c.contains(12));
    }

    #[test]
    fn reshow_lets_items_consumed_long_enough_ago_back() {
        let mut c = Consumed::default();
        c.record(1, 1_000_000, 10);
        c.record(2, 5_000_000, 10);
        let all: Vec<_> = c.excluded(6_000_000, 0).collect();
        assert_eq!(all, [1, 2], "0 = never shown again");
        let recent: Vec<_> = c.excluded(6_000_000, 2_000).collect();
        assert_eq!(recent, [2], "item 1 was consumed 5,000 s before, item 2 1,000 s before");
    }

    #[test]
    fn a_stored_record_restores_with_the_latest_times_and_only_the_newest_past_the_cap() {
        let mut c = Consumed::default();
        c.record(5, 9_000, 10);
        // Item 5 again with an older time, item 3 twice: one entry each, the latest time.
        c.restore([(3, 4), (5, 2), (1, 6), (3, 7), (8, 1)], 10);
        assert_eq!(c.entries().collect::<Vec<_>>(), [(1, 6), (3, 7), (5, 9), (8, 1)]);
        // Past the cap the oldest go, as `record` would have forgotten them.
        c.restore([(2, 8), (4, 5)], 4);
        assert_eq!(c.entries().collect::<Vec<_>>(), [(1, 6), (2, 8), (3, 7), (5, 9)]);
        c.record(6, 10_000, 4);
        assert!(!c.contains(1), "the oldest went on the next record");
    }
}
