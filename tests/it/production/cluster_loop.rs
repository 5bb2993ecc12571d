//! Production mode, the loop across instances: three liverec processes on the real Kafka and
//! Redis, sharing one registry folder (a faithful stand-in for a shared registry on one machine).
//! One of them leads (a Redis lease); promotions and rollbacks are control records every
//! instance applies; a record of an older leader is ignored everywhere; an instance restarted
//! after a promotion serves the promoted version; a SIGKILLed leader is replaced.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Instant;

use liverec::cluster::control::ControlPublisher;
use liverec::cluster::record::{DesiredState, ServingVersion};
use liverec::config::Config;
use serde_json::{json, Value};

use crate::models::train_version;
use crate::support::*;

/// The lease's TTL and renewal interval of these tests: a dead leader is replaced within about
/// the TTL (plus a renewal interval for the next try).
const LEASE_TTL_MS: u64 = 3000;
const RENEW_MS: u64 = 500;

/// A liverec process of the cluster.
struct Instance {
    child: Child,
    id: String,
    port: u16,
    url: String,
}

impl Instance {
    /// Starts instance `id` on `port`, with `extra` settings (`LIVEREC_…` variables) of the test's.
    fn spawn(config: &Config, registry: &Path, id: &str, port: u16, logs: &Path, extra: &[(&str, &str)]) -> Instance {
        let url = format!("http://127.0.0.1:{port}");
        let log = std::fs::File::create(logs.join(format!("{id}.log"))).expect("log file");
        let child = super::serve_command(config, port)
            .env("LIVEREC_MODEL__KIND", "sequential")
            .env("LIVEREC_MODEL__REGISTRY_DIR", registry)
            // Every instance starts with v1: what else serves comes from the control topic.
            .env("LIVEREC_MODEL__VERSION", "v1")
            .env("LIVEREC_CLUSTER__INSTANCE_ID", id)
            .env("LIVEREC_CLUSTER__ADVERTISE_URL", &url)
            .env("LIVEREC_CLUSTER__LEASE_TTL_MS", LEASE_TTL_MS.to_string())
            .env("LIVEREC_CLUSTER__RENEW_INTERVAL_MS", RENEW_MS.to_string())
            .env("LIVEREC_DEMO__ITEMS", "200")
            .env("LIVEREC_DEMO__USERS", "300")
            .env("LIVEREC_LOG__LEVEL", "info")
            .envs(extra.iter().copied())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn liverec");
        Instance { child, id: id.to_owned(), port, url }
    }

    async fn get(&self, path: &str) -> Option<(u16, Value)> {
        super::get_at(&self.url, path).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        super::post_at(&self.url, path, body).await
    }

    /// The loop's view of the cluster (`cluster` of `GET /v1/admin/models`) and the version serving.
    async fn loop_state(&self) -> Option<(Value, String)> {
        let (status, body) = self.get("/v1/admin/models").await?;
        (status == 200).then(|| (body["cluster"].clone(), body["serving"].as_str().unwrap_or_default().to_owned()))
    }

    async fn serving(&self) -> Option<String> {
        Some(self.loop_state().await?.1)
    }

    async fn metric(&self, sample: &str) -> Option<f64> {
        super::metric_at(&self.url, sample).await
    }

