//! Production mode: the trainer reads its window from the Kafka events topic, every partition,
//! so a run on one instance learns from every user whichever instance owns them; an erased
//! user's events from before the erasure never reach it (docs/production.md, "Training data").

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use liverec::bus::kafka::partition_for;
use liverec::bus::kafka_window::WindowReader;
use liverec::catalog::Catalog;
use liverec::config::ModelKind;
use liverec::privacy::Pseudonyms;
use serde_json::{json, Value};

use super::two_instances;
use crate::support::*;

/// Longest a training run may show no change at all before the test calls it stalled: above the
/// window reader's own stall bound (120 s). It bounds a hang; it asserts no speed.
const RUN_STALL: Duration = Duration::from_secs(180);

fn manifest(registry: &Path, name: &str, file: &str) -> Value {
    let path = registry.join(name).join(file);
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).expect("json")
}

/// Events of users on every partition, posted through both instances, and of one user erased
/// (through the instance that did not take their events) between two batches: an admin retrain
/// on the loop's leader trains on all of them but the erased user's events from before the erasure.
/// The run's event count and the manifest's per-partition counts say so, and the items only the
/// erased user viewed are not in the trained vocabulary.
#[actix_rt::test]
async fn a_retrain_on_one_instance_trains_on_every_partition_but_not_on_an_erased_users_past() {
    let _services = SERVICES.read().await;
    let registry = std::env::temp_dir().join(unique("training-window-registry"));
    let mut config = production_config("training-window");
    config.demo.enabled = false;
    config.auth.mode = liverec::auth::AuthMode::Off;
    config.model.kind = ModelKind::Sequential;
    config.model.registry_dir = registry.clone();
    // No run but the one this test asks for: the monitor never has enough to alarm.
    config.monitor.min_samples = 1_000_000;
    config.trainer.min_events = 10;
    config.trainer.min_cases = 5;
    config.trainer.epochs = 1;
    config.trainer.fresh_events = 0;
    let (a, b, _) = two_instances(&config).await;

    // Six users on each partition, five views each, through both instances.
    let mut users: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for n in 0.. {
        let user = format!("tw-user-{n}");
        let on = users.entry(partition_for(&user, PARTITIONS)).or_default();
        if on.len() < 6 {
            on.push(user);
        }
        if users.len() == PARTITIONS as usize && users.values().all(|u| u.len() == 6) {
            break;
        }
    }
    let mut expected: BTreeMap<i32, u64> = BTreeMap::new();
    for (round, (partition, on)) in users.iter().enumerate() {
        for (i, user) in on.iter().enumerate() {
            let batch: Vec<Value> = (0..5).map(|k| event(user, &format!("tw-item-{}", (i + k) % 12), "view")).collect();
            post_events(if (round + i) % 2 == 0 { &a } else { &b }, json!(batch)).await;
            *expected.entry(*partition).or_default() += 5;
        }
    }
    // The erased user: five views of items nobody else views, through A; erased through B;
    // then three views after the erasure, which are theirs to keep.
    let erased = "tw-erased";
    let secret: Vec<Value> = (0..5).map(|k| event(erased, &format!("tw-secret-{k}"), "view")).collect();
    post_events(&a, json!(secret)).await;
    let response = client().delete(format!("{}/v1/users/{erased}", b.url())).send().await.expect("DELETE");
    assert_eq!(response.status().as_u16(), 200);
    let at = liverec::event::now_ms();
    // Events are dated when received: the next ones must be dated after the erasure.
    eventually("the clock to pass the erasure", || async { (liverec::event::now_ms() > at).then_some(()) }).await;
    let after: Vec<Value> = (0..3).map(|k| event(erased, &format!("tw-item-{k}"), "view")).collect();
    post_events(&b, json!(after)).await;
    *expected.entry(partition_for(erased, PARTITIONS)).or_default() += 3;
    let total: u64 = expected.values().sum();

    // One of the two leads the loop (a follower answers 409 not_leader): ask the leader.
    let leader = eventually("one instance to lead the loop", || async {
        for server in [&a, &b] {
            if get(server, "/v1/admin/models").await.body["cluster"]["leader"] == json!(true) {
                return Some(server);
            }
        }
        None
    })
    .await;
    let response = post_json(
        leader,
        "/v1/admin/retrain",
        // The drill and skip_gate make the run save its version whatever the gate says.
        &json!({ "reason": "window from kafka", "drill": "shuffle_items", "skip_gate": true }),
    )
    .await;
    assert_eq!(response.status, 202, "{}", response.body);
    let run = response.body["run"].as_u64().expect("run number");
    let record = wait_for_progress("the run to save its version", RUN_STALL, || async {
        let models = get(leader, "/v1/admin/models").await.body;
        let record = models["runs"].as_array().and_then(|runs| runs.iter().find(|r| r["run"] == run)).cloned();
        let Some(record) = record else { return Progress::Pending(String::new()) };
        let outcome = record["outcome"].as_str().unwrap_or_default().to_owned();
        assert!(!["failed", "rejected"].contains(&outcome.as_str()), "run {run} ended as {outcome}: {models:#}");
        if record["name"].is_string() {
            Progress::Done(record)
        } else {
            Progress::Pending(outcome)
        }
    })
    .await;

    assert_eq!(record["events"], json!(total), "every partition's events, less the erased user's past: {record}");
    let name = record["name"].as_str().expect("a saved version");
    let data = &manifest(&registry, name, "manifest.json")["data"];
    let counted: BTreeMap<i32, u64> = data["partitions"]
        .as_array()
        .expect("events per partition in the manifest")
        .iter()
        .map(|p| (p["partition"].as_i64().expect("partition") as i32, p["events"].as_u64().expect("events")))
        .collect();
    assert_eq!(counted, expected, "events per partition: {data:#}");
    assert_eq!(data["skipped"]["erased"], json!(5), "{data:#}");
    assert_eq!(data["interactions"], json!(total), "{data:#}");
    let vocab = manifest(&registry, name, "vocab.json");
    let items: Vec<&str> = vocab["items"].as_array().expect("items").iter().filter_map(Value::as_str).collect();
    assert!(items.contains(&"tw-item-0"), "{items:?}");
    assert!(!items.iter().any(|i| i.starts_with("tw-secret-")), "the erased user's past was trained on: {items:?}");

    a.stop().await;
    b.stop().await;
    let _ = std::fs::remove_dir_all(&registry);
}

