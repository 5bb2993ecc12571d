//! Statistics the monitor actor uses: sliding windows of counts, population stability index for
//! input drift, and a two-proportion z-test for click-through drops. Pure functions and plain
//! data, no I/O, so they are tested on their own. `drift` holds the input-drift indices,
//! `report` the window figures and the report built from them.

use std::collections::HashMap;

use serde::Serialize;

pub mod drift;
pub mod report;

/// One arm of the traffic split: a model version serving one experiment variant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Arm {
    pub version: String,
    pub variant: String,
}

impl Arm {
    pub fn new(version: impl Into<String>, variant: impl Into<String>) -> Self {
        Self { version: version.into(), variant: variant.into() }
    }
}

/// Impressions and clicks of one arm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArmTally {
    pub impressions: u64,
    pub clicks: u64,
}

impl ArmTally {
    /// What was counted since `earlier`, a reading of the same counters.
    pub fn since(self, earlier: ArmTally) -> ArmTally {
        ArmTally {
            impressions: self.impressions.saturating_sub(earlier.impressions),
            clicks: self.clicks.saturating_sub(earlier.clicks),
        }
    }
}

/// Impressions and clicks per arm since the monitor started; verdicts diff two readings.
pub type ArmCounts = HashMap<Arm, ArmTally>;

/// The tally of `arm` in `now` since the reading `baseline` (zero for an arm not yet seen).
pub fn arm_since(now: &ArmCounts, baseline: &ArmCounts, arm: &Arm) -> ArmTally {
    let read = |counts: &ArmCounts| counts.get(arm).copied().unwrap_or_default();
    read(now).since(read(baseline))
}

/// Counts over a sliding window made of fixed buckets; the oldest bucket is dropped as time moves.
#[derive(Clone, Debug)]
pub struct Window<T: Clone + Default> {
    buckets: Vec<T>,
    /// Index of the bucket that receives new counts.
    head: usize,
    /// Bucket number (time / bucket length) of the head.
    head_tick: u64,
}

impl<T: Clone + Default> Window<T> {
    pub fn new(buckets: usize) -> Self {
        Self { buckets: vec![T::default(); buckets.max(1)], head: 0, head_tick: 0 }
    }

    /// Moves the window to `tick`, clearing the buckets that fell out of it.
    pub fn advance(&mut self, tick: u64) {
        if tick <= self.head_tick {
            return;
        }
        let steps = (tick - self.head_tick).min(self.buckets.len() as u64);
        for _ in 0..steps {
            self.head = (self.head + 1) % self.buckets.len();
            self.buckets[self.head] = T::default();
        }
        self.head_tick = tick;
    }

    /// The current bucket, after moving to `tick`.
    pub fn at(&mut self, tick: u64) -> &mut T {
        self.advance(tick);
        &mut self.buckets[self.head]
    }

    pub fn buckets(&self) -> impl Iterator<Item = &T> {
        self.buckets.iter()
    }
}

/// Population stability index of `actual` against `expected` (both counts over the same bins).
/// Empty bins get a small floor so the index stays finite. Rule of thumb: < 0.1 stable, 0.1-0.25
/// moderate shift, > 0.25 large shift.
pub fn psi(expected: &[f64], actual: &[f64]) -> f64 {
    const FLOOR: f64 = 1e-4;
    let (te, ta): (f64, f64) = (expected.iter().sum(), actual.iter().sum());
    if te <= 0.0 || ta <= 0.0 {
        return 0.0;
    }
    expected
        .iter()
        .zip(actual)
        .map(|(&e, &a)| {
            let (pe, pa) = ((e / te).max(FLOOR), (a / ta).max(FLOOR));
            (pa - pe) * (pa / pe).ln()
        })
        .sum()
}

