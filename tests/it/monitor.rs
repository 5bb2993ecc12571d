//! The monitor: impressions, attributed clicks and conversions, and input drift, over real HTTP.

use serde_json::{json, Value};

use crate::support::*;

fn monitored_config() -> liverec::config::Config {
    let mut config = test_config();
    config.monitor.bucket_secs = 1;
    config.monitor.window_secs = 2;
    config.monitor.min_samples = 40;
    config.monitor.cooldown_secs = 3600;
    config
}

async fn report(server: &liverec::Server) -> Value {
    let response = get(server, "/v1/monitor").await;
    assert_eq!(response.status, 200);
    response.body
}

#[actix_rt::test]
async fn clicks_and_conversions_are_attributed_to_served_lists() {
    let server = start(monitored_config()).await;
    let mut sse = SseStream::connect(&server, "shopper", None).await;
    let list = sse.next_list().await;
    let shown = items(&list);
    let rec_id = list["rec_id"].as_str().expect("rec_id");

    // A click that names the list, and a view of an item never shown (not attributed).
    post_events(
        &server,
        json!([
            { "user_id": "shopper", "item_id": shown[0], "event_type": "click", "rec_id": rec_id },
            { "user_id": "shopper", "item_id": "never-shown", "event_type": "view" }
        ]),
    )
    .await;
    // The purchase names no list: it is attributed to the newest list that showed the item.
    let next = sse.next_list().await;
    let bought = items(&next)[0].clone();
    post_events(&server, json!({ "user_id": "shopper", "item_id": bought, "event_type": "purchase", "value": 20.0 }))
        .await;
    let variant = eventually("the conversion reaches the monitor", || async {
        let report = report(&server).await;
        let variant = report["variants"].as_array()?.first()?.clone();
        (variant["conversions"] == 1).then_some(variant)
    })
    .await;
    assert_eq!(variant["version"], "cooccurrence-online-1");
    assert_eq!(variant["variant"], "control");
    assert_eq!(variant["clicks"], 2, "the first list's click and the second list's purchase: {variant}");
    assert_eq!(variant["revenue"], 20.0);
    assert!(variant["impressions"].as_u64() >= Some(2));
    let ctr = &variant["ctr"];
    assert!(ctr["low"].as_f64() <= ctr["value"].as_f64() && ctr["value"].as_f64() <= ctr["high"].as_f64());
    assert_eq!(metric(&server, "liverec_monitor_conversions_total").await, 1.0);
    server.stop().await;
}

#[actix_rt::test]
async fn a_shift_in_what_users_interact_with_is_detected_as_input_drift() {
    let server = start(monitored_config()).await;
    const BEFORE: &[&str] = &["item-0001", "item-0002", "item-0003"];
    const AFTER: &[&str] = &["item-0101", "item-0102", "item-0103"];
    let mut round = 0;
    // The same mix, bucket after bucket, until the reference is taken.
    keep_sending(&server, BEFORE, &mut round, "a reference distribution", |report| {
        report["drift"]["reference"].as_str().map(str::to_owned)
    })
    .await;
    assert!(report(&server).await["breaches"].as_array().expect("breaches").is_empty(), "no alarm while stationary");
    // Then users turn to other items.
    let breach = keep_sending(&server, AFTER, &mut round, "input drift detected", |report| {
        report["breaches"].as_array()?.first().cloned()
    })
    .await;
    assert_eq!(breach["kind"], "input_drift", "{breach}");
    assert!(report(&server).await["drift"]["popularity_psi"].as_f64() > Some(0.25));
    assert_eq!(metric(&server, "liverec_monitor_breaches_total").await, 1.0);
    server.stop().await;
}

/// Posts a batch of 60 views spread over `items`, again and again, until `check` finds what it
/// waits for in the monitor report.
async fn keep_sending<T>(
    server: &liverec::Server,
    items: &[&str],
    round: &mut usize,
    what: &str,
    check: impl Fn(&Value) -> Option<T>,
) -> T {
    eventually(what, || {
        *round += 1;
        let batch: Vec<Value> = (0..60)
            .map(|i| json!({ "user_id": format!("drift-{}", i % 20), "item_id": items[i % items.len()], "event_type": "view", "event_id": format!("d-{round}-{i}") }))
            .collect();
        let check = &check;
        async move {
            post_events(server, json!(batch)).await;
            check(&report(server).await)
        }
    })
    .await
}

/// The sequence of issue 12: a `view` for bob, GET his list, `click` items[0] and items[1] with
/// its `rec_id`, a `view` of items[2] and a `click` on items[3] without one. Each event publishes
/// a new list nobody sees; only the one shown list can take a click, and it takes one.
#[actix_rt::test]
async fn clicks_never_outnumber_impressions() {
    let server = start(test_config()).await;
    let published = metric(&server, "liverec_push_updates_total").await;
    post_events(&server, json!({ "user_id": "bob", "item_id": "item-0001", "event_type": "view" })).await;
    // Waited for without a GET: a GET before the list is out is answered with a cold-start list,
    // an impression of its own that a later click may rightly be attributed to.
    eventually("bob's list after his view", || async {
        (metric(&server, "liverec_push_updates_total").await > published).then_some(())
    })
    .await;
    let list = get(&server, "/v1/users/bob/recommendations").await.body;
    assert!(list["last_event_id"].is_string(), "the list made after the view: {list}");
    let shown = items(&list);
    let rec_id = list["rec_id"].as_str().expect("rec_id");
    for event in [
        json!({ "user_id": "bob", "item_id": shown[0], "event_type": "click", "rec_id": rec_id }),
        json!({ "user_id": "bob", "item_id": shown[1], "event_type": "click", "rec_id": rec_id }),
        json!({ "user_id": "bob", "item_id": shown[2], "event_type": "view" }),
        json!({ "user_id": "bob", "item_id": shown[3], "event_type": "click" }),
    ] {
        // Each event publishes a new list to nobody; wait for it, as a user between clicks would.
        let published = metric(&server, "liverec_push_updates_total").await;
        post_events(&server, event).await;
        eventually("the list after the event", || async {
            (metric(&server, "liverec_push_updates_total").await > published).then_some(())
        })
        .await;
    }
    let variant = eventually("all five events reach the monitor", || async {
        let report = report(&server).await;
        (report["events"] == 5).then(|| report["variants"][0].clone())
    })
    .await;
    let (impressions, clicks) = (variant["impressions"].as_u64(), variant["clicks"].as_u64());
    assert_eq!(clicks, Some(1), "one shown list, one click: {variant}");
    assert!(clicks <= impressions, "{variant}");
    assert!(variant["ctr"]["value"].as_f64() <= Some(1.0), "{variant}");
    server.stop().await;
}
