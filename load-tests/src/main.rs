//! `liverec-load`: drives a running liverec server and measures what its users feel.
//!
//! - `liverec-load --target URL --scenario FILE --out DIR`: runs a scenario
//!   (`load-tests/scenarios/*.toml`: subscribers over WebSocket and SSE, events over REST or
//!   Kafka, GETs, optional simulated users) and writes `report.json`, `report.md` and
//!   `latency.svg` into DIR.
//! - `rest`: the same run from flags instead of a file (events at a rate with WebSocket
//!   subscribers), kept for the commands in docs/performance.md.
//! - `ingest`: produces events to Kafka as fast as the broker takes them and measures how fast the
//!   server applies them end to end (Kafka -> session -> Redis), from its `/metrics`.
//!
//! Every run is bounded by its duration or event count, and targets only loopback addresses.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use liverec_load::scenario::{KafkaSettings, Scenario, Transport};
use liverec_load::{limits, run, RunOptions};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "liverec-load",
    about = "Load generator for liverec (loopback only)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    scenario: ScenarioArgs,
}

#[derive(Args)]
struct ScenarioArgs {
    /// The server, e.g. http://127.0.0.1:8080 (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
    /// A scenario file, e.g. load-tests/scenarios/smoke.toml.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Directory for report.json, report.md and latency.svg.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Overrides a scenario key, value in TOML: --set ws_sockets=18000 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// The server's process id, to report its resident memory (its CPU seconds per event come
    /// from /proc/PID/stat then, else from its /metrics).
    #[arg(long)]
    server_pid: Option<u32>,
}

#[derive(Subcommand)]
enum Mode {
    /// Events at a target rate with live subscribers; event-to-push latency as users see it.
    Rest(RestArgs),
    /// Maximum Kafka ingestion rate (Kafka -> session -> Redis), measured from /metrics.
    Ingest(IngestArgs),
}

#[derive(Parser, Clone)]
struct RestArgs {
    /// The server, e.g. http://127.0.0.1:8080 (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
    /// Events per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Distinct users the events are spread over.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// WebSocket connections; each subscribes to `--subs-per-socket` users, round robin.
    #[arg(long, default_value_t = 1000)]
    sockets: usize,
    #[arg(long, default_value_t = 1)]
    subs_per_socket: usize,
    /// SSE streams, one user each.
    #[arg(long, default_value_t = 0)]
    sse: usize,
    /// GET /v1/users/{id}/recommendations per second.
    #[arg(long, default_value_t = 0)]
    gets: u64,
    /// Produce to Kafka at these brokers instead of POSTing (the server must run in Kafka mode).
    #[arg(long)]
    kafka_brokers: Option<String>,
    #[arg(long, default_value = "liverec.events")]
    kafka_topic: String,
    /// Item ids are `<prefix><n>`, n in 0..items, zero-padded to `--item-pad` digits
    /// (MovieLens ids: `--item-prefix '' --item-pad 0 --items 1682 --item-base 1`).
    #[arg(long, default_value = "item-")]
    item_prefix: String,
    #[arg(long, default_value_t = 4)]
    item_pad: usize,
    #[arg(long, default_value_t = 500)]
    items: u64,
    #[arg(long, default_value_t = 0)]
    item_base: u64,
    /// Write report.json, report.md and latency.svg here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The server's process id: its memory in the report (and its CPU time from /proc/PID/stat
    /// rather than from its /metrics).
    #[arg(long)]
    server_pid: Option<u32>,
}

impl RestArgs {
    fn scenario(&self) -> anyhow::Result<Scenario> {
        let mut text = format!(
            "name = \"rest\"\nduration_secs = {}\nevents_per_s = {}\nusers = {}\nws_sockets = {}\n\
             ws_subs_per_socket = {}\nsse_subscribers = {}\ngets_per_s = {}\n",
            self.duration, self.rate, self.users, self.sockets, self.subs_per_socket, self.sse, self.gets
        );
        if self.kafka_brokers.is_some() {
            text.push_str("transport = \"kafka\"\n");
        }
        let mut scenario = Scenario::parse(&text, &[])?;
        scenario.kafka =
            self.kafka_brokers.clone().map(|brokers| KafkaSettings { brokers, topic: self.kafka_topic.clone() });
        scenario.item_prefix = self.item_prefix.clone();
        scenario.item_pad = self.item_pad;
        scenario.items = self.items.max(1);
        scenario.item_base = self.item_base;
        debug_assert!(scenario.transport == Transport::Kafka || scenario.kafka.is_none());
        Ok(scenario)
    }
}

