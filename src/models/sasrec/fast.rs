//! The encoder at inference on plain slices: the query vector of each user's last position,
//! with the arithmetic of [`SasRec::encode`](super::SasRec::encode) in eval mode with
//! `last_only` (a unit test holds the two within 1e-4), one user at a time and without padding.
//!
//! Why: in the server a scoring batch holds two or three users under steady traffic, and candle
//! spent 160-210 us on such a batch (some thirty small operations, each allocating its output
//! and waking candle's threads) before any retrieval: more than the two-stage search of a
//! million items. Here a user costs its arithmetic only, a few microseconds for the default
//! shape. Training, and anything that needs gradients, stays on candle.

use candle_core::Tensor;
use candle_nn::Embedding;

use super::config::{Config, Result, SasRecError};
use super::layers::{Block, LayerNorm, UserEmbedding};
use crate::models::ivf::dot;

/// One user's input: history tokens oldest first (model items, 1-based), the context segment
/// of the prediction and the demographic triple, as a `SeqInput` holds them.
pub struct FastInput<'a> {
    pub items: &'a [u32],
    pub hours: &'a [u32],
    pub feedback: &'a [u32],
    pub context: u32,
    pub user: [u32; 3],
}

/// The weights of a [`SasRec`] copied out of candle, for [`FastEncoder::encode`].
pub struct FastEncoder {
    hidden: usize,
    heads: usize,
    max_len: usize,
    ln_in: Norm,
    blocks: Vec<FastBlock>,
    ln_out: Norm,
    /// `[max_len, H]`, `[hour buckets, H]`, `[feedback values, H]`, `[segments, H]`.
    positions: Option<Vec<f32>>,
    hours: Option<Vec<f32>>,
    feedback: Option<Vec<f32>>,
    context: Option<Vec<f32>>,
    /// Gender, age bucket and occupation rows.
    users: Option<[Vec<f32>; 3]>,
}

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// A linear layer: `[out, in]` weight, row-major, as candle's `Linear` keeps it.
struct Dense {
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
}

struct FastBlock {
    ln1: Norm,
    qkv: Dense,
    out: Dense,
    ln2: Norm,
    ff1: Dense,
    ff2: Dense,
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl Norm {
    fn of(norm: &LayerNorm) -> Result<Self> {
        let (weight, bias) = norm.parts();
        Ok(Norm { weight: values(weight)?, bias: values(bias)? })
    }

    /// `x` normalised in place (mean 0, variance 1 within the vector), then scaled and shifted.
    fn apply(&self, x: &mut [f32]) {
        let n = x.len() as f32;
        let mean = x.iter().sum::<f32>() / n;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + LayerNorm::EPS).sqrt();
        for ((v, w), b) in x.iter_mut().zip(&self.weight).zip(&self.bias) {
            *v = (*v - mean) * inv * w + b;
        }
    }
}

impl Dense {
    fn of(linear: &candle_nn::Linear) -> Result<Self> {
        let weight = linear.weight();
        let (_, inputs) = weight.dims2()?;
        let bias = linear.bias().ok_or_else(|| SasRecError::Config("a dense layer without bias".into()))?;
        Ok(Dense { weight: values(weight)?, bias: values(bias)?, inputs })
    }

    /// `out = W x + b` for the output rows `rows` (a range of them: the attention's keys and
    /// values without its queries, say).
    fn apply_rows(&self, x: &[f32], rows: std::ops::Range<usize>, out: &mut Vec<f32>) {
        out.clear();
        out.extend(rows.map(|r| dot(&self.weight[r * self.inputs..][..self.inputs], x) + self.bias[r]));
    }

    fn apply(&self, x: &[f32], out: &mut Vec<f32>) {
        self.apply_rows(x, 0..self.bias.len(), out);
    }
}

impl FastBlock {
    fn of(block: &Block) -> Result<Self> {
        let (ln1, qkv, out, ln2, ff1, ff2) = block.parts();
        Ok(FastBlock {
            ln1: Norm::of(ln1)?,
            qkv: Dense::of(qkv)?,
            out: Dense::of(out)?,
            ln2: Norm::of(ln2)?,
            ff1: Dense::of(ff1)?,
            ff2: Dense::of(ff2)?,
        })
    }

