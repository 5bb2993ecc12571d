//! The layers of the network, each with `load(vb, &cfg)` and a forward pass: LayerNorm,
//! causal self-attention, the pre-LayerNorm block, the item table with its attribute
//! features, and the user embedding; and [`Mode`], training (with dropout) or inference.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use rand::rngs::SmallRng;
use rand::Rng;

use super::config::{year_bucket, Config, Result, SasRecError, AGE_BUCKETS, GENDERS, YEAR_BUCKETS};
use crate::models::ops;

/// Training or inference. Training applies dropout with masks drawn from the given RNG.
pub enum Mode<'a> {
    Eval,
    Train(&'a mut SmallRng),
}

impl Mode<'_> {
    pub(super) fn training(&self) -> bool {
        matches!(self, Mode::Train(_))
    }

    pub(super) fn dropout(&mut self, x: &Tensor, p: f32) -> Result<Tensor> {
        match self {
            Mode::Train(rng) if p > 0.0 => {
                let scale = 1.0 / (1.0 - p);
                let mask: Vec<f32> =
                    (0..x.elem_count()).map(|_| if rng.random::<f32>() < p { 0.0 } else { scale }).collect();
                Ok(ops::scale_by(x, Arc::new(mask))?)
            }
            _ => Ok(x.clone()),
        }
    }
}

/// LayerNorm whose training path is differentiable (candle-nn's fused one is not).
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    pub(super) const EPS: f32 = 1e-6;

    /// Weight and bias (for the plain-slice encoder, `fast.rs`).
    pub(super) fn parts(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }

    pub fn load(vb: VarBuilder, size: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?,
        })
    }

    pub(super) fn forward_t(&self, x: &Tensor, mode: &Mode<'_>) -> Result<Tensor> {
        if mode.training() {
            Ok(ops::layer_norm(x, &self.weight, &self.bias, Self::EPS)?)
        } else {
            Ok(self.forward(x)?)
        }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, Self::EPS)
    }
}

/// Multi-head causal self-attention.
pub struct SelfAttention {
    qkv: Linear,
    out: Linear,
    heads: usize,
    dropout: f32,
}

impl SelfAttention {
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Ok(Self {
            qkv: candle_nn::linear(cfg.hidden, 3 * cfg.hidden, vb.pp("qkv"))?,
            out: candle_nn::linear(cfg.hidden, cfg.hidden, vb.pp("out"))?,
            heads: cfg.heads,
            dropout: cfg.attention_dropout,
        })
    }

    /// `x`: `[B, L, H]`; `mask`: additive, `[B, 1, Lq, L]` values. With `last_only`, only the
    /// last position is a query (`Lq` = 1), which is all inference needs from the last block.
    pub(super) fn forward_t(
        &self,
        x: &Tensor,
        mask: &Arc<Vec<f32>>,
        last_only: bool,
        mode: &mut Mode<'_>,
    ) -> Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let head = h / self.heads;
        if last_only && !mode.training() {
            // Inference: one query per user, so project only the last position to a query and
            // every position to keys and values; and attend with a direct loop (candle would
            // run two tiny matrix products per user and head).
            let w = self.qkv.weight();
            let bias = self.qkv.bias().ok_or_else(|| SasRecError::Config("qkv has no bias".into()))?;
            let flat = x.reshape((b * l, h))?;
            let kv = flat.matmul(&w.narrow(0, h, 2 * h)?.t()?)?.broadcast_add(&bias.narrow(0, h, 2 * h)?)?;
            let last = x.narrow(1, l - 1, 1)?.reshape((b, h))?;
            let q = last.matmul(&w.narrow(0, 0, h)?.t()?)?.broadcast_add(&bias.narrow(0, 0, h)?)?;
            let y = ops::attend_last(&q, &kv.reshape((b, l, 2 * h))?, mask, self.heads)?;
            return Ok(self.out.forward(&y)?);
        }
        let qkv = self.qkv.forward(x)?;
        let q = qkv.narrow(2, 0, h)?;
        let q = if last_only { q.narrow(1, l - 1, 1)? } else { q };
        let lq = q.dim(1)?;
        let split = |t: Tensor, len: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, len, self.heads, head))?.transpose(1, 2)?.contiguous()
        };
        let q = split(q, lq)?;
        let k = split(qkv.narrow(2, h, h)?, l)?;
        let v = split(qkv.narrow(2, 2 * h, h)?, l)?;
        let scale = 1.0 / (head as f32).sqrt();
        let att = ops::masked_softmax(&q.matmul(&k.t()?)?, mask.clone(), scale)?;
        let att = mode.dropout(&att, self.dropout)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, lq, h))?;
        Ok(self.out.forward(&y)?)
    }
}

