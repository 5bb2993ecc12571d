//! The offline evaluation protocol (`liverec eval`).
//!
//! Exactly as the issue defines it: leave-one-out split ([`Split::leave_one_out`]); for each
//! user, rank ALL items, excluding the user's training items (and the validation item when
//! testing), no negative sampling; rank = 1 + the number of candidates scoring strictly higher;
//! HR@10, NDCG@10, MRR@10, HR@20 and NDCG@20 averaged over users, on test and validation, for
//! every model in the run and for a popularity baseline.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::data::{Dataset, Interaction, Part, Split};
use super::metrics::{rank_of, MetricSums, Metrics};
use super::sasrec::{feedback_index, hour_bucket, segment_at, SasRecError};
use super::sequential::{Query, SequentialModel, Token};
use crate::event::Device as DeviceClass;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] SasRecError),
}

/// One user to rank for: what is known (history, oldest first) and what is held out.
#[derive(Clone, Copy, Debug)]
pub struct Case<'a> {
    pub user: usize,
    pub history: &'a [Interaction],
    pub target: Interaction,
}

/// Something that scores every dataset item for a batch of users (higher is better).
pub trait Ranker {
    fn name(&self) -> String;
    /// One row of `dataset.items.len()` scores per case.
    fn scores(&mut self, cases: &[Case<'_>]) -> Result<Vec<Vec<f32>>, EvalError>;
}

/// Most popular items in the training interactions first (RecBole's `Pop`).
pub struct PopularityRanker {
    counts: Vec<f32>,
}

impl PopularityRanker {
    pub fn new(dataset: &Dataset, split: &Split) -> Self {
        let mut counts = vec![0f32; dataset.items.len()];
        for i in split.train.iter().flatten() {
            counts[i.item as usize] += 1.0;
        }
        Self { counts }
    }
}

impl Ranker for PopularityRanker {
    fn name(&self) -> String {
        "popularity".to_owned()
    }

    fn scores(&mut self, cases: &[Case<'_>]) -> Result<Vec<Vec<f32>>, EvalError> {
        Ok(cases.iter().map(|_| self.counts.clone()).collect())
    }
}

/// The sequential model, fed each user's history, the held-out event's context segment (the
/// request time) and the user's demographics.
pub struct SequentialRanker<'a> {
    pub model: &'a mut SequentialModel,
    /// Model item (1-based) of each dataset item; 0 if the model does not know it.
    model_item: Vec<u32>,
    users: Vec<[u32; 3]>,
    /// The request's hour from the newest history event (what a server knows) rather than from
    /// the held-out event.
    hour_of_last_event: bool,
    name: String,
}

impl<'a> SequentialRanker<'a> {
    pub fn new(model: &'a mut SequentialModel, dataset: &'a Dataset, name: &str) -> Self {
        let model_item = dataset.items.iter().map(|i| model.model_item(&i.id).unwrap_or(0)).collect();
        let users = dataset.users.iter().map(|u| model.vocab.user_features(u)).collect();
        Self { model, model_item, users, hour_of_last_event: false, name: name.to_owned() }
    }

    /// Ranks without the users' demographics, as a server does (`ScoreRequest` carries none).
    pub fn without_demographics(mut self) -> Self {
        self.users.iter_mut().for_each(|u| *u = [0, 0, 0]);
        self
    }

    /// Takes the request's hour from the newest history event, as a session does.
    pub fn hour_of_last_event(mut self) -> Self {
        self.hour_of_last_event = true;
        self
    }

    /// The network's input for one case.
    pub fn query(&self, case: &Case<'_>) -> Query {
        let segment = if self.hour_of_last_event {
            request_segment(case.history, case.target.timestamp * 1000)
        } else {
            segment_at(case.target.timestamp * 1000, DeviceClass::Other)
        };
        Query { history: tokens(case.history, &self.model_item), segment, user: self.users[case.user] }
    }
}

/// Network tokens of dataset interactions (items unknown to the model are skipped).
pub fn tokens(history: &[Interaction], model_item: &[u32]) -> Vec<Token> {
    history
        .iter()
        .filter_map(|i| {
            let m = model_item[i.item as usize];
            (m > 0).then(|| Token {
                item: m,
                hour: hour_bucket(i.timestamp * 1000),
                feedback: feedback_index(i.rating),
            })
        })
        .collect()
}

impl Ranker for SequentialRanker<'_> {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn scores(&mut self, cases: &[Case<'_>]) -> Result<Vec<Vec<f32>>, EvalError> {
        let queries: Vec<Query> = cases.iter().map(|c| self.query(c)).collect();
        let (_, logits) = self.model.forward(&queries)?;
        let n = self.model.config.items;
        Ok(logits
            .chunks(n.max(1))
            .map(|row| {
                self.model_item.iter().map(|&m| if m > 0 { row[m as usize - 1] } else { f32::NEG_INFINITY }).collect()
            })
            .collect())
    }
}