#[derive(Parser, Clone)]
struct IngestArgs {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
    #[arg(long, default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    #[arg(long, default_value = "liverec.events")]
    kafka_topic: String,
    /// Events to produce.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    #[arg(long, default_value_t = 100_000)]
    users: usize,
    /// Give up waiting for the server after this many seconds without a single event applied.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    actix_rt::System::new().block_on(async move {
        match cli.mode {
            Some(Mode::Rest(args)) => {
                let scenario = args.scenario()?;
                let options = RunOptions {
                    target: args.target.clone(),
                    out: args.out.clone(),
                    server_pid: args.server_pid,
                    progress: true,
                };
                let report = run(&scenario, &options).await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            Some(Mode::Ingest(args)) => {
                let report = ingest(args).await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            None => {
                let args = cli.scenario;
                let Some(path) = &args.scenario else {
                    bail!("give --scenario FILE and --out DIR (or a subcommand: rest, ingest; see --help)");
                };
                let Some(out) = &args.out else { bail!("give --out DIR for the report") };
                let scenario = Scenario::load(path, &args.overrides)?;
                let options = RunOptions {
                    target: args.target.clone(),
                    out: Some(out.clone()),
                    server_pid: args.server_pid,
                    progress: true,
                };
                let r = run(&scenario, &options).await?;
                println!(
                    "{}: {:.0} events/s, {:.0} requests/s, request p50/p99/p99.9 {:.2}/{:.2}/{:.2} ms, \
                     event-to-push p50/p99/p99.9 {:.2}/{:.2}/{:.2} ms, pushes {} received, {} dropped, {} late (> {} ms), {} errors",
                    scenario.name,
                    r.events_per_s,
                    r.requests_per_s,
                    r.request_ms.p50,
                    r.request_ms.p99,
                    r.request_ms.p999,
                    r.event_to_push_ms.p50,
                    r.event_to_push_ms.p99,
                    r.event_to_push_ms.p999,
                    r.pushes_received,
                    r.pushes_dropped,
                    r.pushes_late,
                    r.late_threshold_ms,
                    r.errors
                );
                let w = &r.server.work;
                let or_na = |v: Option<f64>, scale: f64, digits: usize| {
                    v.map_or("n/a".to_owned(), |v| format!("{:.digits$}", v * scale))
                };
                println!(
                    "server: {} events/s applied during the load, caught up {} s after it, backlog max {} events, Kafka lag max {} / end {}, \
                     CPU {} us per event ({} cores)",
                    or_na(w.applied_events_per_s, 1.0, 0),
                    or_na(w.caught_up_secs, 1.0, 2),
                    or_na(w.backlog_max_events, 1.0, 0),
                    or_na(w.kafka_lag_max_records, 1.0, 0),
                    or_na(w.kafka_lag_end_of_load_records, 1.0, 0),
                    or_na(w.cpu_secs_per_event, 1e6, 1),
                    or_na(w.cpu_cores, 1.0, 2)
                );
                println!("report: {}", out.join("report.md").display());
            }
        }
        Ok(())
    })
}

fn write_report(out: &Option<PathBuf>, report: &Value) -> anyhow::Result<()> {
    if let Some(dir) = out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(report)?)?;
    }
    Ok(())
}

/// Reads one sample from the server's /metrics.
async fn metric(target: &str, sample: &str) -> anyhow::Result<f64> {
    liverec_load::run::scrape(target, sample).await.with_context(|| format!("no metric {sample} at {target}"))
}

async fn ingest(args: IngestArgs) -> anyhow::Result<Value> {
    limits::check_loopback(&args.target)?;
    limits::check_loopback(&args.kafka_brokers)?;
    let applied = "liverec_session_applied_events_total";
    let duplicates = "liverec_session_duplicate_events_total";
    let before = metric(&args.target, applied).await? + metric(&args.target, duplicates).await?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.kafka_brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .create()?;
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
    let started = Instant::now();
    let mut produced = 0u64;
    while produced < args.events {
        let user = format!("ingest-user-{}", (produced * 7919) % args.users as u64);
        let payload = format!(
            r#"{{"user_id":"{user}","item_id":"item-{:04}","event_type":"view","event_id":"ing-{run}-{produced}"}}"#,
            (produced * 31) % 500
        );
        match producer.send(BaseRecord::to(&args.kafka_topic).key(&user).payload(&payload)) {
            Ok(()) => produced += 1,
            Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), _)) => {
                producer.poll(Duration::from_millis(1));
            }
            Err((e, _)) => bail!("produce failed: {e}"),
        }
        if produced.is_multiple_of(1000) {
            producer.poll(Duration::ZERO);
        }
    }
    producer.flush(Duration::from_secs(60))?;
    let produce_secs = started.elapsed().as_secs_f64();
    eprintln!("produced {produced} events in {produce_secs:.1} s");
    // Watch the server apply them.
    // A stall detector, not a rate: the bound restarts whenever the count moves.
    let stall = Duration::from_secs(args.timeout);
    let mut first_progress: Option<(Instant, f64)> = None;
    let (mut last_count, mut moved) = (-1.0, Instant::now());
    let done = loop {
        let now_count = metric(&args.target, applied).await? + metric(&args.target, duplicates).await? - before;
        if first_progress.is_none() && now_count > 0.0 {
            first_progress = Some((Instant::now(), now_count));
        }
        if now_count >= produced as f64 {
            break Instant::now();
        }
        if now_count != last_count {
            (last_count, moved) = (now_count, Instant::now());
        }
        if moved.elapsed() > stall {
            bail!("the server applied {now_count} of {produced} events, then nothing for {} s", args.timeout);
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    };
    let total_secs = done.duration_since(started).as_secs_f64();
    let report = json!({
        "mode": "ingest",
        "events": produced,
        "produce_events_per_s": produced as f64 / produce_secs,
        "end_to_end_events_per_s": produced as f64 / total_secs,
        "seconds": total_secs,
    });
    write_report(&args.out, &report)?;
    Ok(report)
}