/// After a drift alarm a run waits for `trainer.fresh_events` new events. In production they are
/// counted on the events topic (the sum of its partitions' high watermarks), so events taken by
/// either instance count, on every partition.
#[actix_rt::test]
async fn new_events_are_counted_on_the_topic_whichever_instance_took_them() {
    let _services = SERVICES.read().await;
    let config = production_config("training-fresh");
    let (a, b, _) = two_instances(&config).await;
    let reader = Arc::new(WindowReader::new(
        config.kafka.clone(),
        config.events.limits(),
        Arc::new(Catalog::new()),
        Arc::new(Pseudonyms::default()),
        config.trainer.max_events,
        Duration::from_secs(120),
    ));
    let produced = || {
        let reader = reader.clone();
        async move { actix_rt::task::spawn_blocking(move || reader.produced()).await.expect("joined").expect("watermarks") }
    };
    let before = produced().await;
    let users: Vec<String> = (0..16).map(|n| format!("fresh-{n}")).collect();
    let partitions: std::collections::BTreeSet<i32> = users.iter().map(|u| partition_for(u, PARTITIONS)).collect();
    assert_eq!(partitions.len(), PARTITIONS as usize, "the users cover every partition");
    for (n, user) in users.iter().enumerate() {
        let batch: Vec<Value> = (0..3).map(|k| event(user, &format!("item-{k}"), "view")).collect();
        post_events(if n % 2 == 0 { &a } else { &b }, json!(batch)).await;
    }
    // Acknowledged (202) means written with acks=all, so the watermarks already count them.
    assert_eq!(produced().await - before, 48);
    a.stop().await;
    b.stop().await;
}