/// The model as the server serves it (`Recommender::score`: popularity blend, exclusions, and
/// two-stage retrieval when `retrieval` says so): the top `depth` of each list keep their
/// score, every other item scores minus infinity (ranked after the list, so a target outside
/// it counts as a miss at every cut-off up to `depth`).
///
/// It is given what a server knows when the user asks: the history as events (ratings with
/// their value, other interactions as views), every history item excluded (the session's
/// consumed record), the context of the user's newest event (device `other`, its hour; a
/// server never sees the time of the interaction being predicted) and no demographics. So its
/// lists are the ones a server replaying the same events returns (`liverec eval --serve`, and
/// the integration test `served_lists_equal_offline_lists`).
pub struct ServingRanker<'a> {
    model: &'a mut SequentialModel,
    catalog: crate::catalog::Catalog,
    /// Catalogue index of each dataset item, and the way back.
    catalog_idx: Vec<crate::catalog::ItemIdx>,
    dataset_item: std::collections::HashMap<crate::catalog::ItemIdx, usize>,
    depth: usize,
    /// Newest history events the model is given (`session.history_len`); all of them are
    /// excluded. The blend's weight counts the events given, so this matters even above the
    /// network's `max_len`.
    window: usize,
    name: String,
}

impl<'a> ServingRanker<'a> {
    pub fn new(
        model: &'a mut SequentialModel,
        dataset: &Dataset,
        retrieval: &crate::config::RetrievalConfig,
        depth: usize,
        name: &str,
    ) -> Result<Self, EvalError> {
        use crate::models::Recommender;
        let catalog = crate::catalog::Catalog::new();
        super::sequential::intern_vocab(&model.vocab, &catalog);
        let catalog_idx: Vec<_> =
            dataset.items.iter().map(|i| catalog.intern(&crate::event::ItemId::from(i.id.as_str()))).collect();
        let dataset_item = catalog_idx.iter().enumerate().map(|(d, &c)| (c, d)).collect();
        model.configure_retrieval(retrieval);
        model.prepare(&catalog)?;
        let window = crate::config::Config::default().session.history_len;
        Ok(Self { model, catalog, catalog_idx, dataset_item, depth, window, name: name.to_owned() })
    }

    /// Gives the model the newest `history_len` events, as a session with that
    /// `session.history_len` does (default: the built-in default, 50).
    pub fn with_window(mut self, history_len: usize) -> Self {
        self.window = history_len.max(1);
        self
    }
}

/// The context segment of a request made after `history` (the newest event's hour, device
/// `other`): what a session holds as the user's context. `fallback_ms` when there is no history.
pub fn request_segment(history: &[Interaction], fallback_ms: i64) -> u32 {
    let at = history.last().map_or(fallback_ms, |i| i.timestamp * 1000);
    segment_at(at, DeviceClass::Other)
}

