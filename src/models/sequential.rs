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
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::artifact::{Manifest, ModelFileError, SavedModel, ServeConfig, Vocab};
use super::retrieval::{dot, prefetch, Bits, CandidateCounts, CandidateSet, Filter, IvfIndex, Source};
use super::sasrec::{
    feedback_index, hour_bucket, seeded_init, Config, FastEncoder, FastInput, ItemFeatures, Mode, SasRec, SasRecError,
    SeqBatch, SeqInput,
};
use super::{fill_mask, top_k, HistoryItem, ItemFilter, Observation, Recommender, ScoreRequest, Scored};
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
    /// `[items + 1, H]` item vectors (row 0: padding): the encoder's input table and, the
    /// weights being tied, the output table. The model's only copy of the item vectors:
    /// scoring reads it in place, transposed or through the catalogue's [`CatalogMap::row`].
    table: Tensor,
    /// `[items]` output bias.
    bias: Vec<f32>,
    /// Attribute-free part of an unseen item's vector, and its bias.
    mean_id: Vec<f32>,
    mean_bias: f32,
    /// `p_popular(item | segment)` (model items), one row per context segment, then the global
    /// row; shared with the retrieval index's build.
    popularity: Arc<Vec<Vec<f32>>>,
    /// The encoder's weights on plain slices, for small batches ([`FAST_ENCODER_MAX_BATCH`]).
    fast: FastEncoder,
}

/// Largest batch whose query vectors come from [`FastEncoder`] rather than candle. Candle
/// costs 160-210 us a batch before any arithmetic (its operations' allocations and its threads'
/// wake-ups), the plain-slice encoder only its arithmetic, done one vector at a time; from some
/// batch size on, candle's matrix products win. Measured in docs/performance.md ("The encoder
/// for small batches").
const FAST_ENCODER_MAX_BATCH: usize = 8;

/// Marks a [`CatalogMap::row`] entry as a slot of the unseen items' vectors.
const COLD: u32 = 1 << 31;

/// The catalogue's view of the model, extended as the catalogue grows (and its unseen items'
/// vectors refreshed every `cold_refresh_secs`): where every catalogue item's vector is, and
/// its bias, unseen items included. Vectors and popularity are not copied into catalogue order
/// (at 10^6 items each copy was 250 and 85 MB): they are read through `row`.
#[derive(Default)]
struct CatalogMap {
    /// Per catalogue index: the model item (1-based, its row of the table), or `COLD | slot`
    /// for an item the model does not know (its slot in `cold_vectors`).
    row: Vec<u32>,
    /// Catalogue items unknown to the model, in the order they arrived (slot order).
    cold: Vec<ItemIdx>,
    /// `[cold, H]` vectors of the unseen items: attributes + mean id embedding.
    cold_vectors: Vec<f32>,
    /// `[n]` output bias in catalogue order (unseen items: the mean bias).
    bias: Vec<f32>,
    refreshed: Option<Instant>,
}

impl CatalogMap {
    /// The model item (1-based) of catalogue item `c`, if the model knows it.
    fn model_item(&self, c: usize) -> Option<u32> {
        self.row.get(c).copied().filter(|&r| r & COLD == 0)
    }
}

/// Every catalogue item's vector, read in place (see [`CatalogMap`]).
#[derive(Clone, Copy)]
struct Vectors<'a> {
    /// The table's values, `[items + 1, H]`.
    table: &'a [f32],
    cold: &'a [f32],
    row: &'a [u32],
    h: usize,
}

impl<'a> Vectors<'a> {
    fn of(&self, c: usize) -> &'a [f32] {
        let r = self.row[c];
        let (values, at) = if r & COLD == 0 { (self.table, r) } else { (self.cold, r & !COLD) };
        &values[at as usize * self.h..][..self.h]
    }

    fn get(&self, c: usize) -> Option<&'a [f32]> {
        (c < self.row.len()).then(|| self.of(c))
    }
}

/// `p_popular` of catalogue item `c` from a model-order popularity row (0 for unseen items).
#[inline]
fn popularity_of(popular: &[f32], row: &[u32], c: usize) -> f32 {
    match row[c] {
        r if r & COLD == 0 => popular[r as usize - 1],
        _ => 0.0,
    }
}

/// Runs `f` on the values of a contiguous f32 CPU tensor, in place.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R, SasRecError> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(cpu), Some((start, end))) => Ok(f(&cpu.as_slice::<f32>()?[start..end])),
        _ => Err(SasRecError::Config("expected a contiguous CPU tensor".into())),
    }
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
    /// `[tail_sample, H]` their vectors, side by side: every request reads all of them, and
    /// 256 rows scattered over a large table were a cache miss each. (An unseen item's vector
    /// refreshed later keeps its first value here: an estimate's input.)
    tail_vectors: Vec<f32>,
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
    /// Builds the index over the catalogue's items as they are now (`bias` in catalogue
    /// order, `popularity` in model order, read through `vectors.row`).
    fn build(vectors: Vectors<'_>, bias: &[f32], popularity: &[Vec<f32>], config: &RetrievalConfig) -> Self {
        let n = bias.len();
        let ann = IvfIndex::build_with(n, vectors.h, |c| vectors.of(c), |c| bias[c], config.ann_list_size, 1);
        let best_first = |row: &[f32], keep: usize| -> Vec<ItemIdx> {
            let p = |c: ItemIdx| popularity_of(row, vectors.row, c as usize);
            let mut order: Vec<ItemIdx> = (0..n as ItemIdx).collect();
            let better = |a: &ItemIdx, b: &ItemIdx| p(*b).total_cmp(&p(*a)).then(a.cmp(b));
            if keep < order.len() {
                order.select_nth_unstable_by(keep, better);
                order.truncate(keep);
                // Twenty segments' orders kept the whole catalogue's capacity: 80 MB at 10^6.
                order.shrink_to_fit();
            }
            order.sort_unstable_by(better);
            order
        };
        let keep = (config.popular_candidates * 8).max(1_000);
        let (global, segments) = popularity.split_last().expect("the global row");
        let popular = segments.iter().map(|row| best_first(row, keep)).collect();
        let popular_all = best_first(global, n);
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(2);
        let tail_sample: Vec<ItemIdx> =
            rand::seq::index::sample(&mut rng, n, TAIL_SAMPLE.min(n)).into_iter().map(|i| i as ItemIdx).collect();
        let tail_vectors = tail_sample.iter().flat_map(|&c| vectors.of(c as usize).iter().copied()).collect();
        RetrievalIndex { ann, items: n, popular, popular_all, tail_sample, tail_vectors }
    }
}

