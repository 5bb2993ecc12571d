//! Logging set-up and every metric liverec exports, declared in one place.
//!
//! Metrics go through OpenTelemetry: one `SdkMeterProvider` per server whose reader is the
//! Prometheus exporter, rendered in the Prometheus text format at `GET /metrics`. Counters and
//! gauges are plain atomics on the hot paths, observed by OpenTelemetry instruments (observable
//! counters and gauges) when a scrape collects them, so counting costs one relaxed atomic add;
//! histograms are OpenTelemetry histograms with explicit buckets. Names follow
//! `liverec_<subsystem>_<name>_<unit>[_total]`, given whole (the exporter adds no suffix); labels
//! are low cardinality (a source, a stream kind, a stage), never a user or item id.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::config::{LogConfig, LogFormat, TracingConfig};

/// Installs the global tracing subscriber (logs only). `RUST_LOG` wins over the configured level.
pub fn init_logging(config: &LogConfig) {
    // A second initialisation (tests start several servers in one process) is harmless.
    let _ = install(config, None);
}

/// Flushes and stops trace export when dropped (keep it alive while the server runs).
#[must_use = "traces stop being exported when the guard is dropped"]
pub struct TelemetryGuard(Option<SdkTracerProvider>);

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            if let Err(error) = provider.shutdown() {
                eprintln!("liverec: traces not flushed: {error}");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP trace exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
}

/// Installs logging and, when `tracing.otlp_endpoint` is set, OpenTelemetry trace export over
/// OTLP/HTTP (batched on a background thread; the spans of the event path become traces).
pub fn init(log: &LogConfig, tracing_config: &TracingConfig) -> Result<TelemetryGuard, TelemetryError> {
    if tracing_config.otlp_endpoint.is_empty() {
        init_logging(log);
        return Ok(TelemetryGuard(None));
    }
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let failed = |message: String| TelemetryError::Exporter { endpoint: tracing_config.otlp_endpoint.clone(), message };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(tracing_config.otlp_endpoint.clone())
        .with_timeout(Duration::from_secs(5))
        .with_headers(Default::default())
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let ratio = tracing_config.sample_ratio.clamp(0.0, 1.0);
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))))
        .with_resource(Resource::builder().with_service_name(tracing_config.service_name.clone()).build())
        .build();
    let tracer = provider.tracer("liverec");
    let _ = install(log, Some(tracing_opentelemetry::layer().with_tracer(tracer)));
    Ok(TelemetryGuard(Some(provider)))
}

type OtelLayer =
    tracing_opentelemetry::OpenTelemetryLayer<tracing_subscriber::Registry, opentelemetry_sdk::trace::SdkTracer>;

fn install(config: &LogConfig, otel: Option<OtelLayer>) -> Result<(), tracing_subscriber::util::TryInitError> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let fmt = match config.format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_target(true).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().boxed(),
    };
    // The OpenTelemetry layer sits first, under the filter, so it sees the same spans the logs do.
    tracing_subscriber::registry().with(otel).with(fmt).with(filter).try_init()
}

/// Records the span's trace id in its `trace_id` field, so every log line inside it carries the
/// id that finds its trace (nothing when trace export is off).
pub fn record_trace_id(span: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = span.context();
    let id = context.span().span_context().trace_id();
    if id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(id));
    }
}

/// W3C trace context of `span` as `(name, value)` headers (`traceparent`), for Kafka records.
pub fn trace_headers(span: &tracing::Span) -> Vec<(String, String)> {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let mut headers = std::collections::HashMap::new();
    opentelemetry_sdk::propagation::TraceContextPropagator::new().inject_context(&span.context(), &mut headers);
    headers.into_iter().collect()
}

/// Makes `span` a child of the trace named by a `traceparent` header value, if valid.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let carrier = std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// A monotonic count, observed by an OpenTelemetry observable counter at collection.
#[derive(Default, Debug, Clone)]
pub struct Counter(Arc<AtomicU64>);

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

