//! Idempotent apply, session eviction and rebuild, anonymous merge, the catalogue, resuming a
//! stream, and graceful shutdown.

use awc::ws;
use serde_json::json;

use crate::support::*;

fn history(export: &Response) -> Vec<String> {
    export.body["profile"]["interactions"]
        .as_array()
        .expect("interactions")
        .iter()
        .map(|i| i["event_id"].as_str().expect("event id").to_owned())
        .collect()
}

#[actix_rt::test]
async fn a_repeated_event_id_is_applied_once() {
    let server = start(test_config()).await;
    let e = json!({ "user_id": "dup", "item_id": "item-0001", "event_type": "click", "event_id": "e-1" });
    post_events(&server, e.clone()).await;
    post_events(&server, e.clone()).await;
    post_events(
        &server,
        json!([e.clone(), { "user_id": "dup", "item_id": "item-0002", "event_type": "view", "event_id": "e-2" }, e]),
    )
    .await;
    eventually("all five events processed", || async {
        let applied = metric(&server, "liverec_session_applied_events_total").await;
        let duplicates = metric(&server, "liverec_session_duplicate_events_total").await;
        (applied + duplicates == 5.0).then_some(())
    })
    .await;
    assert_eq!(metric(&server, "liverec_session_applied_events_total").await, 2.0);
    assert_eq!(history(&get(&server, "/v1/users/dup/export").await), vec!["e-1", "e-2"]);
    server.stop().await;
}

#[actix_rt::test]
async fn idle_sessions_stop_and_rebuild_with_their_history() {
    let mut config = test_config();
    config.session.idle_ttl_ms = 100;
    let server = start(config).await;
    post_events(
        &server,
        json!([
            { "user_id": "sleepy", "item_id": "item-0005", "event_type": "purchase", "event_id": "s-1" },
            { "user_id": "sleepy", "item_id": "item-0006", "event_type": "hide", "event_id": "s-2" }
        ]),
    )
    .await;
    eventually("the idle session is evicted", || async {
        let evicted = metric(&server, "liverec_sessions_evicted_total").await;
        let active = metric(&server, "liverec_sessions_active").await;
        (evicted >= 1.0 && active == 0.0).then_some(())
    })
    .await;
    let started = metric(&server, "liverec_sessions_started_total").await;

    // A new request rebuilds the session from the store: the history and suppression are back.
    let recs = get(&server, "/v1/users/sleepy/recommendations?k=50&device=tv").await;
    assert_eq!(recs.status, 200);
    let ids = items(&recs.body);
    assert!(!ids.contains(&"item-0005".to_owned()) && !ids.contains(&"item-0006".to_owned()), "{ids:?}");
    assert_eq!(metric(&server, "liverec_sessions_started_total").await, started + 1.0);
    let export = get(&server, "/v1/users/sleepy/export").await;
    assert_eq!(history(&export), vec!["s-1", "s-2"]);
    assert_eq!(export.body["profile"]["suppressed"], json!(["item-0006"]));

    // A replayed event id after the rebuild is still recognised.
    post_events(
        &server,
        json!({ "user_id": "sleepy", "item_id": "item-0005", "event_type": "purchase", "event_id": "s-1" }),
    )
    .await;
    eventually("the replay is seen as a duplicate", || async {
        (metric(&server, "liverec_session_duplicate_events_total").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(history(&get(&server, "/v1/users/sleepy/export").await), vec!["s-1", "s-2"]);
    server.stop().await;
}

#[actix_rt::test]
async fn an_anonymous_history_merges_into_the_user_at_login() {
    let server = start(test_config()).await;
    post_events(
        &server,
        json!([
            { "user_id": "anon-42", "item_id": "item-0010", "event_type": "view", "event_id": "a-1", "timestamp": 1_000 },
            { "user_id": "anon-42", "item_id": "item-0011", "event_type": "click", "event_id": "a-2", "timestamp": 3_000 },
            { "user_id": "known", "item_id": "item-0012", "event_type": "view", "event_id": "k-1", "timestamp": 2_000 }
        ]),
    )
    .await;
    eventually("events applied", || async {
        (metric(&server, "liverec_session_applied_events_total").await == 3.0).then_some(())
    })
    .await;
    let mut sse = SseStream::connect(&server, "known", None).await;
    let before = sse.next_list().await;

    let merged = post_json(&server, "/v1/users/known/merge", &json!({ "from": "anon-42" })).await;
    assert_eq!(merged.status, 200, "{}", merged.body);
    assert_eq!(merged.body["merged"], 2);

    let after = sse.next_list().await;
    assert!(after["seq"].as_u64() > before["seq"].as_u64());
    let ids = items(&after);
    assert!(!ids.contains(&"item-0010".to_owned()) && !ids.contains(&"item-0011".to_owned()), "{ids:?}");
    assert_eq!(history(&get(&server, "/v1/users/known/export").await), vec!["a-1", "k-1", "a-2"]);
    assert!(history(&get(&server, "/v1/users/anon-42/export").await).is_empty());
    server.stop().await;
}

#[actix_rt::test]
async fn catalogue_items_can_be_put_and_read() {
    let server = start(test_config()).await;
    let body =
        json!({ "title": "Blue Train", "categories": ["jazz"], "tags": ["1957"], "created_at": 1_700_000_000_000i64 });
    let created = put_json(&server, "/v1/items/blue-train", &body).await;
    assert_eq!(created.status, 201);
    assert_eq!(created.body["title"], "Blue Train");
    let updated = put_json(
        &server,
        "/v1/items/blue-train",
        &json!({ "title": "Blue Train (remastered)", "categories": ["jazz"] }),
    )
    .await;
    assert_eq!(updated.status, 200);
    let read = get(&server, "/v1/items/blue-train").await;
    assert_eq!(read.body["title"], "Blue Train (remastered)");
    assert_eq!(read.body["in_catalog"], true);
    // Items first seen in events are known but have no attributes.
    post_events(&server, event("someone", "seen-only", "view")).await;
    let seen = eventually("item interned", || async {
        let r = get(&server, "/v1/items/seen-only").await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(seen.body["in_catalog"], false);
    server.stop().await;
}

#[actix_rt::test]
async fn sse_resumes_from_last_event_id_and_shutdown_closes_streams() {
    let server = start(test_config()).await;
    let mut first = SseStream::connect(&server, "resumer", None).await;
    let list = first.next_list().await;
    let seq = list["seq"].as_u64().expect("seq");

    // A client that already has the current list does not get it again; it gets the next one.
    let mut resumed = SseStream::connect(&server, "resumer", Some(seq)).await;
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

#[test]
fn the_published_event_schema_matches_the_code() {
    let published: serde_json::Value =
        serde_json::from_str(include_str!("../../schemas/event.schema.json")).expect("schema file is JSON");
    assert_eq!(published, liverec::event::event_json_schema(), "run `liverec schema > schemas/event.schema.json`");
}
