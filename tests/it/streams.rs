//! Streams: events posted over REST reach the user's SSE and WebSocket subscribers and the pushed
//! list reflects them; many subscribers each get only their own user's updates; SSE resumes from
//! `Last-Event-ID` and shutdown closes streams; bad WebSocket messages get errors and the socket
//! keeps working.

use std::collections::HashMap;

use awc::ws;
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::support::*;

/// Teaches the online model that `x` and `y` go together: several users view `x` then `y`. They
/// watch on TVs, so `x` and `y` become popular in the TV segment, not in the reader's: the
/// warm-up's users count one vote per item, and eight teachers in the reader's own segment would
/// put `y` in a new reader's list before any click.
async fn teach_pair(server: &liverec::Server, x: &str, y: &str) {
    let mut batch = Vec::new();
    for u in 0..8 {
        for item in [x, y] {
            let mut view = event(&format!("teacher-{x}-{u}"), item, "view");
            view["context"] = json!({ "device": "tv" });
            batch.push(view);
        }
    }
    post_events(server, json!(batch)).await;
    // The teaching is applied once every teacher session has it.
    eventually("teaching events applied", || async {
        (metric(server, "liverec_session_applied_events_total").await >= 16.0).then_some(())
    })
    .await;
}

#[actix_rt::test]
async fn rest_event_updates_sse_and_websocket_subscribers() {
    let server = start(test_config()).await;
    teach_pair(&server, "it-x", "it-y").await;

    let mut sse = SseStream::connect(&server, "reader", None).await;
    let mut ws = WsClient::connect(&server).await;
    ws.send_json(&json!({ "subscribe": "reader" })).await;
    assert_eq!(ws.next_json().await, json!({ "type": "subscribed", "user_id": "reader" }));

    let first_sse = sse.next_list().await;
    let first_ws = ws.next_of_type("recommendations").await["data"].clone();
    assert_eq!(first_sse["user_id"], "reader");
    assert_eq!(first_sse, first_ws, "both streams show the same list");
    assert!(!items(&first_sse).contains(&"it-y".to_owned()), "y is not popular on its own");

    let accepted = post_events(&server, json!({ "user_id": "reader", "item_id": "it-x", "event_type": "click" })).await;
    assert_eq!(accepted["accepted"], 1);

    let seq0 = first_sse["seq"].as_u64().expect("seq");
    let next_sse = sse.next_list().await;
    let next_ws = ws.next_of_type("recommendations").await["data"].clone();
    for list in [&next_sse, &next_ws] {
        assert_eq!(list["user_id"], "reader");
        assert!(list["seq"].as_u64().expect("seq") > seq0);
        let ids = items(list);
        assert!(!ids.contains(&"it-x".to_owned()), "the consumed item is excluded: {ids:?}");
        assert_eq!(ids.first().map(String::as_str), Some("it-y"), "the co-occurring item rises to the top: {ids:?}");
    }

    // GET returns the same current list.
    let got = get(&server, "/v1/users/reader/recommendations").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, next_sse);
    let three = get(&server, "/v1/users/reader/recommendations?k=3").await;
    assert_eq!(items(&three.body), items(&next_sse)[..3].to_vec());

    assert!(metric(&server, "liverec_push_sent_total{kind=\"sse\"}").await >= 2.0);
    assert!(metric(&server, "liverec_push_sent_total{kind=\"websocket\"}").await >= 2.0);
    assert!(metric(&server, "liverec_event_to_push_seconds_count").await >= 1.0);
    for stage in ["receive", "apply", "model", "push"] {
        let count = metric(&server, &format!("liverec_stage_seconds_count{{stage=\"{stage}\"}}")).await;
        assert!(count >= 1.0, "stage {stage} measured");
    }
    server.stop().await;
}

