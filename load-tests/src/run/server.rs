//! What the run asks the server, outside the load itself: is it up, what do its `/metrics`
//! say, and how much memory does its process hold (Linux `/proc`, given its pid); and the
//! host's load average.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The server's `/healthz` did not answer success.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Unhealthy(pub(super) String);

/// Checks that the server answers `/healthz` with success before anything else is opened.
pub(super) async fn probe(target: &str) -> Result<(), Unhealthy> {
    let probe = awc::Client::builder().timeout(Duration::from_secs(5)).finish();
    match probe.get(format!("{target}/healthz")).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(Unhealthy(format!("status {}", r.status()))),
        Err(e) => Err(Unhealthy(e.to_string())),
    }
}

/// The server's counters the report shows as differences over the run.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Counters {
    /// `liverec_push_dropped_stale_total`.
    pub(super) stale_lists_skipped: f64,
    /// Training runs of every outcome (`liverec_trainer_runs_total`).
    pub(super) trainer_runs: f64,
    /// `liverec_model_refused_total`.
    pub(super) model_refused: f64,
}

impl Counters {
    /// Reads the counters; one the server does not expose keeps its value in `fallback`.
    pub(super) async fn scrape(target: &str, fallback: Counters) -> Counters {
        let trainer_samples = [
            "liverec_trainer_runs_total{outcome=\"passed\"}",
            "liverec_trainer_runs_total{outcome=\"rejected\"}",
            "liverec_trainer_runs_total{outcome=\"failed\"}",
        ];
        Counters {
            stale_lists_skipped: scrape(target, "liverec_push_dropped_stale_total")
                .await
                .unwrap_or(fallback.stale_lists_skipped),
            trainer_runs: scrape_sum(target, &trainer_samples).await,
            model_refused: scrape(target, "liverec_model_refused_total").await.unwrap_or(fallback.model_refused),
        }
    }
}

/// The server under load, measured while every subscriber is still open.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct UnderLoad {
    /// `liverec_stream_subscribers{kind="websocket"}` and `{kind="sse"}`.
    pub(super) websocket_subscriptions: Option<f64>,
    pub(super) sse_subscriptions: Option<f64>,
    /// The server's resident memory (with its pid).
    pub(super) rss_kib: Option<u64>,
}

impl UnderLoad {
    pub(super) async fn measure(target: &str, server_pid: Option<u32>) -> UnderLoad {
        UnderLoad {
            websocket_subscriptions: scrape(target, "liverec_stream_subscribers{kind=\"websocket\"}").await,
            sse_subscriptions: scrape(target, "liverec_stream_subscribers{kind=\"sse\"}").await,
            rss_kib: server_pid.and_then(rss_kib),
        }
    }
}

/// Reads one sample (`name` or `name{labels}`) from the server's `/metrics`.
pub async fn scrape(target: &str, sample: &str) -> Option<f64> {
    sample_of(&metrics_text(target).await?, sample)
}

/// How long the server must show no new work before the load starts.
const QUIET_FOR: Duration = Duration::from_secs(1);
/// The longest wait for it: a server with traffic of its own never goes quiet.
const QUIET_BOUND: Duration = Duration::from_secs(120);