    fn kill(&mut self) {
        let _ = Command::new("kill").args(["-KILL", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A registry folder with two versions, `v1` and `v2`; their versions.
fn shared_registry(name: &str) -> (PathBuf, String, String) {
    let dir = std::env::temp_dir().join(unique(name));
    let v1 = train_version(&dir, "v1", 1, 1_700_000_000);
    let v2 = train_version(&dir, "v2", 2, 1_700_000_100);
    assert_ne!(v1, v2);
    (dir, v1, v2)
}

async fn wait_ready(instances: &[&Instance]) {
    for instance in instances {
        eventually(&format!("{} ready", instance.id), || async {
            let (status, body) = instance.get("/readyz").await?;
            (status == 200 && body["status"] == "ready").then_some(())
        })
        .await;
    }
}

/// The one leader all `instances` agree on (each sees exactly one leader: itself or the same
/// other), with its epoch.
async fn agreed_leader(instances: &[&Instance]) -> (String, u64) {
    let urls: Vec<(&str, &str)> = instances.iter().map(|i| (i.id.as_str(), i.url.as_str())).collect();
    let (leader, epoch) = super::agreed_leader_of(&urls).await;
    (instances[leader].id.clone(), epoch)
}

/// Waits until every instance serves `version`.
async fn all_serve(instances: &[&Instance], version: &str, what: &str) {
    for instance in instances {
        eventually(&format!("{} serves {what}", instance.id), || async {
            (instance.serving().await? == version).then_some(())
        })
        .await;
    }
}

#[actix_rt::test]
async fn three_instances_have_one_leader_and_every_change_of_version_reaches_all_of_them() {
    let _services = SERVICES.read().await;
    let config = production_config("cluster-loop");
    let (registry, v1, v2) = shared_registry("cluster-loop-registry");
    let logs = registry.join("logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    let mut instances: Vec<Instance> =
        ["i1", "i2", "i3"].iter().map(|id| Instance::spawn(&config, &registry, id, free_port(), &logs, &[])).collect();
    wait_ready(&instances.iter().collect::<Vec<_>>()).await;

    // Exactly one leader, and the metric says so too.
    let (leader_id, epoch) = agreed_leader(&instances.iter().collect::<Vec<_>>()).await;
    let mut leaders = 0.0;
    for instance in &instances {
        leaders += instance.metric("liverec_cluster_leader").await.expect("leader gauge");
    }
    assert_eq!(leaders, 1.0, "one instance holds the lease");
    all_serve(&instances.iter().collect::<Vec<_>>(), &v1, "v1 at start").await;
    let leader = instances.iter().position(|i| i.id == leader_id).expect("the leader is one of them");
    let follower = (leader + 1) % 3;

    // A follower refuses the loop's requests and names the leader.
    let (status, refused) = instances[follower].post("/v1/admin/models/v2/promote", json!({})).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "not_leader", "{refused}");
    assert_eq!(refused["leader"]["instance_id"], json!(leader_id), "{refused}");
    assert_eq!(refused["leader"]["advertise_url"], json!(instances[leader].url), "{refused}");
    let (status, _) = instances[follower].post("/v1/admin/retrain", json!({})).await;
    assert_eq!(status, 409, "a follower does not train");

    // A promotion on the leader is served by all three.
    let (status, promoted) = instances[leader].post("/v1/admin/models/v2/promote", json!({ "reason": "it" })).await;
    assert_eq!((status, promoted["serving"].clone()), (200, json!(v2)), "{promoted}");
    all_serve(&instances.iter().collect::<Vec<_>>(), &v2, "the promoted v2").await;

    // A rollback reaches all three.
    let (status, rolled) = instances[leader].post("/v1/admin/rollback", json!({})).await;
    assert_eq!((status, rolled["serving"].clone()), (200, json!(v1)), "{rolled}");
    all_serve(&instances.iter().collect::<Vec<_>>(), &v1, "v1 after the rollback").await;

    // Promoted again; a follower SIGKILLed and started again serves it, not its configured v1.
    let (status, _) = instances[leader].post("/v1/admin/models/v2/promote", json!({})).await;
    assert_eq!(status, 200);
    all_serve(&instances.iter().collect::<Vec<_>>(), &v2, "v2 promoted again").await;
    instances[follower].kill();
    let port = instances[follower].port;
    let id = instances[follower].id.clone();
    instances[follower] = Instance::spawn(&config, &registry, &id, port, &logs, &[]);
    wait_ready(&[&instances[follower]]).await;
    assert_eq!(
        instances[follower].serving().await.as_deref(),
        Some(v2.as_str()),
        "ready only once it serves the desired version"
    );

    // A record of an older leader (epoch below the current one) is ignored by every instance.
    let topic = config.cluster.control_topic_name(&config.kafka);
    let publisher = ControlPublisher::new(&config.kafka, topic).expect("producer");
    let stale = DesiredState {
        epoch: epoch - 1,
        seq: u64::MAX / 2,
        leader: "an-old-leader".into(),
        at_ms: 0,
        control: ServingVersion { name: Some("v1".into()), version: v1.clone() },
        challenger: None,
        run: None,
        previous: None,
    };
    publisher.enqueue(&stale).await.expect("the broker takes the stale record");
    for instance in &instances {
        eventually(&format!("{} fences the stale record", instance.id), || async {
            (instance.metric("liverec_cluster_control_fenced_total").await? >= 1.0).then_some(())
        })
        .await;
        assert_eq!(instance.serving().await.as_deref(), Some(v2.as_str()), "{} still serves v2", instance.id);
    }

    // SIGKILL the leader: another one leads within about the lease's TTL (the deadline only
    // detects a stall), with a higher epoch, and its promotions reach the others.
    let killed_at = Instant::now();
    instances[leader].kill();
    let survivors: Vec<&Instance> =
        instances.iter().enumerate().filter(|(i, _)| *i != leader).map(|(_, i)| i).collect();
    let (new_leader, new_epoch) = agreed_leader(&survivors).await;
    let failover = killed_at.elapsed();
    println!("leader failover: {failover:?} (lease TTL {LEASE_TTL_MS} ms, renewal every {RENEW_MS} ms)");
    assert_ne!(new_leader, leader_id);
    assert!(new_epoch > epoch, "a new leader has a new epoch: {new_epoch} after {epoch}");
    let new_leader = survivors.iter().find(|i| i.id == new_leader).expect("a survivor leads");
    let (status, rolled) = new_leader.post("/v1/admin/rollback", json!({})).await;
    assert_eq!(
        (status, rolled["serving"].clone()),
        (200, json!(v1)),
        "the new leader knows where to roll back: {rolled}"
    );
    all_serve(&survivors, &v1, "v1 rolled back by the new leader").await;

    // A record naming a version the registry does not hold yet (an upload still under way):
    // the instances go on serving v1 and load it once it is there, with no record after it.
    let staged = std::env::temp_dir().join(unique("cluster-loop-v3"));
    let v3 = train_version(&staged, "v3", 3, 1_700_000_200);
    let (cluster, _) = new_leader.loop_state().await.expect("the leader's view");
    let ahead = DesiredState {
        epoch: new_epoch,
        seq: cluster["desired"]["seq"].as_u64().expect("the newest record's seq") + 1,
        leader: new_leader.id.clone(),
        at_ms: 0,
        control: ServingVersion { name: Some("v3".into()), version: v3.clone() },
        challenger: None,
        run: None,
        previous: Some(ServingVersion { name: Some("v1".into()), version: v1.clone() }),
    };
    let applied_before: Vec<f64> = {
        let mut counts = Vec::new();
        for instance in &survivors {
            counts.push(instance.metric("liverec_cluster_control_applied_total").await.unwrap_or(0.0));
        }
        counts
    };
    publisher.enqueue(&ahead).await.expect("the broker takes the record");
    for (instance, before) in survivors.iter().zip(&applied_before) {
        // The record was read (the trainer heard of it) but not applied: v1 still serves.
        eventually(&format!("{} tries to apply the record naming v3", instance.id), || async {
            let (cluster, serving) = instance.loop_state().await?;
            (cluster["desired"]["seq"].as_u64() == Some(ahead.seq) || serving != v1).then_some(())
        })
        .await;
        assert_eq!(instance.serving().await.as_deref(), Some(v1.as_str()), "{} serves v1 meanwhile", instance.id);
        let applied = instance.metric("liverec_cluster_control_applied_total").await.unwrap_or(0.0);
        assert_eq!(applied, *before, "{}: a record not applied is not counted as applied", instance.id);
    }
    std::fs::rename(staged.join("v3"), registry.join("v3")).expect("v3 into the registry");
    all_serve(&survivors, &v3, "v3, once the registry holds it").await;
    let _ = std::fs::remove_dir_all(&registry);
    let _ = std::fs::remove_dir_all(&staged);
}

/// Posts `events_per_user` clicks for each of `users` users (spread over every partition) through
/// `instance`.
async fn post_walks(instance: &Instance, users: usize, events_per_user: usize) {
    for round in 0..events_per_user {
        let batch: Vec<Value> = (0..users)
            .map(|u| {
                json!({ "user_id": format!("walker-{u}"), "item_id": format!("seq-{}", (u * 7 + round) % 20), "event_type": "click" })
            })
            .collect();
        let (status, body) = instance.post("/v1/events", Value::from(batch)).await;
        assert_eq!(status, 202, "{body}");
    }
}

/// The loop's state on `instance` (`state` of `GET /v1/admin/models`) and the whole answer.
async fn loop_answer(instance: &Instance) -> Option<Value> {
    let (status, body) = instance.get("/v1/admin/models").await?;
    (status == 200).then_some(body)
}

#[actix_rt::test]
async fn a_new_leader_rolls_back_the_canary_it_finds_and_restarts_the_run_it_finds_training_once() {
    let _services = SERVICES.read().await;
    let config = production_config("cluster-takeover");
    let (registry, v1, _) = shared_registry("cluster-takeover-registry");
    let logs = registry.join("logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    // Small runs: few events suffice, and every run trains for a few seconds (a time budget,
    // not an epoch count), long enough to be caught training.
    let small_runs = [
        ("LIVEREC_TRAINER__MIN_EVENTS", "20"),
        ("LIVEREC_TRAINER__MIN_CASES", "5"),
        ("LIVEREC_TRAINER__EPOCHS", "100000"),
        ("LIVEREC_TRAINER__TIME_BUDGET_SECS", "4"),
    ];
    let spawn = |id: &str| Instance::spawn(&config, &registry, id, free_port(), &logs, &small_runs);
    let mut instances: Vec<Instance> = ["t1", "t2", "t3"].iter().map(|id| spawn(id)).collect();
    wait_ready(&instances.iter().collect::<Vec<_>>()).await;
    let (leader_id, _) = agreed_leader(&instances.iter().collect::<Vec<_>>()).await;
    let leader = instances.iter().position(|i| i.id == leader_id).expect("a leader");
    // Events only once every instance owns partitions, so the leader's log gets its share.
    eventually("every instance owns partitions", || async {
        let mut owned = 0;
        for instance in &instances {
            let (_, ready) = instance.get("/readyz").await?;
            let parts = ready["kafka_partitions"].as_array()?.len();
            if parts == 0 {
                return None;
            }
            owned += parts;
        }
        (owned == PARTITIONS as usize).then_some(())
    })
    .await;
    post_walks(&instances[0], 90, 6).await;
    wait_for_progress("the leader's event log fills", std::time::Duration::from_secs(60), || async {
        match instances[leader].metric("liverec_eventlog_events").await {
            Some(n) if n >= 60.0 => Progress::Done(()),
            other => Progress::Pending(other.map(|n| n as u64)),
        }
    })
    .await;

    // A drill sends a candidate to canary whatever the gate says: every instance serves it to the
    // same share, split by the same salt.
    let (status, ack) =
        instances[leader].post("/v1/admin/retrain", json!({ "drill": "shuffle_items", "skip_gate": true })).await;
    assert_eq!(status, 202, "{ack}");
    let canary = wait_for_progress("the canary", std::time::Duration::from_secs(120), || async {
        let Some(body) = loop_answer(&instances[leader]).await else { return Progress::Pending(String::new()) };
        match body["state"].as_str() {
            Some("canary") => Progress::Done(body["canary"]["version"].as_str().unwrap_or_default().to_owned()),
            other => Progress::Pending(other.unwrap_or_default().to_owned()),
        }
    })
    .await;
    let mut salts = Vec::new();
    for instance in &instances {
        let body = eventually(&format!("{} serves the canary", instance.id), || async {
            let body = loop_answer(instance).await?;
            // The split serves it first; the trainer's view of the control record (the
            // `cluster` part) follows by a message of its own.
            let seen = body["traffic"]["challenger"]["version"] == json!(canary)
                && body["cluster"]["desired"]["challenger"]["version"] == json!(canary);
            seen.then_some(body)
        })
        .await;
        assert_eq!(body["traffic"]["challenger"]["share"], json!(0.1), "{}", instance.id);
        salts.push(body["cluster"]["desired"]["challenger"]["salt"].clone());
    }
    assert!(salts.iter().all(|s| *s == salts[0] && s.is_u64()), "one split everywhere: {salts:?}");

    // The leader dies during the canary: the next one rolls it back on every instance.
    instances[leader].kill();
    let survivors: Vec<&Instance> =
        instances.iter().enumerate().filter(|(i, _)| *i != leader).map(|(_, i)| i).collect();
    let (second_id, _) = agreed_leader(&survivors).await;
    for instance in &survivors {
        eventually(&format!("{} serves no canary", instance.id), || async {
            let body = loop_answer(instance).await?;
            (body["traffic"]["challenger"].is_null() && body["serving"] == json!(v1)).then_some(())
        })
        .await;
    }
    let second = instances.iter().position(|i| i.id == second_id).expect("second leader");
    let history = loop_answer(&instances[second]).await.expect("loop state")["history"].clone();
    assert!(
        history.as_array().expect("history").iter().any(|h| h["step"] == "rolled_back"
            && h["detail"].as_str().unwrap_or_default().contains("leader changed during the canary")),
        "{history}"
    );

    // The second leader dies training: the third restarts that run, once.
    let (status, ack) = instances[second].post("/v1/admin/retrain", json!({ "reason": "to be interrupted" })).await;
    assert_eq!(status, 202, "{ack}");
    // Killed once its successors can know of the run: the control topic says it is training.
    eventually("the second leader trains, and the control topic says so", || async {
        let body = loop_answer(&instances[second]).await?;
        let published = body["cluster"]["desired"]["run"]["phase"] == "training";
        (body["state"] == "training" && published).then_some(())
    })
    .await;
    instances[second].kill();
    let third = (0..3).find(|i| *i != leader && *i != second).expect("a third instance");
    let last: Vec<&Instance> = vec![&instances[third]];
    agreed_leader(&last).await;
    let runs = eventually("the third leader restarts the interrupted run", || async {
        let body = loop_answer(&instances[third]).await?;
        let runs = body["runs"].as_array()?.clone();
        runs.iter().any(|r| r["reasons"][0] == "restarted after a leader change: to be interrupted").then_some(runs)
    })
    .await;
    let restarted = runs
        .iter()
        .filter(|r| r["reasons"][0].as_str().unwrap_or_default().starts_with("restarted after a leader change"))
        .count();
    assert_eq!(restarted, 1, "restarted once: {runs:?}");
    let _ = std::fs::remove_dir_all(&registry);
}

/// An instance whose taking of the lease reached Redis but whose answer it never heard (the call
/// cut short on a loaded machine), or which restarted within the TTL, takes its own lease back at
/// its next try, with the same epoch; before, the cluster had a holder that did not know it led
/// until the key expired, and on a loaded machine that could repeat at every try.
#[actix_rt::test]
async fn an_instance_takes_back_a_lease_that_names_it_and_others_still_wait() {
    use liverec::cluster::lease::{Acquired, Lease};
    use std::time::Duration;

    let _services = SERVICES.read().await;
    let config = production_config("lease-back");
    let ttl = Duration::from_secs(30);
    let mut first = Lease::new(&config.redis, "i1".into(), "http://127.0.0.1:1".into(), ttl);
    let Acquired::Taken(taken) = first.acquire().await.expect("redis answers") else {
        panic!("a vacant lease is taken")
    };
    // The same instance, without the answer (a new Lease holds no memory of the first call).
    let mut again = Lease::new(&config.redis, "i1".into(), "http://127.0.0.1:1".into(), ttl);
    assert_eq!(again.acquire().await.expect("redis answers"), Acquired::Taken(taken.clone()), "taken back, same epoch");
    assert!(again.renew(&taken).await.expect("redis answers"), "and renewable as its own");
    // Another instance, or the same id at another address, still finds it held.
    let mut other = Lease::new(&config.redis, "i2".into(), "http://127.0.0.1:2".into(), ttl);
    assert_eq!(other.acquire().await.expect("redis answers"), Acquired::Held(taken.clone()));
    let mut moved = Lease::new(&config.redis, "i1".into(), "http://127.0.0.1:3".into(), ttl);
    assert_eq!(moved.acquire().await.expect("redis answers"), Acquired::Held(taken.clone()));
    assert!(again.release(&taken).await.expect("redis answers"));
}
