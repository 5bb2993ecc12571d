//! The online baseline: item-to-item co-occurrence over recent sessions, blended with popularity
//! by context segment, learned from the event stream as it arrives.
//!
//! Counts fade with a half-life measured in events, using the usual growing-increment trick: each
//! new observation adds `boost` (which doubles every `half_life_events`) instead of decaying every
//! count; when `boost` gets large, everything is rescaled at once. Neighbour lists are pruned to the
//! strongest `neighbours` entries whenever they grow past twice that, so scoring costs at most
//! `query_window * 2 * neighbours` additions plus one pass over the catalogue.
//!
//! One user is one vote per item: an event weighs at most [`super::MAX_WEIGHT`], and an item
//! already in the user's recent history adds only what the new event weighs beyond the strongest
//! earlier one (a view then a purchase counts as a purchase; a thousand ratings as one) and no
//! new pairs. So one user's events can neither make an item everyone's top nor, by fading the
//! counts, flatten everyone else's.

use std::collections::HashMap;

use super::retrieval::{Bits, CandidateCounts, CandidateSet, Filter, Source};
use super::{fill_mask, top_k, HistoryItem, ItemFilter, Observation, Recommender, ScoreRequest, Scored};
use crate::catalog::{Catalog, Categories, CategoryIdx, ItemIdx};
use crate::config::{CoocConfig, RetrievalConfig};
use crate::event::Context;

/// Rescale all counts once the increment passes this, to stay far from f32 overflow.
const RESCALE_AT: f32 = 1e12;
/// Recency discount per step back in the user's history.
const RECENCY: f32 = 0.85;

pub struct CoocModel {
    config: CoocConfig,
    version: String,
    /// Current increment; grows so that older counts weigh less.
    boost: f32,
    /// Per-event growth factor of `boost`.
    growth: f32,
    /// Global popularity (weighted, faded counts) by item.
    popularity: Vec<f32>,
    /// Popularity by context segment, `[segment][item]`.
    segment_popularity: Vec<Vec<f32>>,
    /// Co-occurrence weights: `neighbours[i][j]`.
    neighbours: Vec<HashMap<ItemIdx, f32>>,
    /// Reused per request: dense scores and mask over the catalogue.
    scratch_scores: Vec<f32>,
    scratch_mask: Vec<bool>,
    /// Two-stage retrieval settings (above `min_items`, lists are scored over candidates).
    retrieval: RetrievalConfig,
    /// The most popular items globally and per segment, kept as counts change: the popular
    /// source of two-stage scoring, and the maxima popularity is normalised by.
    top_global: TopList,
    top_segment: Vec<TopList>,
    /// Reused by two-stage scoring: co-occurrence scores (zero but where `touched` says),
    /// excluded items, candidates.
    sparse_scores: Vec<f32>,
    touched: Vec<ItemIdx>,
    blocked: Bits,
    candidates: CandidateSet,
    candidate_counts: CandidateCounts,
    /// Interactions observed (the clock `forget_after_events` counts in).
    clock: u64,
    /// When each item was last touched by an interaction, in [`TOUCH_TICK`]s of `clock`.
    touched_at: Vec<u32>,
    /// The next item the sweep for idle items looks at (see [`CoocModel::forget_idle`]).
    sweep_next: usize,
    /// Items forgotten since the model started.
    forgotten: u64,
}

/// The resolution of `touched_at`: 4 bytes an item last 2^32 ticks (10^12 events at 256).
const TOUCH_TICK: u64 = 256;

/// The `cap` largest values of a table whose entries only grow (the counts fade by growing
/// the increment, not by shrinking them; a rescale shrinks all at once and keeps the order), so
/// the list stays exact: an item that leaves it can only come back by growing, which updates it.
#[derive(Clone, Debug, Default)]
struct TopList {
    cap: usize,
    /// Best first.
    entries: Vec<(ItemIdx, f32)>,
}

impl TopList {
    fn new(cap: usize, values: &[f32]) -> Self {
        let mut list = TopList { cap, entries: Vec::new() };
        for (i, &v) in values.iter().enumerate() {
            if v > 0.0 {
                list.update(i as ItemIdx, v);
            }
        }
        list
    }

