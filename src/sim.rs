//! The user simulator behind `liverec simulate`: simulated users with latent tastes over item
//! categories browse a running server over HTTP. At each step a user fetches their list and clicks
//! a recommended item with a probability that grows with their affinity for its category and falls
//! with its position; otherwise they browse on their own, picking an item from a category they
//! like. Tastes can shift at a chosen moment (concept drift), and the device and hour mix can
//! change (input drift). The simulator reports the click-through rate it saw over time, so tests
//! and load tests can check that the server's closed loop recovers.
//!
//! It only talks to the target it is given, which must be a loopback address.

use std::collections::HashMap;
use std::time::{Duration, Instant};

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

/// A taste concentrated on one or two categories.
fn random_taste(rng: &mut SmallRng, categories: usize) -> Vec<f64> {
    let mut taste = vec![0.02; categories];
    let first = rng.random_range(0..categories);
    taste[first] += 1.0;
    if rng.random_bool(0.5) {
        taste[rng.random_range(0..categories)] += 0.5;
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

/// Runs the simulation to its end and reports what the users saw.
pub async fn run(config: SimConfig) -> Result<SimReport, SimError> {
    check_loopback(&config.target)?;
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
    let mut users: Vec<User> = (0..config.users)
        .map(|u| User {
            id: format!("sim-user-{}-{u}", config.seed),
            taste: random_taste(&mut rng, categories),
            device: devices[u % 2],
        })
        .collect();
    let by_category: Vec<Vec<usize>> =
        (0..categories).map(|c| (0..config.items).filter(|&i| category_of(i, categories) == c).collect()).collect();

    let started = Instant::now();
    let mut report = SimReport::default();
    let mut buckets: HashMap<u64, (u64, u64)> = HashMap::new();
    let (mut shifted, mut context_shifted) = (false, false);
    let period = Duration::from_secs_f64(1.0 / config.rate.max(0.1));
    let mut next = Instant::now();
    while started.elapsed() < config.duration {
        if let Some(at) = config.shift_at {
            if !shifted && started.elapsed() >= at {
                // Every user now likes the category after their favourite one.
                for user in &mut users {
                    user.taste.rotate_right(categories / 2);
                }
                shifted = true;
            }
        }
        if let Some(at) = config.context_shift_at {
            if !context_shifted && started.elapsed() >= at {
                for (u, user) in users.iter_mut().enumerate() {
                    user.device = devices[2 + u % 2];
                }
                context_shifted = true;
            }
        }
        let now = Instant::now();
        if now < next {
            actix_rt::time::sleep(next - now).await;
        }
        next += period;
        report.steps += 1;
        let user = &users[rng.random_range(0..users.len())];
        let bucket = (started.elapsed().as_secs_f64() / config.bucket.as_secs_f64()) as u64;
        let url = format!("{}/v1/users/{}/recommendations?k=10&device={}", config.target, user.id, user.device);
        let list: Value = match client.get(url).send().await {
            Ok(mut response) if response.status().is_success() => response.json().await.unwrap_or(Value::Null),
            _ => {
                report.errors += 1;
                continue;
            }
        };
        report.lists += 1;
        buckets.entry(bucket).or_default().0 += 1;
        let rec_id = list["rec_id"].as_str().unwrap_or_default().to_owned();
        let shown: Vec<String> = list["items"]
            .as_array()
            .map(|items| items.iter().filter_map(|i| i["item_id"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        // Scan the list top-down; each item is clicked with affinity x position decay.
        let mut clicked = None;
        for (position, item) in shown.iter().enumerate() {
            let Some(index) = item.strip_prefix("sim-item-").and_then(|n| n.parse::<usize>().ok()) else { continue };
            let affinity = user.taste[category_of(index, categories)] * categories as f64 / 2.0;
            let p = (config.click_base * affinity.min(1.0) / (1.0 + position as f64 * 0.3)).min(0.95);
            if rng.random_bool(p) {
                clicked = Some(item.clone());
                break;
            }
        }
        let event = match &clicked {
            Some(item) => {
                report.clicks += 1;
                buckets.entry(bucket).or_default().1 += 1;
                json!({ "user_id": user.id, "item_id": item, "event_type": "click", "rec_id": rec_id, "context": { "device": user.device } })
            }
            None => {
                report.browses += 1;
                let category = sample(&mut rng, &user.taste);
                let pool = &by_category[category];
                let item = sim_item(pool[rng.random_range(0..pool.len())]);
                json!({ "user_id": user.id, "item_id": item, "event_type": "view", "context": { "device": user.device } })
            }
        };
        let sent = client
            .post(format!("{}/v1/events", config.target))
            .insert_header(("content-type", "application/json"))
            .send_body(event.to_string())
            .await;
        if !matches!(sent, Ok(r) if r.status().as_u16() == 202) {
            report.errors += 1;
        }
    }
    let mut ordered: Vec<(u64, (u64, u64))> = buckets.into_iter().collect();
    ordered.sort_by_key(|(b, _)| *b);
    report.buckets = ordered
        .into_iter()
        .map(|(b, (lists, clicks))| Bucket {
            start_secs: b as f64 * config.bucket.as_secs_f64(),
            lists,
            clicks,
            ctr: if lists > 0 { clicks as f64 / lists as f64 } else { 0.0 },
        })
        .collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tastes_are_distributions_and_sampling_follows_them() {
        let mut rng = SmallRng::seed_from_u64(1);
        let taste = random_taste(&mut rng, 6);
        assert!((taste.iter().sum::<f64>() - 1.0).abs() < 1e-9);
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
