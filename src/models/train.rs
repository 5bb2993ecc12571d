//! Training of the sequential model (`liverec train`).
//!
//! Each user's training sequence is cut into windows of `max_len` inputs, tiled back from its
//! end, and every position predicts the next item: full softmax cross-entropy over the whole
//! catalogue (with label smoothing), mini-batches, candle-nn's AdamW (weight decay on weight
//! matrices only), linear warm-up then cosine decay of the learning rate, and early stopping on
//! validation NDCG@10. Model selection: the `select_window` consecutive evaluations with the
//! best mean validation NDCG@10, their weights averaged (`super::selection`); or, with
//! `include_valid`, a fixed number of epochs on training and validation data together.
//!
//! Augmentation: each epoch, all windows but the newest start at a random shift, so the model
//! sees each item with different context lengths across epochs; the user's demographic segment
//! is hidden with probability `user_dropout` so the model also works without it (as in serving).
//!
//! Reproducibility: every random draw (initialisation, shuffling, shifts, dropout masks) comes
//! from one RNG seeded by `seed`; the same data, config and seed give the same weights.
//!
//! The optimiser's moments are not saved with the weights (candle's `AdamW` does not expose
//! them); a warm start from saved weights starts with fresh moments.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::artifact::{ServeConfig, TrainingSummary, Vocab};
use super::data::{Dataset, Part, Split};
use super::eval::{evaluate, SequentialRanker};
use super::metrics::Metrics;
use super::sasrec::{
    feedback_index, hour_bucket, segment_at, Config, ItemFeatures, Mode, SasRec, SasRecError, SeqBatch, SeqInput,
};
use super::selection::{middle, reduce_checkpoints, Checkpoint, Selector};
use super::sequential::SequentialModel;
use super::sparse_ids::SparseIds;
use crate::event::Device as DeviceClass;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] SasRecError),
    #[error(transparent)]
    Eval(#[from] super::eval::EvalError),
    #[error("no training data: every user has fewer than 3 interactions")]
    NoData,
    /// A `[train]` setting out of range; `key` is the setting's name as typed in the file.
    #[error("train.{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl From<candle_core::Error> for TrainError {
    fn from(error: candle_core::Error) -> Self {
        Self::Model(SasRecError::Candle(error))
    }
}

/// Optimisation settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Seeds initialisation, shuffling, augmentation and dropout.
    pub seed: u64,
    /// Most epochs to run; also the length of the learning-rate schedule.
    pub epochs: usize,
    /// Stop after this many evaluations without a better validation NDCG@10 (0: never).
    pub patience: usize,
    /// Windows per mini-batch.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine schedule, as a fraction of `lr`.
    pub final_lr_ratio: f64,
    /// Linear warm-up, in epochs.
    pub warmup_epochs: f64,
    /// AdamW decoupled weight decay (weight matrices only; not biases, norms or embeddings).
    pub weight_decay: f64,
    pub beta2: f64,
    /// Cross-entropy label smoothing.
    pub label_smoothing: f32,
    /// Probability of hiding the user's demographic segment in a training window.
    pub user_dropout: f32,
    /// Randomly shift the window boundaries each epoch.
    pub shift_windows: bool,
    /// Evaluate on validation every this many epochs.
    pub eval_every: usize,
    /// Model selection: the `select_window` consecutive evaluations with the highest mean
    /// validation NDCG@10 are selected (1: the single best evaluation, the noisy argmax). The
    /// kept weights are their average (`average_checkpoints`) or the middle one's. Patience
    /// counts evaluations without a better window.
    pub select_window: usize,
    /// Keep the average of the selected evaluations' weights instead of the middle one's.
    pub average_checkpoints: bool,
    /// Train on the training and validation parts together, for exactly `epochs` epochs, and
    /// keep the last `select_window` epochs' weights (averaged, or the middle one): no
    /// selection on validation, whose metrics are then in-sample. For a final model once the
    /// epoch count was chosen on a run without it.
    pub include_valid: bool,
    /// Stop after this many seconds of training (0: no limit). Makes the result depend on the
    /// machine's speed, so it is off by default.
    pub time_budget_secs: f64,
    /// Catalogue size (items the model knows) from which training uses a sampled softmax with a
    /// popularity (log-Q) correction instead of the full softmax (0: never). The default keeps
    /// the full softmax on MovieLens-sized catalogues.
    pub sampled_softmax_min_items: usize,
    /// Negatives drawn per mini-batch for the sampled softmax, shared by all its rows.
    pub sampled_negatives: usize,
    /// Negatives are drawn in proportion to `training count ^ sampled_alpha` (0: uniform,
    /// 1: by popularity).
    pub sampled_alpha: f64,
}

impl TrainConfig {
    /// Rejects settings that would make training fail or silently do nothing useful.
    pub fn validate(&self) -> Result<(), TrainError> {
        let invalid = |key, reason: &str| Err(TrainError::Invalid { key, reason: reason.to_owned() });
        if self.sampled_softmax_min_items > 0 && self.sampled_negatives == 0 {
            return invalid(
                "sampled_negatives",
                "must be at least 1 when sampled_softmax_min_items is set (0 there turns sampling off)",
            );
        }
        if self.select_window == 0 {
            return invalid("select_window", "must be at least 1 (1 keeps the single best evaluation)");
        }
        if !(0.0..=1.0).contains(&self.sampled_alpha) {
            return invalid("sampled_alpha", &format!("must be within 0..=1, got {}", self.sampled_alpha));
        }
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            epochs: 15,
            patience: 10,
            batch_size: 32,
            lr: 2e-3,
            final_lr_ratio: 0.05,
            warmup_epochs: 2.0,
            weight_decay: 0.05,
            beta2: 0.98,
            label_smoothing: 0.1,
            user_dropout: 0.2,
            shift_windows: true,
            eval_every: 1,
            select_window: 3,
            average_checkpoints: true,
            include_valid: false,
            time_budget_secs: 0.0,
            sampled_softmax_min_items: 50_000,
            sampled_negatives: 1024,
            sampled_alpha: 0.75,
        }
    }
}

/// The `--config FILE` of `liverec train` (TOML): every section optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainFile {
    pub model: Config,
    pub train: TrainConfig,
    pub serve: ServeConfig,
}

