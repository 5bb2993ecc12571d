//! The ANN index of two-stage retrieval: an inverted file over item vectors with a bias, for
//! maximum inner product search. Depends on nothing of the server (candle for one matrix product,
//! rand for sampling), so `load-tests/ann-bench` compiles these very files next to the HNSW crates
//! it was measured against.
//!
//! k-means (on a sample, a few passes) splits the items into lists of about `list_size`; a query
//! scores the centroids and scans the best lists' items in contiguous memory. Bias terms are
//! folded in as one more dimension (`[v, b]` against `[q, 1]`), so the index ranks by the
//! model's logit `q . v + b`. New items join the list of their nearest centroid, without a
//! rebuild; a filter is a test per scanned item, with further lists scanned when too few pass.
//!
//! The lists keep a 4-bit copy of the vectors: each item's residual from its list's centroid
//! (`v - c`, the bias as a float), in 4 bits with a scale per item. Residuals are short beside
//! the vectors (the items of a list are near its centroid), so 4 bits rank about as well as 8
//! bits of the whole vector did (recall@10 0.9930 against 0.9928 at 10^6 items), in an eighth
//! of the floats' memory; candidates are re-scored exactly by the caller anyway. A query scores
//! an item as `q . c` (once per list, in floats) plus its product with the residual. The query
//! is put in 8 bits for the scan, so that a block of 16 items is scored with the CPU's byte
//! multiply-adds (32 products an instruction with AVX2, against 8 for floats): the codes are
//! stored in blocks of 16 items, four dimensions of an item side by side and two such groups in
//! the two halves of each byte, so that one load feeds one query, or several queries that probe
//! the same list ([`IvfIndex::search_batch`]). At 10^6 items the scan is bound by memory, not
//! arithmetic: halving its bytes took one request at probe 24 from 135-145 to 104-112 us. The
//! AVX2 kernel is picked at run time; a portable one computes the same integers everywhere else.
//! The lists, their codes and the kernels are in [`list`].

use candle_core::{Device, Tensor};
use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::SeedableRng;

mod list;

use list::{code_width, scan, List, Quantised};
pub use list::{dot, Item};

