//! Sending batches to a running server over REST: `PUT /v1/items` and `POST /v1/events`.
//!
//! The server checks a batch whole and refuses all of it for one bad line, naming it
//! (`[3].value`): that line is set aside as rejected with the server's code and the rest is sent
//! again, so one bad line costs a round trip, not its batch. `429` and `503` are retried after
//! their `Retry-After`, transport errors and other `5xx` with a capped backoff; a batch sent
//! again is applied once, since its events keep their ids.

use std::time::Duration;

use awc::http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::error::ImportError;
use super::source::{Reason, Rejected};

/// Attempts at one request before the import stops (it can be resumed): with the backoff
/// below, about three minutes of a server that does not answer.
const ATTEMPTS: u32 = 12;
/// The first and the longest wait between attempts without a `Retry-After`.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Answers `429`/`503` with a `Retry-After` taken before the import stops: the server is up
/// and asks for patience (at its usual `Retry-After: 1`, five minutes of it).
const BUSY_ATTEMPTS: u32 = 300;
/// The longest `Retry-After` honoured as given.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(120);

pub struct Client {
    client: awc::Client,
    base: String,
    api_key: Option<String>,
    /// Most lines in one request: `--batch`, halved whenever the server says it is too many.
    pub batch: usize,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    field: Option<String>,
}

/// The parts of `POST /v1/events`' answer the import reads.
#[derive(Deserialize)]
struct Accepted {
    #[serde(default)]
    erased: Vec<usize>,
}

/// Which endpoint a batch goes to.
#[derive(Clone, Copy)]
pub enum Endpoint {
    Items,
    Events,
}

impl Endpoint {
    fn method(self) -> Method {
        match self {
            Endpoint::Items => Method::PUT,
            Endpoint::Events => Method::POST,
        }
    }

    fn path(self) -> &'static str {
        match self {
            Endpoint::Items => "/v1/items",
            Endpoint::Events => "/v1/events",
        }
    }
}

/// `[12].item_id` -> (12, `item_id`).
fn indexed(field: &str) -> Option<(usize, String)> {
    let rest = field.strip_prefix('[')?;
    let (index, tail) = rest.split_once(']')?;
    Some((index.parse().ok()?, tail.trim_start_matches('.').to_owned()))
}

impl Client {
    pub fn new(target: &str, api_key: Option<String>, batch: usize) -> Result<Client, ImportError> {
        if !target.starts_with("http://") {
            return Err(ImportError::Usage(format!(
                "--target {target}: give an http:// URL such as http://127.0.0.1:8080 (this client has no TLS; \
                 import from a host that reaches the server over plain HTTP)"
            )));
        }
        let client = awc::Client::builder().timeout(Duration::from_secs(120)).finish();
        Ok(Client { client, base: target.trim_end_matches('/').to_owned(), api_key, batch: batch.max(1) })
    }

