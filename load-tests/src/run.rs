//! One scenario run against a live server: subscribers first, then events and GETs at the
//! scenario's rates for its duration, then a bounded wait for the last pushes, then the report.
//!
//! The generator runs on one thread (an actix system): every subscriber socket, stream and
//! request is a task on it, sharing the run's state ([`state`]) through `Rc<RefCell<_>>`
//! without locks. [`run`] is the sequence of steps; each step lives in a module of its own:
//! [`subscribers`] opens them, [`load`] sends the events and GETs, [`server`] asks the server
//! and the host, [`summary`] builds the report.

mod load;
mod server;
mod state;
mod subscribers;
mod summary;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer as _};

pub use server::scrape;
pub use state::user_name;

use crate::limits::{self, LimitError, NofileLimit};
use crate::report::{self, Report, SimSummary};
use crate::scenario::{Scenario, Transport};
use server::{Counters, Sampler, Snapshot, UnderLoad};
use state::{Progress, Shared, State};
use summary::Measured;

/// Descriptors the generator needs besides its subscribers (HTTP pool aside): stdio, the
/// runtime, Kafka, /metrics scrapes.
const SPARE_FDS: u64 = 64;

/// Why a run could not start, or could not write its report.
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

/// Runs `scenario` against `options.target` and returns (and writes) its report.
pub async fn run(scenario: &Scenario, options: &RunOptions) -> Result<Report, RunError> {
    let target = options.target.trim_end_matches('/').to_owned();
    let nofile = check_limits(scenario, &target)?;
    let progress = Progress { enabled: options.progress };
    if let Err(unhealthy) = server::probe(&target).await {
        return Err(RunError::Unreachable { target, reason: unhealthy.0 });
    }
    let loadavg_start = server::loadavg();
    let started_at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|_| RunError::Clock)?.as_millis() as u64;
    let before = Counters::scrape(&target, Counters::default()).await;
    let rss_before = options.server_pid.and_then(server::rss_kib);
    let state = State::shared(scenario, format!("lt{started_at_ms}-"));

    let mut subscribers = subscribers::open(scenario, &target, &state, progress).await;
    subscribers.setup.quiet_after_secs = server::wait_quiet(&target).await;
    progress.say(match subscribers.setup.quiet_after_secs {
        Some(secs) => format!("server quiet {secs:.1} s later (no scoring queued or under way)"),
        None => "server still busy after 120 s; starting the load anyway".to_owned(),
    });
    let producer = kafka_producer(scenario)?;
    let sim = start_sim(scenario, &target);
    let load_start = Snapshot::take(&target, options.server_pid).await;
    let sampler = Sampler::start(&target, options.server_pid);
    let load = load::drive(scenario, &target, &state, producer.as_ref(), options.server_pid, progress).await;
    let mut per_second = sampler.stop();
    let load_end = Snapshot::take(&target, options.server_pid).await;
    // The end of the load closes its last second.
    per_second.push(load_end);
    let under_load = UnderLoad::measure(&target, options.server_pid).await;

    drain(&state, producer.as_ref()).await;
    let sim = stop_sim(sim).await;
    let caught_up_secs = settle(scenario, &state, &target, &load_start).await;
    let settled = Snapshot::take(&target, options.server_pid).await;
    subscribers.close();
    let after = Counters::scrape(&target, before).await;

    let measured = Measured {
        target,
        started_at_ms,
        nofile,
        loadavg_start,
        before,
        after,
        rss_before,
        under_load,
        snapshots: summary::Snapshots { load_start, per_second, load_end, settled, caught_up_secs },
        setup: subscribers.setup,
        load,
        sim,
    };
    let report = summary::report(scenario, &mut state.borrow_mut(), measured);
    if let Some(dir) = &options.out {
        report::write(dir, &report)?;
    }
    Ok(report)
}