/// A level that goes up and down, observed by an OpenTelemetry observable gauge.
#[derive(Default, Debug, Clone)]
pub struct Gauge(Arc<AtomicI64>);

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

/// A floating-point level (stored as bits), observed by an OpenTelemetry observable gauge.
#[derive(Default, Debug, Clone)]
pub struct FloatGauge(Arc<AtomicU64>);

impl FloatGauge {
    pub fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// An OpenTelemetry histogram with explicit buckets (in the metric's unit), and the labels of
/// this series.
#[derive(Clone)]
pub struct Histogram {
    instrument: opentelemetry::metrics::Histogram<f64>,
    labels: Arc<[KeyValue]>,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram").field("labels", &self.labels).finish()
    }
}

impl Histogram {
    pub fn observe(&self, value: f64) {
        self.instrument.record(value, &self.labels);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }
}

/// Latency buckets, 100 µs to 10 s.
pub const LATENCY_BOUNDS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Bounds for training runs, in seconds.
pub const TRAINING_BOUNDS: &[f64] = &[1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];
/// Batch-size buckets.
pub const SIZE_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Every metric of one server. Shared by `Arc`; each test server has its own.
pub struct Metrics {
    /// Events accepted, by source (Kafka records count under `kafka_records`).
    pub ingest_events_http: Counter,
    pub ingest_events_ws: Counter,
    /// Events refused as invalid (the whole batch counts).
    pub ingest_invalid: Counter,
    /// Batches refused because the pipeline was full (503).
    pub ingest_shed: Counter,
    /// Requests refused with 429 by a rate limit.
    pub http_rate_limited: Counter,
    /// Resident memory of the process, read from /proc at each scrape (0 where unavailable).
    pub process_resident_bytes: Gauge,
    /// Users erased, and events of erased users skipped (replays from before the erasure).
    pub privacy_erased: Counter,
    pub privacy_skipped: Counter,
    /// Event batches waiting in the in-process bus queues (the ingest actors' mailboxes), as of
    /// the last scrape.
    pub ingest_queued: Gauge,
    /// Events in the retained event log (the training window), as of the last scrape.
    pub eventlog_events: Gauge,
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
    /// Scoring requests waiting in the model actor for the next batch (its mailbox depth).
    pub model_queued: Gauge,
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
    /// Reports sent to the monitor and not yet handled (its mailbox depth).
    pub monitor_queued: Gauge,
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
    /// Share of users served by a canary or experiment challenger.
    rollout_share: FloatGauge,
    /// Latest drift scores (PSI), and click-through of the serving version over the window.
    drift_popularity: FloatGauge,
    drift_category: FloatGauge,
    drift_context: FloatGauge,
    ctr_serving: FloatGauge,
    /// Kept alive: the provider collects the instruments; the registry renders them.
    _provider: SdkMeterProvider,
    registry: prometheus::Registry,
    /// Every family declared: (name, Prometheus type).
    families: Vec<(&'static str, &'static str)>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Registers instruments on one meter, and remembers each family's name and Prometheus type.
struct Registrar(Meter, std::cell::RefCell<Vec<(&'static str, &'static str)>>);

type Labels = &'static [(&'static str, &'static str)];

fn key_values(labels: Labels) -> Vec<KeyValue> {
    labels.iter().map(|(k, v)| KeyValue::new(*k, *v)).collect()
}

impl Registrar {
    fn declare(&self, name: &'static str, kind: &'static str) {
        let mut families = self.1.borrow_mut();
        if !families.iter().any(|(n, _)| *n == name) {
            families.push((name, kind));
        }
    }

