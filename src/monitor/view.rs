//! One view of what was served and what users did: the windows of counts per (version, variant)
//! and of the whole stream, and the impressions and clicks since the view started. The monitor
//! keeps one per instance (`local`, counted as its sessions report) and, in production, one of
//! the cluster (every instance's reports merged, its own included): two values of one type, so
//! both are counted, windowed and reported by the same code.
//!
//! A [`Report`] is what one instance counted over one reporting interval (`cluster.
//! report_interval_ms`): the unit published and merged. On the monitor topic it travels as a
//! [`WireReport`] naming items by id, since catalogue indices differ between instances, and
//! holding only what moved in the interval.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::report::VariantBucket;
use super::stream::{StreamBucket, StreamWindow, UserActivity};
use super::{ArmCounts, ArmTally, FastMap, Window};
use crate::catalog::ItemIdx;

/// A version and variant as the monitor keys its counts on the hot path (shared strings, so a
/// lookup allocates nothing); [`super::Arm`] is the same pair as the trainer reads it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ArmKey {
    pub version: Arc<str>,
    pub variant: Arc<str>,
}

/// What one user event adds to the stream's counts.
#[derive(Clone, Copy, Debug)]
pub struct UserEvent {
    /// A hash of the user id (`bus::user_hash`: the same in every process).
    pub user: u64,
    /// The item, when the event is organic and positive (it counts towards popularity drift).
    pub organic: Option<ItemIdx>,
    /// The context segment (device x hour bucket).
    pub segment: usize,
    /// The purchase value, for purchases.
    pub revenue: Option<f64>,
}

impl UserEvent {
    /// The event's counts in `bucket`, but for the organic item (counted by the caller, which
    /// knows whether a window's running sum must follow).
    fn count_in(&self, bucket: &mut StreamBucket) {
        if let Some(slot) = bucket.context.get_mut(self.segment) {
            *slot += 1;
        }
        let user = bucket.users.entry(self.user).or_default();
        user.events += 1;
        user.revenue += self.revenue.unwrap_or(0.0);
    }
}

/// The windows of one view (see the module docs).
#[derive(Debug)]
pub struct MonitorView {
    buckets: usize,
    variants: FastMap<ArmKey, Window<VariantBucket>>,
    /// The whole stream's buckets, with the window's item popularity as a running sum.
    stream: StreamWindow,
    /// Impressions and clicks per (version, variant) since the view started.
    totals: FastMap<ArmKey, ArmTally>,
    /// The tick at which each version was first counted.
    first_seen: FastMap<Arc<str>, u64>,
}

impl MonitorView {
    pub fn new(buckets: usize) -> Self {
        Self {
            buckets: buckets.max(1),
            variants: FastMap::default(),
            stream: StreamWindow::new(buckets.max(1)),
            totals: FastMap::default(),
            first_seen: FastMap::default(),
        }
    }

    /// Moves every window to `tick`.
    pub fn advance(&mut self, tick: u64) {
        self.stream.advance(tick);
        for window in self.variants.values_mut() {
            window.advance(tick);
        }
    }

    pub fn stream(&self) -> &StreamWindow {
        &self.stream
    }

    pub fn variants(&self) -> impl Iterator<Item = (&ArmKey, &Window<VariantBucket>)> {
        self.variants.iter()
    }

    /// The tick at which `version` was first counted here.
    pub fn first_seen(&self, version: &str) -> Option<u64> {
        self.first_seen.get(version).copied()
    }

    /// Impressions and clicks per (version, variant) since the view started.
    pub fn counts(&self) -> ArmCounts {
        self.totals.iter().map(|(arm, &tally)| (super::Arm::new(&*arm.version, &*arm.variant), tally)).collect()
    }

