//! Memory bounds of the embedded mode: the memory store keeps at most `store.memory_max_profiles`
//! profiles (least recently used out), at most `session.max_active` sessions run, a GET for an
//! unknown user leaves nothing behind, and erasure tombstones expire. Asserted on the metrics and
//! the export endpoint; resident memory is a benchmark figure (`load-tests/memory-soak.py`).

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use crate::support::*;

/// How long a wait may see no progress before it fails (a stall, not a speed).
const STALL: Duration = Duration::from_secs(60);

/// One view per user, in one batch.
fn views(users: &[String]) -> Value {
    Value::Array(users.iter().map(|u| event(u, "item-0001", "view")).collect())
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Posts one view for each of `users` and waits until they are applied and their sessions
/// published a list (so the store has seen every write of theirs).
async fn post_and_settle(server: &liverec::Server, users: &[String]) {
    let applied = metric(server, "liverec_session_applied_events_total").await;
    let pushed = metric(server, "liverec_push_updates_total").await;
    post_events(server, views(users)).await;
    let n = users.len() as f64;
    wait_for_metric(server, "liverec_session_applied_events_total", applied + n, STALL).await;
    wait_for_metric(server, "liverec_push_updates_total", pushed + n, STALL).await;
}

async fn exported_history(server: &liverec::Server, user: &str) -> Vec<String> {
    let export = get(server, &format!("/v1/users/{user}/export")).await;
    assert_eq!(export.status, 200, "{}", export.body);
    history(&export)
}

#[actix_rt::test]
async fn the_memory_store_keeps_its_cap_and_evicts_the_least_recently_used() {
    let mut config = test_config();
    config.store.memory_max_profiles = 64;
    // Sessions stop soon, so exports read what the store kept.
    config.session.idle_ttl_ms = 100;
    let server = start(config).await;
    // A session parks its profile in the store when it stops: each group stops before the next
    // starts, so the store receives them in this order.
    let all_stopped = || async {
        eventually("every session stopped", || async {
            (metric(&server, "liverec_sessions_active").await == 0.0).then_some(())
        })
        .await
    };
    let old = names("old", 20);
    post_and_settle(&server, &old).await;
    all_stopped().await;
    let newer = names("new", 64);
    post_and_settle(&server, &newer).await;
    all_stopped().await;
    post_and_settle(&server, &["last".to_owned()]).await;
    all_stopped().await;

    assert!(metric(&server, "liverec_store_memory_profiles").await <= 64.0);
    assert!(metric(&server, "liverec_store_memory_profiles_evicted_total").await >= 21.0);
    assert_eq!(exported_history(&server, "last").await.len(), 1, "the newest profile is kept");
    for user in &old {
        assert!(exported_history(&server, user).await.is_empty(), "{user}'s profile was evicted");
    }
    server.stop().await;
}

/// The memory store holds a profile only while its user's session does not run: the running
/// session is the profile, parks it when it stops and takes it back when it starts again, so a
/// user's history is in memory once. Exports of a parked user read the store.
#[actix_rt::test]
async fn a_session_parks_its_profile_in_the_memory_store_when_it_stops_and_takes_it_back() {
    let mut config = test_config();
    config.session.max_active = 1;
    let server = start(config).await;
    let parked = || metric(&server, "liverec_store_memory_profiles");
    let views = |user: &str, items: &[&str]| Value::Array(items.iter().map(|item| event(user, item, "view")).collect());
    post_events(&server, views("ada", &["item-0001", "item-0002", "item-0003"])).await;
    wait_for_metric(&server, "liverec_session_applied_events_total", 3.0, STALL).await;
    assert_eq!(parked().await, 0.0, "a running session's profile is not in the store");

    // Bob's session needs ada's place: hers stops and parks her whole state.
    post_events(&server, views("bob", &["item-0004"])).await;
    wait_for_metric(&server, "liverec_session_applied_events_total", 4.0, STALL).await;
    eventually("ada's profile parked", || async { (parked().await == 1.0).then_some(()) }).await;
    assert_eq!(exported_history(&server, "ada").await.len(), 3, "the export reads the parked profile");

    // Ada comes back: her session takes the profile (the store no longer holds it), bob's parks.
    post_events(&server, views("ada", &["item-0005"])).await;
    wait_for_metric(&server, "liverec_session_applied_events_total", 5.0, STALL).await;
    eventually("ada's session holds four events", || async {
        (exported_history(&server, "ada").await.len() == 4).then_some(())
    })
    .await;
    eventually("bob's profile parked, ada's taken back", || async {
        (parked().await == 1.0 && exported_history(&server, "bob").await.len() == 1).then_some(())
    })
    .await;
    server.stop().await;
}

#[actix_rt::test]
async fn sessions_past_max_active_stop_the_least_recently_used() {
    let mut config = test_config();
    config.session.max_active = 8;
    let server = start(config).await;
    let users = names("busy", 40);
    // Sessions stopped to make room may not publish a list: wait for the events only.
    let applied = metric(&server, "liverec_session_applied_events_total").await;
    post_events(&server, views(&users)).await;
    wait_for_metric(&server, "liverec_session_applied_events_total", applied + 40.0, STALL).await;
    eventually("sessions back under session.max_active", || async {
        (metric(&server, "liverec_sessions_active").await <= 8.0).then_some(())
    })
    .await;
    assert!(metric(&server, "liverec_sessions_capped_total").await >= 32.0);
    // No start waited out its second for a stop that nobody had asked for.
    assert_eq!(metric(&server, "liverec_sessions_start_waits_expired_total").await, 0.0);
    // A user whose session was stopped to make room is served as before.
    let list = get(&server, "/v1/users/busy-0/recommendations?k=3&device=mobile").await;
    assert_eq!(list.status, 200, "{}", list.body);
    assert_eq!(items(&list.body).len(), 3);
    assert_eq!(exported_history(&server, "busy-0").await.len(), 1, "its history rebuilt from the store");
    server.stop().await;
}

#[actix_rt::test]
async fn a_get_for_an_unknown_user_starts_no_session_and_stores_nothing() {
    let running = start(test_config()).await;
    let server = &running;
    let started = metric(server, "liverec_sessions_started_total").await;
    let active = metric(server, "liverec_sessions_active").await;
    let stored = metric(server, "liverec_store_memory_profiles").await;
    let lists: Vec<Value> = futures_util::stream::iter(0..1_000)
        .map(|i| async move {
            let device = if i % 2 == 0 { "" } else { "?device=mobile" };
            let response = get(server, &format!("/v1/users/stranger-{i}/recommendations{device}")).await;
            assert_eq!(response.status, 200, "{}", response.body);
            response.body
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(lists.iter().all(|list| !items(list).is_empty()), "every stranger gets the cold-start list");
    assert_eq!(metric(server, "liverec_sessions_started_total").await, started);
    assert_eq!(metric(server, "liverec_sessions_active").await, active);
    assert_eq!(metric(server, "liverec_store_memory_profiles").await, stored);
    // A user with a stored profile still gets a session (and the list that follows their events).
    post_and_settle(server, &["known".to_owned()]).await;
    let list = get(server, "/v1/users/known/recommendations").await;
    assert!(list.body["last_event_id"].is_string(), "{}", list.body);
    running.stop().await;
}

/// The cold-start list a stranger got without a session still takes their first click: the
/// session that click starts attributes it (else every new user's first click would count as
/// organic input and skew the monitor's CTR and drift).
#[actix_rt::test]
async fn a_click_on_a_cold_start_list_is_attributed() {
    let server = start(test_config()).await;
    let clicks = metric(&server, "liverec_monitor_clicks_total").await;
    let list = get(&server, "/v1/users/newcomer/recommendations").await.body;
    let rec_id = list["rec_id"].as_str().expect("rec_id").to_owned();
    let first = items(&list)[0].clone();
    post_events(
        &server,
        serde_json::json!({ "user_id": "newcomer", "item_id": first, "event_type": "click", "rec_id": rec_id }),
    )
    .await;
    eventually("the click is attributed to the cold-start list", || async {
        (metric(&server, "liverec_monitor_clicks_total").await == clicks + 1.0).then_some(())
    })
    .await;
    server.stop().await;
}

#[actix_rt::test]
async fn erasure_tombstones_expire() {
    let mut config = test_config();
    config.privacy.tombstone_ttl_secs = 1;
    let server = start(config).await;
    post_and_settle(&server, &["erin".to_owned()]).await;
    let response = client().delete(format!("{}/v1/users/erin", server.url())).send().await.expect("delete");
    assert_eq!(response.status(), 200);
    assert_eq!(metric(&server, "liverec_store_memory_tombstones").await, 1.0);
    eventually("the tombstone expires", || async {
        (metric(&server, "liverec_store_memory_tombstones").await == 0.0).then_some(())
    })
    .await;
    server.stop().await;
}
