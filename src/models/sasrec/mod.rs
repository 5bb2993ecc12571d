//! A SASRec-family sequential recommender in candle (CPU).
//!
//! The network reads a user's last `max_len` items, oldest first and left-padded with index 0,
//! through causal self-attention blocks and predicts the next item at every position; scores
//! are dot products with the same item table that embeds the input (tied weights).
//!
//! Besides the item id, each part of the input can carry side information (each can be turned
//! off in [`Features`]):
//! - item attributes, in the item table itself: the mean of the item's genre embeddings and an
//!   embedding of its release-year bucket. Because they are part of the output table too, an
//!   item the model never saw still gets a score from its attributes alone (content similarity);
//! - per history event: the hour-of-day bucket and the feedback (rating value, or "implicit");
//! - per prediction: the request's context segment (device class x hour bucket, as
//!   [`crate::event::Context::segment`]) and, when known, the user's demographic segment
//!   (gender, age bucket, occupation), added to the sequence representation before scoring;
//! - a per-item output bias (a learned popularity prior).
//!
//! Blocks are pre-LayerNorm (LN, attention, residual; LN, ReLU feed-forward, residual) with a
//! final LayerNorm. Positions are learned and counted from the end of the sequence, so the most
//! recent item always has the same position embedding whatever the history length.
//!
//! LayerNorm (when training), the masked attention softmax and dropout are fused ops with
//! hand-written backward passes ([`crate::models::ops`]): candle-nn's fused LayerNorm has no backward
//! pass, and the composite versions made training several times slower. Dropout draws from the
//! caller's seeded RNG (candle's CPU RNG cannot be seeded), which keeps training reproducible.

mod config;
mod fast;
mod layers;

use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder, VarMap};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::event::Context;
use config::MASKED;
pub use config::{
    age_bucket, feedback_index, gender_index, hour_bucket, segment_at, weekday, year_bucket, Config, Features, Result,
    SasRecError, AGE_BUCKETS, FEEDBACK, GENDERS, YEAR_BUCKETS,
};
pub use fast::{FastEncoder, FastInput};
pub use layers::{Block, ItemFeatures, ItemTable, LayerNorm, Mode, SelfAttention, UserEmbedding};

/// One batch of left-padded sequences as tensors.
pub struct SeqBatch {
    /// `[B, L]` u32 item indices (0 = padding).
    pub items: Tensor,
    /// `[B, L]` u32 hour bucket of each history event.
    pub hours: Tensor,
    /// `[B, L]` u32 feedback index of each history event.
    pub feedback: Tensor,
    /// `[B, Lq]` u32 context segment of the event each query position predicts (`Lq` is `L`
    /// when training, 1 at inference).
    pub context: Tensor,
    /// `[B, 3]` u32 demographic segment (zeros when unknown).
    pub users: Tensor,
    /// `[B, 1, L, L]` additive attention mask (causal and padding), as values; empty for an
    /// inference batch of a one-block network.
    pub mask: Arc<Vec<f32>>,
    /// The last query row of `mask`, `[B, 1, 1, L]`: the last block's mask at inference.
    pub mask_last: Arc<Vec<f32>>,
}

/// One sequence before padding: history tokens and, per query position, the context.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeqInput {
    pub items: Vec<u32>,
    pub hours: Vec<u32>,
    pub feedback: Vec<u32>,
    /// One per query position: all positions when training, the last one at inference.
    pub context: Vec<u32>,
    pub user: [u32; 3],
}

impl<'a> From<&'a SeqInput> for FastInput<'a> {
    /// The input as the plain-slice encoder reads it (`context`: the last position's).
    fn from(input: &'a SeqInput) -> Self {
        FastInput {
            items: &input.items,
            hours: &input.hours,
            feedback: &input.feedback,
            context: input.context.last().copied().unwrap_or(0),
            user: input.user,
        }
    }
}

impl SeqBatch {
    /// Left-pads every input to `len` (inputs longer than `len` keep their last `len` tokens).
    /// With `last_only`, each input has one context value and the mask covers the last row.
    pub fn new(inputs: &[SeqInput], len: usize, last_only: bool) -> Result<Self> {
        Self::build(inputs, len, last_only, true)
    }

    /// A last-position batch for a network of `layers` blocks: the full `[B, 1, L, L]` mask is
    /// only built when a block before the last needs it (it is most of the batch's size).
    pub fn for_inference(inputs: &[SeqInput], len: usize, layers: usize) -> Result<Self> {
        Self::build(inputs, len, true, layers > 1)
    }

