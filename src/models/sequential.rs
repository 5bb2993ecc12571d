//! The trained sequential model served: the [`SasRec`] network with its item vocabulary and
//! cold-start priors, and the [`Recommender`] implementation that the model actor drives. The
//! saved form (files, manifest, vocabulary) lives in [`super::artifact`].
//!
//! ## Scoring, and the cold-start blend
//! For one request, history events with negative feedback are dropped, items the model knows
//! are mapped to its vocabulary, and the last `max_len` of them go through one batched forward
//! pass (only the last position is a query). The result is turned into probabilities over the
//! whole catalogue and blended with popularity in the request's context segment:
//!
//! `score(i) = w * p_model(i) + (1 - w) * p_popular(i | segment)`, with `w = n / (n + blend_history)`
//!
//! where `n` is the number of known history items: a user with no history gets popularity by
//! segment, one with a single item is already mostly model (`w` = 0.5 with the default 1.0),
//! and with 20 items popularity is a tie-breaker. `p_popular` is smoothed towards global
//! popularity with `segment_prior` pseudo-counts, so rare segments fall back gracefully.
//!
//! Items in the catalogue that the model never saw (new items) have no id embedding: their
//! vector is the attribute part of the item table (genres mapped by name from the catalogue's
//! categories, year from `created_at`) plus the mean id embedding, and their bias is the mean
//! bias. That is content similarity to what the user's sequence predicts. Negative feedback
//! lowers items whose vectors are similar (cosine) to the disliked ones.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::artifact::{Manifest, ModelFileError, SavedModel, ServeConfig, Vocab};
use super::retrieval::{Bits, CandidateCounts, CandidateSet, Filter, IvfIndex, Source};
use super::sasrec::{
    feedback_index, hour_bucket, seeded_init, Config, ItemFeatures, Mode, SasRec, SasRecError, SeqBatch, SeqInput,
};
use super::{fill_mask, top_k, HistoryItem, Observation, Recommender, ScoreRequest, Scored};
use crate::catalog::{Catalog, ItemAttributes, ItemIdx};
use crate::config::RetrievalConfig;
use crate::event::ItemId;

/// One history token as the network reads it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Token {
    /// Model item index (1-based).
    pub item: u32,
    pub hour: u32,
    pub feedback: u32,
}

/// One user to score: history (oldest first), the request's segment and demographics.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub history: Vec<Token>,
    pub segment: u32,
    pub user: [u32; 3],
}

/// Tensors derived from the weights that inference reuses until the weights change.
struct InferenceCache {
    /// `[items + 1, H]` input table.
    table: Tensor,
    /// `[H, items]` output table, transposed once.
    out_t: Tensor,
    /// `[items]` output bias.
    bias: Tensor,
    /// Row-major copy of the output table, for negative feedback.
    vectors: Vec<f32>,
    /// Attribute-free part of an unseen item's vector, and its bias.
    mean_id: Vec<f32>,
    mean_bias: f32,
    /// `p_popular(item | segment)` per context segment, and globally (model items).
    segment_popularity: Vec<Vec<f32>>,
    global_popularity: Vec<f32>,
}

/// The output side of the model in catalogue order, extended as the catalogue grows (and its
/// unseen items' vectors refreshed every `cold_refresh_secs`), so that every catalogue item,
/// unseen items included, has a vector, a bias and a popularity in catalogue order.
#[derive(Default)]
struct CatalogMap {
    /// Model item (1-based) of each catalogue index; 0 when the model does not know it.
    model_item: Vec<u32>,
    /// Catalogue items unknown to the model, in the order they arrived.
    cold: Vec<ItemIdx>,
    /// `[H, n]` item vectors in catalogue order, for the exact full product; only below
    /// `model.retrieval.min_items` (two-stage scoring reads `vectors`).
    out_t: Option<Tensor>,
    /// Row-major `[n, H]` item vectors (unseen items: attributes + mean id embedding).
    vectors: Vec<f32>,
    /// `[n]` output bias (unseen items: the mean bias).
    bias: Vec<f32>,
    /// `p_popular(item | segment)` in catalogue order, one row per segment, then the global row.
    popularity: Vec<Vec<f32>>,
    refreshed: Option<Instant>,
}

/// What two-stage scoring needs besides the item vectors: the ANN index and the popularity
/// orders, built together off the inference thread.
struct RetrievalIndex {
    ann: IvfIndex,
    /// Catalogue items `0..items` were indexed by the build; later ones were added one by one.
    items: usize,
    /// The most popular items of each context segment, best first.
    popular: Vec<Vec<ItemIdx>>,
    /// Every item by global popularity, best first (items added later at the end): the
    /// popular source's widening for narrow filters.
    popular_all: Vec<ItemIdx>,
    /// A uniform sample of items, to estimate the softmax mass outside the candidates.
    tail_sample: Vec<ItemIdx>,
}

/// Items in the uniform sample behind the softmax normaliser's tail estimate.
const TAIL_SAMPLE: usize = 256;
/// Excluded items whose softmax mass is added exactly (the rest fall in the tail estimate).
const EXCLUDED_EXACT: usize = 512;

enum IndexState {
    /// Exact scoring (a small catalogue), or nothing built yet.
    Absent,
    /// Built on its own thread; the model scores exactly until it arrives.
    Building(std::sync::mpsc::Receiver<RetrievalIndex>),
    Ready(RetrievalIndex),
}

impl RetrievalIndex {
    /// Builds the index over a snapshot of the catalogue-ordered tables.
    fn build(vectors: &[f32], bias: &[f32], popularity: &[Vec<f32>], hidden: usize, config: &RetrievalConfig) -> Self {
        let n = bias.len();
        let ann = IvfIndex::build(vectors, bias, hidden, config.ann_list_size, 1);
        let best_first = |row: &[f32], keep: usize| -> Vec<ItemIdx> {
            let mut order: Vec<ItemIdx> = (0..row.len() as ItemIdx).collect();
            let better = |a: &ItemIdx, b: &ItemIdx| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
            if keep < order.len() {
                order.select_nth_unstable_by(keep, better);
                order.truncate(keep);
            }
            order.sort_unstable_by(better);
            order
        };
        let keep = (config.popular_candidates * 8).max(1_000);
        let (global, segments) = popularity.split_last().expect("the global row");
        let popular = segments.iter().map(|row| best_first(row, keep)).collect();
        let popular_all = best_first(global, n);
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(2);
        let tail_sample =
            rand::seq::index::sample(&mut rng, n, TAIL_SAMPLE.min(n)).into_iter().map(|i| i as ItemIdx).collect();
        RetrievalIndex { ann, items: n, popular, popular_all, tail_sample }
    }
}

