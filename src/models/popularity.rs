//! Popular and trending items by time window and context segment: the non-personal lists
//! (`GET /v1/popular`, `GET /v1/trending`).
//!
//! Applied events are counted by their weight ([`super::HistoryItem::weight`]: a purchase
//! counts more than a view, negative feedback not at all) into five-minute buckets per item
//! and context segment, kept for [`KEEP_MS`] (a week; buckets older than a day are merged into
//! hourly ones, and past [`MAX_ENTRIES`] counts the oldest go). A [`Snapshot`] sums the buckets once per
//! refresh into the totals of each [`Window`], from which any list (a segment, a category) is
//! one pass over the items that had events.
//!
//! Trending is rising against the item's own baseline: its weight in the window, `recent`,
//! against what its rate over the rest of the retained week predicts for a window that long,
//! `base`, scored as `(recent - base) / sqrt(base + 1)` (how many Poisson standard deviations
//! above its usual, with one pseudo-event so that an item new this hour does not outrank a
//! steadily rising one on a single view). Only items above their baseline trend. Until the
//! counts cover more than the window (a server started within the hour), `base` is 0 and
//! trending ranks like popular.

use std::collections::{BTreeMap, HashMap};

use super::Scored;
use crate::catalog::ItemIdx;

/// Width of one bucket of counts.
pub const BUCKET_MS: i64 = 5 * 60 * 1000;
/// How long counts are kept: the longest window, and the trending baseline.
pub const KEEP_MS: i64 = 7 * 24 * 3600 * 1000;
/// Buckets older than a day are merged into hourly ones (the day's windows need the finer grain,
/// the week's total and the baseline do not).
const FINE_MS: i64 = 24 * 3600 * 1000;
const PER_HOUR: i64 = 3600 * 1000 / BUCKET_MS;
/// Most (bucket, item, segment) counts kept after each prune, about 20 bytes each (80 MB): past
/// it the oldest buckets go, so a catalogue with a long tail shortens the kept week (and the
/// trending baseline with it) rather than growing without bound.
pub const MAX_ENTRIES: usize = 4_000_000;

/// The time windows lists are counted over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Window {
    Hour,
    Day,
    Week,
}

impl Window {
    pub const ALL: [Window; 3] = [Window::Hour, Window::Day, Window::Week];

    pub fn ms(self) -> i64 {
        match self {
            Window::Hour => 3600 * 1000,
            Window::Day => 24 * 3600 * 1000,
            Window::Week => KEEP_MS,
        }
    }

    fn index(self) -> usize {
        match self {
            Window::Hour => 0,
            Window::Day => 1,
            Window::Week => 2,
        }
    }
}

/// Which ranking a list is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ranking {
    /// Most weight in the window.
    Popular,
    /// Most above its own baseline (see the module docs).
    Trending,
}

/// Weighted events per five-minute bucket, item and context segment.
pub struct EventCounts {
    buckets: BTreeMap<i64, HashMap<(ItemIdx, u8), f32>>,
    /// The earliest event time counted (and still kept): where the trending baseline starts.
    earliest: Option<i64>,
    /// Counts in every bucket together, bounded by `max_entries`.
    entries: usize,
    max_entries: usize,
}

impl Default for EventCounts {
    fn default() -> Self {
        Self::with_max_entries(MAX_ENTRIES)
    }
}

impl EventCounts {
    /// Counts that keep at most `max_entries` (bucket, item, segment) entries.
    pub fn with_max_entries(max_entries: usize) -> Self {
        Self { buckets: BTreeMap::new(), earliest: None, entries: 0, max_entries: max_entries.max(1) }
    }

    /// Counts an event of `weight` for `item` in `segment` at `timestamp`: a time ahead of
    /// `now_ms` counts as now, one older than the kept week not at all.
    pub fn add(&mut self, item: ItemIdx, segment: usize, weight: f32, timestamp: i64, now_ms: i64) {
        let at = timestamp.min(now_ms);
        if weight.is_nan() || weight <= 0.0 || at <= now_ms - KEEP_MS {
            return;
        }
        let segment = u8::try_from(segment).unwrap_or(u8::MAX);
        let mut bucket = at.div_euclid(BUCKET_MS);
        if at < now_ms - FINE_MS {
            bucket -= bucket.rem_euclid(PER_HOUR);
        }
        let count = self.buckets.entry(bucket).or_default().entry((item, segment)).or_insert_with(|| {
            self.entries += 1;
            0.0
        });
        *count += weight;
        self.earliest = Some(self.earliest.map_or(at, |e| e.min(at)));
    }

