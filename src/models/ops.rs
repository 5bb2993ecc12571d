//! Fused CPU operations with hand-written backward passes, for the network's hot spots.
//!
//! Candle's autograd builds LayerNorm, masked softmax, ReLU and dropout out of many elementwise
//! ops each, and its backward pass also allocates and accumulates gradients for constant
//! operands (attention masks, dropout masks). On a 2-core CPU that bookkeeping, not the matrix
//! products, dominated training time; these ops do the same maths in one pass each way.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused op needs a contiguous f32 input"),
    }
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
struct LayerNormOp {
    eps: f32,
}

impl LayerNormOp {
    /// Per row: `(mean, 1 / std)`.
    fn stats(&self, row: &[f32]) -> (f32, f32) {
        let n = row.len() as f32;
        let mean = row.iter().sum::<f32>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        (mean, 1.0 / (var + self.eps).sqrt())
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "liverec-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1)?;
        let w = contiguous(s2, l2)?;
        let b = contiguous(s3, l3)?;
        let d = w.len();
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks(d).zip(y.chunks_mut(d)) {
            let (mean, rstd) = self.stats(xr);
            for j in 0..d {
                yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
            }
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let xs = values(x)?;
        let ws = values(w)?;
        let gs = values(grad)?;
        let d = ws.len();
        let mut gx = vec![0f32; xs.len()];
        let mut gw = vec![0f32; d];
        let mut gb = vec![0f32; d];
        let mut xhat = vec![0f32; d];
        let mut gxhat = vec![0f32; d];
        for ((xr, gr), gxr) in xs.chunks(d).zip(gs.chunks(d)).zip(gx.chunks_mut(d)) {
            let (mean, rstd) = self.stats(xr);
            let (mut sum_g, mut sum_gx) = (0f32, 0f32);
            for j in 0..d {
                xhat[j] = (xr[j] - mean) * rstd;
                gxhat[j] = gr[j] * ws[j];
                sum_g += gxhat[j];
                sum_gx += gxhat[j] * xhat[j];
                gw[j] += gr[j] * xhat[j];
                gb[j] += gr[j];
            }
            let (mean_g, mean_gx) = (sum_g / d as f32, sum_gx / d as f32);
            for j in 0..d {
                gxr[j] = rstd * (gxhat[j] - mean_g - xhat[j] * mean_gx);
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(gx, x.shape(), dev)?),
            Some(Tensor::from_vec(gw, d, dev)?),
            Some(Tensor::from_vec(gb, d, dev)?),
        ))
    }
}

/// Differentiable LayerNorm over the last dimension of `x`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op3(weight, bias, LayerNormOp { eps })
}

/// Softmax over the last dimension of `x + mask`, where `x` is `[B, H, Q, K]` and the mask
/// `[B, 1, Q, K]` (shared by the heads).
struct MaskedSoftmaxOp {
    mask: Arc<Vec<f32>>,
    heads: usize,
    scale: f32,
}

impl CustomOp1 for MaskedSoftmaxOp {
    fn name(&self) -> &'static str {
        "liverec-masked-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout)?;
        let dims = layout.shape().dims();
        let k = dims[dims.len() - 1];
        let q = dims[dims.len() - 2];
        let block = q * k;
        if x.len() != self.mask.len() * self.heads {
            candle_core::bail!("mask does not match the attention scores");
        }
        let mut y = vec![0f32; x.len()];
        for (r, (xr, yr)) in x.chunks(k).zip(y.chunks_mut(k)).enumerate() {
            // Row r is (batch, head, query); the mask has no head dimension.
            let batch = r / (self.heads * q);
            let query = r % q;
            let mr = &self.mask[batch * block + query * k..][..k];
            let mut max = f32::NEG_INFINITY;
            for j in 0..k {
                yr[j] = xr[j] * self.scale + mr[j];
                max = max.max(yr[j]);
            }
            let mut sum = 0f32;
            for v in yr.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            yr.iter_mut().for_each(|v| *v *= inv);
        }
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let ys = values(res)?;
        let gs = values(grad)?;
        let k = res.dim(candle_core::D::Minus1)?;
        let mut gx = vec![0f32; ys.len()];
        for ((yr, gr), out) in ys.chunks(k).zip(gs.chunks(k)).zip(gx.chunks_mut(k)) {
            let dot: f32 = yr.iter().zip(gr).map(|(y, g)| y * g).sum();
            for j in 0..k {
                out[j] = self.scale * yr[j] * (gr[j] - dot);
            }
        }
        Ok(Some(Tensor::from_vec(gx, res.shape(), res.device())?))
    }
}

