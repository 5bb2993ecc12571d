//! Batched inference of the sequential model: users scored per second against the full
//! MovieLens-100K-sized catalogue (1,682 items), each with a history of 50 items, K = 10.
//!
//! The model has the default shape with seeded random weights (throughput does not depend on
//! what the weights learned) so the benchmark needs no download. Three paths, by batch size:
//! - `forward`: the network alone, `[B, 50]` histories to `[B, 1682]` scores;
//! - `encode`: the network's encoder alone, `[B, 50]` histories to `[B, 64]` query vectors;
//! - `score`: the serving path of the `Recommender` trait: the forward pass plus the
//!   popularity blend, seen-item exclusion and top-10 selection per user.
//!
//! A third, `online/score`, is the embedded default's model (`model.kind = "cooccurrence"`) on the
//! demo catalogue (2,000 items, warmed on 3,000 demo sessions) with a 20-item history per user,
//! by the same batch sizes: the model actor hands it batches exactly like the sequential one.
//!
//! The process keeps freed memory (`models::keep_freed_memory`), as a server running the model
//! should. Run: `cargo bench --bench inference` (criterion reports `elements/s`, i.e. users/s).
//!
//! For larger catalogues (issue 14), `LIVEREC_BENCH_ITEMS=100000` sets the item count of both
//! models, and `LIVEREC_BENCH_BATCHES=64` the batch sizes (comma-separated):
//! `LIVEREC_BENCH_ITEMS=100000 LIVEREC_BENCH_BATCHES=64 cargo bench --bench inference`.
//!
//! `LIVEREC_BENCH_LAYERS=2` gives the sequential model two attention blocks instead of one.
//!
//! `LIVEREC_BENCH_TWO_STAGE=1` adds the two-stage path of both models (`score-two-stage`,
//! `[model.retrieval]` defaults with `min_items = 0`; `LIVEREC_BENCH_PROBE` sets `ann_probe`,
//! `LIVEREC_BENCH_LIST_SIZE` `ann_list_size`) and
//! prints the retrieval index's build time, the resident memory, and recall@10 of the two-stage
//! lists against the exact ones over `LIVEREC_BENCH_RECALL_USERS` users (default 512).
//! `LIVEREC_BENCH_DATA=DIR` takes the sequential model's vocabulary (items, categories,
//! popularity) and the users' histories (their last 50 items) from a dataset instead, e.g. the
//! output of `synth-catalogue write` (with random weights). `LIVEREC_BENCH_MODEL=DIR` with it
//! takes a trained model instead (a version folder
//! `liverec train` wrote on that dataset): its weights and vocabulary, the dataset's histories.
//! `LIVEREC_BENCH_MODELS=sequential` skips the online model. The setup prints the
//! memory after each stage (jemalloc's `allocated`, the resident set and its peak).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use liverec::catalog::Catalog;
use liverec::config::RetrievalConfig;
use liverec::event::EventType;
use liverec::models::artifact::{Popularity, ServeConfig, Vocab};
use liverec::models::cooccurrence::CoocModel;
use liverec::models::sasrec::Config;
use liverec::models::sequential::{intern_vocab, Query, SequentialModel, Token};
use liverec::models::{HistoryItem, Recommender, ScoreRequest, Scored};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const GENRES: usize = 19;
const HISTORY: usize = 50;
const K: usize = 10;

/// Items in the catalogue: `LIVEREC_BENCH_ITEMS`, else `default`.
fn items(default: usize) -> usize {
    std::env::var("LIVEREC_BENCH_ITEMS").ok().and_then(|n| n.parse().ok()).unwrap_or(default)
}

/// Batch sizes: `LIVEREC_BENCH_BATCHES` (comma-separated), else 1, 16, 64, 256 and 1024.
fn batches() -> Vec<usize> {
    std::env::var("LIVEREC_BENCH_BATCHES")
        .ok()
        .map(|b| b.split(',').filter_map(|n| n.trim().parse().ok()).collect::<Vec<usize>>())
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| vec![1, 16, 64, 256, 1024])
}

/// Exact full scoring at any size.
fn exact() -> RetrievalConfig {
    RetrievalConfig { min_items: usize::MAX, ..RetrievalConfig::default() }
}

/// Whether to measure the two-stage paths too.
fn two_stage() -> bool {
    std::env::var("LIVEREC_BENCH_TWO_STAGE").is_ok_and(|v| v == "1")
}

