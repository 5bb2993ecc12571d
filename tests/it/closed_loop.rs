//! The closed loop with the user simulator, time-compressed by configuration: drift detection,
//! retraining on the event log, the validation gate, canary, promotion and rollback.
//!
//! Each test starts a server that serves the online model with an empty registry, lets simulated
//! users browse, has a first sequential version trained from the live window (admin retrain,
//! gate against window popularity, canary, manual promotion), and then exercises one path.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use liverec::config::{Config, ModelKind};
use liverec::sim::{SimConfig, SimControl};
use serde_json::{json, Value};

use crate::support::*;

/// Most simulated lists one stage of the loop may take before the test fails: a budget of work,
/// not of time. The server's own clocks (a 10 s drift window, a 15 s training window) and a
/// run's training (20 epochs: about ten seconds on a quiet machine) see at most 300 lists a
/// second, so a stage needs a few thousand, and training ten times slower still some 40,000.
const STAGE_LISTS: u64 = 150_000;

/// Run `run`'s record in `models` (`GET /v1/admin/models`) once its outcome is one of `wanted`;
/// any other final outcome fails the test with the whole loop state.
pub(crate) fn run_ended_as(models: &Value, run: u64, wanted: &[&str]) -> Option<Value> {
    let record = models["runs"].as_array()?.iter().find(|r| r["run"] == run)?.clone();
    let outcome = record["outcome"].as_str()?.to_owned();
    if wanted.contains(&outcome.as_str()) {
        return Some(record);
    }
    let settled = ["rejected", "failed", "promoted", "rolled_back"];
    assert!(!settled.contains(&outcome.as_str()), "run {run} ended as {outcome}: {models:#}");
    None
}

pub(crate) struct Loop {
    server: liverec::Server,
    sim: Arc<SimControl>,
    sim_task: actix_rt::task::JoinHandle<Result<liverec::sim::SimReport, liverec::sim::SimError>>,
    registry: PathBuf,
}

fn loop_config(registry: &std::path::Path) -> Config {
    let mut config = test_config();
    config.demo.enabled = false;
    // Auth is on outside the demo by default; these tests are about the loop (auth has its own).
    config.auth.mode = liverec::auth::AuthMode::Off;
    config.model.kind = ModelKind::Sequential;
    config.model.registry_dir = registry.to_owned();
    // The simulated users come back to their favourite items (as config/loop-demo.toml says):
    // excluding everything they ever clicked would wear their favourites out and lower the CTR
    // for no reason the loop should act on.
    config.session.consumed_max = 0;
    config.monitor.bucket_secs = 1;
    config.monitor.window_secs = 10;
    config.monitor.min_samples = 200;
    config.monitor.cooldown_secs = 3600;
    config.trainer.window_secs = 15;
    config.trainer.fresh_events = 3000;
    config.trainer.min_events = 300;
    config.trainer.min_cases = 50;
    config.trainer.epochs = 20;
    // No clock limits on the runs: a time budget trains fewer epochs on a busy machine (a
    // weaker candidate the gate may reject), and a canary deadline rolls back one that gathers
    // its impressions slowly. The epochs and `min_impressions` bound them; the tests' list
    // budgets bound the waits.
    config.trainer.time_budget_secs = 0.0;
    config.rollout.canary_share = 0.5;
    config.rollout.min_impressions = 300;
    config.rollout.z_threshold = 3.0;
    config.rollout.max_secs = 24 * 3600;
    config.rollout.check_interval_ms = 250;
    config
}

/// Polls `check` until it returns `Some`. Fails when the simulator stalls (no simulated list for
/// [`DEADLINE`]) or when `budget` more lists pass without it: never on the clock, so a loaded
/// machine only makes the test slower.
pub(crate) async fn until_lists<T, F, Fut>(sim: &SimControl, what: &str, budget: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let limit = sim.lists().saturating_add(budget);
    wait_for_progress(what, DEADLINE, || {
        let pending = check();
        async move {
            if let Some(value) = pending.await {
                return Progress::Done(value);
            }
            let lists = sim.lists();
            assert!(lists < limit, "no {what} after {budget} simulated lists");
            Progress::Pending(lists)
        }
    })
    .await
}