/// A pre-LayerNorm transformer block.
pub struct Block {
    ln1: LayerNorm,
    attention: SelfAttention,
    ln2: LayerNorm,
    ff1: Linear,
    ff2: Linear,
    dropout: f32,
}

impl Block {
    /// Its layers in order: norm, attention's projections (queries, keys and values; output),
    /// norm, feed-forward (for the plain-slice encoder, `fast.rs`).
    #[allow(clippy::type_complexity)]
    pub(super) fn parts(&self) -> (&LayerNorm, &Linear, &Linear, &LayerNorm, &Linear, &Linear) {
        (&self.ln1, &self.attention.qkv, &self.attention.out, &self.ln2, &self.ff1, &self.ff2)
    }

    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::load(vb.pp("ln1"), cfg.hidden)?,
            attention: SelfAttention::load(vb.pp("attention"), cfg)?,
            ln2: LayerNorm::load(vb.pp("ln2"), cfg.hidden)?,
            ff1: candle_nn::linear(cfg.hidden, cfg.inner, vb.pp("ff1"))?,
            ff2: candle_nn::linear(cfg.inner, cfg.hidden, vb.pp("ff2"))?,
            dropout: cfg.dropout,
        })
    }

    pub(super) fn forward_t(
        &self,
        x: &Tensor,
        mask: &Arc<Vec<f32>>,
        last_only: bool,
        mode: &mut Mode<'_>,
    ) -> Result<Tensor> {
        let attended = self.attention.forward_t(&self.ln1.forward_t(x, mode)?, mask, last_only, mode)?;
        let residual = if last_only { x.narrow(1, x.dim(1)? - 1, 1)? } else { x.clone() };
        let x = (residual + mode.dropout(&attended, self.dropout)?)?;
        let h = ops::relu(&self.ff1.forward(&self.ln2.forward_t(&x, mode)?)?)?;
        let h = self.ff2.forward(&mode.dropout(&h, self.dropout)?)?;
        Ok((x + mode.dropout(&h, self.dropout)?)?)
    }
}

/// Per-item attribute inputs of the item table (data, not weights).
///
/// Genres are kept as (row, genre, weight) pairs rather than a dense `[items + 1, genres]`
/// matrix: at 10^6 items and 500 categories the dense form took 2 GB and a 32-GFLOP product per
/// table, for one or two non-zero entries per row.
#[derive(Clone, Debug)]
pub struct ItemFeatures {
    /// `[pairs]` u32: the table row (item index + 1) of each item-genre pair, ascending.
    pub genre_rows: Tensor,
    /// `[pairs]` u32: the genre of each pair.
    pub genre_ids: Tensor,
    /// `[pairs, 1]`: each pair's weight, 1 / the item's number of known genres (an item's
    /// genres sum to 1).
    pub genre_weights: Tensor,
    /// `[items + 1]` u32: year bucket of each item.
    pub years: Tensor,
}

