//! The user simulator behind `liverec simulate`: simulated users with latent tastes over item
//! categories browse a running server over HTTP. At each step a user fetches their list and clicks
//! a recommended item with a probability that grows with their affinity for its category and falls
//! with its position; otherwise they browse on their own, picking an item from a category they
//! like. The categories form two seasons: tastes live in the current season's half, and a taste
//! shift (concept drift) moves every user to the other half, whose items the stream has not
//! seen yet. The device mix can change too (input drift). The simulator reports the
//! click-through rate it saw over time, so tests and load tests can check that the server's
//! closed loop recovers.
//!
//! It only talks to the target it is given, which must be a loopback address.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Base URL of the server, e.g. `http://127.0.0.1:8080`.
    pub target: String,
    pub users: usize,
    /// Items the simulator puts into the catalogue (`sim-item-NNNN`), spread over categories.
    pub items: usize,
    pub categories: usize,
    /// Steps per second over all users.
    pub rate: f64,
    pub duration: Duration,
    /// When tastes shift (concept drift), from the start.
    pub shift_at: Option<Duration>,
    /// When the device and hour mix changes (input drift), from the start.
    pub context_shift_at: Option<Duration>,
    /// Probability of clicking a recommended item of a category the user loves, at position 0.
    pub click_base: f64,
    /// Report CTR per bucket of this length.
    pub bucket: Duration,
    pub seed: u64,
    /// Concurrent simulated clients (the users are split among them).
    pub workers: usize,
    /// Several servers of one cluster: each user's requests go to the one this picks (e.g. the
    /// instance that owns the user's partition, which counts the lists it serves); `None` sends
    /// everything to `target`. The catalogue is put through `target`.
    pub route: Option<Route>,
}

/// Sends each user's requests to one of several servers (see [`SimConfig::route`]).
#[derive(Clone)]
pub struct Route {
    /// Base URLs of the servers.
    pub targets: Vec<String>,
    /// The index in `targets` of a user's server, by user id.
    pub pick: std::sync::Arc<dyn Fn(&str) -> usize + Send + Sync>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route").field("targets", &self.targets).finish_non_exhaustive()
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            target: "http://127.0.0.1:8080".into(),
            users: 200,
            items: 400,
            categories: 8,
            rate: 200.0,
            duration: Duration::from_secs(60),
            shift_at: None,
            context_shift_at: None,
            click_base: 0.5,
            bucket: Duration::from_secs(5),
            seed: 7,
            workers: 4,
            route: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("the simulator only targets loopback addresses, not {0}")]
    NotLoopback(String),
    #[error("request to the server failed: {0}")]
    Http(String),
}

/// Click-through per time bucket.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Bucket {
    pub start_secs: f64,
    pub lists: u64,
    pub clicks: u64,
    pub ctr: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SimReport {
    pub steps: u64,
    pub lists: u64,
    pub clicks: u64,
    pub browses: u64,
    pub errors: u64,
    pub buckets: Vec<Bucket>,
}

impl SimReport {
    /// Click-through over the buckets that start within `[from, to)` seconds.
    pub fn ctr_between(&self, from: f64, to: f64) -> f64 {
        let (lists, clicks) = self
            .buckets
            .iter()
            .filter(|b| b.start_secs >= from && b.start_secs < to)
            .fold((0, 0), |(l, c), b| (l + b.lists, c + b.clicks));
        if lists == 0 {
            0.0
        } else {
            clicks as f64 / lists as f64
        }
    }
}

struct User {
    id: String,
    /// Base URL of the server this user's requests go to.
    target: String,
    /// Affinity per category, summing to 1.
    taste: Vec<f64>,
    device: &'static str,
}

fn sim_item(i: usize) -> String {
    format!("sim-item-{i:04}")
}

fn category_of(item: usize, categories: usize) -> usize {
    item % categories
}

