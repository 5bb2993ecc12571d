//! Approximate nearest neighbours for a large catalogue (issue 14, item 1): two pure-Rust HNSW
//! crates against the exact scan the models do today, on unit-length 64-d vectors.
//!
//! For each index: build time (wall, all cores), resident memory it added, query time at
//! top-200 (one thread, mean and p99 over the queries), and recall@10 (the share of the exact
//! top 10 among the index's first 10). The exact scan is timed the same way.
//!
//! Settings (environment):
//! - `ANN_ITEMS` (100000): vectors in the index;
//! - `ANN_QUERIES` (500): query vectors (drawn like the items, not among them);
//! - `ANN_DATA` (`random`): `random` (Gaussian directions: no structure, the hardest case for a
//!   graph index) or `clustered` (1,000 centres with noise, closer to learned item embeddings);
//! - `ANN_ONLY` (all): `hnsw_rs`, `instant-distance` or `ivf` to build one index only;
//! - `ANN_LIST_SIZE` (1000): items per list of the inverted file.
//!
//! `ivf` is the server's own index (`src/models/ivf/`, compiled here from the same files):
//! k-means lists scanned by centroid score, measured at several numbers of lists probed.
//!
//! Run: `ANN_ITEMS=1000000 cargo run --release --manifest-path load-tests/ann-bench/Cargo.toml`
//! (a plain `main`, not criterion: one build
//! of a million-item index takes minutes, so it is timed once).

use std::hint::black_box;
use std::time::Instant;

use hnsw_rs::anndists::dist::DistL2;
use hnsw_rs::hnsw::Hnsw;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[path = "../../../src/models/ivf/mod.rs"]
#[allow(dead_code)]
mod ivf;

const DIM: usize = 64;
const TOP: usize = 200;
const RECALL_AT: usize = 10;

#[derive(Clone, Copy)]
struct Vector([f32; DIM]);