/// Two-stage retrieval at any size, `ann_probe` from `LIVEREC_BENCH_PROBE`, `ann_list_size`
/// from `LIVEREC_BENCH_LIST_SIZE` and the scoring threads from `LIVEREC_BENCH_THREADS`
/// (default 0: one per core).
fn forced() -> RetrievalConfig {
    let mut config = RetrievalConfig { min_items: 0, ..RetrievalConfig::default() };
    if let Some(probe) = std::env::var("LIVEREC_BENCH_PROBE").ok().and_then(|p| p.parse().ok()) {
        config.ann_probe = probe;
    }
    if let Some(size) = std::env::var("LIVEREC_BENCH_LIST_SIZE").ok().and_then(|p| p.parse().ok()) {
        config.ann_list_size = size;
    }
    if let Some(threads) = std::env::var("LIVEREC_BENCH_THREADS").ok().and_then(|p| p.parse().ok()) {
        config.threads = threads;
    }
    config
}

/// The benchmark allocates through jemalloc, as the `liverec` binary does, so that its memory
/// figures are the server's and jemalloc's statistics can break them down.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A `kB` line of /proc/self/status, in MiB.
fn status_mib(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn resident_mib() -> f64 {
    status_mib("VmRSS:")
}

/// Prints the heap the program holds (jemalloc's `allocated`), the resident set and its peak
/// after a stage of the setup: the memory breakdown of docs/performance.md.
fn memory(stage: &str) {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let heap = liverec::telemetry::allocator::read().unwrap_or_default();
    eprintln!(
        "memory after {stage}: allocated {:.0} MiB, resident {:.0} MiB (peak {:.0} MiB)",
        mib(heap.allocated),
        resident_mib(),
        status_mib("VmHWM:")
    );
}

/// Mean share of each exact top-10 found in the two-stage top-10.
fn recall_at_10(exact: &[Vec<Scored>], approx: &[Vec<Scored>]) -> f64 {
    let mut sum = 0.0;
    for (e, a) in exact.iter().zip(approx) {
        let hits = e.iter().take(10).filter(|s| a.iter().take(10).any(|t| t.item == s.item)).count();
        sum += hits as f64 / e.len().clamp(1, 10) as f64;
    }
    sum / exact.len().max(1) as f64
}

fn recall_users() -> usize {
    std::env::var("LIVEREC_BENCH_RECALL_USERS").ok().and_then(|n| n.parse().ok()).unwrap_or(512)
}

fn model(items: usize) -> SequentialModel {
    let mut rng = SmallRng::seed_from_u64(1);
    let vocab = Vocab {
        items: (1..=items).map(|i| i.to_string()).collect(),
        item_genres: (0..items).map(|_| vec![rng.random_range(0..GENRES as u16)]).collect(),
        item_years: (0..items).map(|_| Some(rng.random_range(1930..1999))).collect(),
        genres: (0..GENRES).map(|g| format!("genre{g}")).collect(),
        occupations: vec!["other".to_owned()],
        popularity: Popularity {
            global: (0..items).map(|_| rng.random_range(1.0..500.0)).collect(),
            by_segment: vec![vec![1.0; items]; liverec::event::Context::SEGMENTS],
        },
    };
    // `LIVEREC_BENCH_LAYERS`: attention blocks (default 1, the default config's).
    let layers = std::env::var("LIVEREC_BENCH_LAYERS").ok().and_then(|n| n.parse().ok()).unwrap_or(1);
    let config = Config { layers, ..Config::default() };
    SequentialModel::new(config, ServeConfig::default(), vocab, 7).expect("default config is valid")
}

/// A random-weight model with the vocabulary of the dataset in `dir` (or the trained model in
/// `LIVEREC_BENCH_MODEL`), and the last 50 items
/// (model items, 0-based) of its first `users` users with at least 5 interactions.
fn from_dataset(dir: &std::path::Path, users: usize) -> (SequentialModel, Vec<Vec<u32>>) {
    use liverec::models::data::{Dataset, Split};
    let (dataset, _) = Dataset::load(dir).expect("LIVEREC_BENCH_DATA holds a dataset");
    let split = Split::leave_one_out(&dataset.sequences);
    let model = match std::env::var("LIVEREC_BENCH_MODEL") {
        Ok(trained) => {
            SequentialModel::load(std::path::Path::new(&trained)).expect("LIVEREC_BENCH_MODEL holds a model").0
        }
        Err(_) => {
            let vocab = Vocab::from_dataset(&dataset, &split.train);
            SequentialModel::new(Config::default(), ServeConfig::default(), vocab, 7).expect("default config is valid")
        }
    };
    memory("loading the dataset (its split and vocabulary) and the model");
    let histories = dataset
        .sequences
        .iter()
        .filter(|s| s.len() >= 5)
        .take(users)
        .map(|s| {
            s[s.len().saturating_sub(HISTORY)..]
                .iter()
                .map(|i| model.model_item(&dataset.items[i.item as usize].id).expect("in the vocabulary") - 1)
                .collect()
        })
        .collect();
    (model, histories)
}

fn histories(n: usize, items: usize, rng: &mut SmallRng) -> Vec<Vec<u32>> {
    (0..n).map(|_| (0..HISTORY).map(|_| rng.random_range(0..items as u32)).collect()).collect()
}

fn bench_inference(c: &mut Criterion) {
    liverec::models::keep_freed_memory();
    let items = items(1682);
    let wanted_users = batches().iter().copied().max().unwrap_or(1).max(if two_stage() { recall_users() } else { 0 });
    let (mut model, users) = match std::env::var("LIVEREC_BENCH_DATA") {
        Ok(dir) => from_dataset(std::path::Path::new(&dir), wanted_users),
        Err(_) => {
            let mut rng = SmallRng::seed_from_u64(2);
            (model(items), histories(wanted_users, items, &mut rng))
        }
    };
    let items = model.vocab.items.len();
    memory("the model and the users' histories");
    // The `score` benchmarks are the exact path whatever the size (the default settings would
    // switch to two-stage from 20,000 items on).
    model.configure_retrieval(&exact());
    let catalog = Catalog::new();
    let catalog_idx = intern_vocab(&model.vocab, &catalog);
    memory("the catalogue");
    let batches = batches();
    let request_of = |h: &Vec<u32>| {
        let history: Vec<HistoryItem> = h
            .iter()
            .enumerate()
            .map(|(t, &i)| HistoryItem {
                item: catalog_idx[i as usize],
                event_type: EventType::Rating,
                value: Some(4.0),
                timestamp: 1_700_000_000_000 + t as i64 * 60_000,
            })
            .collect();
        ScoreRequest {
            exclude: history.iter().map(|h| h.item).collect(),
            history: Arc::from(history),
            segment: 18,
            negatives: Vec::new(),
            categories: None,
            k: K,
        }
    };

    let mut group = c.benchmark_group("inference");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(4));
    for &batch in &batches {
        group.throughput(Throughput::Elements(batch as u64));

        let queries: Vec<Query> = users[..batch]
            .iter()
            .map(|h| Query {
                history: h.iter().map(|&i| Token { item: i + 1, hour: 2, feedback: 4 }).collect(),
                segment: 18,
                user: [0, 0, 0],
            })
            .collect();
        group.bench_with_input(BenchmarkId::new("encode", batch), &queries, |b, q| {
            b.iter(|| black_box(model.query_vectors(q).expect("encode")))
        });
        group.bench_with_input(BenchmarkId::new("forward", batch), &queries, |b, q| {
            b.iter(|| black_box(model.forward(q).expect("forward")))
        });

        let requests: Vec<ScoreRequest> = users[..batch].iter().map(request_of).collect();
        group.bench_with_input(BenchmarkId::new("score", batch), &requests, |b, r| {
            b.iter(|| {
                let lists = model.score(r, &catalog);
                assert_eq!(lists.len(), r.len());
                black_box(lists)
            })
        });
    }
    if two_stage() {
        let recall_requests: Vec<ScoreRequest> = users[..recall_users()].iter().map(request_of).collect();
        let exact: Vec<Vec<Scored>> = recall_requests.chunks(64).flat_map(|r| model.score(r, &catalog)).collect();
        // The same with the popularity blend off (w = 1): the top 10 by the model's logits
        // alone, which is what the ANN index must find (with random weights the blend's
        // popularity term decides most of the lists above).
        let blend = model.serve.blend_history;
        model.serve.blend_history = f32::MIN_POSITIVE;
        let exact_logits: Vec<Vec<Scored>> =
            recall_requests.chunks(64).flat_map(|r| model.score(r, &catalog)).collect();
        model.serve.blend_history = blend;
        memory("exact scoring");
        model.configure_retrieval(&forced());
        memory("dropping the exact path's tables");
        let started = std::time::Instant::now();
        model.prepare(&catalog).expect("index built");
        memory("the index build");
        eprintln!(
            "sequential two-stage: {items} items, index built in {:.1} s, resident {:.0} MiB",
            started.elapsed().as_secs_f64(),
            resident_mib()
        );
        let approx: Vec<Vec<Scored>> = recall_requests.chunks(64).flat_map(|r| model.score(r, &catalog)).collect();
        eprintln!(
            "sequential two-stage: recall@10 against exact {:.4} over {} users (probe {})",
            recall_at_10(&exact, &approx),
            exact.len(),
            forced().ann_probe
        );
        model.serve.blend_history = f32::MIN_POSITIVE;
        let approx_logits: Vec<Vec<Scored>> =
            recall_requests.chunks(64).flat_map(|r| model.score(r, &catalog)).collect();
        model.serve.blend_history = blend;
        eprintln!(
            "sequential two-stage: recall@10 of the logits' top 10 (blend off) {:.4}",
            recall_at_10(&exact_logits, &approx_logits)
        );
        memory("two-stage scoring");
        for (part, bytes) in model.memory_breakdown() {
            eprintln!("  model: {part}: {:.1} MiB", bytes as f64 / (1u64 << 20) as f64);
        }
        for &batch in &batches {
            group.throughput(Throughput::Elements(batch as u64));
            let requests: Vec<ScoreRequest> = users[..batch].iter().map(request_of).collect();
            group.bench_with_input(BenchmarkId::new("score-two-stage", batch), &requests, |b, r| {
                b.iter(|| {
                    let lists = model.score(r, &catalog);
                    assert_eq!(lists.len(), r.len());
                    black_box(lists)
                })
            });
        }
    }
    group.finish();
}

