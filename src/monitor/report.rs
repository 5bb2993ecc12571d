//! The monitor's window figures: what a bucket counts, how buckets add up, and the report built
//! from them (`GET /v1/monitor`). Plain data and pure functions; the actor owns the windows.

use serde::Serialize;

use super::stream::StreamWindow;
use super::{wilson, ArmTally, FastMap, FastSet, Rate, Window};
use crate::catalog::{Categories, ItemIdx};

#[derive(Clone, Debug, Default, PartialEq)]
/// What one bucket counts for one (version, variant).
pub struct VariantBucket {
    pub impressions: u64,
    pub clicks: u64,
    pub conversions: u64,
    pub revenue: f64,
    pub diversity_sum: f64,
    pub novelty_sum: f64,
    pub novelty_items: u64,
}

impl VariantBucket {
    /// The counts of a whole window.
    pub fn sum(window: &Window<VariantBucket>) -> VariantBucket {
        window.buckets().fold(VariantBucket::default(), |mut acc, b| {
            acc.add(b);
            acc
        })
    }

    /// Adds the counts of `other` (another bucket, or another instance's report).
    pub fn add(&mut self, other: &VariantBucket) {
        self.impressions += other.impressions;
        self.clicks += other.clicks;
        self.conversions += other.conversions;
        self.revenue += other.revenue;
        self.diversity_sum += other.diversity_sum;
        self.novelty_sum += other.novelty_sum;
        self.novelty_items += other.novelty_items;
    }
}

/// Intra-list diversity: mean pairwise Jaccard distance of the items' categories (pairs where
/// neither item has a category do not count).
pub fn intra_list_diversity(items: &[ItemIdx], categories: &Categories<'_>) -> f64 {
    let (mut pairs, mut distance) = (0u64, 0.0f64);
    for (i, &a) in items.iter().enumerate() {
        for &b in &items[i + 1..] {
            let (ca, cb) = (categories.of(a), categories.of(b));
            if ca.is_empty() && cb.is_empty() {
                continue;
            }
            let common = ca.iter().filter(|c| cb.contains(c)).count() as f64;
            let union = (ca.len() + cb.len()) as f64 - common;
            distance += 1.0 - common / union.max(1.0);
            pairs += 1;
        }
    }
    if pairs > 0 {
        distance / pairs as f64
    } else {
        0.0
    }
}

/// Novelty: the summed self-information of the items under the window's popularity (`events`
/// organic events in all), smoothed so an unseen item is finite. A lookup per item: the
/// popularity is the stream window's running sum, not rebuilt per impression.
pub fn novelty(items: &[ItemIdx], popularity: &FastMap<ItemIdx, u64>, events: u64) -> f64 {
    let total = (events as f64).max(1.0);
    items.iter().map(|i| -((popularity.get(i).map_or(0.0, |&n| n as f64) + 1.0) / (total + 1.0)).log2()).sum()
}

/// The figures of one (version, variant) over the window.
pub fn variant_report(version: &str, variant: &str, t: &VariantBucket, baseline: Option<ArmTally>) -> VariantReport {
    VariantReport {
        version: version.to_owned(),
        variant: variant.to_owned(),
        impressions: t.impressions,
        clicks: t.clicks,
        conversions: t.conversions,
        ctr: wilson(t.clicks, t.impressions),
        conversion_rate: wilson(t.conversions, t.impressions),
        revenue: t.revenue,
        intra_list_diversity: if t.impressions > 0 { t.diversity_sum / t.impressions as f64 } else { 0.0 },
        novelty: if t.novelty_items > 0 { t.novelty_sum / t.novelty_items as f64 } else { 0.0 },
        baseline_ctr: baseline.map(|b| if b.impressions > 0 { b.clicks as f64 / b.impressions as f64 } else { 0.0 }),
    }
}

/// Figures of the whole stream over the window.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamFigures {
    /// Share of the catalogue shown at least once.
    pub coverage: f64,
    pub active_users: usize,
    pub events: u64,
    pub events_per_user: f64,
    /// Share of active users seen in more than one bucket.
    pub repeat_visit_share: f64,
    pub revenue_per_user: f64,
}