    fn build(inputs: &[SeqInput], len: usize, last_only: bool, full_mask: bool) -> Result<Self> {
        let b = inputs.len();
        let lq = if last_only { 1 } else { len };
        let mut items = vec![0u32; b * len];
        let mut hours = vec![0u32; b * len];
        let mut feedback = vec![0u32; b * len];
        let mut context = vec![0u32; b * lq];
        let mut users = vec![0u32; b * 3];
        let mut mask = if full_mask { vec![MASKED; b * len * len] } else { Vec::new() };
        let mut mask_last = vec![MASKED; b * len];
        for (r, input) in inputs.iter().enumerate() {
            let n = input.items.len().min(len);
            let skip = input.items.len() - n;
            let pad = len - n;
            let row = r * len + pad;
            items[row..row + n].copy_from_slice(&input.items[skip..]);
            hours[row..row + n].copy_from_slice(&input.hours[input.hours.len() - n..]);
            feedback[row..row + n].copy_from_slice(&input.feedback[input.feedback.len() - n..]);
            let nc = input.context.len().min(lq);
            let crow = r * lq + (lq - nc);
            context[crow..crow + nc].copy_from_slice(&input.context[input.context.len() - nc..]);
            users[r * 3..r * 3 + 3].copy_from_slice(&input.user);
            if full_mask {
                for q in 0..len {
                    let base = (r * len + q) * len;
                    // Visible keys: real tokens at or before the query (none for a padding query).
                    for k in pad..=q {
                        mask[base + k] = 0.0;
                    }
                }
            }
            mask_last[r * len + pad..(r + 1) * len].iter_mut().for_each(|m| *m = 0.0);
        }
        let dev = Device::Cpu;
        Ok(Self {
            items: Tensor::from_vec(items, (b, len), &dev)?,
            hours: Tensor::from_vec(hours, (b, len), &dev)?,
            feedback: Tensor::from_vec(feedback, (b, len), &dev)?,
            context: Tensor::from_vec(context, (b, lq), &dev)?,
            users: Tensor::from_vec(users, (b, 3), &dev)?,
            mask: Arc::new(mask),
            mask_last: Arc::new(mask_last),
        })
    }
}

/// The whole network.
pub struct SasRec {
    cfg: Config,
    items: ItemTable,
    positions: Option<Embedding>,
    hours: Option<Embedding>,
    feedback: Option<Embedding>,
    context: Option<Embedding>,
    users: Option<UserEmbedding>,
    ln_in: LayerNorm,
    blocks: Vec<Block>,
    ln_out: LayerNorm,
}

