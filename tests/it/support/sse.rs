//! A Server-Sent Events client reading a user's recommendation stream over a real HTTP
//! connection.

use actix_web::web::Bytes;
use futures_util::StreamExt as _;
use liverec::Server;
use serde_json::Value;

use super::http::client;
use super::server::DEADLINE;

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
    pub async fn connect(server: &Server, user: &str, last_event_id: Option<&str>) -> SseStream {
        let mut request = client().get(format!("{}/v1/users/{user}/recommendations/stream", server.url()));
        if let Some(id) = last_event_id {
            request = request.insert_header(("last-event-id", id));
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
        let (_, list) = self.next_list_with_id().await;
        list
    }

    /// The next recommendation list and its event id, failing the test after the deadline.
    pub async fn next_list_with_id(&mut self) -> (String, Value) {
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
        (event.id.unwrap_or_default(), serde_json::from_str(&event.data).expect("list JSON"))
    }
}
