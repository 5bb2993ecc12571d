//! Shared test helpers: a real server on 127.0.0.1:0, real HTTP/SSE/WebSocket clients, metric
//! scraping, and waiting with a deadline instead of sleeping.

use std::future::Future;
use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use awc::ws;
use futures_util::{SinkExt as _, StreamExt as _};
use liverec::config::Config;
use liverec::Server;
use serde_json::Value;

/// How long any single wait may take before the test fails: generous, because a loaded CI
/// machine joining a Kafka consumer group can take many seconds. It bounds a hang; it asserts
/// nothing about speed.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The configuration every test server starts from: the embedded default, a free port, a small
/// demo catalogue (so start-up is quick), and two threads of each kind.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    config.server.workers = 2;
    config.session.arbiters = 2;
    config.demo.items = 200;
    config.demo.users = 300;
    config.log.level = "warn".into();
    config
}

pub async fn start(config: Config) -> Server {
    liverec::telemetry::init_logging(&config.log);
    Server::start(config).await.expect("server starts")
}

/// Polls `check` until it returns `Some`, failing the test after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(DEADLINE, what, check).await
}

/// [`eventually`] with a bound of its own, for a wait that spans several stages of work (a
/// whole retraining run with its canary) on a machine shared with the rest of the suite.
pub async fn eventually_within<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
}

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

/// One parsed SSE event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// An SSE client reading `text/event-stream` over a real HTTP connection.
pub struct SseStream {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, awc::error::PayloadError>>>>,
    buffer: String,
}

impl SseStream {
    pub async fn connect(server: &Server, user: &str, last_event_id: Option<u64>) -> SseStream {
        let mut request = client().get(format!("{}/v1/users/{user}/recommendations/stream", server.url()));
        if let Some(id) = last_event_id {
            request = request.insert_header(("last-event-id", id.to_string()));
        }
        let response = request.send().await.expect("SSE connect");
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(response.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream"));
        SseStream { body: Box::pin(response), buffer: String::new() }
    }

    /// The next event (heartbeat comments skipped), or `None` when the stream ends.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent { id: None, event: "message".into(), data: String::new() };
                let mut any = false;
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        event.id = Some(v.to_owned());
                        any = true;
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event.event = v.to_owned();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        event.data.push_str(v);
                        any = true;
                    }
                }
                if any && !event.data.is_empty() {
                    return Some(event);
                }
                continue;
            }
            let chunk = self.body.next().await?.ok()?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// The next recommendation list, failing the test after the deadline.
    pub async fn next_list(&mut self) -> Value {
        let event = actix_rt::time::timeout(DEADLINE, async {
            loop {
                let event = self.next_event().await.expect("SSE stream ended");
                if event.event == "recommendations" {
                    return event;
                }
            }
        })
        .await
        .expect("timed out waiting for an SSE list");
        serde_json::from_str(&event.data).expect("list JSON")
    }
}

/// A WebSocket client over a real connection.
pub struct WsClient {
    framed: actix_codec::Framed<awc::BoxedSocket, ws::Codec>,
}

impl WsClient {
    pub async fn connect(server: &Server) -> WsClient {
        let (_, framed) = client()
            .ws(format!("{}/v1/ws", server.url()))
            .max_frame_size(4 * 1024 * 1024)
            .connect()
            .await
            .expect("WebSocket connect");
        WsClient { framed }
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.framed.send(ws::Message::Text(text.into().into())).await.expect("send");
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(value.to_string()).await;
    }

    pub async fn send(&mut self, message: ws::Message) {
        self.framed.send(message).await.expect("send");
    }

    /// The next frame that is not a ping (pings are answered).
    pub async fn next_frame(&mut self) -> Option<ws::Frame> {
        actix_rt::time::timeout(DEADLINE, async {
            loop {
                match self.framed.next().await {
                    Some(Ok(ws::Frame::Ping(bytes))) => {
                        let _ = self.framed.send(ws::Message::Pong(bytes)).await;
                    }
                    Some(Ok(frame)) => return Some(frame),
                    _ => return None,
                }
            }
        })
        .await
        .expect("timed out waiting for a WebSocket frame")
    }

    /// Reads until the server's close frame and returns its code; fails if the socket ends
    /// without one.
    pub async fn next_close_code(&mut self) -> Option<ws::CloseCode> {
        loop {
            match self.next_frame().await {
                Some(ws::Frame::Close(reason)) => return reason.map(|r| r.code),
                Some(_) => continue,
                None => panic!("socket ended without a close frame"),
            }
        }
    }

    /// The next JSON text message.
    pub async fn next_json(&mut self) -> Value {
        match self.next_frame().await {
            Some(ws::Frame::Text(bytes)) => serde_json::from_slice(&bytes).expect("JSON message"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next message of the given `type`, skipping others.
    pub async fn next_of_type(&mut self, kind: &str) -> Value {
        loop {
            let message = self.next_json().await;
            if message["type"] == kind {
                return message;
            }
        }
    }
}
