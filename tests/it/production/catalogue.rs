//! Production mode, the catalogue: changes travel through the compacted Kafka items topic, so
//! every instance, and one started later, holds the same catalogue; bad records of that topic go
//! to the dead-letter topic; its consumer is supervised, and the instance is ready only once it has
//! read the topic.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use liverec::bus::kafka::partition_for;
use liverec::Server;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

use crate::support::*;

async fn send(server: &Server, method: &str, path: &str, body: Option<Value>) -> Response {
    let url = format!("{}{path}", server.url());
    let request = match method {
        "PUT" => client().put(url).insert_header(("content-type", "application/json")),
        "DELETE" => client().delete(url),
        other => panic!("no {other} here"),
    };
    let mut response = match body {
        Some(body) => request.send_body(body.to_string()).await,
        None => request.send().await,
    }
    .expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.body().await.expect("body");
    Response { status, headers, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null) }
}

/// Every item of the catalogue, as `GET /v1/items` pages it: id -> (title, available).
async fn catalogue(server: &Server) -> BTreeMap<String, (Value, Value)> {
    let mut all = BTreeMap::new();
    let mut cursor = String::new();
    loop {
        let page = get(server, &format!("/v1/items?limit=1000{cursor}")).await;
        assert_eq!(page.status, 200, "{}", page.body);
        for item in page.body["items"].as_array().expect("items") {
            let id = item["item_id"].as_str().expect("id").to_owned();
            all.insert(id, (item["title"].clone(), item["available"].clone()));
        }
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return all,
        }
    }
}

/// Reads pushed lists until one lacks `item` (each read fails the test on a stall).
async fn next_list_without(sse: &mut SseStream, item: &str) -> Value {
    for _ in 0..10 {
        let list = sse.next_list().await;
        if !items(&list).iter().any(|i| i == item) {
            return list;
        }
    }
    panic!("ten pushed lists still show {item}");
}

#[actix_rt::test]
async fn catalogue_changes_reach_every_instance_and_one_started_later_before_it_is_ready() {
    let _services = SERVICES.read().await;
    let config = production_config("catalogue");
    let (a, b, owned_by_a) = super::two_instances(&config).await;

    // A put on A is served and listed on B.
    let put = send(
        &a,
        "PUT",
        "/v1/items",
        Some(json!([
            { "item_id": "fresh-1", "title": "Fresh one", "categories": ["new"] },
            { "item_id": "fresh-2", "title": "Fresh two", "available": false },
        ])),
    )
    .await;
    assert_eq!((put.status, &put.body), (200, &json!({ "created": 2, "replaced": 0 })));
    // Acknowledged once Kafka has it, and A reads its own write at once.
    assert_eq!(get(&a, "/v1/items/fresh-1").await.body["title"], "Fresh one");
    let on_b = eventually("fresh-1 on B", || async {
        let item = get(&b, "/v1/items/fresh-1").await;
        (item.status == 200).then_some(item.body)
    })
    .await;
    assert_eq!(
        (&on_b["title"], &on_b["categories"], &on_b["in_catalog"]),
        (&json!("Fresh one"), &json!(["new"]), &json!(true))
    );
    let listed = catalogue(&b).await;
    assert_eq!(listed.get("fresh-2"), Some(&(json!("Fresh two"), json!(false))), "listed on B, unavailable");

    // A subscriber on A of a user A owns holds an item; the item is deleted on B.
    let user = (0..)
        .map(|i| format!("cat-user-{i}"))
        .find(|u| owned_by_a.contains(&partition_for(u, PARTITIONS)))
        .expect("a user A owns");
    let view = json!({ "user_id": user, "item_id": "item-0001", "event_type": "view", "event_id": "cat-ev-1" });
    post_events(&a, view).await;
    let mut sse = SseStream::connect(&a, &user, None).await;
    // The list that reflects the event: nothing but the deletion pushes another.
    let mut first = sse.next_list().await;
    while first["last_event_id"] != "cat-ev-1" {
        first = sse.next_list().await;
    }
    let victim = items(&first).first().cloned().expect("a list with items");
    assert_eq!(send(&b, "DELETE", &format!("/v1/items/{victim}"), None).await.status, 204);
    // Gone on A, and A's subscriber gets a list without it.
    let next = next_list_without(&mut sse, &victim).await;
    assert!(next["seq"].as_u64() > first["seq"].as_u64());
    assert_eq!(get(&a, &format!("/v1/items/{victim}")).await.status, 404);
    assert!(!catalogue(&a).await.contains_key(&victim));

    // A third instance has the same catalogue, the deletion included, once it reports ready.
    let c = start(config.clone()).await;
    let ready = eventually("C ready", || async {
        let ready = get(&c, "/readyz").await;
        match ready.status {
            200 => Some(ready.body),
            503 => {
                assert_eq!(ready.body["status"], "loading_catalog", "{}", ready.body);
                None
            }
            other => panic!("/readyz answered {other}: {}", ready.body),
        }
    })
    .await;
    assert_eq!(ready["status"], "ready");
    let (on_a, on_c) = (catalogue(&a).await, catalogue(&c).await);
    assert!(on_c.contains_key("fresh-1"), "fresh-1 is missing on C ({} items)", on_c.len());
    assert!(!on_c.contains_key(&victim), "{victim}, deleted, is listed on C");
    assert!(on_c == on_a, "C's catalogue ({} items) differs from A's ({} items)", on_c.len(), on_a.len());
    assert_eq!(get(&c, &format!("/v1/items/{victim}")).await.status, 404);
    for user in ["cat-newcomer", user.as_str()] {
        let list = get(&c, &format!("/v1/users/{user}/recommendations?k=50")).await;
        assert_eq!(list.status, 200, "{}", list.body);
        let shown = items(&list.body);
        assert!(
            !shown.contains(&victim) && !shown.contains(&"fresh-2".to_owned()),
            "C showed a removed item: {shown:?}"
        );
    }
    for server in [c, b, a] {
        server.stop().await;
    }
}

