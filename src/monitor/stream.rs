//! The whole stream's window: what each bucket counts, and the window's item popularity kept as
//! a running sum (added as events arrive, subtracted as a bucket leaves the window), so novelty
//! costs an impression a few lookups whatever the window, the catalogue or the number of users.

use std::collections::hash_map::Entry;

use super::{FastMap, FastSet, Window};
use crate::catalog::ItemIdx;
use crate::event::Context as EventContext;

#[derive(Clone, Debug, Default, PartialEq)]
/// What one bucket counts for the whole stream.
pub struct StreamBucket {
    /// Organic events per item in this bucket. Private: counted through
    /// [`StreamWindow::count_organic`], which keeps the window's running sum in step.
    popularity: FastMap<ItemIdx, u64>,
    /// Events per context segment (device x hour bucket); `EventContext::SEGMENTS` long.
    pub context: Vec<u64>,
    /// Items shown in this bucket.
    pub impressed: FastSet<ItemIdx>,
    /// Per user (hash): events and revenue in this bucket.
    pub users: FastMap<u64, UserActivity>,
}

impl StreamBucket {
    /// An empty bucket with its context segments.
    pub fn empty() -> Self {
        Self { context: vec![0; EventContext::SEGMENTS], ..Self::default() }
    }

    /// Organic events per item in this bucket.
    pub fn organic(&self) -> &FastMap<ItemIdx, u64> {
        &self.popularity
    }

    /// Counts `n` organic events on `item` in a bucket outside any window (a report being built
    /// or decoded): a window's buckets count through [`StreamWindow::count_organic`].
    pub(super) fn add_organic(&mut self, item: ItemIdx, n: u64) {
        *self.popularity.entry(item).or_default() += n;
    }
}

/// What one user did in a bucket, or over a window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UserActivity {
    pub events: u64,
    /// Sum of purchase values.
    pub revenue: f64,
}

/// Item popularity (organic events) and context mix over a window, for the drift checks.
#[derive(Clone, Debug, Default)]
pub struct StreamTotals {
    pub popularity: std::collections::HashMap<ItemIdx, f64>,
    pub context: Vec<f64>,
    /// Organic events counted in `popularity`.
    pub events: u64,
    /// How many independent draws the window's events are worth, clustered by user
    /// ([`super::drift::effective_users`]; `None` without user counts).
    pub effective_users: Option<f64>,
}

/// The stream's buckets and the running sum of their item popularity.
#[derive(Clone, Debug)]
pub struct StreamWindow {
    window: Window<StreamBucket>,
    /// Organic events per item over the window: the sum of the buckets' `popularity` (items at
    /// zero are removed, so the map holds what the window holds).
    popularity: FastMap<ItemIdx, u64>,
    /// The sum of `popularity`.
    events: u64,
}

impl StreamWindow {
    pub fn new(buckets: usize) -> Self {
        Self { window: Window::new(buckets), popularity: FastMap::default(), events: 0 }
    }

    /// Moves the window to `tick`; what the buckets that leave it counted leaves the running sum.
    /// Costs the leaving buckets' distinct items: each counted event is subtracted once.
    pub fn advance(&mut self, tick: u64) {
        let (popularity, events) = (&mut self.popularity, &mut self.events);
        self.window.advance_evicting(tick, |bucket| {
            for (item, n) in bucket.popularity {
                *events -= n;
                if let Entry::Occupied(mut total) = popularity.entry(item) {
                    *total.get_mut() -= n;
                    if *total.get() == 0 {
                        total.remove();
                    }
                }
            }
        });
    }

    /// The current bucket, after moving to `tick`.
    pub fn bucket(&mut self, tick: u64) -> &mut StreamBucket {
        self.advance(tick);
        let bucket = self.window.at(tick);
        if bucket.context.is_empty() {
            bucket.context = vec![0; EventContext::SEGMENTS];
        }
        bucket
    }

    /// One organic event on `item`, at `tick`.
    pub fn count_organic(&mut self, tick: u64, item: ItemIdx) {
        *self.bucket(tick).popularity.entry(item).or_default() += 1;
        *self.popularity.entry(item).or_default() += 1;
        self.events += 1;
    }

    /// The bucket of `tick` (see [`Window::slot`]): `None` when it is older than the window.
    pub fn bucket_at(&mut self, tick: u64) -> Option<&mut StreamBucket> {
        self.advance(tick);
        let bucket = self.window.slot(tick)?;
        if bucket.context.is_empty() {
            bucket.context = vec![0; EventContext::SEGMENTS];
        }
        Some(bucket)
    }

    /// Adds `other` (one bucket's counts: another instance's report) to the bucket of `tick`,
    /// keeping the running sum in step; nothing when `tick` is older than the window.
    pub fn merge(&mut self, tick: u64, other: &StreamBucket) {
        let Some(bucket) = self.bucket_at(tick) else { return };
        for (&item, &n) in &other.popularity {
            *bucket.popularity.entry(item).or_default() += n;
        }
        for (slot, &n) in bucket.context.iter_mut().zip(&other.context) {
            *slot += n;
        }
        bucket.impressed.extend(other.impressed.iter().copied());
        for (&user, activity) in &other.users {
            let mine = bucket.users.entry(user).or_default();
            mine.events += activity.events;
            mine.revenue += activity.revenue;
        }
        for (&item, &n) in &other.popularity {
            *self.popularity.entry(item).or_default() += n;
            self.events += n;
        }
    }

    /// Organic events per item over the window.
    pub fn popularity(&self) -> &FastMap<ItemIdx, u64> {
        &self.popularity
    }

