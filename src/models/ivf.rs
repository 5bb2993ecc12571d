//! The ANN index of two-stage retrieval: an inverted file over item vectors with a bias, for
//! maximum inner product search. Depends on nothing of the server (candle for one matrix product,
//! rand for sampling), so `load-tests/ann-bench` compiles this very file next to the HNSW crates
//! it was measured against.
//!
//! k-means (on a sample, a few passes) splits the items into lists of about `list_size`; a query
//! scores the centroids and scans the best lists' items in contiguous memory. Bias terms are
//! folded in as one more dimension (`[v, b]` against `[q, 1]`), so the index ranks by the
//! model's logit `q . v + b`. New items join the list of their nearest centroid, without a
//! rebuild; a filter is a test per scanned item, with further lists scanned when too few pass.

use candle_core::{Device, Tensor};
use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::SeedableRng;

/// Item index (the catalogue's `ItemIdx`).
pub type Item = u32;

/// Dot product in eight lanes, so that it vectorises.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// An inverted-file index over item vectors with a bias, for maximum inner product search (see
/// the module docs).
pub struct IvfIndex {
    /// Stored dimensions: the vector, the bias, zero padding to a multiple of 8.
    dim: usize,
    /// The vectors' own dimensions.
    hidden: usize,
    /// `[lists, dim]` centroids.
    centroids: Vec<f32>,
    lists: Vec<List>,
    items: usize,
}

#[derive(Default, Clone)]
struct List {
    items: Vec<Item>,
    /// `[items, dim]` row-major.
    vectors: Vec<f32>,
}

/// Rows of one matrix product in the assignment pass: bounds its memory (rows x lists floats).
const ASSIGN_CHUNK: usize = 8192;
/// k-means passes over the training sample.
const KMEANS_ITERATIONS: usize = 8;
/// Training sample per list.
const SAMPLE_PER_LIST: usize = 40;

impl IvfIndex {
    /// Indexes `vectors` (`[n, hidden]` row-major) with their `bias`, item `i` being row `i`,
    /// with about `list_size` items a list. Deterministic for a given `seed`.
    pub fn build(vectors: &[f32], bias: &[f32], hidden: usize, list_size: usize, seed: u64) -> Self {
        let n = bias.len();
        let dim = (hidden + 1).div_ceil(8) * 8;
        let n_lists = (n / list_size.max(1)).max(1);
        let augmented = |i: usize, out: &mut Vec<f32>| {
            out.extend_from_slice(&vectors[i * hidden..(i + 1) * hidden]);
            out.push(bias[i]);
            out.resize(out.len() + dim - hidden - 1, 0.0);
        };
        let mut rng = SmallRng::seed_from_u64(seed);
        // Training sample, and the first centroids drawn from it.
        let sample_n = (n_lists * SAMPLE_PER_LIST).min(n);
        let sample_rows: Vec<usize> = if n == 0 { Vec::new() } else { sample(&mut rng, n, sample_n).into_vec() };
        let mut train = Vec::with_capacity(sample_n * dim);
        for &i in &sample_rows {
            augmented(i, &mut train);
        }
        let mut centroids = vec![0f32; n_lists * dim];
        for (c, &row) in sample(&mut rng, sample_n.max(1), n_lists.min(sample_n.max(1))).into_vec().iter().enumerate() {
            if sample_n > 0 {
                centroids[c * dim..(c + 1) * dim].copy_from_slice(&train[row * dim..(row + 1) * dim]);
            }
        }
        for _ in 0..KMEANS_ITERATIONS {
            let nearest = nearest_centroids(&train, &centroids, dim);
            let mut sums = vec![0f32; n_lists * dim];
            let mut counts = vec![0usize; n_lists];
            for (row, &c) in nearest.iter().enumerate() {
                counts[c] += 1;
                for (s, &x) in sums[c * dim..(c + 1) * dim].iter_mut().zip(&train[row * dim..(row + 1) * dim]) {
                    *s += x;
                }
            }
            for c in 0..n_lists {
                let centroid = &mut centroids[c * dim..(c + 1) * dim];
                if counts[c] > 0 {
                    centroid.iter_mut().zip(&sums[c * dim..(c + 1) * dim]).for_each(|(m, s)| *m = s / counts[c] as f32);
                } else if sample_n > 0 {
                    // An empty list takes a random sample point: no centroid is wasted.
                    let row = rand::Rng::random_range(&mut rng, 0..sample_n);
                    centroid.copy_from_slice(&train[row * dim..(row + 1) * dim]);
                }
            }
        }
        let mut index = IvfIndex { dim, hidden, centroids, lists: vec![List::default(); n_lists], items: 0 };
        // Assign every item, a chunk of rows per matrix product.
        let mut chunk = Vec::with_capacity(ASSIGN_CHUNK * dim);
        for start in (0..n).step_by(ASSIGN_CHUNK) {
            let end = (start + ASSIGN_CHUNK).min(n);
            chunk.clear();
            for i in start..end {
                augmented(i, &mut chunk);
            }
            let nearest = nearest_centroids(&chunk, &index.centroids, dim);
            for (offset, &c) in nearest.iter().enumerate() {
                let list = &mut index.lists[c];
                list.items.push((start + offset) as Item);
                list.vectors.extend_from_slice(&chunk[offset * dim..(offset + 1) * dim]);
            }
        }
        index.items = n;
        index
    }

