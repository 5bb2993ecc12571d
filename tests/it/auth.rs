//! Authentication and authorisation with auth on: API keys by role, per-user stream tokens on
//! GET, SSE and WebSocket, WebSocket origins, and CORS (rate and stream limits are in `limits`).

use liverec::auth::{new_key, AuthMode, Role};
use serde_json::{json, Value};

use crate::support::*;

pub struct Keys {
    pub producer: String,
    pub reader: String,
    pub admin: String,
}

/// A server with auth on and a key of each role.
pub async fn secured() -> (liverec::Server, Keys) {
    let mut config = test_config();
    config.auth.mode = AuthMode::On;
    config.auth.token_secret = "a test secret that is long enough to sign".into();
    let mut keys = Vec::new();
    for (id, role) in [("ingest", Role::Producer), ("web", Role::Reader), ("ops", Role::Admin)] {
        let (key, entry) = new_key(id, role).expect("random key");
        config.auth.api_keys.push(entry);
        keys.push(key);
    }
    let server = start(config).await;
    let [producer, reader, admin]: [String; 3] = keys.try_into().expect("three keys");
    (server, Keys { producer, reader, admin })
}

#[actix_rt::test]
async fn api_keys_grant_what_their_role_allows() {
    let (server, keys) = secured().await;
    let click = json!({ "user_id": "alice", "item_id": "item-0003", "event_type": "click" });

    let (status, body) = call(&server, "POST", "/v1/events", None, Some(click.clone())).await;
    assert_eq!((status, body["error"]["code"].clone()), (401, json!("unauthorized")), "{body}");
    let (status, _) = call(&server, "POST", "/v1/events", Some("lrk_not_a_key"), Some(click.clone())).await;
    assert_eq!(status, 401);
    let (status, body) = call(&server, "POST", "/v1/events", Some(&keys.reader), Some(click.clone())).await;
    assert_eq!((status, body["error"]["code"].clone()), (403, json!("forbidden")), "readers do not write: {body}");
    let (status, _) = call(&server, "POST", "/v1/events", Some(&keys.producer), Some(click.clone())).await;
    assert_eq!(status, 202);

    let recs = "/v1/users/alice/recommendations";
    assert_eq!(call(&server, "GET", recs, Some(&keys.producer), None).await.0, 403, "producers do not read");
    let (status, list) = call(&server, "GET", recs, Some(&keys.reader), None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(call(&server, "GET", "/v1/admin/models", Some(&keys.reader), None).await.0, 403);
    assert_eq!(call(&server, "GET", "/v1/monitor", Some(&keys.producer), None).await.0, 403);
    assert_eq!(call(&server, "GET", "/v1/admin/models", Some(&keys.admin), None).await.0, 200);
    // Every action on the model loop needs the admin role.
    for path in ["/v1/admin/promote", "/v1/admin/rollback", "/v1/admin/retrain", "/v1/admin/models/v1/promote"] {
        assert_eq!(call(&server, "POST", path, Some(&keys.reader), Some(json!({}))).await.0, 403, "{path}");
        assert_eq!(call(&server, "POST", path, None, Some(json!({}))).await.0, 401, "{path}");
    }
    assert_eq!(call(&server, "GET", recs, Some(&keys.admin), None).await.0, 200, "admin may do everything");
    // Health and metrics stay open for probes and scrapers.
    assert_eq!(get(&server, "/healthz").await.status, 200);
    assert_eq!(get(&server, "/metrics").await.status, 200);
    server.stop().await;
}

#[actix_rt::test]
async fn a_stream_token_reads_and_writes_only_its_own_user() {
    let (server, keys) = secured().await;
    let (status, minted) = call(
        &server,
        "POST",
        "/v1/admin/tokens",
        Some(&keys.admin),
        Some(json!({ "user_id": "alice", "ttl_secs": 600 })),
    )
    .await;
    assert_eq!(status, 201, "{minted}");
    let token = minted["token"].as_str().expect("token").to_owned();
    let (status, _) =
        call(&server, "POST", "/v1/admin/tokens", Some(&keys.reader), Some(json!({ "user_id": "alice" }))).await;
    assert_eq!(status, 403, "only admins mint tokens");

    assert_eq!(call(&server, "GET", "/v1/users/alice/recommendations", Some(&token), None).await.0, 200);
    assert_eq!(call(&server, "GET", "/v1/users/bob/recommendations", Some(&token), None).await.0, 403);
    let own = json!({ "user_id": "alice", "item_id": "item-0007", "event_type": "view" });
    let other = json!([own.clone(), { "user_id": "bob", "item_id": "item-0007", "event_type": "view" }]);
    assert_eq!(call(&server, "POST", "/v1/events", Some(&token), Some(own)).await.0, 202);
    let (status, body) = call(&server, "POST", "/v1/events", Some(&token), Some(other)).await;
    assert_eq!((status, body["error"]["field"].clone()), (403, json!("[1].user_id")), "{body}");
    assert_eq!(call(&server, "GET", "/v1/admin/models", Some(&token), None).await.0, 403);

    // SSE from a browser: the token in the query string.
    let sse = |user: &str, token: &str| {
        client().get(format!("{}/v1/users/{user}/recommendations/stream?access_token={token}", server.url())).send()
    };
    assert_eq!(sse("alice", &token).await.expect("sse").status(), 200);
    assert_eq!(sse("bob", &token).await.expect("sse").status(), 403);
    // A tampered token is refused.
    let tampered = format!("{}x", &token[..token.len() - 1]);
    assert_eq!(call(&server, "GET", "/v1/users/alice/recommendations", Some(&tampered), None).await.0, 401);

    // WebSocket: subscribing to another user is refused, to one's own accepted.
    let (_, mut connection) = client()
        .ws(format!("{}/v1/ws?access_token={token}", server.url()))
        .connect()
        .await
        .expect("websocket with a token");
    use futures_util::{SinkExt as _, StreamExt as _};
    connection.send(awc::ws::Message::Text(json!({ "subscribe": "bob" }).to_string().into())).await.expect("send");
    let refused = next_json(&mut connection).await;
    assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
    connection.send(awc::ws::Message::Text(json!({ "subscribe": "alice" }).to_string().into())).await.expect("send");
    let accepted = next_json(&mut connection).await;
    assert_eq!(accepted["type"], "subscribed", "{accepted}");
    let _ = connection.next().await;

    // Without credentials the handshake itself is refused.
    let refused = client().ws(format!("{}/v1/ws", server.url())).connect().await;
    assert!(matches!(refused, Err(awc::error::WsClientError::InvalidResponseStatus(s)) if s.as_u16() == 401));
    // A page of another origin may not open a socket.
    let foreign = client()
        .ws(format!("{}/v1/ws?access_token={token}", server.url()))
        .origin("https://evil.example")
        .connect()
        .await;
    assert!(matches!(foreign, Err(awc::error::WsClientError::InvalidResponseStatus(s)) if s.as_u16() == 403));
    server.stop().await;
}

async fn next_json(connection: &mut actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>) -> Value {
    use futures_util::StreamExt as _;
    loop {
        match connection.next().await.expect("frame").expect("frame ok") {
            awc::ws::Frame::Text(text) => return serde_json::from_slice(&text).expect("json"),
            _ => continue,
        }
    }
}

#[actix_rt::test]
async fn cors_allows_the_configured_origins_and_the_servers_own_pages() {
    let mut config = test_config();
    config.auth.allowed_origins = vec!["https://shop.example".into()];
    let server = start(config).await;
    let preflight = |origin: &'static str| {
        client()
            .request(awc::http::Method::OPTIONS, format!("{}/v1/events", server.url()))
            .insert_header(("origin", origin))
            .insert_header(("access-control-request-method", "POST"))
            .insert_header(("access-control-request-headers", "content-type, authorization"))
            .send()
    };
    let allowed = preflight("https://shop.example").await.expect("preflight");
    assert_eq!(allowed.status(), 200);
    assert_eq!(
        allowed.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()),
        Some("https://shop.example")
    );
    let refused = preflight("https://evil.example").await.expect("preflight");
    assert!(refused.headers().get("access-control-allow-origin").is_none(), "no CORS grant for other origins");
    // The server's own pages post with their Origin and pass.
    let own = format!("http://{}", server.addr);
    let posted = client()
        .post(format!("{}/v1/events", server.url()))
        .insert_header(("origin", own.as_str()))
        .insert_header(("content-type", "application/json"))
        .send_body(json!({ "user_id": "o", "item_id": "item-0001", "event_type": "view" }).to_string())
        .await
        .expect("post");
    assert_eq!(posted.status(), 202);
    server.stop().await;
}

