//! The report of a run: `report.json` (every figure), `report.md` (the same for people, with the
//! definitions) and `latency.svg` (latency over time, see [`crate::svg`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::scenario::Scenario;
use crate::svg;

/// Latency quantiles in milliseconds (from microsecond histograms, 3 significant figures).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
    pub count: u64,
}

impl Quantiles {
    pub fn of(h: &Histogram<u64>) -> Quantiles {
        if h.is_empty() {
            return Quantiles::default();
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Quantiles {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
            mean: h.mean() / 1000.0,
            count: h.len(),
        }
    }
}

/// Errors by where they happened.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorCounts {
    /// `POST /v1/events` that failed or did not answer 202 (e.g. 503 when the pipeline is full).
    pub post_events: u64,
    /// `GET .../recommendations` that failed or did not answer 2xx.
    pub get_recommendations: u64,
    /// Events the Kafka producer refused (its queue full) or could not flush.
    pub kafka_produce: u64,
    /// WebSocket handshakes that failed.
    pub ws_connect: u64,
    /// SSE streams that could not be opened.
    pub sse_connect: u64,
    /// Subscribe messages that could not be sent or that the server refused.
    pub subscribe: u64,
    /// Subscriber streams the server closed (or that failed) before the run ended.
    pub stream_closed: u64,
    /// Failed requests of the simulated users.
    pub sim: u64,
}

impl ErrorCounts {
    pub fn total(&self) -> u64 {
        self.post_events
            + self.get_recommendations
            + self.kafka_produce
            + self.ws_connect
            + self.sse_connect
            + self.subscribe
            + self.stream_closed
            + self.sim
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubscriberSummary {
    pub ws_sockets: usize,
    pub ws_subscriptions: usize,
    pub sse_streams: usize,
    pub idle_ws_sockets: usize,
    /// Sockets and streams that opened.
    pub opened: usize,
    /// Subscriptions the server confirmed before the load started, of `expected`.
    pub confirmed: usize,
    pub expected: usize,
    pub closed_early: usize,
    /// Seconds to open and confirm every subscriber.
    pub setup_secs: f64,
    /// Loopback source addresses the sockets were spread over.
    pub source_addresses: usize,
    /// Seconds after the subscribers were confirmed until the server had no earlier work left
    /// (no scoring queued, no requests scored or events applied for 1 s): the load starts then.
    /// `None`: still busy after 120 s, and the load started anyway.
    #[serde(default)]
    pub quiet_after_secs: Option<f64>,
}

/// What the server's `/metrics` (and `/proc`, given its pid) said about the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerSide {
    /// `liverec_push_dropped_stale_total` during the run: lists a slow subscriber skipped because
    /// a newer one replaced them (coalescing by design; the newer list still arrives).
    pub stale_lists_skipped: f64,
    /// `liverec_model_refused_total` during the run.
    pub model_requests_refused: f64,
    /// Training runs the closed loop started during the run (they take a core).
    pub trainer_runs: f64,
    /// The server's gauge `liverec_stream_subscribers{kind="websocket"}` and `{kind="sse"}` at
    /// the end of the load (it counts WebSocket connections, not their subscriptions).
    pub websocket_subscriptions: Option<f64>,
    pub sse_subscriptions: Option<f64>,
    /// Server resident memory before the subscribers opened and at the end of the load.
    pub rss_kib_before: Option<u64>,
    pub rss_kib_loaded: Option<u64>,
    /// What the server did with the events: applied rate, Kafka lag, CPU per event.
    #[serde(default)]
    pub work: ServerWork,
}

/// What the server did with the events, from its `/metrics` and (with `--server-pid`) its CPU
/// time in `/proc/PID/stat`, over the load and the settle after it. A figure the server does not
/// expose (the lag of a server without Kafka) or that needs the pid is `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerWork {
    /// `liverec_session_applied_events_total` from the start of the load to the end of the settle.
    pub events_applied: Option<f64>,
    /// Events the server applied during the load, per second of load: the rate it kept up with.
    pub applied_events_per_s: Option<f64>,
    /// Seconds after the load (once its last requests were answered, or the Kafka producer
    /// flushed) until the server had received (applied, or skipped as a duplicate) every
    /// accepted event; none if not within `settle_secs`, or with simulated users.
    pub caught_up_secs: Option<f64>,
    /// The highest `backlog_events` of the timeline: events sent but not yet received by the
    /// server, counted by the generator (exact, unlike the lag gauge below).
    pub backlog_max_events: Option<f64>,
    /// `liverec_kafka_consumer_lag_records`: the highest sampled during the load (once a
    /// second), at its end, and after the settle. The server refreshes this gauge from
    /// librdkafka's statistics every 5 s, against committed offsets: it trails the backlog.
    pub kafka_lag_max_records: Option<f64>,
    pub kafka_lag_end_of_load_records: Option<f64>,
    pub kafka_lag_settled_records: Option<f64>,
    /// The server's CPU seconds (user + system) from the start of the load to the end of the
    /// settle, and the cores that is on average.
    pub cpu_secs: Option<f64>,
    pub cpu_cores: Option<f64>,
    /// `cpu_secs` divided by `events_applied` (by the events accepted if the server does not count).
    pub cpu_secs_per_event: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimSummary {
    pub steps: u64,
    pub lists: u64,
    pub clicks: u64,
    pub errors: u64,
    pub ctr: f64,
    pub failure: Option<String>,
}

impl SimSummary {
    pub fn from_report(report: &liverec::sim::SimReport) -> SimSummary {
        SimSummary {
            steps: report.steps,
            lists: report.lists,
            clicks: report.clicks,
            errors: report.errors,
            ctr: if report.lists > 0 { report.clicks as f64 / report.lists as f64 } else { 0.0 },
            failure: None,
        }
    }