/// Refuses targets and brokers off loopback, and raises the open-file limit to what the
/// scenario's connections need.
fn check_limits(scenario: &Scenario, target: &str) -> Result<NofileLimit, RunError> {
    limits::check_loopback(target)?;
    if let Some(kafka) = &scenario.kafka {
        if scenario.transport == Transport::Kafka {
            limits::check_loopback(&kafka.brokers)?;
        }
    }
    // The simulator's client keeps up to 64 connections of its own.
    let sim_connections = if scenario.sim.is_some() { 64 } else { 0 };
    let needed = scenario.connections() as u64 + scenario.http_connections as u64 + sim_connections + SPARE_FDS;
    Ok(limits::ensure_nofile(needed)?)
}

/// The Kafka producer of a scenario whose events go to Kafka (none for HTTP).
fn kafka_producer(scenario: &Scenario) -> Result<Option<BaseProducer>, RunError> {
    match (&scenario.transport, &scenario.kafka) {
        (Transport::Kafka, Some(kafka)) => Ok(Some(
            ClientConfig::new()
                .set("bootstrap.servers", &kafka.brokers)
                .set("partitioner", "murmur2_random")
                .set("linger.ms", "1")
                .set("compression.type", "lz4")
                .create()
                .map_err(|e| RunError::Kafka(e.to_string()))?,
        )),
        _ => Ok(None),
    }
}

/// The simulated users of a scenario, running alongside the load until stopped.
struct Sim {
    control: Arc<liverec::sim::SimControl>,
    handle: actix_rt::task::JoinHandle<Result<liverec::sim::SimReport, liverec::sim::SimError>>,
}

/// Starts the scenario's simulated users, if it has any.
fn start_sim(scenario: &Scenario, target: &str) -> Option<Sim> {
    scenario.sim.as_ref().map(|sim| {
        let control = Arc::new(liverec::sim::SimControl::default());
        let config = liverec::sim::SimConfig {
            target: target.to_owned(),
            users: sim.users,
            items: sim.items,
            categories: sim.categories,
            rate: sim.steps_per_s,
            duration: Duration::from_secs_f64(scenario.duration_secs),
            workers: sim.workers,
            seed: sim.seed,
            ..liverec::sim::SimConfig::default()
        };
        Sim { control: control.clone(), handle: actix_rt::spawn(liverec::sim::run_with(config, control)) }
    })
}

/// Stops the simulated users and summarises what they did (bounded wait).
async fn stop_sim(sim: Option<Sim>) -> Option<SimSummary> {
    let Sim { control, handle } = sim?;
    control.stop();
    let report = actix_rt::time::timeout(Duration::from_secs(30), handle).await;
    Some(match report {
        Ok(Ok(Ok(report))) => SimSummary::from_report(&report),
        Ok(Ok(Err(error))) => SimSummary::failed(error.to_string()),
        _ => SimSummary::failed("the simulator did not finish in time".into()),
    })
}

/// Lets the requests still in flight finish (bounded) and flushes the Kafka producer.
async fn drain(state: &Shared, producer: Option<&BaseProducer>) {
    let drain = Instant::now();
    while state.borrow().outstanding > 0 && drain.elapsed() < Duration::from_secs(30) {
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    if let Some(producer) = producer {
        if producer.flush(Duration::from_secs(10)).is_err() {
            state.borrow_mut().errors.kafka_produce += 1;
        }
    }
}

/// Waits (at most the scenario's `settle_secs`) for the pushes that reflect the last events
/// and, without simulated users (whose events the server counts too), until the server has
/// received every accepted event; returns the seconds that took, or none if it did not happen
/// in time or the server does not count its events.
async fn settle(scenario: &Scenario, state: &Shared, target: &str, load_start: &Snapshot) -> Option<f64> {
    let settle = Instant::now();
    let bound = Duration::from_secs_f64(scenario.settle_secs);
    let accepted = state.borrow().sent.iter().flatten().filter(|&&at| at != state::FAILED).count() as f64;
    let mut caught_up = None;
    let mut counted = scenario.sim.is_none();
    loop {
        if counted && caught_up.is_none() {
            match Snapshot::take(target, None).await.received_since(load_start) {
                Some(received) if received >= accepted => caught_up = Some(settle.elapsed().as_secs_f64()),
                Some(_) => {}
                None => counted = false,
            }
        }
        let waiting = (counted && caught_up.is_none()) || state.borrow().unreflected() > 0;
        if !waiting || settle.elapsed() >= bound {
            return caught_up;
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}