    /// The block over `x` (`[l, H]`, updated in place), every position attending to itself and
    /// the ones before it; with `last_only`, only the last position's output is computed (the
    /// network's last block) and left in `x[(l - 1) * H..]`.
    fn forward(&self, x: &mut [f32], h: usize, heads: usize, last_only: bool, scratch: &mut Scratch) {
        let l = x.len() / h;
        let hd = h / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        // Keys and values of every position, from the normalised inputs.
        let Scratch { normed, row, qkv, attended, projected, inner, weights } = scratch;
        qkv.clear();
        for t in 0..l {
            normed.clear();
            normed.extend_from_slice(&x[t * h..(t + 1) * h]);
            self.ln1.apply(normed);
            let rows = if last_only && t + 1 < l { h..3 * h } else { 0..3 * h };
            self.qkv.apply_rows(normed, rows.clone(), row);
            // Stored as `[l, 3H]`; a position whose query is not needed leaves it zero.
            if rows.start > 0 {
                qkv.extend(std::iter::repeat_n(0.0, rows.start));
            }
            qkv.extend_from_slice(row);
        }
        let first = if last_only { l - 1 } else { 0 };
        for t in first..l {
            attended.clear();
            attended.resize(h, 0.0);
            for head in 0..heads {
                let q = &qkv[t * 3 * h + head * hd..][..hd];
                weights.clear();
                weights.extend((0..=t).map(|j| dot(q, &qkv[j * 3 * h + h + head * hd..][..hd]) * scale));
                let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for w in weights.iter_mut() {
                    *w = (*w - max).exp();
                    sum += *w;
                }
                let o = &mut attended[head * hd..(head + 1) * hd];
                for (j, w) in weights.iter().enumerate() {
                    let v = &qkv[j * 3 * h + 2 * h + head * hd..][..hd];
                    let w = w / sum;
                    o.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
                }
            }
            self.out.apply(attended, projected);
            let xt = &mut x[t * h..(t + 1) * h];
            xt.iter_mut().zip(projected.iter()).for_each(|(a, b)| *a += b);
            normed.clear();
            normed.extend_from_slice(xt);
            self.ln2.apply(normed);
            self.ff1.apply(normed, inner);
            inner.iter_mut().for_each(|v| *v = v.max(0.0));
            self.ff2.apply(inner, projected);
            xt.iter_mut().zip(projected.iter()).for_each(|(a, b)| *a += b);
        }
    }
}

/// Buffers reused across positions and users.
#[derive(Default)]
struct Scratch {
    normed: Vec<f32>,
    /// One position's projections.
    row: Vec<f32>,
    qkv: Vec<f32>,
    attended: Vec<f32>,
    projected: Vec<f32>,
    inner: Vec<f32>,
    weights: Vec<f32>,
}

/// What a [`FastEncoder`] copies out of a network (the network's own fields, lent by
/// `SasRec::fast_encoder`).
pub(super) struct Parts<'a> {
    pub cfg: &'a Config,
    pub ln_in: &'a LayerNorm,
    pub blocks: &'a [Block],
    pub ln_out: &'a LayerNorm,
    pub positions: Option<&'a Embedding>,
    pub hours: Option<&'a Embedding>,
    pub feedback: Option<&'a Embedding>,
    pub context: Option<&'a Embedding>,
    pub users: Option<&'a UserEmbedding>,
}

impl FastEncoder {
    pub(super) fn of(parts: Parts<'_>) -> Result<Self> {
        let rows =
            |e: Option<&Embedding>| -> Result<Option<Vec<f32>>> { e.map(|e| values(e.embeddings())).transpose() };
        let users = match parts.users {
            Some(u) => {
                let [g, a, o] = u.parts();
                Some([values(g.embeddings())?, values(a.embeddings())?, values(o.embeddings())?])
            }
            None => None,
        };
        Ok(FastEncoder {
            hidden: parts.cfg.hidden,
            heads: parts.cfg.heads,
            max_len: parts.cfg.max_len,
            ln_in: Norm::of(parts.ln_in)?,
            blocks: parts.blocks.iter().map(FastBlock::of).collect::<Result<_>>()?,
            ln_out: Norm::of(parts.ln_out)?,
            positions: rows(parts.positions)?,
            hours: rows(parts.hours)?,
            feedback: rows(parts.feedback)?,
            context: rows(parts.context)?,
            users,
        })
    }