    /// Records that `item`'s value is now `value` (never less than before).
    fn update(&mut self, item: ItemIdx, value: f32) {
        if let Some(at) = self.entries.iter().position(|e| e.0 == item) {
            self.entries.remove(at);
        } else if self.entries.len() >= self.cap && self.entries.last().is_some_and(|e| e.1 >= value) {
            return;
        }
        let at = self.entries.partition_point(|e| e.1 >= value);
        self.entries.insert(at, (item, value));
        self.entries.truncate(self.cap);
    }

    fn max(&self) -> f32 {
        self.entries.first().map_or(0.0, |e| e.1)
    }
}

impl CoocModel {
    pub fn new(config: CoocConfig) -> Self {
        let growth = (std::f64::consts::LN_2 / config.half_life_events.max(1.0)).exp() as f32;
        Self {
            config,
            version: "cooccurrence-online-1".to_owned(),
            boost: 1.0,
            growth,
            popularity: Vec::new(),
            segment_popularity: vec![Vec::new(); Context::SEGMENTS],
            neighbours: Vec::new(),
            scratch_scores: Vec::new(),
            scratch_mask: Vec::new(),
            retrieval: RetrievalConfig::default(),
            top_global: TopList { cap: top_cap(&RetrievalConfig::default()), entries: Vec::new() },
            top_segment: vec![
                TopList { cap: top_cap(&RetrievalConfig::default()), entries: Vec::new() };
                Context::SEGMENTS
            ],
            sparse_scores: Vec::new(),
            touched: Vec::new(),
            blocked: Bits::default(),
            candidates: CandidateSet::default(),
            candidate_counts: CandidateCounts::default(),
            clock: 0,
            touched_at: Vec::new(),
            sweep_next: 0,
            forgotten: 0,
        }
    }

    fn grow_to(&mut self, n: usize) {
        if self.popularity.len() < n {
            self.popularity.resize(n, 0.0);
            self.neighbours.resize_with(n, HashMap::new);
            self.touched_at.resize(n, (self.clock / TOUCH_TICK) as u32);
            for seg in &mut self.segment_popularity {
                seg.resize(n, 0.0);
            }
        }
    }

    fn rescale(&mut self) {
        let factor = 1.0 / self.boost;
        self.popularity.iter_mut().for_each(|p| *p *= factor);
        for seg in &mut self.segment_popularity {
            seg.iter_mut().for_each(|p| *p *= factor);
        }
        for list in &mut self.neighbours {
            list.values_mut().for_each(|w| *w *= factor);
        }
        for top in std::iter::once(&mut self.top_global).chain(&mut self.top_segment) {
            top.entries.iter_mut().for_each(|e| e.1 *= factor);
        }
        self.boost = 1.0;
    }

    fn add_pair(&mut self, a: ItemIdx, b: ItemIdx, weight: f32) {
        let limit = self.config.neighbours.max(1);
        for (from, to) in [(a, b), (b, a)] {
            let list = &mut self.neighbours[from as usize];
            *list.entry(to).or_insert(0.0) += weight;
            if list.len() > 2 * limit {
                let mut entries: Vec<(ItemIdx, f32)> = list.drain().collect();
                entries.sort_unstable_by(|x, y| y.1.total_cmp(&x.1));
                entries.truncate(limit);
                list.extend(entries);
            }
        }
    }

    fn observe_one(&mut self, previous: &[HistoryItem], new: &HistoryItem, segment: usize) {
        self.touched_at[new.item as usize] = (self.clock / TOUCH_TICK) as u32;
        let before = previous.iter().filter(|h| h.item == new.item).map(HistoryItem::weight).fold(0.0f32, f32::max);
        let repeat = before > 0.0;
        let weight = new.weight() - before;
        if weight <= 0.0 {
            // A repeat adds nothing, and does not age everyone else's counts either.
            return;
        }
        let boost = self.boost;
        self.popularity[new.item as usize] += boost * weight;
        self.top_global.update(new.item, self.popularity[new.item as usize]);
        if let Some(seg) = self.segment_popularity.get_mut(segment) {
            seg[new.item as usize] += boost * weight;
            self.top_segment[segment].update(new.item, seg[new.item as usize]);
        }
        if repeat {
            self.age();
            return;
        }
        let partners: Vec<(usize, ItemIdx)> = previous
            .iter()
            .rev()
            .filter(|h| h.weight() > 0.0 && h.item != new.item)
            .take(self.config.pair_window)
            .map(|h| h.item)
            .enumerate()
            .collect();
        for (distance, partner) in partners {
            self.add_pair(partner, new.item, boost / (1.0 + distance as f32).sqrt());
        }
        self.age();
    }

