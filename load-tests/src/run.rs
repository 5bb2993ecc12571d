//! One scenario run against a live server: subscribers first, then events and GETs at the
//! scenario's rates for its duration, then a bounded wait for the last pushes, then the report.
//!
//! The generator runs on one thread (an actix system): every subscriber socket, stream and
//! request is a task on it, sharing [`State`] through `Rc<RefCell<_>>` without locks. It parses
//! only the fields of a push it needs, borrowed, so that it stays cheaper than the server.
//!
//! How a push is matched to events: event ids are `lt<run>-<user>-<n>`, `n` counting the events
//! sent to that user. A pushed list carries `last_event_id`, the newest event of the user it
//! reflects, so a push with `n` reflects every event of that user up to `n`. Each subscriber
//! remembers, per user it watches, how far its pushes have reflected; the event-to-push latency
//! of event `k` at that subscriber is the time from sending `k` to the first push that reflects
//! it there. Bursts are coalesced by the server (one list may reflect many events), so one push
//! can record many latencies.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use serde_json::json;

use crate::limits::{self, LimitError, NofileLimit};
use crate::report::{self, ErrorCounts, Quantiles, Report, ServerSide, SimSummary, SubscriberSummary, TimelineSecond};
use crate::scenario::{Scenario, Transport};

/// A send time that marks an event the server refused (it can never be reflected).
const FAILED: u64 = u64::MAX;
/// Sockets per loopback source address: the ephemeral port range (about 28,000 ports by
/// default) bounds connections from one address to one server port.
const SOCKETS_PER_SOURCE: usize = 25_000;
/// Descriptors the generator needs besides its subscribers (HTTP pool aside): stdio, the
/// runtime, Kafka, /metrics scrapes.
const SPARE_FDS: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("the server at {target} does not answer /healthz: {reason}")]
    Unreachable { target: String, reason: String },
    #[error("kafka producer: {0}")]
    Kafka(String),
    #[error("cannot write the report: {0}")]
    Report(#[from] std::io::Error),
    #[error("clock before 1970")]
    Clock,
}

/// Where and how to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Base URL of the server, e.g. `http://127.0.0.1:8080` (loopback only).
    pub target: String,
    /// Directory for `report.json`, `report.md` and `latency.svg`; nothing is written without it.
    pub out: Option<PathBuf>,
    /// The server's process id, to report its resident memory before and under load.
    pub server_pid: Option<u32>,
    /// Progress lines on stderr.
    pub progress: bool,
}

/// One subscription of one subscriber: which user, and how far its pushes have reflected.
struct Watch {
    user: usize,
    /// Events `0..acked` of the user have been reflected at this subscriber.
    acked: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SubKind {
    Ws,
    Sse,
    Idle,
}

struct Subscriber {
    kind: SubKind,
    watches: Vec<Watch>,
    /// The stream ended before the run did.
    closed: bool,
}

/// Everything the tasks of a run share.
struct State {
    start: Instant,
    run_prefix: String,
    /// The last whole second of the load (events and requests of its final tick count in it).
    last_second: usize,
    /// Per active user, the send time of each of their events (µs since `start`, or `FAILED`).
    sent: Vec<Vec<u64>>,
    /// Per active user, how far the first push to any subscriber has reflected.
    first_acked: Vec<u32>,
    subscribers: Vec<Subscriber>,
    e2p: Histogram<u64>,
    e2p_first: Histogram<u64>,
    e2p_by_second: Vec<Histogram<u64>>,
    late_us: u64,
    late: u64,
    pushes: [u64; 3],
    pushes_unexpected: u64,
    pushes_by_second: Vec<u64>,
    confirmed: usize,
    requests: Histogram<u64>,
    posts: Histogram<u64>,
    gets: Histogram<u64>,
    requests_by_second: Vec<Histogram<u64>>,
    outstanding: usize,
    errors: ErrorCounts,
}

fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant figures is a valid precision")
}

fn second_histogram() -> Histogram<u64> {
    Histogram::new(2).expect("2 significant figures is a valid precision")
}