    /// Checks once, without retrying, that the target answers as a liverec server: a wrong
    /// address fails at once rather than after the retries.
    pub async fn check(&self) -> Result<(), ImportError> {
        let url = format!("{}/healthz", self.base);
        match self.client.get(&url).timeout(Duration::from_secs(10)).send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(ImportError::Unreachable(format!(
                "{url} answered {}: is --target a liverec server?",
                response.status()
            ))),
            Err(error) => Err(ImportError::Unreachable(format!("{url}: {error}"))),
        }
    }

    /// Sends `records` (any number) in batches; returns the ones refused, by index.
    pub async fn send<T: Serialize>(
        &mut self,
        endpoint: Endpoint,
        records: &[T],
    ) -> Result<Vec<(usize, Rejected)>, ImportError> {
        let mut rejected = Vec::new();
        let mut start = 0;
        while start < records.len() {
            let end = (start + self.batch).min(records.len());
            rejected.extend(self.send_batch(endpoint, records, (start..end).collect()).await?);
            start = end;
        }
        Ok(rejected)
    }

    /// Sends the records at `live` until each is applied or refused.
    async fn send_batch<T: Serialize>(
        &mut self,
        endpoint: Endpoint,
        records: &[T],
        mut live: Vec<usize>,
    ) -> Result<Vec<(usize, Rejected)>, ImportError> {
        let mut rejected = Vec::new();
        while !live.is_empty() {
            let body: Vec<&T> = live.iter().map(|&i| &records[i]).collect();
            let body = serde_json::to_vec(&body).expect("records serialise");
            let (status, answer) = self.request(endpoint, body).await?;
            if status.is_success() {
                if let Endpoint::Events = endpoint {
                    let mut erased = serde_json::from_slice::<Accepted>(&answer).map(|a| a.erased).unwrap_or_default();
                    erased.sort_unstable();
                    erased.dedup();
                    erased.retain(|&j| j < live.len());
                    for j in erased.into_iter().rev() {
                        let message = "the user was erased after this event's time; it is never applied";
                        let reason = Reason::new("user_erased", "");
                        rejected.push((live.remove(j), Rejected { reason, message: message.into() }));
                    }
                }
                return Ok(rejected);
            }
            let error = serde_json::from_slice::<ErrorBody>(&answer).map(|b| b.error).unwrap_or(ErrorDetail {
                code: String::new(),
                message: String::from_utf8_lossy(&answer).chars().take(200).collect(),
                field: None,
            });
            if status == StatusCode::PAYLOAD_TOO_LARGE && live.len() > 1 {
                // Too many for the server (events.max_batch or server.max_body_bytes): halves,
                // and smaller batches from now on.
                self.batch = (live.len() / 2).max(1);
                let second = live.split_off(live.len() / 2);
                for part in [live, second] {
                    rejected.extend(Box::pin(self.send_batch(endpoint, records, part)).await?);
                }
                return Ok(rejected);
            }
            match error.field.as_deref().and_then(indexed) {
                Some((j, field)) if status.is_client_error() && j < live.len() => {
                    let reason = Reason { code: error.code, field };
                    rejected.push((live.remove(j), Rejected { reason, message: error.message }));
                }
                // Every event of the batch is of an erased user, dated before the erasure; or
                // one line alone is over the body limit.
                _ if (status == StatusCode::CONFLICT && error.code == "user_erased")
                    || status == StatusCode::PAYLOAD_TOO_LARGE =>
                {
                    for i in live.drain(..) {
                        let reason = Reason::new(&error.code, "");
                        rejected.push((i, Rejected { reason, message: error.message.clone() }));
                    }
                }
                _ if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                    return Err(ImportError::Refused {
                        status: status.as_u16(),
                        code: error.code,
                        message: format!(
                            "{} (give a key with the producer role: --api-key, or the LIVEREC_API_KEY environment variable)",
                            error.message
                        ),
                    })
                }
                _ => {
                    return Err(ImportError::Refused { status: status.as_u16(), code: error.code, message: error.message })
                }
            }
        }
        Ok(rejected)
    }

    /// One request, retried while the server is busy or unreachable. Returns any answer that
    /// is not worth retrying.
    async fn request(&self, endpoint: Endpoint, body: Vec<u8>) -> Result<(StatusCode, bytes::Bytes), ImportError> {
        let url = format!("{}{}", self.base, endpoint.path());
        let mut backoff = BACKOFF_FIRST;
        let mut last = String::new();
        let (mut failures, mut busy_answers) = (0, 0);
        while failures < ATTEMPTS && busy_answers < BUSY_ATTEMPTS {
            let mut request =
                self.client.request(endpoint.method(), &url).insert_header(("content-type", "application/json"));
            if let Some(key) = &self.api_key {
                request = request.insert_header(("authorization", format!("Bearer {key}")));
            }
            let wait = match request.send_body(body.clone()).await {
                Ok(mut response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s).min(RETRY_AFTER_MAX));
                    let answer = response.body().limit(1 << 20).await.unwrap_or_default();
                    let busy = matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE);
                    if !(busy || status.is_server_error()) {
                        return Ok((status, answer));
                    }
                    last =
                        format!("{status} {}", String::from_utf8_lossy(&answer).chars().take(200).collect::<String>());
                    match retry_after {
                        Some(wait) if busy => {
                            busy_answers += 1;
                            wait
                        }
                        _ => {
                            failures += 1;
                            backoff
                        }
                    }
                }
                Err(error) => {
                    last = error.to_string();
                    failures += 1;
                    backoff
                }
            };
            tracing::debug!(url = %url, wait_ms = wait.as_millis() as u64, last = %last, "retrying");
            actix_web::rt::time::sleep(wait).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        Err(ImportError::Unreachable(format!(
            "{url}: gave up after {} attempts (last answer: {last})",
            failures + busy_answers
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_fields_name_the_line_and_field() {
        assert_eq!(indexed("[12].item_id"), Some((12, "item_id".to_owned())));
        assert_eq!(indexed("[0].context.country"), Some((0, "context.country".to_owned())));
        assert_eq!(indexed("[3]"), Some((3, String::new())));
        assert_eq!(indexed("item_id"), None);
    }
}