    /// Forgets the buckets that ended more than a week before `now_ms`, merges those older than
    /// a day into hourly ones, and drops the oldest while more than the entries bound are kept.
    pub fn prune(&mut self, now_ms: i64) {
        let oldest = (now_ms - KEEP_MS).div_euclid(BUCKET_MS);
        let fine = (now_ms - FINE_MS).div_euclid(BUCKET_MS);
        let mut kept = self.buckets.split_off(&oldest);
        let recent = kept.split_off(&fine);
        let mut merged: BTreeMap<i64, HashMap<(ItemIdx, u8), f32>> = BTreeMap::new();
        for (bucket, counts) in kept {
            let hour = merged.entry(bucket - bucket.rem_euclid(PER_HOUR)).or_default();
            for (key, weight) in counts {
                *hour.entry(key).or_default() += weight;
            }
        }
        merged.extend(recent);
        self.buckets = merged;
        self.entries = self.buckets.values().map(HashMap::len).sum();
        while self.entries > self.max_entries {
            let Some((_, dropped)) = self.buckets.pop_first() else { break };
            self.entries -= dropped.len();
        }
        self.earliest = match self.buckets.first_key_value() {
            None => None,
            Some((&first, _)) => self.earliest.map(|e| e.max(first * BUCKET_MS)),
        };
    }

    /// (bucket, item, segment) entries kept.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// The totals of every window at `now_ms`, summed from the buckets (one pass over them).
    pub fn snapshot(&self, now_ms: i64) -> Snapshot {
        let mut windows: [HashMap<ItemIdx, ItemCounts>; 3] = Default::default();
        for (&bucket, counts) in &self.buckets {
            let start = bucket * BUCKET_MS;
            for window in Window::ALL {
                // A bucket belongs to a window when it starts inside it (five-minute grain).
                if start < now_ms - window.ms() {
                    continue;
                }
                let totals = &mut windows[window.index()];
                for (&(item, segment), &weight) in counts {
                    totals.entry(item).or_default().add(segment, weight);
                }
            }
        }
        Snapshot { now_ms, earliest: self.earliest, windows }
    }
}

/// One item's weight in a window: in total and by context segment.
#[derive(Clone, Debug, Default)]
pub struct ItemCounts {
    total: f32,
    by_segment: Vec<(u8, f32)>,
}

impl ItemCounts {
    fn add(&mut self, segment: u8, weight: f32) {
        self.total += weight;
        match self.by_segment.iter_mut().find(|(s, _)| *s == segment) {
            Some((_, w)) => *w += weight,
            None => self.by_segment.push((segment, weight)),
        }
    }

    /// The weight in `segment`, or in every segment.
    fn get(&self, segment: Option<usize>) -> f32 {
        match segment {
            None => self.total,
            Some(s) => self.by_segment.iter().find(|(seg, _)| usize::from(*seg) == s).map_or(0.0, |(_, w)| *w),
        }
    }
}

/// The counts of every window at one time: what the lists of one refresh are ranked from.
pub struct Snapshot {
    pub now_ms: i64,
    earliest: Option<i64>,
    windows: [HashMap<ItemIdx, ItemCounts>; 3],
}

impl Snapshot {
    /// Items with any weight in the window.
    pub fn items(&self, window: Window) -> usize {
        self.windows[window.index()].len()
    }