/// Softmax of scaled attention scores `scale * x` (`x`: `[B, H, Q, K]`) plus an additive mask
/// `[B, 1, Q, K]` given as values (the mask is a constant: no gradient flows to it).
pub fn masked_softmax(x: &Tensor, mask: Arc<Vec<f32>>, scale: f32) -> Result<Tensor> {
    let heads = x.dim(1)?;
    x.contiguous()?.apply_op1(MaskedSoftmaxOp { mask, heads, scale })
}

/// ReLU.
struct ReluOp;

impl CustomOp1 for ReluOp {
    fn name(&self) -> &'static str {
        "liverec-relu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout)?;
        let y = x.iter().map(|&v| v.max(0.0)).collect();
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let ys = values(res)?;
        let g: Vec<f32> = values(grad)?.iter().zip(&ys).map(|(&g, &y)| if y > 0.0 { g } else { 0.0 }).collect();
        Ok(Some(Tensor::from_vec(g, res.shape(), res.device())?))
    }
}

/// ReLU with a fused backward pass. (SASRec's original activation; a tanh GELU through libm
/// cost a quarter of training time for no measurable gain here.)
pub fn relu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ReluOp)
}

/// Attention of the last position only, for inference: `q` is `[B, H]` (the last position's
/// query), `kv` `[B, L, 2H]` (keys and values of every position, `heads` heads each),
/// `mask_last` the additive mask of the last query, `[B, L]`. Returns `[B, 1, H]`. No gradient.
pub fn attend_last(q: &Tensor, kv: &Tensor, mask_last: &[f32], heads: usize) -> Result<Tensor> {
    let (b, l, h2) = kv.dims3()?;
    let h = h2 / 2;
    let hd = h / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    if mask_last.len() != b * l || q.dims2()? != (b, h) {
        candle_core::bail!("attend_last: query, keys and mask do not match");
    }
    let queries = values(q)?;
    let kv = kv.contiguous()?;
    let (storage, layout) = kv.storage_and_layout();
    let data = match &*storage {
        candle_core::Storage::Cpu(cpu) => contiguous(cpu, layout)?,
        _ => candle_core::bail!("attend_last runs on the CPU"),
    };
    let mut out = vec![0f32; b * h];
    let mut weights = vec![0f32; l];
    for user in 0..b {
        let rows = &data[user * l * h2..(user + 1) * l * h2];
        let mask = &mask_last[user * l..(user + 1) * l];
        for head in 0..heads {
            let q = &queries[user * h + head * hd..][..hd];
            let mut max = f32::NEG_INFINITY;
            for (j, w) in weights.iter_mut().enumerate() {
                let k = &rows[j * h2 + head * hd..][..hd];
                let dot: f32 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                *w = dot * scale + mask[j];
                max = max.max(*w);
            }
            let mut sum = 0f32;
            for w in weights.iter_mut() {
                *w = (*w - max).exp();
                sum += *w;
            }
            let o = &mut out[user * h + head * hd..][..hd];
            for (j, w) in weights.iter().enumerate() {
                let v = &rows[j * h2 + h + head * hd..][..hd];
                let w = w / sum;
                o.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
            }
        }
    }
    Tensor::from_vec(out, (b, 1, h), kv.device())
}

/// Multiplication by a constant mask (dropout): `y = x * mask`.
struct ScaleOp {
    mask: Arc<Vec<f32>>,
}