/// z statistic of the difference between two proportions (`x1/n1` minus `x2/n2`), pooled.
/// Positive when the first proportion is higher. Zero when either sample is empty.
pub fn two_proportion_z(x1: u64, n1: u64, x2: u64, n2: u64) -> f64 {
    if n1 == 0 || n2 == 0 {
        return 0.0;
    }
    let (p1, p2) = (x1 as f64 / n1 as f64, x2 as f64 / n2 as f64);
    let pooled = (x1 + x2) as f64 / (n1 + n2) as f64;
    let se = (pooled * (1.0 - pooled) * (1.0 / n1 as f64 + 1.0 / n2 as f64)).sqrt();
    if se == 0.0 {
        0.0
    } else {
        (p1 - p2) / se
    }
}

/// A proportion with its 95 % Wilson interval.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Rate {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

/// The share `successes / trials` with its interval. A share by construction: sessions count at
/// most one click per impression, but a window can still end up holding a click whose impression
/// fell out of it (the impression in the bucket just dropped), so successes are capped at trials.
pub fn wilson(successes: u64, trials: u64) -> Rate {
    if trials == 0 {
        return Rate { value: 0.0, low: 0.0, high: 0.0 };
    }
    let successes = successes.min(trials);
    let z = 1.96f64;
    let n = trials as f64;
    let p = successes as f64 / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * ((p * (1.0 - p) + z * z / (4.0 * n)) / n).sqrt() / denom;
    Rate { value: p, low: (centre - half).max(0.0), high: (centre + half).min(1.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_tallies_count_since_the_baseline_and_never_go_negative() {
        let arm = Arm::new("v1", "control");
        let then: ArmCounts = [(arm.clone(), ArmTally { impressions: 10, clicks: 2 })].into();
        let now: ArmCounts = [(arm.clone(), ArmTally { impressions: 25, clicks: 5 })].into();
        assert_eq!(arm_since(&now, &then, &arm), ArmTally { impressions: 15, clicks: 3 });
        assert_eq!(arm_since(&then, &now, &arm), ArmTally::default());
        assert_eq!(arm_since(&now, &then, &Arm::new("v2", "canary")), ArmTally::default());
    }

    #[test]
    fn windows_forget_old_buckets() {
        let mut w: Window<u64> = Window::new(3);
        *w.at(0) += 5;
        *w.at(1) += 1;
        assert_eq!(w.buckets().sum::<u64>(), 6);
        *w.at(3) += 1; // bucket 0 falls out
        assert_eq!(w.buckets().sum::<u64>(), 2);
        w.advance(100);
        assert_eq!(w.buckets().sum::<u64>(), 0);
        *w.at(50) += 1; // the past does not rewind the window
        assert_eq!(w.buckets().sum::<u64>(), 1);
    }

    #[test]
    fn psi_is_zero_for_the_same_mix_and_large_for_a_shift() {
        let reference = [50.0, 30.0, 20.0];
        assert!(psi(&reference, &[500.0, 300.0, 200.0]).abs() < 1e-12);
        assert!(psi(&reference, &[20.0, 30.0, 50.0]) > 0.25);
        assert!(psi(&reference, &[48.0, 31.0, 21.0]) < 0.01);
    }

    #[test]
    fn z_test_sees_real_drops_not_noise() {
        // 10 % vs 5 % CTR on 2,000 impressions each: a clear drop.
        assert!(two_proportion_z(200, 2000, 100, 2000) > 4.0);
        // 10 % vs 9.5 % on 200 each: noise.
        assert!(two_proportion_z(20, 200, 19, 200).abs() < 1.0);
        assert_eq!(two_proportion_z(1, 0, 1, 10), 0.0);
    }

    #[test]
    fn wilson_interval_contains_the_rate() {
        let r = wilson(10, 100);
        assert!(r.low < 0.1 && 0.1 < r.high && r.low > 0.04 && r.high < 0.18, "{r:?}");
        assert_eq!(wilson(0, 0).value, 0.0);
        // A window whose click outlived its impression is still a share.
        let r = wilson(3, 1);
        assert!(r.value <= 1.0 && r.high <= 1.0 && r.low <= r.value, "{r:?}");
    }
}
