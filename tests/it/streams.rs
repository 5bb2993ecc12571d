//! Events posted over REST reach the user's SSE and WebSocket subscribers, and the pushed list
//! reflects them.

use serde_json::json;

use crate::support::*;

/// Teaches the online model that `x` and `y` go together: several users view `x` then `y`.
async fn teach_pair(server: &liverec::Server, x: &str, y: &str) {
    let mut batch = Vec::new();
    for u in 0..8 {
        batch.push(event(&format!("teacher-{x}-{u}"), x, "view"));
        batch.push(event(&format!("teacher-{x}-{u}"), y, "view"));
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
async fn dislike_suppresses_the_item_and_lowers_similar_ones() {
    let server = start(test_config()).await;
    // Put three items in one category and teach that they go together.
    for id in ["neg-a", "neg-b", "neg-c"] {
        let put =
            put_json(&server, &format!("/v1/items/{id}"), &json!({ "title": id, "categories": ["negcat"] })).await;
        assert_eq!(put.status, 201);
    }
    let mut batch = Vec::new();
    for u in 0..6 {
        for id in ["neg-a", "neg-b", "neg-c"] {
            batch.push(event(&format!("neg-teacher-{u}"), id, "view"));
        }
    }
    post_events(&server, json!(batch)).await;
    eventually("teaching applied", || async {
        (metric(&server, "liverec_session_applied_events_total").await >= 18.0).then_some(())
    })
    .await;

    let mut sse = SseStream::connect(&server, "picky", None).await;
    sse.next_list().await;
    post_events(&server, json!(event("picky", "neg-a", "click"))).await;
    let liked = sse.next_list().await;
    let liked_items = items(&liked);
    assert!(liked_items.contains(&"neg-b".to_owned()) && liked_items.contains(&"neg-c".to_owned()), "{liked_items:?}");

    post_events(&server, json!(event("picky", "neg-b", "dislike"))).await;
    let after = sse.next_list().await;
    let after_items = items(&after);
    assert!(!after_items.contains(&"neg-b".to_owned()), "the disliked item is suppressed: {after_items:?}");
    let score = |list: &serde_json::Value, id: &str| {
        list["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|i| i["item_id"] == id)
            .map(|i| i["score"].as_f64().expect("score"))
    };
    let before_c = score(&liked, "neg-c").expect("c was listed");
    let after_c = score(&after, "neg-c").unwrap_or(f64::NEG_INFINITY);
    assert!(after_c < before_c, "a similar item is lowered: {before_c} -> {after_c}");
    server.stop().await;
}
