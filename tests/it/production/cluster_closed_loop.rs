//! Production mode, the closed loop of a cluster end to end (issue 15, "Tests"): three liverec
//! processes on the real Kafka, Redis and object store (s3proxy, `model.registry_url`), with the
//! user simulator browsing each user on the instance that owns the user's partition (which counts
//! the lists it serves). A taste shift over users of every partition is detected on the cluster
//! view, retrained once on the leader from every partition's events, canaried with the same split
//! on every instance and promoted on all three; a bad model is rolled back on all three.
//!
//! Paced like `closed_loop.rs`: by simulated lists, never by the clock; a wait fails only on a
//! stall (no simulated list for [`DEADLINE`]) or when a budget of lists passes without its event.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use liverec::bus::kafka::partition_for;
use liverec::sim::{Route, SimConfig, SimControl};
use serde_json::{json, Value};

use crate::closed_loop::{more_lists, run_ended_as, until_lists};
use crate::support::*;

/// Most simulated lists one stage of the loop may take: a budget of work, not of time (as in
/// `closed_loop.rs`).
const STAGE_LISTS: u64 = 150_000;

/// The simulator's users (`sim-user-<seed>-<n>`), seed and count.
const SEED: u64 = 11;
const USERS: usize = 200;

/// The loop's settings, shortened as `closed_loop.rs` shortens them (a 10 s drift window, a
/// 15 s training window, a 40 s training budget, a 50 % canary judged on 600 impressions).
const LOOP_SETTINGS: &[(&str, &str)] = &[
    ("LIVEREC_MONITOR__BUCKET_SECS", "1"),
    ("LIVEREC_MONITOR__WINDOW_SECS", "10"),
    ("LIVEREC_MONITOR__MIN_SAMPLES", "200"),
    ("LIVEREC_MONITOR__COOLDOWN_SECS", "3600"),
    // A wide margin between the shift (PSI about 3.5) and noise (see closed_loop.rs's shift test).
    ("LIVEREC_MONITOR__PSI_THRESHOLD", "1.0"),
    ("LIVEREC_TRAINER__WINDOW_SECS", "15"),
    ("LIVEREC_TRAINER__FRESH_EVENTS", "3000"),
    ("LIVEREC_TRAINER__MIN_EVENTS", "300"),
    ("LIVEREC_TRAINER__MIN_CASES", "50"),
    ("LIVEREC_TRAINER__EPOCHS", "20"),
    // No clock limits on runs (see closed_loop.rs's loop_config): epochs and impressions bound them.
    ("LIVEREC_TRAINER__TIME_BUDGET_SECS", "0"),
    ("LIVEREC_ROLLOUT__CANARY_SHARE", "0.5"),
    // Above closed_loop.rs's 300: the canary lasts long enough to compare 120 lists' variants.
    ("LIVEREC_ROLLOUT__MIN_IMPRESSIONS", "600"),
    ("LIVEREC_ROLLOUT__Z_THRESHOLD", "3.0"),
    ("LIVEREC_ROLLOUT__MAX_SECS", "86400"),
    ("LIVEREC_ROLLOUT__CHECK_INTERVAL_MS", "250"),
    ("LIVEREC_CLUSTER__REPORT_INTERVAL_MS", "500"),
];

/// A liverec process of the cluster, killed when the test ends.
struct Instance {
    _child: KilledOnDrop,
    id: String,
    url: String,
    /// Its registry cache (`model.registry_dir`): versions it loaded are downloaded here.
    cache: PathBuf,
}