fn slot<T: Default>(series: &mut Vec<T>, second: usize) -> &mut T {
    if series.len() <= second {
        series.resize_with(second + 1, T::default);
    }
    &mut series[second]
}

fn hist_slot(series: &mut Vec<Histogram<u64>>, second: usize) -> &mut Histogram<u64> {
    if series.len() <= second {
        series.resize_with(second + 1, second_histogram);
    }
    &mut series[second]
}

impl State {
    fn micros(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// The second of the load a time falls in; the last tick may run a hair past the end.
    fn second(&self, at_us: u64) -> usize {
        ((at_us / 1_000_000) as usize).min(self.last_second)
    }

    /// A pushed list reached subscriber `sub`.
    fn on_push(&mut self, sub: usize, user_id: &str, last_event_id: Option<&str>) {
        let now = self.micros();
        let kind = self.subscribers[sub].kind;
        self.pushes[kind as usize] += 1;
        *slot(&mut self.pushes_by_second, (now / 1_000_000) as usize) += 1;
        if kind == SubKind::Idle {
            return;
        }
        let Some((user, n)) = last_event_id.and_then(|id| parse_event_id(&self.run_prefix, id)) else {
            // The first list after subscribing reflects no event of this run.
            return;
        };
        let Some(w) = self.subscribers[sub].watches.iter().position(|w| w.user == user) else {
            self.pushes_unexpected += 1;
            return;
        };
        if user_id.strip_prefix("load-user-").and_then(|u| u.parse::<usize>().ok()) != Some(user) {
            self.pushes_unexpected += 1;
            return;
        }
        let Some(sent) = self.sent.get(user) else { return };
        let upto = (n + 1).min(sent.len() as u32);
        let from = self.subscribers[sub].watches[w].acked;
        for &at in sent.get(from as usize..upto as usize).unwrap_or_default() {
            if at == FAILED {
                continue;
            }
            let latency = now.saturating_sub(at);
            let _ = self.e2p.record(latency);
            let second = self.second(at);
            let _ = hist_slot(&mut self.e2p_by_second, second).record(latency);
            if latency > self.late_us {
                self.late += 1;
            }
        }
        let first_from = self.first_acked[user];
        for &at in sent.get(first_from as usize..upto as usize).unwrap_or_default() {
            if at != FAILED {
                let _ = self.e2p_first.record(now.saturating_sub(at));
            }
        }
        self.first_acked[user] = self.first_acked[user].max(upto);
        let watch = &mut self.subscribers[sub].watches[w];
        watch.acked = watch.acked.max(upto);
    }

    /// Deliveries (event x subscriber of its user) not reflected yet, for accepted events.
    fn unreflected(&self) -> u64 {
        self.subscribers
            .iter()
            .flat_map(|s| &s.watches)
            .map(|w| self.sent[w.user][w.acked as usize..].iter().filter(|&&at| at != FAILED).count() as u64)
            .sum()
    }

    /// Accepted events whose user had subscribers, times those subscribers.
    fn expected_deliveries(&self) -> u64 {
        self.subscribers
            .iter()
            .flat_map(|s| &s.watches)
            .map(|w| self.sent[w.user].iter().filter(|&&at| at != FAILED).count() as u64)
            .sum()
    }

    fn record_request(&mut self, started_us: u64, latency_us: u64, post: bool) {
        let _ = self.requests.record(latency_us);
        let _ = if post { self.posts.record(latency_us) } else { self.gets.record(latency_us) };
        let second = self.second(started_us);
        let _ = hist_slot(&mut self.requests_by_second, second).record(latency_us);
    }
}

pub fn user_name(user: usize) -> String {
    format!("load-user-{user}")
}

/// `lt<run>-<user>-<n>` back to `(user, n)`, for ids of this run only.
fn parse_event_id(run_prefix: &str, id: &str) -> Option<(usize, u32)> {
    let rest = id.strip_prefix(run_prefix)?;
    let (user, n) = rest.split_once('-')?;
    Some((user.parse().ok()?, n.parse().ok()?))
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

type Shared = Rc<RefCell<State>>;

/// Reads one sample (`name` or `name{labels}`) from the server's `/metrics`.
pub async fn scrape(target: &str, sample: &str) -> Option<f64> {
    let client = awc::Client::builder().timeout(Duration::from_secs(10)).finish();
    let mut response = client.get(format!("{target}/metrics")).send().await.ok()?;
    let body = response.body().limit(64 << 20).await.ok()?;
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(sample).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

async fn scrape_sum(target: &str, samples: &[&str]) -> f64 {
    let mut total = 0.0;
    for sample in samples {
        total += scrape(target, sample).await.unwrap_or(0.0);
    }
    total
}

/// Resident memory of a process, in KiB (Linux `/proc`).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Clients for subscriber sockets: one per loopback source address when there are more sockets
/// than one address has ephemeral ports for (IPv4 loopback targets only).
fn subscriber_clients(target: &str, sockets: usize) -> Vec<awc::Client> {
    let v4_loopback = target
        .split_once("://")
        .map_or(target, |(_, r)| r)
        .split([':', '/'])
        .next()
        .and_then(|h| h.parse::<Ipv4Addr>().ok())
        .is_some_and(|ip| ip.is_loopback());
    let sources = if v4_loopback { sockets.div_ceil(SOCKETS_PER_SOURCE).clamp(1, 250) } else { 1 };
    (0..sources)
        .map(|i| {
            let mut builder = awc::Client::builder()
                .connector(awc::Connector::new().limit(0).timeout(Duration::from_secs(30)))
                .timeout(Duration::from_secs(30));
            if sources > 1 {
                builder = builder.local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + i as u8)));
            }
            builder.finish()
        })
        .collect()
}