    pub fn failed(why: String) -> SimSummary {
        SimSummary { errors: 1, failure: Some(why), ..SimSummary::default() }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub cores: usize,
    /// `/proc/loadavg` (1, 5, 15 minutes) before and after the run.
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub nofile_soft: u64,
    pub nofile_hard: u64,
}

/// One second of the load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelineSecond {
    pub t: u64,
    pub target_events_per_s: f64,
    pub events_sent: u64,
    /// Requests started in this second that succeeded.
    pub requests: u64,
    /// Pushes received in this second.
    pub pushes: u64,
    /// Event-to-push quantiles of the events sent in this second.
    pub event_to_push_p50_ms: Option<f64>,
    pub event_to_push_p99_ms: Option<f64>,
    /// Latency quantiles of the requests started in this second.
    pub request_p50_ms: Option<f64>,
    pub request_p99_ms: Option<f64>,
    /// Server resident memory sampled in this second (with `--server-pid`).
    #[serde(default)]
    pub server_rss_kib: Option<u64>,
    /// Events the server applied in this second, the cores its CPU time in this second comes
    /// to (with `--server-pid`), and its Kafka consumer lag at the end of the second.
    #[serde(default)]
    pub server_applied_events: Option<f64>,
    #[serde(default)]
    pub server_cpu_cores: Option<f64>,
    #[serde(default)]
    pub kafka_lag_records: Option<f64>,
    /// Events sent by the end of this second that the server had not yet received (applied or
    /// skipped as duplicates), from its `liverec_session_*_events_total`; without simulated
    /// users, whose events it counts too.
    #[serde(default)]
    pub backlog_events: Option<f64>,
}

/// Everything a run measured. The field definitions are also in `definitions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub scenario: Scenario,
    pub target: String,
    pub started_at_unix_ms: u64,
    /// Seconds the load actually ran.
    pub load_secs: f64,
    pub events_sent: u64,
    pub events_accepted: u64,
    pub events_per_s: f64,
    pub requests: u64,
    pub requests_per_s: f64,
    pub request_ms: Quantiles,
    pub post_events_ms: Quantiles,
    pub get_recommendations_ms: Quantiles,
    pub errors: u64,
    pub errors_by_kind: ErrorCounts,
    pub event_to_push_ms: Quantiles,
    pub event_to_first_push_ms: Quantiles,
    pub deliveries_expected: u64,
    pub pushes_received: u64,
    pub pushes_received_ws: u64,
    pub pushes_received_sse: u64,
    pub pushes_received_idle: u64,
    pub pushes_unexpected: u64,
    pub pushes_dropped: u64,
    pub pushes_late: u64,
    pub late_threshold_ms: f64,
    pub subscribers: SubscriberSummary,
    pub server: ServerSide,
    pub sim: Option<SimSummary>,
    pub host: Host,
    pub timeline: Vec<TimelineSecond>,
    pub definitions: BTreeMap<String, String>,
}