/// Reused per request by two-stage scoring.
#[derive(Default)]
struct Scratch {
    blocked: Bits,
    candidates: CandidateSet,
    found: Vec<(ItemIdx, f32)>,
    logits: Vec<f32>,
}

/// A trained (or freshly initialised) sequential model with everything needed to serve it.
pub struct SequentialModel {
    pub config: Config,
    pub serve: ServeConfig,
    pub vocab: Vocab,
    pub varmap: VarMap,
    net: SasRec,
    features: ItemFeatures,
    item_index: HashMap<String, u32>,
    genre_index: HashMap<String, u16>,
    version: String,
    cache: Option<InferenceCache>,
    catalog_map: CatalogMap,
    retrieval: RetrievalConfig,
    index: IndexState,
    scratch: Scratch,
    candidate_counts: CandidateCounts,
}

impl SequentialModel {
    /// A model with weights initialised from `seed`. `config.items`, `genres` and
    /// `occupations` are taken from the vocabulary.
    pub fn new(mut config: Config, serve: ServeConfig, vocab: Vocab, seed: u64) -> Result<Self, SasRecError> {
        config.items = vocab.items.len();
        config.genres = vocab.genres.len();
        config.occupations = vocab.occupations.len();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = SasRec::load(vb, &config)?;
        seeded_init(&varmap, seed)?;
        let features = ItemFeatures::new(&vocab.item_genres, &vocab.item_years, config.genres)?;
        let item_index = vocab.items.iter().enumerate().map(|(i, id)| (id.clone(), i as u32 + 1)).collect();
        let genre_index = vocab.genres.iter().enumerate().map(|(i, g)| (g.clone(), i as u16)).collect();
        Ok(Self {
            config,
            serve,
            vocab,
            varmap,
            net,
            features,
            item_index,
            genre_index,
            version: "sasrec-untrained".to_owned(),
            cache: None,
            catalog_map: CatalogMap::default(),
            retrieval: RetrievalConfig::default(),
            index: IndexState::Absent,
            scratch: Scratch::default(),
            candidate_counts: CandidateCounts::default(),
        })
    }

    pub fn net(&self) -> &SasRec {
        &self.net
    }

    pub fn item_features(&self) -> &ItemFeatures {
        &self.features
    }

    /// The model item (1-based) of a raw item id.
    pub fn model_item(&self, id: &str) -> Option<u32> {
        self.item_index.get(id).copied()
    }

    /// Drops tensors derived from the weights; call after changing them.
    pub fn weights_changed(&mut self) {
        self.cache = None;
        self.catalog_map = CatalogMap::default();
        self.index = IndexState::Absent;
    }

    /// Whether a catalogue of `n` items is scored in two stages.
    fn two_stage(&self, n: usize) -> bool {
        n >= self.retrieval.min_items
    }

    /// Brings the tables up to date with `catalog` and, for a large catalogue, waits until the
    /// retrieval index is built: for loaders that run off the inference thread (and tests), so
    /// that a model is served with its index ready.
    pub fn prepare(&mut self, catalog: &Catalog) -> Result<(), SasRecError> {
        self.sync_catalog(catalog)?;
        if let IndexState::Building(rx) = &self.index {
            if let Ok(index) = rx.recv() {
                self.install(index);
            }
        }
        Ok(())
    }

    /// Whether two-stage scoring has its index (false while it builds, and for small catalogues).
    pub fn retrieval_ready(&self) -> bool {
        matches!(self.index, IndexState::Ready(_))
    }

    /// Takes a built index into use, adding the items that arrived while it was built.
    fn install(&mut self, mut index: RetrievalIndex) {
        let map = &self.catalog_map;
        let h = self.config.hidden;
        for c in index.items..map.bias.len() {
            index.ann.add(c as ItemIdx, &map.vectors[c * h..(c + 1) * h], map.bias[c]);
            index.popular_all.push(c as ItemIdx);
        }
        index.items = map.bias.len();
        tracing::info!(items = index.items, lists = index.ann.lists(), "retrieval index ready");
        self.index = IndexState::Ready(index);
    }