impl Instance {
    fn spawn(config: &liverec::config::Config, registry_url: &str, dir: &Path, id: &str) -> Instance {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let cache = dir.join(id);
        let log = std::fs::File::create(dir.join(format!("{id}.log"))).expect("log file");
        let child = super::serve_command(config, port)
            .env("LIVEREC_KAFKA__COMMIT_INTERVAL_MS", "200")
            .env("LIVEREC_MODEL__KIND", "sequential")
            // Simulated users come back to their favourites (see closed_loop.rs's loop_config).
            .env("LIVEREC_SESSION__CONSUMED_MAX", "0")
            .env("LIVEREC_MODEL__REGISTRY_URL", registry_url)
            .env("LIVEREC_MODEL__REGISTRY_DIR", &cache)
            .env("LIVEREC_CLUSTER__INSTANCE_ID", id)
            .env("LIVEREC_CLUSTER__ADVERTISE_URL", &url)
            .env("LIVEREC_DEMO__ENABLED", "false")
            .env("LIVEREC_AUTH__MODE", "off")
            .env("LIVEREC_SERVER__WORKERS", "2")
            .env("LIVEREC_SESSION__ARBITERS", "2")
            .env("LIVEREC_LOG__LEVEL", "info")
            .envs(LOOP_SETTINGS.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn liverec");
        Instance { _child: KilledOnDrop(child), id: id.to_owned(), url, cache }
    }

    async fn get(&self, path: &str) -> Option<(u16, Value)> {
        super::get_at(&self.url, path).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        super::post_at(&self.url, path, body).await
    }

    /// `GET /v1/admin/models`.
    async fn models(&self) -> Value {
        let (status, body) = self.get("/v1/admin/models").await.expect("GET /v1/admin/models");
        assert_eq!(status, 200, "{}: {body}", self.id);
        body
    }

    async fn metric(&self, sample: &str) -> Option<f64> {
        super::metric_at(&self.url, sample).await
    }

    /// The user's list scored anew here (a `k` above the pushed list's: with this instance's
    /// models and split, also on an instance that does not own the user).
    async fn fresh_list(&self, user: &str) -> Value {
        let (status, body) =
            self.get(&format!("/v1/users/{user}/recommendations?k=20")).await.expect("GET recommendations");
        assert_eq!(status, 200, "{}: {body}", self.id);
        body
    }
}

/// Three instances, the simulator, and who leads.
struct ClusterLoop {
    instances: Vec<Instance>,
    leader: usize,
    sim: Arc<SimControl>,
    sim_task: actix_rt::task::JoinHandle<Result<liverec::sim::SimReport, liverec::sim::SimError>>,
    dir: PathBuf,
}

impl ClusterLoop {
    async fn start(name: &str) -> ClusterLoop {
        let bucket = std::env::var("LIVEREC_TEST_S3_BUCKET").unwrap_or_else(|_| {
            panic!("LIVEREC_TEST_S3_BUCKET is not set: run the tests with scripts/test, which starts s3proxy (scripts/services up)")
        });
        let config = production_config(name);
        let registry_url = format!("s3://{bucket}/{}", unique(name));
        let dir = std::env::temp_dir().join(unique(name));
        std::fs::create_dir_all(&dir).expect("test dir");
        let instances: Vec<Instance> =
            ["c1", "c2", "c3"].iter().map(|id| Instance::spawn(&config, &registry_url, &dir, id)).collect();
        for instance in &instances {
            eventually(&format!("{} ready", instance.id), || async {
                let (status, body) = instance.get("/readyz").await?;
                (status == 200 && body["status"] == "ready").then_some(())
            })
            .await;
        }
        // Each user's requests go to its partition's owner, once all three own partitions.
        let owners: BTreeMap<i32, usize> = eventually("every instance owns partitions", || async {
            let mut owners = BTreeMap::new();
            for (i, instance) in instances.iter().enumerate() {
                let (_, ready) = instance.get("/readyz").await?;
                let parts: Vec<i32> = serde_json::from_value(ready["kafka_partitions"].clone()).ok()?;
                if parts.is_empty() {
                    return None;
                }
                owners.extend(parts.into_iter().map(|p| (p, i)));
            }
            (owners.len() == PARTITIONS as usize).then_some(owners)
        })
        .await;
        let urls: Vec<(&str, &str)> = instances.iter().map(|i| (i.id.as_str(), i.url.as_str())).collect();
        let (leader, _) = super::agreed_leader_of(&urls).await;
        let users: Vec<String> = (0..USERS).map(|u| format!("sim-user-{SEED}-{u}")).collect();
        let covered: BTreeSet<i32> = users.iter().map(|u| partition_for(u, PARTITIONS)).collect();
        assert_eq!(covered.len(), PARTITIONS as usize, "the simulated users cover every partition");
        let sim = Arc::new(SimControl::default());
        let sim_config = SimConfig {
            target: instances[0].url.clone(),
            users: USERS,
            items: 400,
            categories: 8,
            rate: 300.0,
            // Ended by `stop`: a run that ends on the clock would starve a slow machine's waits.
            duration: std::time::Duration::from_secs(24 * 3600),
            bucket: std::time::Duration::from_secs(1),
            workers: 8,
            seed: SEED,
            route: Some(Route {
                targets: instances.iter().map(|i| i.url.clone()).collect(),
                pick: Arc::new(move |user: &str| owners[&partition_for(user, PARTITIONS)]),
            }),
            ..SimConfig::default()
        };
        let sim_task = actix_rt::spawn(liverec::sim::run_with(sim_config, sim.clone()));
        ClusterLoop { instances, leader, sim, sim_task, dir }
    }