    /// Adds `add` (an impression, a click, a conversion, or a report's counts) to `arm` at `tick`.
    /// Counts older than the window still count towards the totals since start.
    pub fn count(&mut self, tick: u64, arm: &ArmKey, add: &VariantBucket) {
        let totals = self.totals.entry(arm.clone()).or_default();
        totals.impressions += add.impressions;
        totals.clicks += add.clicks;
        self.first_seen.entry(arm.version.clone()).or_insert(tick);
        let buckets = self.buckets;
        let window = self.variants.entry(arm.clone()).or_insert_with(|| Window::new(buckets));
        if let Some(bucket) = window.slot(tick) {
            bucket.add(add);
        }
    }

    /// Items shown in a list at `tick` (for coverage).
    pub fn impressed(&mut self, tick: u64, items: &[ItemIdx]) {
        self.stream.bucket(tick).impressed.extend(items.iter().copied());
    }

    /// One user event at `tick`.
    pub fn activity(&mut self, tick: u64, activity: &UserEvent) {
        if let Some(item) = activity.organic {
            self.stream.count_organic(tick, item);
        }
        activity.count_in(self.stream.bucket(tick));
    }

    /// Adds an instance's report, made at `tick` (the bucket of the time it was made, or nothing
    /// of the windows when that is older than them).
    pub fn merge(&mut self, tick: u64, report: &Report) {
        for (arm, add) in &report.arms {
            self.count(tick, arm, add);
        }
        self.stream.merge(tick, &report.stream);
    }
}

/// What one instance counted over one reporting interval (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub arms: FastMap<ArmKey, VariantBucket>,
    pub stream: StreamBucket,
}

impl Default for Report {
    fn default() -> Self {
        Self { arms: FastMap::default(), stream: StreamBucket::empty() }
    }
}

impl Report {
    /// As [`MonitorView::count`].
    pub fn count(&mut self, arm: &ArmKey, add: &VariantBucket) {
        match self.arms.get_mut(arm) {
            Some(bucket) => bucket.add(add),
            None => {
                self.arms.insert(arm.clone(), add.clone());
            }
        }
    }

    /// As [`MonitorView::impressed`].
    pub fn impressed(&mut self, items: &[ItemIdx]) {
        self.stream.impressed.extend(items.iter().copied());
    }

    /// As [`MonitorView::activity`].
    pub fn activity(&mut self, activity: &UserEvent) {
        if let Some(item) = activity.organic {
            self.stream.add_organic(item, 1);
        }
        activity.count_in(&mut self.stream);
    }

    /// The report as it travels: items by id (`ids` maps indices to ids, in order), zero
    /// context segments left out.
    pub fn to_wire(&self, instance: &str, at_ms: u64, ids: impl Fn(&[ItemIdx]) -> Vec<String>) -> WireReport {
        let arms = self
            .arms
            .iter()
            .map(|(arm, b)| WireArm {
                version: arm.version.to_string(),
                variant: arm.variant.to_string(),
                impressions: b.impressions,
                clicks: b.clicks,
                conversions: b.conversions,
                revenue: b.revenue,
                diversity_sum: b.diversity_sum,
                novelty_sum: b.novelty_sum,
                novelty_items: b.novelty_items,
            })
            .collect();
        let (organic_items, organic_counts): (Vec<ItemIdx>, Vec<u64>) =
            self.stream.organic().iter().map(|(&item, &n)| (item, n)).unzip();
        let organic = ids(&organic_items).into_iter().zip(organic_counts).collect();
        let impressed: Vec<ItemIdx> = self.stream.impressed.iter().copied().collect();
        WireReport {
            instance: instance.to_owned(),
            at_ms,
            arms,
            organic,
            impressed: ids(&impressed),
            context: self.stream.context.iter().enumerate().filter(|(_, &n)| n > 0).map(|(s, &n)| (s, n)).collect(),
            users: self.stream.users.iter().map(|(&user, a)| (user, a.events, a.revenue)).collect(),
        }
    }
}

