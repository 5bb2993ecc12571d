//! Logging set-up and every metric liverec exports, declared in one place.
//!
//! Metrics are plain atomics (no locks on hot paths) rendered in the Prometheus text format at
//! `GET /metrics`. Names follow `liverec_<subsystem>_<name>_<unit>[_total]`; labels are low
//! cardinality (a source or a stream kind), never a user or item id.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::config::{LogConfig, LogFormat};

/// Installs the global tracing subscriber. `RUST_LOG` wins over the configured level.
pub fn init_logging(config: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true);
    let result = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    // A second initialisation (tests start several servers in one process) is harmless.
    let _ = result;
}

#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default, Debug)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A fixed-bucket histogram. Bucket bounds are in the metric's unit (seconds, or a count).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    /// Sum in millionths of the unit, to stay an integer atomic.
    sum_micro: AtomicU64,
    count: AtomicU64,
}

/// Latency buckets, 100 µs to 10 s.
pub const LATENCY_BOUNDS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Batch-size buckets.
/// Bounds for training runs, in seconds.
pub const TRAINING_BOUNDS: &[f64] = &[1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];
pub const SIZE_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micro: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micro.fetch_add((value * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Every metric of one server. Shared by `Arc`; each test server has its own.
#[derive(Debug)]
pub struct Metrics {
    /// Events accepted, by source.
    pub ingest_events_http: Counter,
    pub ingest_events_ws: Counter,
    /// Events refused as invalid (the whole batch counts).
    pub ingest_invalid: Counter,
    /// Batches refused because the pipeline was full (503).
    pub ingest_shed: Counter,
    /// Events applied to a session, and repeats of an event id skipped.
    pub session_applied: Counter,
    pub session_duplicates: Counter,
    pub sessions_active: Gauge,
    pub sessions_started: Counter,
    pub sessions_evicted: Counter,
    /// Profile store failures (loads and writes).
    pub store_errors: Counter,
    /// Time of one store round trip (a write pipeline, a batch of loads), and writes per pipeline.
    pub store_write_seconds: Histogram,
    pub store_load_seconds: Histogram,
    pub store_write_batch_size: Histogram,
    /// Lists published to a user's subscribers.
    pub push_updates: Counter,
    /// Lists written to a subscriber, by stream kind.
    pub push_sent_sse: Counter,
    pub push_sent_ws: Counter,
    /// Lists a slow subscriber skipped because a newer one replaced them.
    pub push_dropped_stale: Counter,
    pub subscribers_sse: Gauge,
    pub subscribers_ws: Gauge,
    /// WebSocket messages refused (garbage, unknown, over limits).
    pub ws_invalid_messages: Counter,
    pub model_requests: Counter,
    pub model_refused: Counter,
    pub model_batches: Counter,
    pub model_batch_size: Histogram,
    pub model_inference_seconds: Histogram,
    /// From the moment an event was received to the push that reflects it.
    pub event_to_push_seconds: Histogram,
    /// Per stage of the event path: receive (request start to accepted by the bus), apply (bus to
    /// applied by the session), model (a session's scoring request, queue and batch included),
    /// push (list published to written to a subscriber).
    pub stage_receive_seconds: Histogram,
    pub stage_apply_seconds: Histogram,
    pub stage_model_seconds: Histogram,
    pub stage_push_seconds: Histogram,
    /// Kafka records consumed, sent to the dead-letter topic, rebalances, pauses and restarts.
    pub kafka_records: Counter,
    pub kafka_dead_letters: Counter,
    pub kafka_rebalances: Counter,
    pub kafka_paused: Counter,
    pub kafka_restarts: Counter,
    /// Transient consumption errors the consumer carried on after.
    pub kafka_errors: Counter,
    /// Records behind the end of the partitions this instance consumes (from librdkafka statistics).
    pub kafka_lag: Gauge,
    /// Lists received from other instances and forwarded to local subscribers.
    pub fanout_received: Counter,
    /// Served lists, attributed clicks and conversions, monitor breaches, reports refused.
    pub monitor_impressions: Counter,
    pub monitor_clicks: Counter,
    pub monitor_conversions: Counter,
    pub monitor_breaches: Counter,
    pub monitor_refused: Counter,
    /// Retraining requests, by source; requests folded into a run already going.
    pub trainer_triggers_monitor: Counter,
    pub trainer_triggers_schedule: Counter,
    pub trainer_triggers_admin: Counter,
    pub trainer_coalesced: Counter,
    /// Training runs, by outcome.
    pub trainer_runs_rejected: Counter,
    pub trainer_runs_passed: Counter,
    pub trainer_runs_failed: Counter,
    pub trainer_training_seconds: Histogram,
    /// Canaries started, promoted and rolled back (automatic and manual).
    pub rollout_canaries: Counter,
    pub rollout_promotions: Counter,
    pub rollout_rollbacks: Counter,
    /// Share of users served by a canary or experiment challenger, as f64 bits.
    rollout_share: AtomicU64,
    /// Latest drift scores (PSI), as f64 bits.
    drift_popularity: AtomicU64,
    drift_category: AtomicU64,
    drift_context: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            ingest_events_http: Counter::default(),
            ingest_events_ws: Counter::default(),
            ingest_invalid: Counter::default(),
            ingest_shed: Counter::default(),
            session_applied: Counter::default(),
            session_duplicates: Counter::default(),
            sessions_active: Gauge::default(),
            sessions_started: Counter::default(),
            sessions_evicted: Counter::default(),
            store_errors: Counter::default(),
            store_write_seconds: Histogram::new(LATENCY_BOUNDS),
            store_load_seconds: Histogram::new(LATENCY_BOUNDS),
            store_write_batch_size: Histogram::new(SIZE_BOUNDS),
            push_updates: Counter::default(),
            push_sent_sse: Counter::default(),
            push_sent_ws: Counter::default(),
            push_dropped_stale: Counter::default(),
            subscribers_sse: Gauge::default(),
            subscribers_ws: Gauge::default(),
            ws_invalid_messages: Counter::default(),
            model_requests: Counter::default(),
            model_refused: Counter::default(),
            model_batches: Counter::default(),
            model_batch_size: Histogram::new(SIZE_BOUNDS),
            model_inference_seconds: Histogram::new(LATENCY_BOUNDS),
            event_to_push_seconds: Histogram::new(LATENCY_BOUNDS),
            stage_receive_seconds: Histogram::new(LATENCY_BOUNDS),
            stage_apply_seconds: Histogram::new(LATENCY_BOUNDS),
            stage_model_seconds: Histogram::new(LATENCY_BOUNDS),
            stage_push_seconds: Histogram::new(LATENCY_BOUNDS),
            kafka_records: Counter::default(),
            kafka_dead_letters: Counter::default(),
            kafka_rebalances: Counter::default(),
            kafka_paused: Counter::default(),
            kafka_restarts: Counter::default(),
            kafka_errors: Counter::default(),
            kafka_lag: Gauge::default(),
            fanout_received: Counter::default(),
            monitor_impressions: Counter::default(),
            monitor_clicks: Counter::default(),
            monitor_conversions: Counter::default(),
            monitor_breaches: Counter::default(),
            monitor_refused: Counter::default(),
            trainer_triggers_monitor: Counter::default(),
            trainer_triggers_schedule: Counter::default(),
            trainer_triggers_admin: Counter::default(),
            trainer_coalesced: Counter::default(),
            trainer_runs_rejected: Counter::default(),
            trainer_runs_passed: Counter::default(),
            trainer_runs_failed: Counter::default(),
            trainer_training_seconds: Histogram::new(TRAINING_BOUNDS),
            rollout_canaries: Counter::default(),
            rollout_promotions: Counter::default(),
            rollout_rollbacks: Counter::default(),
            rollout_share: AtomicU64::new(0),
            drift_popularity: AtomicU64::new(0),
            drift_category: AtomicU64::new(0),
            drift_context: AtomicU64::new(0),
        }
    }
}

struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }

    fn counter(&mut self, name: &str, help: &str, samples: &[(&str, &Counter)]) {
        self.family(name, "counter", help);
        for (labels, c) in samples {
            self.sample(name, labels, c.get());
        }
    }

    fn gauge(&mut self, name: &str, help: &str, samples: &[(&str, i64)]) {
        self.family(name, "gauge", help);
        for (labels, v) in samples {
            self.sample(name, labels, v);
        }
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, "histogram", help);
        self.histogram_samples(name, "", h);
    }

    /// Samples of one histogram series; `labels` (e.g. `stage="push",`) precede `le`.
    fn histogram_samples(&mut self, name: &str, labels: &str, h: &Histogram) {
        let mut cumulative = 0;
        for (bound, bucket) in h.bounds.iter().zip(&h.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            self.sample(&format!("{name}_bucket"), &format!("{labels}le=\"{bound}\""), cumulative);
        }
        let count = h.count.load(Ordering::Relaxed);
        let plain = labels.trim_end_matches(',');
        self.sample(&format!("{name}_bucket"), &format!("{labels}le=\"+Inf\""), count);
        self.sample(&format!("{name}_sum"), plain, h.sum_micro.load(Ordering::Relaxed) as f64 / 1e6);
        self.sample(&format!("{name}_count"), plain, count);
    }
}

impl Metrics {
    /// Records the latest input-drift scores.
    pub fn set_drift(&self, popularity_psi: f64, category_psi: f64, context_psi: f64) {
        self.drift_popularity.store(popularity_psi.to_bits(), Ordering::Relaxed);
        self.drift_category.store(category_psi.to_bits(), Ordering::Relaxed);
        self.drift_context.store(context_psi.to_bits(), Ordering::Relaxed);
    }