#[actix_rt::test]
async fn bad_items_records_and_items_past_the_cap_go_to_the_dead_letter_topic() {
    let _services = SERVICES.read().await;
    let mut config = production_config("catalogue-dlq");
    config.demo.items = 0;
    config.demo.users = 0;
    config.catalog.max_items = 2;
    let server = start(config.clone()).await;
    let topic = config.kafka.items_topic_name();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("partitioner", "murmur2_random")
        .set("acks", "all")
        .create()
        .expect("producer");
    let produce = |key: &'static str, value: &'static [u8]| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            producer
                .send(FutureRecord::to(&topic).key(key).payload(value), Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)
                .expect("broker acknowledges");
        }
    };
    produce("bad-json", b"\xff not json").await;
    produce("bad-title", br#"{"title": 3}"#).await;
    produce("good-1", br#"{"title": "one"}"#).await;
    produce("good-2", br#"{"title": "two"}"#).await;
    produce("one-too-many", br#"{"title": "three"}"#).await;
    produce("good-1", br#"{"title": "one again"}"#).await;
    eventually("the last good record applied", || async {
        (get(&server, "/v1/items/good-1").await.body["title"] == "one again").then_some(())
    })
    .await;
    assert_eq!(get(&server, "/v1/items/good-2").await.status, 200);
    for refused in ["bad-json", "bad-title", "one-too-many"] {
        assert_eq!(get(&server, &format!("/v1/items/{refused}")).await.status, 404, "{refused}");
    }
    // Dead letters are sent as their batch is applied, and are in Kafka before it counts as such.
    eventually("three dead letters", || async {
        (metric(&server, "liverec_kafka_dead_letters_total").await == 3.0).then_some(())
    })
    .await;
    // Over REST the cap answers 422 and names the setting.
    let refused = send(&server, "PUT", "/v1/items/one-more", Some(json!({}))).await;
    assert_eq!((refused.status, &refused.body["error"]["code"]), (422, &json!("catalog_full")), "{}", refused.body);
    assert!(refused.body["error"]["message"].as_str().is_some_and(|m| m.contains("catalog.max_items")));

    let out = Command::new("kcat")
        .args(["-C", "-b", &config.kafka.brokers, "-t", &config.kafka.dead_letter_topic, "-c", "3", "-e", "-q"])
        .args(["-o", "beginning", "-f", "%h\\n"])
        .output()
        .expect("kcat");
    let text = String::from_utf8_lossy(&out.stdout);
    for code in ["malformed_json", "invalid_item", "catalog_full"] {
        assert!(text.contains(&format!("liverec-error-code={code}")), "{code} missing in:\n{text}");
    }
    assert!(text.contains(&format!("liverec-source-topic={topic}")), "{text}");
    server.stop().await;
}

#[actix_rt::test]
async fn a_failing_items_consumer_is_restarted_and_the_instance_is_ready_once_it_has_read_the_topic() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    let _services = SERVICES.read().await;
    let mut config = production_config("catalogue-missing");
    // No topics: the items consumer fails (its topic does not exist) until they are made.
    config.kafka.create_topics = false;
    config.kafka.restart_backoff_initial_ms = 10;
    config.kafka.restart_backoff_max_ms = 40;
    let server = start(config.clone()).await;
    eventually("the items consumer restarted twice", || async {
        (metric(&server, "liverec_kafka_items_consumer_restarts_total").await >= 2.0).then_some(())
    })
    .await;
    let loading = get(&server, "/readyz").await;
    assert_eq!((loading.status, &loading.body["status"]), (503, &json!("loading_catalog")), "{}", loading.body);
    assert_eq!(get(&server, "/healthz").await.status, 200, "alive meanwhile");

    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &config.kafka.brokers).create().expect("admin client");
    let items_topic = config.kafka.items_topic_name();
    let topics = [
        NewTopic::new(&config.kafka.events_topic, PARTITIONS, TopicReplication::Fixed(1)),
        NewTopic::new(&config.kafka.dead_letter_topic, 1, TopicReplication::Fixed(1)),
        NewTopic::new(&items_topic, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "compact"),
    ];
    for created in admin.create_topics(&topics, &AdminOptions::new()).await.expect("create topics") {
        created.expect("topic created");
    }
    eventually("ready once the items topic is read", || async {
        (get(&server, "/readyz").await.status == 200).then_some(())
    })
    .await;
    assert_eq!(metric(&server, "liverec_catalog_loading").await, 0.0);
    let put = send(&server, "PUT", "/v1/items/after-the-outage", Some(json!({ "title": "t" }))).await;
    assert_eq!(put.status, 201, "{}", put.body);
    assert_eq!(get(&server, "/v1/items/after-the-outage").await.body["title"], "t");
    server.stop().await;
}