    /// One event later: older counts weigh a little less.
    fn age(&mut self) {
        self.clock += 1;
        self.boost *= self.growth;
        if self.boost > RESCALE_AT {
            self.rescale();
        }
    }

    /// Forgets items no interaction touched for `forget_after_events`: frees the neighbour list,
    /// zeroes the counts and takes the item off the popular lists, so the memory of items that
    /// left the stream goes back. Links to it from other items' lists stay until those are
    /// pruned, and weigh nothing (similarity is normalised by its popularity, now zero). Swept
    /// a slice at a time: each call looks at as many items as make the whole catalogue once
    /// every quarter of `forget_after_events`, so its cost per event is O(1).
    fn forget_idle(&mut self, events: u64) {
        let after = self.config.forget_after_events;
        let n = self.neighbours.len();
        if after == 0 || n == 0 {
            return;
        }
        let slice = ((n as u64 * events * 4).div_ceil(after) as usize).clamp(1, n);
        let now = self.clock / TOUCH_TICK;
        let idle_ticks = after.div_ceil(TOUCH_TICK);
        let mut dropped = Vec::new();
        for _ in 0..slice {
            let i = self.sweep_next;
            self.sweep_next = (i + 1) % n;
            let idle = now.saturating_sub(u64::from(self.touched_at[i])) >= idle_ticks;
            if idle && (self.popularity[i] != 0.0 || self.neighbours[i].capacity() > 0) {
                self.neighbours[i] = HashMap::new();
                self.popularity[i] = 0.0;
                for seg in &mut self.segment_popularity {
                    seg[i] = 0.0;
                }
                dropped.push(i as ItemIdx);
            }
        }
        if !dropped.is_empty() {
            // The popular lists lose them; an item below them joins when its count next grows.
            for top in std::iter::once(&mut self.top_global).chain(&mut self.top_segment) {
                top.entries.retain(|(item, _)| !dropped.contains(item));
            }
            self.forgotten += dropped.len() as u64;
            tracing::debug!(items = dropped.len(), total = self.forgotten, "idle items forgotten by the online model");
        }
    }

    /// Similarity of `a` and `b` from co-occurrence, cosine-normalised by popularity.
    fn similarity(&self, a: ItemIdx, weight: f32, b: ItemIdx) -> f32 {
        let norm = (self.popularity[a as usize] * self.popularity[b as usize]).sqrt();
        if norm > 0.0 {
            weight / norm
        } else {
            0.0
        }
    }

    /// Adds to `scores` the co-occurrence with the user's most recent distinct positive items,
    /// newest weighing most; `first_touch` sees each item whose score leaves 0. Returns those
    /// query items, newest first.
    fn add_cooccurring(
        &self,
        history: &[HistoryItem],
        scores: &mut [f32],
        mut first_touch: impl FnMut(ItemIdx),
    ) -> Vec<ItemIdx> {
        let n = scores.len();
        let mut seen_query: Vec<ItemIdx> = Vec::with_capacity(self.config.query_window);
        let mut recency = 1.0f32;
        for h in history.iter().rev() {
            if seen_query.len() >= self.config.query_window {
                break;
            }
            let w = h.weight();
            if w <= 0.0 || seen_query.contains(&h.item) || h.item as usize >= n {
                continue;
            }
            seen_query.push(h.item);
            for (&j, &c) in &self.neighbours[h.item as usize] {
                if scores[j as usize] == 0.0 {
                    first_touch(j);
                }
                scores[j as usize] += recency * w * self.similarity(h.item, c, j);
            }
            recency *= RECENCY;
        }
        seen_query
    }