    fn counter(&self, name: &'static str, help: &'static str, series: &[(Labels, &Counter)]) {
        self.declare(name, "counter");
        let series: Vec<(Vec<KeyValue>, Counter)> = series.iter().map(|(l, c)| (key_values(l), (*c).clone())).collect();
        self.0
            .u64_observable_counter(name)
            .with_description(help)
            .with_callback(move |observer| {
                for (labels, counter) in &series {
                    observer.observe(counter.get(), labels);
                }
            })
            .build();
    }

    fn gauge(&self, name: &'static str, help: &'static str, series: &[(Labels, &Gauge)]) {
        self.declare(name, "gauge");
        let series: Vec<(Vec<KeyValue>, Gauge)> = series.iter().map(|(l, g)| (key_values(l), (*g).clone())).collect();
        self.0
            .i64_observable_gauge(name)
            .with_description(help)
            .with_callback(move |observer| {
                for (labels, gauge) in &series {
                    observer.observe(gauge.get(), labels);
                }
            })
            .build();
    }

    fn float_gauge(&self, name: &'static str, help: &'static str, series: &[(Labels, &FloatGauge)]) {
        self.declare(name, "gauge");
        let series: Vec<(Vec<KeyValue>, FloatGauge)> =
            series.iter().map(|(l, g)| (key_values(l), (*g).clone())).collect();
        self.0
            .f64_observable_gauge(name)
            .with_description(help)
            .with_callback(move |observer| {
                for (labels, gauge) in &series {
                    observer.observe(gauge.get(), labels);
                }
            })
            .build();
    }

    fn histogram(&self, name: &'static str, help: &'static str, bounds: &[f64], labels: Labels) -> Histogram {
        self.declare(name, "histogram");
        let instrument = self.0.f64_histogram(name).with_description(help).with_boundaries(bounds.to_vec()).build();
        Histogram { instrument, labels: key_values(labels).into() }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_units()
            .without_counter_suffixes()
            .scope_info_enabled(false)
            .without_target_info()
            .build()
            .expect("a fresh registry accepts the exporter's collector");
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let r = Registrar(provider.meter("liverec"), Default::default());
        let stage = |stage: &'static [(&'static str, &'static str)]| {
            r.histogram("liverec_stage_seconds", "Latency of each stage of the event path.", LATENCY_BOUNDS, stage)
        };
        let m = Metrics {
            ingest_events_http: Counter::default(),
            ingest_events_ws: Counter::default(),
            ingest_invalid: Counter::default(),
            ingest_shed: Counter::default(),
            http_rate_limited: Counter::default(),
            process_resident_bytes: Gauge::default(),
            privacy_erased: Counter::default(),
            privacy_skipped: Counter::default(),
            ingest_queued: Gauge::default(),
            eventlog_events: Gauge::default(),
            session_applied: Counter::default(),
            session_duplicates: Counter::default(),
            sessions_active: Gauge::default(),
            sessions_started: Counter::default(),
            sessions_evicted: Counter::default(),
            store_errors: Counter::default(),
            store_write_seconds: r.histogram(
                "liverec_store_write_seconds",
                "Time of one store write pipeline.",
                LATENCY_BOUNDS,
                &[],
            ),
            store_load_seconds: r.histogram(
                "liverec_store_load_seconds",
                "Time of one batch of profile loads.",
                LATENCY_BOUNDS,
                &[],
            ),
            store_write_batch_size: r.histogram(
                "liverec_store_write_batch_size",
                "Writes per store pipeline.",
                SIZE_BOUNDS,
                &[],
            ),
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
            model_batch_size: r.histogram("liverec_model_batch_size", "Requests per model batch.", SIZE_BOUNDS, &[]),
            model_inference_seconds: r.histogram(
                "liverec_model_inference_seconds",
                "Time to run one model batch.",
                LATENCY_BOUNDS,
                &[],
            ),
            model_queued: Gauge::default(),
            event_to_push_seconds: r.histogram(
                "liverec_event_to_push_seconds",
                "From receiving an event to publishing the list that reflects it.",
                LATENCY_BOUNDS,
                &[],
            ),
            stage_receive_seconds: stage(&[("stage", "receive")]),
            stage_apply_seconds: stage(&[("stage", "apply")]),
            stage_model_seconds: stage(&[("stage", "model")]),
            stage_push_seconds: stage(&[("stage", "push")]),
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
            monitor_queued: Gauge::default(),
            trainer_triggers_monitor: Counter::default(),
            trainer_triggers_schedule: Counter::default(),
            trainer_triggers_admin: Counter::default(),
            trainer_coalesced: Counter::default(),
            trainer_runs_rejected: Counter::default(),
            trainer_runs_passed: Counter::default(),
            trainer_runs_failed: Counter::default(),
            trainer_training_seconds: r.histogram(
                "liverec_trainer_training_seconds",
                "Duration of training runs.",
                TRAINING_BOUNDS,
                &[],
            ),
            rollout_canaries: Counter::default(),
            rollout_promotions: Counter::default(),
            rollout_rollbacks: Counter::default(),
            rollout_share: FloatGauge::default(),
            drift_popularity: FloatGauge::default(),
            drift_category: FloatGauge::default(),
            drift_context: FloatGauge::default(),
            ctr_serving: FloatGauge::default(),
            _provider: provider.clone(),
            registry,
            families: Vec::new(),
        };
        m.register(&r);
        Metrics { families: r.1.into_inner(), ..m }
    }
}

