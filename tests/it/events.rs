//! Events: `POST /v1/events` applies an event id once, the published event schema matches the
//! code, and bad input (to events and every other REST resource) gets a clear error, changes
//! nothing, and the server keeps serving.

use serde_json::json;

use crate::support::*;

async fn applied(server: &liverec::Server) -> f64 {
    metric(server, "liverec_session_applied_events_total").await
}

fn assert_error(response: &Response, status: u16, code: &str, field: Option<&str>) {
    assert_eq!(response.status, status, "{}", response.body);
    assert_eq!(response.body["error"]["code"], code, "{}", response.body);
    assert!(response.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    if let Some(field) = field {
        assert_eq!(response.body["error"]["field"], field, "{}", response.body);
    }
}

#[actix_rt::test]
async fn bad_rest_input_is_refused_and_applies_nothing() {
    let mut config = test_config();
    config.server.max_body_bytes = 64 * 1024;
    config.events.max_batch = 50;
    let server = start(config).await;
    let long_id = "x".repeat(10_000);
    let good = event("victim", "item-0001", "view");

    let cases: Vec<(&str, String, u16, &str, Option<&str>)> = vec![
        ("malformed JSON", "{\"user_id\": \"victim\",".into(), 400, "malformed_json", None),
        ("not JSON at all", "hello".into(), 400, "malformed_json", None),
        ("trailing garbage", format!("{good} x"), 400, "malformed_json", None),
        (
            "wrong type",
            json!({ "user_id": 7, "item_id": "i", "event_type": "view" }).to_string(),
            422,
            "invalid_event",
            Some("user_id"),
        ),
        ("missing field", json!({ "user_id": "victim", "event_type": "view" }).to_string(), 422, "invalid_event", None),
        (
            "unknown event type",
            json!({ "user_id": "victim", "item_id": "i", "event_type": "teleport" }).to_string(),
            422,
            "invalid_event",
            Some("event_type"),
        ),
        (
            "unknown field",
            json!({ "user_id": "victim", "item_id": "i", "event_type": "view", "colour": "red" }).to_string(),
            422,
            "invalid_event",
            None,
        ),
        (
            "empty user id",
            json!({ "user_id": "", "item_id": "i", "event_type": "view" }).to_string(),
            422,
            "invalid_event",
            Some("user_id"),
        ),
        (
            "10,000-char item id",
            json!({ "user_id": "victim", "item_id": long_id, "event_type": "view" }).to_string(),
            422,
            "invalid_event",
            Some("item_id"),
        ),
        (
            "bad device",
            json!({ "user_id": "victim", "item_id": "i", "event_type": "view", "context": { "device": "toaster" } })
                .to_string(),
            422,
            "invalid_event",
            Some("context.device"),
        ),
        (
            "one bad event in a batch",
            json!([good, good, { "user_id": "victim", "item_id": "", "event_type": "view" }]).to_string(),
            422,
            "invalid_event",
            Some("[2].item_id"),
        ),
        (
            "a rating of 1e9",
            json!({ "user_id": "victim", "item_id": "i", "event_type": "rating", "value": 1e9 }).to_string(),
            422,
            "invalid_event",
            Some("value"),
        ),
        (
            "a purchase of 1e308",
            json!({ "user_id": "victim", "item_id": "i", "event_type": "purchase", "value": 1e308 }).to_string(),
            422,
            "invalid_event",
            Some("value"),
        ),
        (
            "a context as an array",
            r#"{"user_id": "victim", "item_id": "i", "event_type": "view", "context": []}"#.into(),
            422,
            "invalid_event",
            Some("context"),
        ),
        ("an event as an array", r#"["victim", "i", "view"]"#.into(), 422, "invalid_event", Some("[0]")),
        ("a batch of arrays", r#"[["victim", "i", "view"]]"#.into(), 422, "invalid_event", Some("[0]")),
        ("empty batch", "[]".into(), 422, "empty_batch", None),
        ("batch over the limit", json!(vec![good.clone(); 51]).to_string(), 413, "batch_too_large", None),
        (
            "body over the limit",
            json!({ "user_id": "victim", "item_id": "x".repeat(70_000), "event_type": "view" }).to_string(),
            413,
            "payload_too_large",
            None,
        ),
    ];
    for (what, body, status, code, field) in cases {
        let response = post_raw(&server, "/v1/events", "application/json", body).await;
        assert_eq!(response.status, status, "{what}: {}", response.body);
        assert_error(&response, status, code, field);
    }
    let wrong_type = post_raw(&server, "/v1/events", "text/plain", good.to_string()).await;
    assert_error(&wrong_type, 415, "unsupported_media_type", None);

    // Bad paths and queries.
    assert_error(
        &get(&server, &format!("/v1/users/{}/recommendations", "y".repeat(10_000))).await,
        400,
        "invalid_user_id",
        None,
    );
    // Out of range is 422, as for every list (one check of `k`).
    assert_error(&get(&server, "/v1/users/victim/recommendations?k=0").await, 422, "out_of_range", Some("k"));
    // More items to exclude than a list holds (recs.max_k, 100 by default): 422, as in the basket.
    let exclude: Vec<String> = (0..101).map(|i| format!("x{i}")).collect();
    assert_error(
        &get(&server, &format!("/v1/users/victim/recommendations?exclude={}", exclude.join(","))).await,
        422,
        "out_of_range",
        Some("exclude"),
    );
    // A value of the wrong type names its parameter and the value.
    let not_a_number = get(&server, "/v1/users/victim/recommendations?k=abc").await;
    assert_error(&not_a_number, 400, "invalid_query", Some("k"));
    assert!(not_a_number.body["error"]["message"].as_str().is_some_and(|m| m.contains("abc")), "{}", not_a_number.body);
    let fridge = get(&server, "/v1/users/victim/recommendations?device=fridge").await;
    assert_error(&fridge, 400, "invalid_query", Some("device"));
    assert!(fridge.body["error"]["message"].as_str().is_some_and(|m| m.contains("fridge")), "{}", fridge.body);
    assert_error(&get(&server, "/v1/items?limit=many").await, 400, "invalid_query", Some("limit"));
    assert_error(&get(&server, "/v1/items/nothing-here").await, 404, "item_not_found", None);
    assert_error(
        &put_json(&server, "/v1/items/i1", &json!({ "categories": "not a list" })).await,
        422,
        "invalid_item",
        Some("categories"),
    );
    assert_error(&put_json(&server, "/v1/items/i1", &json!({ "tags": [""] })).await, 422, "invalid_item", Some("tags"));
    assert_error(&get(&server, "/v1/nothing").await, 404, "not_found", None);
    assert_error(
        &post_json(&server, "/v1/users/victim/merge", &json!({ "from": "victim" })).await,
        422,
        "invalid_merge",
        Some("from"),
    );

    // Nothing was applied and the victim has no history.
    assert_eq!(applied(&server).await, 0.0);
    assert_eq!(metric(&server, "liverec_ingest_events_total{source=\"http\"}").await, 0.0);
    let export = get(&server, "/v1/users/victim/export").await;
    assert_eq!(export.body["profile"]["interactions"], json!([]));

    // And the server still serves.
    assert_eq!(get(&server, "/healthz").await.status, 200);
    post_events(&server, good).await;
    eventually("a good event applied after the bad ones", || async { (applied(&server).await == 1.0).then_some(()) })
        .await;
    server.stop().await;
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

#[test]
fn the_published_event_schema_matches_the_code() {
    let published: serde_json::Value =
        serde_json::from_str(include_str!("../../schemas/event.schema.json")).expect("schema file is JSON");
    assert_eq!(published, liverec::event::event_json_schema(), "run `liverec schema > schemas/event.schema.json`");
}

#[actix_rt::test]
async fn an_event_without_context_keeps_the_last_known_device_and_country() {
    let server = start(test_config()).await;
    let context = json!({ "device": "mobile", "country": "FR" });
    post_events(
        &server,
        json!({ "user_id": "roamer", "item_id": "item-0001", "event_type": "view", "context": context }),
    )
    .await;
    post_events(&server, json!({ "user_id": "roamer", "item_id": "item-0002", "event_type": "view" })).await;
    let stored = eventually("both events in the profile", || async {
        let export = get(&server, "/v1/users/roamer/export").await.body;
        (export["profile"]["interactions"].as_array()?.len() == 2).then_some(export)
    })
    .await;
    assert_eq!(stored["profile"]["context"]["device"], "mobile", "{stored}");
    assert_eq!(stored["profile"]["context"]["country"], "FR", "{stored}");
    server.stop().await;
}