    /// Two-stage scoring (docs/model.md, "Two-stage retrieval"): the same scores as
    /// [`Self::score_one`], for the neighbours of the user's recent items and the most popular
    /// items only, filtered as they are gathered. `None` when they cannot fill the list (a
    /// narrow filter): the caller then scans the catalogue.
    fn score_candidates(&mut self, request: &ScoreRequest, categories: &Categories<'_>) -> Option<Vec<Scored>> {
        let n = self.popularity.len();
        let mut scores = std::mem::take(&mut self.sparse_scores);
        scores.resize(n, 0.0);
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();

        let seen_query = self.add_cooccurring(&request.history, &mut scores, |j| touched.push(j));
        // Every item outside `touched` scores 0 here: the maximum over the catalogue.
        let max_co = touched.iter().map(|&j| scores[j as usize]).fold(0.0f32, f32::max);

        for &i in request.exclude.iter().chain(&request.negatives) {
            self.blocked.set(i);
        }
        let now_ms = crate::event::now_ms();
        let filter = Filter {
            blocked: &self.blocked,
            categories: request.categories.as_deref(),
            view: categories,
            now_ms,
            items: n,
        };
        let candidates = &mut self.candidates;
        candidates.clear();
        // The strongest co-occurring items that pass the filter.
        let mut neighbours: Vec<ItemIdx> = touched.iter().copied().filter(|&j| filter.accepts(j)).collect();
        let limit = self.retrieval.cooccurrence_candidates;
        let stronger = |a: &ItemIdx, b: &ItemIdx| scores[*b as usize].total_cmp(&scores[*a as usize]).then(a.cmp(b));
        if neighbours.len() > limit && limit > 0 {
            neighbours.select_nth_unstable_by(limit - 1, stronger);
        }
        neighbours.truncate(limit);
        for &j in &neighbours {
            candidates.insert(j);
        }
        self.candidate_counts.add(Source::Cooccurrence, candidates.items.len());
        // The most popular in the segment, then globally.
        let segment_top = self.top_segment.get(request.segment);
        let mut added = 0;
        for &(j, _) in segment_top.map_or(&[][..], |t| t.entries.as_slice()).iter().chain(&self.top_global.entries) {
            if added >= self.retrieval.popular_candidates && candidates.items.len() >= request.k {
                break;
            }
            if filter.accepts(j) && candidates.insert(j) {
                added += 1;
            }
        }
        self.candidate_counts.add(Source::Popular, added);
        for &i in request.exclude.iter().chain(&request.negatives) {
            self.blocked.clear(i);
        }

        // The blend of `score_one`, over the candidates.
        let global_max = self.top_global.max();
        let segment = self.segment_popularity.get(request.segment);
        let segment_max = segment_top.map_or(0.0, TopList::max);
        let sw = if segment_max > 0.0 { self.config.segment_weight } else { 0.0 };
        let pop_weight = if seen_query.is_empty() { 1.0 } else { self.config.popularity_weight };
        let mut scored: Vec<Scored> = candidates
            .items
            .iter()
            .map(|&j| {
                let mut s = if max_co > 0.0 { scores[j as usize] / max_co } else { scores[j as usize] };
                if global_max > 0.0 {
                    let seg = segment.map_or(0.0, |seg| seg[j as usize] / segment_max.max(f32::MIN_POSITIVE));
                    s += pop_weight * (sw * seg + (1.0 - sw) * self.popularity[j as usize] / global_max);
                }
                Scored { item: j, score: s }
            })
            .collect();
        for &j in &touched {
            scores[j as usize] = 0.0;
        }
        self.sparse_scores = scores;
        self.touched = touched;

        if !request.negatives.is_empty() {
            let mut negative_categories: Vec<CategoryIdx> = Vec::new();
            for &neg in &request.negatives {
                if (neg as usize) < n {
                    let list = &self.neighbours[neg as usize];
                    for s in scored.iter_mut() {
                        if let Some(&c) = list.get(&s.item) {
                            s.score -= self.config.negative_weight * self.similarity(neg, c, s.item);
                        }
                    }
                }
                negative_categories.extend_from_slice(categories.of(neg));
            }
            if !negative_categories.is_empty() {
                for s in scored.iter_mut() {
                    let cats = categories.of(s.item);
                    let overlap = cats.iter().filter(|c| negative_categories.contains(c)).count();
                    if overlap > 0 {
                        let share = overlap as f32 / cats.len() as f32;
                        s.score -= self.config.negative_weight * 0.5 * share * s.score.abs().max(0.1);
                    }
                }
            }
        }
        scored.retain(|s| s.score.is_finite());
        if scored.len() < request.k {
            return None;
        }
        scored.sort_unstable_by(|a, b| b.score.total_cmp(&a.score).then(a.item.cmp(&b.item)));
        scored.truncate(request.k);
        Some(scored)
    }