/// A stream token for `user` valid `ttl_secs`, signed with the secret [`secured`] configures.
fn short_token(user: &str, ttl_secs: u64) -> String {
    let mut config = test_config().auth;
    config.mode = AuthMode::On;
    config.token_secret = "a test secret that is long enough to sign".into();
    liverec::auth::Auth::new(&config, false).expect("auth").mint(user, ttl_secs)
}

/// Every text message until the server's close frame, and the close code.
async fn until_close(
    connection: &mut actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>,
) -> (Vec<Value>, Option<awc::ws::CloseCode>) {
    use futures_util::{SinkExt as _, StreamExt as _};
    let mut texts = Vec::new();
    let read = async {
        loop {
            match connection.next().await {
                Some(Ok(awc::ws::Frame::Text(text))) => texts.push(serde_json::from_slice(&text).expect("json")),
                Some(Ok(awc::ws::Frame::Ping(bytes))) => {
                    let _ = connection.send(awc::ws::Message::Pong(bytes)).await;
                }
                Some(Ok(awc::ws::Frame::Close(reason))) => return reason.map(|r| r.code),
                Some(Ok(_)) => continue,
                other => panic!("the socket ended without a close frame: {other:?}"),
            }
        }
    };
    let code = actix_rt::time::timeout(DEADLINE, read).await.expect("a close frame before the deadline");
    (texts, code)
}

