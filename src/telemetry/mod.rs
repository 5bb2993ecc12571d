//! Every metric liverec exports, declared in one place, and (in `telemetry/logging.rs`) the logging and
//! trace set-up.
//!
//! Metrics go through OpenTelemetry: one `SdkMeterProvider` per server whose reader is the
//! Prometheus exporter, rendered in the Prometheus text format at `GET /metrics`. Counters and
//! gauges are plain atomics on the hot paths, observed by OpenTelemetry instruments (observable
//! counters and gauges) when a scrape collects them, so counting costs one relaxed atomic add;
//! histograms are OpenTelemetry histograms with explicit buckets. Names follow
//! `liverec_<subsystem>_<name>_<unit>[_total]`, given whole (the exporter adds no suffix); labels
//! are low cardinality (a source, a stream kind, a stage), never a user or item id. Each metric is
//! declared once, in [`Metrics::default`]: the registrar creates the instrument, registers it
//! and hands it back into its field.

pub mod allocator;
mod instruments;
mod logging;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;

pub use instruments::{
    Counter, FloatCounter, FloatGauge, Gauge, Histogram, LATENCY_BOUNDS, SIZE_BOUNDS, TRAINING_BOUNDS,
};
use instruments::{Family, Registrar};
pub use logging::{
    continue_trace, init, init_logging, record_trace_id, span, trace_headers, TelemetryError, TelemetryGuard,
};

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
    /// Requests refused (and their connections closed) over a per-IP or total connection cap.
    pub http_connections_refused: Counter,
    /// Requests answered 408 because their body did not arrive within `server.body_timeout_secs`.
    pub http_body_timeouts: Counter,
    /// Resident memory of the process, read from /proc at each scrape (0 where unavailable).
    pub process_resident_bytes: Gauge,
    /// CPU time of the process, user and system, read from /proc at each scrape (0 where
    /// unavailable): load tests divide its growth by the events applied (CPU per event).
    pub process_cpu_seconds: FloatCounter,
    /// jemalloc's account of the heap, read at each scrape (see [`allocator`]): bytes allocated,
    /// in active pages, of its own metadata, resident, mapped, and retained (mapped, purged).
    allocator_allocated_bytes: Gauge,
    allocator_active_bytes: Gauge,
    allocator_metadata_bytes: Gauge,
    allocator_resident_bytes: Gauge,
    allocator_mapped_bytes: Gauge,
    allocator_retained_bytes: Gauge,
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
    /// Events re-sent to a fresh session because the one they reached stopped unanswered.
    pub session_apply_retries: Counter,
    pub session_duplicates: Counter,
    pub sessions_active: Gauge,
    pub sessions_started: Counter,
    pub sessions_evicted: Counter,
    /// Sessions stopped early because `session.max_active` were running.
    pub sessions_capped: Counter,
    /// Starts that waited their longest (a second) for a session to stop at the cap and went
    /// ahead without: a stop did not come (see `SessionRegistry::room_for_a_session`).
    pub sessions_start_waits_expired: Counter,
    /// Profiles and erasure tombstones the embedded (memory) store holds, and profiles it
    /// dropped (over `store.memory_max_profiles`, or idle for `store.memory_idle_ttl_secs`).
    pub store_memory_profiles: Gauge,
    pub store_memory_tombstones: Gauge,
    pub store_memory_evicted: Counter,
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
    /// Scored lists a session dropped because newer events arrived while they were scored (one
    /// new request covers those), and stale ones pushed anyway because they came late
    /// (`session.late_list_ms`).
    pub lists_stale: Counter,
    pub lists_late: Counter,
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
    /// Candidates of two-stage retrieval, by source (`ann`, `cooccurrence`, `popular`, `cold`).
    pub model_candidates_ann: Counter,
    pub model_candidates_cooccurrence: Counter,
    pub model_candidates_popular: Counter,
    pub model_candidates_cold: Counter,
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
    /// Partitions given up in those revocations: all of an instance's at each rebalance with an
    /// eager assignment, only the ones that move with a cooperative one.
    pub kafka_partitions_revoked: Counter,
    pub kafka_paused: Counter,
    pub kafka_restarts: Counter,
    /// Transient consumption errors the consumer carried on after.
    pub kafka_errors: Counter,
    /// Records behind the end of the partitions this instance consumes (from librdkafka statistics).
    pub kafka_lag: Gauge,
    /// Age of the oldest consumed batch not yet durable (0 when none waits), and 1 while that age
    /// is past the stall threshold (`/readyz` reports it).
    pub kafka_oldest_batch_seconds: Gauge,
    pub kafka_stalled: Gauge,
    /// 1 while the consumer group refuses this instance (its members share partitions another
    /// way: `kafka.assignment` differs), else 0.
    pub kafka_group_refused: Gauge,
    /// Records of the Kafka items topic read into the catalogue, and restarts of its consumer.
    pub kafka_items_records: Counter,
    pub kafka_items_restarts: Counter,
    /// 1 while the instance reads the items topic at start (not ready), else 0.
    pub catalog_loading: Gauge,
    /// Lists received from other instances and forwarded to local subscribers.
    pub fanout_received: Counter,
    /// Lists neither stored nor published because no instance watched their user.
    pub lists_unwatched: Counter,
    /// Served lists, attributed clicks and conversions, monitor breaches, reports refused.
    pub monitor_impressions: Counter,
    pub monitor_clicks: Counter,
    pub monitor_conversions: Counter,
    pub monitor_breaches: Counter,
    pub monitor_refused: Counter,
    /// Reports left for the monitor and not yet counted (its inbox depth).
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
    /// The loop across instances: 1 while this instance holds the leader's lease; the epoch
    /// (fencing token) of the leader last known; control records applied here and records of an
    /// older leader ignored; triggers a follower ignored.
    pub cluster_leader: Gauge,
    pub cluster_epoch: Gauge,
    pub cluster_control_applied: Counter,
    pub cluster_control_fenced: Counter,
    pub cluster_triggers_ignored: Counter,
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
        let r = Registrar::new(provider.meter("liverec"));
        let ingest_events = Family::new("liverec_ingest_events_total", "Events accepted, by source.");
        let push_sent =
            Family::new("liverec_push_sent_total", "Recommendation lists written to a subscriber, by stream kind.");
        let subscribers = Family::new("liverec_stream_subscribers", "Open subscriptions, by stream kind.");
        let stage = Family::new("liverec_stage_seconds", "Latency of each stage of the event path.");
        let triggers = Family::new("liverec_trainer_triggers_total", "Retraining requests, by source.");
        let runs = Family::new("liverec_trainer_runs_total", "Training runs, by outcome of the validation gate.");
        let drift = Family::new("liverec_monitor_drift_psi", "Latest population stability index, by input.");
        let candidates = Family::new(
            "liverec_model_candidates_total",
            "Candidates gathered by two-stage retrieval (large catalogues), by source.",
        );
        let m = Metrics {
            ingest_events_http: r.counter_in(ingest_events, &[("source", "http")]),
            ingest_events_ws: r.counter_in(ingest_events, &[("source", "websocket")]),
            ingest_invalid: r.counter("liverec_ingest_invalid_events_total", "Events refused as invalid."),
            ingest_shed: r.counter(
                "liverec_ingest_shed_batches_total",
                "Event batches refused with 503 because the pipeline was full.",
            ),
            http_rate_limited: r.counter(
                "liverec_http_rate_limited_total",
                "Requests refused with 429 by a per-IP or per-credential rate limit.",
            ),
            http_connections_refused: r.counter(
                "liverec_http_connections_refused_total",
                "Requests refused, and their connections closed, over a per-IP or total connection cap.",
            ),
            http_body_timeouts: r.counter(
                "liverec_http_body_timeouts_total",
                "Requests answered 408 because their body did not arrive in time.",
            ),
            process_resident_bytes: r
                .gauge("liverec_process_resident_memory_bytes", "Resident memory of the liverec process."),
            process_cpu_seconds: r.float_counter(
                "liverec_process_cpu_seconds_total",
                "CPU time of the liverec process, user and system, in seconds.",
            ),
            allocator_allocated_bytes: r.gauge(
                "liverec_allocator_allocated_bytes",
                "Bytes allocated through jemalloc and not yet freed (stats.allocated).",
            ),
            allocator_active_bytes: r.gauge(
                "liverec_allocator_active_bytes",
                "Bytes in jemalloc's pages that hold allocations, their free space included (stats.active).",
            ),
            allocator_metadata_bytes: r.gauge(
                "liverec_allocator_metadata_bytes",
                "Bytes of jemalloc's own bookkeeping (stats.metadata).",
            ),
            allocator_resident_bytes: r.gauge(
                "liverec_allocator_resident_bytes",
                "Bytes of jemalloc's resident pages, freed pages not yet purged included (stats.resident).",
            ),
            allocator_mapped_bytes: r.gauge(
                "liverec_allocator_mapped_bytes",
                "Bytes in the extents jemalloc has mapped and in use (stats.mapped).",
            ),
            allocator_retained_bytes: r.gauge(
                "liverec_allocator_retained_bytes",
                "Bytes of virtual memory jemalloc keeps mapped but purged, not resident (stats.retained).",
            ),
            privacy_erased: r.counter("liverec_privacy_erased_users_total", "Users erased (DELETE /v1/users/{id})."),
            privacy_skipped: r.counter(
                "liverec_privacy_skipped_events_total",
                "Events of erased users skipped because they predate the erasure (replays).",
            ),
            ingest_queued: r
                .gauge("liverec_ingest_queued_batches", "Event batches waiting in the in-process bus queues."),
            eventlog_events: r.gauge(
                "liverec_eventlog_events",
                "Events in the retained event log (the training window) of this instance.",
            ),
            session_applied: r.counter("liverec_session_applied_events_total", "Events applied to a user session."),
            session_apply_retries: r.counter(
                "liverec_session_apply_retries_total",
                "Batches re-sent to a fresh session because the one they reached stopped before answering.",
            ),
            session_duplicates: r.counter(
                "liverec_session_duplicate_events_total",
                "Events skipped because their event_id was already applied.",
            ),
            sessions_active: r.gauge("liverec_sessions_active", "Session actors alive."),
            sessions_started: r.counter("liverec_sessions_started_total", "Session actors started (new or rebuilt)."),
            sessions_evicted: r
                .counter("liverec_sessions_evicted_total", "Session actors stopped after their idle TTL."),
            sessions_capped: r.counter(
                "liverec_sessions_capped_total",
                "Session actors stopped early because session.max_active sessions were running.",
            ),
            sessions_start_waits_expired: r.counter(
                "liverec_sessions_start_waits_expired_total",
                "Session starts that waited a second at session.max_active for a session to stop and went ahead without.",
            ),
            store_memory_profiles: r
                .gauge("liverec_store_memory_profiles", "Profiles held by the embedded (memory) profile store."),
            store_memory_tombstones: r.gauge(
                "liverec_store_memory_tombstones",
                "Erasure tombstones held by the embedded (memory) profile store.",
            ),
            store_memory_evicted: r.counter(
                "liverec_store_memory_profiles_evicted_total",
                "Profiles the embedded store dropped: least recently used over its cap, or idle past its TTL.",
            ),
            store_errors: r.counter("liverec_store_errors_total", "Profile store operations that failed."),
            store_write_seconds: r.histogram(
                "liverec_store_write_seconds",
                "Time of one store write pipeline.",
                LATENCY_BOUNDS,
            ),
            store_load_seconds: r.histogram(
                "liverec_store_load_seconds",
                "Time of one batch of profile loads.",
                LATENCY_BOUNDS,
            ),
            store_write_batch_size: r.histogram(
                "liverec_store_write_batch_size",
                "Writes per store pipeline.",
                SIZE_BOUNDS,
            ),
            push_updates: r.counter("liverec_push_updates_total", "Recommendation lists published to subscribers."),
            push_sent_sse: r.counter_in(push_sent, &[("kind", "sse")]),
            push_sent_ws: r.counter_in(push_sent, &[("kind", "websocket")]),
            push_dropped_stale: r.counter(
                "liverec_push_dropped_stale_total",
                "Lists a slow subscriber skipped because a newer list replaced them.",
            ),
            lists_stale: r.counter(
                "liverec_session_lists_stale_total",
                "Scored lists dropped because newer events arrived while they were scored (one new request covers them).",
            ),
            lists_late: r.counter(
                "liverec_session_lists_late_total",
                "Stale scored lists pushed anyway because their answer took session.late_list_ms or more.",
            ),
            subscribers_sse: r.gauge_in(subscribers, &[("kind", "sse")]),
            subscribers_ws: r.gauge_in(subscribers, &[("kind", "websocket")]),
            ws_invalid_messages: r.counter("liverec_stream_invalid_messages_total", "WebSocket messages refused."),
            model_requests: r.counter("liverec_model_requests_total", "Recommendation requests scored."),
            model_refused: r
                .counter("liverec_model_refused_total", "Requests refused because the model mailbox was full."),
            model_batches: r.counter("liverec_model_batches_total", "Batches run by the model."),
            model_batch_size: r.histogram("liverec_model_batch_size", "Requests per model batch.", SIZE_BOUNDS),
            model_inference_seconds: r.histogram(
                "liverec_model_inference_seconds",
                "Time to run one model batch.",
                LATENCY_BOUNDS,
            ),
            model_queued: r
                .gauge("liverec_model_queued_requests", "Scoring requests waiting for the next model batch."),
            model_candidates_ann: r.counter_in(candidates, &[("source", "ann")]),
            model_candidates_cooccurrence: r.counter_in(candidates, &[("source", "cooccurrence")]),
            model_candidates_popular: r.counter_in(candidates, &[("source", "popular")]),
            model_candidates_cold: r.counter_in(candidates, &[("source", "cold")]),
            event_to_push_seconds: r.histogram(
                "liverec_event_to_push_seconds",
                "From receiving an event to publishing the list that reflects it.",
                LATENCY_BOUNDS,
            ),
            stage_receive_seconds: r.histogram_in(stage, LATENCY_BOUNDS, &[("stage", "receive")]),
            stage_apply_seconds: r.histogram_in(stage, LATENCY_BOUNDS, &[("stage", "apply")]),
            stage_model_seconds: r.histogram_in(stage, LATENCY_BOUNDS, &[("stage", "model")]),
            stage_push_seconds: r.histogram_in(stage, LATENCY_BOUNDS, &[("stage", "push")]),
            kafka_records: r.counter("liverec_kafka_records_total", "Kafka records consumed."),
            kafka_dead_letters: r.counter("liverec_kafka_dead_letters_total", "Records sent to the dead-letter topic."),
            kafka_rebalances: r.counter("liverec_kafka_rebalances_total", "Partition revocations handled."),
            kafka_partitions_revoked: r.counter(
                "liverec_kafka_partitions_revoked_total",
                "Partitions given up in revocations (with a cooperative assignment, only those that moved).",
            ),
            kafka_paused: r.counter(
                "liverec_kafka_pauses_total",
                "Times the consumer paused its partitions because sessions fell behind.",
            ),
            kafka_restarts: r.counter(
                "liverec_kafka_consumer_restarts_total",
                "Restarts of a failed Kafka consumer by its supervisor.",
            ),
            kafka_errors: r.counter(
                "liverec_kafka_consumer_errors_total",
                "Transient Kafka consumption errors the consumer carried on after.",
            ),
            kafka_lag: r.gauge(
                "liverec_kafka_consumer_lag_records",
                "Records behind the end of the partitions this instance consumes.",
            ),
            kafka_oldest_batch_seconds: r.gauge(
                "liverec_kafka_oldest_unfinished_batch_seconds",
                "Age of the oldest consumed batch whose events are not yet applied and durable (0: none).",
            ),
            kafka_group_refused: r.gauge(
                "liverec_kafka_group_refused",
                "1 while the consumer group refuses this instance (its members use another kafka.assignment, or the brokers refuse kafka.session_timeout_ms), else 0.",
            ),
            kafka_stalled: r.gauge(
                "liverec_kafka_ingest_stalled",
                "1 while the oldest unfinished batch is older than the stall threshold, else 0.",
            ),
            kafka_items_records: r
                .counter("liverec_kafka_items_records_total", "Records of the items topic read into the catalogue."),
            kafka_items_restarts: r.counter(
                "liverec_kafka_items_consumer_restarts_total",
                "Restarts of a failed items topic consumer by its supervisor.",
            ),
            catalog_loading: r.gauge(
                "liverec_catalog_loading",
                "1 while the instance reads the items topic at start and is not ready, else 0.",
            ),
            fanout_received: r
                .counter("liverec_fanout_received_total", "Lists received from other instances for local subscribers."),
            lists_unwatched: r.counter(
                "liverec_store_lists_unwatched_total",
                "Lists neither stored nor published because no instance watched their user.",
            ),
            monitor_impressions: r.counter("liverec_monitor_impressions_total", "Recommendation lists served."),
            monitor_clicks: r.counter("liverec_monitor_clicks_total", "Clicks attributed to a served list."),
            monitor_conversions: r
                .counter("liverec_monitor_conversions_total", "Conversions attributed to a served list."),
            monitor_breaches: r
                .counter("liverec_monitor_breaches_total", "Drift or CTR breaches that asked for retraining."),
            monitor_refused: r.counter(
                "liverec_monitor_refused_total",
                "Reports to the monitor refused because its inbox was full (monitor.mailbox_capacity).",
            ),
            monitor_queued: r
                .gauge("liverec_monitor_queued_reports", "Reports left for the monitor and not yet counted."),
            trainer_triggers_monitor: r.counter_in(triggers, &[("source", "monitor")]),
            trainer_triggers_schedule: r.counter_in(triggers, &[("source", "schedule")]),
            trainer_triggers_admin: r.counter_in(triggers, &[("source", "admin")]),
            trainer_coalesced: r.counter(
                "liverec_trainer_coalesced_total",
                "Retraining requests folded into a run already in progress.",
            ),
            trainer_runs_rejected: r.counter_in(runs, &[("outcome", "rejected")]),
            trainer_runs_passed: r.counter_in(runs, &[("outcome", "passed")]),
            trainer_runs_failed: r.counter_in(runs, &[("outcome", "failed")]),
            trainer_training_seconds: r.histogram(
                "liverec_trainer_training_seconds",
                "Duration of training runs.",
                TRAINING_BOUNDS,
            ),
            rollout_canaries: r.counter("liverec_rollout_canaries_total", "Canaries started."),
            rollout_promotions: r
                .counter("liverec_rollout_promotions_total", "Versions promoted to serve everyone (canary or manual)."),
            rollout_rollbacks: r.counter("liverec_rollout_rollbacks_total", "Canaries or versions rolled back."),
            rollout_share: r.float_gauge(
                "liverec_rollout_challenger_share_ratio",
                "Share of users served by a canary or experiment.",
            ),
            cluster_leader: r.gauge(
                "liverec_cluster_leader",
                "1 while this instance holds the loop's lease (trains and judges canaries), else 0.",
            ),
            cluster_epoch: r.gauge(
                "liverec_cluster_epoch",
                "Epoch (fencing token) of the loop's leader as this instance last read it.",
            ),
            cluster_control_applied: r.counter(
                "liverec_cluster_control_applied_total",
                "Desired serving states read from the control topic and applied here.",
            ),
            cluster_control_fenced: r.counter(
                "liverec_cluster_control_fenced_total",
                "Control records ignored because an older leader published them (an epoch below one seen).",
            ),
            cluster_triggers_ignored: r.counter(
                "liverec_cluster_triggers_ignored_total",
                "Retraining triggers (monitor, schedule) a follower ignored: the leader alone trains.",
            ),
            drift_popularity: r.float_gauge_in(drift, &[("input", "popularity")]),
            drift_category: r.float_gauge_in(drift, &[("input", "category")]),
            drift_context: r.float_gauge_in(drift, &[("input", "context")]),
            ctr_serving: r.float_gauge(
                "liverec_monitor_ctr_ratio",
                "Click-through rate of the serving version over the monitor window.",
            ),
            _provider: provider.clone(),
            registry,
            families: Vec::new(),
        };
        // Kafka records are ingested events too: the one counter reports in both families.
        r.counter_also_in(ingest_events, &[("source", "kafka")], &m.kafka_records);
        Metrics { families: r.finish(), ..m }
    }
}

