//! The `[model]` section: which model serves, and how it batches.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Cooccurrence,
    Sequential,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub kind: ModelKind,
    /// Folder of trained versions (one sub-directory each).
    pub registry_dir: std::path::PathBuf,
    /// Version served at start-up with `kind = "sequential"`: a sub-directory name, or "latest".
    pub version: String,
    pub max_batch: usize,
    /// Longest a scoring request waits for a fuller batch, in microseconds (0: none).
    pub max_wait_us: u64,
    pub mailbox_capacity: usize,
    pub cooccurrence: CoocConfig,
}

/// Settings of the `[model.cooccurrence]` section: the online baseline.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoocConfig {
    /// Neighbours kept per item.
    pub neighbours: usize,
    /// Previous items paired with each new interaction.
    pub pair_window: usize,
    /// Most recent items that drive scoring.
    pub query_window: usize,
    /// Weight of popularity for users with history.
    pub popularity_weight: f32,
    /// Share of cold-start popularity taken from the request's context segment.
    pub segment_weight: f32,
    /// Half-life of all counts, in observed interactions.
    pub half_life_events: f64,
    /// How strongly negative feedback lowers similar items.
    pub negative_weight: f32,
}

impl Default for CoocConfig {
    fn default() -> Self {
        Self {
            neighbours: 100,
            pair_window: 10,
            query_window: 20,
            popularity_weight: 0.05,
            segment_weight: 0.7,
            half_life_events: 200_000.0,
            negative_weight: 1.0,
        }
    }
}