impl Metrics {
    /// Declares every counter and gauge to OpenTelemetry (histograms are declared where built).
    fn register(&self, r: &Registrar) {
        r.counter(
            "liverec_ingest_events_total",
            "Events accepted, by source.",
            &[
                (&[("source", "http")], &self.ingest_events_http),
                (&[("source", "websocket")], &self.ingest_events_ws),
                (&[("source", "kafka")], &self.kafka_records),
            ],
        );
        r.counter("liverec_ingest_invalid_events_total", "Events refused as invalid.", &[(&[], &self.ingest_invalid)]);
        r.counter(
            "liverec_ingest_shed_batches_total",
            "Event batches refused with 503 because the pipeline was full.",
            &[(&[], &self.ingest_shed)],
        );
        r.counter(
            "liverec_http_rate_limited_total",
            "Requests refused with 429 by a per-IP or per-credential rate limit.",
            &[(&[], &self.http_rate_limited)],
        );
        r.gauge(
            "liverec_process_resident_memory_bytes",
            "Resident memory of the liverec process.",
            &[(&[], &self.process_resident_bytes)],
        );
        r.counter(
            "liverec_privacy_erased_users_total",
            "Users erased (DELETE /v1/users/{id}).",
            &[(&[], &self.privacy_erased)],
        );
        r.counter(
            "liverec_privacy_skipped_events_total",
            "Events of erased users skipped because they predate the erasure (replays).",
            &[(&[], &self.privacy_skipped)],
        );
        r.gauge(
            "liverec_ingest_queued_batches",
            "Event batches waiting in the in-process bus queues.",
            &[(&[], &self.ingest_queued)],
        );
        r.gauge(
            "liverec_eventlog_events",
            "Events in the retained event log (the training window) of this instance.",
            &[(&[], &self.eventlog_events)],
        );
        r.counter(
            "liverec_session_applied_events_total",
            "Events applied to a user session.",
            &[(&[], &self.session_applied)],
        );
        r.counter(
            "liverec_session_duplicate_events_total",
            "Events skipped because their event_id was already applied.",
            &[(&[], &self.session_duplicates)],
        );
        r.gauge("liverec_sessions_active", "Session actors alive.", &[(&[], &self.sessions_active)]);
        r.counter(
            "liverec_sessions_started_total",
            "Session actors started (new or rebuilt).",
            &[(&[], &self.sessions_started)],
        );
        r.counter(
            "liverec_sessions_evicted_total",
            "Session actors stopped after their idle TTL.",
            &[(&[], &self.sessions_evicted)],
        );
        r.counter("liverec_store_errors_total", "Profile store operations that failed.", &[(&[], &self.store_errors)]);
        r.counter(
            "liverec_push_updates_total",
            "Recommendation lists published to subscribers.",
            &[(&[], &self.push_updates)],
        );
        r.counter(
            "liverec_push_sent_total",
            "Recommendation lists written to a subscriber, by stream kind.",
            &[(&[("kind", "sse")], &self.push_sent_sse), (&[("kind", "websocket")], &self.push_sent_ws)],
        );
        r.counter(
            "liverec_push_dropped_stale_total",
            "Lists a slow subscriber skipped because a newer list replaced them.",
            &[(&[], &self.push_dropped_stale)],
        );
        r.gauge(
            "liverec_stream_subscribers",
            "Open subscriptions, by stream kind.",
            &[(&[("kind", "sse")], &self.subscribers_sse), (&[("kind", "websocket")], &self.subscribers_ws)],
        );
        r.counter(
            "liverec_stream_invalid_messages_total",
            "WebSocket messages refused.",
            &[(&[], &self.ws_invalid_messages)],
        );
        r.counter("liverec_model_requests_total", "Recommendation requests scored.", &[(&[], &self.model_requests)]);
        r.counter(
            "liverec_model_refused_total",
            "Requests refused because the model mailbox was full.",
            &[(&[], &self.model_refused)],
        );
        r.counter("liverec_model_batches_total", "Batches run by the model.", &[(&[], &self.model_batches)]);
        r.gauge(
            "liverec_model_queued_requests",
            "Scoring requests waiting for the next model batch.",
            &[(&[], &self.model_queued)],
        );
        r.counter("liverec_kafka_records_total", "Kafka records consumed.", &[(&[], &self.kafka_records)]);
        r.counter(
            "liverec_kafka_dead_letters_total",
            "Records sent to the dead-letter topic.",
            &[(&[], &self.kafka_dead_letters)],
        );
        r.counter("liverec_kafka_rebalances_total", "Partition revocations handled.", &[(&[], &self.kafka_rebalances)]);
        r.counter(
            "liverec_kafka_pauses_total",
            "Times the consumer paused its partitions because sessions fell behind.",
            &[(&[], &self.kafka_paused)],
        );
        r.counter(
            "liverec_kafka_consumer_restarts_total",
            "Restarts of a failed Kafka consumer by its supervisor.",
            &[(&[], &self.kafka_restarts)],
        );
        r.gauge(
            "liverec_kafka_consumer_lag_records",
            "Records behind the end of the partitions this instance consumes.",
            &[(&[], &self.kafka_lag)],
        );
        r.counter(
            "liverec_kafka_consumer_errors_total",
            "Transient Kafka consumption errors the consumer carried on after.",
            &[(&[], &self.kafka_errors)],
        );
        r.counter(
            "liverec_monitor_impressions_total",
            "Recommendation lists served.",
            &[(&[], &self.monitor_impressions)],
        );
        r.counter(
            "liverec_monitor_clicks_total",
            "Clicks attributed to a served list.",
            &[(&[], &self.monitor_clicks)],
        );
        r.counter(
            "liverec_monitor_conversions_total",
            "Conversions attributed to a served list.",
            &[(&[], &self.monitor_conversions)],
        );
        r.counter(
            "liverec_monitor_breaches_total",
            "Drift or CTR breaches that asked for retraining.",
            &[(&[], &self.monitor_breaches)],
        );
        r.counter(
            "liverec_monitor_refused_total",
            "Reports to the monitor refused because its mailbox was full.",
            &[(&[], &self.monitor_refused)],
        );
        r.gauge(
            "liverec_monitor_queued_reports",
            "Reports sent to the monitor and not yet handled.",
            &[(&[], &self.monitor_queued)],
        );
        r.float_gauge(
            "liverec_monitor_drift_psi",
            "Latest population stability index, by input.",
            &[
                (&[("input", "popularity")], &self.drift_popularity),
                (&[("input", "category")], &self.drift_category),
                (&[("input", "context")], &self.drift_context),
            ],
        );
        r.float_gauge(
            "liverec_monitor_ctr_ratio",
            "Click-through rate of the serving version over the monitor window.",
            &[(&[], &self.ctr_serving)],
        );
        r.counter(
            "liverec_trainer_triggers_total",
            "Retraining requests, by source.",
            &[
                (&[("source", "monitor")], &self.trainer_triggers_monitor),
                (&[("source", "schedule")], &self.trainer_triggers_schedule),
                (&[("source", "admin")], &self.trainer_triggers_admin),
            ],
        );
        r.counter(
            "liverec_trainer_coalesced_total",
            "Retraining requests folded into a run already in progress.",
            &[(&[], &self.trainer_coalesced)],
        );
        r.counter(
            "liverec_trainer_runs_total",
            "Training runs, by outcome of the validation gate.",
            &[
                (&[("outcome", "passed")], &self.trainer_runs_passed),
                (&[("outcome", "rejected")], &self.trainer_runs_rejected),
                (&[("outcome", "failed")], &self.trainer_runs_failed),
            ],
        );
        r.counter("liverec_rollout_canaries_total", "Canaries started.", &[(&[], &self.rollout_canaries)]);
        r.counter(
            "liverec_rollout_promotions_total",
            "Versions promoted to serve everyone (canary or manual).",
            &[(&[], &self.rollout_promotions)],
        );
        r.counter(
            "liverec_rollout_rollbacks_total",
            "Canaries or versions rolled back.",
            &[(&[], &self.rollout_rollbacks)],
        );
        r.float_gauge(
            "liverec_rollout_challenger_share_ratio",
            "Share of users served by a canary or experiment.",
            &[(&[], &self.rollout_share)],
        );
        r.counter(
            "liverec_fanout_received_total",
            "Lists received from other instances for local subscribers.",
            &[(&[], &self.fanout_received)],
        );
    }

