//! The report of a run, assembled from the shared state and what each step measured.

use hdrhistogram::Histogram;

use super::load::Load;
use super::server::{cpu_secs_per_event, loadavg, Counters, Snapshot, UnderLoad};
use super::state::{State, SubKind, FAILED};
use super::subscribers::Setup;
use crate::limits::NofileLimit;
use crate::report::{self, Quantiles, Report, ServerSide, ServerWork, SimSummary, SubscriberSummary, TimelineSecond};
use crate::scenario::Scenario;

/// What the steps of a run measured outside the shared state.
pub(super) struct Measured {
    pub(super) target: String,
    pub(super) started_at_ms: u64,
    pub(super) nofile: NofileLimit,
    /// The host's load average before the run.
    pub(super) loadavg_start: String,
    /// The server's counters before the subscribers opened, and after the run.
    pub(super) before: Counters,
    pub(super) after: Counters,
    /// The server's resident memory before the subscribers opened.
    pub(super) rss_before: Option<u64>,
    pub(super) under_load: UnderLoad,
    pub(super) snapshots: Snapshots,
    pub(super) setup: Setup,
    pub(super) load: Load,
    pub(super) sim: Option<SimSummary>,
}

/// The server's counters and CPU time over the load and the settle after it.
pub(super) struct Snapshots {
    pub(super) load_start: Snapshot,
    /// One a second from the start of the load, and one at its end.
    pub(super) per_second: Vec<Snapshot>,
    pub(super) load_end: Snapshot,
    /// After the settle (the server has caught up, or `settle_secs` passed).
    pub(super) settled: Snapshot,
    /// Seconds after the load until the server had received every accepted event.
    pub(super) caught_up_secs: Option<f64>,
}

/// What the server did with the events, from its counters and CPU time: from the start of the
/// load to the end of the settle, so the work on the last events is counted.
fn server_work(snapshots: &Snapshots, events_accepted: u64, timeline: &[TimelineSecond]) -> ServerWork {
    let Snapshots { load_start, per_second, load_end, settled, caught_up_secs } = snapshots;
    let events_applied = settled.applied_since(load_start);
    let cpu_secs = settled.cpu_since(load_start);
    // Without the server's counter, the events it accepted stand in for those it applied.
    let events = events_applied.filter(|&n| n > 0.0).unwrap_or(events_accepted as f64);
    let lags = per_second.iter().chain([load_end, settled]).filter_map(|s| s.kafka_lag);
    ServerWork {
        events_applied,
        applied_events_per_s: load_end
            .applied_since(load_start)
            .zip(load_end.secs_since(load_start))
            .filter(|&(_, secs)| secs > 0.0)
            .map(|(n, secs)| n / secs),
        caught_up_secs: *caught_up_secs,
        backlog_max_events: timeline.iter().filter_map(|s| s.backlog_events).reduce(f64::max),
        kafka_lag_max_records: lags.reduce(f64::max),
        kafka_lag_end_of_load_records: load_end.kafka_lag,
        kafka_lag_settled_records: settled.kafka_lag,
        cpu_secs,
        cpu_cores: cpu_secs.zip(settled.secs_since(load_start)).filter(|&(_, s)| s > 0.0).map(|(c, s)| c / s),
        cpu_secs_per_event: cpu_secs.and_then(|cpu| cpu_secs_per_event(cpu, events)),
    }
}

/// The report of the run.
pub(super) fn report(scenario: &Scenario, s: &mut State, m: Measured) -> Report {
    if let Some(sim) = &m.sim {
        s.errors.sim = sim.errors;
    }
    let accepted = s.sent.iter().flatten().filter(|&&at| at != FAILED).count() as u64;
    let requests = s.requests.len();
    let Load { load_secs, events_sent, .. } = m.load;
    let timeline = timeline(scenario, s, &m.load, &m.snapshots.per_second);
    let work = server_work(&m.snapshots, accepted, &timeline);
    Report {
        scenario: scenario.clone(),
        target: m.target,
        started_at_unix_ms: m.started_at_ms,
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
            opened: m.setup.opened,
            confirmed: s.confirmed,
            expected: m.setup.expected_confirmations,
            closed_early: s.subscribers.iter().filter(|sub| sub.closed).count(),
            setup_secs: m.setup.connect_secs,
            source_addresses: m.setup.source_addresses,
            quiet_after_secs: m.setup.quiet_after_secs,
        },
        server: ServerSide {
            stale_lists_skipped: m.after.stale_lists_skipped - m.before.stale_lists_skipped,
            model_requests_refused: m.after.model_refused - m.before.model_refused,
            trainer_runs: m.after.trainer_runs - m.before.trainer_runs,
            websocket_subscriptions: m.under_load.websocket_subscriptions,
            sse_subscriptions: m.under_load.sse_subscriptions,
            rss_kib_before: m.rss_before,
            rss_kib_loaded: m.under_load.rss_kib,
            work,
        },
        sim: m.sim,
        host: report::Host {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            loadavg_start: m.loadavg_start,
            loadavg_end: loadavg(),
            nofile_soft: m.nofile.soft,
            nofile_hard: m.nofile.hard,
        },
        timeline,
        definitions: report::definitions(scenario.late_ms, scenario.settle_secs),
    }
}

/// One row per second of the load (the last partial second included).
fn timeline(scenario: &Scenario, s: &State, load: &Load, samples: &[Snapshot]) -> Vec<TimelineSecond> {
    let seconds = (scenario.duration_secs.ceil() as usize).max(1);
    let mut sent_so_far = 0;
    (0..seconds)
        .map(|t| {
            sent_so_far += load.sent_by_second.get(t).copied().unwrap_or(0);
            let e2p = s.e2p_by_second.get(t).filter(|h| !h.is_empty());
            let req = s.requests_by_second.get(t).filter(|h| !h.is_empty());
            // Second t lies between the snapshots t and t + 1.
            let (from, to) = (samples.get(t), samples.get(t + 1));
            let between = |f: fn(&Snapshot, &Snapshot) -> Option<f64>| from.zip(to).and_then(|(a, b)| f(b, a));
            let q = |h: Option<&Histogram<u64>>, p: f64| h.map(|h| h.value_at_quantile(p) as f64 / 1000.0);
            TimelineSecond {
                t: t as u64,
                target_events_per_s: scenario.rate_at(t as f64 + 0.5),
                events_sent: load.sent_by_second.get(t).copied().unwrap_or(0),
                requests: req.map_or(0, |h| h.len()),
                pushes: s.pushes_by_second.get(t).copied().unwrap_or(0),
                event_to_push_p50_ms: q(e2p, 0.5),
                event_to_push_p99_ms: q(e2p, 0.99),
                request_p50_ms: q(req, 0.5),
                request_p99_ms: q(req, 0.99),
                server_rss_kib: load.rss_by_second.get(t).copied().flatten(),
                server_applied_events: between(Snapshot::applied_since),
                server_cpu_cores: between(|b, a| b.cpu_since(a).zip(b.secs_since(a)).map(|(c, s)| c / s)),
                kafka_lag_records: to.and_then(|s| s.kafka_lag),
                backlog_events: samples
                    .first()
                    .filter(|_| scenario.sim.is_none())
                    .zip(to)
                    .and_then(|(start, end)| end.received_since(start))
                    .map(|received| (sent_so_far as f64 - received).max(0.0)),
            }
        })
        .collect()
}