    /// Starts building the retrieval index on its own thread from a snapshot of the tables.
    fn start_index_build(&mut self) {
        let map = &self.catalog_map;
        let (vectors, bias, popularity) = (map.vectors.clone(), map.bias.clone(), map.popularity.clone());
        let (hidden, config) = (self.config.hidden, self.retrieval.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let started = Instant::now();
        let spawned = std::thread::Builder::new().name("liverec-retrieval-index".to_owned()).spawn(move || {
            let index = RetrievalIndex::build(&vectors, &bias, &popularity, hidden, &config);
            tracing::info!(items = index.items, seconds = started.elapsed().as_secs_f64(), "retrieval index built");
            let _ = tx.send(index);
        });
        match spawned {
            Ok(_) => self.index = IndexState::Building(rx),
            Err(error) => tracing::error!(error = %error, "cannot start the retrieval index build; scoring exactly"),
        }
    }

    fn cache(&mut self) -> Result<&InferenceCache, SasRecError> {
        if self.cache.is_none() {
            let items = self.config.items;
            let table_layer = self.net.item_table();
            let table = table_layer.forward(&self.features)?;
            let out = table.narrow(0, 1, items)?;
            let out_t = out.t()?.contiguous()?;
            let bias = table_layer.bias(items)?;
            let vectors = out.flatten_all()?.to_vec1::<f32>()?;
            let mean_id = table_layer.mean_id()?.to_vec1::<f32>()?;
            let mean_bias = bias.mean_all()?.to_scalar::<f32>()?;
            let pop = &self.vocab.popularity;
            let global_total = pop.global.iter().sum::<f32>().max(1.0);
            let global_popularity: Vec<f32> = pop.global.iter().map(|c| c / global_total).collect();
            let prior = self.serve.segment_prior;
            let segment_popularity = pop
                .by_segment
                .iter()
                .map(|counts| {
                    let total: f32 = counts.iter().sum();
                    counts.iter().zip(&global_popularity).map(|(c, g)| (c + prior * g) / (total + prior)).collect()
                })
                .collect();
            self.cache = Some(InferenceCache {
                table,
                out_t,
                bias,
                vectors,
                mean_id,
                mean_bias,
                segment_popularity,
                global_popularity,
            });
        }
        Ok(self.cache.as_ref().expect("cache was just filled"))
    }

    /// Query vectors `[B, H]` of a batch of queries.
    fn encode(&mut self, queries: &[Query]) -> Result<Tensor, SasRecError> {
        let len = self.config.max_len;
        let inputs: Vec<SeqInput> = queries
            .iter()
            .map(|q| {
                let h = &q.history[q.history.len().saturating_sub(len)..];
                SeqInput {
                    items: h.iter().map(|t| t.item).collect(),
                    hours: h.iter().map(|t| t.hour).collect(),
                    feedback: h.iter().map(|t| t.feedback).collect(),
                    context: vec![q.segment],
                    user: q.user,
                }
            })
            .collect();
        // Pad only to the longest history in the batch: attention cost follows the real length.
        let longest = inputs.iter().map(|i| i.items.len()).max().unwrap_or(1).max(1);
        let batch = SeqBatch::for_inference(&inputs, longest, self.config.layers)?;
        self.cache()?;
        let cache = self.cache.as_ref().expect("cache filled above");
        Ok(self.net.encode(&batch, &cache.table, true, &mut Mode::Eval)?.squeeze(1)?)
    }

    /// Query vectors (`[B, H]`) and scores of every model item (`[B, items]` logits, in model
    /// order), both row-major, for a batch of queries.
    pub fn forward(&mut self, queries: &[Query]) -> Result<(Vec<f32>, Vec<f32>), SasRecError> {
        if queries.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let q = self.encode(queries)?;
        let cache = self.cache.as_ref().expect("encode fills the cache");
        let logits = q.matmul(&cache.out_t)?.broadcast_add(&cache.bias)?;
        Ok((q.flatten_all()?.to_vec1::<f32>()?, logits.flatten_all()?.to_vec1::<f32>()?))
    }

    /// The saved form: safetensors weights, vocabulary and manifest. Fills in the manifest's
    /// format, weights digest, version (see [`SavedModel::new`]), config and serving settings,
    /// and adopts the version.
    pub fn to_saved(&mut self, manifest: &mut Manifest) -> Result<SavedModel, ModelFileError> {
        let weights = {
            let data = self.varmap.data().lock().expect("varmap lock not poisoned");
            let mut tensors: Vec<(String, Tensor)> =
                data.iter().map(|(name, var)| (name.clone(), var.as_tensor().clone())).collect();
            tensors.sort_by(|a, b| a.0.cmp(&b.0));
            safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
                .map_err(|e| SasRecError::Config(format!("serialising weights: {e}")))?
        };
        manifest.config = self.config.clone();
        manifest.serve = self.serve.clone();
        let saved = SavedModel::new(weights, &self.vocab, manifest)?;
        self.version = manifest.version.clone();
        Ok(saved)
    }

    /// A model from its saved form, checking the format and the weights digest.
    pub fn from_saved(saved: &SavedModel) -> Result<(Self, Manifest), ModelFileError> {
        let (manifest, vocab) = saved.open()?;
        let mut model = Self::new(manifest.config.clone(), manifest.serve.clone(), vocab, 0)?;
        let weights = candle_core::safetensors::load_buffer(&saved.weights, &Device::Cpu)?;
        {
            let data = model.varmap.data().lock().expect("varmap lock not poisoned");
            for (name, var) in data.iter() {
                let tensor =
                    weights.get(name).ok_or_else(|| SasRecError::Config(format!("weights have no tensor {name}")))?;
                var.set(tensor)?;
            }
        }
        model.version = manifest.version.clone();
        model.weights_changed();
        Ok((model, manifest))
    }

    /// Writes [`SequentialModel::to_saved`] into `dir` (created if needed).
    pub fn save(&mut self, dir: &Path, manifest: &mut Manifest) -> Result<(), ModelFileError> {
        self.to_saved(manifest)?.write(dir)
    }

    /// Loads a model directory written by [`SequentialModel::save`].
    pub fn load(dir: &Path) -> Result<(Self, Manifest), ModelFileError> {
        Self::from_saved(&SavedModel::read(dir)?)
    }

    /// Attribute vector of a catalogue item unknown to the model (see the module docs).
    fn cold_vector(&self, attrs: &crate::catalog::ItemAttributes) -> Result<Vec<f32>, SasRecError> {
        let genres: Vec<u16> =
            attrs.categories.iter().chain(&attrs.tags).filter_map(|c| self.genre_index.get(c).copied()).collect();
        let year = attrs.created_at.map(|ms| u16::try_from(1970 + ms.div_euclid(31_556_952_000)).unwrap_or(u16::MAX));
        let features = ItemFeatures::new(&[genres], &[year], self.config.genres)?;
        let content = self.net.item_table().content(&features)?.narrow(0, 1, 1)?;
        Ok(content.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Brings the catalogue-ordered tables up to date (see [`CatalogMap`]): rows for new items
    /// are appended (and added to the retrieval index), unseen items' rows are refreshed every
    /// `cold_refresh_secs`. Starts the index build when the catalogue is large enough.
    fn sync_catalog(&mut self, catalog: &Catalog) -> Result<(), SasRecError> {
        if let IndexState::Building(rx) = &self.index {
            match rx.try_recv() {
                Ok(index) => self.install(index),
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    tracing::error!("the retrieval index build failed; scoring exactly");
                    self.index = IndexState::Absent;
                }
            }
        }
        let n = catalog.len();
        let old = self.catalog_map.model_item.len();
        let stale = !self.catalog_map.cold.is_empty()
            && self
                .catalog_map
                .refreshed
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(self.serve.cold_refresh_secs));
        let two_stage = self.two_stage(n);
        let tables_missing = !two_stage && self.catalog_map.out_t.is_none();
        if n == old && !stale && !tables_missing {
            if two_stage && matches!(self.index, IndexState::Absent) {
                self.start_index_build();
            }
            return Ok(());
        }
        self.cache()?;
        let h = self.config.hidden;
        let new_ids = catalog.ids_of(&(old as ItemIdx..n as ItemIdx).collect::<Vec<_>>());
        let cold_rows: Vec<ItemIdx> = if stale { self.catalog_map.cold.clone() } else { Vec::new() };
        // Vectors of unseen items (new ones, and old ones when refreshing), computed before the
        // tables are borrowed.
        let mut cold_vectors: HashMap<ItemIdx, Vec<f32>> = HashMap::new();
        {
            let cache = self.cache.as_ref().expect("cache filled above");
            let mean_id = cache.mean_id.clone();
            let unseen = new_ids
                .iter()
                .enumerate()
                .filter(|(_, id)| !self.item_index.contains_key(id.as_str()))
                .map(|(i, _)| (old + i) as ItemIdx)
                .chain(cold_rows.iter().copied());
            for c in unseen {
                let attrs = catalog.get(&catalog.ids_of(&[c])[0]).map(ItemAttributes::from).unwrap_or_default();
                let content = self.cold_vector(&attrs)?;
                cold_vectors.insert(c, content.iter().zip(&mean_id).map(|(a, b)| a + b).collect());
            }
        }
        let cache = self.cache.as_ref().expect("cache filled above");
        let bias_model = cache.bias.to_vec1::<f32>()?;
        let map = &mut self.catalog_map;
        if map.popularity.is_empty() {
            map.popularity = vec![Vec::new(); cache.segment_popularity.len() + 1];
        }
        for (i, id) in new_ids.iter().enumerate() {
            let c = old + i;
            let m = self.item_index.get(id.as_str()).copied().unwrap_or(0);
            map.model_item.push(m);
            if m > 0 {
                let row = (m as usize - 1) * h;
                map.vectors.extend_from_slice(&cache.vectors[row..row + h]);
                map.bias.push(bias_model[m as usize - 1]);
            } else {
                map.cold.push(c as ItemIdx);
                map.vectors.extend_from_slice(&cold_vectors[&(c as ItemIdx)]);
                map.bias.push(cache.mean_bias);
            }
            for (row, p) in
                map.popularity.iter_mut().zip(cache.segment_popularity.iter().chain([&cache.global_popularity]))
            {
                row.push(if m > 0 { p[m as usize - 1] } else { 0.0 });
            }
        }
        for &c in &cold_rows {
            map.vectors[c as usize * h..(c as usize + 1) * h].copy_from_slice(&cold_vectors[&c]);
        }
        map.refreshed = Some(Instant::now());
        map.out_t = if two_stage {
            None
        } else {
            Some(Tensor::from_slice(&map.vectors, (n, h), &Device::Cpu)?.t()?.contiguous()?)
        };
        if let IndexState::Ready(index) = &mut self.index {
            // New items join the index and the popularity order without a rebuild; refreshed
            // unseen items keep their first vector there (they are candidates by content
            // anyway) and are scored with the fresh one.
            for c in index.items..n {
                index.ann.add(c as ItemIdx, &map.vectors[c * h..(c + 1) * h], map.bias[c]);
                index.popular_all.push(c as ItemIdx);
            }
            index.items = n;
        }
        if two_stage && matches!(self.index, IndexState::Absent) {
            self.start_index_build();
        }
        Ok(())
    }

    /// Tokens of a serving history: positive events of items the model knows.
    fn tokens(&self, history: &[HistoryItem]) -> Vec<Token> {
        history
            .iter()
            .filter(|h| h.weight() > 0.0 && !h.event_type.is_negative())
            .filter_map(|h| {
                let m = *self.catalog_map.model_item.get(h.item as usize)?;
                (m > 0).then(|| Token {
                    item: m,
                    hour: hour_bucket(h.timestamp),
                    feedback: feedback_index(match h.event_type {
                        crate::event::EventType::Rating => h.value,
                        _ => None,
                    }),
                })
            })
            .collect()
    }

    fn score_all(&mut self, requests: &[ScoreRequest], catalog: &Catalog) -> Result<Vec<Vec<Scored>>, SasRecError> {
        self.sync_catalog(catalog)?;
        let n = self.catalog_map.model_item.len();
        let h = self.config.hidden;
        let tokens: Vec<Vec<Token>> = requests.iter().map(|r| self.tokens(&r.history)).collect();
        let warm: Vec<usize> = (0..requests.len()).filter(|&i| !tokens[i].is_empty()).collect();
        let mut row_of = vec![None; requests.len()];
        for (row, &i) in warm.iter().enumerate() {
            row_of[i] = Some(row);
        }
        let queries: Vec<Query> = warm
            .iter()
            .map(|&i| Query { history: tokens[i].clone(), segment: requests[i].segment as u32, user: [0, 0, 0] })
            .collect();
        let q = if queries.is_empty() { None } else { Some(self.encode(&queries)?) };
        if self.retrieval_ready() {
            let q = match q {
                Some(q) => q.flatten_all()?.to_vec1::<f32>()?,
                None => Vec::new(),
            };
            return Ok(self.score_candidates(requests, catalog, &tokens, &q, &row_of));
        }
        // Scores of every catalogue item, in catalogue order, from one matrix product.
        let logits = match q {
            None => Vec::new(),
            Some(q) => {
                let map = &self.catalog_map;
                let product = match &map.out_t {
                    Some(out_t) => q.matmul(out_t)?,
                    // A large catalogue whose retrieval index is still being built: the same
                    // product from the row-major vectors (slow, until the index arrives).
                    None => q.matmul(&Tensor::from_slice(&map.vectors, (n, h), &Device::Cpu)?.t()?)?,
                };
                product.flatten_all()?.to_vec1::<f32>()?
            }
        };
        let map = &self.catalog_map;
        let categories = catalog.categories();
        let now_ms = crate::event::now_ms();
        let global = map.popularity.len() - 1;

        let mut out = Vec::with_capacity(requests.len());
        let mut scores = vec![0f32; n];
        let mut mask = vec![false; n];
        for (ri, request) in requests.iter().enumerate() {
            let popular = &map.popularity[request.segment.min(global)];
            if let Some(row) = row_of[ri] {
                // w * softmax(logits) + (1 - w) * popularity, in one pass after the max.
                let n_hist = tokens[ri].len() as f32;
                let w = n_hist / (n_hist + self.serve.blend_history.max(f32::MIN_POSITIVE));
                let logit_row = &logits[row * n..(row + 1) * n];
                for ((s, &l), &b) in scores.iter_mut().zip(logit_row).zip(&map.bias) {
                    *s = l + b;
                }
                let max = max_of(&scores);
                for s in scores.iter_mut() {
                    *s = fast_exp(*s - max);
                }
                let scale = w / sum_of(&scores).max(f32::MIN_POSITIVE);
                for (s, &p) in scores.iter_mut().zip(popular) {
                    *s = *s * scale + (1.0 - w) * p;
                }
            } else {
                // No usable history: popularity in the request's segment alone.
                scores.copy_from_slice(popular);
            }
            // Negative feedback: lower items similar to the disliked ones.
            if self.serve.negative_weight > 0.0 && !request.negatives.is_empty() {
                let vector_of = |c: usize| map.vectors.get(c * h..(c + 1) * h);
                let negs: Vec<&[f32]> = request.negatives.iter().filter_map(|&i| vector_of(i as usize)).collect();
                if !negs.is_empty() {
                    for (c, s) in scores.iter_mut().enumerate() {
                        if let Some(v) = vector_of(c) {
                            let sim = negs.iter().map(|n| cosine(n, v)).fold(0.0f32, f32::max);
                            *s *= 1.0 - (self.serve.negative_weight * sim).clamp(0.0, 1.0);
                        }
                    }
                }
            }
            fill_mask(&mut mask, request, &categories, now_ms);
            out.push(top_k(&scores, &mask, request.k));
        }
        Ok(out)
    }

    /// Two-stage scoring (docs/model.md, "Two-stage retrieval"): candidates from the ANN index,
    /// the segment's popular items and new items by content, filtered as they are gathered;
    /// then the serving blend over the candidates only, with the softmax normaliser estimated
    /// for the whole catalogue.
    fn score_candidates(
        &mut self,
        requests: &[ScoreRequest],
        catalog: &Catalog,
        tokens: &[Vec<Token>],
        q: &[f32],
        row_of: &[Option<usize>],
    ) -> Vec<Vec<Scored>> {
        let IndexState::Ready(index) = &self.index else { return vec![Vec::new(); requests.len()] };
        let map = &self.catalog_map;
        let h = self.config.hidden;
        let n = map.bias.len();
        let config = &self.retrieval;
        let scratch = &mut self.scratch;
        let counts = &mut self.candidate_counts;
        let view = catalog.categories();
        let now_ms = crate::event::now_ms();
        let global = map.popularity.len() - 1;
        let logit = |query: &[f32], c: ItemIdx| {
            let c = c as usize;
            super::retrieval::dot(query, &map.vectors[c * h..(c + 1) * h]) + map.bias[c]
        };
        let mut out = Vec::with_capacity(requests.len());
        for (ri, request) in requests.iter().enumerate() {
            for &i in request.exclude.iter().chain(&request.negatives) {
                scratch.blocked.set(i);
            }
            let filter = Filter {
                blocked: &scratch.blocked,
                categories: request.categories.as_deref(),
                view: &view,
                now_ms,
                items: n,
            };
            let query = row_of[ri].map(|row| &q[row * h..(row + 1) * h]);
            let candidates = &mut scratch.candidates;
            candidates.clear();
            // Nearest neighbours of the query vector.
            if let Some(query) = query {
                index.ann.search(
                    query,
                    config.ann_candidates,
                    config.ann_probe,
                    |c| filter.accepts(c),
                    &mut scratch.found,
                );
                counts.add(Source::Ann, scratch.found.len());
                for &(c, _) in &scratch.found {
                    candidates.insert(c);
                }
            }
            // Popular in the segment, then globally: until enough passed the filter and the
            // list can be filled.
            let segment_list = index.popular.get(request.segment).map_or(&[][..], Vec::as_slice);
            let mut added = 0;
            for &c in segment_list.iter().chain(&index.popular_all) {
                if added >= config.popular_candidates && candidates.items.len() >= request.k {
                    break;
                }
                if filter.accepts(c) && candidates.insert(c) {
                    added += 1;
                }
            }
            counts.add(Source::Popular, added);
            // New items by content: the newest unseen items that pass, best by logit.
            if let (Some(query), true) = (query, config.cold_candidates > 0) {
                let mut cold: Vec<(ItemIdx, f32)> = map
                    .cold
                    .iter()
                    .rev()
                    .filter(|&&c| !candidates.contains(c) && filter.accepts(c))
                    .take(config.cold_candidates * 8)
                    .map(|&c| (c, logit(query, c)))
                    .collect();
                cold.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
                cold.truncate(config.cold_candidates);
                counts.add(Source::Cold, cold.len());
                for (c, _) in cold {
                    candidates.insert(c);
                }
            }

            // Exact scores of the candidates.
            let popular = &map.popularity[request.segment.min(global)];
            let items = &candidates.items;
            let logits = &mut scratch.logits;
            logits.clear();
            if let Some(query) = query {
                let n_hist = tokens[ri].len() as f32;
                let w = n_hist / (n_hist + self.serve.blend_history.max(f32::MIN_POSITIVE));
                logits.extend(items.iter().map(|&c| logit(query, c)));
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // The softmax normaliser over the whole catalogue: the candidates exactly, the
                // excluded items exactly (up to EXCLUDED_EXACT of them: history items carry
                // much of the mass), the rest estimated from a uniform sample.
                let mut z: f32 = logits.iter().map(|&l| fast_exp(l - max)).sum();
                let (mut tail, mut tail_n) = (0f32, 0usize);
                for &c in &index.tail_sample {
                    if (c as usize) < n && !candidates.contains(c) && !scratch.blocked.get(c) {
                        tail += fast_exp(logit(query, c) - max);
                        tail_n += 1;
                    }
                }
                let mut excluded = 0;
                for &c in request.exclude.iter().chain(&request.negatives) {
                    if scratch.blocked.get(c) {
                        scratch.blocked.clear(c);
                        if excluded < EXCLUDED_EXACT && (c as usize) < n {
                            z += fast_exp(logit(query, c) - max);
                            excluded += 1;
                        }
                    }
                }
                let rest = n.saturating_sub(items.len() + excluded);
                if tail_n > 0 {
                    z += tail * rest as f32 / tail_n as f32;
                }
                let scale = w / z.max(f32::MIN_POSITIVE);
                for (l, &c) in logits.iter_mut().zip(items) {
                    *l = fast_exp(*l - max) * scale + (1.0 - w) * popular[c as usize];
                }
            } else {
                logits.extend(items.iter().map(|&c| popular[c as usize]));
            }
            for &c in request.exclude.iter().chain(&request.negatives) {
                scratch.blocked.clear(c);
            }
            if self.serve.negative_weight > 0.0 && !request.negatives.is_empty() {
                let vector_of = |c: usize| map.vectors.get(c * h..(c + 1) * h);
                let negs: Vec<&[f32]> = request.negatives.iter().filter_map(|&i| vector_of(i as usize)).collect();
                if !negs.is_empty() {
                    for (s, &c) in logits.iter_mut().zip(items) {
                        let v = &map.vectors[c as usize * h..(c as usize + 1) * h];
                        let sim = negs.iter().map(|n| cosine(n, v)).fold(0.0f32, f32::max);
                        *s *= 1.0 - (self.serve.negative_weight * sim).clamp(0.0, 1.0);
                    }
                }
            }
            let mut scored: Vec<Scored> = items
                .iter()
                .zip(logits.iter())
                .filter(|(_, s)| s.is_finite())
                .map(|(&item, &score)| Scored { item, score })
                .collect();
            scored.sort_unstable_by(|a, b| b.score.total_cmp(&a.score).then(a.item.cmp(&b.item)));
            scored.truncate(request.k);
            out.push(scored);
        }
        out
    }
}

/// `e^x` to about 1e-7 relative error, without branches or float-to-int casts so that loops
/// over the catalogue vectorise (libm's `expf` was a quarter of the scoring time). Inputs below
/// about -87 give tiny positive values instead of 0.
#[inline]
fn fast_exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer in the low bits
    let t = (x * std::f32::consts::LOG2_E).clamp(-126.0, 126.0);
    let r = t + MAGIC;
    let n_bits = r.to_bits().wrapping_sub(MAGIC.to_bits()); // the integer n, two's complement
    let f = t - (r - MAGIC); // in [-0.5, 0.5]
                             // 2^f, Taylor polynomial of degree 6 (relative error about 1e-7 on [-0.5, 0.5]).
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5 + f * (0.055_504_11 + f * (0.009_618_129 + f * (0.001_333_355 + f * 0.000_154_035_3)))));
    f32::from_bits(p.to_bits().wrapping_add(n_bits << 23))
}