/// One (version, variant)'s counts in a [`WireReport`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WireArm {
    pub version: String,
    pub variant: String,
    #[serde(default)]
    pub impressions: u64,
    #[serde(default)]
    pub clicks: u64,
    #[serde(default)]
    pub conversions: u64,
    #[serde(default)]
    pub revenue: f64,
    #[serde(default)]
    pub diversity_sum: f64,
    #[serde(default)]
    pub novelty_sum: f64,
    #[serde(default)]
    pub novelty_items: u64,
}

/// A [`Report`] on the monitor topic (JSON, keyed by the instance): only what moved in the
/// interval, items by id.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WireReport {
    /// The instance that counted it (`cluster.instance_id`).
    pub instance: String,
    /// When the interval ended, in ms since the epoch (the instance's clock).
    pub at_ms: u64,
    #[serde(default)]
    pub arms: Vec<WireArm>,
    /// Organic events per item id.
    #[serde(default)]
    pub organic: Vec<(String, u64)>,
    /// Item ids shown.
    #[serde(default)]
    pub impressed: Vec<String>,
    /// Events per context segment, the segments with any.
    #[serde(default)]
    pub context: Vec<(usize, u64)>,
    /// Per active user (hash): events and revenue.
    #[serde(default)]
    pub users: Vec<(u64, u64, f64)>,
}

/// Item and user entries in one record at most (see [`WireReport::split`]): with item ids at
/// their longest (`events.max_id_len`, 256) about half a MB, under Kafka's default 1 MB record.
pub const MAX_ENTRIES_PER_RECORD: usize = 2_000;

impl WireReport {
    /// The report as records of at most `max_entries` item and user entries each (at least
    /// one record; the arms and context segments in the first). Every count is a sum, so the
    /// parts merged one by one count what the whole would.
    pub fn split(mut self, max_entries: usize) -> Vec<WireReport> {
        let max = max_entries.max(1);
        let entries = |r: &WireReport| r.organic.len() + r.impressed.len() + r.users.len();
        if entries(&self) <= max {
            return vec![self];
        }
        let (mut organic, mut impressed, mut users) =
            (std::mem::take(&mut self.organic), std::mem::take(&mut self.impressed), std::mem::take(&mut self.users));
        let empty = WireReport { arms: Vec::new(), context: Vec::new(), ..self.clone() };
        let mut parts = vec![self];
        loop {
            let part = parts.last_mut().expect("at least one part");
            let mut room = max - entries(part);
            fn take<T>(from: &mut Vec<T>, room: &mut usize) -> Vec<T> {
                let n = (*room).min(from.len());
                *room -= n;
                from.drain(..n).collect()
            }
            part.organic.extend(take(&mut organic, &mut room));
            part.impressed.extend(take(&mut impressed, &mut room));
            part.users.extend(take(&mut users, &mut room));
            if organic.is_empty() && impressed.is_empty() && users.is_empty() {
                return parts;
            }
            parts.push(empty.clone());
        }
    }

