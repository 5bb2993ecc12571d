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
    /// The registry shared by every instance: "" keeps versions in `registry_dir` alone;
    /// "s3://bucket/prefix" keeps them in object storage (endpoint and credentials from the
    /// `AWS_*` environment variables), downloaded into `registry_cache_dir` to load.
    #[serde(default)]
    pub registry_url: String,
    /// With `registry_url`: the local folder of downloaded versions and of new ones before they
    /// are published. "": `registry_dir`.
    #[serde(default)]
    pub registry_cache_dir: std::path::PathBuf,
    /// With `registry_url`: a file larger than this uploads in parts of this size (MiB, at least
    /// 5, S3's smallest part).
    #[serde(default = "default_registry_part_mib")]
    pub registry_part_mib: usize,
    /// Version served at start-up with `kind = "sequential"`: a sub-directory name, or "latest".
    pub version: String,
    pub max_batch: usize,
    /// Longest a scoring request waits for a fuller batch, in microseconds (0: none).
    pub max_wait_us: u64,
    pub mailbox_capacity: usize,
    pub cooccurrence: CoocConfig,
    /// Two-stage retrieval for large catalogues.
    #[serde(default)]
    pub retrieval: RetrievalConfig,
}

fn default_registry_part_mib() -> usize {
    16
}

/// Settings of the `[model.retrieval]` section: above `min_items` catalogue items, both models
/// score a few hundred candidates per list instead of the whole catalogue (see docs/model.md,
/// "Two-stage retrieval").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrievalConfig {
    /// Catalogue size from which lists are scored over candidates only; below it every list
    /// scores the whole catalogue exactly. 0 turns two-stage retrieval on at any size.
    pub min_items: usize,
    /// Nearest neighbours of the sequential model's query vector over its item vectors.
    pub ann_candidates: usize,
    /// Co-occurrence neighbours of the user's recent items (online model).
    pub cooccurrence_candidates: usize,
    /// Most popular items in the request's context segment.
    pub popular_candidates: usize,
    /// Newest items the sequential model never saw, ranked by their content vectors.
    pub cold_candidates: usize,
    /// Lists of the ANN index scanned per query (more: better recall, slower). Fewer than
    /// `ann_candidates` matching items in them (a narrow filter) scans further lists.
    pub ann_probe: usize,
    /// Items per list of the ANN index on average (the index has items / this lists).
    pub ann_list_size: usize,
    /// Parts one batch of the sequential model's two-stage path is split into, each a run of at
    /// least 8 requests with history scored on the compute pool; 0 = one per pool thread.
    pub threads: usize,
}

impl RetrievalConfig {
    /// Whether `other` asks for the same candidates: equal but for `threads`, which only says
    /// how a batch is scored (a change of it alone rebuilds no index).
    pub fn same_candidates(&self, other: &RetrievalConfig) -> bool {
        *self == RetrievalConfig { threads: self.threads, ..other.clone() }
    }
}

impl Default for RetrievalConfig {
    fn default() -> Self {
        Self {
            min_items: 20_000,
            ann_candidates: 200,
            cooccurrence_candidates: 300,
            popular_candidates: 100,
            cold_candidates: 50,
            ann_probe: 24,
            ann_list_size: 1_000,
            threads: 0,
        }
    }
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
    /// An item no interaction touched for this many observed interactions is forgotten: its
    /// neighbour list is freed and its counts zeroed (0: never).
    #[serde(default = "default_forget_after_events")]
    pub forget_after_events: u64,
}

/// Ten half-lives of the default: a count that old weighs under 0.1 % of a fresh one.
fn default_forget_after_events() -> u64 {
    2_000_000
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
            forget_after_events: default_forget_after_events(),
        }
    }
}