impl instant_distance::Point for Vector {
    fn distance(&self, other: &Self) -> f32 {
        self.0.iter().zip(&other.0).map(|(a, b)| (a - b) * (a - b)).sum()
    }
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn gaussian(rng: &mut SmallRng) -> f32 {
    // Box-Muller: enough for test vectors.
    let (u, v): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

fn normalised(mut v: [f32; DIM]) -> Vector {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::EPSILON);
    v.iter_mut().for_each(|x| *x /= norm);
    Vector(v)
}

fn vectors(n: usize, clustered: bool, rng: &mut SmallRng, centres: &[Vector]) -> Vec<Vector> {
    (0..n)
        .map(|_| {
            let mut v = [0f32; DIM];
            v.iter_mut().for_each(|x| *x = gaussian(rng));
            if clustered {
                let c = &centres[rng.random_range(0..centres.len())];
                v.iter_mut().zip(&c.0).for_each(|(x, c)| *x = c + 0.05 * *x);
            }
            normalised(v)
        })
        .collect()
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// The exact top `TOP` by inner product (= by L2 distance for unit vectors).
fn exact(items: &[Vector], query: &Vector, scores: &mut Vec<(f32, u32)>) -> Vec<u32> {
    scores.clear();
    scores.extend(items.iter().enumerate().map(|(i, v)| {
        let dot: f32 = v.0.iter().zip(&query.0).map(|(a, b)| a * b).sum();
        (dot, i as u32)
    }));
    let top = TOP.min(scores.len());
    scores.select_nth_unstable_by(top - 1, |a, b| b.0.total_cmp(&a.0));
    scores[..top].sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    scores[..top].iter().map(|s| s.1).collect()
}

/// Query times (µs) and recall@10 of `search` over the queries.
struct Measured {
    mean_us: f64,
    p99_us: f64,
    recall: f64,
}

fn measure(queries: &[Vector], truth: &[Vec<u32>], mut search: impl FnMut(&Vector) -> Vec<u32>) -> Measured {
    let mut times = Vec::with_capacity(queries.len());
    let mut hits = 0usize;
    for (query, truth) in queries.iter().zip(truth) {
        let started = Instant::now();
        let found = black_box(search(query));
        times.push(started.elapsed().as_secs_f64() * 1e6);
        let first: Vec<u32> = found.iter().take(RECALL_AT).copied().collect();
        hits += truth[..RECALL_AT].iter().filter(|t| first.contains(t)).count();
    }
    times.sort_by(f64::total_cmp);
    Measured {
        mean_us: times.iter().sum::<f64>() / times.len() as f64,
        p99_us: times[(times.len() * 99 / 100).min(times.len() - 1)],
        recall: hits as f64 / (queries.len() * RECALL_AT) as f64,
    }
}

fn row(name: &str, build_s: f64, memory: u64, m: &Measured) {
    println!(
        "| {name} | {build_s:.1} | {:.0} | {:.0} | {:.0} | {:.3} |",
        memory as f64 / (1 << 20) as f64,
        m.mean_us,
        m.p99_us,
        m.recall
    );
}

fn main() {
    // `cargo bench` passes `--bench`; this harness takes its settings from the environment.
    let n: usize = env("ANN_ITEMS", "100000").parse().expect("ANN_ITEMS is a count");
    let q: usize = env("ANN_QUERIES", "500").parse().expect("ANN_QUERIES is a count");
    let clustered = env("ANN_DATA", "random") == "clustered";
    let only = env("ANN_ONLY", "");
    let mut rng = SmallRng::seed_from_u64(14);
    let centres = vectors(1000, false, &mut rng, &[]);
    let items = vectors(n, clustered, &mut rng, &centres);
    let queries = vectors(q, clustered, &mut rng, &centres);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "ann: {n} items, {q} queries, {DIM}-d unit vectors ({}), top-{TOP}, recall@{RECALL_AT}, {threads} threads",
        if clustered { "clustered" } else { "random" }
    );
    println!("\n| index | build s | memory MiB | query mean µs | query p99 µs | recall@10 |");
    println!("|---|---|---|---|---|---|");

    let mut scores = Vec::with_capacity(n);
    let truth: Vec<Vec<u32>> = queries.iter().map(|query| exact(&items, query, &mut scores)).collect();
    let m = measure(&queries, &truth, |query| exact(&items, query, &mut scores));
    row("exact scan", 0.0, (n * DIM * 4) as u64, &m);

    if only.is_empty() || only == "hnsw_rs" {
        // M = 16 links a node (32 on the ground layer), ef_construction = 100: the usual settings.
        for (m_links, ef_construction) in [(16, 100)] {
            let before = rss();
            let started = Instant::now();
            let layers = 16.min((n as f32).ln().trunc() as usize);
            let index = Hnsw::<f32, DistL2>::new(m_links, n, layers, ef_construction, DistL2 {});
            let data: Vec<(&[f32], usize)> = items.iter().enumerate().map(|(i, v)| (&v.0[..], i)).collect();
            index.parallel_insert_slice(&data);
            drop(data);
            let build = started.elapsed().as_secs_f64();
            let memory = rss().saturating_sub(before);
            for ef in [TOP, 2 * TOP] {
                let m = measure(&queries, &truth, |query| {
                    index.search(&query.0, TOP, ef).iter().map(|nb| nb.d_id as u32).collect()
                });
                row(&format!("hnsw_rs M={m_links} efC={ef_construction} ef={ef}"), build, memory, &m);
            }
        }
    }

    if only.is_empty() || only == "ivf" {
        let list_size: usize = env("ANN_LIST_SIZE", "1000").parse().expect("ANN_LIST_SIZE is a count");
        let before = rss();
        let started = Instant::now();
        let flat: Vec<f32> = items.iter().flat_map(|v| v.0).collect();
        let index = ivf::IvfIndex::build(&flat, &vec![0.0; n], DIM, list_size, 1);
        drop(flat);
        let build = started.elapsed().as_secs_f64();
        let memory = rss().saturating_sub(before);
        let mut found = Vec::new();
        for probe in [4, 8, 16, 24, 32, 64] {
            let m = measure(&queries, &truth, |query| {
                index.search(&query.0, TOP, probe, |_| true, &mut found);
                found.iter().map(|&(i, _)| i).collect()
            });
            row(&format!("ivf lists={} probe={probe}", index.lists()), build, memory, &m);
        }
    }

    if only.is_empty() || only == "instant-distance" {
        // ef_search is fixed when the index is built; M = 32 is the crate's constant.
        let before = rss();
        let started = Instant::now();
        let values: Vec<u32> = (0..n as u32).collect();
        let index = instant_distance::Builder::default()
            .ef_construction(100)
            .ef_search(TOP)
            .seed(14)
            .build(items.clone(), values);
        let build = started.elapsed().as_secs_f64();
        // The index holds its own copy of the vectors (`items.clone()` above), counted here.
        let memory = rss().saturating_sub(before);
        let mut search = instant_distance::Search::default();
        let m = measure(&queries, &truth, |query| {
            index.search(query, &mut search).take(TOP).map(|item| *item.value).collect()
        });
        row(&format!("instant-distance M=32 efC=100 ef={TOP}"), build, memory, &m);
    }
}
