//! Production mode, lists nobody watches (issue 13 item 2): the owner of a user neither stores
//! nor publishes the user's lists while no instance has a subscriber of the user; a subscriber
//! on another instance gets a current list at once and the owner's lists after it, and the
//! watch ends a TTL after the last stream closes.

use liverec::bus::kafka::partition_for;
use liverec::config::Config;
use liverec::event::UserId;
use liverec::Server;
use redis::AsyncCommands as _;
use serde_json::{json, Value};

use super::partitions;
use crate::support::*;

const UNWATCHED: &str = "liverec_store_lists_unwatched_total";

fn view(user: &str, id: &str, n: usize) -> Value {
    json!({ "user_id": user, "item_id": format!("item-{n:04}"), "event_type": "view", "event_id": id })
}

/// The list stored in the user's `:q` profile string, if any.
async fn stored_list(config: &Config, user: &str) -> Option<Value> {
    let mut conn = redis_conn(config).await;
    let key = format!("{}:{{{user}}}:q", config.redis.key_prefix);
    let stored: Option<Vec<u8>> = conn.get(&key).await.expect("GET");
    let list = liverec::store::redis::decode_stored_list(&stored?, &UserId::from(user));
    list.map(|list| serde_json::to_value(list).expect("a list serialises"))
}

/// Posts one more event of `user` (ids `{user}-w{n}`) whenever `done` is not yet true, until it
/// is; returns the id of the last event posted. For a change that comes with time (a watch that
/// lapses), seen through the lists that events cause.
async fn post_until(server: &Server, user: &str, from: usize, what: &str, done: impl AsyncFn() -> bool) -> String {
    let next = std::cell::Cell::new(from);
    eventually(what, || async {
        if done().await {
            return Some(format!("{user}-w{}", next.get() - 1));
        }
        let n = next.get();
        post_events(server, view(user, &format!("{user}-w{n}"), n)).await;
        next.set(n + 1);
        None
    })
    .await
}

#[actix_rt::test]
async fn a_list_nobody_watches_is_not_stored_until_a_subscriber_on_another_instance_watches_it() {
    let _services = SERVICES.read().await;
    let mut config = production_config("watch");
    config.redis.watch_ttl_secs = 2;
    config.stream.heartbeat_secs = 1;
    let a = start(config.clone()).await;
    let b = start(config.clone()).await;
    let owned_by_a = eventually("both instances own partitions", || async {
        let (pa, pb) = (partitions(&a).await?, partitions(&b).await?);
        (!pa.is_empty() && !pb.is_empty() && pa.len() + pb.len() == PARTITIONS as usize).then_some(pa)
    })
    .await;
    let mut users_of_a =
        (0..).map(|i| format!("w-user-{i}")).filter(|u| owned_by_a.contains(&partition_for(u, PARTITIONS)));
    let (warm, user) = (users_of_a.next().expect("a user"), users_of_a.next().expect("another"));

    // For one TTL after it starts listening an instance counts every user as watched (it cannot
    // know what was announced before): past it, a list of a user nobody watches is skipped.
    post_until(&b, &warm, 0, "a list nobody watches skipped", || async { metric(&a, UNWATCHED).await > 0.0 }).await;

    // Events of a user nobody watches: the profile is stored, the lists are not.
    let skipped = metric(&a, UNWATCHED).await;
    post_events(&b, json!([view(&user, "u-1", 1), view(&user, "u-2", 2)])).await;
    let redis = redis_conn(&config).await;
    eventually("both events stored and a list of them skipped", || {
        let (redis, config, user, a) = (redis.clone(), &config, &user, &a);
        async move {
            let stored = stored_ids(redis, config, user).await == ["u-1", "u-2"];
            (stored && metric(a, UNWATCHED).await > skipped).then_some(())
        }
    })
    .await;
    assert_eq!(stored_list(&config, &user).await, None, "no list stored for a user nobody watches");

    // A subscriber on B, which does not own the user: a current list at once (scored there from
    // the stored profile), then the lists A pushes as events arrive, never going back in seq.
    let mut stream = SseStream::connect(&b, &user, None).await;
    let first = stream.next_list().await;
    assert_eq!(first["last_event_id"], "u-2", "the first list reflects every stored event: {first}");
    post_events(&b, view(&user, "u-3", 3)).await;
    let mut seq = first["seq"].as_u64().expect("seq");
    let pushed = loop {
        let list = stream.next_list().await;
        let next = list["seq"].as_u64().expect("seq");
        assert!(next > seq, "seq goes forward: {next} after {seq}");
        seq = next;
        if list["last_event_id"] == "u-3" {
            break list;
        }
    };
    assert!(!items(&pushed).contains(&"item-0003".to_owned()), "A's list after the event: {pushed}");
    let stored = eventually("A stores the watched user's list again", || async {
        stored_list(&config, &user).await.filter(|list| list["last_event_id"] == "u-3")
    })
    .await;
    assert!(stored["seq"].as_u64() >= Some(seq), "{stored}");

    // While the stream stays open B re-announces the user: over three TTLs of events, every
    // event's list reaches the stream and A skips none.
    let skipped = metric(&a, UNWATCHED).await;
    let open = std::time::Instant::now();
    let mut n = 100;
    while open.elapsed() < std::time::Duration::from_secs(3 * config.redis.watch_ttl_secs) {
        let id = format!("{user}-k{n}");
        post_events(&b, view(&user, &id, n)).await;
        loop {
            let list = stream.next_list().await;
            let next = list["seq"].as_u64().expect("seq");
            assert!(next > seq, "seq goes forward: {next} after {seq}");
            seq = next;
            if list["last_event_id"] == id.clone() {
                break;
            }
        }
        n += 1;
    }
    assert_eq!(metric(&a, UNWATCHED).await, skipped, "no list of a watched user skipped");

    // The stream closes: B stops announcing the user, and a TTL later A skips its lists again.
    drop(stream);
    let before = metric(&a, UNWATCHED).await;
    let newest = post_until(&b, &user, 4, "the watch lapsed after the stream closed", || async {
        metric(&a, UNWATCHED).await > before
    })
    .await;
    eventually("the newest event stored", || {
        let (redis, config, user, newest) = (redis.clone(), &config, &user, &newest);
        async move { (stored_ids(redis, config, user).await.last() == Some(newest)).then_some(()) }
    })
    .await;
    // A GET on B (no subscriber, no session there) answers a current list: the stored one is
    // older than the stored history, so B scores one from the stored profile.
    let got = get(&b, &format!("/v1/users/{user}/recommendations")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body["last_event_id"], Value::from(newest.clone()), "{}", got.body);
    assert!(got.body["seq"].as_u64() > stored["seq"].as_u64(), "numbered past the stale stored list: {}", got.body);
    a.stop().await;
    b.stop().await;
}
