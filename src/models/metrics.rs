//! Ranking metrics of the evaluation protocol: the rank of the one held-out item among all
//! candidates, and HR, NDCG and MRR at cut-offs 10 and 20 averaged over users.

use serde::{Deserialize, Serialize};

/// The rank of `target` among the candidates: 1 + the number of non-excluded items that score
/// *strictly* higher (so ties count in the target's favour, as in the protocol). The target is
/// always a candidate, even if it is also marked excluded. A non-finite target score ranks last.
pub fn rank_of(scores: &[f32], target: usize, excluded: &[bool]) -> usize {
    let candidates = scores.len() - excluded.iter().filter(|&&e| e).count()
        + usize::from(excluded.get(target).copied().unwrap_or(false));
    let t = scores[target];
    if !t.is_finite() {
        return candidates.max(1);
    }
    let higher = scores.iter().zip(excluded).enumerate().filter(|&(j, (&s, &e))| j != target && !e && s > t).count();
    1 + higher
}

/// HR, NDCG and MRR at 10 and 20, as `liverec eval --json` prints them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    #[serde(rename = "hr@10")]
    pub hr10: f64,
    #[serde(rename = "ndcg@10")]
    pub ndcg10: f64,
    #[serde(rename = "mrr@10")]
    pub mrr10: f64,
    #[serde(rename = "hr@20")]
    pub hr20: f64,
    #[serde(rename = "ndcg@20")]
    pub ndcg20: f64,
}

/// Sums of per-user metrics, averaged by [`MetricSums::mean`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MetricSums {
    sums: Metrics,
    users: usize,
}

impl MetricSums {
    /// Adds one user's held-out item at 1-based `rank`.
    pub fn add(&mut self, rank: usize) {
        let r = rank.max(1) as f64;
        let ndcg = 1.0 / (r + 1.0).log2();
        if rank <= 10 {
            self.sums.hr10 += 1.0;
            self.sums.ndcg10 += ndcg;
            self.sums.mrr10 += 1.0 / r;
        }
        if rank <= 20 {
            self.sums.hr20 += 1.0;
            self.sums.ndcg20 += ndcg;
        }
        self.users += 1;
    }

    pub fn users(&self) -> usize {
        self.users
    }

    pub fn mean(&self) -> Metrics {
        let n = self.users.max(1) as f64;
        Metrics {
            hr10: self.sums.hr10 / n,
            ndcg10: self.sums.ndcg10 / n,
            mrr10: self.sums.mrr10 / n,
            hr20: self.sums.hr20 / n,
            ndcg20: self.sums.ndcg20 / n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_counts_strictly_higher_non_excluded_candidates() {
        let scores = [0.9, 0.5, 0.7, 0.5, 0.8, f32::NEG_INFINITY];
        let none = [false; 6];
        assert_eq!(rank_of(&scores, 1, &none), 4); // 0.9, 0.7, 0.8 are higher; the tie is not
        assert_eq!(rank_of(&scores, 3, &none), 4);
        assert_eq!(rank_of(&scores, 0, &none), 1);
        let excluded = [true, false, false, false, true, false];
        assert_eq!(rank_of(&scores, 1, &excluded), 2);
        // The target is ranked even if a caller marked it excluded.
        assert_eq!(rank_of(&scores, 0, &excluded), 1);
        // A target with no finite score ranks last among the 4 candidates.
        assert_eq!(rank_of(&scores, 5, &excluded), 4);
    }

    #[test]
    fn metrics_match_hand_computed_values() {
        let mut sums = MetricSums::default();
        for rank in [1, 3, 15, 40] {
            sums.add(rank);
        }
        let m = sums.mean();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert_eq!(sums.users(), 4);
        assert!(close(m.hr10, 2.0 / 4.0));
        assert!(close(m.hr20, 3.0 / 4.0));
        // NDCG: 1/log2(2) = 1, 1/log2(4) = 0.5, 1/log2(16) = 0.25.
        assert!(close(m.ndcg10, (1.0 + 0.5) / 4.0));
        assert!(close(m.ndcg20, (1.0 + 0.5 + 0.25) / 4.0));
        assert!(close(m.mrr10, (1.0 + 1.0 / 3.0) / 4.0));
        let json = serde_json::to_value(m).expect("serialises");
        assert!(json.get("ndcg@10").is_some() && json.get("mrr@10").is_some());
    }
}