impl StreamFigures {
    pub fn of(stream: &StreamWindow, catalog_len: usize) -> Self {
        let mut impressed: FastSet<ItemIdx> = FastSet::default();
        for bucket in stream.buckets() {
            impressed.extend(bucket.impressed.iter().copied());
        }
        let users = stream.users();
        let active = users.len();
        let events: u64 = users.values().map(|(u, _)| u.events).sum();
        let revenue: f64 = users.values().map(|(u, _)| u.revenue).sum();
        let repeat = users.values().filter(|(_, buckets)| *buckets > 1).count();
        let per = |x: f64| if active > 0 { x / active as f64 } else { 0.0 };
        StreamFigures {
            coverage: impressed.len() as f64 / catalog_len.max(1) as f64,
            active_users: active,
            events,
            events_per_user: per(events as f64),
            repeat_visit_share: per(repeat as f64),
            revenue_per_user: per(revenue),
        }
    }
}

#[derive(Debug, Serialize, Clone)]
pub struct VariantReport {
    pub version: String,
    pub variant: String,
    pub impressions: u64,
    pub clicks: u64,
    pub conversions: u64,
    pub ctr: Rate,
    pub conversion_rate: Rate,
    pub revenue: f64,
    pub intra_list_diversity: f64,
    pub novelty: f64,
    /// The version's baseline CTR (its first full window), if taken.
    pub baseline_ctr: Option<f64>,
}

/// What kind of drift a breach found.
#[derive(Debug, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BreachKind {
    /// The users' behaviour moved away from the reference (item popularity, category or context mix).
    InputDrift,
    /// The serving version's CTR fell against its own baseline.
    ConceptDrift,
}

impl BreachKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BreachKind::InputDrift => "input_drift",
            BreachKind::ConceptDrift => "concept_drift",
        }
    }
}

#[derive(Debug, Serialize, Clone)]
pub struct Breach {
    pub at_ms: u64,
    pub kind: BreachKind,
    pub reason: String,
}

#[derive(Debug, Serialize, Clone)]
pub struct MonitorReport {
    pub window_secs: u64,
    pub variants: Vec<VariantReport>,
    pub coverage: f64,
    pub active_users: usize,
    pub events: u64,
    pub events_per_user: f64,
    pub repeat_visit_share: f64,
    pub revenue_per_user: f64,
    pub drift: DriftReport,
    pub breaches: Vec<Breach>,
}

/// `GET /v1/monitor`: the judged view's report (the cluster's in production, this instance's in
/// the embedded mode) and, in production, this instance's own beside it.
#[derive(Debug, Serialize, Clone)]
pub struct MonitorReply {
    #[serde(flatten)]
    pub report: MonitorReport,
    #[serde(flatten)]
    pub cluster: Option<ClusterReport>,
}

/// The production-mode part of [`MonitorReply`].
#[derive(Debug, Serialize, Clone)]
pub struct ClusterReport {
    /// This instance's id (`cluster.instance_id`).
    pub instance: String,
    /// The instances whose reports the cluster view holds (a report within the window).
    pub instances: Vec<InstanceReport>,
    /// What this instance alone counted (drift indices of its own traffic; no breaches: alarms
    /// are judged on the cluster view).
    pub local: MonitorReport,
}

/// One instance that reported to the monitor topic.
#[derive(Debug, Serialize, Clone)]
pub struct InstanceReport {
    pub id: String,
    /// When its latest report was made (its clock, ms since the epoch).
    pub last_report_ms: u64,
}

#[derive(Debug, Serialize, Clone, Default)]
pub struct DriftReport {
    pub popularity_psi: Option<f64>,
    pub category_psi: Option<f64>,
    pub context_psi: Option<f64>,
    pub ctr_z: Option<f64>,
    pub reference: Option<String>,
    pub psi_threshold: f64,
    pub z_threshold: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rare_items_are_more_novel_than_popular_ones() {
        let popularity: FastMap<ItemIdx, u64> = [(0, 90), (1, 1)].into_iter().collect();
        let popular = novelty(&[0], &popularity, 91);
        let rare = novelty(&[1], &popularity, 91);
        let unseen = novelty(&[2], &popularity, 91);
        assert!(popular < rare && rare < unseen && unseen.is_finite(), "{popular} {rare} {unseen}");
    }

    #[test]
    fn a_variant_report_divides_by_what_it_counted() {
        let t = VariantBucket { impressions: 4, clicks: 1, diversity_sum: 2.0, ..VariantBucket::default() };
        let report = variant_report("v1", "control", &t, Some(ArmTally { impressions: 50, clicks: 5 }));
        assert_eq!((report.intra_list_diversity, report.novelty, report.baseline_ctr), (0.5, 0.0, Some(0.1)));
        assert_eq!(variant_report("v1", "control", &VariantBucket::default(), None).ctr.value, 0.0);
    }
}