/// A taste concentrated on one or two categories of the current season (the first half of
/// the categories; all of them when there is only one).
fn random_taste(rng: &mut SmallRng, categories: usize) -> Vec<f64> {
    let season = (categories / 2).max(1);
    let mut taste: Vec<f64> = (0..categories).map(|c| if c < season { 0.02 } else { 0.0 }).collect();
    let first = rng.random_range(0..season);
    taste[first] += 1.0;
    if rng.random_bool(0.5) {
        taste[rng.random_range(0..season)] += 0.5;
    }
    let total: f64 = taste.iter().sum();
    taste.iter_mut().for_each(|t| *t /= total);
    taste
}

fn sample(rng: &mut SmallRng, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut x = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        x -= w;
        if x <= 0.0 {
            return i;
        }
    }
    weights.len() - 1
}

fn check_loopback(url: &str) -> Result<(), SimError> {
    let host = url.split("://").nth(1).unwrap_or(url).split(['/', ':']).next().unwrap_or("");
    if host == "localhost" || host.starts_with("127.") {
        Ok(())
    } else {
        Err(SimError::NotLoopback(host.to_owned()))
    }
}

/// Steers a running simulation and reads what it has seen so far (for tests that act on the
/// server while the users browse).
#[derive(Default)]
pub struct SimControl {
    shift: AtomicBool,
    context_shift: AtomicBool,
    stop: AtomicBool,
    /// Per bucket number: (lists, clicks).
    buckets: Mutex<BTreeMap<u64, (u64, u64)>>,
    started: Mutex<Option<Instant>>,
    bucket_secs: Mutex<f64>,
}

impl SimControl {
    /// Every user's taste moves to the other season (concept drift).
    pub fn shift_tastes(&self) {
        self.shift.store(true, Ordering::Relaxed);
    }

    /// Users switch to other devices (input drift).
    pub fn shift_context(&self) {
        self.context_shift.store(true, Ordering::Relaxed);
    }

    /// Ends the simulation after the steps in progress.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Lists fetched so far.
    pub fn lists(&self) -> u64 {
        self.buckets.lock().values().map(|(l, _)| l).sum()
    }

    /// Seconds since the simulation started.
    pub fn elapsed(&self) -> f64 {
        self.started.lock().map_or(0.0, |s| s.elapsed().as_secs_f64())
    }

    /// Lists and clicks over the last `secs` seconds, whole buckets only (the one still filling
    /// is left out).
    pub fn recent(&self, secs: f64) -> (u64, u64) {
        let width = *self.bucket_secs.lock();
        if width <= 0.0 {
            return (0, 0);
        }
        let current = (self.elapsed() / width) as u64;
        let first = current.saturating_sub((secs / width).ceil() as u64);
        self.buckets.lock().range(first..current).fold((0, 0), |(l, c), (_, (bl, bc))| (l + bl, c + bc))
    }

    /// Click-through over the last `secs` seconds (0 without lists).
    pub fn recent_ctr(&self, secs: f64) -> f64 {
        let (lists, clicks) = self.recent(secs);
        if lists == 0 {
            0.0
        } else {
            clicks as f64 / lists as f64
        }
    }

    fn count(&self, bucket: u64, clicked: bool) {
        let mut buckets = self.buckets.lock();
        let entry = buckets.entry(bucket).or_default();
        entry.0 += 1;
        entry.1 += u64::from(clicked);
    }
}

/// Runs the simulation to its end and reports what the users saw.
pub async fn run(config: SimConfig) -> Result<SimReport, SimError> {
    run_with(config, std::sync::Arc::new(SimControl::default())).await
}