#[actix_rt::test]
async fn websocket_clients_may_send_events_and_filter_requests_work() {
    let server = start(test_config()).await;
    teach_pair(&server, "ws-x", "ws-y").await;
    let mut ws = WsClient::connect(&server).await;
    ws.send_json(&json!({ "subscribe": "ws-user" })).await;
    ws.next_of_type("subscribed").await;
    let first = ws.next_of_type("recommendations").await;

    ws.send_json(
        &json!({ "event": { "user_id": "ws-user", "item_id": "ws-x", "event_type": "view", "event_id": "ws-e1" } }),
    )
    .await;
    let ack = ws.next_of_type("ack").await;
    assert_eq!(ack["accepted"], 1);
    assert_eq!(ack["event_ids"], json!(["ws-e1"]));
    let next = ws.next_of_type("recommendations").await;
    assert!(next["data"]["seq"].as_u64() > first["data"]["seq"].as_u64());
    assert_eq!(items(&next["data"])[0], "ws-y");

    // Filters: exclude an item, restrict to a category, ask for more than the pushed list.
    let excluded = get(&server, "/v1/users/ws-user/recommendations?exclude=ws-y&k=20").await;
    assert_eq!(excluded.status, 200);
    assert_eq!(items(&excluded.body).len(), 20);
    assert!(!items(&excluded.body).contains(&"ws-y".to_owned()));
    let comedy = get(&server, "/v1/users/ws-user/recommendations?categories=comedy&k=5").await;
    for id in items(&comedy.body) {
        let item = get(&server, &format!("/v1/items/{id}")).await;
        assert!(
            item.body["categories"].as_array().expect("categories").contains(&json!("comedy")),
            "{id} is not comedy"
        );
    }
    server.stop().await;
}

#[actix_rt::test]
async fn sse_resumes_from_last_event_id_and_shutdown_closes_streams() {
    let server = start(test_config()).await;
    let mut first = SseStream::connect(&server, "resumer", None).await;
    let (id, list) = first.next_list_with_id().await;
    let seq = list["seq"].as_u64().expect("seq");
    let (incarnation, id_seq) = id.split_once('-').expect("an id `<incarnation>-<seq>`");
    assert_eq!(id_seq, seq.to_string(), "{id}");

    // An id that names the same seq of another server process (one since restarted: it numbers
    // from 1 again), or of none (the old plain form), does not name the list this one has: the
    // stream sends it.
    for other in [format!("{}-{seq}", incarnation.parse::<u64>().expect("a number") - 1), seq.to_string()] {
        let mut stream = SseStream::connect(&server, "resumer", Some(&other)).await;
        assert_eq!(stream.next_list().await["seq"].as_u64(), Some(seq), "Last-Event-ID {other}");
    }

    // A client that already has the current list does not get it again; it gets the next one.
    let mut resumed = SseStream::connect(&server, "resumer", Some(&id)).await;
    post_events(&server, event("resumer", "item-0020", "click")).await;
    let next = resumed.next_list().await;
    assert_eq!(next["seq"].as_u64(), Some(seq + 1));

    let mut ws = WsClient::connect(&server).await;
    ws.send_json(&json!({ "subscribe": "resumer" })).await;
    ws.next_of_type("subscribed").await;
    ws.next_of_type("recommendations").await;

    let stopping = actix_rt::spawn(server.stop());
    let close = ws.next_close_code().await;
    assert_eq!(close, Some(ws::CloseCode::Away));
    let shutdown = actix_rt::time::timeout(DEADLINE, async {
        loop {
            match resumed.next_event().await {
                Some(e) if e.event == "shutdown" => return true,
                Some(_) => continue,
                None => return false,
            }
        }
    })
    .await
    .expect("SSE shutdown event in time");
    assert!(shutdown, "the SSE stream announces the shutdown");
    stopping.await.expect("server stopped");
}

