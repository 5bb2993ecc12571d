//! What the run asks the server, outside the load itself: is it up, what do its `/metrics`
//! say, and how much memory does its process hold (Linux `/proc`, given its pid); and the
//! host's load average.

use std::time::Duration;

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
    let client = awc::Client::builder().timeout(Duration::from_secs(10)).finish();
    let mut response = client.get(format!("{target}/metrics")).send().await.ok()?;
    let body = response.body().limit(64 << 20).await.ok()?;
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(sample).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
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
