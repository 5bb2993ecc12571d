//! Production mode, erasure under load: erasing users while their events stream in must never
//! stall Kafka consumption for everyone else.

use std::time::{Duration, Instant};

use liverec::config::Config;
use liverec::Server;
use serde_json::{json, Value};

use super::partitions;
use crate::support::*;

/// How long consumption may make no progress at all before the test calls it stalled. It bounds
/// a hang on a loaded machine; it asserts no rate.
const STALL: Duration = Duration::from_secs(90);

/// Events stored in Redis for `users`, in all.
async fn stored(config: &Config, users: &[String]) -> usize {
    let mut total = 0;
    for user in users {
        total += stored_ids(redis_conn(config).await, config, user).await.len();
    }
    total
}

/// Posts events of `user` to the two instances in turn until `stop` says so; refusals (503
/// while Kafka is busy, 4xx for an erased user) are fine here.
async fn post_while(servers: [&Server; 2], user: &str, stop: &std::cell::Cell<bool>) {
    let mut round = 0usize;
    while !stop.get() {
        let batch: Vec<Value> =
            (0..20).map(|i| event(user, &format!("item-{:04}", (round + i) % 150), "view")).collect();
        let _ = post_json(servers[round % 2], "/v1/events", &json!(batch)).await;
        round += 1;
    }
}

/// Erases `user` `times` times through the two instances in turn.
async fn erase_repeatedly(servers: [&Server; 2], user: &str, times: usize) {
    for round in 0..times {
        let url = format!("{}/v1/users/{user}", servers[round % 2].url());
        let response = client().delete(url).send().await.expect("DELETE");
        assert_eq!(response.status().as_u16(), 200);
    }
}

/// Four users post continuously while they are erased over and over through both instances (so
/// the owner of their partition stops their sessions with events in flight); then 60 other users
/// post 600 events, and every one of them must be applied. Before the fix a batch sent to a
/// session the erasure stopped never completed, which froze its partition's offsets and then
/// paused the consumer for good.
#[actix_rt::test]
async fn erasing_users_under_load_never_stalls_consumption_for_the_others() {
    let _services = SERVICES.read().await;
    let config = production_config("erase-stall");
    let a = start(config.clone()).await;
    let b = start(config.clone()).await;
    eventually("both instances own partitions", || async {
        let (pa, pb) = (partitions(&a).await?, partitions(&b).await?);
        (!pa.is_empty() && !pb.is_empty() && pa.len() + pb.len() == PARTITIONS as usize).then_some(())
    })
    .await;

    let erased: Vec<String> = (0..4).map(|i| format!("erased-{i}")).collect();
    let stop = std::cell::Cell::new(false);
    let posters = futures_util::future::join_all(erased.iter().chain(&erased).map(|u| post_while([&a, &b], u, &stop)));
    let erasers = async {
        futures_util::future::join_all(erased.iter().map(|u| erase_repeatedly([&a, &b], u, 150))).await;
        stop.set(true);
    };
    futures_util::join!(posters, erasers);

    let others: Vec<String> = (0..60).map(|i| format!("other-{i}")).collect();
    for round in 0..10 {
        let batch: Vec<Value> = others.iter().map(|u| event(u, &format!("item-{:04}", round), "click")).collect();
        let server = if round % 2 == 0 { &a } else { &b };
        post_events(server, json!(batch)).await;
    }
    let expected = others.len() * 10;
    // Wait for progress, not for a rate: fail only when nothing more is applied for a long while.
    let (mut applied, mut progressed) = (0, Instant::now());
    while applied < expected {
        let now = stored(&config, &others).await;
        if now > applied {
            (applied, progressed) = (now, Instant::now());
        }
        assert!(
            progressed.elapsed() < STALL,
            "consumption stalled: {applied} of {expected} events applied, none more for {STALL:?}"
        );
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(applied, expected, "every event applied once");
    for server in [&a, &b] {
        let ready: Value =
            client().get(format!("{}/readyz", server.url())).send().await.expect("readyz").json().await.expect("json");
        assert_eq!(ready["degraded"], json!(false), "{ready}");
    }
    a.stop().await;
    b.stop().await;
}

/// While the Kafka consumer reports a stall (a batch not durable for 30 s, which sets
/// `liverec_kafka_ingest_stalled`), `/readyz` says so with the reason, and stops saying it after.
#[actix_rt::test]
async fn a_stalled_ingest_makes_readyz_degraded_with_the_reason() {
    let server = start(test_config()).await;
    let ready = get(&server, "/readyz").await;
    assert_eq!(ready.body["degraded"], json!(false), "{}", ready.body);
    assert_eq!(ready.body["degraded_reasons"], json!([]), "{}", ready.body);
    server.metrics.kafka_stalled.set(1);
    let ready = get(&server, "/readyz").await;
    assert_eq!(ready.body["degraded"], json!(true), "{}", ready.body);
    assert_eq!(ready.body["degraded_reasons"], json!(["kafka_ingest_stalled"]), "{}", ready.body);
    assert_eq!(metric(&server, "liverec_kafka_ingest_stalled").await, 1.0);
    server.metrics.kafka_stalled.set(0);
    assert_eq!(get(&server, "/readyz").await.body["degraded"], json!(false));
    server.stop().await;
}
