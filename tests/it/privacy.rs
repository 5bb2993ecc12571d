//! Erasure: `DELETE /v1/users/{id}` removes the user everywhere, closes their streams, and a
//! tombstone keeps replays of their old events out.

use serde_json::{json, Value};

use crate::support::*;

fn old_event(id: &str, item: &str, at: i64) -> Value {
    json!({ "event_id": id, "user_id": "erin", "item_id": item, "event_type": "view", "timestamp": at })
}

async fn export(server: &liverec::Server) -> Value {
    let response = get(server, "/v1/users/erin/export").await;
    assert_eq!(response.status, 200, "{}", response.body);
    response.body
}

fn interactions(export: &Value) -> usize {
    export["profile"]["interactions"].as_array().map_or(0, Vec::len)
}

#[actix_rt::test]
async fn an_erased_user_is_gone_streams_close_and_replays_are_skipped() {
    let server = start(test_config()).await;
    let before = liverec::event::now_ms() - 60_000;
    let history = json!([
        old_event("e1", "item-0001", before),
        old_event("e2", "item-0002", before + 1),
        old_event("e3", "item-0003", before + 2)
    ]);
    post_events(&server, history.clone()).await;
    eventually("the history stored", || async { (interactions(&export(&server).await) == 3).then_some(()) }).await;
    let mut sse = SseStream::connect(&server, "erin", None).await;
    sse.next_list().await;
    let mut ws = WsClient::connect(&server).await;
    ws.send_json(&json!({ "subscribe": "erin" })).await;
    ws.next_of_type("subscribed").await;

    let response = client().delete(format!("{}/v1/users/erin", server.url())).send().await.expect("delete");
    assert_eq!(response.status(), 200);
    let mut response = response;
    let erased: Value = serde_json::from_slice(&response.body().await.expect("body")).expect("json");
    assert_eq!(erased["subscriptions_closed"], 2, "{erased}");
    assert_eq!(erased["events_removed_from_log"], 3, "{erased}");

    // Both streams are told and end.
    let last = loop {
        match sse.next_event().await {
            Some(event) if event.event == "erased" => break Some(event),
            Some(_) => continue,
            None => break None,
        }
    };
    assert!(last.is_some(), "the SSE stream says the user was erased");
    assert!(sse.next_event().await.is_none(), "and ends");
    assert_eq!(ws.next_of_type("erased").await["user_id"], "erin");

    // Nothing is left, and a replay of the old events applies nothing.
    let gone = export(&server).await;
    assert_eq!(interactions(&gone), 0, "{gone}");
    post_events(&server, history).await;
    eventually("the replayed events skipped", || async {
        (metric(&server, "liverec_privacy_skipped_events_total").await == 3.0).then_some(())
    })
    .await;
    assert_eq!(interactions(&export(&server).await), 0);

    // The user may come back: new events count from scratch.
    post_events(&server, json!({ "user_id": "erin", "item_id": "item-0009", "event_type": "click" })).await;
    eventually("the new event stored", || async { (interactions(&export(&server).await) == 1).then_some(()) }).await;
    assert_eq!(metric(&server, "liverec_privacy_erased_users_total").await, 1.0);
    let unknown =
        client().delete(format!("{}/v1/users/{}", server.url(), "x".repeat(10_000))).send().await.expect("delete");
    assert_eq!(unknown.status(), 400, "ids are validated");
    server.stop().await;
}

#[actix_rt::test]
async fn pseudonymised_ids_are_all_that_is_kept() {
    let mut config = test_config();
    config.privacy.pseudonymize = true;
    config.privacy.salt = "a salt that is thirty-two characters long".into();
    let server = start(config).await;
    let raw = "alice@example.com";
    post_events(&server, json!({ "user_id": raw, "item_id": "item-0001", "event_type": "click" })).await;
    // The client keeps using its own id; what comes back, and what is stored, is the pseudonym.
    let list = eventually("the list after the event", || async {
        let list = get(&server, &format!("/v1/users/{raw}/recommendations")).await.body;
        list["last_event_id"].is_string().then_some(list)
    })
    .await;
    let kept = list["user_id"].as_str().expect("user id").to_owned();
    assert!(kept.starts_with("u_") && kept.len() == 34, "{kept}");
    let export = get(&server, &format!("/v1/users/{raw}/export")).await.body;
    assert_eq!(export["user_id"], json!(kept));
    assert_eq!(export["profile"]["interactions"].as_array().map(Vec::len), Some(1));
    assert!(!export.to_string().contains("alice"), "the raw id is nowhere in the stored data: {export}");
    // The pseudonym itself addresses the same user.
    let same = get(&server, &format!("/v1/users/{kept}/export")).await.body;
    assert_eq!(same["profile"]["interactions"], export["profile"]["interactions"]);
    server.stop().await;
}
