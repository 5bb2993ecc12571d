//! `liverec-load`: drives a running liverec server and measures what its users feel.
//!
//! Modes:
//! - `rest`: opens WebSocket subscribers, posts events at a target rate over REST (or produces
//!   them to Kafka with `--kafka-brokers`), and measures event-to-push latency from the moment an
//!   event is sent to the first pushed list that reflects it (lists carry `last_event_id`).
//! - `ingest`: produces events to Kafka as fast as the broker takes them and measures how fast the
//!   server applies them end to end (Kafka -> session -> Redis), from its `/metrics`.
//!
//! Every run is bounded by its duration or event count, and targets only loopback addresses.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "liverec-load", about = "Load generator for liverec (loopback only)")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
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
    /// Write report.json here.
    #[arg(long)]
    out: Option<PathBuf>,
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
    /// Give up waiting for the server after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = actix_rt::System::new().block_on(async move {
        match cli.mode {
            Mode::Rest(args) => rest(args).await,
            Mode::Ingest(args) => ingest(args).await,
        }
    })?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn check_loopback(url: &str) -> anyhow::Result<()> {
    let host = url.split("://").nth(1).unwrap_or(url).split(['/', ':']).next().unwrap_or("");
    if !(host == "localhost" || host.starts_with("127.") || host == "[") {
        bail!("refusing to load {host}: liverec-load only targets loopback addresses");
    }
    Ok(())
}

fn write_report(out: &Option<PathBuf>, report: &Value) -> anyhow::Result<()> {
    if let Some(dir) = out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(report)?)?;
    }
    Ok(())
}

fn client() -> awc::Client {
    awc::Client::builder().connector(awc::Connector::new().limit(0)).timeout(Duration::from_secs(30)).finish()
}

/// Quantiles in milliseconds from a microsecond histogram.
fn quantiles(h: &Histogram<u64>) -> Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({ "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0, "count": h.len() })
}

/// Reads one sample from the server's /metrics.
async fn metric(target: &str, sample: &str) -> anyhow::Result<f64> {
    let mut response = client().get(format!("{target}/metrics")).send().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let body = response.body().limit(64 << 20).await?;
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(sample).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .with_context(|| format!("no metric {sample}"))
}

#[derive(serde::Deserialize)]
struct Push<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow)]
    data: Option<PushData<'a>>,
}

#[derive(serde::Deserialize)]
struct PushData<'a> {
    #[serde(borrow)]
    user_id: &'a str,
    #[serde(borrow)]
    last_event_id: Option<&'a str>,
}

/// Send times of events not yet reflected in a push, per user, oldest first.
type Pending = Rc<RefCell<HashMap<String, VecDeque<(String, Instant)>>>>;

struct Stats {
    latency: Histogram<u64>,
    pushes: u64,
    foreign: u64,
}

