//! Model selection for training: which evaluations' weights a run keeps.
//!
//! The `select_window` consecutive validation evaluations with the highest mean NDCG@10 are
//! selected and their weights averaged (or the middle one's kept); see `train.select_window`
//! and docs/model.md, "Model selection".

use std::collections::{HashMap, VecDeque};

use candle_core::Tensor;

use super::sasrec::SasRecError;

/// Model selection over a run's evaluations: the `window` consecutive evaluations with the
/// highest mean score, reduced to one checkpoint (their average, or the middle one).
///
/// Why a window: on MovieLens-100K the validation NDCG@10 of 943 users moves by about 0.001
/// between neighbouring epochs of a plateau, so the argmax of single evaluations picks an
/// epoch by noise (best epochs 6 to 14 over five seeds); a mean over neighbours smooths it.
/// Only the newest `window` checkpoints and the best reduced one are held.
pub(crate) struct Selector<T> {
    window: usize,
    recent: VecDeque<(usize, f64, T)>,
    /// Mean score, epochs of the window, reduced checkpoint.
    best: Option<(f64, Vec<usize>, T)>,
}

impl<T> Selector<T> {
    pub(crate) fn new(window: usize) -> Self {
        Self { window: window.max(1), recent: VecDeque::new(), best: None }
    }

    /// Adds an evaluation; once `window` are held, compares their mean with the best window's
    /// (strictly better wins: ties keep the earlier window). Returns whether a window was
    /// compared and won, lost, or none was complete yet (`None`).
    pub(crate) fn push<E>(
        &mut self,
        epoch: usize,
        score: f64,
        checkpoint: T,
        reduce: impl Fn(&[&T]) -> Result<T, E>,
    ) -> Result<Option<bool>, E> {
        self.hold(epoch, score, checkpoint);
        if self.recent.len() < self.window {
            return Ok(None);
        }
        let mean = self.recent.iter().map(|r| r.1).sum::<f64>() / self.window as f64;
        if self.best.as_ref().is_some_and(|b| mean <= b.0) {
            return Ok(Some(false));
        }
        let checkpoints: Vec<&T> = self.recent.iter().map(|r| &r.2).collect();
        let epochs = self.recent.iter().map(|r| r.0).collect();
        self.best = Some((mean, epochs, reduce(&checkpoints)?));
        Ok(Some(true))
    }

    /// Adds an evaluation to the newest `window` without comparing (the score is kept).
    pub(crate) fn hold(&mut self, epoch: usize, score: f64, checkpoint: T) {
        self.recent.push_back((epoch, score, checkpoint));
        if self.recent.len() > self.window {
            self.recent.pop_front();
        }
    }

    /// The best window's mean score so far and its epochs.
    pub(crate) fn best(&self) -> Option<(f64, &[usize])> {
        self.best.as_ref().map(|b| (b.0, b.1.as_slice()))
    }

    /// The selected epochs and checkpoint: the best window; with fewer evaluations than the
    /// window (or `last`), the newest evaluations held.
    pub(crate) fn finish<E>(
        self,
        last: bool,
        reduce: impl Fn(&[&T]) -> Result<T, E>,
    ) -> Result<Option<(Vec<usize>, T)>, E> {
        match self.best {
            Some((_, epochs, checkpoint)) if !last => Ok(Some((epochs, checkpoint))),
            _ if self.recent.is_empty() => Ok(None),
            _ => {
                let checkpoints: Vec<&T> = self.recent.iter().map(|r| &r.2).collect();
                let reduced = reduce(&checkpoints)?;
                Ok(Some((self.recent.iter().map(|r| r.0).collect(), reduced)))
            }
        }
    }
}

/// The middle of the selected epochs (the later of two middles): the one `best_epoch` names.
pub(crate) fn middle<T>(items: &[T]) -> Option<&T> {
    items.get(items.len() / 2)
}

pub(crate) type Checkpoint = HashMap<String, Tensor>;