#[actix_rt::test]
async fn a_websocket_closes_when_its_token_expires() {
    use futures_util::SinkExt as _;
    let (server, _keys) = secured().await;
    let token = short_token("alice", 2);
    let (_, mut connection) =
        client().ws(format!("{}/v1/ws?access_token={token}", server.url())).connect().await.expect("websocket");
    connection.send(awc::ws::Message::Text(json!({ "subscribe": "alice" }).to_string().into())).await.expect("send");
    let event = json!({ "event": { "user_id": "alice", "item_id": "item-0001", "event_type": "view" } });
    connection.send(awc::ws::Message::Text(event.to_string().into())).await.expect("send");
    let (texts, code) = until_close(&mut connection).await;
    let kinds: Vec<&str> = texts.iter().filter_map(|t| t["type"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"subscribed"), "{texts:?}");
    assert_eq!(kinds.last(), Some(&"token_expired"), "the last message says why: {texts:?}");
    assert_eq!(code, Some(awc::ws::CloseCode::Policy), "{texts:?}");
    // The expired token opens no new socket and reads nothing.
    let refused = client().ws(format!("{}/v1/ws?access_token={token}", server.url())).connect().await;
    assert!(matches!(refused, Err(awc::error::WsClientError::InvalidResponseStatus(s)) if s.as_u16() == 401));
    assert_eq!(call(&server, "GET", "/v1/users/alice/recommendations", Some(&token), None).await.0, 401);
    server.stop().await;
}

