//! Retraining on the recent event log, and the validation gate.
//!
//! The window of logged events becomes a dataset (positive interactions, in the order they were
//! applied); each user's last interaction is held out (leave-one-out on the recent window), the
//! one before it validates early stopping, the rest trains. The gate ranks the whole catalogue
//! through the same [`Recommender`] interface serving uses, for the candidate and for the
//! incumbent, and compares their NDCG@10 on the held-out interactions.
//!
//! [`Job`] is one whole training run (window, training, gate, saving to the registry), run on a
//! thread of its own by the trainer actor, which only decides what happens to the result. The
//! job reads its window on that thread through an [`EventSource`]: the in-memory event log in the
//! embedded default, the Kafka events topic in production (`actors::trainer::source`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::artifact::{rfc3339, DataWindow, Manifest, PartitionEvents, SavedMetrics, SkippedEvents};
use super::data::{Dataset, DatasetBuilder, Split};
use super::registry::Registry;
use super::sasrec::Config as NetConfig;
use super::sequential::SequentialModel;
use super::train::{train_from, TrainConfig, TrainFile};
use super::{HistoryItem, Observation, Recommender, ScoreRequest, Scored};
use crate::catalog::{Catalog, ItemIdx};
use crate::config::TrainerConfig;
use crate::event::{now_ms, Context as EventContext, EventType, ItemId};
use crate::eventlog::LoggedEvent;
use crate::monitor::drift::DriftReference;

/// How strongly an event type says "liked", on the 1..5 scale the sequential model reads.
fn rating_of(event: &LoggedEvent) -> Option<f32> {
    match event.event_type {
        EventType::View | EventType::Dwell => Some(3.0),
        EventType::Click => Some(4.0),
        EventType::AddToCart | EventType::Purchase => Some(5.0),
        EventType::Rating => event.value.map(|v| v as f32),
        EventType::Dislike | EventType::Hide => None,
    }
}

/// The logged window as a dataset, plus the catalogue index of each dataset item and the
/// context segment of each user's last event.
pub struct WindowData {
    pub dataset: Dataset,
    pub split: Split,
    /// Catalogue index of dataset item `i`.
    pub catalog_items: Vec<ItemIdx>,
    /// Context segment of each user's latest event.
    pub segments: Vec<usize>,
}

impl WindowData {
    /// Builds the dataset from positive events (negative feedback is not a next item to
    /// predict). Items carry their catalogue categories as genres.
    pub fn from_log(events: &[Arc<LoggedEvent>], catalog: &Catalog) -> WindowData {
        let mut builder = DatasetBuilder::new();
        let mut seen: HashMap<ItemIdx, ()> = HashMap::new();
        let positives: Vec<&LoggedEvent> = events.iter().map(|e| &**e).filter(|e| rating_of(e).is_some()).collect();
        let distinct: Vec<ItemIdx> =
            positives.iter().filter_map(|e| seen.insert(e.item, ()).is_none().then_some(e.item)).collect();
        let ids = catalog.ids_of(&distinct);
        let categories = catalog.categories();
        for (&idx, id) in distinct.iter().zip(&ids) {
            let genres: Vec<&str> = categories.of(idx).iter().filter_map(|&c| categories.name(c)).collect();
            builder.item_attributes(id.as_str(), None, &genres, None);
        }
        drop(categories);
        let id_of: HashMap<ItemIdx, &ItemId> = distinct.iter().copied().zip(&ids).collect();
        let mut last_segment: HashMap<&str, usize> = HashMap::new();
        for e in &positives {
            let item = id_of[&e.item];
            builder.interaction(e.user.as_str(), item.as_str(), e.timestamp.div_euclid(1000), rating_of(e));
            last_segment.insert(e.user.as_str(), e.segment);
        }
        let dataset = builder.build();
        let catalog_items = dataset
            .items
            .iter()
            .map(|i| catalog.lookup(&ItemId::from(i.id.as_str())).unwrap_or(ItemIdx::MAX))
            .collect();
        let segments =
            dataset.users.iter().map(|u| last_segment.get(u.id.as_str()).copied().unwrap_or_default()).collect();
        let split = Split::leave_one_out(&dataset.sequences);
        WindowData { dataset, split, catalog_items, segments }
    }