    /// Items indexed.
    pub fn len(&self) -> usize {
        self.items
    }

    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    pub fn lists(&self) -> usize {
        self.lists.len()
    }

    /// Adds one item to the list of its nearest centroid (no rebuild; the centroids stay).
    pub fn add(&mut self, item: Item, vector: &[f32], bias: f32) {
        let mut row = Vec::with_capacity(self.dim);
        row.extend_from_slice(&vector[..self.hidden]);
        row.push(bias);
        row.resize(self.dim, 0.0);
        let c = nearest_one(&row, &self.centroids, self.dim);
        let list = &mut self.lists[c];
        list.items.push(item);
        list.vectors.extend_from_slice(&row);
        self.items += 1;
    }

    /// The `k` items with the highest `query . v + bias` among those `accept` lets through,
    /// best first, into `out` (cleared first). Scans the `probe` best lists, then more lists,
    /// best first, until `k` items passed or every list was scanned.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        probe: usize,
        mut accept: impl FnMut(Item) -> bool,
        out: &mut Vec<(Item, f32)>,
    ) {
        out.clear();
        if k == 0 || self.lists.is_empty() {
            return;
        }
        let mut q = Vec::with_capacity(self.dim);
        q.extend_from_slice(&query[..self.hidden]);
        q.push(1.0);
        q.resize(self.dim, 0.0);
        let mut order: Vec<(f32, u32)> =
            self.centroids.chunks_exact(self.dim).enumerate().map(|(c, v)| (dot(&q, v), c as u32)).collect();
        let better = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let probe = probe.clamp(1, order.len());
        if probe < order.len() {
            order.select_nth_unstable_by(probe - 1, better);
        }
        order[..probe].sort_unstable_by(better);
        for scanned in 0..order.len() {
            if scanned >= probe && out.len() >= k {
                break;
            }
            if scanned == probe {
                // Too few items passed the filter: widen, best lists first.
                order[probe..].sort_unstable_by(better);
            }
            let list = &self.lists[order[scanned].1 as usize];
            for (&item, v) in list.items.iter().zip(list.vectors.chunks_exact(self.dim)) {
                let score = dot(&q, v);
                if (out.len() == k && score <= out[k - 1].1) || !accept(item) {
                    continue;
                }
                let at = out.partition_point(|&(_, s)| s >= score);
                out.insert(at, (item, score));
                out.truncate(k);
            }
        }
    }
}