/// One epoch's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub loss: f64,
    pub valid_ndcg10: Option<f64>,
    /// Seconds of training (the optimisation steps), without the validation pass.
    pub seconds: f64,
    /// Seconds of the validation pass (0 when the epoch had none).
    pub eval_seconds: f64,
}

/// A trained model with its best validation metrics and the training log.
pub struct Trained {
    pub model: SequentialModel,
    pub valid: Metrics,
    pub summary: TrainingSummary,
    pub log: Vec<EpochLog>,
}

/// A user's training sequence as token arrays.
struct UserSeq {
    items: Vec<u32>,
    hours: Vec<u32>,
    feedback: Vec<u32>,
    /// Context segment of each event (the segment of the request that predicts it).
    segments: Vec<u32>,
    user: [u32; 3],
}

/// One training window: inputs `[start, end)` predict targets `[start + 1, end + 1)`.
#[derive(Clone, Copy)]
struct Window {
    user: usize,
    start: usize,
    end: usize,
}

fn windows(seqs: &[UserSeq], len: usize, shift: bool, rng: &mut SmallRng) -> Vec<Window> {
    let mut out = Vec::new();
    for (user, s) in seqs.iter().enumerate() {
        let n = s.items.len();
        if n < 2 {
            continue;
        }
        // Targets are 1..n; the newest window ends at the last target.
        let mut end = n - 1;
        let mut first = true;
        loop {
            let start = end.saturating_sub(len);
            out.push(Window { user, start, end });
            if start == 0 {
                break;
            }
            let offset = if first && shift { rng.random_range(0..len) } else { 0 };
            first = false;
            end = (start + offset).min(end - 1);
        }
    }
    out
}

/// Builds a batch of windows: the sequence inputs and the left-padded targets (0 = none).
fn batch_of(
    seqs: &[UserSeq],
    windows: &[Window],
    len: usize,
    user_dropout: f32,
    rng: &mut SmallRng,
) -> Result<(SeqBatch, Vec<u32>), SasRecError> {
    let mut inputs = Vec::with_capacity(windows.len());
    let mut targets = vec![0u32; windows.len() * len];
    for (r, w) in windows.iter().enumerate() {
        let s = &seqs[w.user];
        let (a, e) = (w.start, w.end);
        let n = e - a;
        let hide = user_dropout > 0.0 && rng.random::<f32>() < user_dropout;
        inputs.push(SeqInput {
            items: s.items[a..e].to_vec(),
            hours: s.hours[a..e].to_vec(),
            feedback: s.feedback[a..e].to_vec(),
            context: s.segments[a + 1..e + 1].to_vec(),
            user: if hide { [0, 0, 0] } else { s.user },
        });
        targets[r * len + (len - n)..(r + 1) * len].copy_from_slice(&s.items[a + 1..e + 1]);
    }
    Ok((SeqBatch::new(&inputs, len, false)?, targets))
}

/// Gradients of the mean cross-entropy with respect to its inputs.
struct CeGrads {
    /// `[T, H]`
    q: Tensor,
    /// `[N, H]`
    items: Tensor,
    /// `[N]`
    bias: Tensor,
}

/// Rows of logits computed at a time: bounds the memory of the `[T, N]` logits.
const CE_CHUNK: usize = 512;

/// Mean label-smoothed softmax cross-entropy of `q . items^T + bias` against `labels` (0-based
/// item indices), and its exact gradients, computed outside candle's autograd.
///
/// Why by hand: through autograd, the full-catalogue log-softmax creates a dozen `[T, N]`
/// temporaries (about 35 MB each on MovieLens) forward and backward, which dominated training
/// time. Here the logits are made in row chunks, turned into `softmax - target` in place, and
/// folded into the three small gradients with two matrix products per chunk.
fn softmax_cross_entropy(
    q: &Tensor,
    items: &Tensor,
    bias: &Tensor,
    labels: &[u32],
    smoothing: f32,
) -> Result<(f64, CeGrads), SasRecError> {
    let q = q.detach();
    let items = items.detach();
    let (t, h) = q.dims2()?;
    let n = items.dim(0)?;
    let items_t = items.t()?.contiguous()?;
    let bias = bias.detach().unsqueeze(0)?;
    let eps = smoothing.clamp(0.0, 1.0);
    let off = eps / n as f32;
    let scale = 1.0 / t.max(1) as f32;
    let mut loss = 0f64;
    let mut grad_q = Vec::with_capacity(t);
    let mut grad_items = Tensor::zeros((n, h), candle_core::DType::F32, &Device::Cpu)?;
    let mut grad_bias = vec![0f32; n];
    for start in (0..t).step_by(CE_CHUNK) {
        let rows = CE_CHUNK.min(t - start);
        let q_chunk = q.narrow(0, start, rows)?;
        let mut g = q_chunk.matmul(&items_t)?.broadcast_add(&bias)?.flatten_all()?.to_vec1::<f32>()?;
        for (r, row) in g.chunks_mut(n).enumerate() {
            let label = labels[start + r] as usize;
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let target = row[label];
            let mut sum = 0f32;
            let mut mean_logit = 0f32;
            for v in row.iter_mut() {
                mean_logit += *v;
                *v = (*v - max).exp();
                sum += *v;
            }
            let lse = max + sum.ln();
            mean_logit /= n as f32;
            loss += f64::from((1.0 - eps) * (lse - target) + eps * (lse - mean_logit));
            let inv = 1.0 / sum;
            for (j, v) in row.iter_mut().enumerate() {
                let y = if j == label { 1.0 - eps + off } else { off };
                *v = (*v * inv - y) * scale;
                grad_bias[j] += *v;
            }
        }
        let g = Tensor::from_vec(g, (rows, n), &Device::Cpu)?;
        grad_q.push(g.matmul(&items)?);
        grad_items = (grad_items + g.t()?.matmul(&q_chunk)?)?;
    }
    Ok((
        loss / t.max(1) as f64,
        CeGrads { q: Tensor::cat(&grad_q, 0)?, items: grad_items, bias: Tensor::from_vec(grad_bias, n, &Device::Cpu)? },
    ))
}