    /// Users with a held-out interaction.
    pub fn cases(&self) -> usize {
        self.split.test.iter().filter(|t| t.is_some()).count()
    }

    /// The drill behind `"drill": "shuffle_items"`: the training and validation parts get their
    /// items permuted at random, so the model learns nothing true (the held-out part stays true;
    /// take [`WindowData::gate_requests`] before, as they read the histories).
    pub fn shuffle_training_items(&mut self, seed: u64) {
        let mut permutation: Vec<u32> = (0..self.dataset.items.len() as u32).collect();
        permutation.shuffle(&mut SmallRng::seed_from_u64(seed));
        for i in self.split.train.iter_mut().flatten() {
            i.item = permutation[i.item as usize];
        }
        for i in self.split.valid.iter_mut().flatten() {
            i.item = permutation[i.item as usize];
        }
    }

    fn history(&self, user: usize) -> Vec<HistoryItem> {
        let (history, _) = self.split.case(user, super::data::Part::Test).expect("evaluated user");
        history
            .iter()
            .map(|i| HistoryItem {
                item: self.catalog_items[i.item as usize],
                event_type: EventType::View,
                value: None,
                timestamp: i.timestamp * 1000,
            })
            .collect()
    }

    /// One ranking request per held-out interaction (the user's history excluded, as serving
    /// excludes consumed items) and the catalogue index of the held-out item.
    pub fn gate_requests(&self, k: usize) -> (Vec<ScoreRequest>, Vec<ItemIdx>) {
        let mut requests = Vec::new();
        let mut targets = Vec::new();
        for (user, test) in self.split.test.iter().enumerate() {
            let Some(test) = test else { continue };
            let history = self.history(user);
            let exclude = history.iter().map(|h| h.item).collect();
            requests.push(ScoreRequest {
                history: Arc::from(history),
                segment: self.segments[user],
                exclude,
                negatives: Vec::new(),
                categories: None,
                k,
            });
            targets.push(self.catalog_items[test.item as usize]);
        }
        (requests, targets)
    }

    /// Item popularity (organic events, as the monitor counts it) and context mix of events
    /// logged in the last `secs` of the window: the input-drift reference of a version trained
    /// on it.
    pub fn reference(events: &[Arc<LoggedEvent>], secs: u64) -> DriftReference {
        let newest = events.iter().map(|e| e.logged_at).max().unwrap_or(0);
        let from = newest - (secs as i64) * 1000;
        let mut popularity: HashMap<ItemIdx, f64> = HashMap::new();
        let mut context = vec![0.0; EventContext::SEGMENTS];
        let mut per_user: HashMap<&str, u64> = HashMap::new();
        for e in events.iter().filter(|e| e.logged_at >= from) {
            if e.organic && !e.event_type.is_negative() {
                *popularity.entry(e.item).or_default() += 1.0;
            }
            if let Some(slot) = context.get_mut(e.segment) {
                *slot += 1.0;
            }
            *per_user.entry(e.user.as_str()).or_default() += 1;
        }
        let effective_users = crate::monitor::drift::effective_users(per_user.into_values());
        DriftReference { popularity, context, effective_users }
    }
}

/// NDCG@k of ranked lists against one relevant item each (rank r, from 0: `1 / log2(r + 2)`).
pub fn ndcg(lists: &[Vec<Scored>], targets: &[ItemIdx], k: usize) -> f64 {
    if targets.is_empty() {
        return 0.0;
    }
    let total: f64 = lists
        .iter()
        .zip(targets)
        .filter_map(|(list, target)| list.iter().take(k).position(|s| s.item == *target))
        .fold(0.0, |sum, rank| sum + 1.0 / ((rank + 2) as f64).log2());
    total / targets.len() as f64
}