impl Metrics {
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
        self.process_cpu_seconds.set(cpu_seconds().unwrap_or(0.0));
        let heap = allocator::read().unwrap_or_default();
        let bytes = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.allocator_allocated_bytes.set(bytes(heap.allocated));
        self.allocator_active_bytes.set(bytes(heap.active));
        self.allocator_metadata_bytes.set(bytes(heap.metadata));
        self.allocator_resident_bytes.set(bytes(heap.resident));
        self.allocator_mapped_bytes.set(bytes(heap.mapped));
        self.allocator_retained_bytes.set(bytes(heap.retained));
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

/// CPU time of this process, user and system, in seconds (Linux `/proc/self/stat`).
fn cpu_seconds() -> Option<f64> {
    process_cpu_seconds("self")
}

/// CPU time of process `pid` (a number, or `self`), user and system, in seconds (Linux
/// `/proc/PID/stat`; the load tool reads the server's with it).
pub fn process_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    cpu_seconds_of_stat(&stat, ticks as f64)
}

/// `utime + stime` of a `/proc/PID/stat` line, in seconds. The process name (field 2) is in
/// parentheses and may hold spaces and parentheses itself, so fields are counted after the last
/// `)`: the state is the first there, utime (field 14) the 12th, stime (15) the 13th.
fn cpu_seconds_of_stat(stat: &str, ticks_per_sec: f64) -> Option<f64> {
    if ticks_per_sec <= 0.0 {
        return None;
    }
    let (_, fields) = stat.rsplit_once(')')?;
    let mut fields = fields.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_sec)
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

    #[test]
    fn cpu_time_is_read_after_the_process_name_and_exported() {
        let stat = "4242 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 130 0 0 20 0 1";
        assert_eq!(cpu_seconds_of_stat(stat, 100.0), Some(3.8));
        assert_eq!(cpu_seconds_of_stat(stat, 0.0), None);
        assert_eq!(cpu_seconds_of_stat("4242 (truncated) S 1", 100.0), None);
        // This process has used some CPU by now (at least one clock tick, spent here), and a
        // scrape reports it.
        let started = cpu_seconds().expect("/proc/self/stat is readable");
        while cpu_seconds().expect("readable") <= started {
            std::hint::black_box(());
        }
        let m = Metrics::default();
        let text = m.render();
        let line = text.lines().find(|l| l.starts_with("liverec_process_cpu_seconds_total ")).expect("exported");
        let secs: f64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number");
        assert!(secs > 0.0, "{line}");
    }

    /// The exposition of every family, each series with a value of its own, byte for byte as
    /// `exposition.golden` records it (resident memory, CPU time and the allocator's figures, read at each
    /// scrape, left out): declaring a
    /// metric differently must not change what Prometheus scrapes. After a deliberate change,
    /// `LIVEREC_WRITE_GOLDEN=<path of exposition.golden>` rewrites the record.
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
        m.sessions_capped.add(15);
        m.sessions_start_waits_expired.add(15);
        m.store_memory_profiles.set(16);
        m.store_memory_tombstones.set(16);
        m.store_memory_evicted.add(16);
        m.store_errors.add(16);
        m.store_write_seconds.observe(17.0 / 1000.0);
        m.store_load_seconds.observe(18.0 / 1000.0);
        m.store_write_batch_size.observe(19.0 / 1000.0);
        m.push_updates.add(20);
        m.push_sent_sse.add(21);
        m.push_sent_ws.add(22);
        m.push_dropped_stale.add(23);
        m.lists_stale.add(231);
        m.lists_late.add(232);
        m.subscribers_sse.set(24);
        m.subscribers_ws.set(25);
        m.ws_invalid_messages.add(26);
        m.model_requests.add(27);
        m.model_refused.add(28);
        m.model_batches.add(29);
        m.model_batch_size.observe(30.0 / 1000.0);
        m.model_inference_seconds.observe(31.0 / 1000.0);
        m.model_queued.set(32);
        m.model_candidates_ann.add(32);
        m.model_candidates_cooccurrence.add(32);
        m.model_candidates_popular.add(32);
        m.model_candidates_cold.add(32);
        m.event_to_push_seconds.observe(33.0 / 1000.0);
        m.stage_receive_seconds.observe(34.0 / 1000.0);
        m.stage_apply_seconds.observe(35.0 / 1000.0);
        m.stage_model_seconds.observe(36.0 / 1000.0);
        m.stage_push_seconds.observe(37.0 / 1000.0);
        m.kafka_records.add(38);
        m.kafka_dead_letters.add(39);
        m.kafka_rebalances.add(40);
        m.kafka_partitions_revoked.add(40);
        m.kafka_paused.add(41);
        m.kafka_restarts.add(42);
        m.kafka_errors.add(43);
        m.kafka_lag.set(44);
        m.kafka_oldest_batch_seconds.set(44);
        m.kafka_stalled.set(1);
        m.kafka_group_refused.set(1);
        m.kafka_items_records.add(44);
        m.kafka_items_restarts.add(44);
        m.catalog_loading.set(1);
        m.session_apply_retries.add(11);
        m.fanout_received.add(45);
        m.lists_unwatched.add(45);
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
        m.cluster_leader.set(1);
        m.cluster_epoch.set(63);
        m.cluster_control_applied.add(63);
        m.cluster_control_fenced.add(63);
        m.cluster_triggers_ignored.add(63);
        m.drift_popularity.set(64.5);
        m.drift_category.set(65.5);
        m.drift_context.set(66.5);
        m.ctr_serving.set(67.5);
        let text: String = m
            .render()
            .lines()
            .filter(|line| {
                !line.starts_with("liverec_process_resident_memory_bytes ")
                    && !line.starts_with("liverec_process_cpu_seconds_total ")
                    && !line.starts_with("liverec_allocator_")
            })
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
        assert_eq!(got, include_str!("exposition.golden"));
    }
}