impl ServingRanker<'_> {
    /// The served lists of `cases`, item ids best first.
    pub fn lists(&mut self, dataset: &Dataset, cases: &[Case<'_>]) -> Vec<Vec<String>> {
        self.scored(cases)
            .iter()
            .map(|list| {
                list.iter()
                    .filter_map(|s| self.dataset_item.get(&s.item).map(|&d| dataset.items[d].id.clone()))
                    .collect()
            })
            .collect()
    }

    fn scored(&mut self, cases: &[Case<'_>]) -> Vec<Vec<crate::models::Scored>> {
        use crate::models::{HistoryItem, Recommender, ScoreRequest};
        let requests: Vec<ScoreRequest> = cases
            .iter()
            .map(|case| {
                let history: Vec<HistoryItem> = case
                    .history
                    .iter()
                    .map(|i| HistoryItem {
                        item: self.catalog_idx[i.item as usize],
                        event_type: if i.rating.is_some() {
                            crate::event::EventType::Rating
                        } else {
                            crate::event::EventType::View
                        },
                        value: i.rating,
                        timestamp: i.timestamp * 1000,
                    })
                    .collect();
                ScoreRequest {
                    exclude: history.iter().map(|h| h.item).collect(),
                    history: history[history.len().saturating_sub(self.window)..].into(),
                    segment: request_segment(case.history, case.target.timestamp * 1000) as usize,
                    negatives: Vec::new(),
                    categories: None,
                    k: self.depth,
                }
            })
            .collect();
        self.model.score(&requests, &self.catalog)
    }
}

impl Ranker for ServingRanker<'_> {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn scores(&mut self, cases: &[Case<'_>]) -> Result<Vec<Vec<f32>>, EvalError> {
        let lists = self.scored(cases);
        Ok(lists
            .iter()
            .map(|list| {
                let mut row = vec![f32::NEG_INFINITY; self.catalog_idx.len()];
                for s in list {
                    if let Some(&d) = self.dataset_item.get(&s.item) {
                        row[d] = s.score;
                    }
                }
                row
            })
            .collect())
    }
}

/// The serving lists of every user with a test case, before the validation item and before the
/// test item (empty for other users), as `eval::evaluate_served` collects them from a server;
/// `batch` users scored at a time.
///
/// Histories are padded to the longest one of a batch; a comparison that must hold item by item
/// can score one user at a time on both sides (`batch` 1 here, `model.max_batch = 1` in the
/// server) so that no score depends on the shape of a batch.
pub fn serving_lists(
    ranker: &mut ServingRanker<'_>,
    dataset: &Dataset,
    split: &Split,
    batch: usize,
) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let users = split.train.len();
    let mut out = (vec![Vec::new(); users], vec![Vec::new(); users]);
    for (part, lists) in [(Part::Valid, &mut out.0), (Part::Test, &mut out.1)] {
        let cases: Vec<(usize, Vec<Interaction>, Interaction)> = (0..users)
            .filter(|&u| split.test[u].is_some())
            .filter_map(|u| split.case(u, part).map(|(h, t)| (u, h, t)))
            .collect();
        for chunk in cases.chunks(users_per_batch(batch, dataset.items.len())) {
            let batch: Vec<Case<'_>> =
                chunk.iter().map(|(u, h, t)| Case { user: *u, history: h, target: *t }).collect();
            for (case, list) in batch.iter().zip(ranker.lists(dataset, &batch)) {
                lists[case.user] = list;
            }
        }
    }
    out
}

/// Scores a batch may hold: 16 Mi, 64 MiB a copy.
const SCORES_PER_BATCH: usize = 1 << 24;

/// Users scored at a time: `batch`, or fewer for a catalogue so large that a batch's scores (a
/// catalogue-sized row per user, held several times over by the product and the rows handed
/// out) would pass [`SCORES_PER_BATCH`]: 512 users at MovieLens's 1,682 items, 16 at 10^6
/// (whose validation in `liverec train` peaked at 9.9 GB with 512).
fn users_per_batch(batch: usize, items: usize) -> usize {
    batch.clamp(1, (SCORES_PER_BATCH / items.max(1)).max(1))
}

/// Runs the protocol for one ranker on one part, `batch` users at a time (fewer for a large
/// catalogue: [`users_per_batch`]).
pub fn evaluate(
    dataset: &Dataset,
    split: &Split,
    part: Part,
    ranker: &mut dyn Ranker,
    batch: usize,
) -> Result<Metrics, EvalError> {
    let cases: Vec<(Vec<Interaction>, Interaction, usize)> =
        (0..split.train.len()).filter_map(|u| split.case(u, part).map(|(h, t)| (h, t, u))).collect();
    let mut sums = MetricSums::default();
    let mut excluded = vec![false; dataset.items.len()];
    for chunk in cases.chunks(users_per_batch(batch, dataset.items.len())) {
        let batch_cases: Vec<Case<'_>> =
            chunk.iter().map(|(history, target, user)| Case { user: *user, history, target: *target }).collect();
        let scores = ranker.scores(&batch_cases)?;
        for (case, row) in batch_cases.iter().zip(&scores) {
            for i in case.history {
                excluded[i.item as usize] = true;
            }
            sums.add(rank_of(row, case.target.item as usize, &excluded));
            for i in case.history {
                excluded[i.item as usize] = false;
            }
        }
    }
    Ok(sums.mean())
}