/// Scores in batches, as the inference thread would.
pub fn score_all(model: &mut dyn Recommender, requests: &[ScoreRequest], catalog: &Catalog) -> Vec<Vec<Scored>> {
    requests.chunks(256).flat_map(|chunk| model.score(chunk, catalog)).collect()
}

/// Most popular items of the training part first: the yardstick of the gate when the serving
/// model learns online (it has already seen the held-out interactions, so comparing with it
/// would favour it unfairly).
pub struct WindowPopularity {
    counts: Vec<f32>,
}

impl WindowPopularity {
    pub fn new(data: &WindowData, catalog: &Catalog) -> Self {
        let mut counts = vec![0f32; catalog.len()];
        for i in data.split.train.iter().flatten() {
            if let Some(c) = counts.get_mut(data.catalog_items[i.item as usize] as usize) {
                *c += 1.0;
            }
        }
        Self { counts }
    }
}

impl Recommender for WindowPopularity {
    fn version(&self) -> &str {
        "window-popularity"
    }

    fn observe(&mut self, _observations: &[Observation]) {}

    fn score(&mut self, requests: &[ScoreRequest], catalog: &Catalog) -> Vec<Vec<Scored>> {
        let n = catalog.len().min(self.counts.len());
        requests
            .iter()
            .map(|r| {
                let mut mask = vec![false; n];
                for &i in &r.exclude {
                    if let Some(m) = mask.get_mut(i as usize) {
                        *m = true;
                    }
                }
                super::top_k(&self.counts[..n], &mask, r.k)
            })
            .collect()
    }
}

/// The gate's decision on a candidate.
#[derive(Debug, Clone, PartialEq)]
pub enum GateDecision {
    /// The candidate may go on to canary.
    Pass,
    /// The candidate does not beat the incumbent by the minimum gain.
    Reject { why: String },
}

impl GateDecision {
    pub fn passed(&self) -> bool {
        matches!(self, GateDecision::Pass)
    }
}

/// The gate: the candidate passes when its NDCG@10 beats the incumbent's by more than
/// `min_gain` (`trainer.gate_min_gain`); a score that is not a number never passes.
pub fn gate_decision(candidate_ndcg: f64, incumbent_ndcg: f64, min_gain: f64) -> GateDecision {
    if candidate_ndcg > incumbent_ndcg + min_gain {
        GateDecision::Pass
    } else {
        GateDecision::Reject {
            why: format!("NDCG@10 {candidate_ndcg:.4} does not beat {incumbent_ndcg:.4} by more than {min_gain}"),
        }
    }
}