/// Largest value of a slice, in lanes so that it vectorises.
fn max_of(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l = if v > *l { v } else { *l };
        }
    }
    rest.iter().chain(&lanes).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// Sum of a slice, in lanes so that it vectorises.
fn sum_of(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na > 0.0 && nb > 0.0 {
        dot / (na * nb)
    } else {
        0.0
    }
}

impl Recommender for SequentialModel {
    fn version(&self) -> &str {
        &self.version
    }

    /// Trained offline: the stream does not change the weights.
    fn observe(&mut self, _observations: &[Observation]) {}

    fn configure_retrieval(&mut self, config: &RetrievalConfig) {
        if self.retrieval != *config {
            self.retrieval = config.clone();
            self.index = IndexState::Absent;
            // The full-product tables come back on the next batch if the catalogue is small.
            self.catalog_map.out_t = None;
        }
    }

    fn take_candidate_counts(&mut self) -> CandidateCounts {
        std::mem::take(&mut self.candidate_counts)
    }

    fn score(&mut self, requests: &[ScoreRequest], catalog: &Catalog) -> Vec<Vec<Scored>> {
        match self.score_all(requests, catalog) {
            Ok(lists) => lists,
            Err(error) => {
                tracing::error!(error = %error, "sequential model failed to score a batch");
                vec![Vec::new(); requests.len()]
            }
        }
    }
}