/// Test and validation metrics of one model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartMetrics {
    pub test: Metrics,
    pub valid: Metrics,
}

/// Evaluates every ranker on test and validation; keyed by ranker name, in name order.
pub fn evaluate_all(
    dataset: &Dataset,
    split: &Split,
    rankers: &mut [&mut dyn Ranker],
    batch: usize,
) -> Result<BTreeMap<String, PartMetrics>, EvalError> {
    let mut out = BTreeMap::new();
    for ranker in rankers.iter_mut() {
        let test = evaluate(dataset, split, Part::Test, &mut **ranker, batch)?;
        let valid = evaluate(dataset, split, Part::Valid, &mut **ranker, batch)?;
        out.insert(ranker.name(), PartMetrics { test, valid });
    }
    Ok(out)
}

/// A markdown report of an evaluation run.
pub fn markdown_report(title: &str, results: &BTreeMap<String, PartMetrics>, notes: &[String]) -> String {
    let mut s = format!("# {title}\n\n");
    s.push_str(
        "Protocol: leave-one-out (last interaction = test, second-to-last = validation), \
         all items ranked, the user's training items (and the validation item when testing) \
         excluded, rank = 1 + candidates scoring strictly higher.\n\n",
    );
    for part in ["test", "valid"] {
        let _ = writeln!(s, "## {part}\n");
        s.push_str("| model | HR@10 | NDCG@10 | MRR@10 | HR@20 | NDCG@20 |\n");
        s.push_str("|---|---|---|---|---|---|\n");
        for (name, m) in results {
            let m = if part == "test" { m.test } else { m.valid };
            let _ = writeln!(
                s,
                "| {name} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
                m.hr10, m.ndcg10, m.mrr10, m.hr20, m.ndcg20
            );
        }
        s.push('\n');
    }
    if !notes.is_empty() {
        s.push_str("## Notes\n\n");
        for note in notes {
            let _ = writeln!(s, "- {note}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::data::DatasetBuilder;

    #[test]
    fn a_large_catalogue_is_scored_in_smaller_batches() {
        assert_eq!(users_per_batch(512, 1_682), 512, "MovieLens keeps its batches");
        assert_eq!(users_per_batch(512, 1_000_000), 16);
        assert_eq!(users_per_batch(512, 100_000_000), 1, "one user at least");
        assert_eq!(users_per_batch(0, 10), 1);
    }

    /// A ranker that always scores items by a fixed vector.
    struct Fixed(Vec<f32>);

    impl Ranker for Fixed {
        fn name(&self) -> String {
            "fixed".to_owned()
        }
        fn scores(&mut self, cases: &[Case<'_>]) -> Result<Vec<Vec<f32>>, EvalError> {
            Ok(cases.iter().map(|_| self.0.clone()).collect())
        }
    }

    #[test]
    fn excludes_history_including_the_validation_item_when_testing() {
        let mut b = DatasetBuilder::new();
        // Items a, b, c, d, e; the user's sequence: a, b (train), c (valid), d (test).
        for item in ["a", "b", "c", "d", "e"] {
            b.item(item);
        }
        for (t, item) in ["a", "b", "c", "d"].iter().enumerate() {
            b.interaction("u", item, t as i64, None);
        }
        let ds = b.build();
        let split = Split::leave_one_out(&ds.sequences);
        // Scores: a > b > c > e > d.
        let mut ranker = Fixed(vec![5.0, 4.0, 3.0, 1.0, 2.0]);
        // Test target d: a, b, c are history (excluded); only e scores higher: rank 2.
        let test = evaluate(&ds, &split, Part::Test, &mut ranker, 8).expect("eval");
        assert!((test.ndcg10 - 1.0 / 3f64.log2()).abs() < 1e-12);
        assert!((test.mrr10 - 0.5).abs() < 1e-12);
        // Valid target c: a, b excluded; nothing else is higher: rank 1.
        let valid = evaluate(&ds, &split, Part::Valid, &mut ranker, 8).expect("eval");
        assert!((valid.ndcg10 - 1.0).abs() < 1e-12);
        let all = evaluate_all(&ds, &split, &mut [&mut ranker], 8).expect("eval");
        let report = markdown_report("t", &all, &[]);
        assert!(report.contains("| fixed | 1.0000 | 0.6309 | 0.5000 |"));
    }
}