#[actix_rt::test]
async fn a_websocket_refuses_messages_after_its_token_expired() {
    use futures_util::SinkExt as _;
    let (server, _keys) = secured().await;
    let token = short_token("alice", 2);
    let (_, mut connection) =
        client().ws(format!("{}/v1/ws?access_token={token}", server.url())).connect().await.expect("websocket");
    // Keep posting until the socket says the token expired: no event is acknowledged after it.
    let event = json!({ "event": { "user_id": "alice", "item_id": "item-0001", "event_type": "view" } });
    let mut acked_after_expiry = 0;
    let mut expired = false;
    let deadline = std::time::Instant::now() + DEADLINE;
    use futures_util::StreamExt as _;
    while std::time::Instant::now() < deadline {
        if connection.send(awc::ws::Message::Text(event.to_string().into())).await.is_err() {
            break;
        }
        match connection.next().await {
            Some(Ok(awc::ws::Frame::Text(text))) => {
                let reply: Value = serde_json::from_slice(&text).expect("json");
                match reply["type"].as_str() {
                    Some("token_expired") => expired = true,
                    Some("ack") if expired => acked_after_expiry += 1,
                    _ => {}
                }
            }
            Some(Ok(awc::ws::Frame::Close(reason))) => {
                assert_eq!(reason.map(|r| r.code), Some(awc::ws::CloseCode::Policy));
                break;
            }
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    assert!(expired, "the socket said the token expired");
    assert_eq!(acked_after_expiry, 0);
    server.stop().await;
}

#[actix_rt::test]
async fn an_sse_stream_ends_when_its_token_expires() {
    let (server, _keys) = secured().await;
    let token = short_token("alice", 2);
    let url = format!("{}/v1/users/alice/recommendations/stream?access_token={token}", server.url());
    let response = client().get(&url).timeout(DEADLINE).send().await.expect("sse");
    assert_eq!(response.status().as_u16(), 200);
    // The body ends (the server closes the stream) with the reason as its last event.
    let mut response = response.timeout(DEADLINE);
    let body = response.body().limit(1 << 20).await.expect("the stream ends");
    let text = String::from_utf8_lossy(&body);
    let last = text.trim_end().rsplit("\n\n").next().unwrap_or_default();
    assert!(last.starts_with("event: token_expired"), "{text}");
    assert_eq!(client().get(&url).send().await.expect("sse").status().as_u16(), 401, "an expired token is refused");
    server.stop().await;
}

#[actix_rt::test]
async fn query_string_credentials_are_only_stream_tokens_on_get() {
    let (server, keys) = secured().await;
    let token = short_token("alice", 600);
    let refused = |mut response: awc::ClientResponse<_>| async move {
        let status = response.status().as_u16();
        let body: Value = serde_json::from_slice(&response.body().await.expect("body")).unwrap_or(Value::Null);
        (status, body)
    };
    let url = |path: &str, credential: &str| format!("{}{path}?access_token={credential}", server.url());
    // API keys in the query string are refused everywhere, with a message saying where they go.
    for (path, key) in [("/v1/admin/models", &keys.admin), ("/v1/users/alice/recommendations", &keys.reader)] {
        let (status, body) = refused(client().get(url(path, key)).send().await.expect("get")).await;
        assert_eq!((status, body["error"]["code"].clone()), (401, json!("unauthorized")), "{path}: {body}");
        assert!(body["error"]["message"].as_str().unwrap_or_default().contains("header"), "{body}");
    }
    let (status, body) =
        refused(client().delete(url("/v1/users/alice", &keys.admin)).send().await.expect("delete")).await;
    assert_eq!(status, 401, "{body}");
    let ws = client().ws(url("/v1/ws", &keys.admin)).connect().await;
    assert!(matches!(ws, Err(awc::error::WsClientError::InvalidResponseStatus(s)) if s.as_u16() == 401));
    // A stream token in the query string works on GET, not on a write.
    let (status, _) =
        refused(client().get(url("/v1/users/alice/recommendations", &token)).send().await.expect("get")).await;
    assert_eq!(status, 200);
    let event = json!({ "user_id": "alice", "item_id": "item-0007", "event_type": "view" });
    let (status, body) = refused(
        client()
            .post(url("/v1/events", &token))
            .insert_header(("content-type", "application/json"))
            .send_body(event.to_string())
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    // Headers keep working for keys and tokens alike.
    assert_eq!(call(&server, "GET", "/v1/admin/models", Some(&keys.admin), None).await.0, 200);
    assert_eq!(call(&server, "POST", "/v1/events", Some(&token), Some(event)).await.0, 202);
    server.stop().await;
}
