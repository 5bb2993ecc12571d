//! The serving-path evaluation (`liverec eval --serve`, `liverec eval --target URL`): the
//! leave-one-out protocol of [`crate::models::eval`], scored on the lists a running server gives
//! its users rather than on the model's scores.
//!
//! Each user's training interactions are posted to `POST /v1/events` in time order (all users
//! interleaved, with their timestamps: ratings as `rating` events with their value, other
//! interactions as `view`s), then every user with a held-out interaction asks
//! `GET /v1/users/{id}/recommendations?k=20` and the validation item is ranked in that list; then
//! the validation interactions are posted and the test item is ranked the same way. A target
//! outside the list is a miss (rank 21), so the figures are the protocol's at @10 and @20.
//!
//! Everything between the HTTP request and the list is the server's: ingest, the bus, the
//! session (its history window, consumed record and context), the model actor's batching and the
//! model's serving blend. [`serve_model`] starts an in-process server for a model directory with
//! the settings that evaluation needs (demo, auth and retraining off).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::config::{AuthMode, Config, ModelKind};
use crate::models::data::{Dataset, Interaction, Split};
use crate::models::eval::PartMetrics;
use crate::models::metrics::MetricSums;

/// The list length asked for: the protocol's deepest cut-off.
pub const DEPTH: usize = 20;
/// Events per `POST /v1/events` (below the default `events.max_batch`, 1,000; the import
/// client halves it for a server that allows fewer).
const POST_BATCH: usize = 500;
/// A wait that sees no user's list catch up for this long has stalled (it bounds a hang; it
/// says nothing about speed).
const STALL: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ServedEvalError {
    #[error("{what}: {error}")]
    Http { what: String, error: String },
    #[error("{what}: HTTP {status}: {body}")]
    Status { what: String, status: u16, body: String },
    #[error("no user's list caught up with the events for {0:?} (the server stalled?)")]
    Stalled(Duration),
    #[error("the model directory {0} has no parent folder or no name")]
    ModelDir(String),
    #[error("starting the server: {0}")]
    Start(#[from] crate::StartError),
    #[error("POST /v1/events: {0}")]
    Post(#[from] crate::import::ImportError),
    #[error("POST /v1/events: {refused} events refused, the first ({index}): {code} {message}")]
    Refused { refused: usize, index: usize, code: String, message: String },
}

/// The result of one serving-path evaluation.
#[derive(Clone, Debug)]
pub struct ServedRun {
    pub metrics: PartMetrics,
    /// Per dataset user, the list served before the validation target (empty: no case).
    pub valid_lists: Vec<Vec<String>>,
    /// Per dataset user, the list served before the test target (empty: no case).
    pub test_lists: Vec<Vec<String>>,
    /// Events posted in all.
    pub events: usize,
}

/// The configuration of an in-process server that serves the model in `model_dir` (a folder
/// written by `liverec train`) for evaluation: embedded mode, no demo data, no auth, no
/// retraining, port 0.
pub fn serve_model(mut config: Config, model_dir: &Path) -> Result<Config, ServedEvalError> {
    let bad = || ServedEvalError::ModelDir(model_dir.display().to_string());
    let name = model_dir.file_name().and_then(|n| n.to_str()).ok_or_else(bad)?.to_owned();
    let parent = model_dir.parent().ok_or_else(bad)?;
    config.server.listen = "127.0.0.1:0".parse().expect("a literal socket address");
    config.demo.enabled = false;
    config.auth.mode = AuthMode::Off;
    config.trainer.enabled = false;
    config.model.kind = ModelKind::Sequential;
    config.model.registry_dir = if parent.as_os_str().is_empty() { ".".into() } else { parent.to_owned() };
    config.model.registry_url = String::new();
    config.model.version = name;
    Ok(config)
}

/// A client of the server under evaluation.
struct Client {
    http: awc::Client,
    base: String,
    api_key: Option<String>,
    /// Posts the events: the import's REST client (batches of [`POST_BATCH`], halved on `413`;
    /// `429`/`503` retried after their `Retry-After` and other failures with a capped backoff,
    /// both up to a limit; a batch sent again is applied once, its events keeping their ids).
    events: crate::import::rest::Client,
}

impl Client {
    fn request(&self, method: awc::http::Method, path: &str) -> awc::ClientRequest {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(key) => request.insert_header(("Authorization", format!("Bearer {key}"))),
            None => request,
        }
    }

    /// Posts `events` in order, in batches; any event the server refuses is an error (the
    /// protocol needs every one applied).
    async fn post_events(&mut self, events: &[Value]) -> Result<(), ServedEvalError> {
        let rejected = self.events.send(crate::import::rest::Endpoint::Events, events).await?;
        match rejected.first() {
            None => Ok(()),
            Some((index, first)) => Err(ServedEvalError::Refused {
                refused: rejected.len(),
                index: *index,
                code: first.reason.code.clone(),
                message: first.message.clone(),
            }),
        }
    }

    /// The user's list of `DEPTH` items and the newest event it reflects.
    async fn list(&self, user: &str) -> Result<(Option<String>, Vec<String>), ServedEvalError> {
        let path = format!("/v1/users/{}/recommendations?k={DEPTH}", urlencode(user));
        let what = format!("GET {path}");
        let mut response = self
            .request(awc::http::Method::GET, &path)
            .send()
            .await
            .map_err(|e| ServedEvalError::Http { what: what.clone(), error: e.to_string() })?;
        let status = response.status().as_u16();
        let body = response
            .body()
            .limit(1 << 22)
            .await
            .map_err(|e| ServedEvalError::Http { what: what.clone(), error: e.to_string() })?;
        if status != 200 {
            return Err(ServedEvalError::Status { what, status, body: String::from_utf8_lossy(&body).into_owned() });
        }
        let list: Value = serde_json::from_slice(&body)
            .map_err(|e| ServedEvalError::Http { what: what.clone(), error: e.to_string() })?;
        let last = list["last_event_id"].as_str().map(str::to_owned);
        let items = list["items"]
            .as_array()
            .map(|items| items.iter().filter_map(|i| i["item_id"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        Ok((last, items))
    }
}

/// Percent-encodes a path segment (user ids are raw ids from a data file).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The event id of a user's `index`-th interaction (ids are per user).
fn event_id(index: usize) -> String {
    format!("eval-{index}")
}

fn event(dataset: &Dataset, user: usize, index: usize, i: &Interaction) -> Value {
    let mut e = json!({
        "user_id": dataset.users[user].id,
        "item_id": dataset.items[i.item as usize].id,
        "event_type": if i.rating.is_some() { "rating" } else { "view" },
        "timestamp": i.timestamp * 1000,
        "event_id": event_id(index),
    });
    if let Some(r) = i.rating {
        e["value"] = json!(r);
    }
    e
}

/// Runs the serving-path evaluation against the server at `base` (e.g. `http://127.0.0.1:8080`).
/// The server should know none of the dataset's users beforehand.
pub async fn evaluate_served(
    base: &str,
    api_key: Option<String>,
    dataset: &Dataset,
    split: &Split,
) -> Result<ServedRun, ServedEvalError> {
    let mut client = Client {
        http: awc::Client::builder().timeout(Duration::from_secs(60)).finish(),
        base: base.trim_end_matches('/').to_owned(),
        events: crate::import::rest::Client::new(base, api_key.clone(), POST_BATCH)?,
        api_key,
    };
    let users = split.train.len();
    // Phase 1: the training interactions, all users interleaved in time order.
    let mut train: Vec<(i64, usize, usize)> = split
        .train
        .iter()
        .enumerate()
        .flat_map(|(u, seq)| seq.iter().enumerate().map(move |(i, x)| (x.timestamp, u, i)))
        .collect();
    train.sort_unstable();
    let train_events: Vec<Value> = train.iter().map(|&(_, u, i)| event(dataset, u, i, &split.train[u][i])).collect();
    client.post_events(&train_events).await?;
    let with_case: Vec<usize> = (0..users).filter(|&u| split.valid[u].is_some() && split.test[u].is_some()).collect();
    let expect_train: Vec<Option<String>> =
        (0..users).map(|u| split.train[u].len().checked_sub(1).map(event_id)).collect();
    let valid_lists = lists_when_caught_up(&client, dataset, &with_case, &expect_train).await?;

    // Phase 2: the validation interactions, in time order.
    let mut valid: Vec<(i64, usize)> =
        with_case.iter().filter_map(|&u| split.valid[u].map(|v| (v.timestamp, u))).collect();
    valid.sort_unstable();
    let valid_events: Vec<Value> = valid
        .iter()
        .filter_map(|&(_, u)| split.valid[u].map(|v| event(dataset, u, split.train[u].len(), &v)))
        .collect();
    client.post_events(&valid_events).await?;
    let expect_valid: Vec<Option<String>> = (0..users).map(|u| Some(event_id(split.train[u].len()))).collect();
    let test_lists = lists_when_caught_up(&client, dataset, &with_case, &expect_valid).await?;

    let score = |lists: &[Vec<String>], target: &dyn Fn(usize) -> Option<Interaction>| {
        let mut sums = MetricSums::default();
        for &u in &with_case {
            let Some(t) = target(u) else { continue };
            let id = &dataset.items[t.item as usize].id;
            let rank = lists[u].iter().position(|i| i == id).map_or(DEPTH + 1, |p| p + 1);
            sums.add(rank);
        }
        sums.mean()
    };
    let metrics =
        PartMetrics { valid: score(&valid_lists, &|u| split.valid[u]), test: score(&test_lists, &|u| split.test[u]) };
    Ok(ServedRun { metrics, valid_lists, test_lists, events: train_events.len() + valid_events.len() })
}

/// Each user's list, asked again until it reflects the user's newest posted event (the bus
/// applies events asynchronously). Fails when no user catches up for [`STALL`].
async fn lists_when_caught_up(
    client: &Client,
    dataset: &Dataset,
    users: &[usize],
    expected: &[Option<String>],
) -> Result<Vec<Vec<String>>, ServedEvalError> {
    let mut lists = vec![Vec::new(); expected.len()];
    let mut progress = Instant::now();
    for &u in users {
        loop {
            let (last, items) = client.list(&dataset.users[u].id).await?;
            if last == expected[u] {
                lists[u] = items;
                progress = Instant::now();
                break;
            }
            if progress.elapsed() > STALL {
                return Err(ServedEvalError::Stalled(STALL));
            }
            // Polling the server's state: the events are on their way through the bus.
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(lists)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_encoded_as_one_path_segment() {
        assert_eq!(urlencode("u 1/x"), "u%201%2Fx");
        assert_eq!(urlencode("A-z_0.~"), "A-z_0.~");
    }
}