    /// The `limit` best items of `ranking` over `window` in `segment` (`None`: every segment)
    /// that `accept` lets through, best first (ties to the lower index).
    pub fn ranked(
        &self,
        ranking: Ranking,
        window: Window,
        segment: Option<usize>,
        limit: usize,
        mut accept: impl FnMut(ItemIdx) -> bool,
    ) -> Vec<Scored> {
        let recent = &self.windows[window.index()];
        let mut scored: Vec<Scored> = match ranking {
            Ranking::Popular => recent
                .iter()
                .map(|(&item, counts)| Scored { item, score: counts.get(segment) })
                .filter(|s| s.score > 0.0 && accept(s.item))
                .collect(),
            Ranking::Trending => {
                let kept = &self.windows[Window::Week.index()];
                // The baseline: the kept counts before the window, as a rate over a window's length.
                let baseline_from = self.earliest.unwrap_or(self.now_ms).max(self.now_ms - KEEP_MS);
                let span = (self.now_ms - window.ms()) - baseline_from;
                let scale = if span >= window.ms() { window.ms() as f32 / span as f32 } else { 0.0 };
                recent
                    .iter()
                    .filter_map(|(&item, counts)| {
                        let now = counts.get(segment);
                        let before = kept.get(&item).map_or(0.0, |c| c.get(segment)) - now;
                        let base = before.max(0.0) * scale;
                        let score = (now - base) / (base + 1.0).sqrt();
                        (now > 0.0 && score > 0.0).then_some(Scored { item, score })
                    })
                    .filter(|s| accept(s.item))
                    .collect()
            }
        };
        let better = |a: &Scored, b: &Scored| b.score.total_cmp(&a.score).then(a.item.cmp(&b.item));
        if scored.len() > limit && limit > 0 {
            scored.select_nth_unstable_by(limit - 1, better);
        }
        scored.truncate(limit);
        scored.sort_unstable_by(better);
        scored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;
    const HOUR: i64 = 3600 * 1000;

    fn items(list: &[Scored]) -> Vec<ItemIdx> {
        list.iter().map(|s| s.item).collect()
    }

    #[test]
    fn popular_counts_the_window_and_the_segment() {
        let mut counts = EventCounts::default();
        // Item 1: three views two days ago; item 2: two views this hour on segment 3, one on 4.
        for _ in 0..3 {
            counts.add(1, 0, 1.0, NOW - 48 * HOUR, NOW);
        }
        counts.add(2, 3, 1.0, NOW - 10 * 60 * 1000, NOW);
        counts.add(2, 3, 1.0, NOW - 5 * 60 * 1000, NOW);
        counts.add(2, 4, 1.0, NOW, NOW);
        counts.add(3, 4, 4.0, NOW + HOUR, NOW); // from the future: counts as now
        counts.add(4, 4, 0.0, NOW, NOW); // weighs nothing (negative feedback)
        counts.add(5, 4, 1.0, NOW - KEEP_MS - 1, NOW); // older than kept
        let snapshot = counts.snapshot(NOW);
        let all = |_| true;
        assert_eq!(items(&snapshot.ranked(Ranking::Popular, Window::Hour, None, 10, all)), vec![3, 2]);
        assert_eq!(items(&snapshot.ranked(Ranking::Popular, Window::Week, None, 10, all)), vec![3, 1, 2]);
        assert_eq!(items(&snapshot.ranked(Ranking::Popular, Window::Hour, Some(3), 10, all)), vec![2]);
        assert_eq!(items(&snapshot.ranked(Ranking::Popular, Window::Week, None, 2, |i| i != 3)), vec![1, 2]);
        assert_eq!(snapshot.items(Window::Week), 3);
    }

    #[test]
    fn trending_is_rising_against_the_items_own_baseline() {
        let mut counts = EventCounts::default();
        // Item 1 is steadily popular: 10 an hour for six days, 10 this hour.
        // Item 2 is usually quiet: 1 an hour, then 8 this hour.
        for h in 0..(6 * 24) {
            let at = NOW - (h + 1) * HOUR - 1;
            counts.add(1, 0, 10.0, at, NOW);
            counts.add(2, 0, 1.0, at, NOW);
        }
        counts.add(1, 0, 10.0, NOW - 1000, NOW);
        counts.add(2, 0, 8.0, NOW - 1000, NOW);
        let snapshot = counts.snapshot(NOW);
        let all = |_| true;
        assert_eq!(items(&snapshot.ranked(Ranking::Popular, Window::Hour, None, 10, all)), vec![1, 2]);
        assert_eq!(
            items(&snapshot.ranked(Ranking::Trending, Window::Hour, None, 10, all)),
            vec![2],
            "item 1 is at its usual rate: not trending"
        );
    }

    #[test]
    fn old_buckets_merge_into_hours_and_the_entries_stay_bounded() {
        let mut counts = EventCounts::with_max_entries(30);
        // Two days of one event every five minutes on one item: the older day merges into 24
        // hourly buckets, the last day stays in 288 five-minute ones.
        for i in 0..(2 * 288) {
            counts.add(1, 0, 1.0, NOW - i * BUCKET_MS, NOW);
        }
        let before: f32 = counts.snapshot(NOW).ranked(Ranking::Popular, Window::Week, None, 1, |_| true)[0].score;
        let mut unbounded = EventCounts::default();
        for i in 0..(2 * 288) {
            unbounded.add(1, 0, 1.0, NOW - i * BUCKET_MS, NOW);
        }
        unbounded.prune(NOW);
        assert!(unbounded.entries() <= 288 + 25, "{}", unbounded.entries());
        let week = unbounded.snapshot(NOW).ranked(Ranking::Popular, Window::Week, None, 1, |_| true)[0].score;
        assert_eq!(week, 576.0, "merging keeps every count");
        let day = unbounded.snapshot(NOW).ranked(Ranking::Popular, Window::Day, None, 1, |_| true)[0].score;
        assert_eq!(day, 289.0, "the last day's buckets, and the one that starts a day ago");
        // Past the bound the oldest buckets go: the newest 30 stay, and the baseline starts there.
        counts.prune(NOW);
        assert_eq!(counts.entries(), 30);
        let after = counts.snapshot(NOW).ranked(Ranking::Popular, Window::Week, None, 1, |_| true)[0].score;
        assert!(before == 576.0 && after == 30.0, "{before} {after}");
        assert_eq!(counts.earliest, Some(NOW - 29 * BUCKET_MS));
    }

    #[test]
    fn without_a_baseline_trending_ranks_like_popular_and_pruning_forgets_the_week() {
        let mut counts = EventCounts::default();
        counts.add(1, 0, 1.0, NOW - 1000, NOW);
        counts.add(2, 0, 3.0, NOW - 1000, NOW);
        let snapshot = counts.snapshot(NOW);
        assert_eq!(items(&snapshot.ranked(Ranking::Trending, Window::Hour, None, 10, |_| true)), vec![2, 1]);
        counts.prune(NOW + KEEP_MS + BUCKET_MS);
        assert_eq!(counts.snapshot(NOW + KEEP_MS + BUCKET_MS).items(Window::Week), 0);
    }
}