/// The online co-occurrence model, by batch size.
fn bench_online(c: &mut Criterion) {
    if std::env::var("LIVEREC_BENCH_MODELS").is_ok_and(|m| m == "sequential") {
        return;
    }
    let demo_items = items(2000);
    let config = liverec::config::Config::default();
    let catalog = Catalog::new();
    liverec::demo::load_catalog(&catalog, demo_items, config.demo.seed);
    let mut model = CoocModel::new(config.model.cooccurrence.clone());
    model.configure_retrieval(&exact());
    model.observe(&liverec::demo::warmup_observations(&catalog, demo_items, 3000, config.demo.seed));
    let mut rng = SmallRng::seed_from_u64(3);
    let batches = batches();
    let largest = batches.iter().copied().max().unwrap_or(1);
    let requests: Vec<ScoreRequest> = (0..largest)
        .map(|_| {
            let history: Vec<HistoryItem> = (0..20)
                .map(|t| HistoryItem {
                    item: catalog.intern(&liverec::demo::item_id(rng.random_range(0..demo_items))),
                    event_type: EventType::View,
                    value: None,
                    timestamp: 1_700_000_000_000 + t * 60_000,
                })
                .collect();
            ScoreRequest {
                exclude: history.iter().map(|h| h.item).collect(),
                history: Arc::from(history),
                segment: rng.random_range(0..liverec::event::Context::SEGMENTS),
                negatives: Vec::new(),
                categories: None,
                k: K,
            }
        })
        .collect();
    let mut group = c.benchmark_group("online");
    group.sample_size(20);
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(3));
    for &batch in &batches {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("score", batch), &requests[..batch], |b, r| {
            b.iter(|| {
                let lists = model.score(r, &catalog);
                assert_eq!(lists.len(), r.len());
                black_box(lists)
            })
        });
    }
    if two_stage() {
        let exact = model.score(&requests, &catalog);
        model.configure_retrieval(&forced());
        let approx = model.score(&requests, &catalog);
        eprintln!(
            "online two-stage: recall@10 against exact {:.4} over {} users",
            recall_at_10(&exact, &approx),
            exact.len()
        );
        for &batch in &batches {
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(BenchmarkId::new("score-two-stage", batch), &requests[..batch], |b, r| {
                b.iter(|| {
                    let lists = model.score(r, &catalog);
                    assert_eq!(lists.len(), r.len());
                    black_box(lists)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_inference, bench_online);
/// `criterion_main!` with the server's first step: candle's thread count fixed as the
/// `liverec` binary fixes it (`liverec::models::pin_compute_threads`).
fn main() {
    liverec::models::pin_compute_threads();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
