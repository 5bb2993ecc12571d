//! Plain HTTP against the server under test: requests whose answers are read whole (status,
//! headers and JSON body), events, metric samples, and the item ids of a list.

use std::time::Duration;

use actix_web::web::Bytes;
use liverec::Server;
use serde_json::Value;

pub fn client() -> awc::Client {
    awc::Client::builder().connector(awc::Connector::new().limit(0)).timeout(Duration::from_secs(10)).finish()
}

pub struct Response {
    pub status: u16,
    #[allow(dead_code)] // kept for tests that check headers such as Retry-After
    pub headers: awc::http::header::HeaderMap,
    pub body: Value,
}

async fn finish(
    mut response: awc::ClientResponse<
        impl futures_util::Stream<Item = Result<Bytes, awc::error::PayloadError>> + Unpin,
    >,
) -> Response {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.body().limit(16 * 1024 * 1024).await.expect("body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Response { status, headers, body }
}

pub async fn get(server: &Server, path: &str) -> Response {
    let response = client().get(format!("{}{path}", server.url())).send().await.expect("GET");
    finish(response).await
}

pub async fn post_json(server: &Server, path: &str, body: &Value) -> Response {
    post_raw(server, path, "application/json", body.to_string()).await
}

pub async fn post_raw(server: &Server, path: &str, content_type: &str, body: impl Into<Bytes>) -> Response {
    let response = client()
        .post(format!("{}{path}", server.url()))
        .insert_header(("content-type", content_type))
        .send_body(body.into())
        .await
        .expect("POST");
    finish(response).await
}

pub async fn put_json(server: &Server, path: &str, body: &Value) -> Response {
    let response = client()
        .put(format!("{}{path}", server.url()))
        .insert_header(("content-type", "application/json"))
        .send_body(body.to_string())
        .await
        .expect("PUT");
    finish(response).await
}

/// Posts events and asserts they were accepted.
pub async fn post_events(server: &Server, events: Value) -> Value {
    let response = post_json(server, "/v1/events", &events).await;
    assert_eq!(response.status, 202, "events refused: {}", response.body);
    response.body
}

pub fn event(user: &str, item: &str, event_type: &str) -> Value {
    serde_json::json!({ "user_id": user, "item_id": item, "event_type": event_type })
}

/// Reads one metric sample (`name` or `name{labels}`) from `/metrics`.
pub async fn metric(server: &Server, sample: &str) -> f64 {
    let response = client().get(format!("{}/metrics", server.url())).send().await.expect("metrics");
    let text = String::from_utf8(finish_bytes(response).await.to_vec()).expect("utf-8");
    parse_metric(&text, sample).unwrap_or_else(|| panic!("no metric {sample} in:\n{text}"))
}

/// Waits until the metric `sample` reaches `target`, failing only if it stops moving for `stall`.
pub async fn wait_for_metric(server: &Server, sample: &str, target: f64, stall: Duration) {
    super::wait_for_progress(sample, stall, || async {
        let value = metric(server, sample).await;
        if value >= target {
            super::Progress::Done(())
        } else {
            super::Progress::Pending(value as u64)
        }
    })
    .await;
}

async fn finish_bytes(
    mut response: awc::ClientResponse<
        impl futures_util::Stream<Item = Result<Bytes, awc::error::PayloadError>> + Unpin,
    >,
) -> Bytes {
    response.body().limit(16 * 1024 * 1024).await.expect("body")
}

pub fn parse_metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
    })
}

/// Item ids of a recommendation list.
pub fn items(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["item_id"].as_str().expect("item id").to_owned())
        .collect()
}

/// The event ids of a user's history, from the answer of `GET /v1/users/{id}/export`.
pub fn history(export: &Response) -> Vec<String> {
    export.body["profile"]["interactions"]
        .as_array()
        .expect("interactions")
        .iter()
        .map(|i| i["event_id"].as_str().expect("event id").to_owned())
        .collect()
}

/// A GET or POST with an optional API key (as a bearer token): the status and the JSON body
/// (`null` when the body is not JSON).
pub async fn call(
    server: &liverec::Server,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("{}{path}", server.url());
    let mut request = match method {
        "POST" => client().post(url),
        _ => client().get(url),
    };
    if let Some(key) = key {
        request = request.insert_header(("authorization", format!("Bearer {key}")));
    }
    let mut response = match body {
        Some(body) => request.insert_header(("content-type", "application/json")).send_body(body.to_string()).await,
        None => request.send().await,
    }
    .expect("request");
    let status = response.status().as_u16();
    let bytes = response.body().await.expect("body");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}