/// Why a training run produced no candidate.
#[derive(Debug, thiserror::Error)]
pub enum RetrainError {
    #[error("cannot read the training window: {0}")]
    Window(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{have} positive events in the window; trainer.min_events asks for {need}")]
    TooFewEvents { have: usize, need: usize },
    #[error("{have} users with at least three events in the window; trainer.min_cases asks for {need}")]
    TooFewCases { have: usize, need: usize },
    #[error(transparent)]
    Training(#[from] super::train::TrainError),
    /// The candidate could not be written to the registry (nothing half-written is left).
    #[error(transparent)]
    Save(#[from] super::artifact::ModelFileError),
    /// The candidate could not be published to the shared registry (nothing is left locally).
    #[error("the candidate could not be published: {0}")]
    Publish(super::registry::RegistryError),
    #[error("the training thread panicked; see the log")]
    Panicked,
    #[error("cannot start the training thread: {0}")]
    NoThread(std::io::Error),
}

/// Deliberate faults for drills: check that the gate and the canary catch a bad model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Drill {
    #[default]
    None,
    /// Train on the window with its items shuffled: a model that learned nothing true.
    ShuffleItems,
}

/// What a training run produced.
pub struct Candidate {
    /// Present when the candidate goes on to canary.
    pub saved: Option<SavedCandidate>,
    pub candidate_ndcg: f64,
    pub incumbent_ndcg: f64,
    pub yardstick: String,
    pub cases: usize,
    pub events: usize,
    pub users: usize,
    pub gate: GateDecision,
    pub warm_started: bool,
    pub seconds: f64,
    /// Input-drift reference of the recent part of the training window.
    pub reference: DriftReference,
}

/// A candidate saved in the registry, on its way to canary.
pub struct SavedCandidate {
    pub model: SequentialModel,
    /// Its registry name.
    pub name: String,
    pub version: String,
}

/// The events a run trains on, and where they came from (for the manifest).
pub struct TrainingData {
    /// Oldest first; each user's events in the order they were applied.
    pub events: Vec<Arc<LoggedEvent>>,
    /// Where the window was read, as the manifest's `data.source` says it.
    pub source: String,
    /// Events per partition of the events topic (Kafka windows).
    pub partitions: Vec<PartitionEvents>,
    /// Records of the window not trained on (Kafka windows).
    pub skipped: Option<SkippedEvents>,
}

/// Where a training run reads its window: called once, on the training thread, and may block.
pub trait EventSource: Send + Sync {
    /// The window that ends at `now_ms` (milliseconds since the epoch).
    fn read(&self, now_ms: i64) -> Result<TrainingData, Box<dyn std::error::Error + Send + Sync>>;
}

/// Everything a training run needs, moved onto its thread.
pub struct Job {
    pub run: u64,
    /// Where the window is read, when the run starts.
    pub source: Arc<dyn EventSource>,
    pub catalog: Arc<Catalog>,
    pub config: TrainerConfig,
    /// Where the serving version is read from and the candidate is published.
    pub registry: Registry,
    /// The serving version's registry name, when a registry version serves.
    pub serving_name: Option<String>,
    pub drill: Drill,
    pub skip_gate: bool,
    pub reference_secs: u64,
}

impl Job {
    pub fn run(self) -> Result<Candidate, RetrainError> {
        let started = Instant::now();
        let cfg = &self.config;
        let window = self.source.read(now_ms()).map_err(RetrainError::Window)?;
        let mut data = WindowData::from_log(&window.events, &self.catalog);
        let interactions = data.dataset.interactions();
        if interactions < cfg.min_events {
            return Err(RetrainError::TooFewEvents { have: interactions, need: cfg.min_events });
        }
        let cases = data.cases();
        if cases < cfg.min_cases {
            return Err(RetrainError::TooFewCases { have: cases, need: cfg.min_cases });
        }
        // The serving version, when it is a registry version: warm start and yardstick.
        let incumbent = match &self.serving_name {
            Some(name) => match self.registry.load_whole(name, &self.catalog) {
                Ok(model) => Some(model),
                Err(error) => {
                    tracing::warn!(error = %error, "serving version not readable; training from scratch");
                    None
                }
            },
            None => None,
        };
        // The gate sees the true histories, whatever the model is trained on.
        let (requests, targets) = data.gate_requests(10);
        if self.drill == Drill::ShuffleItems {
            data.shuffle_training_items(cfg.seed ^ self.run);
        }
        let net = incumbent.as_ref().map_or_else(
            || NetConfig {
                hidden: cfg.hidden,
                layers: cfg.layers,
                heads: cfg.heads,
                inner: cfg.hidden * 2,
                max_len: cfg.max_len,
                ..NetConfig::default()
            },
            |m| m.config.clone(),
        );
        let file = TrainFile {
            model: net,
            train: TrainConfig {
                seed: cfg.seed ^ self.run,
                epochs: cfg.epochs.max(1),
                patience: 0,
                batch_size: cfg.batch_size.max(1),
                lr: cfg.learning_rate,
                warmup_epochs: if incumbent.is_some() { 0.0 } else { 1.0 },
                time_budget_secs: cfg.time_budget_secs,
                ..TrainConfig::default()
            },
            serve: incumbent.as_ref().map(|m| m.serve.clone()).unwrap_or_default(),
        };
        let trained = train_from(&data.dataset, &data.split, &file, false, incumbent.as_ref())?;
        let mut candidate = trained.model;
        let candidate_ndcg = ndcg(&score_all(&mut candidate, &requests, &self.catalog), &targets, 10);
        let warm_started = incumbent.is_some();
        let (incumbent_ndcg, yardstick) = match incumbent {
            Some(mut serving) => {
                let lists = score_all(&mut serving, &requests, &self.catalog);
                (ndcg(&lists, &targets, 10), format!("serving version {}", serving.version()))
            }
            None => {
                let mut popularity = WindowPopularity::new(&data, &self.catalog);
                let lists = score_all(&mut popularity, &requests, &self.catalog);
                (ndcg(&lists, &targets, 10), "window popularity (the serving model learns online)".to_owned())
            }
        };
        let gate = gate_decision(candidate_ndcg, incumbent_ndcg, cfg.gate_min_gain);
        let passed = gate.passed();
        let reference = WindowData::reference(&window.events, self.reference_secs);
        let mut result = Candidate {
            saved: None,
            candidate_ndcg,
            incumbent_ndcg,
            yardstick,
            cases,
            events: interactions,
            users: data.dataset.users.len(),
            gate,
            warm_started,
            seconds: 0.0,
            reference,
        };
        if passed || self.skip_gate {
            let name = format!("auto-{}-{}", now_ms() / 1000, self.run);
            let (first, last) = data.dataset.time_window().unzip();
            let mut manifest = Manifest {
                format: String::new(),
                version: String::new(),
                created_at: rfc3339(now_ms() / 1000),
                config: candidate.config.clone(),
                serve: candidate.serve.clone(),
                data: DataWindow {
                    source: format!("{} (run {})", window.source, self.run),
                    users: data.dataset.users.len(),
                    items: data.dataset.items.len(),
                    interactions,
                    train_interactions: data.split.train_interactions(),
                    first_timestamp: first,
                    last_timestamp: last,
                    split: "leave-one-out on the window; gate on the last interaction".into(),
                    partitions: window.partitions,
                    skipped: window.skipped,
                    ..DataWindow::default()
                },
                metrics: SavedMetrics { valid: Some(trained.valid), test: None },
                training: trained.summary,
                weights_sha256: String::new(),
            };
            let dir = self.registry.staging_dir().join(&name);
            if let Err(error) = candidate.save(&dir, &mut manifest) {
                // A full disk, say: leave no half-written version behind for a restart to trip on.
                let _ = std::fs::remove_dir_all(&dir);
                return Err(error.into());
            }
            // Shared registry: uploaded for every instance (a no-op for the local folder).
            if let Err(error) = self.registry.publish(&dir, &name) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(RetrainError::Publish(error));
            }
            let version = candidate.version().to_owned();
            // From here the candidate is only served (an embedded canary; a later run's warm
            // start loads the version again): keep what scoring needs, as `Registry::load` does
            // (at 10^6 items, some 490 MiB less).
            if let Err(error) = candidate.for_serving(&self.catalog) {
                tracing::warn!(error = %error, version = %version, "the candidate is served with all its weights");
            }
            result.saved = Some(SavedCandidate { model: candidate, name, version });
        }
        result.seconds = started.elapsed().as_secs_f64();
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventId, UserId};
    use crate::eventlog::Interaction;

    #[test]
    fn the_gate_passes_only_a_candidate_that_beats_the_incumbent_by_the_minimum_gain() {
        assert_eq!(gate_decision(0.30, 0.25, 0.01), GateDecision::Pass);
        let close = gate_decision(0.255, 0.25, 0.01);
        assert!(matches!(&close, GateDecision::Reject { why } if why.contains("0.2550")), "{close:?}");
        assert!(!gate_decision(0.25, 0.25, 0.0).passed(), "a tie is not a gain");
        assert!(!gate_decision(f64::NAN, 0.1, 0.0).passed());
    }

    pub(super) fn log(catalog: &Catalog) -> Vec<Arc<LoggedEvent>> {
        let mut events = Vec::new();
        for u in 0..20 {
            for step in 0..6 {
                let item = catalog.intern(&ItemId::from(format!("i{}", (u + step) % 10).as_str()));
                events.push(Arc::new(LoggedEvent {
                    user: UserId::from(format!("u{u}").as_str()),
                    interaction: Interaction {
                        event_id: EventId::from(format!("u{u}-{step}").as_str()),
                        item_id: ItemId::from(format!("i{}", (u + step) % 10).as_str()),
                        event_type: if step == 2 { EventType::Dislike } else { EventType::View },
                        value: None,
                        timestamp: 1_000_000 + step as i64 * 1000,
                        rec_id: None,
                    },
                    item,
                    segment: 3,
                    organic: true,
                    logged_at: 1_000_000 + step as i64 * 1000,
                }));
            }
        }
        events
    }

    #[test]
    fn the_window_holds_out_each_users_last_positive_event() {
        let catalog = Catalog::new();
        let data = WindowData::from_log(&log(&catalog), &catalog);
        assert_eq!(data.dataset.users.len(), 20);
        assert_eq!(data.dataset.interactions(), 100, "dislikes are left out");
        assert_eq!(data.cases(), 20);
        let (requests, targets) = data.gate_requests(10);
        assert_eq!(requests.len(), 20);
        // User 0 walked i0 i1 (i2 disliked) i3 i4 i5: i5 is held out, the rest excluded.
        let i5 = catalog.lookup(&ItemId::from("i5")).expect("known");
        assert_eq!(targets[0], i5);
        assert_eq!(requests[0].exclude.len(), 4);
        assert_eq!(requests[0].segment, 3);
    }

    #[test]
    fn ndcg_rewards_higher_ranks() {
        let list = |items: &[ItemIdx]| items.iter().map(|&item| Scored { item, score: 1.0 }).collect::<Vec<_>>();
        assert_eq!(ndcg(&[list(&[7, 1])], &[7], 10), 1.0);
        assert!((ndcg(&[list(&[1, 7])], &[7], 10) - 1.0 / 3f64.log2()).abs() < 1e-12);
        assert_eq!(ndcg(&[list(&[1, 2])], &[7], 10), 0.0);
        assert_eq!(ndcg(&[list(&[1, 7])], &[7], 1), 0.0, "beyond k counts nothing");
    }

    #[test]
    fn shuffling_changes_training_items_but_not_the_held_out_ones() {
        let catalog = Catalog::new();
        let mut data = WindowData::from_log(&log(&catalog), &catalog);
        let (before_test, before_train) = (data.split.test.clone(), data.split.train.clone());
        data.shuffle_training_items(1);
        assert_eq!(data.split.test, before_test);
        assert_ne!(data.split.train, before_train);
    }
}

#[cfg(test)]
mod gate_tests {
    use super::*;
    use crate::event::{EventId, UserId};
    use crate::eventlog::Interaction;
    use crate::models::artifact::{rfc3339, DataWindow, Manifest, SavedMetrics, ServeConfig, TrainingSummary};
    use crate::models::sasrec::Config as NetConfig;
    use crate::models::train::{train_from, TrainConfig, TrainFile};