impl CustomOp1 for ScaleOp {
    fn name(&self) -> &'static str {
        "liverec-dropout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout)?;
        if x.len() != self.mask.len() {
            candle_core::bail!("dropout mask does not match its input");
        }
        let y = x.iter().zip(self.mask.iter()).map(|(a, m)| a * m).collect();
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = values(grad)?.iter().zip(self.mask.iter()).map(|(g, m)| g * m).collect::<Vec<f32>>();
        Ok(Some(Tensor::from_vec(g, res.shape(), res.device())?))
    }
}

/// `x * mask` elementwise, with the mask a constant.
pub fn scale_by(x: &Tensor, mask: Arc<Vec<f32>>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ScaleOp { mask })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// Compares a fused op's gradient with candle's composite version of the same maths.
    fn assert_close(a: &Tensor, b: &Tensor) {
        let a = values(a).expect("a");
        let b = values(b).expect("b");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }

    #[test]
    fn fused_ops_match_composite_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_vec((0..24).map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.05).collect(), (1, 2, 3, 4), &dev)
            .expect("x");
        let w = Var::from_vec(vec![1.0f32, 0.5, -1.0, 2.0], 4, &dev).expect("w");
        let b = Var::from_vec(vec![0.1f32, 0.2, 0.3, 0.4], 4, &dev).expect("b");
        let weights =
            Tensor::from_vec((0..24).map(|i| i as f32 / 10.0).collect(), (1, 2, 3, 4), &dev).expect("weights");

        // LayerNorm.
        let fused = layer_norm(&x, &w, &b, 1e-5).expect("ln");
        let composite = candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5).expect("ln");
        assert_close(&fused, &composite);
        let gf = (&fused * &weights).and_then(|t| t.sum_all()).and_then(|t| t.backward()).expect("g");
        let gc = (&composite * &weights).and_then(|t| t.sum_all()).and_then(|t| t.backward()).expect("g");
        for v in [x.as_tensor(), w.as_tensor(), b.as_tensor()] {
            assert_close(gf.get(v).expect("grad"), gc.get(v).expect("grad"));
        }

        // Masked softmax: the mask hides the last key of every row.
        let mask: Vec<f32> = (0..12).map(|i| if i % 4 == 3 { -1e9 } else { 0.0 }).collect();
        let mask_t = Tensor::from_vec(mask.clone(), (1, 1, 3, 4), &dev).expect("mask");
        let fused = masked_softmax(&x, Arc::new(mask), 0.5).expect("softmax");
        let composite = (x.as_tensor() * 0.5)
            .and_then(|t| t.broadcast_add(&mask_t))
            .and_then(|t| candle_nn::ops::softmax(&t, D::Minus1))
            .expect("softmax");
        assert_close(&fused, &composite);
        let gf = (&fused * &weights).and_then(|t| t.sum_all()).and_then(|t| t.backward()).expect("g");
        let gc = (&composite * &weights).and_then(|t| t.sum_all()).and_then(|t| t.backward()).expect("g");
        assert_close(gf.get(&x).expect("grad"), gc.get(&x).expect("grad"));

        // ReLU.
        let fused = relu(&x).expect("relu");
        let composite = x.relu().expect("relu");
        assert_close(&fused, &composite);
        let gf = (&fused * &weights).and_then(|t| t.sum_all()).and_then(|t| t.backward()).expect("g");
        let gc = (&composite * &weights).and_then(|t| t.sum_all()).and_then(|t| t.backward()).expect("g");
        assert_close(gf.get(&x).expect("grad"), gc.get(&x).expect("grad"));

        // Dropout-style scaling.
        let m: Vec<f32> = (0..24).map(|i| if i % 3 == 0 { 0.0 } else { 1.5 }).collect();
        let m_t = Tensor::from_vec(m.clone(), (1, 2, 3, 4), &dev).expect("m");
        let fused = scale_by(&x, Arc::new(m)).expect("scale");
        assert_close(&fused, &(x.as_tensor() * &m_t).expect("mul"));
        let gf = (&fused * &weights).and_then(|t| t.sum_all()).and_then(|t| t.backward()).expect("g");
        assert_close(gf.get(&x).expect("grad"), &(&weights * &m_t).expect("mul"));
    }
}