impl ItemFeatures {
    /// `genres[i]` and `years[i]` describe item `i + 1` (row 0 is padding).
    pub fn new(genres: &[Vec<u16>], years: &[Option<u16>], n_genres: usize) -> Result<Self> {
        let (mut rows, mut ids, mut weights) = (Vec::new(), Vec::new(), Vec::new());
        for (i, gs) in genres.iter().enumerate() {
            let known: Vec<u32> = gs.iter().map(|&g| u32::from(g)).filter(|&g| (g as usize) < n_genres).collect();
            for &g in &known {
                rows.push(i as u32 + 1);
                ids.push(g);
                weights.push(1.0 / known.len() as f32);
            }
        }
        let mut buckets = vec![0u32];
        buckets.extend(years.iter().map(|&y| year_bucket(y)));
        let pairs = rows.len();
        Ok(Self {
            genre_rows: Tensor::from_vec(rows, pairs, &Device::Cpu)?,
            genre_ids: Tensor::from_vec(ids, pairs, &Device::Cpu)?,
            genre_weights: Tensor::from_vec(weights, (pairs, 1), &Device::Cpu)?,
            years: Tensor::from_vec(buckets, genres.len() + 1, &Device::Cpu)?,
        })
    }

    /// Item-genre pairs.
    pub fn pairs(&self) -> usize {
        self.genre_ids.dims().first().copied().unwrap_or(0)
    }
}

/// The item table: id embedding plus attribute embeddings, and the output bias.
pub struct ItemTable {
    /// None once a serving copy dropped it (see [`ItemTable::release_ids`]).
    id: Option<Embedding>,
    genre: Option<Linear>,
    year: Option<Embedding>,
    bias: Option<Tensor>,
    hidden: usize,
}

