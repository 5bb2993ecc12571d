//! Recommendation models. Nothing here knows about actors or HTTP: a model takes batches of
//! requests and observations and returns scored items, on whatever thread calls it.

pub mod artifact;
pub mod cooccurrence;
pub mod data;
pub mod eval;
pub mod ivf;
pub mod metrics;
pub mod ops;
pub mod popularity;
pub mod registry;
pub mod retrain;
pub mod retrieval;
pub mod sasrec;
pub mod selection;
pub mod sequential;
pub mod sparse_ids;
pub mod train;

use std::sync::Arc;

use retrieval::CandidateCounts;

use crate::catalog::{Catalog, Categories, CategoryIdx, ItemIdx};
use crate::config::RetrievalConfig;
use crate::event::EventType;
use crate::eventlog::Interaction;

/// Fixes the number of threads candle's matrix products use, once. Unless `RAYON_NUM_THREADS`
/// is set, candle asks the system at every product, and on Linux that reads `/proc/cpuinfo`:
/// some 10 us a call, more than a small product itself (a profile of one two-stage request at
/// 10^6 items found 5 % of its time there). Sets the variable to candle's own answer, so the
/// thread counts stay what they were; a value the user set is kept.
///
/// Call it first thing in `main`, before any other thread exists: changing the environment
/// while another thread reads it is not safe on Linux.
pub fn pin_compute_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
    }
}

/// One past interaction, as models see it: a compact view of an applied `Interaction` (the
/// item by catalogue index, the value as the networks' `f32`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HistoryItem {
    pub item: ItemIdx,
    pub event_type: EventType,
    pub value: Option<f32>,
    pub timestamp: i64,
}

impl HistoryItem {
    /// The model's view of `interaction`, whose item has catalogue index `item`.
    pub fn of(interaction: &Interaction, item: ItemIdx) -> Self {
        Self {
            item,
            event_type: interaction.event_type,
            value: interaction.value.map(|v| v as f32),
            timestamp: interaction.timestamp,
        }
    }

    /// How much an interaction says about the user's taste; 0 or less for negative feedback, at
    /// most [`MAX_WEIGHT`] whatever the value (a rating of 1e9, or an old stored value that is
    /// infinite as f32, weighs like a purchase), so no one event outweighs a handful of others.
    pub fn weight(&self) -> f32 {
        let weight = match self.event_type {
            EventType::View => 1.0,
            EventType::Click => 2.0,
            EventType::AddToCart => 3.0,
            EventType::Purchase => 4.0,
            // Ratings on a 1..5 scale: 3 and above is a liking, below a weak signal.
            EventType::Rating => match self.value {
                Some(v) if v >= 3.0 => v / 1.5,
                Some(_) => 0.3,
                None => 1.0,
            },
            EventType::Dwell => 1.0 + (1.0 + self.value.unwrap_or(0.0).max(0.0)).ln() / 3.0,
            EventType::Dislike | EventType::Hide => 0.0,
        };
        // `min` and `max` drop a NaN in favour of the bound (`clamp` would keep it).
        #[allow(clippy::manual_clamp)]
        weight.min(MAX_WEIGHT).max(0.0)
    }
}

/// The most one interaction weighs (a purchase's weight).
pub const MAX_WEIGHT: f32 = 4.0;

/// What a model needs to rank items for one user.
#[derive(Clone, Debug)]
pub struct ScoreRequest {
    /// The user's recent interactions, oldest first (negative feedback included).
    pub history: Arc<[HistoryItem]>,
    /// Context segment of the request (see [`crate::event::Context::segment`]).
    pub segment: usize,
    /// Items that must not be returned (consumed, suppressed, or excluded by the caller).
    pub exclude: Vec<ItemIdx>,
    /// Items the user disliked or hid: excluded, and items similar to them are lowered.
    pub negatives: Vec<ItemIdx>,
    /// When set, only items in at least one of these categories are returned.
    pub categories: Option<Vec<CategoryIdx>>,
    /// Length of the list to return.
    pub k: usize,
}

/// An item and its score, best first in a result list.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    pub item: ItemIdx,
    pub score: f32,
}

/// New interactions of one user, for models that learn from the stream.
#[derive(Clone, Debug)]
pub struct Observation {
    /// The user's interactions before the new ones, oldest first.
    pub previous: Arc<[HistoryItem]>,
    /// The new interactions, oldest first.
    pub new: Vec<HistoryItem>,
    pub segment: usize,
}

/// A recommender as the model actor drives it: one thread at a time, whole batches.
pub trait Recommender: Send + 'static {
    /// Version reported with every list this model produced.
    fn version(&self) -> &str;
    /// Learns from new interactions (a no-op for models trained offline).
    fn observe(&mut self, observations: &[Observation]);
    /// Ranks items for each request, best first, at most `k` each.
    fn score(&mut self, requests: &[ScoreRequest], catalog: &Catalog) -> Vec<Vec<Scored>>;
    /// Adopts the `[model.retrieval]` settings (two-stage retrieval for large catalogues).
    /// Models without candidate generation ignore them.
    fn configure_retrieval(&mut self, _config: &RetrievalConfig) {}
    /// Candidates gathered per source since the last call (zero for exact scoring).
    fn take_candidate_counts(&mut self) -> CandidateCounts {
        CandidateCounts::default()
    }
    /// Up to `k` items most like `item`, most similar first, that `filter` accepts (never `item`
    /// itself). Empty from a model that cannot tell (or knows nothing of `item` yet).
    fn similar(&mut self, _item: ItemIdx, _k: usize, _filter: &ItemFilter, _catalog: &Catalog) -> Vec<Scored> {
        Vec::new()
    }
}