    /// Records the latest input-drift scores.
    pub fn set_drift(&self, popularity_psi: f64, category_psi: f64, context_psi: f64) {
        self.drift_popularity.set(popularity_psi);
        self.drift_category.set(category_psi);
        self.drift_context.set(context_psi);
    }

    /// Records the serving version's click-through over the monitor window.
    pub fn set_serving_ctr(&self, ctr: f64) {
        self.ctr_serving.set(ctr);
    }

    /// Records the share of users a challenger serves (0 when none).
    pub fn set_challenger_share(&self, share: f64) {
        self.rollout_share.set(share);
    }

    /// Every metric family liverec declares, with its Prometheus type. A family shows in
    /// [`Metrics::render`] once it has a value: counters and gauges at once, a histogram (or a
    /// histogram's labelled series) from its first observation.
    pub fn families(&self) -> &[(&'static str, &'static str)] {
        &self.families
    }

    /// The Prometheus text exposition of every metric (an OpenTelemetry collection).
    pub fn render(&self) -> String {
        self.process_resident_bytes.set(resident_bytes());
        let families = self.registry.gather();
        prometheus::TextEncoder::new().encode_to_string(&families).unwrap_or_else(|error| {
            tracing::error!(error = %error, "metrics not rendered");
            String::new()
        })
    }
}