/// Opens one WebSocket, subscribes it to `users`, and leaves a task reading its pushes.
async fn open_ws(
    client: awc::Client,
    url: String,
    users: Vec<String>,
    sub: usize,
    state: Shared,
) -> Result<actix_rt::task::JoinHandle<()>, ()> {
    let connected = client.ws(&url).max_frame_size(1 << 20).connect().await;
    let Ok((_, mut framed)) = connected else {
        state.borrow_mut().errors.ws_connect += 1;
        return Err(());
    };
    for user in &users {
        let message = json!({ "subscribe": user }).to_string();
        if framed.send(awc::ws::Message::Text(message.into())).await.is_err() {
            state.borrow_mut().errors.subscribe += 1;
            return Err(());
        }
    }
    Ok(actix_rt::spawn(async move {
        while let Some(frame) = framed.next().await {
            let bytes = match frame {
                Ok(awc::ws::Frame::Text(bytes)) => bytes,
                Ok(awc::ws::Frame::Ping(payload)) => {
                    let _ = framed.send(awc::ws::Message::Pong(payload)).await;
                    continue;
                }
                Ok(awc::ws::Frame::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            };
            let Ok(message) = serde_json::from_slice::<Push<'_>>(&bytes) else { continue };
            let mut state = state.borrow_mut();
            match (message.kind, message.data) {
                ("recommendations", Some(data)) => state.on_push(sub, data.user_id, data.last_event_id),
                ("subscribed", _) => state.confirmed += 1,
                ("error", _) => state.errors.subscribe += 1,
                _ => {}
            }
        }
        let mut state = state.borrow_mut();
        state.subscribers[sub].closed = true;
        state.errors.stream_closed += 1;
    }))
}

/// Opens one SSE stream and leaves a task reading its pushes.
async fn open_sse(
    client: awc::Client,
    target: String,
    user: String,
    sub: usize,
    state: Shared,
) -> Result<actix_rt::task::JoinHandle<()>, ()> {
    let url = format!("{target}/v1/users/{user}/recommendations/stream");
    let response = match client.get(url).send().await {
        Ok(response) if response.status().is_success() => response,
        _ => {
            state.borrow_mut().errors.sse_connect += 1;
            return Err(());
        }
    };
    state.borrow_mut().confirmed += 1;
    Ok(actix_rt::spawn(async move {
        let mut body = response;
        let mut buffer: Vec<u8> = Vec::new();
        while let Some(Ok(chunk)) = body.next().await {
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = buffer.drain(..end + 2).collect();
                let mut is_list = false;
                let mut data: &[u8] = &[];
                for line in frame.split(|&b| b == b'\n') {
                    if line == b"event: recommendations" {
                        is_list = true;
                    } else if let Some(d) = line.strip_prefix(b"data: ") {
                        data = d;
                    }
                }
                if !is_list {
                    continue;
                }
                if let Ok(list) = serde_json::from_slice::<PushData<'_>>(data) {
                    state.borrow_mut().on_push(sub, list.user_id, list.last_event_id);
                }
            }
        }
        let mut state = state.borrow_mut();
        state.subscribers[sub].closed = true;
        state.errors.stream_closed += 1;
    }))
}

