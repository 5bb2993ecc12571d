//! Two-stage retrieval for large catalogues: the pieces both models share.
//!
//! Above `model.retrieval.min_items` catalogue items a list is no longer scored over the whole
//! catalogue: a few hundred candidates are gathered from several sources (nearest neighbours of
//! the sequential model's query vector in an [`IvfIndex`], co-occurrence neighbours of the
//! user's recent items, the most popular items in the request's context segment, new items by
//! their content vectors), and only those are scored exactly. The request's filters apply while
//! candidates are gathered ([`Filter`]), so a narrow category filter widens the search instead
//! of emptying the list.
//!
//! ## The ANN index: an inverted file, not a graph
//! [`IvfIndex`] (`super::ivf`) clusters item vectors with k-means (about `ann_list_size` items
//! a list) and answers a query by scanning the lists whose centroids score highest. It was
//! chosen over the HNSW crates measured in `load-tests/ann-bench` (docs/performance.md,
//! "Choosing an ANN index"): the graphs needed 2.6 to 11 ms a query for recall 0.95 at 10^5
//! items and 5 to 8 minutes to build; the inverted file builds in 9 to 16 s at 10^6 items (one
//! matrix product assigns the items), costs about `ann_probe x ann_list_size` multiply-adds per
//! query, takes new items without a rebuild and filters while it scans, with no new dependency.

pub use super::ivf::{dot, prefetch, IvfIndex};
use crate::catalog::{Categories, CategoryIdx, ItemIdx};

/// Where a candidate came from (the `source` label of `liverec_model_candidates_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Nearest neighbours of the sequential model's query vector.
    Ann,
    /// Co-occurrence neighbours of the user's recent items (online model).
    Cooccurrence,
    /// Most popular in the request's context segment.
    Popular,
    /// Items the sequential model never saw, by content.
    Cold,
}

impl Source {
    pub const ALL: [Source; 4] = [Source::Ann, Source::Cooccurrence, Source::Popular, Source::Cold];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Ann => "ann",
            Source::Cooccurrence => "cooccurrence",
            Source::Popular => "popular",
            Source::Cold => "cold",
        }
    }
}

/// Candidates gathered, by source, since the counts were last taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CandidateCounts {
    counts: [u64; 4],
}

impl CandidateCounts {
    pub fn add(&mut self, source: Source, n: usize) {
        self.counts[source as usize] += n as u64;
    }

    pub fn get(&self, source: Source) -> u64 {
        self.counts[source as usize]
    }

    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|&c| c == 0)
    }

    /// Adds another part's counts (a batch scored on several threads).
    pub fn merge(&mut self, other: &CandidateCounts) {
        self.counts.iter_mut().zip(&other.counts).for_each(|(a, b)| *a += b);
    }
}

/// A bit per catalogue item, reused across requests: set bits are cleared one by one.
#[derive(Default)]
pub struct Bits(Vec<u64>);

impl Bits {
    pub fn set(&mut self, i: ItemIdx) {
        let word = i as usize / 64;
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << (i % 64);
    }

    pub fn clear(&mut self, i: ItemIdx) {
        if let Some(w) = self.0.get_mut(i as usize / 64) {
            *w &= !(1 << (i % 64));
        }
    }

    pub fn get(&self, i: ItemIdx) -> bool {
        self.0.get(i as usize / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// What a list may hold: not excluded (history, the caller's `exclude`, negatives), available
/// now, and in one of the wanted categories when the request names some.
pub struct Filter<'a> {
    pub blocked: &'a Bits,
    pub categories: Option<&'a [CategoryIdx]>,
    pub view: &'a Categories<'a>,
    pub now_ms: i64,
    /// Items the catalogue holds (indices past it are ignored).
    pub items: usize,
}

impl Filter<'_> {
    pub fn accepts(&self, item: ItemIdx) -> bool {
        (item as usize) < self.items
            && !self.blocked.get(item)
            && self.view.available_at(item, self.now_ms)
            && self.categories.is_none_or(|wanted| self.view.of(item).iter().any(|c| wanted.contains(c)))
    }
}

/// Distinct candidates of one request, in the order they were gathered.
#[derive(Default)]
pub struct CandidateSet {
    seen: Bits,
    pub items: Vec<ItemIdx>,
}

impl CandidateSet {
    /// Adds `item` unless it is already a candidate; true if it was added.
    pub fn insert(&mut self, item: ItemIdx) -> bool {
        if self.seen.get(item) {
            return false;
        }
        self.seen.set(item);
        self.items.push(item);
        true
    }

    pub fn contains(&self, item: ItemIdx) -> bool {
        self.seen.get(item)
    }

    /// Empties the set, in time proportional to its size.
    pub fn clear(&mut self) {
        for &i in &self.items {
            self.seen.clear(i);
        }
        self.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_sets_and_bits_clear_what_they_set() {
        let mut set = CandidateSet::default();
        assert!(set.insert(700) && set.insert(3) && !set.insert(700));
        assert_eq!(set.items, [700, 3]);
        set.clear();
        assert!(!set.contains(700) && set.items.is_empty());
        assert!(set.insert(700));
        assert_eq!(dot(&[1.0; 11], &[2.0; 11]), 22.0);
    }
}