/// [`run`], steered by `control`.
pub async fn run_with(config: SimConfig, control: std::sync::Arc<SimControl>) -> Result<SimReport, SimError> {
    check_loopback(&config.target)?;
    for target in config.route.iter().flat_map(|r| &r.targets) {
        check_loopback(target)?;
    }
    let client =
        awc::Client::builder().connector(awc::Connector::new().limit(64)).timeout(Duration::from_secs(10)).finish();
    let http = |e: awc::error::SendRequestError| SimError::Http(e.to_string());
    let categories = config.categories.max(1);
    // The catalogue the users know.
    for i in 0..config.items {
        let body = json!({ "title": format!("Simulated {i}"), "categories": [format!("sim-cat-{}", category_of(i, categories))] });
        client
            .put(format!("{}/v1/items/{}", config.target, sim_item(i)))
            .insert_header(("content-type", "application/json"))
            .send_body(body.to_string())
            .await
            .map_err(http)?;
    }
    let mut rng = SmallRng::seed_from_u64(config.seed);
    let devices = ["mobile", "desktop", "tablet", "tv"];
    let users: Vec<User> = (0..config.users)
        .map(|u| {
            let id = format!("sim-user-{}-{u}", config.seed);
            let target = match &config.route {
                Some(route) if !route.targets.is_empty() => {
                    route.targets[(route.pick)(&id) % route.targets.len()].clone()
                }
                _ => config.target.clone(),
            };
            User { id, target, taste: random_taste(&mut rng, categories), device: devices[u % 2] }
        })
        .collect();
    let by_category: Vec<Vec<usize>> =
        (0..categories).map(|c| (0..config.items).filter(|&i| category_of(i, categories) == c).collect()).collect();

    *control.started.lock() = Some(Instant::now());
    *control.bucket_secs.lock() = config.bucket.as_secs_f64().max(0.001);
    let workers = config.workers.clamp(1, users.len().max(1));
    let mut groups: Vec<Vec<User>> = (0..workers).map(|_| Vec::new()).collect();
    for (u, user) in users.into_iter().enumerate() {
        groups[u % workers].push(user);
    }
    let steps = groups.into_iter().enumerate().map(|(w, group)| {
        let worker = Worker {
            config: &config,
            control: &control,
            client: client.clone(),
            users: group,
            by_category: &by_category,
            rng: SmallRng::seed_from_u64(config.seed ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9)),
        };
        worker.run(workers)
    });
    let mut report = SimReport::default();
    for part in futures_util::future::join_all(steps).await {
        report.steps += part.steps;
        report.lists += part.lists;
        report.clicks += part.clicks;
        report.browses += part.browses;
        report.errors += part.errors;
    }
    let width = config.bucket.as_secs_f64();
    report.buckets = control
        .buckets
        .lock()
        .iter()
        .map(|(&b, &(lists, clicks))| Bucket {
            start_secs: b as f64 * width,
            lists,
            clicks,
            ctr: if lists > 0 { clicks as f64 / lists as f64 } else { 0.0 },
        })
        .collect();
    Ok(report)
}

/// One concurrent client: its share of the users, paced at its share of the rate.
struct Worker<'a> {
    config: &'a SimConfig,
    control: &'a SimControl,
    client: awc::Client,
    users: Vec<User>,
    by_category: &'a [Vec<usize>],
    rng: SmallRng,
}