    /// Organic events over the window.
    pub fn events(&self) -> u64 {
        self.events
    }

    pub fn buckets(&self) -> impl Iterator<Item = &StreamBucket> {
        self.window.buckets()
    }

    /// Popularity and context mix over the window, for the drift checks at a bucket boundary
    /// (a pass over the window's distinct items and buckets, once per bucket, not per event).
    pub fn totals(&self) -> StreamTotals {
        let mut context = vec![0.0; EventContext::SEGMENTS];
        for bucket in self.buckets() {
            for (slot, &n) in context.iter_mut().zip(&bucket.context) {
                *slot += n as f64;
            }
        }
        let popularity = self.popularity.iter().map(|(&item, &n)| (item, n as f64)).collect();
        let effective_users = super::drift::effective_users(self.users().into_values().map(|(a, _)| a.events));
        StreamTotals { popularity, context, events: self.events, effective_users }
    }

    /// Per user over the window: the activity summed, and in how many buckets they were seen.
    pub fn users(&self) -> FastMap<u64, (UserActivity, u32)> {
        let mut users: FastMap<u64, (UserActivity, u32)> = FastMap::default();
        for bucket in self.buckets() {
            for (&user, activity) in &bucket.users {
                let (total, buckets) = users.entry(user).or_default();
                total.events += activity.events;
                total.revenue += activity.revenue;
                *buckets += 1;
            }
        }
        users
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::monitor::report::novelty;

    /// Popularity and organic events summed over the buckets from scratch (what the monitor
    /// computed on every impression before the running sum).
    fn from_scratch(window: &StreamWindow) -> (FastMap<ItemIdx, u64>, u64) {
        let mut popularity: FastMap<ItemIdx, u64> = FastMap::default();
        for bucket in window.buckets() {
            for (&item, &n) in &bucket.popularity {
                *popularity.entry(item).or_default() += n;
            }
        }
        let events = popularity.values().sum();
        (popularity, events)
    }

    #[test]
    fn the_effective_number_of_users_weighs_users_by_their_events() {
        let mut window = StreamWindow::new(4);
        assert_eq!(window.totals().effective_users, None);
        for (tick, user, events) in [(0, 1, 3), (1, 1, 2), (1, 2, 5), (2, 3, 5)] {
            window.bucket(tick).users.entry(user).or_default().events += events;
        }
        // Three users with 5 events each, over two buckets for the first.
        assert_eq!(window.totals().effective_users, Some(3.0));
        window.bucket(3).users.entry(4).or_default().events += 85;
        // One user with most of the events: worth little more than one draw.
        let effective = window.totals().effective_users.expect("users");
        assert!((effective - 100.0 * 100.0 / (3.0 * 25.0 + 85.0 * 85.0)).abs() < 1e-9, "{effective}");
    }

    #[test]
    fn the_running_popularity_equals_the_sum_over_the_buckets() {
        for seed in 0..40 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let buckets = rng.random_range(1..12);
            let items = if seed % 2 == 0 { 20 } else { 5_000 };
            let mut window = StreamWindow::new(buckets);
            let mut tick = rng.random_range(0..1_000u64);
            for step in 0..3_000 {
                match rng.random_range(0..100) {
                    // Time moves: mostly by a bucket, sometimes past the whole window, sometimes
                    // backwards (a late message: the window does not rewind).
                    0..=4 => tick += 1,
                    5 => tick += rng.random_range(0..3 * buckets as u64),
                    6 => tick = tick.saturating_sub(1),
                    7 => window.advance(tick),
                    _ => window.count_organic(tick, rng.random_range(0..items)),
                }
                if step % 50 == 0 || step == 2_999 {
                    let (popularity, events) = from_scratch(&window);
                    assert_eq!(window.popularity(), &popularity, "seed {seed}, step {step}");
                    assert_eq!(window.events(), events, "seed {seed}, step {step}");
                    let list: Vec<ItemIdx> = (0..10).map(|_| rng.random_range(0..items + 10)).collect();
                    // Bit for bit the novelty the monitor computed before, from per-bucket counts
                    // summed as floats on every impression.
                    let summed: std::collections::HashMap<ItemIdx, f64> =
                        popularity.iter().map(|(&i, &n)| (i, n as f64)).collect();
                    let total = (events as f64).max(1.0);
                    let before: f64 = list
                        .iter()
                        .map(|i| -((summed.get(i).copied().unwrap_or(0.0) + 1.0) / (total + 1.0)).log2())
                        .sum();
                    assert_eq!(novelty(&list, window.popularity(), window.events()).to_bits(), before.to_bits());
                    let totals = window.totals();
                    assert_eq!(totals.events, events);
                    assert_eq!(totals.popularity.len(), popularity.len());
                    assert!(popularity.iter().all(|(i, &n)| totals.popularity.get(i) == Some(&(n as f64))));
                }
            }
        }
    }

    #[test]
    fn a_bucket_leaving_the_window_takes_its_events_with_it() {
        let mut window = StreamWindow::new(3);
        window.count_organic(10, 1);
        window.count_organic(11, 1);
        window.count_organic(11, 2);
        assert_eq!((window.popularity().get(&1), window.events()), (Some(&2), 3));
        window.advance(13); // bucket 10 leaves
        assert_eq!((window.popularity().get(&1), window.events()), (Some(&1), 2));
        window.advance(100);
        assert!(window.popularity().is_empty(), "items at zero are removed: {:?}", window.popularity());
        assert_eq!(window.events(), 0);
    }
}
