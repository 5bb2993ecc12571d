//! The client of the restart tests: it posts batches of events one after another, at a steady
//! pace, while the test takes a service or the server away and brings it back, and retries a
//! batch that did not get a `202` with the same event ids, as the `503` tells clients to. What it
//! records of each attempt is up to the test.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use serde_json::{json, Value};

use super::http::client;
use super::server::{wait_for_progress, Progress};
use super::services::{redis_conn, stored_ids};

/// Users get at most this many events each (plus one at the end), below `session.history_len`
/// (50), so the stored history holds every one of them.
const BATCHES_PER_USER: usize = 40;

/// Batch `batch` of a restart test: one event for each of four users, each with its own id; the
/// ids and user names start with `prefix`.
pub fn restart_batch(prefix: &str, batch: usize) -> Vec<(String, String)> {
    (0..4).map(|j| (format!("{prefix}-{}-{j}", batch / BATCHES_PER_USER), format!("{prefix}-{batch}-{j}"))).collect()
}

/// Every event id of batches `0..batches`, per user in the order they were sent: what the store
/// must hold afterwards, each exactly once.
pub fn restart_expected(prefix: &str, batches: usize) -> Vec<(String, Vec<String>)> {
    let mut expected: Vec<(String, Vec<String>)> = Vec::new();
    for batch in 0..batches {
        for (user, id) in restart_batch(prefix, batch) {
            match expected.iter_mut().find(|(u, _)| *u == user) {
                Some((_, ids)) => ids.push(id),
                None => expected.push((user, vec![id])),
            }
        }
    }
    expected
}

/// The JSON body of [`restart_batch`]: a `view` of one item per user.
pub fn restart_body(prefix: &str, batch: usize) -> String {
    let events: Vec<Value> = restart_batch(prefix, batch)
        .into_iter()
        .map(|(user, id)| {
            json!({ "user_id": user, "item_id": format!("item-{:04}", batch % 200), "event_type": "view", "event_id": id })
        })
        .collect();
    Value::from(events).to_string()
}

/// The restart tests' clients send 20 requests a second: a pace, not a wait for anything.
fn client_pace() -> actix_rt::time::Interval {
    let mut pace = actix_rt::time::interval(Duration::from_millis(50));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    pace
}

/// The answer to one `POST /v1/events` of a [`RestartClient`].
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    /// The JSON body (`null` when it is not JSON).
    pub body: Value,
}

/// One `POST /v1/events` of a [`RestartClient`], before the test records what it needs of it.
#[derive(Debug)]
pub struct Exchange<P> {
    /// The batch the client was posting; a retry keeps its number and its event ids.
    pub batch: usize,
    /// The phase of the test when the request was sent, and when its answer (or error) came.
    pub sent: P,
    pub ended: P,
    /// The answer, or the client's error when no answer came.
    pub answer: Result<Answer, String>,
    /// Printed for the record, never asserted on.
    pub took: Duration,
}

/// A client posting batches to `url` one after another until `stop`: a batch that did not get a
/// `202` (refused, or no answer at all) is retried, with the same event ids, until it does.
pub struct RestartClient<P> {
    pub url: String,
    /// Starts the user names and event ids of every batch ([`restart_batch`]).
    pub prefix: &'static str,
    /// What the test has done to the service so far, set by the test.
    pub phase: Rc<Cell<P>>,
    /// Set while a request is on its way, so the test can strike then.
    pub in_flight: Rc<Cell<bool>>,
    /// Set by the test to end the client before its next batch.
    pub stop: Rc<Cell<bool>>,
}

impl<P: Copy> RestartClient<P> {
    /// Posts until stopped, pushing `record(exchange)` of every attempt onto `records`.
    pub async fn run<R>(self, records: Rc<RefCell<Vec<R>>>, record: impl Fn(Exchange<P>) -> R) {
        // The pace of the client (20 requests a second), not a wait for anything: it keeps the
        // number of events, and of users, small whatever the outage lasts.
        let mut pace = client_pace();
        let client = client();
        for batch in 0.. {
            if self.stop.get() {
                return;
            }
            let body = restart_body(self.prefix, batch);
            loop {
                pace.tick().await;
                let sent = self.phase.get();
                let started = std::time::Instant::now();
                self.in_flight.set(true);
                let response = client
                    .post(format!("{}/v1/events", self.url))
                    .insert_header(("content-type", "application/json"))
                    .send_body(body.clone())
                    .await;
                let answer = match response {
                    Ok(mut response) => {
                        let status = response.status().as_u16();
                        let retry_after =
                            response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
                        // Read the body so the connection can be reused; its loss changes nothing.
                        let body = match response.body().await {
                            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                            Err(_) => Value::Null,
                        };
                        Ok(Answer { status, retry_after, body })
                    }
                    Err(error) => Err(error.to_string()),
                };
                self.in_flight.set(false);
                let accepted = answer.as_ref().is_ok_and(|a| a.status == 202);
                records.borrow_mut().push(record(Exchange {
                    batch,
                    sent,
                    ended: self.phase.get(),
                    answer,
                    took: started.elapsed(),
                }));
                if accepted {
                    break;
                }
            }
        }
    }
}

/// How long the stored events may stand still after a restart before the wait fails: the
/// consumer first rejoins its group (librdkafka's reconnect backoff, the group's session
/// timeout), which stores nothing for a while and takes several times longer on a busy machine
/// (over 60 s once, at load 11-21).
const RECOVERY_STALL: Duration = Duration::from_secs(180);

/// Waits until each user's last expected id is in Redis, then asserts that the stored ids are
/// exactly the expected ones: each once, in order, none missing. Fails only when the stored ids
/// stop growing for [`RECOVERY_STALL`].
pub async fn assert_stored_exactly(config: &liverec::config::Config, expected: &[(String, Vec<String>)]) {
    let redis = redis_conn(config).await;
    for (user, ids) in expected {
        let stored = wait_for_progress(&format!("the last event of {user} in redis"), RECOVERY_STALL, || {
            let redis = redis.clone();
            async move {
                let stored = stored_ids(redis, config, user).await;
                if stored.last() == ids.last() {
                    return Progress::Done(stored);
                }
                Progress::Pending(stored.len())
            }
        })
        .await;
        assert_eq!(&stored, ids, "{user}: every event that got a 202 exactly once and in order, none missing");
    }
}