    fn leader(&self) -> &Instance {
        &self.instances[self.leader]
    }

    /// Polls `check` until it returns `Some`; fails on a stall of the simulator or after `budget`
    /// more lists (as `closed_loop.rs`'s `until`).
    async fn until<T, F, Fut>(&self, what: &str, budget: u64, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        until_lists(&self.sim, what, budget, check).await
    }

    async fn traffic(&self, more: u64) {
        more_lists(&self.sim, more).await;
    }

    /// The leader's record of run `run`, once its outcome is one of `wanted` (another final
    /// outcome fails the test).
    async fn run_outcome(&self, run: u64, wanted: &[&str]) -> Value {
        let what = format!("run {run} to end as one of {wanted:?}");
        self.until(&what, STAGE_LISTS, || async move { run_ended_as(&self.leader().models().await, run, wanted) }).await
    }

    async fn retrain(&self, body: Value) -> u64 {
        let (status, ack) = self.leader().post("/v1/admin/retrain", body).await;
        assert_eq!(status, 202, "{ack}");
        ack["run"].as_u64().expect("run number")
    }

    /// Waits until every instance serves `version` with no challenger.
    async fn all_serve(&self, version: &str, what: &str) {
        for instance in &self.instances {
            self.until(&format!("{} serves {what}", instance.id), STAGE_LISTS, || async {
                let models = instance.models().await;
                (models["serving"] == version && models["traffic"]["challenger"].is_null()).then_some(())
            })
            .await;
        }
    }

    /// The canary of `version` as each instance applies it: the same desired challenger (version,
    /// share, salt) everywhere, serving there; then the same users get the canary on every
    /// instance. Returns the salt.
    async fn same_canary_everywhere(&self, version: &str) -> u64 {
        let mut desired = Vec::new();
        for instance in &self.instances {
            let challenger = self
                .until(&format!("{} serves the canary", instance.id), STAGE_LISTS, || async {
                    let models = instance.models().await;
                    let serving = models["traffic"]["challenger"]["version"] == version;
                    let wanted = models["cluster"]["desired"]["challenger"].clone();
                    (serving && wanted["version"] == version).then_some(wanted)
                })
                .await;
            desired.push(challenger);
        }
        assert!(desired.iter().all(|d| *d == desired[0]), "one desired challenger everywhere: {desired:#?}");
        let salt = desired[0]["salt"].as_u64().expect("a salt");
        // Each instance scores the same users' lists with its own split: they must agree.
        let users: Vec<String> = (0..40).map(|u| format!("sim-user-{SEED}-{u}")).collect();
        let mut variants: Vec<Vec<String>> = Vec::new();
        let started = Instant::now();
        for instance in &self.instances {
            let mut seen = Vec::new();
            for user in &users {
                let list = instance.fresh_list(user).await;
                seen.push(format!("{}:{}", list["variant"].as_str().unwrap_or_default(), list["model_version"]));
            }
            variants.push(seen);
        }
        // Still the same canary everywhere after the lists (a verdict meanwhile would void the check).
        eprintln!("{} users' lists scored on each of 3 instances in {:?}", users.len(), started.elapsed());
        for instance in &self.instances {
            let models = instance.models().await;
            assert_eq!(models["cluster"]["desired"]["challenger"]["salt"], json!(salt), "{}", instance.id);
        }
        for (instance, seen) in self.instances.iter().zip(&variants).skip(1) {
            let differ: Vec<(&String, &String, &String)> = users
                .iter()
                .zip(&variants[0])
                .zip(seen)
                .filter(|((_, a), b)| a != b)
                .map(|((u, a), b)| (u, a, b))
                .collect();
            assert!(
                differ.is_empty(),
                "{} splits users otherwise than {}: (user, {}, {}) {differ:?}",
                instance.id,
                self.instances[0].id,
                self.instances[0].id,
                instance.id
            );
        }
        let canaried = variants[0].iter().filter(|v| v.starts_with("canary:")).count();
        assert!(
            canaried > 0 && canaried < users.len(),
            "a 50 % canary serves some of 40 users, not all: {:?}",
            variants[0]
        );
        salt
    }

    /// A first sequential version from the live window: trained on the leader, canaried on all
    /// three, promoted by hand; served by all three. Returns its version.
    async fn bootstrap(&self) -> String {
        self.traffic(2500).await;
        let run = self.retrain(json!({ "reason": "first version" })).await;
        let record = self.run_outcome(run, &["canary"]).await;
        let (status, promoted) = self.leader().post("/v1/admin/promote", json!({ "reason": "bootstrap" })).await;
        assert_eq!(status, 200, "{promoted}");
        let version = record["version"].as_str().expect("version").to_owned();
        assert_eq!(promoted["serving"], json!(version));
        self.all_serve(&version, "the first version").await;
        version
    }

