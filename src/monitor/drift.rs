//! Input drift: population stability index of item popularity, category mix and context mix
//! against a reference, with the binning rules that keep the index honest on small samples.

use std::collections::{HashMap, HashSet};

use super::{psi_test_sized, PsiTest, Sizes};
use crate::catalog::{Categories, ItemIdx};
use crate::event::Context as EventContext;

/// What input drift is measured against: item popularity (organic events) and context mix.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DriftReference {
    pub popularity: HashMap<ItemIdx, f64>,
    pub context: Vec<f64>,
    /// How many independent draws its events are worth (see [`effective_users`]).
    pub effective_users: Option<f64>,
}

/// Kish's effective number of clusters of events by user: `(Σ e_u)² / Σ e_u²` over each user's
/// event count `e_u` (the number of users when each has as many events, about one when one user
/// has most of them); `None` without events.
pub fn effective_users(events_per_user: impl IntoIterator<Item = u64>) -> Option<f64> {
    let (sum, squares) = events_per_user
        .into_iter()
        .fold((0.0, 0.0), |(sum, squares), e| (sum + e as f64, squares + (e as f64).powi(2)));
    (squares > 0.0).then(|| sum * sum / squares)
}

/// Items with fewer reference events than this share the "rest" bin: single-item counts that
/// small are mostly noise, and picking the top items of a noisy sample inflates the index.
const MIN_BIN_EVENTS: f64 = 10.0;

/// PSI of item popularity: one bin per popular reference item (at most `bins`, each with at
/// least [`MIN_BIN_EVENTS`] reference events), one bin for everything else. `sizes`: see
/// [`super::psi_test_sized`].
pub fn item_psi(reference: &HashMap<ItemIdx, f64>, now: &HashMap<ItemIdx, f64>, bins: usize, sizes: Sizes) -> PsiTest {
    let mut top: Vec<(ItemIdx, f64)> =
        reference.iter().filter(|(_, &n)| n >= MIN_BIN_EVENTS).map(|(&i, &n)| (i, n)).collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(bins);
    let in_bins: HashSet<ItemIdx> = top.iter().map(|(i, _)| *i).collect();
    let mut expected: Vec<f64> = top.iter().map(|(_, n)| *n).collect();
    let mut actual: Vec<f64> = top.iter().map(|(i, _)| now.get(i).copied().unwrap_or(0.0)).collect();
    expected.push(reference.iter().filter(|(i, _)| !in_bins.contains(i)).map(|(_, n)| n).sum());
    actual.push(now.iter().filter(|(i, _)| !in_bins.contains(i)).map(|(_, n)| n).sum());
    psi_test_sized(&expected, &actual, sizes)
}

/// PSI of the context mix (device x hour bucket), over the hour buckets the reference saw only.
/// Time of day is a cycle, not drift: a reference shorter than a day misses most hour buckets,
/// and without this the mix would "drift" completely each time the clock enters a new bucket.
pub fn context_psi(reference: &[f64], now: &[f64], sizes: Sizes) -> PsiTest {
    let buckets = EventContext::HOUR_BUCKETS;
    let seen: Vec<bool> = (0..buckets).map(|b| reference.iter().skip(b).step_by(buckets).sum::<f64>() > 0.0).collect();
    let keep = |(i, _): &(usize, &f64)| seen[i % buckets];
    let expected: Vec<f64> = reference.iter().enumerate().filter(keep).map(|(_, &v)| v).collect();
    let actual: Vec<f64> = now.iter().enumerate().filter(keep).map(|(_, &v)| v).collect();
    psi_test_sized(&expected, &actual, sizes)
}

/// Events per category (an item in several categories counts a share in each; items without
/// one count under `u32::MAX`).
pub fn category_mix(popularity: &HashMap<ItemIdx, f64>, categories: &Categories<'_>) -> HashMap<u32, f64> {
    let mut mix: HashMap<u32, f64> = HashMap::new();
    for (&item, &n) in popularity {
        let of = categories.of(item);
        if of.is_empty() {
            *mix.entry(u32::MAX).or_default() += n;
        }
        for &c in of {
            *mix.entry(u32::from(c)).or_default() += n / of.len() as f64;
        }
    }
    mix
}

/// Two sparse distributions as dense vectors over the union of their keys.
pub fn aligned(a: &HashMap<u32, f64>, b: &HashMap<u32, f64>) -> (Vec<f64>, Vec<f64>) {
    let mut keys: Vec<u32> = a.keys().chain(b.keys()).copied().collect();
    keys.sort_unstable();
    keys.dedup();
    keys.iter().map(|k| (a.get(k).copied().unwrap_or(0.0), b.get(k).copied().unwrap_or(0.0))).unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_hour_of_the_day_is_not_context_drift_but_a_new_device_mix_is() {
        let buckets = EventContext::HOUR_BUCKETS;
        let mut reference = vec![0.0; EventContext::SEGMENTS];
        reference[0] = 50.0; // device 0, hour bucket 0
        reference[buckets] = 50.0; // device 1, hour bucket 0
        let mut next_hour = vec![0.0; EventContext::SEGMENTS];
        next_hour[1] = 50.0; // the same devices, the next hour bucket
        next_hour[buckets + 1] = 50.0;
        next_hour[0] = 1.0;
        next_hour[buckets] = 1.0;
        let test = context_psi(&reference, &next_hour, Sizes::default());
        assert!(test.psi < 0.01 && !test.drifted(0.25), "{test:?}");
        let mut other_devices = vec![0.0; EventContext::SEGMENTS];
        other_devices[2 * buckets] = 50.0; // devices the reference never had, same hour bucket
        other_devices[3 * buckets] = 50.0;
        let test = context_psi(&reference, &other_devices, Sizes::default());
        assert!(test.drifted(0.25), "{test:?}");
    }
}