    /// The report in this instance's terms: item ids mapped by `lookup` (items this catalogue
    /// does not know are left out: they count for nothing here), segments out of range dropped.
    pub fn resolve(&self, lookup: impl Fn(&str) -> Option<ItemIdx>) -> Report {
        let mut report = Report::default();
        for a in &self.arms {
            let arm = ArmKey { version: Arc::from(a.version.as_str()), variant: Arc::from(a.variant.as_str()) };
            let add = VariantBucket {
                impressions: a.impressions,
                clicks: a.clicks,
                conversions: a.conversions,
                revenue: a.revenue,
                diversity_sum: a.diversity_sum,
                novelty_sum: a.novelty_sum,
                novelty_items: a.novelty_items,
            };
            report.count(&arm, &add);
        }
        for (id, n) in &self.organic {
            if let Some(item) = lookup(id) {
                report.stream.add_organic(item, *n);
            }
        }
        report.stream.impressed.extend(self.impressed.iter().filter_map(|id| lookup(id)));
        for &(segment, n) in &self.context {
            if let Some(slot) = report.stream.context.get_mut(segment) {
                *slot += n;
            }
        }
        for &(user, events, revenue) in &self.users {
            let mine = report.stream.users.entry(user).or_insert(UserActivity::default());
            mine.events += events;
            mine.revenue += revenue;
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::monitor::report::{StreamFigures, VariantBucket};

    fn arm(version: &str, variant: &str) -> ArmKey {
        ArmKey { version: Arc::from(version), variant: Arc::from(variant) }
    }

    /// Item ids as two catalogues with different indices name them: instance A's index `i` is
    /// `item-i`, the cluster view's catalogue holds the same items in reverse order.
    fn id_of(i: ItemIdx) -> String {
        format!("item-{i}")
    }

    fn reversed(id: &str) -> Option<ItemIdx> {
        id.strip_prefix("item-")?.parse::<ItemIdx>().ok().filter(|&i| i < 100).map(|i| 99 - i)
    }

    /// Every arm's window and totals since start, counted as they arrive, equal a recount from
    /// the log of what was counted: the window over the last `buckets` ticks, the totals over
    /// all, for random sequences of counts and ticks (time jumping past the whole window too).
    #[test]
    fn arm_windows_and_totals_equal_a_recount_from_scratch() {
        for seed in 0..30 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let buckets = rng.random_range(1..8usize);
            let mut view = MonitorView::new(buckets);
            let arms = [arm("v1", "control"), arm("v2", "canary"), arm("v2", "control")];
            // (tick, arm, impressions, clicks) as counted.
            let mut log: Vec<(u64, usize, u64, u64)> = Vec::new();
            let mut tick = rng.random_range(0..100u64);
            for step in 0..2_000 {
                match rng.random_range(0..20) {
                    0 => tick += 1,
                    1 => tick += rng.random_range(0..3 * buckets as u64),
                    2 => view.advance(tick),
                    _ => {
                        let a = rng.random_range(0..arms.len());
                        let (impressions, clicks) = (rng.random_range(0..3u64), rng.random_range(0..2u64));
                        view.count(tick, &arms[a], &VariantBucket { impressions, clicks, ..Default::default() });
                        log.push((tick, a, impressions, clicks));
                    }
                }
                if step % 100 != 99 {
                    continue;
                }
                view.advance(tick);
                let counts = view.counts();
                for (a, key) in arms.iter().enumerate() {
                    let of_arm = || log.iter().filter(move |(_, i, _, _)| *i == a);
                    let all = of_arm().fold((0, 0), |(i, c), &(_, _, di, dc)| (i + di, c + dc));
                    let seen = of_arm().next().is_some();
                    let tally = counts.get(&super::super::Arm::new(&*key.version, &*key.variant)).copied();
                    assert_eq!(tally, seen.then_some(ArmTally { impressions: all.0, clicks: all.1 }), "seed {seed}");
                    let recent = of_arm()
                        .filter(|(t, ..)| t + buckets as u64 > tick)
                        .fold((0, 0), |(i, c), &(_, _, di, dc)| (i + di, c + dc));
                    let window = view.variants().find(|(k, _)| *k == key).map(|(_, w)| VariantBucket::sum(w));
                    let got = window.map_or((0, 0), |w| (w.impressions, w.clicks));
                    assert_eq!(got, recent, "seed {seed}, step {step}, arm {a}");
                }
                let first = |v: &str| log.iter().find(|(_, a, ..)| &*arms[*a].version == v).map(|(t, ..)| *t);
                assert_eq!(view.first_seen("v1"), first("v1"));
                assert_eq!(view.first_seen("v2"), first("v2"));
            }
        }
    }

    #[test]
    fn a_report_survives_the_wire_with_items_renamed() {
        let mut report = Report::default();
        let served = VariantBucket {
            impressions: 1,
            diversity_sum: 0.5,
            novelty_sum: 3.0,
            novelty_items: 2,
            ..Default::default()
        };
        report.count(&arm("v1", "control"), &served);
        report.count(&arm("v1", "control"), &VariantBucket { clicks: 1, ..Default::default() });
        report.count(&arm("v2", "canary"), &VariantBucket { conversions: 1, revenue: 9.5, ..Default::default() });
        report.impressed(&[3, 4]);
        report.activity(&UserEvent { user: u64::MAX, organic: Some(7), segment: 5, revenue: Some(9.5) });
        report.activity(&UserEvent { user: 1, organic: None, segment: 5, revenue: None });
        let wire = report.to_wire("a", 1_000, |items| items.iter().map(|&i| id_of(i)).collect());
        let json = serde_json::to_vec(&wire).expect("encodes");
        let decoded: WireReport = serde_json::from_slice(&json).expect("decodes");
        assert_eq!(decoded, wire);
        assert_eq!(decoded.context, [(5, 2)], "only the segments with events travel");
        assert!(decoded.users.contains(&(u64::MAX, 1, 9.5)), "user hashes keep all 64 bits: {:?}", decoded.users);

        // In a catalogue that numbers items differently, the same items by id.
        let resolved = decoded.resolve(reversed);
        assert_eq!(resolved.arms, report.arms);
        assert_eq!(resolved.stream.organic().get(&92), Some(&1));
        assert_eq!(resolved.stream.impressed, [96, 95].into_iter().collect());
        assert_eq!(resolved.stream.context, report.stream.context);
        assert_eq!(resolved.stream.users, report.stream.users);
        // Back in A's own numbering it is the report it was.
        assert_eq!(decoded.resolve(|id| id.strip_prefix("item-")?.parse().ok()), report);

        // Items the catalogue does not know count for nothing; the rest still counts.
        let unknown = WireReport { organic: vec![("elsewhere".into(), 4), ("item-1".into(), 2)], ..wire };
        assert_eq!(unknown.resolve(reversed).stream.organic(), &[(98, 2)].into_iter().collect::<FastMap<_, _>>());
        // A report with fields left out (an older or newer instance) still decodes.
        let bare: WireReport = serde_json::from_str(r#"{"instance":"b","at_ms":5}"#).expect("decodes");
        assert_eq!(bare.resolve(reversed), Report::default());
    }

    /// Random traffic split over `instances`, counted straight into one view and, per instance,
    /// into reports merged into another view: both views read the same.
    #[test]
    fn merged_reports_of_every_instance_equal_counting_it_all_in_one_view() {
        for seed in 0..20 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let (buckets, instances) = (rng.random_range(1..6), rng.random_range(1..4));
            let mut direct = MonitorView::new(buckets);
            let mut merged = MonitorView::new(buckets);
            let arms = [arm("v1", "control"), arm("v2", "canary")];
            let mut tick = 100u64;
            for _interval in 0..30 {
                let mut reports: Vec<Report> = (0..instances).map(|_| Report::default()).collect();
                for _ in 0..rng.random_range(0..40) {
                    let report = &mut reports[rng.random_range(0..instances)];
                    let arm = &arms[rng.random_range(0..2)];
                    match rng.random_range(0..4) {
                        0 => {
                            let items: Vec<ItemIdx> = (0..3).map(|_| rng.random_range(0..50)).collect();
                            let add = VariantBucket {
                                impressions: 1,
                                diversity_sum: 0.25,
                                novelty_sum: 1.5,
                                novelty_items: 3,
                                ..Default::default()
                            };
                            direct.count(tick, arm, &add);
                            direct.impressed(tick, &items);
                            report.count(arm, &add);
                            report.impressed(&items);
                        }
                        1 => {
                            let add = VariantBucket { clicks: 1, ..Default::default() };
                            direct.count(tick, arm, &add);
                            report.count(arm, &add);
                        }
                        _ => {
                            let activity = UserEvent {
                                user: rng.random_range(0..20),
                                organic: rng.random_bool(0.7).then(|| rng.random_range(0..50)),
                                segment: rng.random_range(0..crate::event::Context::SEGMENTS),
                                revenue: rng.random_bool(0.1).then_some(2.0),
                            };
                            direct.activity(tick, &activity);
                            report.activity(&activity);
                        }
                    }
                }
                for report in &reports {
                    // Through the wire, as the topic carries it.
                    let wire = report.to_wire("i", tick, |items| items.iter().map(|&i| id_of(i)).collect());
                    merged.merge(tick, &wire.resolve(|id| id.strip_prefix("item-")?.parse().ok()));
                }
                tick += rng.random_range(0..3);
            }
            direct.advance(tick);
            merged.advance(tick);
            assert_eq!(merged.counts(), direct.counts(), "seed {seed}");
            assert_eq!(merged.stream().popularity(), direct.stream().popularity(), "seed {seed}");
            assert_eq!(merged.stream().events(), direct.stream().events(), "seed {seed}");
            assert_eq!(StreamFigures::of(merged.stream(), 50), StreamFigures::of(direct.stream(), 50), "seed {seed}");
            for (key, window) in direct.variants() {
                let other = merged.variants().find(|(k, _)| *k == key).map(|(_, w)| VariantBucket::sum(w));
                assert_eq!(other, Some(VariantBucket::sum(window)), "seed {seed}");
            }
        }
    }

    #[test]
    fn a_large_report_travels_in_parts_that_merge_into_the_whole() {
        let mut report = Report::default();
        report.count(&arm("v1", "control"), &VariantBucket { impressions: 7, clicks: 2, ..Default::default() });
        for n in 0..95 {
            report.impressed(&[n]);
            report.activity(&UserEvent { user: u64::from(n) * 7, organic: Some(n % 60), segment: 3, revenue: None });
        }
        let ids = |items: &[ItemIdx]| items.iter().map(|&i| id_of(i)).collect();
        let own = |id: &str| id.strip_prefix("item-")?.parse().ok();
        let whole = report.to_wire("a", 5_000, ids);
        let parts = whole.clone().split(40);
        assert!(parts.len() > 1, "split: {}", parts.len());
        for part in &parts {
            assert!(part.organic.len() + part.impressed.len() + part.users.len() <= 40, "{part:?}");
            assert_eq!((part.instance.as_str(), part.at_ms), ("a", 5_000));
        }
        let (mut from_parts, mut from_whole) = (MonitorView::new(3), MonitorView::new(3));
        for part in &parts {
            from_parts.merge(10, &part.resolve(own));
        }
        from_whole.merge(10, &whole.resolve(own));
        assert_eq!(from_parts.counts(), from_whole.counts());
        assert_eq!(from_parts.stream().popularity(), from_whole.stream().popularity());
        assert_eq!(StreamFigures::of(from_parts.stream(), 100), StreamFigures::of(from_whole.stream(), 100));
        assert_eq!(whole.clone().split(MAX_ENTRIES_PER_RECORD), [whole], "a small report is one record");
    }

    #[test]
    fn a_late_report_counts_in_its_own_bucket_and_one_older_than_the_window_only_in_the_totals() {
        let mut view = MonitorView::new(3);
        let mut report = Report::default();
        report.count(&arm("v1", "control"), &VariantBucket { impressions: 2, clicks: 1, ..Default::default() });
        report.activity(&UserEvent { user: 1, organic: Some(4), segment: 0, revenue: None });
        view.merge(10, &report);
        view.merge(9, &report); // late, still in the window
        view.merge(7, &report); // older than the window
        let window = view.variants().next().map(|(_, w)| VariantBucket::sum(w)).expect("an arm");
        assert_eq!((window.impressions, view.stream().events()), (4, 2));
        assert_eq!(view.counts()[&crate::monitor::Arm::new("v1", "control")], ArmTally { impressions: 6, clicks: 3 });
        view.advance(12); // bucket 9 leaves
        assert_eq!(view.stream().events(), 1);
    }
}