/// One batch as both scoring paths read it.
#[derive(Clone, Copy)]
struct Batch<'a> {
    requests: &'a [ScoreRequest],
    /// Each request's history tokens (empty: a cold user).
    tokens: &'a [Vec<Token>],
    /// `[warm, H]` query vectors of the requests with tokens.
    q: &'a [f32],
    /// Each request's row in `q`, if it has one.
    row_of: &'a [Option<usize>],
}

impl<'a> Batch<'a> {
    /// The requests of `range`, their rows still those of the whole batch's `q`.
    fn part(self, range: std::ops::Range<usize>) -> Batch<'a> {
        Batch {
            requests: &self.requests[range.clone()],
            tokens: &self.tokens[range.clone()],
            q: self.q,
            row_of: &self.row_of[range],
        }
    }
}

/// Reused per request by two-stage scoring.
#[derive(Default)]
struct Scratch {
    blocked: Bits,
    candidates: CandidateSet,
    /// ANN neighbours of each warm query of the batch.
    found: Vec<Vec<(ItemIdx, f32)>>,
    /// Excluded and disliked items of each warm query, sorted (the batch's ANN filter).
    blocked_sorted: Vec<Vec<ItemIdx>>,
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
    /// One per part of a two-stage batch.
    scratch: Vec<Scratch>,
    candidate_counts: CandidateCounts,
    /// Set by [`SequentialModel::for_serving`]: the weights are no longer whole.
    serving_copy: bool,
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
            scratch: Vec::new(),
            candidate_counts: CandidateCounts::default(),
            serving_copy: false,
        })
    }

    /// Makes this a serving copy for `catalog`: builds the scoring tables and maps every
    /// catalogue item (the vocabulary's were interned into it when the version loaded), then
    /// drops what only training and saving need: the item id embedding (the table holds each
    /// item's vector), the training data's popularity counts (the tables hold the smoothed
    /// shares), the item ids and attributes of the vocabulary and their id index (the catalogue
    /// map stands for them; items that reach the catalogue later are new to the model, so they
    /// are scored from their attributes as before). At 10^6 items and 64 dimensions that is
    /// about 490 MiB of a serving process. A serving copy scores, finds similar items and takes
    /// new catalogue items as before; it cannot be saved, trained or used as a warm start (load
    /// the version again for that).
    pub fn for_serving(&mut self, catalog: &Catalog) -> Result<(), SasRecError> {
        self.sync_catalog(catalog)?;
        self.net.release_item_ids();
        self.varmap.data().lock().expect("varmap lock not poisoned").remove(SasRec::ITEM_IDS);
        let vocab = &mut self.vocab;
        vocab.popularity = Default::default();
        (vocab.items, vocab.item_genres, vocab.item_years) = Default::default();
        self.item_index = HashMap::new();
        self.features = ItemFeatures::new(&[], &[], self.config.genres)?;
        self.serving_copy = true;
        Ok(())
    }

    /// Whether [`SequentialModel::for_serving`] made this a serving copy.
    pub fn is_serving_copy(&self) -> bool {
        self.serving_copy
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

    /// Drops tensors derived from the weights; call after changing them. A serving copy's
    /// weights cannot change, and its tables are all it has left: it keeps them.
    pub fn weights_changed(&mut self) {
        if self.serving_copy {
            tracing::error!("weights_changed on a serving copy of a model; its tables are kept");
            return;
        }
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

    /// Bytes held by the model's main structures, largest parts first as they are laid out
    /// (the memory breakdown of docs/performance.md; strings and hash tables estimated).
    pub fn memory_breakdown(&self) -> Vec<(&'static str, usize)> {
        let floats = |n: usize| n * 4;
        let pop = &self.vocab.popularity;
        let strings = |v: &[String]| v.iter().map(|s| s.capacity() + 24).sum::<usize>();
        let mut parts = vec![
            ("weights (varmap)", self.varmap.all_vars().iter().map(|v| floats(v.elem_count())).sum()),
            (
                "vocabulary: ids, genres, years",
                strings(&self.vocab.items)
                    + self.vocab.item_genres.iter().map(|g| g.capacity() * 2 + 24).sum::<usize>()
                    + self.vocab.item_years.capacity() * 4,
            ),
            (
                "vocabulary: popularity counts",
                floats(pop.global.capacity() + pop.by_segment.iter().map(Vec::capacity).sum::<usize>()),
            ),
            (
                "id index (hash map)",
                self.item_index.capacity() * 40 + self.item_index.keys().map(String::capacity).sum::<usize>(),
            ),
            ("item features (genre pairs, years)", self.features.pairs() * 12 + floats(self.vocab.items.len() + 1)),
        ];
        if let Some(cache) = &self.cache {
            parts.push(("item table (the item vectors)", floats(cache.table.elem_count())));
            parts.push((
                "bias and popularity (model order)",
                floats(cache.bias.capacity() + cache.popularity.iter().map(Vec::capacity).sum::<usize>()),
            ));
        }
        let map = &self.catalog_map;
        parts.push((
            "catalogue map: rows, bias, unseen items",
            floats(map.row.capacity() + map.bias.capacity() + map.cold.capacity() + map.cold_vectors.capacity()),
        ));
        if let IndexState::Ready(index) = &self.index {
            parts.push(("ANN index (4-bit lists, centroids)", index.ann.bytes()));
            parts.push((
                "popularity orders, tail sample",
                floats(
                    index.popular.iter().map(Vec::capacity).sum::<usize>()
                        + index.popular_all.capacity()
                        + index.tail_sample.capacity()
                        + index.tail_vectors.capacity(),
                ),
            ));
        }
        parts
    }

    /// Whether two-stage scoring has its index (false while it builds, and for small catalogues).
    pub fn retrieval_ready(&self) -> bool {
        matches!(self.index, IndexState::Ready(_))
    }

    /// Takes a built index into use, adding the items that arrived while it was built.
    fn install(&mut self, mut index: RetrievalIndex) {
        let map = &self.catalog_map;
        if let Some(cache) = &self.cache {
            let h = self.config.hidden;
            let added = with_values(&cache.table, |table| {
                let vectors = Vectors { table, cold: &map.cold_vectors, row: &map.row, h };
                for c in index.items..map.bias.len() {
                    index.ann.add(c as ItemIdx, vectors.of(c), map.bias[c]);
                    index.popular_all.push(c as ItemIdx);
                }
            });
            if let Err(error) = added {
                tracing::error!(error = %error, "cannot add new items to the retrieval index; scoring exactly");
                return;
            }
        }
        index.items = map.bias.len();
        tracing::info!(items = index.items, lists = index.ann.lists(), "retrieval index ready");
        self.index = IndexState::Ready(index);
    }

    /// Starts building the retrieval index on its own thread. It reads the table in place
    /// (the tensor is shared, not copied) and copies only the catalogue's small per-item
    /// arrays and the unseen items' vectors.
    fn start_index_build(&mut self) {
        let Some(cache) = &self.cache else { return };
        let map = &self.catalog_map;
        let (table, popularity) = (cache.table.clone(), cache.popularity.clone());
        let (row, cold, bias) = (map.row.clone(), map.cold_vectors.clone(), map.bias.clone());
        let (h, config) = (self.config.hidden, self.retrieval.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let started = Instant::now();
        let spawned = std::thread::Builder::new().name("liverec-retrieval-index".to_owned()).spawn(move || {
            let built = with_values(&table, |table| {
                let vectors = Vectors { table, cold: &cold, row: &row, h };
                RetrievalIndex::build(vectors, &bias, &popularity, &config)
            });
            match built {
                Ok(index) => {
                    tracing::info!(
                        items = index.items,
                        seconds = started.elapsed().as_secs_f64(),
                        "retrieval index built"
                    );
                    let _ = tx.send(index);
                }
                Err(error) => tracing::error!(error = %error, "the retrieval index build failed"),
            }
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
            let rows = table_layer.rows(&self.features)?;
            let table = Tensor::from_vec(rows, (items + 1, self.config.hidden), &Device::Cpu)?;
            let bias = table_layer.bias(items)?;
            let mean_id = table_layer.mean_id()?.to_vec1::<f32>()?;
            let mean_bias = bias.mean_all()?.to_scalar::<f32>()?;
            let bias = bias.to_vec1::<f32>()?;
            let pop = &self.vocab.popularity;
            let global_total = pop.global.iter().sum::<f32>().max(1.0);
            let global_popularity: Vec<f32> = pop.global.iter().map(|c| c / global_total).collect();
            let prior = self.serve.segment_prior;
            let mut popularity: Vec<Vec<f32>> = pop
                .by_segment
                .iter()
                .map(|counts| {
                    let total: f32 = counts.iter().sum();
                    counts.iter().zip(&global_popularity).map(|(c, g)| (c + prior * g) / (total + prior)).collect()
                })
                .collect();
            popularity.push(global_popularity);
            let fast = self.net.fast_encoder()?;
            self.cache =
                Some(InferenceCache { table, bias, mean_id, mean_bias, popularity: Arc::new(popularity), fast });
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
        self.cache()?;
        let cache = self.cache.as_ref().expect("cache filled above");
        if inputs.len() <= FAST_ENCODER_MAX_BATCH {
            let fast: Vec<FastInput<'_>> = inputs.iter().map(FastInput::from).collect();
            let q = with_values(&cache.table, |table| cache.fast.encode(&fast, table))??;
            return Ok(Tensor::from_vec(q, (inputs.len(), self.config.hidden), &Device::Cpu)?);
        }
        // Pad only to the longest history in the batch: attention cost follows the real length.
        let longest = inputs.iter().map(|i| i.items.len()).max().unwrap_or(1).max(1);
        let batch = SeqBatch::for_inference(&inputs, longest, self.config.layers)?;
        Ok(self.net.encode(&batch, &cache.table, true, &mut Mode::Eval)?.squeeze(1)?)
    }

    /// Query vectors (`[B, H]`, row-major) of a batch of queries: the encoder alone.
    pub fn query_vectors(&mut self, queries: &[Query]) -> Result<Vec<f32>, SasRecError> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.encode(queries)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Query vectors (`[B, H]`) and scores of every model item (`[B, items]` logits, in model
    /// order), both row-major, for a batch of queries.
    pub fn forward(&mut self, queries: &[Query]) -> Result<(Vec<f32>, Vec<f32>), SasRecError> {
        if queries.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let q = self.encode(queries)?;
        let cache = self.cache.as_ref().expect("encode fills the cache");
        let items = self.config.items;
        let bias = Tensor::from_slice(&cache.bias, items, &Device::Cpu)?;
        let logits = q.matmul(&cache.table.narrow(0, 1, items)?.t()?)?.broadcast_add(&bias)?;
        Ok((q.flatten_all()?.to_vec1::<f32>()?, logits.flatten_all()?.to_vec1::<f32>()?))
    }

    /// The saved form: safetensors weights, vocabulary and manifest. Fills in the manifest's
    /// format, weights digest, version (see [`SavedModel::new`]), config and serving settings,
    /// and adopts the version.
    pub fn to_saved(&mut self, manifest: &mut Manifest) -> Result<SavedModel, ModelFileError> {
        if self.serving_copy {
            return Err(SasRecError::Config(
                "a serving copy of a model cannot be saved; load its version again".to_owned(),
            )
            .into());
        }
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

    /// Brings the catalogue map up to date (see [`CatalogMap`]): new items are appended (and
    /// added to the retrieval index), unseen items' vectors are refreshed every
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
        let old = self.catalog_map.row.len();
        let stale = !self.catalog_map.cold.is_empty()
            && self
                .catalog_map
                .refreshed
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(self.serve.cold_refresh_secs));
        let two_stage = self.two_stage(n);
        if n == old && !stale {
            if two_stage && matches!(self.index, IndexState::Absent) {
                self.start_index_build();
            }
            return Ok(());
        }
        self.cache()?;
        let h = self.config.hidden;
        let new_ids = catalog.ids_of(&(old as ItemIdx..n as ItemIdx).collect::<Vec<_>>());
        // Vectors of unseen items: new ones, and the known ones when refreshing.
        let mut fresh: Vec<(ItemIdx, Vec<f32>)> = Vec::new();
        {
            let mean_id = &self.cache.as_ref().expect("cache filled above").mean_id;
            let unseen = new_ids
                .iter()
                .enumerate()
                .filter(|(_, id)| !self.item_index.contains_key(id.as_str()))
                .map(|(i, _)| (old + i) as ItemIdx)
                .chain(if stale { self.catalog_map.cold.clone() } else { Vec::new() });
            for c in unseen {
                let attrs = catalog.get(&catalog.ids_of(&[c])[0]).map(ItemAttributes::from).unwrap_or_default();
                let content = self.cold_vector(&attrs)?;
                fresh.push((c, content.iter().zip(mean_id).map(|(a, b)| a + b).collect()));
            }
        }
        let fresh: HashMap<ItemIdx, Vec<f32>> = fresh.into_iter().collect();
        let cache = self.cache.as_ref().expect("cache filled above");
        let map = &mut self.catalog_map;
        if stale {
            for (slot, c) in map.cold.iter().enumerate() {
                map.cold_vectors[slot * h..(slot + 1) * h].copy_from_slice(&fresh[c]);
            }
        }
        map.row.reserve(new_ids.len());
        map.bias.reserve(new_ids.len());
        for (i, id) in new_ids.iter().enumerate() {
            let c = (old + i) as ItemIdx;
            match self.item_index.get(id.as_str()).copied() {
                Some(m) => {
                    map.row.push(m);
                    map.bias.push(cache.bias[m as usize - 1]);
                }
                None => {
                    map.row.push(COLD | map.cold.len() as u32);
                    map.cold.push(c);
                    map.cold_vectors.extend_from_slice(&fresh[&c]);
                    map.bias.push(cache.mean_bias);
                }
            }
        }
        map.refreshed = Some(Instant::now());
        if let IndexState::Ready(index) = &mut self.index {
            // New items join the index and the popularity order without a rebuild; refreshed
            // unseen items keep their first vector there (they are candidates by content
            // anyway) and are scored with the fresh one.
            let map = &self.catalog_map;
            with_values(&cache.table, |table| {
                let vectors = Vectors { table, cold: &map.cold_vectors, row: &map.row, h };
                for c in index.items..n {
                    index.ann.add(c as ItemIdx, vectors.of(c), map.bias[c]);
                    index.popular_all.push(c as ItemIdx);
                }
            })?;
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
                let m = self.catalog_map.model_item(h.item as usize)?;
                Some(Token {
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
        let cache = self.cache()?;
        let (table, popularity) = (cache.table.clone(), cache.popularity.clone());
        let q_values = match &q {
            Some(q) => q.flatten_all()?.to_vec1::<f32>()?,
            None => Vec::new(),
        };
        let batch = Batch { requests, tokens: &tokens, q: &q_values, row_of: &row_of };
        if self.retrieval_ready() {
            return with_values(&table, |table| self.score_candidates(batch, catalog, table, &popularity));
        }
        // Exact scoring: every model item's logit from one matrix product with the table,
        // read in place (transposed), then every catalogue item through the catalogue map.
        let logits = match &q {
            Some(q) => Some(q.matmul(&table.narrow(0, 1, self.config.items)?.t()?)?.contiguous()?),
            None => None,
        };
        let empty = Tensor::zeros(0, DType::F32, &Device::Cpu)?;
        with_values(logits.as_ref().unwrap_or(&empty), |logits| {
            with_values(&table, |table| self.score_exact(batch, catalog, logits, table, &popularity))
        })?
    }

    /// See [`Recommender::similar`].
    fn similar_exact(
        &mut self,
        item: ItemIdx,
        k: usize,
        filter: &ItemFilter,
        catalog: &Catalog,
    ) -> Result<Vec<Scored>, SasRecError> {
        self.sync_catalog(catalog)?;
        let table = self.cache()?.table.clone();
        let map = &self.catalog_map;
        let h = self.config.hidden;
        with_values(&table, |table| {
            let vectors = Vectors { table, cold: &map.cold_vectors, row: &map.row, h };
            let Some(query) = vectors.get(item as usize) else { return Vec::new() };
            let categories = catalog.categories();
            let now_ms = crate::event::now_ms();
            let n = map.row.len();
            let mut scores = vec![0f32; n];
            let mut mask = vec![false; n];
            for (c, (s, m)) in scores.iter_mut().zip(mask.iter_mut()).enumerate() {
                *m = c == item as usize || !filter.accepts(c as ItemIdx, &categories, now_ms);
                if !*m {
                    *s = cosine(query, vectors.of(c));
                }
            }
            top_k(&scores, &mask, k)
        })
    }

    /// Exact full scoring (small catalogues, and large ones while the index builds): the
    /// serving blend over every catalogue item. `logits` are the warm queries' `[rows, items]`
    /// logits of the model's items.
    fn score_exact(
        &self,
        batch: Batch<'_>,
        catalog: &Catalog,
        logits: &[f32],
        table: &[f32],
        popularity: &[Vec<f32>],
    ) -> Vec<Vec<Scored>> {
        let Batch { requests, tokens, q, row_of } = batch;
        let map = &self.catalog_map;
        let (h, items, n) = (self.config.hidden, self.config.items, map.row.len());
        let vectors = Vectors { table, cold: &map.cold_vectors, row: &map.row, h };
        let categories = catalog.categories();
        let now_ms = crate::event::now_ms();
        let global = popularity.len() - 1;

        let mut out = Vec::with_capacity(requests.len());
        let mut scores = vec![0f32; n];
        let mut mask = vec![false; n];
        for (ri, request) in requests.iter().enumerate() {
            let popular = &popularity[request.segment.min(global)];
            if let Some(row) = row_of[ri] {
                // w * softmax(logits) + (1 - w) * popularity, in one pass after the max.
                let n_hist = tokens[ri].len() as f32;
                let w = n_hist / (n_hist + self.serve.blend_history.max(f32::MIN_POSITIVE));
                let logit_row = &logits[row * items..(row + 1) * items];
                let query = &q[row * h..(row + 1) * h];
                for (((s, &r), &b), c) in scores.iter_mut().zip(&map.row).zip(&map.bias).zip(0..) {
                    let l = if r & COLD == 0 { logit_row[r as usize - 1] } else { dot(query, vectors.of(c)) };
                    *s = l + b;
                }
                let max = max_of(&scores);
                for s in scores.iter_mut() {
                    *s = fast_exp(*s - max);
                }
                let scale = w / sum_of(&scores).max(f32::MIN_POSITIVE);
                for (c, s) in scores.iter_mut().enumerate() {
                    *s = *s * scale + (1.0 - w) * popularity_of(popular, &map.row, c);
                }
            } else {
                // No usable history: popularity in the request's segment alone.
                for (c, s) in scores.iter_mut().enumerate() {
                    *s = popularity_of(popular, &map.row, c);
                }
            }
            // Negative feedback: lower items similar to the disliked ones.
            if self.serve.negative_weight > 0.0 && !request.negatives.is_empty() {
                let negs: Vec<&[f32]> = request.negatives.iter().filter_map(|&i| vectors.get(i as usize)).collect();
                if !negs.is_empty() {
                    for (c, s) in scores.iter_mut().enumerate() {
                        let sim = negs.iter().map(|n| cosine(n, vectors.of(c))).fold(0.0f32, f32::max);
                        *s *= 1.0 - (self.serve.negative_weight * sim).clamp(0.0, 1.0);
                    }
                }
            }
            fill_mask(&mut mask, request, &categories, now_ms);
            out.push(top_k(&scores, &mask, request.k));
        }
        out
    }

    /// Two-stage scoring (docs/model.md, "Two-stage retrieval"): the batch's requests split in
    /// up to `retrieval.threads` runs of at least [`MIN_SHARD`] warm requests, each scored by
    /// [`TwoStage::score`] with a scratch of its own on a worker of the compute pool (the
    /// index, the table and the catalogue are only read).
    fn score_candidates(
        &mut self,
        batch: Batch<'_>,
        catalog: &Catalog,
        table: &[f32],
        popularity: &[Vec<f32>],
    ) -> Vec<Vec<Scored>> {
        let IndexState::Ready(index) = &self.index else { return vec![Vec::new(); batch.requests.len()] };
        let view = catalog.categories();
        let stage = TwoStage {
            index,
            map: &self.catalog_map,
            h: self.config.hidden,
            config: &self.retrieval,
            serve: &self.serve,
            table,
            popularity,
            view: &view,
            now_ms: crate::event::now_ms(),
        };
        let warm = batch.row_of.iter().flatten().count();
        let shards = scoring_threads(self.retrieval.threads).min(warm / MIN_SHARD).max(1);
        if self.scratch.len() < shards {
            self.scratch.resize_with(shards, Scratch::default);
        }
        // Parts with equal numbers of warm requests (cold ones cost little), in request order.
        let warm_at: Vec<usize> = (0..batch.requests.len()).filter(|&i| batch.row_of[i].is_some()).collect();
        let mut starts: Vec<usize> = (0..shards).map(|s| if s == 0 { 0 } else { warm_at[s * warm / shards] }).collect();
        starts.push(batch.requests.len());
        let ranges: Vec<std::ops::Range<usize>> = starts.windows(2).map(|w| w[0]..w[1]).collect();
        // Every part on the compute pool (the workers candle's matrix products just ran on), the
        // caller waiting: no thread started per batch, and no idle pool thread spinning beside
        // threads of our own on the same cores.
        let mut parts: Vec<Part<'_>> = ranges
            .into_iter()
            .zip(self.scratch.iter_mut())
            .map(|(range, scratch)| Part { range, scratch, lists: Vec::new(), counts: CandidateCounts::default() })
            .collect();
        if let [part] = parts.as_mut_slice() {
            part.lists = stage.score(batch.part(part.range.clone()), part.scratch, &mut part.counts);
        } else {
            let (stage, batch) = (&stage, &batch);
            rayon::scope(|scope| {
                for part in &mut parts {
                    scope.spawn(move |_| {
                        part.lists = stage.score(batch.part(part.range.clone()), part.scratch, &mut part.counts);
                    });
                }
            });
        }
        let mut out = Vec::with_capacity(batch.requests.len());
        for part in parts {
            out.extend(part.lists);
            self.candidate_counts.merge(&part.counts);
        }
        out
    }
}

/// One part of a two-stage batch: its requests, its scratch, and what scoring them gave.
struct Part<'a> {
    range: std::ops::Range<usize>,
    scratch: &'a mut Scratch,
    lists: Vec<Vec<Scored>>,
    counts: CandidateCounts,
}

/// Warm requests per part, at least: below it handing a part to the pool costs more than it
/// saves (a warm request costs some 100 µs at 10^6 items).
const MIN_SHARD: usize = 8;

/// Parts a two-stage batch is split into: `configured`, or for 0 one per thread of the compute
/// pool (`RAYON_NUM_THREADS`, which `liverec` fixes at start to candle's count of cores), but
/// no more than the CPUs this process may use (candle counts the machine's cores, blind to a
/// container's CPU limit). Asked of the system once: on Linux the answer reads cgroup files.
fn scoring_threads(configured: usize) -> usize {
    static PARTS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    match configured {
        0 => *PARTS.get_or_init(|| {
            let usable = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
            rayon::current_num_threads().min(usable)
        }),
        n => n,
    }
}

/// What every part of a two-stage batch reads: shared by the pool's workers.
struct TwoStage<'a> {
    index: &'a RetrievalIndex,
    map: &'a CatalogMap,
    h: usize,
    config: &'a RetrievalConfig,
    serve: &'a ServeConfig,
    table: &'a [f32],
    popularity: &'a [Vec<f32>],
    view: &'a crate::catalog::Categories<'a>,
    now_ms: i64,
}

impl TwoStage<'_> {
    /// Candidates from the ANN index (one batched search for the part's warm queries), the
    /// segment's popular items and new items by content, filtered as they are gathered; then
    /// the serving blend over the candidates only, with the softmax normaliser estimated for
    /// the whole catalogue.
    fn score(&self, batch: Batch<'_>, scratch: &mut Scratch, counts: &mut CandidateCounts) -> Vec<Vec<Scored>> {
        let Batch { requests, tokens, q, row_of } = batch;
        let TwoStage { index, map, h, config, serve, table, popularity, view, now_ms } = *self;
        let n = map.bias.len();
        let vectors = Vectors { table, cold: &map.cold_vectors, row: &map.row, h };
        let global = popularity.len() - 1;
        let logit = |query: &[f32], c: ItemIdx| dot(query, vectors.of(c as usize)) + map.bias[c as usize];
        // The part's warm queries are consecutive rows of `q`, from `base`.
        let base = row_of.iter().flatten().next().copied().unwrap_or(0);
        // Nearest neighbours of every warm query, each list of the index scanned once for all
        // the queries that probe it. The filter is the request's, its exclusions a sorted list;
        // a bit per item excluded by any request of the part comes first, so that most items
        // cost one bit test instead of a binary search (a sixth of the time at 10^6 items).
        let warm: Vec<usize> = (0..requests.len()).filter(|&i| row_of[i].is_some()).collect();
        scratch.blocked_sorted.resize_with(warm.len(), Vec::new);
        for (row, &ri) in warm.iter().enumerate() {
            let blocked = &mut scratch.blocked_sorted[row];
            blocked.clear();
            blocked.extend(requests[ri].exclude.iter().chain(&requests[ri].negatives));
            blocked.sort_unstable();
            blocked.iter().for_each(|&c| scratch.blocked.set(c));
        }
        let unblocked = Bits::default();
        let filters: Vec<Filter<'_>> = warm
            .iter()
            .map(|&ri| Filter {
                blocked: &unblocked,
                categories: requests[ri].categories.as_deref(),
                view,
                now_ms,
                items: n,
            })
            .collect();
        let (blocked_sorted, any_blocked) = (&scratch.blocked_sorted, &scratch.blocked);
        index.ann.search_batch(
            &q[base * h..(base + warm.len()) * h],
            config.ann_candidates,
            config.ann_probe,
            |row, c| !(any_blocked.get(c) && blocked_sorted[row].binary_search(&c).is_ok()) && filters[row].accepts(c),
            &mut scratch.found,
        );
        for blocked in &scratch.blocked_sorted[..warm.len()] {
            blocked.iter().for_each(|&c| scratch.blocked.clear(c));
        }
        let mut out = Vec::with_capacity(requests.len());
        for (ri, request) in requests.iter().enumerate() {
            for &i in request.exclude.iter().chain(&request.negatives) {
                scratch.blocked.set(i);
            }
            let filter =
                Filter { blocked: &scratch.blocked, categories: request.categories.as_deref(), view, now_ms, items: n };
            let query = row_of[ri].map(|row| &q[row * h..(row + 1) * h]);
            let candidates = &mut scratch.candidates;
            candidates.clear();
            if let Some(row) = row_of[ri] {
                counts.add(Source::Ann, scratch.found[row - base].len());
                for &(c, _) in &scratch.found[row - base] {
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
            let popular = &popularity[request.segment.min(global)];
            let items = &candidates.items;
            let logits = &mut scratch.logits;
            logits.clear();
            if let Some(query) = query {
                // The candidates' and the excluded items' rows lie scattered over the whole
                // table: ask for them all before reading any (most of this loop's time at
                // 10^6 items was one cache miss after another).
                for &c in items.iter().chain(request.exclude.iter().take(EXCLUDED_EXACT)) {
                    if (c as usize) < n {
                        prefetch(vectors.of(c as usize));
                        prefetch(std::slice::from_ref(&map.bias[c as usize]));
                    }
                }
                let n_hist = tokens[ri].len() as f32;
                let w = n_hist / (n_hist + serve.blend_history.max(f32::MIN_POSITIVE));
                logits.extend(items.iter().map(|&c| logit(query, c)));
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // The softmax normaliser over the whole catalogue: the candidates exactly, the
                // excluded items exactly (up to EXCLUDED_EXACT of them: history items carry
                // much of the mass), the rest estimated from a uniform sample.
                let mut z: f32 = logits.iter().map(|&l| fast_exp(l - max)).sum();
                let (mut tail, mut tail_n) = (0f32, 0usize);
                for (&c, v) in index.tail_sample.iter().zip(index.tail_vectors.chunks_exact(h)) {
                    if (c as usize) < n && !candidates.contains(c) && !scratch.blocked.get(c) {
                        tail += fast_exp(dot(query, v) + map.bias[c as usize] - max);
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
                    *l = fast_exp(*l - max) * scale + (1.0 - w) * popularity_of(popular, &map.row, c as usize);
                }
            } else {
                logits.extend(items.iter().map(|&c| popularity_of(popular, &map.row, c as usize)));
            }
            for &c in request.exclude.iter().chain(&request.negatives) {
                scratch.blocked.clear(c);
            }
            if serve.negative_weight > 0.0 && !request.negatives.is_empty() {
                let negs: Vec<&[f32]> = request.negatives.iter().filter_map(|&i| vectors.get(i as usize)).collect();
                if !negs.is_empty() {
                    for (s, &c) in logits.iter_mut().zip(items) {
                        let sim = negs.iter().map(|n| cosine(n, vectors.of(c as usize))).fold(0.0f32, f32::max);
                        *s *= 1.0 - (serve.negative_weight * sim).clamp(0.0, 1.0);
                    }
                }
            }
            let mut scored: Vec<Scored> = items
                .iter()
                .zip(logits.iter())
                .filter(|(_, s)| s.is_finite())
                .map(|(&item, &score)| Scored { item, score })
                .collect();
            let best_first = |a: &Scored, b: &Scored| b.score.total_cmp(&a.score).then(a.item.cmp(&b.item));
            if request.k > 0 && scored.len() > request.k {
                scored.select_nth_unstable_by(request.k - 1, best_first);
            }
            scored.truncate(request.k);
            scored.sort_unstable_by(best_first);
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
        if !self.retrieval.same_candidates(config) {
            self.index = IndexState::Absent;
        }
        self.retrieval = config.clone();
    }

    fn take_candidate_counts(&mut self) -> CandidateCounts {
        std::mem::take(&mut self.candidate_counts)
    }

    /// The items whose vectors (the item table the network reads and scores with) are closest
    /// to the item's by cosine: one pass over the catalogue (unseen items by their content
    /// vectors), on the inference thread like a scoring batch.
    fn similar(&mut self, item: ItemIdx, k: usize, filter: &ItemFilter, catalog: &Catalog) -> Vec<Scored> {
        match self.similar_exact(item, k, filter, catalog) {
            Ok(list) => list,
            Err(error) => {
                tracing::error!(error = %error, "sequential model failed to find similar items");
                Vec::new()
            }
        }
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
    fn similar_items_are_the_nearest_item_vectors() {
        let mut model = tiny();
        let catalog = Catalog::new();
        let idx = intern_vocab(&model.vocab, &catalog);
        let similar = model.similar(idx[1], 10, &ItemFilter::default(), &catalog);
        assert_eq!(similar.len(), idx.len() - 1, "every other item");
        assert!(similar.iter().all(|s| s.item != idx[1]), "never the item itself");
        // By cosine of the item table's rows (what the network scores with), best first.
        let rows = model.net().item_table().rows(model.item_features()).expect("rows");
        let h = model.config.hidden;
        let row = |c: ItemIdx| {
            let m = model.catalog_map.model_item(c as usize).expect("a model item") as usize;
            rows[m * h..(m + 1) * h].to_vec()
        };
        for s in &similar {
            assert!((s.score - cosine(&row(idx[1]), &row(s.item))).abs() < 1e-5, "{s:?}");
        }
        assert!(similar.windows(2).all(|w| w[0].score >= w[1].score));
        let comedy = catalog.category_idx("comedy").expect("category");
        let filter = ItemFilter { categories: Some(vec![comedy]), ..ItemFilter::default() };
        let comedies = model.similar(idx[1], 10, &filter, &catalog);
        assert!(!comedies.is_empty() && comedies.len() < similar.len());
        assert!(comedies.iter().all(|s| catalog.categories().of(s.item).contains(&comedy)));
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
    fn a_change_of_scoring_threads_alone_keeps_the_index() {
        let (mut model, catalog, _) = larger(200, forced(30, 2));
        model.prepare(&catalog).expect("index built");
        model.configure_retrieval(&RetrievalConfig { threads: 3, ..forced(30, 2) });
        assert!(model.retrieval_ready(), "same candidates: the index stays");
        assert_eq!(model.retrieval.threads, 3);
        model.configure_retrieval(&RetrievalConfig { ann_list_size: 40, ..forced(30, 2) });
        assert!(!model.retrieval_ready(), "another list size: the index is rebuilt");
    }

    #[test]
    fn a_batch_split_over_threads_scores_as_on_one() {
        let n = 400;
        let (mut one, catalog, idx) = larger(n, RetrievalConfig { threads: 1, ..forced(30, 2) });
        let (mut four, _, _) = larger(n, RetrievalConfig { threads: 4, ..forced(30, 2) });
        one.prepare(&catalog).expect("index built");
        four.prepare(&catalog).expect("index built");
        // 36 warm users and 4 cold ones spread through the batch, one with a dislike and one
        // with a category filter.
        let mut requests: Vec<ScoreRequest> = (0..40)
            .map(|u| {
                if u % 10 == 9 {
                    request(&[], u % 6, 10)
                } else {
                    request(&[idx[u], idx[u * 7 + 1], idx[u * 3 + 50]], u % 6, 10)
                }
            })
            .collect();
        requests[5].negatives = vec![idx[99]];
        requests[22].categories = Some(vec![catalog.category_idx("comedy").expect("category")]);
        let a = one.score(&requests, &catalog);
        let b = four.score(&requests, &catalog);
        assert_eq!(four.scratch.len(), 4, "four threads, nine warm requests each");
        assert_eq!(one.scratch.len(), 1);
        assert_eq!(a.len(), 40);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.len(), 10);
            assert_eq!(ids(x), ids(y));
            assert_eq!(
                x.iter().map(|s| s.score.to_bits()).collect::<Vec<_>>(),
                y.iter().map(|s| s.score.to_bits()).collect::<Vec<_>>()
            );
        }
        let (ca, cb) = (one.take_candidate_counts(), four.take_candidate_counts());
        for source in [Source::Ann, Source::Popular, Source::Cold] {
            assert_eq!(ca.get(source), cb.get(source), "{source:?}");
        }
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
    fn a_serving_copy_scores_as_the_whole_model_without_the_id_embedding() {
        let n = 300;
        let (mut whole, catalog, idx) = larger(n, forced(20, 2));
        let (mut serving, _, _) = larger(n, forced(20, 2));
        whole.prepare(&catalog).expect("index built");
        serving.prepare(&catalog).expect("index built");
        let weights = |m: &SequentialModel| m.memory_breakdown()[0].1;
        let before = weights(&serving);
        serving.for_serving(&catalog).expect("serving copy");
        assert!(serving.is_serving_copy() && !whole.is_serving_copy());
        assert_eq!(before - weights(&serving), (n + 1) * serving.config.hidden * 4, "the id embedding went");
        assert!(serving.vocab.popularity.global.is_empty() && serving.vocab.items.is_empty());

        // The same lists: exact and two-stage, a cold user, similar items, and an item that
        // arrives after the copy was made (its vector comes from its attributes).
        let (new_item, _) = catalog.put(
            &ItemId::from("new"),
            ItemAttributes { categories: vec!["comedy".into()], ..ItemAttributes::default() },
        );
        let requests = [request(&[idx[1], idx[7]], 0, 10), request(&[], 4, 10), request(&[idx[3]], 4, 50)];
        let (a, b) = (whole.score(&requests, &catalog), serving.score(&requests, &catalog));
        assert_eq!(a, b);
        assert!(b.iter().all(|list| !list.is_empty()));
        for item in [idx[2], new_item] {
            let similar = serving.similar(item, 10, &ItemFilter::default(), &catalog);
            assert_eq!(similar.len(), 10);
            assert_eq!(whole.similar(item, 10, &ItemFilter::default(), &catalog), similar);
        }

        // What needs the whole weights says so instead of writing or training a broken model.
        let saved = serving.to_saved(&mut manifest()).expect_err("not saved");
        assert!(saved.to_string().contains("serving copy"), "{saved}");
        let (mut fresh, _, _) = larger(n, forced(20, 2));
        let warm = crate::models::train::warm_start(&mut fresh, &serving).expect_err("no warm start");
        assert!(warm.to_string().contains("serving copy"), "{warm}");
        serving.weights_changed();
        assert_eq!(serving.score(&requests, &catalog), b, "a serving copy keeps the only tables it has");
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
        let map = &model.catalog_map;
        let table = &model.cache.as_ref().expect("cache").table;
        let v = with_values(table, |table| {
            Vectors { table, cold: &map.cold_vectors, row: &map.row, h }.of(new_item as usize).to_vec()
        })
        .expect("values");
        let v = &v[..];
        let mut found = Vec::new();
        index.ann.search(v, n + 1, index.ann.lists(), |c| c == new_item, &mut found);
        assert_eq!(found.len(), 1);
        assert_eq!(model.catalog_map.cold, vec![new_item]);
    }
}