/// Draws the negatives of the sampled softmax, shared by all rows of a mini-batch, and knows
/// each item's probability of being among them (the `Q` of the log-Q correction).
///
/// Draws are with replacement, in proportion to `max(training count, 1) ^ alpha`, then
/// deduplicated, so an item's `Q` is its probability of inclusion, `1 - (1 - p)^draws`.
/// Its own RNG (seeded from the training seed) keeps the full-softmax path's draws unchanged.
struct NegativeSampler {
    /// Running sum of the sampling weights, one per item (0-based index).
    cumulative: Vec<f64>,
    /// `ln Q` of each item, precomputed.
    log_q: Vec<f32>,
    draws: usize,
    rng: SmallRng,
}

impl NegativeSampler {
    fn new(counts: &[u64], alpha: f64, draws: usize, seed: u64) -> Self {
        let weights: Vec<f64> = counts.iter().map(|&c| (c.max(1) as f64).powf(alpha)).collect();
        let total: f64 = weights.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        let mut acc = 0.0;
        let cumulative = weights
            .iter()
            .map(|w| {
                acc += w;
                acc
            })
            .collect();
        let log_q = weights
            .iter()
            .map(|w| {
                // 1 - (1 - p)^draws without cancellation for small p.
                let q = -(draws as f64 * (-(w / total)).ln_1p()).exp_m1();
                q.max(f64::MIN_POSITIVE).ln() as f32
            })
            .collect();
        Self { cumulative, log_q, draws, rng: SmallRng::seed_from_u64(seed) }
    }