impl ItemTable {
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let f = &cfg.features;
        Ok(Self {
            id: Some(candle_nn::embedding(cfg.items + 1, cfg.hidden, vb.pp("id"))?),
            genre: if f.genres {
                Some(candle_nn::linear_no_bias(cfg.genres.max(1), cfg.hidden, vb.pp("genre"))?)
            } else {
                None
            },
            year: if f.year { Some(candle_nn::embedding(YEAR_BUCKETS, cfg.hidden, vb.pp("year"))?) } else { None },
            bias: if f.item_bias {
                Some(vb.get_with_hints(cfg.items + 1, "bias", candle_nn::Init::Const(0.0))?)
            } else {
                None
            },
            hidden: cfg.hidden,
        })
    }

    /// The id embedding, or an error once a serving copy has dropped it.
    fn id(&self) -> Result<&Embedding> {
        self.id.as_ref().ok_or_else(|| {
            SasRecError::Config("this serving copy of the model has dropped its item id embedding".to_owned())
        })
    }

    /// Drops the id embedding (`[items + 1, H]`, 244 MiB at 10^6 items): a serving copy reads
    /// item vectors from its precomputed table and never needs it again.
    pub fn release_ids(&mut self) {
        self.id = None;
    }

    /// Attribute part of item vectors: `[rows, H]` for the given features (zeros when off).
    /// Each row is the weighted sum of its genres' columns of the genre layer (what the layer
    /// gives for the row's multi-hot vector), gathered and added per pair.
    pub fn content(&self, features: &ItemFeatures) -> Result<Tensor> {
        let rows = features.years.dim(0)?;
        let mut x = Tensor::zeros((rows, self.hidden), DType::F32, &Device::Cpu)?;
        if let (Some(genre), true) = (&self.genre, features.pairs() > 0) {
            let columns = genre.weight().t()?.contiguous()?;
            let picked = columns.index_select(&features.genre_ids, 0)?.broadcast_mul(&features.genre_weights)?;
            x = x.index_add(&features.genre_rows, &picked, 0)?;
        }
        if let Some(year) = &self.year {
            x = (x + year.forward(&features.years)?)?;
        }
        Ok(x)
    }

    /// Every item's vector, `[items + 1, H]`.
    pub fn forward(&self, features: &ItemFeatures) -> Result<Tensor> {
        Ok((self.id()?.embeddings() + self.content(features)?)?)
    }

    /// [`ItemTable::forward`] as one row-major `[items + 1, H]` vector, computed in place (the
    /// tensor form holds several table-sized temporaries at once: a gigabyte at 10^6 items).
    /// The same additions in the same order, so the values are identical.
    pub fn rows(&self, features: &ItemFeatures) -> Result<Vec<f32>> {
        let h = self.hidden;
        let mut out = self.id()?.embeddings().flatten_all()?.to_vec1::<f32>()?;
        let columns = match &self.genre {
            Some(genre) if features.pairs() > 0 => {
                Some(genre.weight().t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?)
            }
            _ => None,
        };
        let (pair_rows, pair_ids) = (features.genre_rows.to_vec1::<u32>()?, features.genre_ids.to_vec1::<u32>()?);
        let pair_weights = features.genre_weights.flatten_all()?.to_vec1::<f32>()?;
        let year_rows = match &self.year {
            Some(year) => Some(year.embeddings().flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let years = features.years.to_vec1::<u32>()?;
        let mut content = vec![0f32; h];
        let mut p = 0;
        for (r, row) in out.chunks_exact_mut(h).enumerate() {
            content.fill(0.0);
            while p < pair_rows.len() && pair_rows[p] as usize == r {
                if let Some(columns) = &columns {
                    let column = &columns[pair_ids[p] as usize * h..][..h];
                    content.iter_mut().zip(column).for_each(|(c, g)| *c += g * pair_weights[p]);
                }
                p += 1;
            }
            if let Some(year_rows) = &year_rows {
                let y = &year_rows[years[r] as usize * h..][..h];
                content.iter_mut().zip(y).for_each(|(c, y)| *c += y);
            }
            row.iter_mut().zip(&content).for_each(|(o, c)| *o += c);
        }
        Ok(out)
    }

    /// The mean id embedding over real items (what an unseen item gets in its place).
    pub fn mean_id(&self) -> Result<Tensor> {
        let e = self.id()?.embeddings();
        Ok(e.narrow(0, 1, e.dim(0)? - 1)?.mean(0)?)
    }

    /// The id embedding, `[items + 1, H]`.
    pub fn id_embedding(&self) -> Result<&Tensor> {
        Ok(self.id()?.embeddings())
    }

    /// Output bias of the table rows `rows` (`[rows]`, zeros when off).
    pub fn bias_rows(&self, rows: &Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => b.index_select(rows, 0)?,
            None => Tensor::zeros(rows.dim(0)?, DType::F32, &Device::Cpu)?,
        })
    }

    /// Output bias of real items, `[items]` (zeros when off).
    pub fn bias(&self, items: usize) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => b.narrow(0, 1, items)?,
            None => Tensor::zeros(items, DType::F32, &Device::Cpu)?,
        })
    }
}

/// Demographic segment embedding: gender + age bucket + occupation.
pub struct UserEmbedding {
    gender: Embedding,
    age: Embedding,
    occupation: Embedding,
}

impl UserEmbedding {
    /// Gender, age bucket and occupation tables (for the plain-slice encoder, `fast.rs`).
    pub(super) fn parts(&self) -> [&Embedding; 3] {
        [&self.gender, &self.age, &self.occupation]
    }

    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Ok(Self {
            gender: candle_nn::embedding(GENDERS, cfg.hidden, vb.pp("gender"))?,
            age: candle_nn::embedding(AGE_BUCKETS, cfg.hidden, vb.pp("age"))?,
            occupation: candle_nn::embedding(cfg.occupations + 1, cfg.hidden, vb.pp("occupation"))?,
        })
    }
}

impl Module for UserEmbedding {
    /// `users`: `[B, 3]` u32 (gender, age bucket, occupation); returns `[B, 1, H]`.
    fn forward(&self, users: &Tensor) -> candle_core::Result<Tensor> {
        let g = self.gender.forward(&users.narrow(1, 0, 1)?)?;
        let a = self.age.forward(&users.narrow(1, 1, 1)?)?;
        let o = self.occupation.forward(&users.narrow(1, 2, 1)?)?;
        (g + a)? + o
    }
}