async fn rest(args: RestArgs) -> anyhow::Result<Value> {
    check_loopback(&args.target)?;
    let users: Vec<String> = (0..args.users).map(|u| format!("load-user-{u}")).collect();
    let pending: Pending = Rc::new(RefCell::new(HashMap::new()));
    let stats = Rc::new(RefCell::new(Stats { latency: Histogram::new(3)?, pushes: 0, foreign: 0 }));
    let dropped_before = metric(&args.target, "liverec_push_dropped_stale_total").await.unwrap_or(0.0);

    // Subscribers first, each socket on its own task.
    let ws_url = args.target.replacen("http", "ws", 1) + "/v1/ws";
    let mut subscribed = 0usize;
    for socket in 0..args.sockets {
        let (_, mut framed) = client()
            .ws(&ws_url)
            .max_frame_size(1 << 20)
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("websocket {socket}: {e}"))?;
        let mine: Vec<String> = (0..args.subs_per_socket)
            .map(|i| users[(socket * args.subs_per_socket + i) % users.len()].clone())
            .collect();
        for user in &mine {
            framed.send(awc::ws::Message::Text(json!({ "subscribe": user }).to_string().into())).await?;
            subscribed += 1;
        }
        let (pending, stats) = (pending.clone(), stats.clone());
        actix_rt::spawn(async move {
            while let Some(Ok(frame)) = framed.next().await {
                let awc::ws::Frame::Text(bytes) = frame else {
                    if let awc::ws::Frame::Ping(p) = frame {
                        let _ = framed.send(awc::ws::Message::Pong(p)).await;
                    }
                    continue;
                };
                // Only the fields needed, borrowed: the generator must stay cheaper than the server.
                let Ok(message) = serde_json::from_slice::<Push<'_>>(&bytes) else { continue };
                if message.kind != "recommendations" {
                    continue;
                }
                let Some(data) = message.data else { continue };
                let user = data.user_id.to_owned();
                let mut stats = stats.borrow_mut();
                stats.pushes += 1;
                if !mine.contains(&user) {
                    stats.foreign += 1;
                }
                let Some(last) = data.last_event_id else { continue };
                let now = Instant::now();
                let mut pending = pending.borrow_mut();
                let Some(queue) = pending.get_mut(&user) else { continue };
                // Every event up to `last` is reflected by this push (several sockets may watch
                // the same user; the first push to arrive counts).
                if let Some(pos) = queue.iter().position(|(id, _)| id == last) {
                    for (_, sent) in queue.drain(..=pos) {
                        let _ = stats.latency.record(now.duration_since(sent).as_micros() as u64);
                    }
                }
            }
        });
    }
    eprintln!("{} sockets, {subscribed} subscriptions open", args.sockets);

    let producer: Option<BaseProducer> = match &args.kafka_brokers {
        Some(brokers) => {
            check_loopback(brokers)?;
            Some(
                ClientConfig::new()
                    .set("bootstrap.servers", brokers)
                    .set("partitioner", "murmur2_random")
                    .set("linger.ms", "1")
                    .set("compression.type", "lz4")
                    .create()?,
            )
        }
        None => None,
    };

    // Open loop: every millisecond, send what the rate says is due. Event ids are unique per run,
    // so a second run against the same server is not taken for replays.
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
    // A bounded pool for requests: an overloaded server then shows up as request latency rather
    // than as thousands of new connections that make it worse.
    let http =
        awc::Client::builder().connector(awc::Connector::new().limit(256)).timeout(Duration::from_secs(30)).finish();
    let started = Instant::now();
    let end = started + Duration::from_secs(args.duration);
    let mut sent: u64 = 0;
    let errors = Rc::new(RefCell::new(0u64));
    let request_latency = Rc::new(RefCell::new(Histogram::<u64>::new(3)?));
    let outstanding = Rc::new(RefCell::new(0usize));
    let mut tick = actix_rt::time::interval(Duration::from_millis(1));
    while Instant::now() < end {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * args.rate as f64) as u64;
        while sent < due {
            let user = &users[(sent as usize * 7919) % users.len()];
            let id = format!("{user}-{run}-{sent}");
            let n = args.item_base + (sent * 31) % args.items.max(1);
            let item = format!("{}{:0width$}", args.item_prefix, n, width = args.item_pad);
            let event = json!({ "user_id": user, "item_id": item, "event_type": "view", "event_id": id });
            pending.borrow_mut().entry(user.clone()).or_default().push_back((id, Instant::now()));
            sent += 1;
            match &producer {
                Some(p) => {
                    let payload = event.to_string();
                    if p.send(BaseRecord::to(&args.kafka_topic).key(user.as_str()).payload(&payload)).is_err() {
                        *errors.borrow_mut() += 1;
                    }
                    p.poll(Duration::ZERO);
                }
                None => {
                    let request = http
                        .post(format!("{}/v1/events", args.target))
                        .insert_header(("content-type", "application/json"));
                    let body = event.to_string();
                    let (errors, latency, outstanding) = (errors.clone(), request_latency.clone(), outstanding.clone());
                    *outstanding.borrow_mut() += 1;
                    actix_rt::spawn(async move {
                        let t = Instant::now();
                        let ok = matches!(request.send_body(body).await, Ok(r) if r.status().as_u16() == 202);
                        if ok {
                            let _ = latency.borrow_mut().record(t.elapsed().as_micros() as u64);
                        } else {
                            *errors.borrow_mut() += 1;
                        }
                        *outstanding.borrow_mut() -= 1;
                    });
                }
            }
        }
    }
    let drain = Instant::now();
    while *outstanding.borrow() > 0 && drain.elapsed() < Duration::from_secs(30) {
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    if let Some(p) = &producer {
        let _ = p.flush(Duration::from_secs(10));
    }
    let send_secs = started.elapsed().as_secs_f64();
    // Let the last pushes arrive (bounded).
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(5) {
        if pending.borrow().values().all(VecDeque::is_empty) {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    let unreflected: usize = pending.borrow().values().map(VecDeque::len).sum();
    let dropped = metric(&args.target, "liverec_push_dropped_stale_total").await.unwrap_or(0.0) - dropped_before;
    let stats = stats.borrow();
    let report = json!({
        "mode": if args.kafka_brokers.is_some() { "kafka" } else { "rest" },
        "events_sent": sent,
        "events_per_s": sent as f64 / send_secs,
        "errors": *errors.borrow(),
        "sockets": args.sockets,
        "subscriptions": subscribed,
        "request_ms": quantiles(&request_latency.borrow()),
        "event_to_push_ms": quantiles(&stats.latency),
        "events_not_reflected_after_5s": unreflected,
        "pushes_received": stats.pushes,
        "pushes_for_other_users": stats.foreign,
        "pushes_dropped": dropped,
    });
    write_report(&args.out, &report)?;
    Ok(report)
}

async fn ingest(args: IngestArgs) -> anyhow::Result<Value> {
    check_loopback(&args.target)?;
    check_loopback(&args.kafka_brokers)?;
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
    let deadline = started + Duration::from_secs(args.timeout);
    let mut first_progress: Option<(Instant, f64)> = None;
    let done = loop {
        let now_count = metric(&args.target, applied).await? + metric(&args.target, duplicates).await? - before;
        if first_progress.is_none() && now_count > 0.0 {
            first_progress = Some((Instant::now(), now_count));
        }
        if now_count >= produced as f64 {
            break Instant::now();
        }
        if Instant::now() > deadline {
            bail!("the server applied {now_count} of {produced} events before the timeout");
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