    /// One mini-batch's negatives: sorted, without duplicates.
    fn sample(&mut self) -> Vec<u32> {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let last = self.cumulative.len().saturating_sub(1);
        let mut out: Vec<u32> = (0..self.draws)
            .map(|_| {
                let x = self.rng.random::<f64>() * total;
                self.cumulative.partition_point(|&c| c <= x).min(last) as u32
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// Logits of the sampled softmax, `[T, 1 + S]` row-major: column 0 is the row's positive, then
/// one column per negative; a negative equal to the row's positive (an accidental hit) is
/// `-inf`. With `correction` (`ln Q` of each item, indexed like `items`), every logit has
/// `ln Q(item)` subtracted. Also returns the
/// negatives' item rows `[S, H]` and the positives' item rows `[T, H]`.
fn sampled_logits(
    q: &Tensor,
    items: &Tensor,
    bias: &Tensor,
    labels: &[u32],
    negatives: &[u32],
    correction: Option<&[f32]>,
) -> Result<(Vec<f32>, Tensor, Tensor), SasRecError> {
    let (t, s) = (labels.len(), negatives.len());
    let neg_rows = items.index_select(&Tensor::from_slice(negatives, s, &Device::Cpu)?, 0)?;
    let pos_rows = items.index_select(&Tensor::from_slice(labels, t, &Device::Cpu)?, 0)?;
    let neg = q.matmul(&neg_rows.t()?)?.flatten_all()?.to_vec1::<f32>()?;
    let pos = (q * &pos_rows)?.sum(1)?.to_vec1::<f32>()?;
    let bias = bias.to_vec1::<f32>()?;
    let shift = |j: u32| bias[j as usize] - correction.map_or(0.0, |c| c[j as usize]);
    let neg_shift: Vec<f32> = negatives.iter().map(|&j| shift(j)).collect();
    let mut out = Vec::with_capacity(t * (s + 1));
    for (r, &label) in labels.iter().enumerate() {
        out.push(pos[r] + shift(label));
        for (c, &j) in negatives.iter().enumerate() {
            out.push(if j == label { f32::NEG_INFINITY } else { neg[r * s + c] + neg_shift[c] });
        }
    }
    Ok((out, neg_rows, pos_rows))
}

/// [`softmax_cross_entropy`] over each row's positive and the batch's shared `negatives`
/// (0-based item indices, without duplicates) instead of the whole catalogue: the logits are
/// `[T, 1 + S]` instead of `[T, N]`. Label smoothing spreads `smoothing` over the row's
/// columns (accidental hits excluded), so with every item as a negative and no correction the
/// loss and gradients are the full softmax's. The gradients are scattered back to `[N, H]`
/// and `[N]` (rows of items neither sampled nor a label stay zero), so they feed the same
/// surrogate as the full softmax's.
fn sampled_softmax_cross_entropy(
    q: &Tensor,
    items: &Tensor,
    bias: &Tensor,
    labels: &[u32],
    negatives: &[u32],
    correction: Option<&[f32]>,
    smoothing: f32,
) -> Result<(f64, CeGrads), SasRecError> {
    let (q, items, bias) = (q.detach(), items.detach(), bias.detach());
    let (t, h) = q.dims2()?;
    let n = items.dim(0)?;
    let s = negatives.len();
    let k = s + 1;
    let (mut g, neg_rows, pos_rows) = sampled_logits(&q, &items, &bias, labels, negatives, correction)?;
    let eps = smoothing.clamp(0.0, 1.0);
    let scale = 1.0 / t.max(1) as f32;
    let mut loss = 0f64;
    for (row, &label) in g.chunks_mut(k).zip(labels) {
        let active = row.iter().filter(|v| v.is_finite()).count();
        let off = eps / active as f32;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let target = row[0];
        let mut sum = 0f32;
        let mut mean_logit = 0f32;
        for v in row.iter_mut() {
            if v.is_finite() {
                mean_logit += *v;
                *v = (*v - max).exp();
                sum += *v;
            } else {
                *v = 0.0;
            }
        }
        let lse = max + sum.ln();
        mean_logit /= active as f32;
        loss += f64::from((1.0 - eps) * (lse - target) + eps * (lse - mean_logit));
        let inv = 1.0 / sum;
        for (c, v) in row.iter_mut().enumerate() {
            // An accidental hit has p = 0 and no target mass: its gradient stays 0.
            if c > 0 && negatives[c - 1] == label {
                continue;
            }
            let y = if c == 0 { 1.0 - eps + off } else { off };
            *v = (*v * inv - y) * scale;
        }
    }
    let g = Tensor::from_vec(g, (t, k), &Device::Cpu)?;
    let g_pos = g.narrow(1, 0, 1)?.contiguous()?;
    let g_neg = g.narrow(1, 1, s)?.contiguous()?;
    let neg_ids = Tensor::from_slice(negatives, s, &Device::Cpu)?;
    let pos_ids = Tensor::from_slice(labels, t, &Device::Cpu)?;
    let grad_q = (g_neg.matmul(&neg_rows)? + pos_rows.broadcast_mul(&g_pos)?)?;
    let grad_items = Tensor::zeros((n, h), candle_core::DType::F32, &Device::Cpu)?
        .index_add(&neg_ids, &g_neg.t()?.matmul(&q)?, 0)?
        .index_add(&pos_ids, &q.broadcast_mul(&g_pos)?, 0)?;
    let grad_bias = Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu)?
        .index_add(&neg_ids, &g_neg.sum(0)?, 0)?
        .index_add(&pos_ids, &g_pos.squeeze(1)?, 0)?;
    Ok((loss / t.max(1) as f64, CeGrads { q: grad_q, items: grad_items, bias: grad_bias }))
}

/// The surrogate whose gradient with respect to q, the item rows and their bias is exactly
/// the analytic `grads`: how they enter candle's graph.
fn surrogate(q: &Tensor, items: &Tensor, bias: &Tensor, grads: &CeGrads) -> Result<Tensor, SasRecError> {
    Ok(((q * &grads.q)?.sum_all()? + (items * &grads.items)?.sum_all()?)?.add(&(bias * &grads.bias)?.sum_all()?)?)
}

/// One sampled-softmax step over the item rows it touches: the batch's history items, its
/// labels and the negatives, renumbered to their positions among those rows (row 0, the
/// padding, stays 0), with their attributes.
struct SparseStep {
    /// The step's table rows, ascending, row 0 first.
    rows: Vec<u32>,
    /// Their id embedding rows, a variable of this step (its gradient feeds [`SparseIds`]).
    ids: Var,
    /// Their genres and years, for the attribute part of their vectors.
    features: ItemFeatures,
    /// `rows[1..]` as a tensor, for the bias.
    bias_rows: Tensor,
    /// The batch with its items renumbered.
    batch: SeqBatch,
    /// Labels and negatives as 0-based positions among `rows[1..]`.
    labels: Vec<u32>,
    negatives: Vec<u32>,
}

impl SparseStep {
    fn new(
        ids: &mut SparseIds,
        vocab: &Vocab,
        genres: usize,
        mut batch: SeqBatch,
        labels: &[u32],
        negatives: &[u32],
    ) -> Result<Self, SasRecError> {
        let (b, l) = batch.items.dims2()?;
        let items = batch.items.flatten_all()?.to_vec1::<u32>()?;
        let touched = items.iter().copied().chain(labels.iter().chain(negatives).map(|&i| i + 1));
        let rows = ids.begin(touched).to_vec();
        let local: Vec<u32> = items.iter().map(|&r| ids.local(r)).collect();
        batch.items = Tensor::from_vec(local, (b, l), &Device::Cpu)?;
        let position = |i: &u32| ids.local(i + 1) - 1;
        let item = |r: &u32| *r as usize - 1;
        let features = ItemFeatures::new(
            &rows[1..].iter().map(|r| vocab.item_genres[item(r)].clone()).collect::<Vec<_>>(),
            &rows[1..].iter().map(|r| vocab.item_years[item(r)]).collect::<Vec<_>>(),
            genres,
        )?;
        Ok(Self {
            ids: ids.gather()?,
            features,
            bias_rows: Tensor::from_slice(&rows[1..], rows.len() - 1, &Device::Cpu)?,
            batch,
            labels: labels.iter().map(position).collect(),
            negatives: negatives.iter().map(position).collect(),
            rows,
        })
    }
}

/// Copies the weights of `from` into `model` where they fit: every tensor of the same name and
/// shape; item rows (id embedding, bias) matched by item id, so items both vocabularies know
/// keep what they learned and new items start from the fresh initialisation; genre columns
/// matched by genre name. Returns how many tensors were (at least partly) copied.
pub fn warm_start(model: &mut SequentialModel, from: &SequentialModel) -> Result<usize, TrainError> {
    if from.is_serving_copy() {
        return Err(SasRecError::Config("a serving copy has no item id embedding to warm-start from".to_owned()).into());
    }
    let target = model.varmap.data().lock().expect("varmap lock not poisoned").clone();
    let source = from.varmap.data().lock().expect("varmap lock not poisoned").clone();
    // Row (1-based, 0 is padding) of each new item in the old model.
    let rows: Vec<Option<usize>> = std::iter::once(Some(0))
        .chain(model.vocab.items.iter().map(|id| from.model_item(id).map(|m| m as usize)))
        .collect();
    let columns: Vec<Option<usize>> =
        model.vocab.genres.iter().map(|g| from.vocab.genres.iter().position(|o| o == g)).collect();
    let mut copied = 0;
    for (name, var) in &target {
        let Some(old) = source.get(name) else { continue };
        let (old, new) = (old.as_tensor(), var.as_tensor());
        let value = if name == "items.id.weight" || name == "items.bias" {
            let old_rows = old.dims()[0];
            let width = old.elem_count() / old_rows.max(1);
            if new.elem_count() / new.dims()[0].max(1) != width {
                continue;
            }
            let (old_v, mut new_v) = (old.flatten_all()?.to_vec1::<f32>()?, new.flatten_all()?.to_vec1::<f32>()?);
            for (r, from_row) in rows.iter().enumerate() {
                if let Some(f) = from_row.filter(|&f| f < old_rows) {
                    new_v[r * width..(r + 1) * width].copy_from_slice(&old_v[f * width..(f + 1) * width]);
                }
            }
            Tensor::from_vec(new_v, new.dims(), &Device::Cpu)?
        } else if name == "items.genre.weight" {
            // [hidden, genres]
            let (h, old_g) = old.dims2()?;
            let (new_h, new_g) = new.dims2()?;
            if h != new_h {
                continue;
            }
            let (old_v, mut new_v) = (old.flatten_all()?.to_vec1::<f32>()?, new.flatten_all()?.to_vec1::<f32>()?);
            for (c, from_col) in columns.iter().enumerate() {
                if let Some(f) = from_col.filter(|&f| f < old_g) {
                    for row in 0..h {
                        new_v[row * new_g + c] = old_v[row * old_g + f];
                    }
                }
            }
            Tensor::from_vec(new_v, new.dims(), &Device::Cpu)?
        } else if old.dims() == new.dims() {
            old.copy()?
        } else {
            continue;
        };
        var.set(&value)?;
        copied += 1;
    }
    model.weights_changed();
    Ok(copied)
}

/// Snapshot of every variable, to restore the selected weights.
fn snapshot(vars: &HashMap<String, Var>) -> Result<HashMap<String, Tensor>, SasRecError> {
    vars.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?))).collect()
}