/// Asks the CPU to bring `values` into its cache, without waiting for them: a loop over rows
/// scattered in a large table (candidates' vectors at 10^6 items) prefetches them all first,
/// so that their cache misses overlap instead of following one another.
#[inline]
pub fn prefetch<T>(values: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(values);
        let start = values.as_ptr().cast::<i8>();
        for line in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults and reads nothing the program sees; the address
            // is inside `values`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// An inverted-file index over item vectors with a bias, for maximum inner product search (see
/// the module docs).
pub struct IvfIndex {
    /// Centroid dimensions: the vector, the bias, zero padding to a multiple of 8.
    dim: usize,
    /// The vectors' own dimensions.
    hidden: usize,
    /// `[lists, dim]` centroids.
    centroids: Vec<f32>,
    lists: Vec<List>,
    items: usize,
}

/// Rows of one matrix product in the assignment pass: bounds its memory (rows x lists floats).
const ASSIGN_CHUNK: usize = 8192;
/// k-means passes over the training sample.
const KMEANS_ITERATIONS: usize = 8;
/// Training sample per list.
const SAMPLE_PER_LIST: usize = 40;

/// Keeps the best `k` of the `(item, score)` pairs offered in `kept`, a buffer of up to `2k`
/// pairs: a pair enters if it beats `floor` and `accept` lets it through; a full buffer is cut
/// back to its best `k` ([`cut`]), which raises `floor` to the worst of them. A pair that cannot
/// enter costs one comparison, one that can a push (a heap cost `log k` moves each, a fifth of
/// the scan's time at 10^6 items with `k` = 200), the cut a linear selection every `k` pushes.
#[inline]
fn offer(
    kept: &mut Vec<(Item, f32)>,
    floor: &mut f32,
    k: usize,
    item: Item,
    score: f32,
    accept: impl FnOnce(Item) -> bool,
) {
    if score <= *floor || score == f32::NEG_INFINITY || !accept(item) {
        return;
    }
    kept.push((item, score));
    if kept.len() >= 2 * k {
        cut(kept, floor, k);
    }
}

/// Best first, ties by item.
fn best_first(a: &(Item, f32), b: &(Item, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Cuts `kept` to its best `k` pairs; once it holds `k`, `floor` is the worst of them.
fn cut(kept: &mut Vec<(Item, f32)>, floor: &mut f32, k: usize) {
    if k == 0 {
        kept.clear();
        return;
    }
    if kept.len() > k {
        kept.select_nth_unstable_by(k - 1, best_first);
        kept.truncate(k);
    }
    if kept.len() == k {
        // `select_nth` put the k-th best last (or the buffer held exactly k: take its worst).
        *floor = kept.iter().map(|p| p.1).fold(f32::INFINITY, f32::min);
    }
}

/// The best `k` pairs kept, best first (ties by item).
fn finish(kept: &mut Vec<(Item, f32)>, k: usize) {
    let mut floor = f32::NEG_INFINITY;
    cut(kept, &mut floor, k);
    kept.sort_unstable_by(best_first);
}

impl IvfIndex {
    /// Indexes `vectors` (`[n, hidden]` row-major) with their `bias`, item `i` being row `i`,
    /// with about `list_size` items a list. Deterministic for a given `seed`.
    pub fn build(vectors: &[f32], bias: &[f32], hidden: usize, list_size: usize, seed: u64) -> Self {
        Self::build_with(bias.len(), hidden, |i| &vectors[i * hidden..(i + 1) * hidden], |i| bias[i], list_size, seed)
    }

    /// [`IvfIndex::build`] over `n` items whose vectors and biases are read through `vector`
    /// and `bias` (so the caller keeps the only full-precision copy).
    pub fn build_with<'a>(
        n: usize,
        hidden: usize,
        vector: impl Fn(usize) -> &'a [f32],
        bias: impl Fn(usize) -> f32,
        list_size: usize,
        seed: u64,
    ) -> Self {
        let dim = (hidden + 1).div_ceil(8) * 8;
        let n_lists = (n / list_size.max(1)).max(1);
        let augmented = |i: usize, out: &mut Vec<f32>| {
            out.extend_from_slice(&vector(i)[..hidden]);
            out.push(bias(i));
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
        drop(train);
        // Assign every item (a chunk of rows per matrix product), count, then fill lists sized
        // exactly: no list grows by doubling.
        let mut assigned: Vec<u32> = Vec::with_capacity(n);
        let mut chunk = Vec::with_capacity(ASSIGN_CHUNK.min(n) * dim);
        for start in (0..n).step_by(ASSIGN_CHUNK) {
            chunk.clear();
            for i in start..(start + ASSIGN_CHUNK).min(n) {
                augmented(i, &mut chunk);
            }
            assigned.extend(nearest_centroids(&chunk, &centroids, dim).into_iter().map(|c| c as u32));
        }
        drop(chunk);
        let mut sizes = vec![0usize; n_lists];
        for &c in &assigned {
            sizes[c as usize] += 1;
        }
        let mut lists: Vec<List> = sizes
            .iter()
            .enumerate()
            .map(|(c, &s)| List::with_capacity(s, &centroids[c * dim..c * dim + hidden]))
            .collect();
        for (i, &c) in assigned.iter().enumerate() {
            lists[c as usize].push(i as Item, vector(i), bias(i));
        }
        IvfIndex { dim, hidden, centroids, lists, items: n }
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

    /// Bytes the index holds (centroids and lists).
    pub fn bytes(&self) -> usize {
        self.centroids.capacity() * 4 + self.lists.iter().map(List::bytes).sum::<usize>()
    }

    /// Adds one item to the list of its nearest centroid (no rebuild; the centroids stay).
    pub fn add(&mut self, item: Item, vector: &[f32], bias: f32) {
        let mut row = Vec::with_capacity(self.dim);
        row.extend_from_slice(&vector[..self.hidden]);
        row.push(bias);
        row.resize(self.dim, 0.0);
        let c = nearest_one(&row, &self.centroids, self.dim);
        self.lists[c].push(item, vector, bias);
        self.items += 1;
    }

    /// The query with the bias dimension (1) and padding, as the centroids are stored.
    fn augmented(&self, query: &[f32]) -> Vec<f32> {
        let mut q = Vec::with_capacity(self.dim);
        q.extend_from_slice(&query[..self.hidden]);
        q.push(1.0);
        q.resize(self.dim, 0.0);
        q
    }

    /// Lists by centroid score for `query` (augmented), the best `probe` first and sorted.
    fn list_order(&self, centroid_scores: impl Iterator<Item = f32>, probe: usize) -> Vec<(f32, u32)> {
        let mut order: Vec<(f32, u32)> = centroid_scores.enumerate().map(|(c, s)| (s, c as u32)).collect();
        let probe = probe.clamp(1, order.len());
        if probe < order.len() {
            order.select_nth_unstable_by(probe - 1, better);
        }
        order[..probe].sort_unstable_by(better);
        order
    }

    /// The `k` items with the highest `query . v + bias` among those `accept` lets through,
    /// best first, into `out` (cleared first). Scans the `probe` best lists, then more lists,
    /// best first, until `k` items passed or every list was scanned. Scores are those of the
    /// 4-bit copy (close to the exact ones, not equal).
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
        let q = self.augmented(query);
        let quantised = Quantised::new(query, self.hidden);
        let mut floor = f32::NEG_INFINITY;
        let mut order = self.list_order(self.centroids.chunks_exact(self.dim).map(|c| dot(&q, c)), probe);
        let probe = probe.clamp(1, order.len());
        for scanned in 0..order.len() {
            if scanned >= probe && out.len() >= k {
                break;
            }
            if scanned == probe {
                // Too few items passed the filter: widen, best lists first.
                order[probe..].sort_unstable_by(better);
            }
            let list = &self.lists[order[scanned].1 as usize];
            let mut floors = [floor];
            scan::<1>(list, code_width(self.hidden), [&quantised], &mut floors, &mut |_, item, score| {
                offer(out, &mut floor, k, item, score, &mut accept);
                floor
            });
        }
        finish(out, k);
    }

    /// Scans `list` for the `Q` queries whose rows are `now`, offering their items to each
    /// query's buffer in `kept`.
    fn scan_for<const Q: usize>(
        &self,
        list: &List,
        queries: &[Quantised],
        now: &[u32],
        kept: &mut Kept<'_>,
        accept: &mut impl FnMut(usize, Item) -> bool,
    ) {
        let Kept { outs, floors, k } = kept;
        let mut now_floors: [f32; Q] = std::array::from_fn(|j| floors[now[j] as usize]);
        let rows: [&Quantised; Q] = std::array::from_fn(|j| &queries[now[j] as usize]);
        scan::<Q>(list, code_width(self.hidden), rows, &mut now_floors, &mut |qi, item, score| {
            let i = now[qi] as usize;
            offer(&mut outs[i], &mut floors[i], *k, item, score, |item| accept(i, item));
            floors[i]
        });
    }

    /// [`IvfIndex::search`] for a batch of queries (`queries` is `[b, hidden]` row-major),
    /// `accept` called with the query's row: each list is scanned once for all the queries
    /// that probe it, four at a time. `outs` gets one list per query. A query with fewer than
    /// `k` items accepted in its `probe` lists widens on its own, as `search` does.
    pub fn search_batch(
        &self,
        queries: &[f32],
        k: usize,
        probe: usize,
        mut accept: impl FnMut(usize, Item) -> bool,
        outs: &mut Vec<Vec<(Item, f32)>>,
    ) {
        let b = queries.len() / self.hidden.max(1);
        outs.resize_with(b, Vec::new);
        outs.truncate(b);
        outs.iter_mut().for_each(Vec::clear);
        if k == 0 || b == 0 || self.lists.is_empty() {
            return;
        }
        let query = |i: usize| &queries[i * self.hidden..(i + 1) * self.hidden];
        let augmented: Vec<f32> = (0..b).flat_map(|i| self.augmented(query(i))).collect();
        let quantised: Vec<Quantised> = (0..b).map(|i| Quantised::new(query(i), self.hidden)).collect();
        let mut kept = Kept { outs: &mut outs[..], floors: vec![f32::NEG_INFINITY; b], k };
        let scores = centroid_scores(&augmented, &self.centroids, self.dim);
        let probe = probe.clamp(1, self.lists.len());
        // (list, query, the list's rank among the query's) triples, grouped by list.
        let mut pairs: Vec<(u32, u32, u32)> = Vec::with_capacity(b * probe);
        for (i, row) in scores.chunks_exact(self.lists.len()).enumerate() {
            let order = self.list_order(row.iter().copied(), probe);
            pairs.extend(order[..probe].iter().enumerate().map(|(rank, &(_, c))| (c, i as u32, rank as u32)));
        }
        pairs.sort_unstable();
        // Lists best for some query first: each query then meets its best lists early, its
        // floor rises soon, and the blocks below it cost no call (in list order, a query's
        // best list came anywhere, and its buffer took far more items).
        let mut groups: Vec<&[(u32, u32, u32)]> = pairs.chunk_by(|a, b| a.0 == b.0).collect();
        groups.sort_by_key(|group| (group.iter().map(|p| p.2).min(), group[0].0));
        for group in groups {
            let list = &self.lists[group[0].0 as usize];
            let qs: Vec<u32> = group.iter().map(|&(_, i, _)| i).collect();
            let mut rest = &qs[..];
            while !rest.is_empty() {
                let take = if rest.len() >= 4 {
                    4
                } else if rest.len() >= 2 {
                    2
                } else {
                    1
                };
                let (now, later) = rest.split_at(take);
                match take {
                    4 => self.scan_for::<4>(list, &quantised, now, &mut kept, &mut accept),
                    2 => self.scan_for::<2>(list, &quantised, now, &mut kept, &mut accept),
                    _ => self.scan_for::<1>(list, &quantised, now, &mut kept, &mut accept),
                }
                rest = later;
            }
        }
        for (i, out) in outs.iter_mut().enumerate() {
            if out.len() < k && probe < self.lists.len() {
                self.search(query(i), k, probe, |item| accept(i, item), out);
            } else {
                finish(out, k);
            }
        }
    }
}

/// A batch's kept pairs while its lists are scanned: one [`offer`] buffer and floor per query.
struct Kept<'a> {
    outs: &'a mut [Vec<(Item, f32)>],
    floors: Vec<f32>,
    k: usize,
}

/// Higher score first, then lower list.
fn better(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Queries up to which [`centroid_scores`] takes plain dot products: a matrix product first
/// copies the centroids into a tensor (some 240 KB at 10^6 items), which costs more than the
/// dots of a few queries.
const CENTROID_DOTS_MAX_ROWS: usize = 4;

/// `[rows, lists]` scores of `[rows, dim]` queries against `[lists, dim]` centroids, from one
/// matrix product (or, for a few queries, plain dot products).
fn centroid_scores(rows: &[f32], centroids: &[f32], dim: usize) -> Vec<f32> {
    let (m, lists) = (rows.len() / dim, centroids.len() / dim);
    if m <= CENTROID_DOTS_MAX_ROWS {
        return rows.chunks_exact(dim).flat_map(|r| centroids.chunks_exact(dim).map(|c| dot(r, c))).collect();
    }
    let product = Tensor::from_slice(rows, (m, dim), &Device::Cpu)
        .and_then(|x| Tensor::from_slice(centroids, (lists, dim), &Device::Cpu).and_then(|c| x.matmul(&c.t()?)))
        .and_then(|p| p.flatten_all()?.to_vec1::<f32>());
    match product {
        Ok(scores) => scores,
        // A CPU matrix product of well-formed shapes does not fail; if it ever did, the slow
        // path gives the same answer.
        Err(_) => rows.chunks_exact(dim).flat_map(|r| centroids.chunks_exact(dim).map(|c| dot(r, c))).collect(),
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

    /// Items of `got` among `want`.
    fn found(got: &[(Item, f32)], want: &[Item]) -> usize {
        want.iter().filter(|w| got.iter().any(|(i, _)| i == *w)).count()
    }

    #[test]
    fn finds_the_exact_neighbours_when_every_list_is_probed_and_widens_for_a_narrow_filter() {
        let (h, n) = (12, 3000);
        let (vectors, bias) = random_vectors(n, h, 1);
        let index = IvfIndex::build(&vectors, &bias, h, 100, 7);
        assert_eq!((index.len(), index.lists()), (n, 30));
        let q: Vec<f32> = (0..h).map(|d| (d as f32 * 0.7).sin()).collect();
        let mut out = Vec::new();
        // The 4-bit residuals and the 8-bit query rank close to the exact scores (within some
        // 2% on these random vectors, whose residuals are nearly as long as the vectors): the
        // exact top 10 is in their top 20, and their scores are close to the exact ones.
        index.search(&q, 20, index.lists(), |_| true, &mut out);
        assert_eq!(found(&out, &exact(&vectors, &bias, &q, h, 10, |_| true)), 10);
        for &(i, s) in &out {
            let e = dot(&vectors[i as usize * h..(i as usize + 1) * h], &q) + bias[i as usize];
            assert!((s - e).abs() <= 0.05 * e.abs().max(1.0), "{s} vs {e}");
        }
        // One item in 300 passes: one probed list holds about a third of one, yet 10 come back.
        let narrow = |i: Item| i % 300 == 7;
        index.search(&q, 10, 1, narrow, &mut out);
        assert_eq!(out.len(), 10, "the search widened until k items passed");
        assert!(out.iter().all(|&(i, _)| narrow(i)));
        assert_eq!(found(&out, &exact(&vectors, &bias, &q, h, 10, narrow)), 10, "every list was scanned");
    }

    #[test]
    fn a_batch_finds_what_each_query_finds_alone() {
        let (h, n) = (12, 5000);
        let (vectors, bias) = random_vectors(n, h, 4);
        let index = IvfIndex::build(&vectors, &bias, h, 100, 7);
        let mut rng = SmallRng::seed_from_u64(9);
        // Nine queries (a group of four, of two and one per shared list, in any mix; centroids
        // scored by a matrix product) and three (by dot products), the last with a filter too
        // narrow for its probed lists.
        for b in [9, 3] {
            let queries: Vec<f32> = (0..b * h).map(|_| rng.random_range(-1.0..1.0)).collect();
            let accept = |qi: usize, i: Item| qi != b - 1 || i % 250 == 3;
            let mut batch = Vec::new();
            index.search_batch(&queries, 15, 5, accept, &mut batch);
            assert_eq!(batch.len(), b);
            for (qi, got) in batch.iter().enumerate() {
                let mut alone = Vec::new();
                index.search(&queries[qi * h..(qi + 1) * h], 15, 5, |i| accept(qi, i), &mut alone);
                assert_eq!(got.len(), 15);
                let ids = |l: &[(Item, f32)]| l.iter().map(|&(i, _)| i).collect::<Vec<_>>();
                assert_eq!(ids(got), ids(&alone), "query {qi} of {b}");
                for (a, b) in got.iter().zip(&alone) {
                    assert!((a.1 - b.1).abs() <= 1e-4 * a.1.abs().max(1.0), "query {qi}: {a:?} vs {b:?}");
                }
            }
            assert!(batch[b - 1].iter().all(|&(i, _)| i % 250 == 3));
        }
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
        assert!((out[0].1 - 40.0).abs() < 0.2, "{}", out[0].1);
    }
}