/// Which items a non-personal list (similar items, popular, latest) may show.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ItemFilter {
    /// When set, only items in at least one of these categories (empty: none matches).
    pub categories: Option<Vec<CategoryIdx>>,
    pub availability: Availability,
}

/// Whether a list shows items lists may show now, the others, or both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Availability {
    /// Only items lists may show (the default, as for every personal list).
    #[default]
    Available,
    /// Only items deleted, withdrawn (`available: false`) or past `expires_at`.
    Unavailable,
    /// Both.
    Any,
}

impl ItemFilter {
    /// Whether `item` passes at `now_ms`.
    pub fn accepts(&self, item: ItemIdx, categories: &Categories<'_>, now_ms: i64) -> bool {
        self.accepts_parts(categories.of(item), || categories.available_at(item, now_ms))
    }

    /// Whether an item in `categories`, available as `available` says, passes.
    pub fn accepts_parts(&self, categories: &[CategoryIdx], available: impl FnOnce() -> bool) -> bool {
        let wanted = self.categories.as_ref().is_none_or(|w| categories.iter().any(|c| w.contains(c)));
        wanted
            && match self.availability {
                Availability::Available => available(),
                Availability::Unavailable => !available(),
                Availability::Any => true,
            }
    }
}

/// Keeps freed memory in the process heap instead of returning it to the OS.
///
/// Candle allocates a fresh buffer for every tensor; at training and batched-inference sizes
/// (a few megabytes each) glibc serves them with new `mmap`s and trims freed memory, so every
/// buffer page-faults anew, which cost about a fifth of training and inference time. Call once
/// at start in processes that run the sequential model (training, evaluation, serving).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds and is safe to call at any time; a
    // failure (return 0) leaves the defaults in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Marks in `mask` (one flag per catalogue item, cleared first) every item a full scan must
/// not return for `request`: excluded, negative, unavailable at `now_ms`, or outside the
/// request's categories. The two-stage paths filter the same way through
/// [`retrieval::Filter`] while they gather candidates.
pub fn fill_mask(mask: &mut [bool], request: &ScoreRequest, categories: &Categories<'_>, now_ms: i64) {
    for (j, m) in mask.iter_mut().enumerate() {
        let j = j as ItemIdx;
        let wanted =
            request.categories.as_ref().is_none_or(|wanted| categories.of(j).iter().any(|c| wanted.contains(c)));
        *m = !wanted || !categories.available_at(j, now_ms);
    }
    for &i in request.exclude.iter().chain(&request.negatives) {
        if let Some(m) = mask.get_mut(i as usize) {
            *m = true;
        }
    }
}

/// The `k` best entries of `scores` whose mask is false, best first. Ties go to the lower index
/// so results are deterministic.
pub fn top_k(scores: &[f32], masked: &[bool], k: usize) -> Vec<Scored> {
    if k > 0 && k <= 64 && scores.len() > 16 * k {
        return top_k_small(scores, masked, k);
    }
    let mut candidates: Vec<Scored> = scores
        .iter()
        .zip(masked)
        .enumerate()
        .filter(|(_, (s, m))| !**m && s.is_finite())
        .map(|(i, (&score, _))| Scored { item: i as ItemIdx, score })
        .collect();
    let better = |a: &Scored, b: &Scored| b.score.total_cmp(&a.score).then(a.item.cmp(&b.item));
    if candidates.len() > k && k > 0 {
        candidates.select_nth_unstable_by(k - 1, better);
        candidates.truncate(k);
    }
    candidates.sort_unstable_by(better);
    candidates.truncate(k);
    candidates
}

/// [`top_k`] for a short list out of many: one pass keeping the `k` best in a sorted buffer,
/// without collecting every candidate (the common serving case: 10 out of the catalogue).
fn top_k_small(scores: &[f32], masked: &[bool], k: usize) -> Vec<Scored> {
    let mut best: Vec<Scored> = Vec::with_capacity(k + 1);
    for (i, (&score, &m)) in scores.iter().zip(masked).enumerate() {
        if m || !score.is_finite() {
            continue;
        }
        // Scanning by increasing index, an equal score never displaces an earlier item.
        if best.len() == k && score <= best[k - 1].score {
            continue;
        }
        let at = best.partition_point(|b| b.score >= score);
        best.insert(at, Scored { item: i as ItemIdx, score });
        best.truncate(k);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_skips_masked_and_orders_ties_by_index() {
        let scores = [0.5, 0.9, 0.9, 0.1, 0.7];
        let masked = [false, false, false, false, true];
        let top: Vec<_> = top_k(&scores, &masked, 3).iter().map(|s| s.item).collect();
        assert_eq!(top, vec![1, 2, 0]);
        assert!(top_k(&scores, &masked, 0).is_empty());
        assert_eq!(top_k(&scores, &masked, 10).len(), 4);
    }

    #[test]
    fn short_lists_match_the_general_path() {
        let scores: Vec<f32> = (0..500).map(|i| ((i * 37) % 101) as f32 / 7.0).collect();
        let masked: Vec<bool> = (0..500).map(|i| i % 9 == 0).collect();
        for k in [1, 3, 10, 25] {
            assert_eq!(top_k_small(&scores, &masked, k), {
                let mut all = top_k(&scores, &masked, 500);
                all.truncate(k);
                all
            });
        }
    }
}
