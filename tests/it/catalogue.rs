//! The catalogue: items put over `PUT /v1/items/{id}` and read back.

use serde_json::json;

use crate::support::*;

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

fn error_of(response: &Response) -> (u16, String, String) {
    let error = &response.body["error"];
    (response.status, error["code"].as_str().unwrap_or("").to_owned(), error["field"].as_str().unwrap_or("").to_owned())
}

#[actix_rt::test]
async fn items_known_only_from_events_stop_at_the_cap_with_a_clear_error() {
    let mut config = test_config();
    config.catalog.max_event_items = 5;
    let server = start(config).await;
    let batch: Vec<_> = (0..5).map(|i| event("someone", &format!("junk-{i}"), "view")).collect();
    post_events(&server, json!(batch)).await;

    // One more unknown item: the whole batch is refused and names the event that carries it.
    let over = post_json(
        &server,
        "/v1/events",
        &json!([event("someone", "item-0001", "view"), event("someone", "junk-5", "view")]),
    )
    .await;
    assert_eq!(error_of(&over), (422, "too_many_unknown_items".into(), "[1].item_id".into()), "{}", over.body);
    assert!(over.body["error"]["message"].as_str().is_some_and(|m| m.contains("catalog.max_event_items")));
    let single = post_json(&server, "/v1/events", &event("someone", "junk-6", "view")).await;
    assert_eq!(error_of(&single), (422, "too_many_unknown_items".into(), "item_id".into()), "{}", single.body);
    assert_eq!(get(&server, "/v1/items/junk-5").await.status, 404, "a refused item is not added");

    // Known items, and items already admitted, still pass; a list is still served.
    post_events(&server, json!([event("someone", "item-0001", "view"), event("other", "junk-0", "click")])).await;
    let list = get(&server, "/v1/users/newcomer/recommendations").await;
    assert_eq!(list.status, 200, "{}", list.body);

    // Putting an event-only item into the catalogue makes room for one more.
    assert_eq!(
        put_json(&server, "/v1/items/junk-0", &json!({ "title": "Junk" })).await.status,
        201,
        "it joins the catalogue"
    );
    post_events(&server, event("someone", "junk-5", "view")).await;
    let refused = post_json(&server, "/v1/events", &event("someone", "junk-6", "view")).await;
    assert_eq!(error_of(&refused).1, "too_many_unknown_items");
    server.stop().await;
}

#[actix_rt::test]
async fn events_for_items_outside_the_catalogue_can_be_refused() {
    let mut config = test_config();
    config.catalog.accept_unknown_items = false;
    let server = start(config).await;
    let refused = post_json(&server, "/v1/events", &event("someone", "not-in-catalogue", "view")).await;
    assert_eq!(error_of(&refused), (422, "unknown_item".into(), "item_id".into()), "{}", refused.body);
    assert!(refused.body["error"]["message"].as_str().is_some_and(|m| m.contains("catalog.accept_unknown_items")));
    assert_eq!(get(&server, "/v1/items/not-in-catalogue").await.status, 404);
    post_events(&server, event("someone", "item-0001", "view")).await;
    assert_eq!(put_json(&server, "/v1/items/not-in-catalogue", &json!({ "title": "New" })).await.status, 201);
    post_events(&server, event("someone", "not-in-catalogue", "view")).await;
    server.stop().await;
}

#[actix_rt::test]
async fn a_kafka_record_for_an_item_past_the_cap_goes_to_the_dead_letter_topic() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let _services = SERVICES.read().await;
    let mut config = production_config("item-cap");
    config.catalog.max_event_items = 2;
    let server = start(config.clone()).await;
    let kafka: FutureProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("acks", "all")
        .create()
        .expect("producer");
    // One key, so one partition: the good event after the refused one must not be stuck.
    for (id, item) in [("r1", "junk-a"), ("r2", "junk-b"), ("r3", "junk-c"), ("r4", "item-0001")] {
        let payload = json!({ "user_id": "feeder", "item_id": item, "event_type": "view", "event_id": id }).to_string();
        kafka
            .send(
                FutureRecord::to(&config.kafka.events_topic).key("feeder").payload(&payload),
                std::time::Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("broker acknowledges");
    }
    eventually("the events within the cap applied", || async {
        (metric(&server, "liverec_session_applied_events_total").await == 3.0).then_some(())
    })
    .await;
    assert_eq!(metric(&server, "liverec_kafka_dead_letters_total").await, 1.0);
    assert_eq!(get(&server, "/v1/items/junk-c").await.status, 404);
    let out = std::process::Command::new("kcat")
        .args(["-C", "-b", &config.kafka.brokers, "-t", &config.kafka.dead_letter_topic, "-c", "1", "-e", "-q"])
        .args(["-o", "beginning", "-f", "%h %s\\n"])
        .output()
        .expect("kcat");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("liverec-error-code=too_many_unknown_items") && text.contains("junk-c"), "{text}");
    server.stop().await;
}