/// Waits until the server has finished the work it had before the load: no scoring request
/// queued, and neither scored requests (`liverec_model_requests_total`) nor applied events
/// moving for [`QUIET_FOR`]. Left over, that work is measured as the load's latency: the lists of
/// a bulk `synth-catalogue put`'s users (the put returns once its events are accepted, before
/// their sessions have scored) and the subscriptions' first lists. Returns the seconds waited,
/// or `None` if the server was still busy after [`QUIET_BOUND`] (the run goes on then).
pub(super) async fn wait_quiet(target: &str) -> Option<f64> {
    let started = Instant::now();
    let (mut last, mut still_since) = (None, Instant::now());
    loop {
        let text = metrics_text(target).await.unwrap_or_default();
        let queued = sample_of(&text, "liverec_model_queued_requests").unwrap_or(0.0);
        let work = (
            sample_of(&text, "liverec_model_requests_total"),
            sample_of(&text, "liverec_session_applied_events_total"),
        );
        if last != Some(work) || queued > 0.0 {
            (last, still_since) = (Some(work), Instant::now());
        } else if still_since.elapsed() >= QUIET_FOR {
            return Some(started.elapsed().as_secs_f64());
        }
        if started.elapsed() >= QUIET_BOUND {
            return None;
        }
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The server's whole `/metrics` exposition.
async fn metrics_text(target: &str) -> Option<String> {
    let client = awc::Client::builder().timeout(Duration::from_secs(10)).finish();
    let mut response = client.get(format!("{target}/metrics")).send().await.ok()?;
    let body = response.body().limit(64 << 20).await.ok()?;
    Some(String::from_utf8_lossy(&body).into_owned())
}

/// One sample (`name` or `name{labels}`) of an exposition.
fn sample_of(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(sample).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// The server's event counters, its Kafka consumer lag and its CPU time at one moment: the run
/// takes one when the load starts, one when it ends and one after the settle, and one a second
/// in between for the timeline.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Snapshot {
    /// `liverec_session_applied_events_total`.
    pub(super) applied: Option<f64>,
    /// `liverec_session_duplicate_events_total` (events skipped by id: received, not applied).
    pub(super) duplicates: Option<f64>,
    /// `liverec_kafka_consumer_lag_records` (a server in Kafka mode only).
    pub(super) kafka_lag: Option<f64>,
    /// The server's CPU seconds so far, user and system: from `/proc/PID/stat` with its pid,
    /// else from its `/metrics` (`liverec_process_cpu_seconds_total`).
    pub(super) cpu_secs: Option<f64>,
    pub(super) at: Option<std::time::Instant>,
}

impl Snapshot {
    pub(super) async fn take(target: &str, server_pid: Option<u32>) -> Snapshot {
        let text = metrics_text(target).await.unwrap_or_default();
        Snapshot {
            applied: sample_of(&text, "liverec_session_applied_events_total"),
            duplicates: sample_of(&text, "liverec_session_duplicate_events_total"),
            kafka_lag: sample_of(&text, "liverec_kafka_consumer_lag_records"),
            // The process's own account when its pid is given, else the one the server exports
            // (`liverec_process_cpu_seconds_total`, read from its /proc at the scrape).
            cpu_secs: server_pid.and_then(cpu_secs).or_else(|| sample_of(&text, "liverec_process_cpu_seconds_total")),
            at: Some(std::time::Instant::now()),
        }
    }

    /// Events the server received (applied or skipped as duplicates) since `earlier`.
    pub(super) fn received_since(&self, earlier: &Snapshot) -> Option<f64> {
        let now = self.applied? + self.duplicates.unwrap_or(0.0);
        Some(now - (earlier.applied? + earlier.duplicates.unwrap_or(0.0)))
    }

    pub(super) fn applied_since(&self, earlier: &Snapshot) -> Option<f64> {
        Some(self.applied? - earlier.applied?)
    }

    pub(super) fn cpu_since(&self, earlier: &Snapshot) -> Option<f64> {
        Some(self.cpu_secs? - earlier.cpu_secs?)
    }

    /// Wall-clock seconds since `earlier`.
    pub(super) fn secs_since(&self, earlier: &Snapshot) -> Option<f64> {
        Some(self.at?.checked_duration_since(earlier.at?)?.as_secs_f64())
    }
}

/// A snapshot a second while the load runs (the first at its start), for the timeline.
pub(super) struct Sampler {
    samples: Rc<RefCell<Vec<Snapshot>>>,
    task: actix_rt::task::JoinHandle<()>,
}

impl Sampler {
    /// Starts sampling on a task of its own, so a slow `/metrics` never holds up the load.
    pub(super) fn start(target: &str, server_pid: Option<u32>) -> Sampler {
        let samples: Rc<RefCell<Vec<Snapshot>>> = Rc::default();
        let sink = samples.clone();
        let target = target.to_owned();
        let task = actix_rt::spawn(async move {
            let mut tick = actix_rt::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let snapshot = Snapshot::take(&target, server_pid).await;
                sink.borrow_mut().push(snapshot);
            }
        });
        Sampler { samples, task }
    }

    /// Stops sampling and returns the snapshots, one a second from the start.
    pub(super) fn stop(self) -> Vec<Snapshot> {
        self.task.abort();
        self.samples.take()
    }
}

/// CPU seconds (user + system) a process has used, from Linux `/proc/PID/stat`.
pub(super) fn cpu_secs(pid: u32) -> Option<f64> {
    liverec::telemetry::process_cpu_seconds(&pid.to_string())
}

/// The server's CPU seconds per event: CPU used over a window divided by the events it applied
/// (or received) in that window; none without events or with a clock that went backwards.
pub(super) fn cpu_secs_per_event(cpu_secs: f64, events: f64) -> Option<f64> {
    (events > 0.0 && cpu_secs >= 0.0).then(|| cpu_secs / events)
}

pub(super) async fn scrape_sum(target: &str, samples: &[&str]) -> f64 {
    let mut total = 0.0;
    for sample in samples {
        total += scrape(target, sample).await.unwrap_or(0.0);
    }
    total
}

/// Resident memory of a process, in KiB (Linux `/proc`).
pub(super) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub(super) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_cpu_time() {
        let secs = cpu_secs(std::process::id()).expect("/proc/self/stat is readable");
        assert!(secs >= 0.0);
        assert_eq!(cpu_secs(u32::MAX), None, "no such process");
    }

    #[test]
    fn cpu_per_event_divides_and_refuses_no_events() {
        assert_eq!(cpu_secs_per_event(2.0, 40_000.0), Some(50e-6));
        assert_eq!(cpu_secs_per_event(2.0, 0.0), None);
        assert_eq!(cpu_secs_per_event(-0.1, 10.0), None);
    }

    #[test]
    fn samples_are_found_by_exact_name() {
        let text = "# HELP x\nliverec_kafka_consumer_lag_records 44\nliverec_session_applied_events_total_x 1\n\
                    liverec_session_applied_events_total 1234\n";
        assert_eq!(sample_of(text, "liverec_kafka_consumer_lag_records"), Some(44.0));
        assert_eq!(sample_of(text, "liverec_session_applied_events_total"), Some(1234.0));
        assert_eq!(sample_of(text, "liverec_session_duplicate_events_total"), None);
    }
}