/// Runs `scenario` against `options.target` and returns (and writes) its report.
pub async fn run(scenario: &Scenario, options: &RunOptions) -> Result<Report, RunError> {
    let target = options.target.trim_end_matches('/').to_owned();
    limits::check_loopback(&target)?;
    if let Some(kafka) = &scenario.kafka {
        if scenario.transport == Transport::Kafka {
            limits::check_loopback(&kafka.brokers)?;
        }
    }
    // The simulator's client keeps up to 64 connections of its own.
    let sim_connections = if scenario.sim.is_some() { 64 } else { 0 };
    let needed = scenario.connections() as u64 + scenario.http_connections as u64 + sim_connections + SPARE_FDS;
    let nofile: NofileLimit = limits::ensure_nofile(needed)?;
    let say = |line: String| {
        if options.progress {
            eprintln!("{line}");
        }
    };
    let probe = awc::Client::builder().timeout(Duration::from_secs(5)).finish();
    match probe.get(format!("{target}/healthz")).send().await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => return Err(RunError::Unreachable { target, reason: format!("status {}", r.status()) }),
        Err(e) => return Err(RunError::Unreachable { target, reason: e.to_string() }),
    }
    let loadavg_start = loadavg();
    let started_at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|_| RunError::Clock)?.as_millis();
    let stale_before = scrape(&target, "liverec_push_dropped_stale_total").await.unwrap_or(0.0);
    let trainer_samples = [
        "liverec_trainer_runs_total{outcome=\"passed\"}",
        "liverec_trainer_runs_total{outcome=\"rejected\"}",
        "liverec_trainer_runs_total{outcome=\"failed\"}",
    ];
    let trainer_before = scrape_sum(&target, &trainer_samples).await;
    let refused_before = scrape(&target, "liverec_model_refused_total").await.unwrap_or(0.0);
    let rss_before = options.server_pid.and_then(rss_kib);

    let state: Shared = Rc::new(RefCell::new(State {
        start: Instant::now(),
        run_prefix: format!("lt{started_at_ms}-"),
        last_second: (scenario.duration_secs.ceil() as usize).saturating_sub(1),
        sent: vec![Vec::new(); scenario.users],
        first_acked: vec![0; scenario.users],
        subscribers: Vec::new(),
        e2p: histogram(),
        e2p_first: histogram(),
        e2p_by_second: Vec::new(),
        late_us: (scenario.late_ms * 1000.0) as u64,
        late: 0,
        pushes: [0; 3],
        pushes_unexpected: 0,
        pushes_by_second: Vec::new(),
        confirmed: 0,
        requests: histogram(),
        posts: histogram(),
        gets: histogram(),
        requests_by_second: Vec::new(),
        outstanding: 0,
        errors: ErrorCounts::default(),
    }));

    // Subscribers: active WebSocket users, SSE streams, idle sockets.
    let ws_total = scenario.ws_sockets + scenario.idle_ws_sockets;
    let clients = subscriber_clients(&target, ws_total.max(scenario.sse_subscribers));
    let ws_url = target.replacen("http", "ws", 1) + "/v1/ws";
    let mut plans: Vec<(SubKind, Vec<usize>, String)> = Vec::new();
    for socket in 0..scenario.ws_sockets {
        let users: Vec<usize> = (0..scenario.ws_subs_per_socket)
            .map(|i| (socket * scenario.ws_subs_per_socket + i) % scenario.users)
            .collect();
        plans.push((SubKind::Ws, users, String::new()));
    }
    for i in 0..scenario.sse_subscribers {
        // Spread SSE streams over the users from the other end, so they meet WebSocket users.
        plans.push((SubKind::Sse, vec![(scenario.users - 1) - i % scenario.users], String::new()));
    }
    for i in 0..scenario.idle_ws_sockets {
        plans.push((SubKind::Idle, Vec::new(), format!("idle-user-{i}")));
    }
    let expected_confirmations: usize =
        plans.iter().map(|(kind, users, _)| if *kind == SubKind::Idle { 1 } else { users.len() }).sum();
    {
        let mut s = state.borrow_mut();
        for (kind, users, _) in &plans {
            s.subscribers.push(Subscriber {
                kind: *kind,
                watches: users.iter().map(|&user| Watch { user, acked: 0 }).collect(),
                closed: false,
            });
        }
    }
    say(format!(
        "{}: opening {} WebSocket ({} subscriptions), {} SSE and {} idle WebSocket subscribers",
        scenario.name,
        scenario.ws_sockets,
        scenario.ws_sockets * scenario.ws_subs_per_socket,
        scenario.sse_subscribers,
        scenario.idle_ws_sockets
    ));
    let connect_started = Instant::now();
    let opening = futures_util::stream::iter(plans.into_iter().enumerate().map(|(sub, (kind, users, idle))| {
        let client = clients[sub % clients.len()].clone();
        let state = state.clone();
        let (ws_url, target) = (ws_url.clone(), target.clone());
        async move {
            match kind {
                SubKind::Ws => open_ws(client, ws_url, users.into_iter().map(user_name).collect(), sub, state).await,
                SubKind::Idle => open_ws(client, ws_url, vec![idle], sub, state).await,
                SubKind::Sse => open_sse(client, target, user_name(users[0]), sub, state).await,
            }
        }
    }))
    .buffer_unordered(scenario.connect_concurrency);
    let tasks: Vec<actix_rt::task::JoinHandle<()>> = opening.filter_map(|r| std::future::ready(r.ok())).collect().await;
    // Wait (bounded) until the server confirmed every subscription.
    let ready_deadline = Instant::now() + Duration::from_secs(30 + expected_confirmations as u64 / 500);
    while state.borrow().confirmed < expected_confirmations && Instant::now() < ready_deadline {
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    say(format!(
        "{} of {} subscriptions confirmed in {connect_secs:.1} s",
        state.borrow().confirmed,
        expected_confirmations
    ));

    let producer: Option<BaseProducer> = match (&scenario.transport, &scenario.kafka) {
        (Transport::Kafka, Some(kafka)) => Some(
            ClientConfig::new()
                .set("bootstrap.servers", &kafka.brokers)
                .set("partitioner", "murmur2_random")
                .set("linger.ms", "1")
                .set("compression.type", "lz4")
                .create()
                .map_err(|e| RunError::Kafka(e.to_string()))?,
        ),
        _ => None,
    };
    let http = awc::Client::builder()
        .connector(awc::Connector::new().limit(scenario.http_connections))
        .timeout(Duration::from_secs(30))
        .finish();

    let sim = scenario.sim.as_ref().map(|sim| {
        let control = std::sync::Arc::new(liverec::sim::SimControl::default());
        let config = liverec::sim::SimConfig {
            target: target.clone(),
            users: sim.users,
            items: sim.items,
            categories: sim.categories,
            rate: sim.steps_per_s,
            duration: Duration::from_secs_f64(scenario.duration_secs),
            workers: sim.workers,
            seed: sim.seed,
            ..liverec::sim::SimConfig::default()
        };
        (control.clone(), actix_rt::spawn(liverec::sim::run_with(config, control)))
    });

    // The load: open loop, every millisecond send what the rates say is due.
    let load_start = Instant::now();
    {
        let mut s = state.borrow_mut();
        // Times are kept relative to the start of the load; subscriber setup is not in them.
        s.start = load_start;
        s.pushes_by_second.clear();
    }
    let duration = Duration::from_secs_f64(scenario.duration_secs);
    let run_prefix = state.borrow().run_prefix.clone();
    let (mut events_sent, mut gets_sent) = (0u64, 0u64);
    let mut sent_by_second: Vec<u64> = Vec::new();
    // Server memory, once a second (for soak runs).
    let mut rss_by_second: Vec<Option<u64>> = Vec::new();
    let mut tick = actix_rt::time::interval(Duration::from_millis(1));
    let mut next_progress = 5u64;
    let mut user_cursor = 0usize;
    let mut get_cursor = 0usize;
    while load_start.elapsed() < duration {
        tick.tick().await;
        let t = load_start.elapsed().as_secs_f64();
        if let Some(pid) = options.server_pid {
            let second = t as usize;
            if rss_by_second.len() <= second {
                rss_by_second.resize(second + 1, None);
                rss_by_second[second] = rss_kib(pid);
            }
        }
        let due = scenario.events_due(t);
        while events_sent < due {
            // A stride coprime with typical user counts spreads consecutive events over users.
            user_cursor = (user_cursor + 7919) % scenario.users;
            let user = user_cursor;
            let item_n = scenario.item_base + (events_sent * 31) % scenario.items;
            let item = format!("{}{:0width$}", scenario.item_prefix, item_n, width = scenario.item_pad);
            let (n, at) = {
                let mut s = state.borrow_mut();
                let at = s.micros();
                s.sent[user].push(at);
                ((s.sent[user].len() - 1) as u32, at)
            };
            let id = format!("{run_prefix}{user}-{n}");
            let name = user_name(user);
            let body = json!({ "user_id": name, "item_id": item, "event_type": "view", "event_id": id }).to_string();
            *slot(&mut sent_by_second, state.borrow().second(at)) += 1;
            events_sent += 1;
            match &producer {
                Some(producer) => {
                    let topic = scenario.kafka.as_ref().map_or("liverec.events", |k| k.topic.as_str());
                    if producer.send(BaseRecord::to(topic).key(name.as_str()).payload(&body)).is_err() {
                        let mut s = state.borrow_mut();
                        s.errors.kafka_produce += 1;
                        s.sent[user][n as usize] = FAILED;
                    }
                    producer.poll(Duration::ZERO);
                }
                None => {
                    let request =
                        http.post(format!("{target}/v1/events")).insert_header(("content-type", "application/json"));
                    let state = state.clone();
                    state.borrow_mut().outstanding += 1;
                    actix_rt::spawn(async move {
                        let begun = Instant::now();
                        let ok = match request.send_body(body).await {
                            // Read the body so the connection goes back to the pool.
                            Ok(mut r) => r.body().await.is_ok() && r.status().as_u16() == 202,
                            Err(_) => false,
                        };
                        let latency = begun.elapsed().as_micros() as u64;
                        let mut s = state.borrow_mut();
                        s.outstanding -= 1;
                        if ok {
                            s.record_request(at, latency, true);
                        } else {
                            s.errors.post_events += 1;
                            s.sent[user][n as usize] = FAILED;
                        }
                    });
                }
            }
        }
        let gets_due = (scenario.gets_per_s * t) as u64;
        while gets_sent < gets_due {
            get_cursor = (get_cursor + 104_729) % scenario.users;
            let url = format!("{target}/v1/users/{}/recommendations", user_name(get_cursor));
            let request = http.get(url);
            let state = state.clone();
            let at = {
                let mut s = state.borrow_mut();
                s.outstanding += 1;
                s.micros()
            };
            gets_sent += 1;
            actix_rt::spawn(async move {
                let begun = Instant::now();
                let ok = match request.send().await {
                    Ok(mut r) => r.body().limit(1 << 20).await.is_ok() && r.status().is_success(),
                    Err(_) => false,
                };
                let latency = begun.elapsed().as_micros() as u64;
                let mut s = state.borrow_mut();
                s.outstanding -= 1;
                if ok {
                    s.record_request(at, latency, false);
                } else {
                    s.errors.get_recommendations += 1;
                }
            });
        }
        if options.progress && t as u64 >= next_progress {
            let s = state.borrow();
            say(format!(
                "t={:>4} s  events {events_sent}  pushes {}  requests {}  errors {}  in flight {}",
                t as u64,
                s.pushes.iter().sum::<u64>(),
                s.requests.len(),
                s.errors.total(),
                s.outstanding
            ));
            next_progress += 5;
        }
    }
    let load_secs = load_start.elapsed().as_secs_f64();
    // Measured while everything is still open.
    let server_ws = scrape(&target, "liverec_stream_subscribers{kind=\"websocket\"}").await;
    let server_sse = scrape(&target, "liverec_stream_subscribers{kind=\"sse\"}").await;
    let rss_loaded = options.server_pid.and_then(rss_kib);

    // Requests still in flight finish (bounded), then the last pushes arrive (bounded).
    let drain = Instant::now();
    while state.borrow().outstanding > 0 && drain.elapsed() < Duration::from_secs(30) {
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    if let Some(producer) = &producer {
        if producer.flush(Duration::from_secs(10)).is_err() {
            state.borrow_mut().errors.kafka_produce += 1;
        }
    }
    let sim_summary = match sim {
        Some((control, handle)) => {
            control.stop();
            let report = actix_rt::time::timeout(Duration::from_secs(30), handle).await;
            Some(match report {
                Ok(Ok(Ok(report))) => SimSummary::from_report(&report),
                Ok(Ok(Err(error))) => SimSummary::failed(error.to_string()),
                _ => SimSummary::failed("the simulator did not finish in time".into()),
            })
        }
        None => None,
    };
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs_f64(scenario.settle_secs) && state.borrow().unreflected() > 0 {
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    for task in &tasks {
        task.abort();
    }
    let stale_after = scrape(&target, "liverec_push_dropped_stale_total").await.unwrap_or(stale_before);
    let trainer_after = scrape_sum(&target, &trainer_samples).await;
    let refused_after = scrape(&target, "liverec_model_refused_total").await.unwrap_or(refused_before);

    let mut s = state.borrow_mut();
    if let Some(sim) = &sim_summary {
        s.errors.sim = sim.errors;
    }
    let accepted = s.sent.iter().flatten().filter(|&&at| at != FAILED).count() as u64;
    let requests = s.requests.len();
    let seconds = (scenario.duration_secs.ceil() as usize).max(1);
    let timeline: Vec<TimelineSecond> = (0..seconds)
        .map(|t| {
            let e2p = s.e2p_by_second.get(t).filter(|h| !h.is_empty());
            let req = s.requests_by_second.get(t).filter(|h| !h.is_empty());
            let q = |h: Option<&Histogram<u64>>, p: f64| h.map(|h| h.value_at_quantile(p) as f64 / 1000.0);
            TimelineSecond {
                t: t as u64,
                target_events_per_s: scenario.rate_at(t as f64 + 0.5),
                events_sent: sent_by_second.get(t).copied().unwrap_or(0),
                requests: req.map_or(0, |h| h.len()),
                pushes: s.pushes_by_second.get(t).copied().unwrap_or(0),
                event_to_push_p50_ms: q(e2p, 0.5),
                event_to_push_p99_ms: q(e2p, 0.99),
                request_p50_ms: q(req, 0.5),
                request_p99_ms: q(req, 0.99),
                server_rss_kib: rss_by_second.get(t).copied().flatten(),
            }
        })
        .collect();
    let report = Report {
        scenario: scenario.clone(),
        target: target.clone(),
        started_at_unix_ms: started_at_ms as u64,
        load_secs,
        events_sent,
        events_accepted: accepted,
        events_per_s: events_sent as f64 / load_secs,
        requests,
        requests_per_s: requests as f64 / load_secs,
        request_ms: Quantiles::of(&s.requests),
        post_events_ms: Quantiles::of(&s.posts),
        get_recommendations_ms: Quantiles::of(&s.gets),
        errors: s.errors.total(),
        errors_by_kind: s.errors.clone(),
        event_to_push_ms: Quantiles::of(&s.e2p),
        event_to_first_push_ms: Quantiles::of(&s.e2p_first),
        deliveries_expected: s.expected_deliveries(),
        pushes_received: s.pushes.iter().sum(),
        pushes_received_ws: s.pushes[SubKind::Ws as usize],
        pushes_received_sse: s.pushes[SubKind::Sse as usize],
        pushes_received_idle: s.pushes[SubKind::Idle as usize],
        pushes_unexpected: s.pushes_unexpected,
        pushes_dropped: s.unreflected(),
        pushes_late: s.late,
        late_threshold_ms: scenario.late_ms,
        subscribers: SubscriberSummary {
            ws_sockets: scenario.ws_sockets,
            ws_subscriptions: scenario.ws_sockets * scenario.ws_subs_per_socket,
            sse_streams: scenario.sse_subscribers,
            idle_ws_sockets: scenario.idle_ws_sockets,
            opened: tasks.len(),
            confirmed: s.confirmed,
            expected: expected_confirmations,
            closed_early: s.subscribers.iter().filter(|sub| sub.closed).count(),
            setup_secs: connect_secs,
            source_addresses: clients.len(),
        },
        server: ServerSide {
            stale_lists_skipped: stale_after - stale_before,
            model_requests_refused: refused_after - refused_before,
            trainer_runs: trainer_after - trainer_before,
            websocket_subscriptions: server_ws,
            sse_subscriptions: server_sse,
            rss_kib_before: rss_before,
            rss_kib_loaded: rss_loaded,
        },
        sim: sim_summary,
        host: report::Host {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            loadavg_start,
            loadavg_end: loadavg(),
            nofile_soft: nofile.soft,
            nofile_hard: nofile.hard,
        },
        timeline,
        definitions: report::definitions(scenario.late_ms, scenario.settle_secs),
    };
    drop(s);
    if let Some(dir) = &options.out {
        report::write(dir, &report)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(users: usize) -> State {
        State {
            start: Instant::now(),
            run_prefix: "lt1-".into(),
            last_second: 9,
            sent: vec![Vec::new(); users],
            first_acked: vec![0; users],
            subscribers: Vec::new(),
            e2p: histogram(),
            e2p_first: histogram(),
            e2p_by_second: Vec::new(),
            late_us: 1_000_000_000,
            late: 0,
            pushes: [0; 3],
            pushes_unexpected: 0,
            pushes_by_second: Vec::new(),
            confirmed: 0,
            requests: histogram(),
            posts: histogram(),
            gets: histogram(),
            requests_by_second: Vec::new(),
            outstanding: 0,
            errors: ErrorCounts::default(),
        }
    }

    #[test]
    fn event_ids_round_trip() {
        assert_eq!(parse_event_id("lt5-", "lt5-12-3"), Some((12, 3)));
        assert_eq!(parse_event_id("lt5-", "lt4-12-3"), None, "another run's event");
        assert_eq!(parse_event_id("lt5-", "0190-uuid"), None);
    }

    #[test]
    fn a_push_reflects_every_event_up_to_its_last_one_per_subscriber() {
        let mut s = state(2);
        s.sent[1] = vec![0, 0, FAILED, 0];
        for kind in [SubKind::Ws, SubKind::Sse] {
            s.subscribers.push(Subscriber { kind, watches: vec![Watch { user: 1, acked: 0 }], closed: false });
        }
        assert_eq!((s.expected_deliveries(), s.unreflected()), (6, 6));
        // A coalesced push of event 2 (refused: still counts as the list's newest id we sent).
        s.on_push(0, "load-user-1", Some("lt1-1-2"));
        assert_eq!(s.e2p.len(), 2, "events 0 and 1; the refused one is not a delivery");
        assert_eq!(s.e2p_first.len(), 2);
        assert_eq!(s.unreflected(), 4);
        // The same push at the other subscriber: every delivery counts, the first-push view not.
        s.on_push(1, "load-user-1", Some("lt1-1-3"));
        assert_eq!((s.e2p.len(), s.e2p_first.len()), (5, 3));
        assert_eq!(s.unreflected(), 1);
        // A stale push changes nothing; a list of another user is unexpected.
        s.on_push(1, "load-user-1", Some("lt1-1-0"));
        s.on_push(0, "load-user-0", Some("lt1-0-0"));
        assert_eq!((s.e2p.len(), s.pushes_unexpected), (5, 1));
        assert_eq!(s.pushes[SubKind::Ws as usize] + s.pushes[SubKind::Sse as usize], 4);
    }
}