/// Resident set size of this process in bytes (Linux `/proc/self/statm`; 0 elsewhere).
fn resident_bytes() -> i64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<i64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as i64
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
        assert!(!text.contains("stage=\"model\""), "a series shows from its first observation");
        assert!(m.families().contains(&("liverec_stage_seconds", "histogram")));
        assert!(m.families().contains(&("liverec_ingest_events_total", "counter")));
    }

    /// The exposition of every family, each series with a value of its own, byte for byte as
    /// `exposition.golden` records it (resident memory, read from /proc, left out): declaring a
    /// metric differently must not change what Prometheus scrapes.
    #[test]
    fn exposition_matches_the_recorded_one() {
        let m = Metrics::default();
        m.ingest_events_http.add(1);
        m.ingest_events_ws.add(2);
        m.ingest_invalid.add(3);
        m.ingest_shed.add(4);
        m.http_rate_limited.add(5);
        m.process_resident_bytes.set(6);
        m.privacy_erased.add(7);
        m.privacy_skipped.add(8);
        m.ingest_queued.set(9);
        m.eventlog_events.set(10);
        m.session_applied.add(11);
        m.session_duplicates.add(12);
        m.sessions_active.set(13);
        m.sessions_started.add(14);
        m.sessions_evicted.add(15);
        m.store_errors.add(16);
        m.store_write_seconds.observe(17.0 / 1000.0);
        m.store_load_seconds.observe(18.0 / 1000.0);
        m.store_write_batch_size.observe(19.0 / 1000.0);
        m.push_updates.add(20);
        m.push_sent_sse.add(21);
        m.push_sent_ws.add(22);
        m.push_dropped_stale.add(23);
        m.subscribers_sse.set(24);
        m.subscribers_ws.set(25);
        m.ws_invalid_messages.add(26);
        m.model_requests.add(27);
        m.model_refused.add(28);
        m.model_batches.add(29);
        m.model_batch_size.observe(30.0 / 1000.0);
        m.model_inference_seconds.observe(31.0 / 1000.0);
        m.model_queued.set(32);
        m.event_to_push_seconds.observe(33.0 / 1000.0);
        m.stage_receive_seconds.observe(34.0 / 1000.0);
        m.stage_apply_seconds.observe(35.0 / 1000.0);
        m.stage_model_seconds.observe(36.0 / 1000.0);
        m.stage_push_seconds.observe(37.0 / 1000.0);
        m.kafka_records.add(38);
        m.kafka_dead_letters.add(39);
        m.kafka_rebalances.add(40);
        m.kafka_paused.add(41);
        m.kafka_restarts.add(42);
        m.kafka_errors.add(43);
        m.kafka_lag.set(44);
        m.fanout_received.add(45);
        m.monitor_impressions.add(46);
        m.monitor_clicks.add(47);
        m.monitor_conversions.add(48);
        m.monitor_breaches.add(49);
        m.monitor_refused.add(50);
        m.monitor_queued.set(51);
        m.trainer_triggers_monitor.add(52);
        m.trainer_triggers_schedule.add(53);
        m.trainer_triggers_admin.add(54);
        m.trainer_coalesced.add(55);
        m.trainer_runs_rejected.add(56);
        m.trainer_runs_passed.add(57);
        m.trainer_runs_failed.add(58);
        m.trainer_training_seconds.observe(59.0 / 1000.0);
        m.rollout_canaries.add(60);
        m.rollout_promotions.add(61);
        m.rollout_rollbacks.add(62);
        m.rollout_share.set(63.5);
        m.drift_popularity.set(64.5);
        m.drift_category.set(65.5);
        m.drift_context.set(66.5);
        m.ctr_serving.set(67.5);
        let text: String = m
            .render()
            .lines()
            .filter(|line| !line.starts_with("liverec_process_resident_memory_bytes "))
            .map(|line| format!("{line}\n"))
            .collect();
        // The order families were declared in is not part of the exposition.
        let mut families = m.families().to_vec();
        families.sort();
        let families: String = families.iter().map(|(name, kind)| format!("# family {name} {kind}\n")).collect();
        let got = format!("{families}{text}");
        if let Ok(path) = std::env::var("LIVEREC_WRITE_GOLDEN") {
            std::fs::write(path, &got).expect("golden file written");
        }
        assert_eq!(got, include_str!("telemetry/exposition.golden"));
    }
}
