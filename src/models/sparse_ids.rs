//! The item id embedding of a sampled-softmax training run, updated row by row.
//!
//! With a sampled softmax a mini-batch touches a few thousand item rows (its histories, its
//! labels and its negatives), yet a dense step computes every item's vector, back-propagates
//! into the whole `[items + 1, H]` id embedding and runs Adam over all of it: about 12 s a step
//! at 10^6 items on this machine. Here the run keeps the embedding and Adam's two moments as
//! plain row-major vectors, hands each step only its rows (as a fresh variable, so candle's
//! gradient is `[rows, H]`), and applies Adam to those rows alone ("lazy" Adam: a row's moments
//! change only on the steps that touch it, with the run's step count in the bias correction).
//! The variable in the model's `VarMap` is set from the master copy before anything else reads
//! it (validation, checkpoints, saving).

use candle_core::{Device, Tensor, Var};
use candle_nn::ParamsAdamW;

use super::sasrec::SasRecError;

pub struct SparseIds {
    /// `[items + 1, h]`, row-major: the master copy of the id embedding.
    table: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    h: usize,
    /// Local position of each table row in the current step, `u32::MAX` when absent.
    local: Vec<u32>,
    /// Table rows of the current step, ascending (row 0, the padding, first).
    rows: Vec<u32>,
    /// The run's Adam settings for embeddings (its `lr` is given per step; no weight decay).
    adam: ParamsAdamW,
    steps: i32,
}

impl SparseIds {
    /// Takes the id embedding `[items + 1, h]` as it is now.
    pub fn new(embedding: &Tensor, adam: ParamsAdamW) -> Result<Self, SasRecError> {
        let (n, h) = embedding.dims2()?;
        let table = embedding.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self {
            m: vec![0.0; table.len()],
            v: vec![0.0; table.len()],
            table,
            h,
            local: vec![u32::MAX; n],
            rows: Vec::new(),
            adam,
            steps: 0,
        })
    }

    /// Starts a step over table rows `touched` (any order, repeats allowed): returns them
    /// ascending with row 0 first; [`SparseIds::local`] then maps a table row to its position.
    pub fn begin(&mut self, touched: impl IntoIterator<Item = u32>) -> &[u32] {
        for &r in &self.rows {
            self.local[r as usize] = u32::MAX;
        }
        self.rows.clear();
        self.rows.push(0);
        self.rows.extend(touched.into_iter().filter(|&r| r != 0));
        self.rows.sort_unstable();
        self.rows.dedup();
        for (i, &r) in self.rows.iter().enumerate() {
            self.local[r as usize] = i as u32;
        }
        &self.rows
    }

    /// The position of table row `row` in the current step (it must be among its rows).
    pub fn local(&self, row: u32) -> u32 {
        let at = self.local[row as usize];
        debug_assert!(at != u32::MAX, "row {row} is not in this step");
        at
    }

    /// The current step's rows of the embedding, `[rows, h]`, as a variable to differentiate.
    pub fn gather(&self) -> Result<Var, SasRecError> {
        let h = self.h;
        let mut out = Vec::with_capacity(self.rows.len() * h);
        for &r in &self.rows {
            out.extend_from_slice(&self.table[r as usize * h..][..h]);
        }
        Ok(Var::from_tensor(&Tensor::from_vec(out, (self.rows.len(), h), &Device::Cpu)?)?)
    }

    /// One Adam step at learning rate `lr` for the current step's rows, from their gradient
    /// `[rows, h]` (none: the rows did not reach the loss, and nothing changes).
    pub fn apply(&mut self, grad: Option<&Tensor>, lr: f64) -> Result<(), SasRecError> {
        self.steps += 1;
        let Some(grad) = grad else { return Ok(()) };
        let grad = grad.flatten_all()?.to_vec1::<f32>()?;
        let ParamsAdamW { beta1, beta2, eps, .. } = self.adam;
        let scale_m = 1.0 / (1.0 - beta1.powi(self.steps));
        let scale_v = 1.0 / (1.0 - beta2.powi(self.steps));
        let h = self.h;
        for (i, &r) in self.rows.iter().enumerate() {
            let at = r as usize * h;
            for j in 0..h {
                let g = f64::from(grad[i * h + j]);
                let m = beta1 * f64::from(self.m[at + j]) + (1.0 - beta1) * g;
                let v = beta2 * f64::from(self.v[at + j]) + (1.0 - beta2) * g * g;
                self.m[at + j] = m as f32;
                self.v[at + j] = v as f32;
                let step = lr * (m * scale_m) / ((v * scale_v).sqrt() + eps);
                self.table[at + j] -= step as f32;
            }
        }
        Ok(())
    }

    /// Sets `var` (the model's id embedding) from the master copy.
    pub fn write_to(&self, var: &Var) -> Result<(), SasRecError> {
        let n = self.table.len() / self.h;
        var.set(&Tensor::from_slice(&self.table, (n, self.h), &Device::Cpu)?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADAM: ParamsAdamW = ParamsAdamW { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };

    #[test]
    fn a_step_moves_only_its_rows_and_matches_dense_adam_on_them() {
        let h = 3;
        let start: Vec<f32> = (0..5 * h).map(|i| i as f32 * 0.1).collect();
        let embedding = Tensor::from_vec(start.clone(), (5, h), &Device::Cpu).expect("tensor");
        let mut ids = SparseIds::new(&embedding, ADAM).expect("ids");
        assert_eq!(ids.begin([3, 1, 3]), &[0, 1, 3]);
        assert_eq!((ids.local(0), ids.local(1), ids.local(3)), (0, 1, 2));
        let rows = ids.gather().expect("rows");
        assert_eq!(rows.as_tensor().to_vec2::<f32>().expect("values")[2], start[9..12].to_vec());
        let grad =
            Tensor::from_vec(vec![0f32, 0.0, 0.0, 1.0, -2.0, 0.5, 0.3, 0.3, -0.3], (3, h), &Device::Cpu).expect("grad");
        ids.apply(Some(&grad), 0.01).expect("step");
        let var = Var::from_tensor(&embedding.zeros_like().expect("zeros")).expect("var");
        ids.write_to(&var).expect("written");
        let after = var.as_tensor().flatten_all().expect("flat").to_vec1::<f32>().expect("values");
        // Untouched rows (2 and 4) keep their values; a zero gradient (row 0) moves nothing.
        assert_eq!(after[6..9], start[6..9]);
        assert_eq!(after[12..15], start[12..15]);
        assert_eq!(after[0..3], start[0..3]);
        // Adam's first step moves each coordinate by lr * sign(g) (m_hat / sqrt(v_hat) = g / |g|).
        for (j, g) in [1.0f32, -2.0, 0.5].iter().enumerate() {
            assert!((after[3 + j] - (start[3 + j] - 0.01 * g.signum())).abs() < 1e-6, "row 1, {j}");
        }
        // The next step's rows start from a clean map.
        assert_eq!(ids.begin([4]), &[0, 4]);
        assert_eq!(ids.local(4), 1);
    }
}