    /// `[inputs, H]` query vectors, row-major; `table` is the `[items + 1, H]` item table the
    /// network reads (row 0: padding). An input longer than `max_len` keeps its last `max_len`
    /// tokens. An empty one is encoded as one padding token (the server never encodes one; a
    /// padded candle batch gives it a mix of the batch's padding positions instead: both are
    /// an arbitrary vector for a user with no known item). An index past its table (item,
    /// hour, feedback, context, user) is an error, as candle's lookups make it.
    pub fn encode(&self, inputs: &[FastInput<'_>], table: &[f32]) -> Result<Vec<f32>> {
        self.check(inputs, table)?;
        let h = self.hidden;
        let mut out = Vec::with_capacity(inputs.len() * h);
        let mut x = Vec::new();
        let mut scratch = Scratch::default();
        let last = self.blocks.len().saturating_sub(1);
        for input in inputs {
            let n = input.items.len().min(self.max_len);
            let skip = input.items.len() - n;
            let l = n.max(1);
            x.clear();
            x.resize(l * h, 0.0);
            for t in 0..l {
                let at = |tokens: &[u32]| if n == 0 { 0 } else { tokens.get(skip + t).copied().unwrap_or(0) as usize };
                let xt = &mut x[t * h..(t + 1) * h];
                let add = |xt: &mut [f32], rows: &[f32], r: usize| {
                    xt.iter_mut().zip(&rows[r * h..(r + 1) * h]).for_each(|(a, b)| *a += b)
                };
                add(xt, table, at(input.items));
                if let Some(p) = &self.positions {
                    add(xt, p, self.max_len - l + t);
                }
                if let Some(hr) = &self.hours {
                    add(xt, hr, at(input.hours));
                }
                if let Some(fb) = &self.feedback {
                    add(xt, fb, at(input.feedback));
                }
                self.ln_in.apply(xt);
            }
            for (i, block) in self.blocks.iter().enumerate() {
                block.forward(&mut x, h, self.heads, i == last, &mut scratch);
            }
            let q = &mut x[(l - 1) * h..l * h];
            self.ln_out.apply(q);
            if let Some(c) = &self.context {
                q.iter_mut().zip(&c[input.context as usize * h..][..h]).for_each(|(a, b)| *a += b);
            }
            if let Some(users) = &self.users {
                for (rows, &r) in users.iter().zip(&input.user) {
                    q.iter_mut().zip(&rows[r as usize * h..][..h]).for_each(|(a, b)| *a += b);
                }
            }
            out.extend_from_slice(q);
        }
        Ok(out)
    }

    /// Every index of `inputs` within its table.
    fn check(&self, inputs: &[FastInput<'_>], table: &[f32]) -> Result<()> {
        let h = self.hidden;
        let within = |values: &[u32], rows: Option<usize>, what: &str| match rows {
            Some(rows) if values.iter().any(|&v| v as usize >= rows) => {
                Err(SasRecError::Config(format!("a {what} index is past its table of {rows} rows")))
            }
            _ => Ok(()),
        };
        let rows = |t: &Option<Vec<f32>>| t.as_ref().map(|t| t.len() / h);
        for input in inputs {
            within(input.items, Some(table.len() / h), "item")?;
            within(input.hours, rows(&self.hours), "hour")?;
            within(input.feedback, rows(&self.feedback), "feedback")?;
            within(&[input.context], rows(&self.context), "context")?;
            if let Some(users) = &self.users {
                for (rows, &r) in users.iter().zip(&input.user) {
                    within(&[r], Some(rows.len() / h), "user")?;
                }
            }
        }
        Ok(())
    }
}
