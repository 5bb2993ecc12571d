//! `synth-catalogue`: a synthetic large catalogue for liverec (issue 14), and its loading into a
//! running server for load tests. See `liverec_load::synth` for the shape of the data and
//! docs/performance.md ("A million items: baseline") for the runs that use it.
//!
//! ```sh
//! # RecBole files that `liverec train --data DIR` reads (deterministic per seed, streamed):
//! cargo run --release -p liverec-load --bin synth-catalogue -- write \
//!     --items 1000000 --users 100000 --interactions 5000000 --seed 1 --out data/synth-1m
//! # PUT every item into a running server (then, optionally, post the first N interactions as
//! # events so the online model starts with the data's co-occurrences):
//! target/release/synth-catalogue put --dir data/synth-1m --target http://127.0.0.1:8080 --events 200000
//! ```
//!
//! `put` targets loopback addresses only, and ends when the file does.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use awc::http::StatusCode;
use clap::{Parser, Subcommand};
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use liverec_load::limits::check_loopback;
use liverec_load::synth::{generate, Spec};
use serde_json::json;

#[derive(Parser)]
#[command(name = "synth-catalogue", about = "A synthetic large catalogue for liverec (loopback only)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Writes synth.item, synth.user and synth.inter (RecBole atomic files) into --out.
    Write {
        #[arg(long)]
        items: u32,
        #[arg(long)]
        users: u64,
        /// In all; at least 5 per user.
        #[arg(long)]
        interactions: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// 0: about sqrt(items) / 2, between 8 and 500.
        #[arg(long, default_value_t = 0)]
        categories: u32,
        /// Zipf exponent of item popularity within a category.
        #[arg(long, default_value_t = 1.0)]
        zipf: f64,
        /// Item ids are <prefix><n>, n zero-padded to 7 digits.
        #[arg(long, default_value = "synth-")]
        item_prefix: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// PUTs every item of --dir/synth.item into a server; optionally posts interactions as events.
    Put {
        #[arg(long)]
        dir: PathBuf,
        /// The server (loopback only).
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        target: String,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Then post the first N interactions of synth.inter as view events (batches of 100).
        #[arg(long, default_value_t = 0)]
        events: u64,
        /// Bearer credential, when the server has auth on (a producer key).
        #[arg(long, env = "LIVEREC_API_KEY")]
        api_key: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Write { items, users, interactions, seed, categories, zipf, item_prefix, out } => {
            let started = Instant::now();
            let spec = Spec { items, users, interactions, seed, categories, zipf, item_prefix };
            let s = generate(&spec, &out)?;
            println!(
                "wrote {} items in {} categories, {} users, {} interactions ({} items seen; top 1% of items: {:.1}% of interactions) into {} in {:.1} s",
                s.items,
                s.categories,
                s.users,
                s.interactions,
                s.items_seen,
                100.0 * s.top1_share,
                out.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Put { dir, target, concurrency, events, api_key } => {
            check_loopback(&target)?;
            let target = target.trim_end_matches('/').to_owned();
            actix_rt::System::new().block_on(put(&dir, &target, concurrency.max(1), events, api_key))
        }
    }
}

/// Tries of one request refused with 429 or 503 before `put` gives up (a few minutes).
const PUT_ATTEMPTS: u32 = 120;

/// One request: an item's PUT or a batch of events.
enum Request {
    Item { id: String, body: String },
    Events { body: String },
}

async fn put(dir: &Path, target: &str, concurrency: usize, events: u64, api_key: Option<String>) -> anyhow::Result<()> {
    let http = awc::Client::builder()
        .connector(awc::Connector::new().limit(concurrency))
        .timeout(Duration::from_secs(60))
        .finish();
    // A 429 or 503 (the server's rate limit, or a full session or profile cap while sessions are
    // evicted) is waited out and sent again: after `Retry-After` (at most 5 s), up to
    // `PUT_ATTEMPTS` times, so that a long `put` survives the server catching up.
    let send = |request: Request| {
        let http = http.clone();
        let api_key = api_key.clone();
        async move {
            let (url, body, is_put) = match request {
                Request::Item { id, body } => (format!("{target}/v1/items/{id}"), body, true),
                Request::Events { body } => (format!("{target}/v1/events"), body, false),
            };
            let mut attempt = 0;
            loop {
                attempt += 1;
                let mut builder = if is_put { http.put(&url) } else { http.post(&url) };
                builder = builder.insert_header(("content-type", "application/json"));
                if let Some(key) = &api_key {
                    builder = builder.insert_header(("authorization", format!("Bearer {key}")));
                }
                let mut response =
                    builder.send_body(body.clone()).await.map_err(|e| anyhow::anyhow!("request failed: {e}"))?;
                let text = response.body().await.unwrap_or_default();
                let status = response.status();
                if status.is_success() {
                    return anyhow::Ok(());
                }
                let busy = status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE;
                if !busy || attempt == PUT_ATTEMPTS {
                    bail!("{status} (after {attempt} tries): {}", String::from_utf8_lossy(&text));
                }
                let wait = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1)
                    .clamp(1, 5);
                actix_rt::time::sleep(Duration::from_secs(wait)).await;
            }
        }
    };

    let started = Instant::now();
    let items = lines(&dir.join("synth.item"))?.map(|line| {
        let fields: Vec<&str> = line.split('\t').collect();
        let id = fields.first().copied().unwrap_or_default().to_owned();
        let title = fields.get(1).copied().unwrap_or_default();
        let year = fields.get(2).copied().unwrap_or_default();
        let categories: Vec<&str> = fields.get(3).map(|c| c.split(' ').collect()).unwrap_or_default();
        let body = json!({ "title": title, "categories": categories, "tags": [format!("year-{year}")] }).to_string();
        Request::Item { id, body }
    });
    let put_items = drain(items, concurrency, &send).await?;
    println!("put {put_items} items in {:.1} s", started.elapsed().as_secs_f64());

    if events > 0 {
        let started = Instant::now();
        let mut rows = lines(&dir.join("synth.inter"))?.take(events as usize).peekable();
        let batches = std::iter::from_fn(move || {
            rows.peek()?;
            let batch: Vec<serde_json::Value> = rows
                .by_ref()
                .take(100)
                .map(|line| {
                    let mut fields = line.split('\t');
                    let (user, item) = (fields.next().unwrap_or_default(), fields.next().unwrap_or_default());
                    json!({ "user_id": user, "item_id": item, "event_type": "view" })
                })
                .collect();
            Some(Request::Events { body: serde_json::Value::Array(batch).to_string() })
        });
        let posted = drain(batches, concurrency.min(16), &send).await?;
        println!("posted {posted} batches of events in {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// The data lines of an atomic file (its header skipped), read as they are needed.
fn lines(path: &Path) -> anyhow::Result<impl Iterator<Item = String>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(BufReader::new(file).lines().skip(1).map_while(Result::ok).filter(|l| !l.trim().is_empty()))
}

/// Sends every request, `concurrency` at a time; the first failure ends the run.
async fn drain<F, Fut>(requests: impl Iterator<Item = Request>, concurrency: usize, send: &F) -> anyhow::Result<u64>
where
    F: Fn(Request) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut requests = requests.fuse();
    let mut in_flight = FuturesUnordered::new();
    let mut done = 0u64;
    loop {
        while in_flight.len() < concurrency {
            match requests.next() {
                Some(request) => in_flight.push(send(request)),
                None => break,
            }
        }
        match in_flight.next().await {
            Some(result) => {
                result?;
                done += 1;
            }
            None => return Ok(done),
        }
    }
}