/// The selected checkpoints reduced to one: their element-wise mean (summed in order, so the
/// result is deterministic), or the middle one.
pub(crate) fn reduce_checkpoints(checkpoints: &[&Checkpoint], average: bool) -> Result<Checkpoint, SasRecError> {
    let Some(&first) = (if average { checkpoints.first() } else { middle(checkpoints) }) else {
        return Ok(Checkpoint::new());
    };
    if !average || checkpoints.len() == 1 {
        return Ok(first.clone());
    }
    let scale = 1.0 / checkpoints.len() as f64;
    first
        .iter()
        .map(|(name, tensor)| -> Result<(String, Tensor), SasRecError> {
            let mut sum = tensor.clone();
            for c in &checkpoints[1..] {
                sum = (sum + &c[name])?;
            }
            Ok((name.clone(), sum.affine(scale, 0.0)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Runs a selector over `scores` (evaluation `i` is epoch `i + 1`, its checkpoint the
    /// epoch number) with an averaging reduction; returns the kept epochs and checkpoint.
    fn select(scores: &[f64], window: usize, last: bool) -> (Vec<usize>, f64) {
        let mean = |c: &[&f64]| Ok::<_, ()>(c.iter().copied().sum::<f64>() / c.len() as f64);
        let mut selector = Selector::new(window);
        for (i, &score) in scores.iter().enumerate() {
            selector.push(i + 1, score, (i + 1) as f64, mean).expect("push");
        }
        selector.finish(last, mean).expect("finish").expect("evaluations")
    }

    #[test]
    fn the_selector_keeps_the_best_smoothed_window_not_a_noisy_spike() {
        // A lone spike at epoch 3; the plateau 6..=8 has the best mean of three.
        let scores = [0.100, 0.110, 0.131, 0.112, 0.120, 0.126, 0.127, 0.125, 0.118, 0.121];
        assert_eq!(select(&scores, 1, false), (vec![3], 3.0), "window 1: the argmax");
        assert_eq!(select(&scores, 3, false), (vec![6, 7, 8], 7.0), "window 3: the plateau, averaged");
        // Ties keep the earlier window.
        assert_eq!(select(&[0.1, 0.2, 0.2, 0.1, 0.2, 0.2], 2, false).0, vec![2, 3]);
        // Fewer evaluations than the window: all of them.
        assert_eq!(select(&[0.1, 0.3], 3, false), (vec![1, 2], 1.5));
        // `last` (training on validation too): the newest window, whatever the scores.
        assert_eq!(select(&scores, 3, true).0, vec![8, 9, 10]);
        let mut held = Selector::new(2);
        for epoch in 1..=4 {
            held.hold(epoch, 0.0, epoch as f64);
        }
        assert!(held.best().is_none(), "held evaluations are not compared");
        let mean = |c: &[&f64]| Ok::<_, ()>(c.iter().copied().sum::<f64>() / c.len() as f64);
        assert_eq!(held.finish(true, mean).expect("finish"), Some((vec![3, 4], 3.5)));
        assert_eq!(middle(&[6, 7, 8]), Some(&7));
    }

    #[test]
    fn checkpoints_reduce_to_their_mean_or_the_middle_one() {
        let cpu = &Device::Cpu;
        let checkpoint =
            |v: f32| Checkpoint::from([("w".to_owned(), Tensor::from_vec(vec![v, 2.0 * v], 2, cpu).expect("tensor"))]);
        let (a, b, c) = (checkpoint(1.0), checkpoint(2.0), checkpoint(6.0));
        let values = |c: Checkpoint| c["w"].to_vec1::<f32>().expect("values");
        assert_eq!(values(reduce_checkpoints(&[&a, &b, &c], true).expect("mean")), vec![3.0, 6.0]);
        assert_eq!(values(reduce_checkpoints(&[&a, &b, &c], false).expect("middle")), vec![2.0, 4.0]);
        assert_eq!(values(reduce_checkpoints(&[&c], true).expect("one")), vec![6.0, 12.0]);
    }
}