/// The nearest centroid (Euclidean) of each `[dim]` row of `rows`: the argmax of
/// `x . c - |c|^2 / 2`, from one matrix product.
fn nearest_centroids(rows: &[f32], centroids: &[f32], dim: usize) -> Vec<usize> {
    let m = rows.len() / dim;
    let lists = centroids.len() / dim;
    if m == 0 || lists == 0 {
        return vec![0; m];
    }
    let half_norms: Vec<f32> = centroids.chunks_exact(dim).map(|c| dot(c, c) / 2.0).collect();
    let product = Tensor::from_slice(rows, (m, dim), &Device::Cpu)
        .and_then(|x| Tensor::from_slice(centroids, (lists, dim), &Device::Cpu).and_then(|c| x.matmul(&c.t()?)))
        .and_then(|p| p.flatten_all()?.to_vec1::<f32>());
    match product {
        Ok(scores) => scores
            .chunks_exact(lists)
            .map(|row| {
                let mut best = (f32::NEG_INFINITY, 0);
                for (c, (&s, &h)) in row.iter().zip(&half_norms).enumerate() {
                    if s - h > best.0 {
                        best = (s - h, c);
                    }
                }
                best.1
            })
            .collect(),
        // A CPU matrix product of well-formed shapes does not fail; if it ever did, the slow
        // path gives the same answer.
        Err(_) => rows.chunks_exact(dim).map(|r| nearest_one(r, centroids, dim)).collect(),
    }
}

fn nearest_one(row: &[f32], centroids: &[f32], dim: usize) -> usize {
    let mut best = (f32::INFINITY, 0);
    for (c, v) in centroids.chunks_exact(dim).enumerate() {
        let d: f32 = row.iter().zip(v).map(|(a, b)| (a - b) * (a - b)).sum();
        if d < best.0 {
            best = (d, c);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn random_vectors(n: usize, h: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = SmallRng::seed_from_u64(seed);
        // Clustered like learned item vectors: 20 directions plus noise.
        let centres: Vec<f32> = (0..20 * h).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut vectors = Vec::with_capacity(n * h);
        for _ in 0..n {
            let c = rng.random_range(0..20);
            vectors.extend((0..h).map(|d| centres[c * h + d] + rng.random_range(-0.3..0.3)));
        }
        let bias = (0..n).map(|_| rng.random_range(-0.5..0.5)).collect();
        (vectors, bias)
    }

    fn exact(vectors: &[f32], bias: &[f32], q: &[f32], h: usize, k: usize, accept: impl Fn(Item) -> bool) -> Vec<Item> {
        let mut all: Vec<(Item, f32)> = (0..bias.len())
            .filter(|&i| accept(i as Item))
            .map(|i| (i as Item, dot(&vectors[i * h..(i + 1) * h], q) + bias[i]))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        all.into_iter().take(k).map(|(i, _)| i).collect()
    }

    #[test]
    fn finds_the_exact_neighbours_when_every_list_is_probed_and_widens_for_a_narrow_filter() {
        let (h, n) = (12, 3000);
        let (vectors, bias) = random_vectors(n, h, 1);
        let index = IvfIndex::build(&vectors, &bias, h, 100, 7);
        assert_eq!((index.len(), index.lists()), (n, 30));
        let q: Vec<f32> = (0..h).map(|d| (d as f32 * 0.7).sin()).collect();
        let mut out = Vec::new();
        index.search(&q, 10, index.lists(), |_| true, &mut out);
        let got: Vec<Item> = out.iter().map(|&(i, _)| i).collect();
        assert_eq!(got, exact(&vectors, &bias, &q, h, 10, |_| true));
        // One item in 300 passes: one probed list holds about a third of one, yet 10 come back.
        let narrow = |i: Item| i % 300 == 7;
        index.search(&q, 10, 1, narrow, &mut out);
        assert_eq!(out.len(), 10, "the search widened until k items passed");
        assert!(out.iter().all(|&(i, _)| narrow(i)));
        let got: Vec<Item> = out.iter().map(|&(i, _)| i).collect();
        assert_eq!(got, exact(&vectors, &bias, &q, h, 10, narrow), "every list was scanned: exact");
    }

    #[test]
    fn a_new_item_is_found_without_a_rebuild() {
        let (h, n) = (8, 1000);
        let (vectors, bias) = random_vectors(n, h, 2);
        let mut index = IvfIndex::build(&vectors, &bias, h, 50, 3);
        let q: Vec<f32> = vec![1.0; h];
        // A new item far along the query's direction: the best match of all.
        let new_vector = vec![5.0; h];
        index.add(n as Item, &new_vector, 0.0);
        assert_eq!(index.len(), n + 1);
        let mut out = Vec::new();
        index.search(&q, 5, 4, |_| true, &mut out);
        assert_eq!(out[0].0, n as Item);
        assert!((out[0].1 - 40.0).abs() < 1e-4);
    }
}