impl Worker<'_> {
    async fn run(mut self, workers: usize) -> SimReport {
        let config = self.config;
        let categories = config.categories.max(1);
        let devices = ["mobile", "desktop", "tablet", "tv"];
        let mut report = SimReport::default();
        if self.users.is_empty() {
            return report;
        }
        let (mut shifted, mut context_shifted) = (false, false);
        let period = Duration::from_secs_f64(workers as f64 / config.rate.max(0.1));
        let started = Instant::now();
        let mut next = Instant::now();
        while started.elapsed() < config.duration && !self.control.stop.load(Ordering::Relaxed) {
            let elapsed = self.control.elapsed();
            if config.shift_at.is_some_and(|at| elapsed >= at.as_secs_f64()) {
                self.control.shift_tastes();
            }
            if config.context_shift_at.is_some_and(|at| elapsed >= at.as_secs_f64()) {
                self.control.shift_context();
            }
            if !shifted && self.control.shift.load(Ordering::Relaxed) {
                // The other season: every user's taste moves half the categories on.
                for user in &mut self.users {
                    user.taste.rotate_right((categories / 2).max(1));
                }
                shifted = true;
            }
            if !context_shifted && self.control.context_shift.load(Ordering::Relaxed) {
                for (u, user) in self.users.iter_mut().enumerate() {
                    user.device = devices[2 + u % 2];
                }
                context_shifted = true;
            }
            let now = Instant::now();
            if now < next {
                actix_rt::time::sleep(next - now).await;
            }
            next += period;
            report.steps += 1;
            let user = &self.users[self.rng.random_range(0..self.users.len())];
            let bucket = (self.control.elapsed() / config.bucket.as_secs_f64()) as u64;
            let url = format!("{}/v1/users/{}/recommendations?k=10&device={}", user.target, user.id, user.device);
            let list: Value = match self.client.get(url).send().await {
                Ok(mut response) if response.status().is_success() => response.json().await.unwrap_or(Value::Null),
                _ => {
                    report.errors += 1;
                    continue;
                }
            };
            report.lists += 1;
            let rec_id = list["rec_id"].as_str().unwrap_or_default().to_owned();
            let shown: Vec<String> = list["items"]
                .as_array()
                .map(|items| items.iter().filter_map(|i| i["item_id"].as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            // Scan the list top-down; each item is clicked with affinity x position decay.
            let mut clicked = None;
            for (position, item) in shown.iter().enumerate() {
                let Some(index) = item.strip_prefix("sim-item-").and_then(|n| n.parse::<usize>().ok()) else {
                    continue;
                };
                let affinity = user.taste[category_of(index, categories)] * categories as f64 / 2.0;
                let p = (config.click_base * affinity.min(1.0) / (1.0 + position as f64 * 0.3)).min(0.95);
                if self.rng.random_bool(p) {
                    clicked = Some(item.clone());
                    break;
                }
            }
            self.control.count(bucket, clicked.is_some());
            let event = match &clicked {
                Some(item) => {
                    report.clicks += 1;
                    json!({ "user_id": user.id, "item_id": item, "event_type": "click", "rec_id": rec_id, "context": { "device": user.device } })
                }
                None => {
                    report.browses += 1;
                    let category = sample(&mut self.rng, &user.taste);
                    let pool = &self.by_category[category];
                    let item = sim_item(pool[self.rng.random_range(0..pool.len())]);
                    json!({ "user_id": user.id, "item_id": item, "event_type": "view", "context": { "device": user.device } })
                }
            };
            let sent = self
                .client
                .post(format!("{}/v1/events", user.target))
                .insert_header(("content-type", "application/json"))
                .send_body(event.to_string())
                .await;
            if !matches!(sent, Ok(r) if r.status().as_u16() == 202) {
                report.errors += 1;
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tastes_are_distributions_and_sampling_follows_them() {
        let mut rng = SmallRng::seed_from_u64(1);
        let taste = random_taste(&mut rng, 6);
        assert!((taste.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(taste[3..].iter().all(|&t| t == 0.0), "tastes live in the current season");
        let favourite = taste.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).expect("one");
        let hits = (0..2000).filter(|_| sample(&mut rng, &taste) == favourite).count();
        assert!(hits > 1000, "the favourite category dominates: {hits}");
    }

    #[test]
    fn only_loopback_targets() {
        assert!(check_loopback("http://127.0.0.1:8080").is_ok());
        assert!(check_loopback("http://localhost:1").is_ok());
        assert!(check_loopback("http://10.0.0.1:8080").is_err());
        assert!(check_loopback("http://example.com").is_err());
    }

    #[test]
    fn ctr_between_sums_buckets() {
        let report = SimReport {
            buckets: vec![
                Bucket { start_secs: 0.0, lists: 10, clicks: 5, ctr: 0.5 },
                Bucket { start_secs: 5.0, lists: 10, clicks: 1, ctr: 0.1 },
            ],
            ..SimReport::default()
        };
        assert!((report.ctr_between(0.0, 10.0) - 0.3).abs() < 1e-9);
        assert_eq!(report.ctr_between(20.0, 30.0), 0.0);
    }
}