/// What each headline figure means, written into every report.
pub fn definitions(late_ms: f64, settle_secs: f64) -> BTreeMap<String, String> {
    [
        ("events_per_s", "events sent divided by the seconds of load (the achieved send rate; events_accepted of them got 202 or were produced)".to_owned()),
        ("requests_per_s", "successful HTTP requests (POST /v1/events answered 202, GET recommendations answered 2xx) per second of load".to_owned()),
        ("request_ms", "time from sending a request to reading its whole response, POSTs and GETs together; post_events_ms and get_recommendations_ms split it".to_owned()),
        ("event_to_push_ms", "for every accepted event and every subscriber of its user: time from the generator sending the event to that subscriber receiving the first list whose last_event_id is this event or a later one of the same user".to_owned()),
        ("event_to_first_push_ms", "the same, counting only the first subscriber of the user to receive it (the definition of liverec-load rest before scenarios)".to_owned()),
        ("pushes_received", "recommendation lists received by all subscribers, including the list each gets on subscribing and those of idle sockets".to_owned()),
        ("pushes_dropped", format!("deliveries (accepted event x subscriber of its user) never reflected in a push received by that subscriber, waiting at most {settle_secs} s after the load")),
        ("pushes_late", format!("deliveries reflected more than {late_ms} ms (late_ms) after the event was sent")),
        ("errors", "failed requests, refused produces, failed connections and subscriptions, streams closed early, and the simulated users' failed requests (errors_by_kind)".to_owned()),
        ("server.work.applied_events_per_s", "liverec_session_applied_events_total over the load (all events, the simulated users' too) per second of load; caught_up_secs is how long after the load (its last answers, or the Kafka flush) the server took to receive every accepted event".to_owned()),
        ("server.work.cpu_secs_per_event", "the server's CPU seconds (utime + stime in /proc/PID/stat with --server-pid, else the server's own liverec_process_cpu_seconds_total from /metrics) from the start of the load to the end of the settle, divided by the events it applied then; it includes the pushes, GETs and /metrics scrapes of the run".to_owned()),
        ("server.work.kafka_lag_max_records", "liverec_kafka_consumer_lag_records, sampled once a second during the load (Kafka mode only)".to_owned()),
        ("server.stale_lists_skipped", "lists the server did not send to a slow subscriber because a newer list replaced them; coalescing by design, not a lost update".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Writes `report.json`, `report.md` and `latency.svg` into `dir`.
pub fn write(dir: &Path, report: &Report) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(report).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("report.json"), json)?;
    std::fs::write(dir.join("report.md"), markdown(report))?;
    std::fs::write(dir.join("latency.svg"), svg::latency(&plot(report)))?;
    Ok(())
}

/// The data `latency.svg` draws, taken from the report's timeline.
pub fn plot(report: &Report) -> svg::Plot {
    svg::Plot {
        title: report.scenario.name.clone(),
        late_threshold_ms: report.late_threshold_ms,
        seconds: report
            .timeline
            .iter()
            .map(|s| svg::Second {
                t: s.t,
                event_to_push_p50_ms: s.event_to_push_p50_ms,
                event_to_push_p99_ms: s.event_to_push_p99_ms,
                request_p50_ms: s.request_p50_ms,
                request_p99_ms: s.request_p99_ms,
                target_events_per_s: s.target_events_per_s,
                events_sent: s.events_sent,
                pushes: s.pushes,
            })
            .collect(),
    }
}

fn row(out: &mut String, what: &str, q: &Quantiles) {
    let _ = writeln!(
        out,
        "| {what} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        q.count, q.p50, q.p90, q.p99, q.p999, q.max
    );
}

/// The report for people.
pub fn markdown(r: &Report) -> String {
    let mut out = String::new();
    let s = &r.scenario;
    let _ = writeln!(out, "# Load test `{}`\n", s.name);
    if !s.description.is_empty() {
        let _ = writeln!(out, "{}\n", s.description.trim());
    }
    let _ = writeln!(
        out,
        "Target {}, {:.1} s of load started at {} ms since the epoch; {} cores; load average {} before, {} after; \
         open-file limit {} (hard {}).\n",
        r.target,
        r.load_secs,
        r.started_at_unix_ms,
        r.host.cores,
        r.host.loadavg_start,
        r.host.loadavg_end,
        r.host.nofile_soft,
        r.host.nofile_hard
    );
    let _ = writeln!(out, "## Throughput\n");
    let _ = writeln!(out, "| what | value |\n|---|---|");
    let _ = writeln!(
        out,
        "| events | {} sent, {} accepted, **{:.0} events/s** |",
        r.events_sent, r.events_accepted, r.events_per_s
    );
    let _ = writeln!(out, "| requests | {} succeeded, **{:.0} requests/s** |", r.requests, r.requests_per_s);
    let _ = writeln!(
        out,
        "| pushes received | **{}** ({} WebSocket, {} SSE, {} idle sockets; {} for an unexpected user) |",
        r.pushes_received, r.pushes_received_ws, r.pushes_received_sse, r.pushes_received_idle, r.pushes_unexpected
    );
    let _ = writeln!(
        out,
        "| deliveries | {} expected, **{} dropped**, **{} late** (> {} ms) |",
        r.deliveries_expected, r.pushes_dropped, r.pushes_late, r.late_threshold_ms
    );
    let e = &r.errors_by_kind;
    let _ = writeln!(
        out,
        "| errors | **{}** (POST {}, GET {}, Kafka {}, WebSocket connect {}, SSE connect {}, subscribe {}, streams closed early {}, simulator {}) |",
        r.errors, e.post_events, e.get_recommendations, e.kafka_produce, e.ws_connect, e.sse_connect, e.subscribe, e.stream_closed, e.sim
    );
    let sub = &r.subscribers;
    let _ = writeln!(
        out,
        "| subscribers | {} WebSocket sockets ({} subscriptions), {} SSE streams, {} idle WebSocket sockets; {} of {} subscriptions confirmed in {:.1} s over {} source address(es); {} closed early; {} |",
        sub.ws_sockets, sub.ws_subscriptions, sub.sse_streams, sub.idle_ws_sockets, sub.confirmed, sub.expected, sub.setup_secs, sub.source_addresses, sub.closed_early,
        sub.quiet_after_secs.map_or("the server was still busy after 120 s when the load started".to_owned(), |s| format!("the server was quiet {s:.1} s later, and the load started then"))
    );
    let sv = &r.server;
    let opt = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.0}"));
    let rss = |v: Option<u64>| v.map_or("n/a".to_owned(), |v| format!("{:.0} MiB", v as f64 / 1024.0));
    let _ = writeln!(
        out,
        "| server | liverec_stream_subscribers at the end of the load: {} websocket, {} sse; {:.0} stale lists skipped; {:.0} model requests refused; {:.0} training runs; RSS {} before, {} loaded |",
        opt(sv.websocket_subscriptions), opt(sv.sse_subscriptions), sv.stale_lists_skipped, sv.model_requests_refused, sv.trainer_runs, rss(sv.rss_kib_before), rss(sv.rss_kib_loaded)
    );
    let w = &sv.work;
    let num = |v: Option<f64>, digits: usize| v.map_or("n/a".to_owned(), |v| format!("{v:.digits$}"));
    let _ = writeln!(
        out,
        "| server work | **{} events/s applied** during the load, {} applied in all, caught up {} s after the load, backlog max {} events; Kafka lag max {}, {} at the end of the load, {} after; CPU **{} us per event** ({} s, {} cores) |",
        num(w.applied_events_per_s, 0),
        num(w.events_applied, 0),
        num(w.caught_up_secs, 2),
        num(w.backlog_max_events, 0),
        num(w.kafka_lag_max_records, 0),
        num(w.kafka_lag_end_of_load_records, 0),
        num(w.kafka_lag_settled_records, 0),
        num(w.cpu_secs_per_event.map(|s| s * 1e6), 1),
        num(w.cpu_secs, 2),
        num(w.cpu_cores, 2)
    );
    if let Some(sim) = &r.sim {
        let _ = writeln!(
            out,
            "| simulated users | {} steps, {} lists, {} clicks (CTR {:.3}), {} errors{} |",
            sim.steps,
            sim.lists,
            sim.clicks,
            sim.ctr,
            sim.errors,
            sim.failure.as_deref().map(|f| format!(": {f}")).unwrap_or_default()
        );
    }
    let _ = writeln!(out, "\n## Latency (ms)\n");
    let _ = writeln!(out, "| what | count | p50 | p90 | p99 | p99.9 | max |\n|---|---|---|---|---|---|---|");
    row(&mut out, "event to push (every subscriber)", &r.event_to_push_ms);
    row(&mut out, "event to first push (per user)", &r.event_to_first_push_ms);
    row(&mut out, "requests (all)", &r.request_ms);
    row(&mut out, "POST /v1/events", &r.post_events_ms);
    row(&mut out, "GET recommendations", &r.get_recommendations_ms);
    let _ = writeln!(out, "\n![latency over time](latency.svg)\n");
    // Long runs (soak): memory and latency minute by minute, so leaks and slow drift show.
    if r.timeline.len() >= 120 {
        let _ = writeln!(out, "## Over time (one row per minute)\n");
        let _ = writeln!(
            out,
            "| minute | server memory (MiB) | event to push p50 / p99 (ms) | requests p50 / p99 (ms) | pushes |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|");
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        for minute in r.timeline.chunks(60) {
            let last = minute.last().expect("chunks are not empty");
            let rss = minute.iter().rev().find_map(|s| s.server_rss_kib);
            let _ = writeln!(
                out,
                "| {} | {} | {} / {} | {} / {} | {} |",
                last.t / 60,
                rss.map_or("-".to_owned(), |k| format!("{:.0}", k as f64 / 1024.0)),
                ms(last.event_to_push_p50_ms),
                ms(last.event_to_push_p99_ms),
                ms(last.request_p50_ms),
                ms(last.request_p99_ms),
                minute.iter().map(|s| s.pushes).sum::<u64>()
            );
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "## Definitions\n");
    for (key, text) in &r.definitions {
        let _ = writeln!(out, "- `{key}`: {text}");
    }
    let _ = writeln!(out, "\n## Scenario\n\n```toml\n{}```", toml::to_string(&r.scenario).unwrap_or_default());
    out
}