impl SasRec {
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let f = &cfg.features;
        let opt = |on: bool, n: usize, name: &str| -> Result<Option<Embedding>> {
            Ok(if on { Some(candle_nn::embedding(n, cfg.hidden, vb.pp(name))?) } else { None })
        };
        Ok(Self {
            cfg: cfg.clone(),
            items: ItemTable::load(vb.pp("items"), cfg)?,
            positions: opt(f.position, cfg.max_len, "positions")?,
            hours: opt(f.hour, Context::HOUR_BUCKETS, "hours")?,
            feedback: opt(f.feedback, FEEDBACK, "feedback")?,
            context: opt(f.context, Context::SEGMENTS, "context")?,
            users: if f.user { Some(UserEmbedding::load(vb.pp("users"), cfg)?) } else { None },
            ln_in: LayerNorm::load(vb.pp("ln_in"), cfg.hidden)?,
            blocks: (0..cfg.layers).map(|i| Block::load(vb.pp(format!("blocks.{i}")), cfg)).collect::<Result<_>>()?,
            ln_out: LayerNorm::load(vb.pp("ln_out"), cfg.hidden)?,
        })
    }

    /// The network's weights copied to plain slices, for the encoder of small batches.
    pub fn fast_encoder(&self) -> Result<FastEncoder> {
        FastEncoder::of(fast::Parts {
            cfg: &self.cfg,
            ln_in: &self.ln_in,
            blocks: &self.blocks,
            ln_out: &self.ln_out,
            positions: self.positions.as_ref(),
            hours: self.hours.as_ref(),
            feedback: self.feedback.as_ref(),
            context: self.context.as_ref(),
            users: self.users.as_ref(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn item_table(&self) -> &ItemTable {
        &self.items
    }

    /// Drops the item id embedding (see [`ItemTable::release_ids`]); the caller removes
    /// [`SasRec::ITEM_IDS`] from the variable map that holds it too.
    pub fn release_item_ids(&mut self) {
        self.items.release_ids();
    }

    /// The variable name of the item id embedding.
    pub const ITEM_IDS: &'static str = "items.id.weight";

    /// The summed input embeddings `[B, L, H]` in one pass over plain slices: at inference the
    /// four gathers and adds of the training path cost more than the attention itself.
    fn embed_inference(&self, batch: &SeqBatch, table: &Tensor, positions: Option<&Tensor>) -> Result<Tensor> {
        let (b, l) = batch.items.dims2()?;
        let h = self.cfg.hidden;
        let items = batch.items.flatten_all()?.to_vec1::<u32>()?;
        let hours = batch.hours.flatten_all()?.to_vec1::<u32>()?;
        let feedback = batch.feedback.flatten_all()?.to_vec1::<u32>()?;
        let rows = |e: &Option<Embedding>| -> Result<Option<Vec<f32>>> {
            Ok(match e {
                Some(e) => Some(e.embeddings().flatten_all()?.to_vec1::<f32>()?),
                None => None,
            })
        };
        let (hour_rows, feedback_rows) = (rows(&self.hours)?, rows(&self.feedback)?);
        let positions = match positions {
            Some(p) => Some(p.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let table = table.contiguous()?;
        let (storage, layout) = table.storage_and_layout();
        let table_rows = match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(cpu), Some((start, end))) => &cpu.as_slice::<f32>()?[start..end],
            _ => return Err(SasRecError::Config("item table must be a contiguous CPU tensor".into())),
        };
        let mut x = vec![0f32; b * l * h];
        for (r, out) in x.chunks_mut(h).enumerate() {
            let t = r % l;
            let add = |out: &mut [f32], src: &[f32]| out.iter_mut().zip(src).for_each(|(o, s)| *o += s);
            out.copy_from_slice(&table_rows[items[r] as usize * h..][..h]);
            if let Some(p) = &positions {
                add(out, &p[t * h..][..h]);
            }
            if let Some(hr) = &hour_rows {
                add(out, &hr[hours[r] as usize * h..][..h]);
            }
            if let Some(fr) = &feedback_rows {
                add(out, &fr[feedback[r] as usize * h..][..h]);
            }
        }
        Ok(Tensor::from_vec(x, (b, l, h), &Device::Cpu)?)
    }

    /// Query vectors: `[B, Lq, H]` (`Lq` = `L`, or 1 with `last_only`). `table` is the output
    /// of [`ItemTable::forward`].
    pub fn encode(&self, batch: &SeqBatch, table: &Tensor, last_only: bool, mode: &mut Mode<'_>) -> Result<Tensor> {
        let (b, l) = batch.items.dims2()?;
        let h = self.cfg.hidden;
        if l > self.cfg.max_len {
            return Err(SasRecError::Config(format!("sequence length {l} exceeds max_len {}", self.cfg.max_len)));
        }
        let positions = match &self.positions {
            Some(p) => Some(p.embeddings().narrow(0, self.cfg.max_len - l, l)?),
            None => None,
        };
        let mut x = if mode.training() {
            let mut x = table.index_select(&batch.items.flatten_all()?, 0)?.reshape((b, l, h))?;
            if let Some(p) = &positions {
                x = x.broadcast_add(p)?;
            }
            if let Some(hours) = &self.hours {
                x = (x + hours.forward(&batch.hours)?)?;
            }
            if let Some(feedback) = &self.feedback {
                x = (x + feedback.forward(&batch.feedback)?)?;
            }
            x
        } else {
            self.embed_inference(batch, table, positions.as_ref())?
        };
        x = self.ln_in.forward_t(&x, mode)?;
        x = mode.dropout(&x, self.cfg.dropout)?;
        let last = self.blocks.len() - 1;
        for (i, block) in self.blocks.iter().enumerate() {
            x = if last_only && i == last {
                block.forward_t(&x, &batch.mask_last, true, mode)?
            } else {
                block.forward_t(&x, &batch.mask, false, mode)?
            };
        }
        let mut q = self.ln_out.forward_t(&x, mode)?;
        if let Some(context) = &self.context {
            q = (q + context.forward(&batch.context)?)?;
        }
        if let Some(users) = &self.users {
            q = q.broadcast_add(&users.forward(&batch.users)?)?;
        }
        Ok(q)
    }
}

/// Draws standard normal values (Box-Muller) from a seeded RNG.
fn normal(rng: &mut SmallRng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
            let u2: f32 = rng.random();
            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect()
}

/// Re-initialises every variable from `seed`: LayerNorm weights 1, biases 0, other weights
/// N(0, 0.02). Candle's CPU RNG cannot be seeded, so this is what makes training reproducible.
pub fn seeded_init(varmap: &VarMap, seed: u64) -> Result<()> {
    seeded_init_with(varmap, seed, 0.02)
}

/// [`seeded_init`] with another standard deviation for the weights.
pub fn seeded_init_with(varmap: &VarMap, seed: u64, std: f32) -> Result<()> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let data = varmap.data().lock().expect("varmap lock not poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let shape = var.shape().clone();
        let n = shape.elem_count();
        let is_norm = name.split('.').any(|p| p.starts_with("ln"));
        let values = if name.ends_with("bias") {
            vec![0.0; n]
        } else if is_norm {
            vec![1.0; n]
        } else {
            normal(&mut rng, n, std)
        };
        var.set(&Tensor::from_vec(values, shape, &Device::Cpu)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn tiny() -> Config {
        Config {
            items: 6,
            genres: 2,
            occupations: 1,
            hidden: 8,
            layers: 2,
            heads: 2,
            inner: 16,
            max_len: 4,
            dropout: 0.0,
            attention_dropout: 0.0,
            features: Features::default(),
        }
    }

    #[test]
    fn buckets_cover_their_ranges() {
        assert_eq!(year_bucket(None), 0);
        assert_eq!(year_bucket(Some(1930)), 1);
        assert_eq!(year_bucket(Some(1975)), 5);
        assert_eq!(year_bucket(Some(1987)), 7);
        assert_eq!(year_bucket(Some(1998)), 16);
        assert_eq!(year_bucket(Some(2030)), 48);
        assert_eq!(year_bucket(Some(3000)), 48);
        assert_eq!(age_bucket(Some(24)), 2);
        assert_eq!(age_bucket(Some(70)), 7);
        assert_eq!(feedback_index(Some(4.4)), 4);
        assert_eq!(feedback_index(None), 6);
        assert_eq!(gender_index(Some("F")), 2);
    }

    #[test]
    fn batch_pads_left_and_masks_causally() {
        let input = SeqInput {
            items: vec![3, 5],
            hours: vec![1, 2],
            feedback: vec![4, 5],
            context: vec![7, 8],
            user: [1, 2, 0],
        };
        let batch = SeqBatch::new(std::slice::from_ref(&input), 4, false).expect("batch");
        assert_eq!(batch.items.to_vec2::<u32>().expect("items"), vec![vec![0, 0, 3, 5]]);
        assert_eq!(batch.context.to_vec2::<u32>().expect("ctx"), vec![vec![0, 0, 7, 8]]);
        let mask: Vec<&[f32]> = batch.mask.chunks(4).collect();
        assert_eq!(mask[3], &[MASKED, MASKED, 0.0, 0.0]);
        assert_eq!(mask[2], &[MASKED, MASKED, 0.0, MASKED]);
        let last = SeqBatch::new(&[input], 4, true).expect("batch");
        assert_eq!(last.context.to_vec2::<u32>().expect("ctx"), vec![vec![8]]);
        assert_eq!(last.mask_last.as_slice(), &[MASKED, MASKED, 0.0, 0.0]);
    }

    #[test]
    fn the_table_from_genre_pairs_is_the_multi_hot_product_and_its_rows_are_identical() {
        let cfg = tiny();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = SasRec::load(vb, &cfg).expect("model");
        seeded_init_with(&varmap, 3, 0.5).expect("init");
        let genres = [vec![0], vec![1], vec![0, 1], vec![], vec![1, 9], vec![0]];
        let years = [Some(1995), None, Some(1980), Some(2001), None, Some(1960)];
        let features = ItemFeatures::new(&genres, &years, 2).expect("features");
        assert_eq!(features.pairs(), 6, "genre 9 is unknown");
        let table = net.item_table().forward(&features).expect("table").to_vec2::<f32>().expect("values");
        // The dense reference: id embedding + multi-hot genres (summing to 1) x the genre
        // layer + the year bucket's embedding.
        let var = |name: &str| varmap.data().lock().expect("lock")[name].as_tensor().to_vec2::<f32>().expect("weights");
        let (id, genre, year) = (var("items.id.weight"), var("items.genre.weight"), var("items.year.weight"));
        for (r, row) in table.iter().enumerate() {
            let known: Vec<usize> =
                if r == 0 { vec![] } else { genres[r - 1].iter().map(|&g| g as usize).filter(|&g| g < 2).collect() };
            let bucket = if r == 0 { 0 } else { year_bucket(years[r - 1]) as usize };
            for (d, &value) in row.iter().enumerate() {
                let g: f32 = known.iter().map(|&g| genre[d][g] / known.len() as f32).sum();
                let expected = id[r][d] + g + year[bucket][d];
                assert!((value - expected).abs() < 1e-5, "row {r} dim {d}: {value} vs {expected}");
            }
        }
        let rows = net.item_table().rows(&features).expect("rows");
        assert_eq!(rows, table.concat(), "the in-place table is the tensor one, bit for bit");
    }

    #[test]
    fn the_plain_slice_encoder_matches_candles_for_every_length_and_feature() {
        // Two blocks (the first over every position, the last over the last one), every
        // feature on, large weights; histories shorter than, equal to and longer than
        // `max_len`, encoded in one padded batch by candle and one by one here.
        let cfg = Config { hidden: 16, inner: 24, max_len: 6, ..tiny() };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = SasRec::load(vb, &cfg).expect("model");
        seeded_init_with(&varmap, 11, 0.5).expect("init");
        let features =
            ItemFeatures::new(&[vec![0], vec![1], vec![0, 1], vec![], vec![1], vec![0]], &[Some(1995); 6], 2)
                .expect("features");
        let table = net.item_table().forward(&features).expect("table");
        let histories: [&[u32]; 4] = [&[3], &[1, 2, 3], &[6, 5, 4, 3, 2, 1], &[1, 2, 3, 4, 5, 6, 1, 2]];
        let inputs: Vec<SeqInput> = histories
            .iter()
            .enumerate()
            .map(|(u, items)| SeqInput {
                items: items.to_vec(),
                hours: items.iter().map(|&i| (i + u as u32) % Context::HOUR_BUCKETS as u32).collect(),
                feedback: items.iter().map(|&i| i % 7).collect(),
                context: vec![u as u32 + 2],
                user: [u as u32 % 3, 1 + u as u32, 1],
            })
            .collect();
        let batch = SeqBatch::for_inference(&inputs, cfg.max_len, cfg.layers).expect("batch");
        let want = net
            .encode(&batch, &table, true, &mut Mode::Eval)
            .and_then(|q| Ok(q.flatten_all()?.to_vec1::<f32>()?))
            .expect("candle");
        let fast = net.fast_encoder().expect("copied");
        let rows = table.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("table");
        let fast_inputs: Vec<FastInput<'_>> = inputs.iter().map(FastInput::from).collect();
        let got = fast.encode(&fast_inputs, &rows).expect("in range");
        let bad = FastInput { context: Context::SEGMENTS as u32, ..FastInput::from(&inputs[0]) };
        assert!(fast.encode(&[bad], &rows).is_err(), "a context past its table is an error, not a panic");
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "user {}, dim {}: {a} vs {b}", i / 16, i % 16);
        }
    }

    #[test]
    fn last_only_matches_the_full_forward_and_init_is_seeded() {
        let cfg = tiny();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = SasRec::load(vb, &cfg).expect("model");
        // Large weights, so that attending to a wrong key would show.
        seeded_init_with(&varmap, 7, 0.5).expect("init");
        let features =
            ItemFeatures::new(&[vec![0], vec![1], vec![0, 1], vec![], vec![1], vec![0]], &[Some(1995); 6], 2)
                .expect("features");
        let table = net.item_table().forward(&features).expect("table");
        let input = SeqInput {
            items: vec![1, 2, 3],
            hours: vec![0, 1, 2],
            feedback: vec![3, 4, 5],
            context: vec![1, 2, 3],
            user: [1, 1, 1],
        };
        let full = SeqBatch::new(std::slice::from_ref(&input), 4, false).expect("batch");
        let q_full = net
            .encode(&full, &table, false, &mut Mode::Eval)
            .and_then(|q| Ok(q.narrow(1, 3, 1)?.flatten_all()?.to_vec1::<f32>()?))
            .expect("full");
        let last_input = SeqInput { context: vec![3], ..input };
        let last = SeqBatch::new(&[last_input], 4, true).expect("batch");
        let q_last = net
            .encode(&last, &table, true, &mut Mode::Eval)
            .and_then(|q| Ok(q.flatten_all()?.to_vec1::<f32>()?))
            .expect("last");
        for (a, b) in q_full.iter().zip(&q_last) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }

        let again = VarMap::new();
        let vb = VarBuilder::from_varmap(&again, DType::F32, &Device::Cpu);
        let _ = SasRec::load(vb, &cfg).expect("model");
        seeded_init_with(&again, 7, 0.5).expect("init");
        let a = varmap.data().lock().expect("lock")["positions.weight"]
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("weights");
        let b = again.data().lock().expect("lock")["positions.weight"]
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("weights");
        assert_eq!(a, b);
    }
}