    struct Fixed(Vec<Arc<LoggedEvent>>);

    impl EventSource for Fixed {
        fn read(&self, _now_ms: i64) -> Result<TrainingData, Box<dyn std::error::Error + Send + Sync>> {
            Ok(TrainingData { events: self.0.clone(), source: "fixed".into(), partitions: Vec::new(), skipped: None })
        }
    }

    #[test]
    fn a_saved_candidate_is_a_serving_copy_and_its_registry_version_is_whole() {
        let catalog = Arc::new(Catalog::new());
        let events = super::tests::log(&catalog);
        let root = std::env::temp_dir().join(format!("liverec-retrain-serving-{}", std::process::id()));
        let registry = Registry::local(root.clone());
        let job = Job {
            run: 1,
            source: Arc::new(Fixed(events)),
            catalog: catalog.clone(),
            config: TrainerConfig {
                min_events: 10,
                min_cases: 5,
                epochs: 2,
                hidden: 16,
                max_len: 8,
                ..TrainerConfig::default()
            },
            registry: registry.clone(),
            serving_name: None,
            drill: Drill::default(),
            skip_gate: true,
            reference_secs: 60,
        };
        let candidate = job.run().expect("a run");
        let saved = candidate.saved.expect("sent on to canary (gate skipped)");
        assert!(saved.model.is_serving_copy(), "the served candidate keeps only what scoring needs");
        let mut whole = registry.load_whole(&saved.name, &catalog).expect("the published version loads");
        assert!(!whole.is_serving_copy());
        let _ = std::fs::remove_dir_all(&root);
        assert!(whole.to_saved(&mut sample_manifest(&whole)).is_ok(), "and can warm-start the next run");
    }