    /// Pre-shift CTR as the simulated users see it, once the cluster view has a baseline and every
    /// instance judges input drift against `version`'s own first full window.
    async fn steady_ctr(&self, version: &str) -> f64 {
        self.until("a CTR baseline for the serving version", STAGE_LISTS, || async move {
            let (_, report) = self.leader().get("/v1/monitor").await?;
            report["variants"]
                .as_array()?
                .iter()
                .any(|v| v["version"] == version && v["variant"] == "control" && v["baseline_ctr"].is_number())
                .then_some(())
        })
        .await;
        // On every instance: the followers learn of the promotion from the control topic.
        let reference = format!("first full window of {version}");
        for instance in &self.instances {
            self.until("the serving version's drift reference on every instance", STAGE_LISTS, || async {
                let (_, report) = instance.get("/v1/monitor").await?;
                (report["drift"]["reference"] == json!(reference) && report["drift"]["popularity_psi"].is_number())
                    .then_some(())
            })
            .await;
        }
        self.traffic(900).await;
        self.sim.recent_ctr(3.0)
    }

    /// The manifest of version `name` as `instance` downloaded it from the shared registry.
    fn manifest(&self, instance: &Instance, name: &str) -> Value {
        let path = instance.cache.join(name).join("manifest.json");
        serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
            .expect("json")
    }