/// Interns every vocabulary item into `catalog` (with its genres as categories), so a server
/// or benchmark serves the model's items. Items the catalogue already describes keep their
/// attributes (titles, tags). Returns the catalogue index of each model item.
pub fn intern_vocab(vocab: &Vocab, catalog: &Catalog) -> Vec<ItemIdx> {
    vocab
        .items
        .iter()
        .zip(&vocab.item_genres)
        .map(|(id, genres)| {
            let attrs = crate::catalog::ItemAttributes {
                categories: genres.iter().filter_map(|&g| vocab.genres.get(usize::from(g)).cloned()).collect(),
                ..Default::default()
            };
            let id = ItemId::from(id.as_str());
            match catalog.get(&id) {
                Some(view) if view.in_catalog => catalog.intern(&id),
                _ => catalog.put(&id, attrs).0,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ItemAttributes;
    use crate::event::{Context, EventType};
    use crate::models::artifact::{rfc3339, DataWindow, Popularity, SavedMetrics, TrainingSummary};
    use std::sync::Arc;

    fn vocab() -> Vocab {
        let n = 6;
        let mut by_segment = vec![vec![0.0; n]; Context::SEGMENTS];
        by_segment[5][4] = 100.0; // item "4" is the favourite of segment 5
        Vocab {
            items: (0..n).map(|i| i.to_string()).collect(),
            item_genres: (0..n).map(|i| vec![(i % 2) as u16]).collect(),
            item_years: vec![Some(1995); n],
            genres: vec!["drama".into(), "comedy".into()],
            occupations: vec!["artist".into()],
            popularity: Popularity {
                // Item "0" is the most popular overall.
                global: vec![100.0, 10.0, 10.0, 10.0, 10.0, 10.0],
                by_segment,
            },
        }
    }

    fn tiny() -> SequentialModel {
        let config = Config { hidden: 8, layers: 1, heads: 2, inner: 16, max_len: 4, ..Config::default() };
        SequentialModel::new(config, ServeConfig::default(), vocab(), 3).expect("model")
    }

    fn manifest() -> Manifest {
        Manifest {
            format: String::new(),
            version: String::new(),
            created_at: rfc3339(1_700_000_000),
            config: Config::default(),
            serve: ServeConfig::default(),
            data: DataWindow::default(),
            metrics: SavedMetrics::default(),
            training: TrainingSummary::default(),
            weights_sha256: String::new(),
        }
    }

    fn query() -> Query {
        Query {
            history: vec![Token { item: 2, hour: 1, feedback: 4 }, Token { item: 3, hour: 1, feedback: 5 }],
            segment: 3,
            user: [1, 2, 1],
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        for i in -1700..=800 {
            let x = i as f32 / 20.0;
            let (fast, exact) = (fast_exp(x), x.exp());
            assert!((fast - exact).abs() <= 5e-6 * exact.max(1e-30), "{x}: {fast} vs {exact}");
        }
        let v: Vec<f32> = (0..37).map(|i| ((i * 13) % 17) as f32 - 8.0).collect();
        assert_eq!(max_of(&v), 8.0);
        assert_eq!(sum_of(&v), v.iter().sum::<f32>());
    }

    #[test]
    fn saved_model_round_trips_weights_vocab_and_manifest() {
        let mut model = tiny();
        let mut m = manifest();
        let saved = model.to_saved(&mut m).expect("saved");
        assert!(m.version.starts_with("sasrec-20231114221320-"));
        assert_eq!(model.version(), m.version);
        let (mut loaded, loaded_manifest) = SequentialModel::from_saved(&saved).expect("loads");
        assert_eq!(loaded_manifest, m);
        assert_eq!(loaded.vocab, model.vocab);
        assert_eq!(loaded.version(), m.version);
        let before = model.forward(&[query()]).expect("forward");
        let after = loaded.forward(&[query()]).expect("forward");
        assert_eq!(before, after);
        // Saving again gives the same bytes (and so the same version).
        let again = loaded.to_saved(&mut m.clone()).expect("saved");
        assert_eq!(again.weights, saved.weights);

        let mut tampered = saved.clone();
        let last = tampered.weights.len() - 1;
        tampered.weights[last] ^= 1;
        assert!(matches!(SequentialModel::from_saved(&tampered), Err(ModelFileError::Digest { .. })));
    }

    fn history(items: &[ItemIdx]) -> Arc<[HistoryItem]> {
        items
            .iter()
            .enumerate()
            .map(|(t, &item)| HistoryItem {
                item,
                event_type: EventType::Rating,
                value: Some(4.0),
                timestamp: 1_700_000_000_000 + t as i64 * 1000,
            })
            .collect()
    }

    fn request(items: &[ItemIdx], segment: usize, k: usize) -> ScoreRequest {
        ScoreRequest {
            history: history(items),
            segment,
            exclude: items.to_vec(),
            negatives: vec![],
            categories: None,
            k,
        }
    }

    #[test]
    fn cold_users_get_popularity_by_segment() {
        let mut model = tiny();
        let catalog = Catalog::new();
        intern_vocab(&model.vocab, &catalog);
        let lists = model.score(&[request(&[], 5, 1), request(&[], 0, 1)], &catalog);
        let id = |list: &[Scored]| catalog.id_of(list[0].item).map(|i| i.to_string());
        assert_eq!(id(&lists[0]).as_deref(), Some("4"), "segment 5's favourite");
        assert_eq!(id(&lists[1]).as_deref(), Some("0"), "global favourite");
    }

    #[test]
    fn serving_respects_exclusions_filters_negatives_and_scores_new_items() {
        let mut model = tiny();
        let catalog = Catalog::new();
        let idx = intern_vocab(&model.vocab, &catalog);
        // A new item the model never saw, with a known genre: scored from its attributes.
        let (new_item, _) = catalog.put(
            &ItemId::from("new"),
            ItemAttributes { categories: vec!["comedy".into()], ..ItemAttributes::default() },
        );
        let seen = [idx[1], idx[2]];
        let all = model.score(&[request(&seen, 0, 10)], &catalog);
        assert_eq!(all[0].len(), 5, "7 items, 2 seen");
        assert!(all[0].iter().all(|s| !seen.contains(&s.item)));
        assert!(all[0].iter().any(|s| s.item == new_item && s.score.is_finite()));

        let comedy = catalog.category_idx("comedy").expect("category");
        let mut filtered = request(&seen, 0, 10);
        filtered.categories = Some(vec![comedy]);
        filtered.negatives = vec![idx[3]];
        let out = model.score(&[filtered], &catalog);
        let cats = catalog.categories();
        assert!(!out[0].is_empty());
        assert!(out[0].iter().all(|s| cats.of(s.item).contains(&comedy)));
        assert!(out[0].iter().all(|s| s.item != idx[3]), "disliked item suppressed");
    }

    /// A model over `n` items in three genres, "rare" holding every 25th item, with a made-up
    /// popularity; its items in a catalogue (with their genres as categories).
    fn larger(n: usize, retrieval: RetrievalConfig) -> (SequentialModel, Catalog, Vec<ItemIdx>) {
        let genre = |i: usize| if i % 25 == 3 { 2 } else { (i % 2) as u16 };
        let mut by_segment = vec![vec![0.0; n]; Context::SEGMENTS];
        by_segment[4] = (0..n).map(|i| ((i * 7) % 13) as f32).collect();
        let vocab = Vocab {
            items: (0..n).map(|i| format!("i{i}")).collect(),
            item_genres: (0..n).map(|i| vec![genre(i)]).collect(),
            item_years: vec![Some(1995); n],
            genres: vec!["drama".into(), "comedy".into(), "rare".into()],
            occupations: vec!["artist".into()],
            popularity: Popularity { global: (0..n).map(|i| ((i * 31) % 97) as f32 + 1.0).collect(), by_segment },
        };
        let config = Config { hidden: 16, layers: 1, heads: 2, inner: 16, max_len: 8, ..Config::default() };
        let mut model = SequentialModel::new(config, ServeConfig::default(), vocab, 5).expect("model");
        model.configure_retrieval(&retrieval);
        let catalog = Catalog::new();
        let idx = intern_vocab(&model.vocab, &catalog);
        (model, catalog, idx)
    }

    /// Two-stage settings at any catalogue size, with lists of 20 items.
    fn forced(candidates: usize, probe: usize) -> RetrievalConfig {
        RetrievalConfig {
            min_items: 0,
            ann_candidates: candidates,
            popular_candidates: candidates,
            cold_candidates: candidates,
            ann_probe: probe,
            ann_list_size: 20,
            ..RetrievalConfig::default()
        }
    }

    fn ids(list: &[Scored]) -> Vec<ItemIdx> {
        list.iter().map(|s| s.item).collect()
    }

    #[test]
    fn two_stage_top_10_equals_exact_top_10_when_the_candidates_cover_the_catalogue() {
        let n = 200;
        let (mut exact, catalog, idx) = larger(n, RetrievalConfig::default());
        let (mut two_stage, _, _) = larger(n, forced(n, 1));
        two_stage.prepare(&catalog).expect("index built");
        assert!(two_stage.retrieval_ready() && !exact.retrieval_ready());
        let mut requests: Vec<ScoreRequest> =
            (0..12).map(|u| request(&[idx[u], idx[u * 7 + 1], idx[u * 3 + 50]], u % 6, 10)).collect();
        requests.push(request(&[], 4, 10));
        requests[1].negatives = vec![idx[99]];
        let a = exact.score(&requests, &catalog);
        let b = two_stage.score(&requests, &catalog);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(ids(x), ids(y));
            for (s, t) in x.iter().zip(y) {
                assert!((s.score - t.score).abs() <= 1e-5 * s.score.abs().max(1e-6), "{s:?} vs {t:?}");
            }
        }
        let counts = two_stage.take_candidate_counts();
        // The warm users' candidates all come from the index; the cold user's from popularity.
        assert!(counts.get(Source::Ann) >= 12 * 150 && counts.get(Source::Popular) >= 150, "{counts:?}");
        assert!(exact.take_candidate_counts().is_empty());
    }

    #[test]
    fn a_narrow_filter_still_fills_the_list_and_excluded_or_unavailable_items_never_appear() {
        let n = 500;
        // Five candidates per source and one list probed: far fewer than the filter needs.
        let (mut model, catalog, idx) = larger(n, forced(5, 1));
        model.prepare(&catalog).expect("index built");
        let rare = catalog.category_idx("rare").expect("category");
        let rare_items: Vec<ItemIdx> = (0..n).filter(|i| i % 25 == 3).map(|i| idx[i]).collect();
        assert_eq!(rare_items.len(), 20);
        // Two rare items withdrawn, one excluded by the caller, one disliked.
        for &i in &rare_items[..2] {
            let id = catalog.id_of(i).expect("id");
            let mut attrs = ItemAttributes::from(catalog.get(&id).expect("item"));
            attrs.available = Some(false);
            catalog.put(&id, attrs);
        }
        let mut filtered = request(&[idx[1], idx[2]], 0, 10);
        filtered.categories = Some(vec![rare]);
        filtered.exclude.push(rare_items[2]);
        filtered.negatives = vec![rare_items[3]];
        let mut cold = filtered.clone();
        cold.history = history(&[]);
        let lists = model.score(&[filtered, cold], &catalog);
        for list in &lists {
            assert_eq!(list.len(), 10, "16 rare items are allowed: the list is full");
            assert!(list.iter().all(|s| rare_items[4..].contains(&s.item)), "{list:?}");
        }
        // Without a filter, the withdrawn and excluded items stay out of every list.
        let mut all = request(&[rare_items[2]], 0, n);
        all.negatives = vec![rare_items[3]];
        let list = &model.score(&[all], &catalog)[0];
        assert!(list.len() > 10);
        assert!(list.iter().all(|s| !rare_items[..4].contains(&s.item)));
    }

    #[test]
    fn a_new_item_reaches_the_index_without_a_rebuild() {
        let n = 300;
        let (mut model, catalog, idx) = larger(n, forced(5, 2));
        model.prepare(&catalog).expect("index built");
        let lists_before = match &model.index {
            IndexState::Ready(index) => index.ann.lists(),
            _ => panic!("index ready"),
        };
        let (new_item, _) = catalog.put(
            &ItemId::from("new"),
            ItemAttributes { categories: vec!["comedy".into()], ..ItemAttributes::default() },
        );
        model.score(&[request(&[idx[1]], 0, 10)], &catalog);
        let IndexState::Ready(index) = &model.index else { panic!("still ready, not rebuilt") };
        assert_eq!((index.items, index.ann.len(), index.ann.lists()), (n + 1, n + 1, lists_before));
        // Its own vector finds it: it sits in the list of its nearest centroid.
        let h = model.config.hidden;
        let v = &model.catalog_map.vectors[new_item as usize * h..(new_item as usize + 1) * h];
        let mut found = Vec::new();
        index.ann.search(v, n + 1, index.ann.lists(), |c| c == new_item, &mut found);
        assert_eq!(found.len(), 1);
        assert_eq!(model.catalog_map.cold, vec![new_item]);
    }
}