/// Waits until the simulator has fetched `more` lists beyond what it has now.
pub(crate) async fn more_lists(sim: &SimControl, more: u64) {
    let target = sim.lists() + more;
    until_lists(sim, &format!("{more} more simulated lists"), u64::MAX, || async move {
        (sim.lists() >= target).then_some(())
    })
    .await;
}

impl Loop {
    pub(crate) async fn start(name: &str, adjust: impl FnOnce(&mut Config)) -> Loop {
        let registry = std::env::temp_dir().join(format!("liverec-loop-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&registry);
        let mut config = loop_config(&registry);
        adjust(&mut config);
        let server = start(config).await;
        let sim = Arc::new(SimControl::default());
        let sim_config = SimConfig {
            target: server.url(),
            users: 200,
            items: 400,
            categories: 8,
            rate: 300.0,
            // Ended by `stop`: a run that ends on the clock would starve a slow machine's waits.
            duration: std::time::Duration::from_secs(24 * 3600),
            bucket: std::time::Duration::from_secs(1),
            workers: 8,
            seed: 11,
            ..SimConfig::default()
        };
        let sim_task = actix_rt::spawn(liverec::sim::run_with(sim_config, sim.clone()));
        Loop { server, sim, sim_task, registry }
    }

    async fn models(&self) -> Value {
        let response = get(&self.server, "/v1/admin/models").await;
        assert_eq!(response.status, 200, "{}", response.body);
        response.body
    }

    /// Polls `check` until it returns `Some`. Fails when the loop stalls (no simulated list for
    /// [`DEADLINE`]) or when `budget` more lists pass without it: never on the clock, so a
    /// loaded machine only makes the test slower.
    async fn until<T, F, Fut>(&self, what: &str, budget: u64, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        until_lists(&self.sim, what, budget, check).await
    }

    /// The run with this number, once its outcome is one of `wanted`; any other final outcome
    /// fails the test with the whole loop state. A run waits for fresh traffic, trains and
    /// canaries while the simulated users keep browsing.
    async fn run_outcome(&self, run: u64, wanted: &[&str]) -> Value {
        let what = format!("run {run} to end as one of {wanted:?}");
        self.until(&what, STAGE_LISTS, || async move { run_ended_as(&self.models().await, run, wanted) }).await
    }

    /// Waits until the simulator has fetched `more` lists beyond what it has now: the traffic,
    /// not the clock, paces the test.
    async fn traffic(&self, more: u64) {
        more_lists(&self.sim, more).await;
    }

    async fn retrain(&self, body: Value) -> u64 {
        let response = post_json(&self.server, "/v1/admin/retrain", &body).await;
        assert_eq!(response.status, 202, "{}", response.body);
        assert_eq!(response.body["coalesced"], false);
        response.body["run"].as_u64().expect("run number")
    }

    /// A first sequential version from the live window: trained, gated against popularity,
    /// canaried, then promoted by hand. Returns its version.
    pub(crate) async fn bootstrap(&self) -> String {
        self.traffic(2500).await;
        let run = self.retrain(json!({ "reason": "first version" })).await;
        let record = self.run_outcome(run, &["canary"]).await;
        assert!(record["candidate_ndcg10"].as_f64() > record["incumbent_ndcg10"].as_f64(), "{record}");
        assert_eq!(record["warm_started"], false, "nothing to warm-start from yet");
        let promoted = post_json(&self.server, "/v1/admin/promote", &json!({ "reason": "bootstrap" })).await;
        assert_eq!(promoted.status, 200, "{}", promoted.body);
        let version = record["version"].as_str().expect("version").to_owned();
        assert_eq!(promoted.body["serving"], json!(version));
        let models = self.models().await;
        assert_eq!(models["serving"], json!(version));
        assert_eq!(models["state"], "idle");
        version
    }

    /// Pre-shift CTR as the simulated users see it, once the monitor has a baseline for `version`
    /// and judges input drift against `version`'s own first full window.
    async fn steady_ctr(&self, version: &str) -> f64 {
        self.until("a CTR baseline for the serving version", STAGE_LISTS, || async move {
            let report = get(&self.server, "/v1/monitor").await.body;
            report["variants"]
                .as_array()?
                .iter()
                .any(|v| v["version"] == version && v["variant"] == "control" && v["baseline_ctr"].is_number())
                .then_some(())
        })
        .await;
        let reference = format!("first full window of {version}");
        self.until("the serving version's drift reference", STAGE_LISTS, || async {
            let drift = get(&self.server, "/v1/monitor").await.body["drift"].clone();
            (drift["reference"] == json!(reference) && drift["popularity_psi"].is_number()).then_some(())
        })
        .await;
        self.traffic(900).await;
        self.sim.recent_ctr(3.0)
    }

    pub(crate) async fn stop(self) {
        self.sim.stop();
        let report = self.sim_task.await.expect("simulator ran").expect("simulator reached the server");
        assert!(report.lists > 0);
        self.server.stop().await;
        let _ = std::fs::remove_dir_all(&self.registry);
    }
}

#[actix_rt::test]
async fn after_a_taste_shift_the_loop_retrains_canaries_promotes_and_ctr_recovers() {
    // The shift moves the category mix's PSI to about 3.5. Without a shift, windows of a busy
    // machine judged against a reference the previous model served have reached 0.26, above the
    // default threshold of 0.25 (`a_stationary_stream_raises_no_alarm` failed so twice before
    // the reference became the serving version's own window). Such an alarm before the shift
    // would start a run on the old tastes and leave the shift's own alarm in the cooldown: this
    // threshold leaves the shift a wide margin.
    let lp = Loop::start("shift", |config| config.monitor.psi_threshold = 1.0).await;
    let v1 = lp.bootstrap().await;
    let before = lp.steady_ctr(&v1).await;
    assert!(before > 0.3, "the first version serves well before the shift: CTR {before}");
    let monitor = get(&lp.server, "/v1/monitor").await.body;
    assert_eq!(monitor["breaches"], json!([]), "no alarm before the shift: {monitor:#}");

    lp.sim.shift_tastes();
    let breach = lp
        .until("drift detected after the shift", STAGE_LISTS, || async {
            get(&lp.server, "/v1/monitor").await.body["breaches"].as_array()?.first().cloned()
        })
        .await;
    assert!(["input_drift", "concept_drift"].contains(&breach["kind"].as_str().unwrap_or_default()), "{breach}");

    let run = 2;
    let record = lp.run_outcome(run, &["promoted"]).await;
    assert_eq!(record["sources"][0], "monitor", "the monitor asked for the retrain: {record}");
    assert_eq!(record["warm_started"], true, "warm-started from the serving version: {record}");
    let models = lp.models().await;
    let v2 = record["version"].as_str().expect("version");
    assert_eq!(models["serving"], json!(v2));
    let steps: Vec<&str> = models["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter(|h| h["run"] == run)
        .filter_map(|h| h["step"].as_str())
        .collect();
    for step in ["training_started", "gate_passed", "canary_started", "promoted"] {
        assert!(steps.contains(&step), "{step} missing from the history of run {run}: {steps:?}");
    }
    post_events(&lp.server, json!({ "user_id": "sim-user-11-3", "item_id": "sim-item-0005", "event_type": "view" }))
        .await;
    eventually("the user's next list comes from the new version", || async {
        let served = get(&lp.server, "/v1/users/sim-user-11-3/recommendations").await;
        (served.body["model_version"] == json!(v2)).then_some(())
    })
    .await;

    // The users' click-through comes back.
    let recovered = lp
        .until("CTR back to 80 % of its pre-shift level", STAGE_LISTS, || async {
            lp.traffic(300).await;
            let now = lp.sim.recent_ctr(3.0);
            (now >= 0.8 * before).then_some(now)
        })
        .await;
    assert!(recovered >= 0.8 * before);
    assert!(metric(&lp.server, "liverec_rollout_promotions_total").await >= 2.0);
    assert_eq!(metric(&lp.server, "liverec_trainer_triggers_total{source=\"monitor\"}").await, 1.0);
    lp.stop().await;
}

#[actix_rt::test]
async fn a_model_trained_on_shuffled_items_is_rejected_and_the_incumbent_keeps_serving() {
    let lp = Loop::start("bad", |_| {}).await;
    let v1 = lp.bootstrap().await;
    let versions = lp.models().await["versions"].as_array().expect("versions").len();

    // The gate or, failing it, the canary catches it. (The gate compares NDCG@10 on one held-out
    // interaction per user; right after a promotion both models can score near the popularity
    // level there, and the shuffled model has passed by a hair: then the canary rolls it back.)
    let run = lp.retrain(json!({ "reason": "drill", "drill": "shuffle_items" })).await;
    let record = lp.run_outcome(run, &["rejected", "rolled_back"]).await;
    let models = lp.models().await;
    assert_eq!(models["serving"], json!(v1), "the incumbent keeps serving: {record}");
    if record["outcome"] == "rejected" {
        assert!(record["candidate_ndcg10"].as_f64() < record["incumbent_ndcg10"].as_f64(), "{record}");
        assert_eq!(
            models["versions"].as_array().expect("versions").len(),
            versions,
            "a rejected candidate is not kept"
        );
    } else {
        assert!(record["detail"].as_str().unwrap_or_default().contains("worse"), "{record}");
    }
    let rollbacks_before = metric(&lp.server, "liverec_rollout_rollbacks_total").await;

    // Let through on purpose, the canary catches it.
    let run = lp.retrain(json!({ "reason": "drill", "drill": "shuffle_items", "skip_gate": true })).await;
    let record = lp.run_outcome(run, &["rolled_back"]).await;
    assert!(record["detail"].as_str().unwrap_or_default().contains("worse"), "{record}");
    let models = lp.models().await;
    assert_eq!(models["serving"], json!(v1), "the incumbent keeps serving");
    assert!(models["traffic"]["challenger"].is_null());
    let status = |name: &str| {
        models["versions"].as_array().expect("versions").iter().find(|v| v["name"] == name).map(|v| v["status"].clone())
    };
    assert_eq!(status(record["name"].as_str().expect("name")), Some(json!("rolled_back")));
    assert_eq!(metric(&lp.server, "liverec_rollout_rollbacks_total").await, rollbacks_before + 1.0);
    // Lists keep coming from the incumbent.
    lp.traffic(300).await;
    let served = get(&lp.server, "/v1/users/sim-user-11-5/recommendations").await;
    assert_eq!(served.body["model_version"], json!(v1));
    lp.stop().await;
}

#[actix_rt::test]
async fn a_stationary_stream_raises_no_alarm() {
    // A 30 s window: the simulator's users each favour one or two categories, so a 10 s window
    // on a busy machine holds too few users for the drift checks' noise level, which assumes
    // independent events (docs/monitoring.md); the shift test keeps the 10 s window.
    let lp = Loop::start("steady", |config| config.monitor.window_secs = 30).await;
    let v1 = lp.bootstrap().await;
    lp.steady_ctr(&v1).await;
    // As much traffic as the shift test needs from its shift to a recovered CTR, and more.
    lp.traffic(9000).await;
    let report = get(&lp.server, "/v1/monitor").await.body;
    assert!(report["drift"]["popularity_psi"].is_number(), "the drift checks ran: {report}");
    assert_eq!(report["drift"]["reference"], json!(format!("first full window of {v1}")), "{report}");
    assert!(report["drift"]["ctr_z"].is_number(), "the CTR check ran: {report}");
    assert_eq!(report["breaches"], json!([]), "no alarm: {report:#}");
    assert_eq!(metric(&lp.server, "liverec_monitor_breaches_total").await, 0.0);
    let models = lp.models().await;
    assert_eq!(models["runs"].as_array().map(Vec::len), Some(1), "only the bootstrap run: {models:#}");
    assert_eq!(models["serving"], json!(v1));
    lp.stop().await;
}