    fn score_one(&mut self, request: &ScoreRequest, categories: &Categories<'_>) -> Vec<Scored> {
        let n = self.popularity.len();
        let mut scores = std::mem::take(&mut self.scratch_scores);
        let mut mask = std::mem::take(&mut self.scratch_mask);
        scores.clear();
        scores.resize(n, 0.0);
        mask.clear();
        mask.resize(n, false);

        let seen_query = self.add_cooccurring(&request.history, &mut scores, |_| {});
        let max_co = scores.iter().copied().fold(0.0f32, f32::max);
        if max_co > 0.0 {
            scores.iter_mut().for_each(|s| *s /= max_co);
        }

        // Popularity: the request's context segment blended with the global counts.
        let global_max = self.popularity.iter().copied().fold(0.0f32, f32::max);
        let segment = self.segment_popularity.get(request.segment);
        let segment_max = segment.map_or(0.0, |s| s.iter().copied().fold(0.0f32, f32::max));
        let sw = if segment_max > 0.0 { self.config.segment_weight } else { 0.0 };
        let pop_weight = if seen_query.is_empty() { 1.0 } else { self.config.popularity_weight };
        if global_max > 0.0 {
            for (j, s) in scores.iter_mut().enumerate() {
                let seg = segment.map_or(0.0, |seg| seg[j] / segment_max.max(f32::MIN_POSITIVE));
                let pop = sw * seg + (1.0 - sw) * self.popularity[j] / global_max;
                *s += pop_weight * pop;
            }
        }

        // Negative feedback lowers co-occurring items and items of the same categories.
        if !request.negatives.is_empty() {
            let mut negative_categories: Vec<CategoryIdx> = Vec::new();
            for &neg in &request.negatives {
                if (neg as usize) < n {
                    for (&j, &c) in &self.neighbours[neg as usize] {
                        scores[j as usize] -= self.config.negative_weight * self.similarity(neg, c, j);
                    }
                }
                negative_categories.extend_from_slice(categories.of(neg));
            }
            if !negative_categories.is_empty() {
                for (j, s) in scores.iter_mut().enumerate() {
                    let cats = categories.of(j as ItemIdx);
                    if cats.is_empty() {
                        continue;
                    }
                    let overlap = cats.iter().filter(|c| negative_categories.contains(c)).count();
                    if overlap > 0 {
                        let share = overlap as f32 / cats.len() as f32;
                        *s -= self.config.negative_weight * 0.5 * share * s.abs().max(0.1);
                    }
                }
            }
        }

        fill_mask(&mut mask, request, categories, crate::event::now_ms());
        let result = top_k(&scores, &mask, request.k);
        self.scratch_scores = scores;
        self.scratch_mask = mask;
        result
    }
}

impl Recommender for CoocModel {
    fn version(&self) -> &str {
        &self.version
    }

    fn observe(&mut self, observations: &[Observation]) {
        let max_item = observations
            .iter()
            .flat_map(|o| o.previous.iter().chain(&o.new))
            .map(|h| h.item as usize + 1)
            .max()
            .unwrap_or(0);
        self.grow_to(max_item);
        let before = self.clock;
        for obs in observations {
            let mut previous: Vec<HistoryItem> = obs.previous.to_vec();
            for new in &obs.new {
                self.observe_one(&previous, new, obs.segment);
                previous.push(*new);
            }
        }
        self.forget_idle(self.clock - before);
    }

    /// The item's co-occurrence neighbours, by the cosine-normalised weight scoring uses: items
    /// that users took up near this one, lately (the counts fade as events arrive).
    fn similar(&mut self, item: ItemIdx, k: usize, filter: &ItemFilter, catalog: &Catalog) -> Vec<Scored> {
        let Some(list) = self.neighbours.get(item as usize) else { return Vec::new() };
        let categories = catalog.categories();
        let now_ms = crate::event::now_ms();
        let mut scored: Vec<Scored> = list
            .iter()
            .filter(|(&j, _)| j != item && filter.accepts(j, &categories, now_ms))
            .map(|(&j, &c)| Scored { item: j, score: self.similarity(item, c, j) })
            .filter(|s| s.score > 0.0 && s.score.is_finite())
            .collect();
        scored.sort_unstable_by(|a, b| b.score.total_cmp(&a.score).then(a.item.cmp(&b.item)));
        scored.truncate(k);
        scored
    }

    fn score(&mut self, requests: &[ScoreRequest], catalog: &Catalog) -> Vec<Vec<Scored>> {
        self.grow_to(catalog.len());
        let categories = catalog.categories();
        let two_stage = self.popularity.len() >= self.retrieval.min_items;
        requests
            .iter()
            .map(|r| {
                if two_stage {
                    if let Some(list) = self.score_candidates(r, &categories) {
                        return list;
                    }
                }
                self.score_one(r, &categories)
            })
            .collect()
    }