    /// Records the share of users a challenger serves (0 when none).
    pub fn set_challenger_share(&self, share: f64) {
        self.rollout_share.store(share.to_bits(), Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Exposition(String::with_capacity(8192));
        out.counter(
            "liverec_ingest_events_total",
            "Events accepted, by source.",
            &[("source=\"http\"", &self.ingest_events_http), ("source=\"websocket\"", &self.ingest_events_ws)],
        );
        out.counter("liverec_ingest_invalid_events_total", "Events refused as invalid.", &[("", &self.ingest_invalid)]);
        out.counter(
            "liverec_ingest_shed_batches_total",
            "Event batches refused with 503 because the pipeline was full.",
            &[("", &self.ingest_shed)],
        );
        out.counter(
            "liverec_session_applied_events_total",
            "Events applied to a user session.",
            &[("", &self.session_applied)],
        );
        out.counter(
            "liverec_session_duplicate_events_total",
            "Events skipped because their event_id was already applied.",
            &[("", &self.session_duplicates)],
        );
        out.gauge("liverec_sessions_active", "Session actors alive.", &[("", self.sessions_active.get())]);
        out.counter(
            "liverec_sessions_started_total",
            "Session actors started (new or rebuilt).",
            &[("", &self.sessions_started)],
        );
        out.counter(
            "liverec_sessions_evicted_total",
            "Session actors stopped after their idle TTL.",
            &[("", &self.sessions_evicted)],
        );
        out.counter("liverec_store_errors_total", "Profile store operations that failed.", &[("", &self.store_errors)]);
        out.histogram("liverec_store_write_seconds", "Time of one store write pipeline.", &self.store_write_seconds);
        out.histogram("liverec_store_load_seconds", "Time of one batch of profile loads.", &self.store_load_seconds);
        out.histogram("liverec_store_write_batch_size", "Writes per store pipeline.", &self.store_write_batch_size);
        out.counter(
            "liverec_push_updates_total",
            "Recommendation lists published to subscribers.",
            &[("", &self.push_updates)],
        );
        out.counter(
            "liverec_push_sent_total",
            "Recommendation lists written to a subscriber, by stream kind.",
            &[("kind=\"sse\"", &self.push_sent_sse), ("kind=\"websocket\"", &self.push_sent_ws)],
        );
        out.counter(
            "liverec_push_dropped_stale_total",
            "Lists a slow subscriber skipped because a newer list replaced them.",
            &[("", &self.push_dropped_stale)],
        );
        out.gauge(
            "liverec_stream_subscribers",
            "Open subscriptions, by stream kind.",
            &[("kind=\"sse\"", self.subscribers_sse.get()), ("kind=\"websocket\"", self.subscribers_ws.get())],
        );
        out.counter(
            "liverec_stream_invalid_messages_total",
            "WebSocket messages refused.",
            &[("", &self.ws_invalid_messages)],
        );
        out.counter("liverec_model_requests_total", "Recommendation requests scored.", &[("", &self.model_requests)]);
        out.counter(
            "liverec_model_refused_total",
            "Requests refused because the model mailbox was full.",
            &[("", &self.model_refused)],
        );
        out.counter("liverec_model_batches_total", "Batches run by the model.", &[("", &self.model_batches)]);
        out.histogram("liverec_model_batch_size", "Requests per model batch.", &self.model_batch_size);
        out.histogram("liverec_model_inference_seconds", "Time to run one model batch.", &self.model_inference_seconds);
        out.histogram(
            "liverec_event_to_push_seconds",
            "From receiving an event to publishing the list that reflects it.",
            &self.event_to_push_seconds,
        );
        out.family("liverec_stage_seconds", "histogram", "Latency of each stage of the event path.");
        for (stage, h) in [
            ("receive", &self.stage_receive_seconds),
            ("apply", &self.stage_apply_seconds),
            ("model", &self.stage_model_seconds),
            ("push", &self.stage_push_seconds),
        ] {
            out.histogram_samples("liverec_stage_seconds", &format!("stage=\"{stage}\","), h);
        }
        out.counter("liverec_kafka_records_total", "Kafka records consumed.", &[("", &self.kafka_records)]);
        out.counter(
            "liverec_kafka_dead_letters_total",
            "Records sent to the dead-letter topic.",
            &[("", &self.kafka_dead_letters)],
        );
        out.counter(
            "liverec_kafka_rebalances_total",
            "Partition revocations handled.",
            &[("", &self.kafka_rebalances)],
        );
        out.counter(
            "liverec_kafka_pauses_total",
            "Times the consumer paused its partitions because sessions fell behind.",
            &[("", &self.kafka_paused)],
        );
        out.counter(
            "liverec_kafka_consumer_restarts_total",
            "Restarts of a failed Kafka consumer by its supervisor.",
            &[("", &self.kafka_restarts)],
        );
        out.gauge(
            "liverec_kafka_consumer_lag_records",
            "Records behind the end of the partitions this instance consumes.",
            &[("", self.kafka_lag.get())],
        );
        out.counter(
            "liverec_kafka_consumer_errors_total",
            "Transient Kafka consumption errors the consumer carried on after.",
            &[("", &self.kafka_errors)],
        );
        out.counter(
            "liverec_monitor_impressions_total",
            "Recommendation lists served.",
            &[("", &self.monitor_impressions)],
        );
        out.counter(
            "liverec_monitor_clicks_total",
            "Clicks attributed to a served list.",
            &[("", &self.monitor_clicks)],
        );
        out.counter(
            "liverec_monitor_conversions_total",
            "Conversions attributed to a served list.",
            &[("", &self.monitor_conversions)],
        );
        out.counter(
            "liverec_monitor_breaches_total",
            "Drift or CTR breaches that asked for retraining.",
            &[("", &self.monitor_breaches)],
        );
        out.counter(
            "liverec_monitor_refused_total",
            "Reports to the monitor refused because its mailbox was full.",
            &[("", &self.monitor_refused)],
        );
        out.family("liverec_monitor_drift_psi", "gauge", "Latest population stability index, by input.");
        out.sample(
            "liverec_monitor_drift_psi",
            "input=\"popularity\"",
            f64::from_bits(self.drift_popularity.load(Ordering::Relaxed)),
        );
        out.sample(
            "liverec_monitor_drift_psi",
            "input=\"category\"",
            f64::from_bits(self.drift_category.load(Ordering::Relaxed)),
        );
        out.sample(
            "liverec_monitor_drift_psi",
            "input=\"context\"",
            f64::from_bits(self.drift_context.load(Ordering::Relaxed)),
        );
        out.counter(
            "liverec_trainer_triggers_total",
            "Retraining requests, by source.",
            &[
                ("source=\"monitor\"", &self.trainer_triggers_monitor),
                ("source=\"schedule\"", &self.trainer_triggers_schedule),
                ("source=\"admin\"", &self.trainer_triggers_admin),
            ],
        );
        out.counter(
            "liverec_trainer_coalesced_total",
            "Retraining requests folded into a run already in progress.",
            &[("", &self.trainer_coalesced)],
        );
        out.counter(
            "liverec_trainer_runs_total",
            "Training runs, by outcome of the validation gate.",
            &[
                ("outcome=\"passed\"", &self.trainer_runs_passed),
                ("outcome=\"rejected\"", &self.trainer_runs_rejected),
                ("outcome=\"failed\"", &self.trainer_runs_failed),
            ],
        );
        out.histogram("liverec_trainer_training_seconds", "Duration of training runs.", &self.trainer_training_seconds);
        out.counter("liverec_rollout_canaries_total", "Canaries started.", &[("", &self.rollout_canaries)]);
        out.counter(
            "liverec_rollout_promotions_total",
            "Versions promoted to serve everyone (canary or manual).",
            &[("", &self.rollout_promotions)],
        );
        out.counter(
            "liverec_rollout_rollbacks_total",
            "Canaries or versions rolled back.",
            &[("", &self.rollout_rollbacks)],
        );
        out.family(
            "liverec_rollout_challenger_share_ratio",
            "gauge",
            "Share of users served by a canary or experiment.",
        );
        out.sample(
            "liverec_rollout_challenger_share_ratio",
            "",
            f64::from_bits(self.rollout_share.load(Ordering::Relaxed)),
        );
        out.counter(
            "liverec_fanout_received_total",
            "Lists received from other instances for local subscribers.",
            &[("", &self.fanout_received)],
        );
        out.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.event_to_push_seconds.observe(0.0002);
        m.event_to_push_seconds.observe(0.003);
        m.event_to_push_seconds.observe(100.0);
        let text = m.render();
        assert!(text.contains("liverec_event_to_push_seconds_bucket{le=\"0.00025\"} 1\n"), "{text}");
        assert!(text.contains("liverec_event_to_push_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("liverec_event_to_push_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("liverec_event_to_push_seconds_count 3\n"));
        m.stage_push_seconds.observe(0.001);
        let text = m.render();
        assert!(text.contains("liverec_stage_seconds_bucket{stage=\"push\",le=\"0.001\"} 1\n"), "{text}");
        assert!(text.contains("liverec_stage_seconds_count{stage=\"push\"} 1\n"));
        assert!(text.contains("liverec_stage_seconds_count{stage=\"model\"} 0\n"));
    }
}
