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

use crate::catalog::ItemIdx;

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

fn secs(timestamp_ms: i64) -> u32 {
    u32::try_from(timestamp_ms.max(0) / 1000).unwrap_or(u32::MAX)
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
}