    fn configure_retrieval(&mut self, config: &RetrievalConfig) {
        let same = self.retrieval.same_candidates(config);
        self.retrieval = config.clone();
        if same {
            return;
        }
        let cap = top_cap(config);
        self.top_global = TopList::new(cap, &self.popularity);
        self.top_segment = self.segment_popularity.iter().map(|seg| TopList::new(cap, seg)).collect();
    }

    fn take_candidate_counts(&mut self) -> CandidateCounts {
        std::mem::take(&mut self.candidate_counts)
    }
}

/// Entries kept in each most-popular list: enough for the popular source after a filter.
fn top_cap(config: &RetrievalConfig) -> usize {
    (config.popular_candidates * 4).max(400)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, ItemId};
    use std::sync::Arc;

    fn h(item: ItemIdx, event_type: EventType) -> HistoryItem {
        HistoryItem { item, event_type, value: None, timestamp: 0 }
    }

    fn catalog(n: usize) -> Catalog {
        let catalog = Catalog::new();
        for i in 0..n {
            catalog.intern(&ItemId::from(format!("i{i}").as_str()));
        }
        catalog
    }

    fn request(history: Vec<HistoryItem>, k: usize) -> ScoreRequest {
        let exclude = history.iter().map(|h| h.item).collect();
        ScoreRequest { history: history.into(), segment: 0, exclude, negatives: vec![], categories: None, k }
    }

    /// Many users view 0 then 1; item 2 is popular on its own.
    fn trained(catalog: &Catalog) -> CoocModel {
        let mut model = CoocModel::new(CoocConfig::default());
        let mut observations = Vec::new();
        for _ in 0..20 {
            observations.push(Observation {
                previous: Arc::from(vec![]),
                new: vec![h(0, EventType::View), h(1, EventType::View)],
                segment: 0,
            });
        }
        for _ in 0..50 {
            observations.push(Observation {
                previous: Arc::from(vec![]),
                new: vec![h(2, EventType::View)],
                segment: 0,
            });
        }
        model.observe(&observations);
        model.grow_to(catalog.len());
        model
    }

    /// Items 0 and 1 viewed together, then only items 2 and 3 for longer than
    /// `forget_after_events`: 0 and 1 are forgotten (memory freed, no longer neighbours or
    /// popular), 2 and 3 are kept, and 0 comes back when touched again.
    #[test]
    fn items_idle_past_the_limit_are_forgotten_and_active_ones_kept() {
        let catalog = catalog(4);
        let after = 4 * TOUCH_TICK;
        let mut model = CoocModel::new(CoocConfig { forget_after_events: after, ..CoocConfig::default() });
        let pair = |a, b| Observation {
            previous: Arc::from(vec![]),
            new: vec![h(a, EventType::View), h(b, EventType::View)],
            segment: 0,
        };
        model.observe(&vec![pair(0, 1); 10]);
        model.grow_to(catalog.len());
        assert!(model.neighbours[0].contains_key(&1) && model.popularity[0] > 0.0);
        let fresh = model.score(&[request(vec![h(0, EventType::View)], 1)], &catalog);
        assert_eq!(fresh[0][0].item, 1, "1 is 0's neighbour while both are active");
        // Twice the limit of other traffic, in batches as the model actor sends them.
        for _ in 0..(2 * after / 64) {
            model.observe(&vec![pair(2, 3); 32]);
        }
        for forgotten in [0, 1] {
            let at = forgotten as usize;
            assert_eq!(model.neighbours[at].capacity(), 0, "item {forgotten}'s list is freed");
            assert_eq!(model.popularity[at], 0.0);
            assert!(model.segment_popularity.iter().all(|seg| seg[at] == 0.0));
            assert!(model.top_global.entries.iter().all(|(i, _)| *i != forgotten));
        }
        assert_eq!(model.forgotten, 2);
        for kept in [2, 3] {
            let at = kept as usize;
            assert!(model.neighbours[at].contains_key(&(5 - kept)) && model.popularity[at] > 0.0, "{kept} kept");
        }
        let idle = model.score(&[request(vec![h(0, EventType::View)], 1)], &catalog);
        assert_ne!(idle[0][0].item, 1, "a forgotten item is no one's neighbour");
        model.observe(&[pair(0, 2)]);
        assert!(model.popularity[0] > 0.0 && model.neighbours[0].contains_key(&2), "0 starts afresh");
    }

    #[test]
    fn similar_items_are_neighbours_filtered_and_never_the_item_itself() {
        let catalog = catalog(4);
        let mut model = trained(&catalog);
        let all = super::super::ItemFilter::default();
        let similar = model.similar(0, 5, &all, &catalog);
        assert_eq!(similar.iter().map(|s| s.item).collect::<Vec<_>>(), vec![1], "only what co-occurred with 0");
        assert!(model.similar(2, 5, &all, &catalog).is_empty(), "2 was only ever seen alone");
        catalog
            .put(&ItemId::from("i1"), crate::catalog::ItemAttributes { available: Some(false), ..Default::default() });
        assert!(model.similar(0, 5, &all, &catalog).is_empty(), "an unavailable item is left out");
        let any = super::super::ItemFilter { availability: super::super::Availability::Any, ..all };
        assert_eq!(model.similar(0, 5, &any, &catalog).len(), 1);
    }

    #[test]
    fn co_occurring_items_beat_popular_ones() {
        let catalog = catalog(4);
        let mut model = trained(&catalog);
        let out = model.score(&[request(vec![h(0, EventType::Click)], 2)], &catalog);
        assert_eq!(out[0][0].item, 1);
        assert_eq!(out[0][1].item, 2);
        assert!(out[0].iter().all(|s| s.item != 0), "consumed item excluded");
    }

    #[test]
    fn new_users_get_popularity_and_negatives_lower_neighbours() {
        let catalog = catalog(4);
        let mut model = trained(&catalog);
        let cold = model.score(&[request(vec![], 1)], &catalog);
        assert_eq!(cold[0][0].item, 2);

        let mut req = request(vec![h(0, EventType::Click)], 3);
        let before = model.score(&[req.clone()], &catalog)[0].clone();
        let score_of = |list: &[Scored], item| list.iter().find(|s| s.item == item).map(|s| s.score);
        req.negatives = vec![1];
        let after = model.score(&[req], &catalog)[0].clone();
        assert!(score_of(&after, 1).is_none(), "disliked item suppressed");
        assert!(score_of(&before, 1).is_some());
    }

    #[test]
    fn counts_fade_and_rescale_without_losing_order() {
        let catalog = catalog(3);
        let mut model = CoocModel::new(CoocConfig { half_life_events: 1.0, ..CoocConfig::default() });
        let obs = |item| Observation { previous: Arc::from(vec![]), new: vec![h(item, EventType::View)], segment: 0 };
        // Item 0 was popular long ago; item 1 recently. 60 half-lives force several rescales.
        let mut batch: Vec<Observation> = (0..30).map(|_| obs(0)).collect();
        batch.extend((0..30).map(|_| obs(1)));
        model.observe(&batch);
        assert!(model.boost <= RESCALE_AT);
        let out = model.score(&[request(vec![], 1)], &catalog);
        assert_eq!(out[0][0].item, 1);
    }

    #[test]
    fn neighbour_lists_stay_bounded() {
        let catalog = catalog(50);
        let mut model = CoocModel::new(CoocConfig { neighbours: 4, ..CoocConfig::default() });
        let batch: Vec<Observation> = (1..50)
            .map(|i| Observation {
                previous: Arc::from(vec![]),
                new: vec![h(0, EventType::View), h(i, EventType::View)],
                segment: 0,
            })
            .collect();
        model.observe(&batch);
        assert!(model.neighbours[0].len() <= 8);
        assert_eq!(model.score(&[request(vec![], 5)], &catalog)[0].len(), 5);
    }

    /// One user rating an item at the top of the scale a thousand times (and once with a value
    /// that is infinite as f32) counts as one vote: an item five other users viewed stays first
    /// for a new visitor, and every score stays finite and positive.
    #[test]
    fn one_user_cannot_make_an_item_everyones_top() {
        let catalog = catalog(3);
        let mut model = CoocModel::new(CoocConfig::default());
        let mut observations: Vec<Observation> = (0..5)
            .map(|_| Observation { previous: Arc::from(vec![]), new: vec![h(1, EventType::View)], segment: 0 })
            .collect();
        observations.push(Observation { previous: Arc::from(vec![]), new: vec![h(2, EventType::View)], segment: 0 });
        let rating = |value: f32| HistoryItem { value: Some(value), ..h(0, EventType::Rating) };
        let mut spam: Vec<HistoryItem> = (0..1000).map(|_| rating(5.0)).collect();
        spam.push(rating(f32::INFINITY));
        observations.push(Observation { previous: Arc::from(vec![]), new: spam, segment: 0 });
        model.observe(&observations);
        let cold = model.score(&[request(vec![], 3)], &catalog);
        assert_eq!(cold[0][0].item, 1, "{:?}", cold[0]);
        assert!(cold[0].iter().all(|s| s.score.is_finite() && s.score > 0.0), "{:?}", cold[0]);
        assert!(model.popularity.iter().all(|p| p.is_finite()));
    }

    /// A catalogue of `n` items, every 10th in category "rare", the rest in "common"; a model
    /// that saw users walk through neighbouring items.
    fn walked(n: usize, retrieval: &RetrievalConfig) -> (Catalog, CoocModel) {
        let catalog = Catalog::new();
        for i in 0..n {
            let category = if i % 10 == 4 { "rare" } else { "common" };
            let attrs = crate::catalog::ItemAttributes { categories: vec![category.into()], ..Default::default() };
            catalog.put(&ItemId::from(format!("i{i}").as_str()), attrs);
        }
        let mut model = CoocModel::new(CoocConfig::default());
        model.configure_retrieval(retrieval);
        let observations: Vec<Observation> = (0..3 * n)
            .map(|u| {
                let start = (u * 7) % n;
                let new =
                    (0..1 + u % 5).map(|s| h(((start + s * (1 + u % 3)) % n) as ItemIdx, EventType::View)).collect();
                Observation { previous: Arc::from(vec![]), new, segment: u % 4 }
            })
            .collect();
        model.observe(&observations);
        (catalog, model)
    }

    fn forced(candidates: usize) -> RetrievalConfig {
        RetrievalConfig {
            min_items: 0,
            cooccurrence_candidates: candidates,
            popular_candidates: candidates,
            ..RetrievalConfig::default()
        }
    }

    #[test]
    fn two_stage_top_10_equals_exact_top_10_on_a_small_catalogue() {
        let n = 120;
        let (catalog, mut exact) = walked(n, &RetrievalConfig::default());
        // Candidate lists as long as the catalogue: two-stage must agree exactly.
        let (_, mut two_stage) = walked(n, &forced(n));
        let mut requests: Vec<ScoreRequest> = (0..20)
            .map(|u| {
                let mut r = request(vec![h(u, EventType::Click), h(u * 5 + 1, EventType::View)], 10);
                r.segment = u as usize % 4;
                r
            })
            .collect();
        requests.push(request(vec![], 10));
        requests[3].negatives = vec![40];
        let a = exact.score(&requests, &catalog);
        let b = two_stage.score(&requests, &catalog);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.iter().map(|s| s.item).collect::<Vec<_>>(), y.iter().map(|s| s.item).collect::<Vec<_>>());
        }
        let counts = two_stage.take_candidate_counts();
        assert!(counts.get(Source::Cooccurrence) > 0 && counts.get(Source::Popular) > 0, "{counts:?}");
        assert!(exact.take_candidate_counts().is_empty());
    }

    #[test]
    fn two_stage_fills_a_narrow_filter_and_never_returns_excluded_or_unavailable_items() {
        let n = 400;
        let (catalog, mut model) = walked(n, &forced(3));
        let rare = catalog.category_idx("rare").expect("category");
        let withdrawn = ItemId::from("i14");
        catalog.put(
            &withdrawn,
            crate::catalog::ItemAttributes {
                categories: vec!["rare".into()],
                available: Some(false),
                ..Default::default()
            },
        );
        let mut r = request(vec![h(4, EventType::Click), h(5, EventType::View)], 10);
        r.categories = Some(vec![rare]);
        r.exclude.push(24);
        r.negatives = vec![34];
        let list = &model.score(&[r], &catalog)[0];
        assert_eq!(list.len(), 10, "{list:?}");
        let cats = catalog.categories();
        assert!(list.iter().all(|s| cats.of(s.item) == [rare]));
        assert!(list.iter().all(|s| ![4, 14, 24, 34].contains(&s.item)), "{list:?}");
        drop(cats);
        // Unfiltered, with few candidates: still none of them.
        let mut r = request(vec![h(4, EventType::Click)], 50);
        r.exclude.push(24);
        r.negatives = vec![34];
        let list = &model.score(&[r], &catalog)[0];
        assert_eq!(list.len(), 50);
        assert!(list.iter().all(|s| ![4, 14, 24, 34].contains(&s.item)), "{list:?}");
    }
}