#[actix_rt::test]
async fn bad_websocket_messages_get_errors_and_the_socket_keeps_working() {
    let mut config = test_config();
    config.stream.ws_max_subscriptions = 3;
    config.stream.ws_max_frame_bytes = 4096;
    config.stream.ws_max_message_bytes = 8192;
    let server = start(config).await;
    let mut ws = WsClient::connect(&server).await;

    let garbage: Vec<(ws::Message, &str)> = vec![
        (ws::Message::Text("not json".into()), "malformed_json"),
        (ws::Message::Text("[1,2]".into()), "invalid_message"),
        (ws::Message::Text("{}".into()), "invalid_message"),
        (ws::Message::Text(r#"{"subscribe":"a","unsubscribe":"b"}"#.into()), "invalid_message"),
        (ws::Message::Text(r#"{"launch":"rockets"}"#.into()), "invalid_message"),
        (ws::Message::Text(r#"{"subscribe":42}"#.into()), "invalid_user_id"),
        (ws::Message::Text(json!({ "subscribe": "z".repeat(3000) }).to_string().into()), "invalid_user_id"),
        (ws::Message::Text(r#"{"event":{"user_id":"w","item_id":"i","event_type":"nope"}}"#.into()), "invalid_event"),
        (ws::Message::Text(r#"{"events":[]}"#.into()), "empty_batch"),
        (
            ws::Message::Text(r#"{"event":{"user_id":"w","item_id":"i","event_type":"rating","value":1e9}}"#.into()),
            "invalid_event",
        ),
        (ws::Message::Text(r#"{"event":["w","i","view"]}"#.into()), "invalid_event"),
        (ws::Message::Binary(vec![0u8, 159, 146, 150].into()), "unsupported_frame"),
    ];
    for (message, code) in garbage {
        ws.send(message).await;
        let reply = ws.next_json().await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["error"]["code"], code, "{reply}");
    }

    for user in ["w1", "w2", "w3"] {
        ws.send_json(&json!({ "subscribe": user })).await;
        ws.next_of_type("subscribed").await;
    }
    ws.send_json(&json!({ "subscribe": "w4" })).await;
    let refused = ws.next_of_type("error").await;
    assert_eq!(refused["error"]["code"], "too_many_subscriptions");
    // Re-subscribing to a user already held does not count against the limit.
    ws.send_json(&json!({ "subscribe": "w1" })).await;
    ws.next_of_type("subscribed").await;
    ws.send_json(&json!({ "unsubscribe": "w3" })).await;
    ws.next_of_type("unsubscribed").await;
    ws.send_json(&json!({ "subscribe": "w4" })).await;
    ws.next_of_type("subscribed").await;
    assert_eq!(metric(&server, "liverec_session_applied_events_total").await, 0.0);

    // A frame over the limit closes this socket with "message too big"; others are unaffected.
    let mut other = WsClient::connect(&server).await;
    ws.send_text("x".repeat(10_000)).await;
    let close = ws.next_close_code().await;
    assert_eq!(close, Some(ws::CloseCode::Size));
    other.send_json(&json!({ "subscribe": "still-here" })).await;
    assert_eq!(other.next_of_type("subscribed").await["user_id"], Value::from("still-here"));
    assert_eq!(get(&server, "/healthz").await.status, 200);
    server.stop().await;
}

const USERS: usize = 100;

/// A new user's first subscriber costs one scored list: the session's start asks for it, and the
/// subscription finds it on its way instead of marking it stale (which had every new subscriber
/// scored twice, a burst of double work when many users connect at once).
#[actix_rt::test]
async fn a_new_users_first_subscriber_costs_one_scored_list() {
    let server = start(test_config()).await;
    let requests = metric(&server, "liverec_model_requests_total").await;
    let stale = metric(&server, "liverec_session_lists_stale_total").await;
    let mut ws = WsClient::connect(&server).await;
    for user in ["newcomer-1", "newcomer-2", "newcomer-3"] {
        ws.send_json(&json!({ "subscribe": user })).await;
        assert_eq!(ws.next_json().await, json!({ "type": "subscribed", "user_id": user }));
        let list = ws.next_of_type("recommendations").await;
        assert_eq!(list["data"]["user_id"], user);
    }
    assert_eq!(metric(&server, "liverec_session_lists_stale_total").await - stale, 0.0, "no list was scored in vain");
    assert_eq!(metric(&server, "liverec_model_requests_total").await - requests, 3.0, "one list scored per user");
    server.stop().await;
}

/// Users that post an event and at once ask for their list: the GET races the session's own
/// first list, and whichever is answered first is the pushed one.
const RACERS: usize = 60;

#[actix_rt::test]
async fn a_users_first_state_is_pushed_once_even_when_a_get_answers_first() {
    let server = start(test_config()).await;
    let outcomes = join_all((0..RACERS).map(|u| {
        let server = &server;
        async move {
            let user = format!("racer-{u}");
            let first = format!("{user}-e1");
            let mut click = event(&user, "it-a", "click");
            click["event_id"] = json!(first);
            post_events(server, json!([click])).await;
            // Accepted is not yet applied: until the session has the event, a GET gets the
            // cold-start list.
            let got = eventually("a GET reflecting the event", || async {
                let got = get(server, &format!("/v1/users/{user}/recommendations")).await;
                assert_eq!(got.status, 200, "{}", got.body);
                (got.body["last_event_id"] == json!(first)).then_some(got)
            })
            .await;
            let mut ws = WsClient::connect(server).await;
            ws.send_json(&json!({ "subscribe": user })).await;
            ws.next_of_type("subscribed").await;
            let pushed = loop {
                let list = ws.next_of_type("recommendations").await;
                if list["data"]["last_event_id"] == json!(first) {
                    break list["data"].clone();
                }
            };
            (user, got.body["seq"].as_u64().expect("seq"), pushed["seq"].as_u64().expect("seq"))
        }
    }))
    .await;
    // Whichever list was pushed first for the event, the GET's or the session's, it stays the
    // subscribers' list: none of a later number reflects the same state.
    let pushed_again: Vec<_> = outcomes.iter().filter(|(_, got, pushed)| pushed > got).collect();
    assert!(pushed_again.is_empty(), "the event's state pushed again (user, GET's seq, pushed seq): {pushed_again:?}");
    server.stop().await;
}

const PER_USER: usize = 10;

#[actix_rt::test]
async fn a_thousand_subscribers_get_only_their_own_users_updates() {
    let server = start(test_config()).await;
    let users: Vec<String> = (0..USERS).map(|u| format!("fan-{u}")).collect();

    // Half of each user's subscribers on SSE, half on WebSocket (one socket per subscriber).
    let mut sse_clients = Vec::new();
    let mut ws_clients = Vec::new();
    for user in &users {
        for i in 0..PER_USER {
            if i % 2 == 0 {
                sse_clients.push((user.clone(), SseStream::connect(&server, user, None).await));
            } else {
                let mut ws = WsClient::connect(&server).await;
                ws.send_json(&json!({ "subscribe": user })).await;
                ws_clients.push((user.clone(), ws));
            }
        }
    }
    assert_eq!(sse_clients.len() + ws_clients.len(), USERS * PER_USER);
    eventually("every subscriber counted", || async {
        let sse = metric(&server, "liverec_stream_subscribers{kind=\"sse\"}").await;
        let ws = metric(&server, "liverec_stream_subscribers{kind=\"websocket\"}").await;
        (sse + ws == (USERS * PER_USER) as f64).then_some(())
    })
    .await;

    // Every subscriber first sees its user's initial list.
    let first_sse = join_all(sse_clients.iter_mut().map(|(user, sse)| async move {
        let list = sse.next_list().await;
        assert_eq!(list["user_id"].as_str(), Some(user.as_str()));
        list["seq"].as_u64().expect("seq")
    }))
    .await;
    let first_ws = join_all(ws_clients.iter_mut().map(|(user, ws)| async move {
        ws.next_of_type("subscribed").await;
        let list = ws.next_of_type("recommendations").await;
        assert_eq!(list["data"]["user_id"].as_str(), Some(user.as_str()));
        list["data"]["seq"].as_u64().expect("seq")
    }))
    .await;

    // One event per user, each on a different item.
    let batch: Vec<_> =
        users.iter().enumerate().map(|(i, u)| event(u, &format!("item-{:04}", i % 200), "click")).collect();
    post_events(&server, json!(batch)).await;
    let consumed: HashMap<&str, String> =
        users.iter().enumerate().map(|(i, u)| (u.as_str(), format!("item-{:04}", i % 200))).collect();

    // Every subscriber then gets a newer list of its own user, without the consumed item, and
    // nothing addressed to another user.
    let consumed = &consumed;
    join_all(sse_clients.iter_mut().zip(first_sse).map(|((user, sse), seq0)| async move {
        let list = sse.next_list().await;
        assert_eq!(list["user_id"].as_str(), Some(user.as_str()));
        assert!(list["seq"].as_u64().expect("seq") > seq0);
        assert!(!items(&list).contains(&consumed[user.as_str()]));
    }))
    .await;
    join_all(ws_clients.iter_mut().zip(first_ws).map(|((user, ws), seq0)| async move {
        let list = ws.next_of_type("recommendations").await;
        assert_eq!(list["data"]["user_id"].as_str(), Some(user.as_str()));
        assert!(list["data"]["seq"].as_u64().expect("seq") > seq0);
        assert!(!items(&list["data"]).contains(&consumed[user.as_str()]));
    }))
    .await;
    server.stop().await;
}

/// Sends `request` over a new connection and returns the answer: all of it when the server
/// closes the connection, its status line and headers when it switches protocols.
async fn raw_answer(server: &liverec::Server, request: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = actix_rt::net::TcpStream::connect(server.addr).await.expect("connect");
    conn.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    actix_rt::time::timeout(DEADLINE, async {
        loop {
            let n = conn.read(&mut buf).await.expect("read");
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || (answer.starts_with(b"HTTP/1.1 101") && answer.windows(4).any(|w| w == b"\r\n\r\n")) {
                break;
            }
        }
    })
    .await
    .expect("an answer");
    String::from_utf8_lossy(&answer).into_owned()
}

#[actix_rt::test]
async fn a_websocket_handshake_without_a_key_is_refused() {
    let server = start(test_config()).await;
    // `close` lets the refusal end the connection, so the whole answer can be read.
    let handshake = |connection: &str, key: &str| {
        format!(
            "GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: {connection}\r\n\
             Sec-WebSocket-Version: 13\r\n{key}\r\n"
        )
    };
    for key in ["", "Sec-WebSocket-Key: short\r\n"] {
        let answer = raw_answer(&server, &handshake("Upgrade, close", key)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{key:?}: {answer}");
        assert!(answer.contains(r#""code":"not_a_websocket""#), "{key:?}: {answer}");
    }
    let answer = raw_answer(&server, &handshake("Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "a valid handshake: {answer}");
    server.stop().await;
}

#[actix_rt::test]
async fn a_fragmented_message_over_the_limit_closes_with_1009() {
    let server = start(test_config()).await;
    let mut ws = WsClient::connect(&server).await;
    // 300 KB in five frames, each under ws_max_frame_bytes (64 KiB), together over
    // ws_max_message_bytes (256 KiB).
    let part = || bytes::Bytes::from(vec![b'x'; 60_000]);
    ws.send(ws::Message::Continuation(actix_ws::Item::FirstText(part()))).await;
    for _ in 0..3 {
        ws.send(ws::Message::Continuation(actix_ws::Item::Continue(part()))).await;
    }
    ws.send(ws::Message::Continuation(actix_ws::Item::Last(part()))).await;
    assert_eq!(ws.next_close_code().await, Some(ws::CloseCode::Size));
    // Invalid UTF-8 across fragments is not a size problem: 1007.
    let mut ws = WsClient::connect(&server).await;
    ws.send(ws::Message::Continuation(actix_ws::Item::FirstText(bytes::Bytes::from_static(b"{\"subscribe\":\""))))
        .await;
    ws.send(ws::Message::Continuation(actix_ws::Item::Last(bytes::Bytes::from_static(&[0xff, 0xfe, b'"', b'}']))))
        .await;
    assert_eq!(ws.next_close_code().await, Some(ws::CloseCode::Invalid));
    server.stop().await;
}