/// Trains a model on the split's training part, early-stopping on its validation part.
pub fn train(dataset: &Dataset, split: &Split, file: &TrainFile, show_progress: bool) -> Result<Trained, TrainError> {
    train_from(dataset, split, file, show_progress, None)
}

/// [`train`], starting from the weights of `warm` where they fit (see [`warm_start`]).
pub fn train_from(
    dataset: &Dataset,
    split: &Split,
    file: &TrainFile,
    show_progress: bool,
    warm: Option<&SequentialModel>,
) -> Result<Trained, TrainError> {
    let cfg = &file.train;
    cfg.validate()?;
    let started = Instant::now();
    // What the model learns from: the training part, plus each user's validation interaction
    // with `include_valid`.
    let fit: std::borrow::Cow<'_, [Vec<super::data::Interaction>]> = if cfg.include_valid {
        std::borrow::Cow::Owned(
            split.train.iter().zip(&split.valid).map(|(t, v)| t.iter().chain(v).cloned().collect()).collect(),
        )
    } else {
        std::borrow::Cow::Borrowed(split.train.as_slice())
    };
    let vocab = Vocab::from_dataset(dataset, &fit);
    let mut model = SequentialModel::new(file.model.clone(), file.serve.clone(), vocab, cfg.seed)?;
    if let Some(warm) = warm {
        let copied = warm_start(&mut model, warm)?;
        tracing::debug!(copied, "warm start");
    }
    let len = model.config.max_len;
    let mut rng = SmallRng::seed_from_u64(cfg.seed ^ 0x5EED_DA7A);

    let seqs: Vec<UserSeq> = fit
        .iter()
        .enumerate()
        .map(|(u, seq)| UserSeq {
            items: seq.iter().map(|i| i.item + 1).collect(),
            hours: seq.iter().map(|i| hour_bucket(i.timestamp * 1000)).collect(),
            feedback: seq.iter().map(|i| feedback_index(i.rating)).collect(),
            segments: seq.iter().map(|i| segment_at(i.timestamp * 1000, DeviceClass::Other)).collect(),
            user: model.vocab.user_features(&dataset.users[u]),
        })
        .collect();
    let windows_per_epoch = windows(&seqs, len, false, &mut SmallRng::seed_from_u64(0)).len();
    if windows_per_epoch == 0 {
        return Err(TrainError::NoData);
    }
    let steps_per_epoch = windows_per_epoch.div_ceil(cfg.batch_size.max(1));
    let total_steps = steps_per_epoch * cfg.epochs.max(1);
    let warmup_steps = (cfg.warmup_epochs * steps_per_epoch as f64).round() as usize;

    // Decay weight matrices only.
    let vars: HashMap<String, Var> = model.varmap.data().lock().expect("varmap lock not poisoned").clone();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let (decayed, plain): (Vec<&String>, Vec<&String>) = names.into_iter().partition(|n| {
        n.ends_with(".weight")
            && !n.split('.').any(|p| p.starts_with("ln"))
            && (n.contains("blocks.") || n.contains("items.genre"))
    });
    let params = |weight_decay| ParamsAdamW { lr: cfg.lr, beta1: 0.9, beta2: cfg.beta2, eps: 1e-8, weight_decay };
    let pick = |ns: &[&String]| ns.iter().map(|n| vars[*n].clone()).collect::<Vec<_>>();
    let n_items = model.config.items;
    // Above `sampled_softmax_min_items`, the sampled softmax replaces the full one, and the id
    // embedding is updated row by row (see `sparse_ids`): out of `opt_plain`, which would keep
    // two moments of its whole size.
    let sampled = cfg.sampled_softmax_min_items > 0 && n_items >= cfg.sampled_softmax_min_items;
    let plain: Vec<&String> = plain.into_iter().filter(|n| !(sampled && n.as_str() == SasRec::ITEM_IDS)).collect();
    let mut opt_decay = AdamW::new(pick(&decayed), params(cfg.weight_decay))?;
    let mut opt_plain = AdamW::new(pick(&plain), params(0.0))?;
    let mut sparse =
        if sampled { Some(SparseIds::new(model.net().item_table().id_embedding()?, params(0.0))?) } else { None };

    let bar = if show_progress {
        ProgressBar::with_draw_target(Some(total_steps as u64), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}")
            .expect("progress template is valid")
            .progress_chars("=> "),
    );

    let mut sampler = sampled.then(|| {
        let mut counts = vec![0u64; n_items];
        for token in seqs.iter().flat_map(|s| &s.items) {
            if let Some(c) = (*token as usize).checked_sub(1).and_then(|i| counts.get_mut(i)) {
                *c += 1;
            }
        }
        NegativeSampler::new(&counts, cfg.sampled_alpha, cfg.sampled_negatives, cfg.seed ^ 0x5A4D_91ED)
    });
    tracing::debug!(items = n_items, sampled = sampler.is_some(), "softmax");
    let mut step = 0usize;
    let mut selector = Selector::new(cfg.select_window);
    let reduce = |c: &[&Checkpoint]| reduce_checkpoints(c, cfg.average_checkpoints);
    let mut since_best = 0usize;
    let mut log = Vec::new();
    let mut epochs_run = 0;
    for epoch in 1..=cfg.epochs {
        let epoch_start = Instant::now();
        let mut ws = windows(&seqs, len, cfg.shift_windows, &mut rng);
        ws.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        let mut loss_n = 0usize;
        for chunk in ws.chunks(cfg.batch_size.max(1)) {
            let lr = if step < warmup_steps {
                cfg.lr * (step + 1) as f64 / warmup_steps as f64
            } else {
                let t = (step - warmup_steps) as f64 / (total_steps - warmup_steps).max(1) as f64;
                let floor = cfg.final_lr_ratio;
                cfg.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos()))
            };
            opt_decay.set_learning_rate(lr);
            opt_plain.set_learning_rate(lr);

            let (batch, targets) = batch_of(&seqs, chunk, len, cfg.user_dropout, &mut rng)?;
            let positions: Vec<u32> = (0..targets.len() as u32).filter(|&i| targets[i as usize] > 0).collect();
            let labels: Vec<u32> = positions.iter().map(|&i| targets[i as usize] - 1).collect();
            let t = positions.len();
            let positions = Tensor::from_vec(positions, t, &Device::Cpu)?;

            let table_layer = model.net().item_table();
            let mut mode = Mode::Train(&mut rng);
            let (loss, grads) = match (sampler.as_mut(), sparse.as_mut()) {
                (Some(sampler), Some(ids)) => {
                    let negatives = sampler.sample();
                    let step = SparseStep::new(ids, &model.vocab, model.config.genres, batch, &labels, &negatives)?;
                    let table = (step.ids.as_tensor() + table_layer.content(&step.features)?)?;
                    let q = model.net().encode(&step.batch, &table, false, &mut mode)?;
                    let h = q.dim(D::Minus1)?;
                    let q = q.reshape(((), h))?.index_select(&positions, 0)?;
                    let out = table.narrow(0, 1, step.rows.len() - 1)?;
                    let bias = table_layer.bias_rows(&step.bias_rows)?;
                    let log_q: Vec<f32> = step.rows[1..].iter().map(|&r| sampler.log_q[r as usize - 1]).collect();
                    let (loss, grads) = sampled_softmax_cross_entropy(
                        &q,
                        &out,
                        &bias,
                        &step.labels,
                        &step.negatives,
                        Some(&log_q),
                        cfg.label_smoothing,
                    )?;
                    let grads = surrogate(&q, &out, &bias, &grads)?.backward()?;
                    ids.apply(grads.get(&step.ids), lr)?;
                    (loss, grads)
                }
                _ => {
                    let table = table_layer.forward(model.item_features())?;
                    let q = model.net().encode(&batch, &table, false, &mut mode)?;
                    let h = q.dim(D::Minus1)?;
                    let q = q.reshape(((), h))?.index_select(&positions, 0)?;
                    let out = table.narrow(0, 1, n_items)?;
                    let bias = table_layer.bias(n_items)?;
                    let (loss, grads) = softmax_cross_entropy(&q, &out, &bias, &labels, cfg.label_smoothing)?;
                    (loss, surrogate(&q, &out, &bias, &grads)?.backward()?)
                }
            };
            opt_decay.step(&grads)?;
            opt_plain.step(&grads)?;
            loss_sum += loss * t as f64;
            loss_n += t;
            step += 1;
            bar.inc(1);
        }
        if let Some(ids) = &sparse {
            ids.write_to(&vars[SasRec::ITEM_IDS])?;
        }
        model.weights_changed();
        epochs_run = epoch;
        let loss = loss_sum / loss_n.max(1) as f64;
        let mut entry = EpochLog {
            epoch,
            loss,
            valid_ndcg10: None,
            seconds: epoch_start.elapsed().as_secs_f64(),
            eval_seconds: 0.0,
        };
        let last_epoch = epoch == cfg.epochs;
        if cfg.include_valid {
            // No selection: the last `select_window` epochs are kept (the score is unused).
            selector.hold(epoch, 0.0, snapshot(&vars)?);
        } else if epoch % cfg.eval_every.max(1) == 0 || last_epoch {
            let eval_start = Instant::now();
            let valid = {
                let mut ranker = SequentialRanker::new(&mut model, dataset, "sasrec");
                evaluate(dataset, split, Part::Valid, &mut ranker, 512)?
            };
            entry.eval_seconds = eval_start.elapsed().as_secs_f64();
            entry.valid_ndcg10 = Some(valid.ndcg10);
            match selector.push(epoch, valid.ndcg10, snapshot(&vars)?, reduce)? {
                Some(true) => since_best = 0,
                Some(false) => since_best += 1,
                None => {}
            }
        }
        let best = selector.best().map_or_else(
            || "-".to_owned(),
            |(mean, epochs)| {
                format!("{mean:.4} @{}", epochs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(","))
            },
        );
        bar.set_message(format!(
            "epoch {epoch}/{}  loss {loss:.4}  valid ndcg@10 {}  best {best}",
            cfg.epochs,
            entry.valid_ndcg10.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"))
        ));
        tracing::debug!(epoch, loss, valid_ndcg10 = ?entry.valid_ndcg10, "epoch done");
        log.push(entry);
        if cfg.patience > 0 && since_best >= cfg.patience {
            break;
        }
        if cfg.time_budget_secs > 0.0 && started.elapsed().as_secs_f64() >= cfg.time_budget_secs {
            break;
        }
    }
    bar.finish();

    let (selected_epochs, weights) = selector.finish(cfg.include_valid, reduce)?.ok_or(TrainError::NoData)?;
    for (name, var) in &vars {
        let value = weights.get(name).ok_or_else(|| SasRecError::Config(format!("no kept value for {name}")))?;
        var.set(value)?;
    }
    model.weights_changed();
    // The kept weights' own validation figures (an average of checkpoints was never evaluated).
    let valid = {
        let mut ranker = SequentialRanker::new(&mut model, dataset, "sasrec");
        evaluate(dataset, split, Part::Valid, &mut ranker, 512)?
    };
    let trained_secs: f64 = log.iter().map(|e| e.seconds).sum();
    let summary = TrainingSummary {
        seed: cfg.seed,
        epochs_run,
        best_epoch: middle(&selected_epochs).copied().unwrap_or(0),
        selected_epochs,
        seconds_per_epoch: trained_secs / log.len().max(1) as f64,
        eval_seconds: log.iter().map(|e| e.eval_seconds).sum(),
        seconds: started.elapsed().as_secs_f64(),
        optimizer_state_saved: false,
        settings: serde_json::to_value(cfg).unwrap_or_default(),
    };
    Ok(Trained { model, valid, summary, log })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::data::DatasetBuilder;

    #[test]
    fn windows_cover_every_target_once_without_shift() {
        let seq = |n: usize| UserSeq {
            items: (1..=n as u32).collect(),
            hours: vec![0; n],
            feedback: vec![0; n],
            segments: vec![0; n],
            user: [0; 3],
        };
        let seqs = vec![seq(11), seq(3), seq(1)];
        let ws = windows(&seqs, 4, false, &mut SmallRng::seed_from_u64(1));
        let mut covered: Vec<(usize, usize)> =
            ws.iter().flat_map(|w| (w.start + 1..=w.end).map(move |t| (w.user, t))).collect();
        covered.sort();
        let expected: Vec<(usize, usize)> = (1..11).map(|t| (0, t)).chain((1..3).map(|t| (1, t))).collect();
        assert_eq!(covered, expected);
        assert!(ws.iter().all(|w| w.end - w.start <= 4));
        // With shifts, every target is still covered at least once.
        let shifted = windows(&seqs, 4, true, &mut SmallRng::seed_from_u64(2));
        for t in 1..11 {
            assert!(shifted.iter().any(|w| w.user == 0 && w.start < t && t <= w.end));
        }
    }

    #[test]
    fn warm_start_keeps_what_known_items_learned() {
        let vocab = |ids: &[&str]| {
            let mut builder = DatasetBuilder::new();
            for id in ids {
                builder.item_attributes(id, None, &["drama"], None);
            }
            for (t, id) in ids.iter().enumerate() {
                builder.interaction("u", id, t as i64, Some(4.0));
            }
            let dataset = builder.build();
            Vocab::from_dataset(&dataset, &dataset.sequences)
        };
        let config = Config { hidden: 8, layers: 1, heads: 2, inner: 16, max_len: 4, ..Config::default() };
        let old =
            SequentialModel::new(config.clone(), ServeConfig::default(), vocab(&["a", "b", "c"]), 1).expect("old");
        let mut new = SequentialModel::new(config, ServeConfig::default(), vocab(&["b", "c", "d"]), 2).expect("new");
        let tensor = |m: &SequentialModel, name: &str| {
            m.varmap.data().lock().expect("varmap").get(name).expect("variable").as_tensor().clone()
        };
        let row = |m: &SequentialModel, id: &str| {
            let r = m.model_item(id).expect("known item") as usize;
            tensor(m, "items.id.weight").get(r).and_then(|t| t.to_vec1::<f32>()).expect("row")
        };
        let fresh = row(&new, "d");
        assert_ne!(row(&new, "b"), row(&old, "b"), "different seeds start apart");
        assert!(warm_start(&mut new, &old).expect("warm start") > 5);
        assert_eq!(row(&new, "b"), row(&old, "b"), "a known item keeps its embedding");
        assert_eq!(row(&new, "c"), row(&old, "c"));
        assert_eq!(row(&new, "d"), fresh, "a new item keeps its fresh initialisation");
        let positions =
            |m: &SequentialModel| tensor(m, "positions.weight").flatten_all().and_then(|t| t.to_vec1::<f32>());
        assert_eq!(positions(&new).expect("new"), positions(&old).expect("old"), "same-shape weights are copied");
    }

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all()).and_then(|d| d.to_scalar::<f32>()).expect("diff")
    }

    #[test]
    fn sampled_softmax_over_every_item_without_correction_is_the_full_softmax() {
        let cpu = &Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (7, 5), cpu).expect("q");
        let items = Tensor::randn(0f32, 1.0, (9, 5), cpu).expect("items");
        let bias = Tensor::randn(0f32, 1.0, 9, cpu).expect("bias");
        let labels = [0u32, 3, 3, 8, 1, 5, 0];
        let every: Vec<u32> = (0..9).collect();
        for smoothing in [0.0, 0.1] {
            let (full_loss, full) = softmax_cross_entropy(&q, &items, &bias, &labels, smoothing).expect("full");
            let (loss, sampled) =
                sampled_softmax_cross_entropy(&q, &items, &bias, &labels, &every, None, smoothing).expect("sampled");
            assert!((loss - full_loss).abs() < 1e-5, "loss {loss} vs {full_loss}");
            assert!(close(&sampled.q, &full.q) < 1e-5, "grad q");
            assert!(close(&sampled.items, &full.items) < 1e-5, "grad items");
            assert!(close(&sampled.bias, &full.bias) < 1e-5, "grad bias");
        }
        // With a few negatives, only their rows and the labels' rows get a gradient.
        let q2 = q.narrow(0, 0, 2).expect("rows");
        let (_, some) =
            sampled_softmax_cross_entropy(&q2, &items, &bias, &[0, 3], &[3, 6], None, 0.1).expect("sampled");
        assert_eq!(some.q.dims(), &[2, 5]);
        assert_eq!(some.items.dims(), &[9, 5]);
        let bias_grad = some.bias.to_vec1::<f32>().expect("bias");
        for (j, g) in bias_grad.iter().enumerate() {
            assert_eq!(*g == 0.0, ![0, 3, 6].contains(&j), "item {j}: {g}");
        }
    }

    #[test]
    fn the_log_q_correction_subtracts_ln_q_and_accidental_hits_are_masked() {
        let cpu = &Device::Cpu;
        let counts = [50u64, 1, 10, 0, 5, 2];
        let mut sampler = NegativeSampler::new(&counts, 1.0, 4, 7);
        let negatives = sampler.sample();
        assert!(negatives.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates: {negatives:?}");
        assert_eq!(negatives, NegativeSampler::new(&counts, 1.0, 4, 7).sample(), "same seed, same draw");
        // The popular item is the likeliest to be drawn; an unseen item counts as seen once.
        assert!(sampler.log_q[0] > sampler.log_q[2] && sampler.log_q[2] > sampler.log_q[1]);
        assert_eq!(sampler.log_q[1], sampler.log_q[3]);
        let q = Tensor::randn(0f32, 1.0, (3, 4), cpu).expect("q");
        let items = Tensor::randn(0f32, 1.0, (6, 4), cpu).expect("items");
        let bias = Tensor::randn(0f32, 1.0, 6, cpu).expect("bias");
        let negatives = [0u32, 2, 5];
        let labels = [2u32, 1, 0];
        let (plain, _, _) = sampled_logits(&q, &items, &bias, &labels, &negatives, None).expect("plain");
        let (corrected, _, _) =
            sampled_logits(&q, &items, &bias, &labels, &negatives, Some(&sampler.log_q[..])).expect("log-q");
        for (r, &label) in labels.iter().enumerate() {
            let columns = std::iter::once(label).chain(negatives);
            for (c, item) in columns.enumerate() {
                let (p, k) = (plain[r * 4 + c], corrected[r * 4 + c]);
                if c > 0 && item == label {
                    assert!(p == f32::NEG_INFINITY && k == f32::NEG_INFINITY, "accidental hit masked");
                } else {
                    assert!((k - (p - sampler.log_q[item as usize])).abs() < 1e-5, "row {r} column {c}");
                }
            }
        }
    }

    #[test]
    fn training_settings_out_of_range_name_their_key() {
        let bad = TrainConfig { sampled_negatives: 0, sampled_softmax_min_items: 10, ..TrainConfig::default() };
        assert!(bad.validate().expect_err("refused").to_string().starts_with("train.sampled_negatives:"));
        let off = TrainConfig { sampled_negatives: 0, sampled_softmax_min_items: 0, ..TrainConfig::default() };
        assert!(off.validate().is_ok(), "no negatives needed when sampling is off");
        let bad = TrainConfig { sampled_alpha: 1.5, ..TrainConfig::default() };
        assert!(bad.validate().expect_err("refused").to_string().starts_with("train.sampled_alpha:"));
        let bad = TrainConfig { select_window: 0, ..TrainConfig::default() };
        assert!(bad.validate().expect_err("refused").to_string().starts_with("train.select_window:"));
        assert!(TrainConfig::default().validate().is_ok());
    }

    /// Users who all walk the cycle 1 -> 2 -> ... -> 20 -> 1 from different starting points:
    /// a tiny model must learn to rank the next item first among the unseen ones.
    #[test]
    fn a_tiny_model_learns_a_cyclic_pattern_reproducibly() {
        learns_the_cycle(TrainConfig::default());
    }

    /// The same with the sampled softmax forced on: 6 draws among 20 items per batch. Popularity
    /// is uniform on this data, so learning the cycle is beating popularity.
    #[test]
    fn a_tiny_model_learns_a_cyclic_pattern_with_a_sampled_softmax() {
        let sampled = learns_the_cycle(TrainConfig {
            sampled_softmax_min_items: 1,
            sampled_negatives: 6,
            ..TrainConfig::default()
        });
        // A catalogue below the threshold keeps the full softmax; the forced run did not.
        let below = learns_the_cycle(TrainConfig { sampled_softmax_min_items: 21, ..TrainConfig::default() });
        assert_eq!(below, learns_the_cycle(TrainConfig::default()), "20 items < 21: full softmax");
        assert_ne!(sampled, below, "the sampled run took the sampled path");
    }

    /// With `include_valid`: every epoch runs (no early stop, no validation passes), the last
    /// `select_window` epochs are kept, and the validation interactions are learned from.
    #[test]
    fn training_on_validation_too_runs_every_epoch_and_keeps_the_last_ones() {
        let ds = cycle();
        let split = Split::leave_one_out(&ds.sequences);
        let file = |include_valid| TrainFile {
            model: Config { hidden: 8, layers: 1, heads: 2, inner: 16, max_len: 8, ..Config::default() },
            train: TrainConfig { epochs: 5, patience: 1, include_valid, ..TrainConfig::default() },
            serve: ServeConfig::default(),
        };
        let trained = train(&ds, &split, &file(true), false).expect("trains");
        assert_eq!(trained.summary.epochs_run, 5);
        assert_eq!(trained.summary.selected_epochs, vec![3, 4, 5]);
        assert_eq!(trained.summary.best_epoch, 4);
        assert!(trained.log.iter().all(|e| e.valid_ndcg10.is_none() && e.eval_seconds == 0.0));
        // One more window per user (the validation item extends each sequence), so a
        // different loss from the same seed.
        let plain = train(&ds, &split, &file(false), false).expect("trains");
        assert_ne!(trained.log[0].loss, plain.log[0].loss);
        assert!(plain.log.iter().all(|e| e.valid_ndcg10.is_some()));
    }

    /// 40 users walking the cycle 0 -> 1 -> ... -> 19 -> 0, 10 steps each.
    fn cycle() -> Dataset {
        let mut b = DatasetBuilder::new();
        for item in 0..20 {
            b.item(&format!("i{item}"));
        }
        for user in 0..40usize {
            for t in 0..10usize {
                let item = (user * 7 + t) % 20;
                b.interaction(&format!("u{user}"), &format!("i{item}"), t as i64 * 60, Some(4.0));
            }
        }
        b.build()
    }

    /// Trains on the cycle and returns the per-epoch losses.
    fn learns_the_cycle(base: TrainConfig) -> Vec<f64> {
        let ds = cycle();
        let split = Split::leave_one_out(&ds.sequences);
        let file = TrainFile {
            model: Config { hidden: 16, layers: 1, heads: 2, inner: 32, max_len: 8, dropout: 0.0, ..Config::default() },
            train: TrainConfig {
                epochs: 40,
                patience: 0,
                batch_size: 16,
                lr: 1e-2,
                warmup_epochs: 1.0,
                label_smoothing: 0.0,
                eval_every: 10,
                ..base
            },
            serve: ServeConfig::default(),
        };
        let trained = train(&ds, &split, &file, false).expect("trains");
        // 11 unseen candidates per user; chance would put the target first 1 time in 12.
        assert!(trained.valid.mrr10 > 0.9, "{:?}", trained.valid);
        let first = trained.log.first().map(|l| l.loss).expect("log");
        let last = trained.log.last().map(|l| l.loss).expect("log");
        assert!(last < first / 2.0, "loss {first} -> {last}");

        let again = train(&ds, &split, &file, false).expect("trains");
        assert_eq!(
            trained.log.iter().map(|l| l.loss).collect::<Vec<_>>(),
            again.log.iter().map(|l| l.loss).collect::<Vec<_>>(),
            "same seed, same losses"
        );
        trained.log.iter().map(|l| l.loss).collect()
    }
}
