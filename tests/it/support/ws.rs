//! A WebSocket client over a real connection to `/v1/ws`: sends text and JSON, answers pings,
//! and reads messages by type.

use awc::ws;
use futures_util::{SinkExt as _, StreamExt as _};
use liverec::Server;
use serde_json::Value;

use super::http::client;
use super::server::DEADLINE;

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