    fn sample_manifest(model: &SequentialModel) -> Manifest {
        Manifest {
            format: String::new(),
            version: String::new(),
            created_at: rfc3339(0),
            config: model.config.clone(),
            serve: model.serve.clone(),
            data: DataWindow::default(),
            metrics: SavedMetrics { valid: None, test: None },
            training: TrainingSummary::default(),
            weights_sha256: String::new(),
        }
    }

    /// The gate scores the serving version as loaded from the registry: it must rank the held-out
    /// slice as the model did when it was trained.
    #[test]
    fn a_saved_and_reloaded_model_ranks_the_gate_as_the_trained_one() {
        let catalog = Catalog::new();
        let mut events = Vec::new();
        for u in 0..120 {
            for step in 0..8 {
                let item = catalog.intern(&ItemId::from(format!("i{}", (u + step) % 30).as_str()));
                let at = 1_000_000 + step as i64 * 1000;
                events.push(Arc::new(LoggedEvent {
                    user: UserId::from(format!("u{u}").as_str()),
                    interaction: Interaction {
                        event_id: EventId::from(format!("u{u}-{step}").as_str()),
                        item_id: ItemId::from(format!("i{}", (u + step) % 30).as_str()),
                        event_type: EventType::View,
                        value: None,
                        timestamp: at,
                        rec_id: None,
                    },
                    item,
                    segment: 3,
                    organic: true,
                    logged_at: at,
                }));
            }
        }
        let data = WindowData::from_log(&events, &catalog);
        let (requests, targets) = data.gate_requests(10);
        let file = TrainFile {
            model: NetConfig { hidden: 16, layers: 1, heads: 2, inner: 32, max_len: 8, ..NetConfig::default() },
            train: TrainConfig { epochs: 8, batch_size: 32, ..TrainConfig::default() },
            serve: ServeConfig::default(),
        };
        let trained = train_from(&data.dataset, &data.split, &file, false, None).expect("trains");
        let mut model = trained.model;
        let before = ndcg(&score_all(&mut model, &requests, &catalog), &targets, 10);
        let dir = std::env::temp_dir().join(format!("liverec-gate-reload-{}", std::process::id()));
        let mut manifest = Manifest { training: trained.summary, ..sample_manifest(&model) };
        model.save(&dir, &mut manifest).expect("saves");
        let mut loaded = crate::models::registry::Registry::local(std::env::temp_dir())
            .load(dir.file_name().and_then(|n| n.to_str()).expect("a plain name"), &catalog)
            .expect("loads");
        let after = ndcg(&score_all(&mut loaded, &requests, &catalog), &targets, 10);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(before > 0.3, "the trained model learned the walk: NDCG@10 {before}");
        assert!((before - after).abs() < 1e-6, "trained {before} vs reloaded {after}");
    }
}