    async fn stop(self) {
        self.sim.stop();
        let report = self.sim_task.await.expect("simulator ran").expect("simulator reached the servers");
        assert!(report.lists > 0);
        drop(self.instances);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[actix_rt::test]
async fn a_taste_shift_over_every_partition_is_retrained_once_canaried_alike_and_promoted_on_all_three() {
    let _services = SERVICES.read().await;
    let lp = ClusterLoop::start("cluster-closed-loop").await;
    let v1 = lp.bootstrap().await;
    let before = lp.steady_ctr(&v1).await;
    assert!(before > 0.3, "the first version serves well before the shift: CTR {before}");
    let triggers_before = lp.leader().metric("liverec_trainer_triggers_total{source=\"monitor\"}").await.unwrap_or(0.0);

    let shifted_at = Instant::now();
    let shifted_ms = liverec::event::now_ms();
    lp.sim.shift_tastes();
    // (An alarm before the first version may be listed already: only a newer one counts.)
    let breach = lp
        .until("drift detected on the cluster view after the shift", STAGE_LISTS, || async {
            let (_, report) = lp.leader().get("/v1/monitor").await?;
            report["breaches"].as_array()?.iter().find(|b| b["at_ms"].as_i64() >= Some(shifted_ms)).cloned()
        })
        .await;
    assert!(["input_drift", "concept_drift"].contains(&breach["kind"].as_str().unwrap_or_default()), "{breach}");

    // One retrain, on the leader, asked for by its monitor; its canary split alike everywhere.
    eprintln!(
        "drift detected {:?} after the shift, simulated CTR then {:.3}",
        shifted_at.elapsed(),
        lp.sim.recent_ctr(3.0)
    );
    let run = 2;
    let record = lp.run_outcome(run, &["canary"]).await;
    let v2 = record["version"].as_str().expect("version").to_owned();
    let salt = lp.same_canary_everywhere(&v2).await;
    eprintln!("canary of {v2}: the same salt {salt} and the same users on all three instances");
    let record = lp.run_outcome(run, &["promoted"]).await;
    assert_eq!(record["sources"][0], "monitor", "the monitor asked for the retrain: {record}");
    lp.all_serve(&v2, "the promoted version").await;
    let shift_to_serving = shifted_at.elapsed();

    // Trained once, on the leader only, from every partition.
    for (i, instance) in lp.instances.iter().enumerate() {
        let models = instance.models().await;
        let runs = models["runs"].as_array().map_or(0, Vec::len);
        assert_eq!(runs, if i == lp.leader { 2 } else { 0 }, "{}: {models:#}", instance.id);
    }
    let triggers = lp.leader().metric("liverec_trainer_triggers_total{source=\"monitor\"}").await.unwrap_or(0.0);
    assert_eq!(triggers - triggers_before, 1.0, "one retrain asked for by the monitor");
    let follower = &lp.instances[(lp.leader + 1) % 3];
    let name = record["name"].as_str().expect("a registry name");
    let data = lp.manifest(follower, name)["data"].clone();
    let per_partition: BTreeMap<i64, u64> = data["partitions"]
        .as_array()
        .expect("events per partition in the manifest")
        .iter()
        .map(|p| (p["partition"].as_i64().expect("partition"), p["events"].as_u64().expect("events")))
        .collect();
    assert_eq!(per_partition.len(), PARTITIONS as usize, "every partition: {data:#}");
    assert!(per_partition.values().all(|&n| n > 0), "events from every partition: {data:#}");
    let history = lp.leader().models().await["history"].clone();
    let steps: Vec<&str> = history
        .as_array()
        .expect("history")
        .iter()
        .filter(|h| h["run"] == run)
        .filter_map(|h| h["step"].as_str())
        .collect();
    for step in ["training_started", "gate_passed", "canary_started", "promoted"] {
        assert!(steps.contains(&step), "{step} missing from the history of run {run}: {steps:?}");
    }
    let mut timeline: Vec<(i64, &str)> = history
        .as_array()
        .expect("history")
        .iter()
        .filter(|h| h["run"] == run)
        .filter_map(|h| Some((h["at_ms"].as_i64()? - shifted_ms, h["step"].as_str()?)))
        .collect();
    timeline.sort_unstable();
    eprintln!("run {run}'s steps, ms after the shift: {timeline:?}");
    eprintln!(
        "shift to {v2} serving on all three instances: {shift_to_serving:?}; run {run} trained on {} events, \
         per partition {per_partition:?} (uptime: {})",
        record["events"],
        uptime()
    );

    // The users' click-through comes back.
    let recovered = lp
        .until("CTR back to 80 % of its pre-shift level", STAGE_LISTS, || async {
            lp.traffic(300).await;
            let now = lp.sim.recent_ctr(3.0);
            (now >= 0.8 * before).then_some(now)
        })
        .await;
    eprintln!("CTR {before:.3} before the shift, {recovered:.3} after the promotion");

    // No instance serves another version: by its state, and by a user's list scored on each.
    for instance in &lp.instances {
        let models = instance.models().await;
        assert_eq!(models["serving"], json!(v2), "{}", instance.id);
        assert!(models["traffic"]["challenger"].is_null(), "{}: {models:#}", instance.id);
        for user in ["sim-user-11-3", "sim-user-11-4", "sim-user-11-5"] {
            let list = instance.fresh_list(user).await;
            assert_eq!(list["model_version"], json!(v2), "{} served {user}: {list}", instance.id);
        }
    }
    lp.stop().await;
}

#[actix_rt::test]
async fn a_bad_model_let_through_to_canary_is_rolled_back_on_every_instance_by_the_verdict() {
    let _services = SERVICES.read().await;
    let lp = ClusterLoop::start("cluster-bad-model").await;
    let v1 = lp.bootstrap().await;
    let rollbacks_before = lp.leader().metric("liverec_rollout_rollbacks_total").await.unwrap_or(0.0);

    let run = lp.retrain(json!({ "reason": "drill", "drill": "shuffle_items", "skip_gate": true })).await;
    let record = lp.run_outcome(run, &["canary"]).await;
    let bad = record["version"].as_str().expect("version").to_owned();
    let salt = lp.same_canary_everywhere(&bad).await;
    eprintln!("canary of the bad {bad}: the same salt {salt} and the same users on all three instances");
    let record = lp.run_outcome(run, &["rolled_back"]).await;
    assert!(record["detail"].as_str().unwrap_or_default().contains("worse"), "the verdict rolled it back: {record}");
    lp.all_serve(&v1, "the incumbent after the rollback").await;
    for instance in &lp.instances {
        let models = instance.models().await;
        let desired = &models["cluster"]["desired"];
        assert!(desired["challenger"].is_null(), "{}: {desired}", instance.id);
        assert_eq!(desired["run"]["phase"], "rolled_back", "{}: {desired}", instance.id);
        assert_eq!(desired["control"]["version"], json!(v1), "{}: {desired}", instance.id);
        let list = instance.fresh_list("sim-user-11-5").await;
        assert_eq!(list["model_version"], json!(v1), "{}: {list}", instance.id);
    }
    let rollbacks = lp.leader().metric("liverec_rollout_rollbacks_total").await.unwrap_or(0.0);
    assert_eq!(rollbacks, rollbacks_before + 1.0);
    lp.stop().await;
}

/// The machine's load, for the figures printed.
fn uptime() -> String {
    Command::new("uptime").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default()
}
