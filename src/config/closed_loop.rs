//! The `[monitor]`, `[trainer]` and `[rollout]` sections: the closed loop.

use serde::{Deserialize, Serialize};

/// What input drift is judged against once a trained version serves everyone
/// (`monitor.drift_reference`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftReferenceKind {
    /// The first full window the promoted version served alone: like with like, since which
    /// events count as organic (not on a served list) depends on the lists the model serves.
    Serving,
    /// The recent part of the version's training window, judged from the promotion on; it also
    /// sees a change that came while the version trained, but traffic the previous model served
    /// differs from the new one's, which can read as drift.
    Training,
}

/// Settings of the `[monitor]` config section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    pub window_secs: u64,
    pub bucket_secs: u64,
    /// An event on an item of a list served this recently counts as a click on it.
    pub attribution_window_secs: u64,
    /// Input drift fires above this PSI.
    pub psi_threshold: f64,
    /// Most popular reference items used as PSI bins (the rest form one bin).
    pub psi_bins: usize,
    /// The input-drift reference after a promotion.
    pub drift_reference: DriftReferenceKind,
    /// Concept drift fires when CTR falls by at least this share of the baseline...
    pub ctr_drop: f64,
    /// ...and the drop is significant at this z.
    pub z_threshold: f64,
    /// Fewer impressions (or events) than this in a window: no drift verdict.
    pub min_samples: u64,
    /// Least time between two retraining requests.
    pub cooldown_secs: u64,
    pub mailbox_capacity: usize,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            window_secs: 300,
            bucket_secs: 10,
            attribution_window_secs: 1800,
            psi_threshold: 0.25,
            psi_bins: 50,
            drift_reference: DriftReferenceKind::Serving,
            ctr_drop: 0.2,
            z_threshold: 3.0,
            min_samples: 500,
            cooldown_secs: 600,
            mailbox_capacity: 65536,
        }
    }
}

/// Settings of the `[trainer]` config section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    /// Retrain on triggers at all (drift alarms are still reported when off).
    pub enabled: bool,
    /// Events older than this leave the retained log (and the training window).
    pub window_secs: u64,
    /// Most events retained.
    pub max_events: usize,
    /// Fewest positive events in the window to train on.
    pub min_events: usize,
    /// Fewest users with a held-out interaction for the gate to judge.
    pub min_cases: usize,
    /// After a drift alarm, wait for this many new events before training, so that the window
    /// holds the new behaviour and not only the old one (0: train at once).
    pub fresh_events: u64,
    /// Retrain every this many seconds as well (0: only on triggers).
    pub schedule_secs: u64,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Stop a run after this long, keeping its best epoch (0: no limit).
    pub time_budget_secs: f64,
    pub seed: u64,
    /// NDCG@10 the candidate must gain over the incumbent on the held-out slice.
    pub gate_min_gain: f64,
    /// Network size when there is no serving version to warm-start from.
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub max_len: usize,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window_secs: 3600,
            max_events: 500_000,
            min_events: 1000,
            min_cases: 50,
            fresh_events: 2000,
            schedule_secs: 0,
            epochs: 10,
            batch_size: 32,
            learning_rate: 2e-3,
            time_budget_secs: 600.0,
            seed: 42,
            gate_min_gain: 0.0,
            hidden: 32,
            layers: 1,
            heads: 2,
            max_len: 20,
        }
    }
}

/// Settings of the `[rollout]` config section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// Share of users a canary serves.
    pub canary_share: f64,
    /// Impressions each arm needs since the canary started before a verdict.
    pub min_impressions: u64,
    /// The canary is rolled back when its CTR is below the incumbent's at this z (one-sided).
    pub z_threshold: f64,
    /// A canary without a verdict after this long is rolled back.
    pub max_secs: u64,
    /// How often the canary is checked, in milliseconds.
    pub check_interval_ms: u64,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self { canary_share: 0.1, min_impressions: 2000, z_threshold: 2.0, max_secs: 3600, check_interval_ms: 1000 }
    }
}
