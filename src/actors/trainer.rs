//! `TrainerActor`: closes the loop from drift to a new serving version.
//!
//! 1. Triggers: `Retrain { reason }` from the monitor (drift or a CTR drop), a schedule
//!    (`trainer.schedule_secs`), or `POST /v1/admin/retrain`. While a run is training or its
//!    canary is being judged, further triggers are folded into it (counted, not queued).
//!    After a drift alarm the run waits for `trainer.fresh_events` new events first, so that the
//!    window holds the new behaviour.
//! 2. Training: a snapshot of the retained event log's window becomes a dataset; a sequential
//!    model is trained on it on a thread of its own (serving goes on), warm-started from the
//!    serving version's weights when that version is a registry version.
//! 3. Gate: candidate and incumbent rank the whole catalogue for every user's held-out last
//!    interaction; the candidate must beat the incumbent's NDCG@10 by `trainer.gate_min_gain`.
//!    When the serving model learns online it has already seen the held-out part, so the
//!    yardstick is then popularity over the same training window (the canary judges the rest).
//! 4. Canary: a version that passes serves `rollout.canary_share` of users (stable hash). Once
//!    both arms have `rollout.min_impressions` impressions since the canary started, a
//!    two-proportion test on CTR decides: rolled back when the canary is worse by more than
//!    `rollout.z_threshold`, promoted otherwise. No verdict within `rollout.max_secs`: rolled back.
//! 5. Promotion: the canary serves everyone, `serving.json` in the registry names it (a restart
//!    comes back with it), and the monitor takes its training window as the drift reference.
//!    The displaced model is kept for an instant manual rollback.
//!
//! A/B experiments between two registry versions use the same split and report per-variant CTR
//! with 95 % intervals; they end by promotion of `b` or by a stop that leaves `a` serving.
//!
//! Mailbox: default capacity (admin requests and a few triggers). Restart policy: none; losing
//! the actor would lose the loop's state, so every step is also logged and counted.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::model::{EndChallenger, ModelActor, StartChallenger, SwapModel, CONTROL};
use super::monitor::{ArmCounts, GetCounts, MonitorActor, Retrain, SetReference};
use crate::catalog::{Catalog, ItemIdx};
use crate::config::{RolloutConfig, TrainerConfig};
use crate::event::now_ms;
use crate::eventlog::{EventLog, LoggedEvent};
use crate::models::registry;
use crate::models::retrain::{ndcg, score_all, WindowData, WindowPopularity};
use crate::models::sasrec::Config as NetConfig;
use crate::models::sequential::{rfc3339, DataWindow, Manifest, SavedMetrics, SequentialModel};
use crate::models::train::{train_from, TrainConfig, TrainFile};
use crate::models::Recommender;
use crate::monitor::{two_proportion_z, wilson};
use crate::telemetry::Metrics;

/// Where a retraining request came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerSource {
    Monitor,
    Schedule,
    Admin,
}

/// Deliberate faults for drills: check that the gate and the canary catch a bad model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Drill {
    #[default]
    None,
    /// Train on the window with its items shuffled: a model that learned nothing true.
    ShuffleItems,
}

/// A retraining request from an operator (or the schedule).
#[derive(Message, Debug)]
#[rtype(result = "Result<RetrainAck, TrainerError>")]
pub struct RequestRetrain {
    pub reason: String,
    pub source: TriggerSource,
    pub drill: Drill,
    /// Drills only: send the candidate to canary even if the gate rejects it.
    pub skip_gate: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetrainAck {
    pub run: u64,
    /// The request joined a run already in progress.
    pub coalesced: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TrainerError {
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Failed(String),
}

/// Promote the canary or the experiment's `b` (no name), or switch to a registry version.
#[derive(Message, Debug)]
#[rtype(result = "Result<Value, TrainerError>")]
pub struct Promote {
    pub name: Option<String>,
    pub reason: String,
}

/// Stop the canary or experiment, or go back to the version that served before the last
/// promotion.
#[derive(Message, Debug)]
#[rtype(result = "Result<Value, TrainerError>")]
pub struct Rollback {
    pub reason: String,
}

#[derive(Message, Debug)]
#[rtype(result = "Result<Value, TrainerError>")]
pub struct StartExperiment {
    pub a: String,
    pub b: String,
    pub share: f64,
}

#[derive(Message, Debug)]
#[rtype(result = "Result<Value, TrainerError>")]
pub struct StopExperiment;

/// The state of the loop, for `GET /v1/admin/models` and `GET /v1/admin/experiments`.
#[derive(Message, Debug)]
#[rtype(result = "Value")]
pub struct GetLoopState;

/// A training run finished (on its thread).
#[derive(Message)]
#[rtype(result = "()")]
struct TrainingDone {
    run: u64,
    result: Result<Candidate, String>,
}

/// What a training run produced.
struct Candidate {
    /// Present when the candidate goes on to canary (saved in the registry as `name`).
    model: Option<SequentialModel>,
    name: Option<String>,
    version: Option<String>,
    candidate_ndcg: f64,
    incumbent_ndcg: f64,
    yardstick: String,
    cases: usize,
    events: usize,
    users: usize,
    passed: bool,
    warm_started: bool,
    seconds: f64,
    reference: (std::collections::HashMap<ItemIdx, f64>, Vec<f64>),
}

#[derive(Clone, Debug, Serialize)]
struct RunRecord {
    run: u64,
    reasons: Vec<String>,
    sources: Vec<TriggerSource>,
    drill: Drill,
    started_at_ms: i64,
    seconds: Option<f64>,
    events: Option<usize>,
    users: Option<usize>,
    cases: Option<usize>,
    candidate_ndcg10: Option<f64>,
    incumbent_ndcg10: Option<f64>,
    yardstick: Option<String>,
    warm_started: Option<bool>,
    name: Option<String>,
    version: Option<String>,
    /// training, rejected, failed, canary, promoted, rolled_back.
    outcome: String,
    detail: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
struct HistoryEntry {
    at_ms: i64,
    step: String,
    run: Option<u64>,
    version: Option<String>,
    detail: String,
}

struct CanaryState {
    run: u64,
    name: String,
    version: String,
    incumbent: String,
    started: Instant,
    started_at_ms: i64,
    share: f64,
    baseline: ArmCounts,
    reference: (std::collections::HashMap<ItemIdx, f64>, Vec<f64>),
}

struct ExperimentState {
    a: (String, String),
    b: (String, String),
    share: f64,
    started_at_ms: i64,
    baseline: ArmCounts,
}

enum Phase {
    Idle,
    /// A drift alarm came in; the run starts once `from + fresh_events` events are logged.
    Waiting {
        run: u64,
        from: u64,
        request: RequestRetrain,
    },
    Training {
        run: u64,
    },
    Canary(CanaryState),
    Experiment(ExperimentState),
}

pub struct TrainerActor {
    config: TrainerConfig,
    rollout: RolloutConfig,
    registry_dir: PathBuf,
    monitor_window_secs: u64,
    catalog: Arc<Catalog>,
    log: Arc<EventLog>,
    model: Addr<ModelActor>,
    monitor: Addr<MonitorActor>,
    metrics: Arc<Metrics>,
    phase: Phase,
    /// Registry name of the version serving everyone (none for the online model).
    serving_name: Option<String>,
    /// The model displaced by the last promotion, and its registry name.
    previous: Option<(Box<dyn Recommender>, Option<String>)>,
    next_run: u64,
    runs: VecDeque<RunRecord>,
    history: VecDeque<HistoryEntry>,
    checking: bool,
}

const KEPT: usize = 50;

impl TrainerActor {
    #[allow(clippy::too_many_arguments)] // the loop's collaborators, each distinct
    pub fn new(
        config: &crate::config::Config,
        catalog: Arc<Catalog>,
        log: Arc<EventLog>,
        model: Addr<ModelActor>,
        monitor: Addr<MonitorActor>,
        metrics: Arc<Metrics>,
        serving_name: Option<String>,
    ) -> Self {
        Self {
            config: config.trainer.clone(),
            rollout: config.rollout.clone(),
            registry_dir: config.model.registry_dir.clone(),
            monitor_window_secs: config.monitor.window_secs,
            catalog,
            log,
            model,
            monitor,
            metrics,
            phase: Phase::Idle,
            serving_name,
            previous: None,
            next_run: 1,
            runs: VecDeque::new(),
            history: VecDeque::new(),
            checking: false,
        }
    }

    fn record(&mut self, step: &str, run: Option<u64>, version: Option<&str>, detail: String) {
        tracing::info!(step, run, version, detail = %detail, "model lifecycle");
        self.history.push_back(HistoryEntry {
            at_ms: now_ms(),
            step: step.to_owned(),
            run,
            version: version.map(str::to_owned),
            detail,
        });
        while self.history.len() > KEPT * 4 {
            self.history.pop_front();
        }
    }

    fn run_mut(&mut self, run: u64) -> Option<&mut RunRecord> {
        self.runs.iter_mut().find(|r| r.run == run)
    }

    fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Idle => "idle",
            Phase::Waiting { .. } => "waiting_for_data",
            Phase::Training { .. } => "training",
            Phase::Canary(_) => "canary",
            Phase::Experiment(_) => "experiment",
        }
    }

    fn trigger(&mut self, request: RequestRetrain, ctx: &mut Context<Self>) -> Result<RetrainAck, TrainerError> {
        match request.source {
            TriggerSource::Monitor => self.metrics.trainer_triggers_monitor.inc(),
            TriggerSource::Schedule => self.metrics.trainer_triggers_schedule.inc(),
            TriggerSource::Admin => self.metrics.trainer_triggers_admin.inc(),
        }
        if !self.config.enabled {
            self.record("trigger_ignored", None, None, format!("{} (trainer.enabled = false)", request.reason));
            return Err(TrainerError::Conflict("retraining is disabled (trainer.enabled = false)".into()));
        }
        let running = match &self.phase {
            Phase::Training { run } | Phase::Waiting { run, .. } => Some(*run),
            Phase::Canary(canary) => Some(canary.run),
            Phase::Experiment(_) => {
                return Err(TrainerError::Conflict(
                    "an experiment is running; stop it (DELETE /v1/admin/experiments) before retraining".into(),
                ))
            }
            Phase::Idle => None,
        };
        if let Some(run) = running {
            self.metrics.trainer_coalesced.inc();
            if let Some(record) = self.run_mut(run) {
                record.reasons.push(request.reason.clone());
                record.sources.push(request.source);
            }
            self.record("trigger_coalesced", Some(run), None, request.reason);
            return Ok(RetrainAck { run, coalesced: true });
        }
        let run = self.next_run;
        self.next_run += 1;
        if request.source == TriggerSource::Monitor && self.config.fresh_events > 0 {
            self.push_run(run, &request, "waiting_for_data");
            self.record(
                "waiting_for_data",
                Some(run),
                None,
                format!("{}; training after {} new events", request.reason, self.config.fresh_events),
            );
            self.phase = Phase::Waiting { run, from: self.log.appended(), request };
        } else {
            self.start_training(run, request, ctx);
        }
        Ok(RetrainAck { run, coalesced: false })
    }

    fn push_run(&mut self, run: u64, request: &RequestRetrain, outcome: &str) {
        self.runs.push_back(RunRecord {
            run,
            reasons: vec![request.reason.clone()],
            sources: vec![request.source],
            drill: request.drill,
            started_at_ms: now_ms(),
            seconds: None,
            events: None,
            users: None,
            cases: None,
            candidate_ndcg10: None,
            incumbent_ndcg10: None,
            yardstick: None,
            warm_started: None,
            name: None,
            version: None,
            outcome: outcome.into(),
            detail: None,
        });
        while self.runs.len() > KEPT {
            self.runs.pop_front();
        }
    }

    /// Starts a waiting run once enough new events are in.
    fn check_waiting(&mut self, ctx: &mut Context<Self>) {
        let ready = matches!(&self.phase, Phase::Waiting { from, .. } if self.log.appended() >= from + self.config.fresh_events);
        if !ready {
            return;
        }
        if let Phase::Waiting { run, request, .. } = std::mem::replace(&mut self.phase, Phase::Idle) {
            self.start_training(run, request, ctx);
        }
    }

    fn start_training(&mut self, run: u64, request: RequestRetrain, ctx: &mut Context<Self>) {
        let events = self.log.snapshot(now_ms());
        if self.run_mut(run).is_none() {
            self.push_run(run, &request, "training");
        }
        if let Some(record) = self.run_mut(run) {
            record.outcome = "training".into();
            record.events = Some(events.len());
        }
        self.record(
            "training_started",
            Some(run),
            None,
            format!("{} ({} events in the window)", request.reason, events.len()),
        );
        self.phase = Phase::Training { run };
        let job = Job {
            run,
            events,
            catalog: self.catalog.clone(),
            config: self.config.clone(),
            registry_dir: self.registry_dir.clone(),
            serving_path: self.serving_name.as_ref().map(|n| self.registry_dir.join(n)),
            drill: request.drill,
            skip_gate: request.skip_gate,
            reference_secs: self.monitor_window_secs,
        };
        let addr = ctx.address();
        let spawned = std::thread::Builder::new().name("liverec-trainer".into()).spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run()))
                .unwrap_or_else(|_| Err("the training thread panicked; see the log".into()));
            addr.do_send(TrainingDone { run, result });
        });
        if let Err(error) = spawned {
            ctx.notify(TrainingDone { run, result: Err(format!("cannot start the training thread: {error}")) });
        }
    }

    fn finish_training(&mut self, run: u64, result: Result<Candidate, String>, ctx: &mut Context<Self>) {
        self.phase = Phase::Idle;
        let candidate = match result {
            Ok(candidate) => candidate,
            Err(error) => {
                self.metrics.trainer_runs_failed.inc();
                if let Some(record) = self.run_mut(run) {
                    record.outcome = "failed".into();
                    record.detail = Some(error.clone());
                }
                self.record("training_failed", Some(run), None, error);
                return;
            }
        };
        self.metrics.trainer_training_seconds.observe(candidate.seconds);
        if let Some(record) = self.run_mut(run) {
            record.seconds = Some(candidate.seconds);
            record.events = Some(candidate.events);
            record.users = Some(candidate.users);
            record.cases = Some(candidate.cases);
            record.candidate_ndcg10 = Some(candidate.candidate_ndcg);
            record.incumbent_ndcg10 = Some(candidate.incumbent_ndcg);
            record.yardstick = Some(candidate.yardstick.clone());
            record.warm_started = Some(candidate.warm_started);
            record.name = candidate.name.clone();
            record.version = candidate.version.clone();
        }
        let verdict = format!(
            "NDCG@10 {:.4} vs {:.4} ({}) on {} held-out interactions",
            candidate.candidate_ndcg, candidate.incumbent_ndcg, candidate.yardstick, candidate.cases
        );
        if candidate.passed {
            self.metrics.trainer_runs_passed.inc();
            self.record("gate_passed", Some(run), candidate.version.as_deref(), verdict.clone());
        } else {
            self.metrics.trainer_runs_rejected.inc();
            self.record("gate_rejected", Some(run), None, verdict.clone());
        }
        let (Some(model), Some(name), Some(version)) = (candidate.model, candidate.name, candidate.version) else {
            if let Some(record) = self.run_mut(run) {
                record.outcome = "rejected".into();
                record.detail = Some(verdict);
            }
            return;
        };
        if !candidate.passed {
            self.record("gate_skipped", Some(run), Some(&version), "drill: sent to canary despite the gate".into());
        }
        if let Some(record) = self.run_mut(run) {
            record.outcome = "canary".into();
        }
        let share = self.rollout.canary_share.clamp(0.0, 1.0);
        let start = StartChallenger {
            model: Box::new(model),
            variant: Arc::from("canary"),
            control_variant: Arc::from(CONTROL),
            share,
            salt: run,
        };
        let (model_addr, monitor) = (self.model.clone(), self.monitor.clone());
        let started = async move {
            let incumbent = model_addr.send(super::model::CurrentVersion).await.ok().map(|t| t.control.version);
            let _ = model_addr.send(start).await;
            let baseline = monitor.send(GetCounts).await.unwrap_or_default();
            (incumbent.unwrap_or_default(), baseline)
        };
        ctx.wait(started.into_actor(self).map(move |(incumbent, baseline), act, _ctx| {
            act.metrics.rollout_canaries.inc();
            act.metrics.set_challenger_share(share);
            act.record(
                "canary_started",
                Some(run),
                Some(&version),
                format!("serving {:.0} % of users against {incumbent}", share * 100.0),
            );
            act.phase = Phase::Canary(CanaryState {
                run,
                name,
                version,
                incumbent,
                started: Instant::now(),
                started_at_ms: now_ms(),
                share,
                baseline,
                reference: candidate.reference,
            });
        }));
    }

    /// Arms of the canary since it started: (impressions, clicks) of control and canary.
    fn canary_arms(canary: &CanaryState, counts: &ArmCounts) -> ((u64, u64), (u64, u64)) {
        let since = |version: &str, variant: &str| {
            let key = (version.to_owned(), variant.to_owned());
            let now = counts.get(&key).copied().unwrap_or_default();
            let then = canary.baseline.get(&key).copied().unwrap_or_default();
            (now.0.saturating_sub(then.0), now.1.saturating_sub(then.1))
        };
        (since(&canary.incumbent, CONTROL), since(&canary.version, "canary"))
    }

    fn check_canary(&mut self, ctx: &mut Context<Self>) {
        if self.checking || !matches!(self.phase, Phase::Canary(_)) {
            return;
        }
        self.checking = true;
        ctx.spawn(self.monitor.send(GetCounts).into_actor(self).map(|counts, act, ctx| {
            act.checking = false;
            let Ok(counts) = counts else { return };
            let Phase::Canary(canary) = &act.phase else { return };
            let ((control_n, control_clicks), (canary_n, canary_clicks)) = Self::canary_arms(canary, &counts);
            let min = act.rollout.min_impressions;
            let describe = |z: f64| {
                format!(
                    "canary CTR {:.4} ({canary_clicks}/{canary_n}) vs incumbent {:.4} ({control_clicks}/{control_n}), z = {z:.2}",
                    canary_clicks as f64 / canary_n.max(1) as f64,
                    control_clicks as f64 / control_n.max(1) as f64,
                )
            };
            if control_n >= min && canary_n >= min {
                // Positive when the incumbent's CTR is higher.
                let z = two_proportion_z(control_clicks, control_n, canary_clicks, canary_n);
                if z > act.rollout.z_threshold {
                    act.end_canary(false, format!("{} > {}: worse", describe(z), act.rollout.z_threshold), ctx);
                } else {
                    act.end_canary(true, format!("{}: not worse", describe(z)), ctx);
                }
            } else if canary.started.elapsed() >= Duration::from_secs(act.rollout.max_secs) {
                act.end_canary(false, format!("no verdict within rollout.max_secs: {}", describe(0.0)), ctx);
            }
        }));
    }

    /// Ends the canary: `promote` makes it serve everyone, otherwise it is rolled back.
    fn end_canary(&mut self, promote: bool, detail: String, ctx: &mut Context<Self>) {
        let Phase::Canary(canary) = std::mem::replace(&mut self.phase, Phase::Idle) else { return };
        let done = self.model.send(EndChallenger { promote });
        ctx.wait(done.into_actor(self).map(move |displaced, act, _ctx| {
            act.metrics.set_challenger_share(0.0);
            let displaced = displaced.ok().flatten();
            if promote {
                act.adopt(canary.name.clone(), displaced);
                let (popularity, context) = canary.reference;
                act.monitor.do_send(SetReference {
                    popularity,
                    context,
                    source: format!("training window of {}", canary.version),
                });
                if let Some(record) = act.run_mut(canary.run) {
                    record.outcome = "promoted".into();
                    record.detail = Some(detail.clone());
                }
                act.record("promoted", Some(canary.run), Some(&canary.version), detail);
            } else {
                act.metrics.rollout_rollbacks.inc();
                if let Some(record) = act.run_mut(canary.run) {
                    record.outcome = "rolled_back".into();
                    record.detail = Some(detail.clone());
                }
                act.record("rolled_back", Some(canary.run), Some(&canary.version), detail);
            }
        }));
    }

    /// Bookkeeping of a new version serving everyone.
    fn adopt(&mut self, name: String, displaced: Option<Box<dyn Recommender>>) {
        self.metrics.rollout_promotions.inc();
        if let Err(error) = registry::set_serving(&self.registry_dir, &name) {
            tracing::error!(error = %error, "cannot record the serving version; a restart may serve another");
        }
        let old = self.serving_name.replace(name);
        if let Some(model) = displaced {
            self.previous = Some((model, old));
        }
    }

    fn arm_report(counts: &ArmCounts, baseline: &ArmCounts, version: &str, variant: &str, share: f64) -> Value {
        let key = (version.to_owned(), variant.to_owned());
        let now = counts.get(&key).copied().unwrap_or_default();
        let then = baseline.get(&key).copied().unwrap_or_default();
        let (n, clicks) = (now.0.saturating_sub(then.0), now.1.saturating_sub(then.1));
        json!({
            "variant": variant,
            "version": version,
            "share": share,
            "impressions": n,
            "clicks": clicks,
            "ctr": wilson(clicks, n),
        })
    }

    fn state(&self, counts: &ArmCounts) -> Value {
        let canary = match &self.phase {
            Phase::Canary(c) => {
                let ((cn, cc), (kn, kc)) = Self::canary_arms(c, counts);
                json!({
                    "run": c.run,
                    "name": c.name,
                    "version": c.version,
                    "incumbent": c.incumbent,
                    "started_at_ms": c.started_at_ms,
                    "arms": [
                        Self::arm_report(counts, &c.baseline, &c.incumbent, CONTROL, 1.0 - c.share),
                        Self::arm_report(counts, &c.baseline, &c.version, "canary", c.share),
                    ],
                    "z": two_proportion_z(cc, cn, kc, kn),
                })
            }
            _ => Value::Null,
        };
        let experiment = match &self.phase {
            Phase::Experiment(e) => {
                let a = Self::arm_report(counts, &e.baseline, &e.a.1, "a", 1.0 - e.share);
                let b = Self::arm_report(counts, &e.baseline, &e.b.1, "b", e.share);
                let get = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
                // Positive when b's CTR is higher.
                let z = two_proportion_z(
                    get(&b, "clicks"),
                    get(&b, "impressions"),
                    get(&a, "clicks"),
                    get(&a, "impressions"),
                );
                json!({
                    "a": { "name": e.a.0, "version": e.a.1 },
                    "b": { "name": e.b.0, "version": e.b.1 },
                    "started_at_ms": e.started_at_ms,
                    "variants": [a, b],
                    "z_b_minus_a": z,
                })
            }
            _ => Value::Null,
        };
        let training = match &self.phase {
            Phase::Training { run } => json!({ "run": run }),
            Phase::Waiting { run, from, .. } => json!({
                "run": run,
                "waiting_for_events": (from + self.config.fresh_events).saturating_sub(self.log.appended()),
            }),
            _ => Value::Null,
        };
        json!({
            "state": self.phase_name(),
            "serving_name": self.serving_name,
            "previous": self.previous.as_ref().map(|(m, name)| json!({ "version": m.version(), "name": name })),
            "training": training,
            "canary": canary,
            "experiment": experiment,
            "runs": self.runs.iter().rev().collect::<Vec<_>>(),
            "history": self.history.iter().rev().collect::<Vec<_>>(),
            "settings": {
                "trainer_enabled": self.config.enabled,
                "gate_min_gain": self.config.gate_min_gain,
                "canary_share": self.rollout.canary_share,
                "min_impressions": self.rollout.min_impressions,
                "z_threshold": self.rollout.z_threshold,
                "max_secs": self.rollout.max_secs,
            },
        })
    }

    /// Loads registry versions off the actor's thread.
    fn load_versions(
        &self,
        names: Vec<String>,
    ) -> impl std::future::Future<Output = Result<Vec<SequentialModel>, TrainerError>> + 'static {
        let (dir, catalog) = (self.registry_dir.clone(), self.catalog.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                names
                    .iter()
                    .map(|name| {
                        let path = registry::resolve(&dir, name).map_err(|e| match e {
                            registry::RegistryError::BadName(_) => TrainerError::BadRequest(e.to_string()),
                            registry::RegistryError::NotFound { .. } | registry::RegistryError::Empty(_) => {
                                TrainerError::NotFound(e.to_string())
                            }
                            _ => TrainerError::Failed(e.to_string()),
                        })?;
                        registry::load(&path, &catalog).map_err(|e| TrainerError::Failed(e.to_string()))
                    })
                    .collect()
            })
            .await
            .map_err(|e| TrainerError::Failed(format!("loading stopped: {e}")))?
        }
    }
}

impl Actor for TrainerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(Duration::from_millis(self.rollout.check_interval_ms.max(50)), |act, ctx| {
            act.check_waiting(ctx);
            act.check_canary(ctx);
        });
        if self.config.schedule_secs > 0 {
            ctx.run_interval(Duration::from_secs(self.config.schedule_secs), |act, ctx| {
                if matches!(act.phase, Phase::Idle) {
                    let request = RequestRetrain {
                        reason: "schedule".into(),
                        source: TriggerSource::Schedule,
                        drill: Drill::None,
                        skip_gate: false,
                    };
                    let _ = act.trigger(request, ctx);
                }
            });
        }
    }
}

impl Handler<Retrain> for TrainerActor {
    type Result = ();

    fn handle(&mut self, msg: Retrain, ctx: &mut Self::Context) {
        let request =
            RequestRetrain { reason: msg.reason, source: TriggerSource::Monitor, drill: Drill::None, skip_gate: false };
        let _ = self.trigger(request, ctx);
    }
}

impl Handler<RequestRetrain> for TrainerActor {
    type Result = Result<RetrainAck, TrainerError>;

    fn handle(&mut self, msg: RequestRetrain, ctx: &mut Self::Context) -> Self::Result {
        self.trigger(msg, ctx)
    }
}

impl Handler<TrainingDone> for TrainerActor {
    type Result = ();

    fn handle(&mut self, msg: TrainingDone, ctx: &mut Self::Context) {
        self.finish_training(msg.run, msg.result, ctx);
    }
}

impl Handler<GetLoopState> for TrainerActor {
    type Result = ResponseActFuture<Self, Value>;

    fn handle(&mut self, _msg: GetLoopState, _ctx: &mut Self::Context) -> Self::Result {
        Box::pin(
            self.monitor.send(GetCounts).into_actor(self).map(|counts, act, _| act.state(&counts.unwrap_or_default())),
        )
    }
}

impl Handler<Promote> for TrainerActor {
    type Result = ResponseActFuture<Self, Result<Value, TrainerError>>;

    fn handle(&mut self, msg: Promote, ctx: &mut Self::Context) -> Self::Result {
        let canary_name = match &self.phase {
            Phase::Canary(c) => Some(c.name.clone()),
            _ => None,
        };
        // The canary, by default or by name.
        if canary_name.is_some() && (msg.name.is_none() || msg.name == canary_name) {
            let version = match &self.phase {
                Phase::Canary(c) => c.version.clone(),
                _ => String::new(),
            };
            self.end_canary(true, format!("manual: {}", msg.reason), ctx);
            return Box::pin(fut::ready(Ok(json!({ "promoted": canary_name, "serving": version }))));
        }
        if let Phase::Experiment(e) = &self.phase {
            if msg.name.is_none() || msg.name.as_deref() == Some(e.b.0.as_str()) {
                let (name, version) = e.b.clone();
                self.phase = Phase::Idle;
                let done = self.model.send(EndChallenger { promote: true });
                return Box::pin(done.into_actor(self).map(move |displaced, act, _| {
                    act.metrics.set_challenger_share(0.0);
                    act.adopt(name.clone(), displaced.ok().flatten());
                    act.record("promoted", None, Some(&version), "experiment ended: b promoted".into());
                    Ok(json!({ "promoted": name, "serving": version }))
                }));
            }
        }
        let Some(name) = msg.name else {
            return Box::pin(fut::ready(Err(TrainerError::Conflict(
                "no canary or experiment to promote; name a version: POST /v1/admin/models/{name}/promote".into(),
            ))));
        };
        if matches!(self.phase, Phase::Training { .. } | Phase::Waiting { .. } | Phase::Experiment(_)) {
            return Box::pin(fut::ready(Err(TrainerError::Conflict(format!(
                "cannot switch versions while {}",
                self.phase_name()
            )))));
        }
        let load = self.load_versions(vec![name.clone()]);
        Box::pin(load.into_actor(self).then(move |loaded, act, ctx| {
            let step: actix::fut::LocalBoxActorFuture<Self, Result<Value, TrainerError>> = match loaded {
                Err(error) => Box::pin(fut::ready(Err(error))),
                Ok(mut models) => {
                    let model = models.pop().expect("one version asked, one loaded");
                    // A canary in progress is rolled back first: the operator chose another version.
                    if matches!(act.phase, Phase::Canary(_)) {
                        act.end_canary(false, format!("manual promotion of {name} instead"), ctx);
                    }
                    let version = model.version().to_owned();
                    let swap = act.model.send(SwapModel { model: Box::new(model) });
                    Box::pin(swap.into_actor(act).map(move |displaced, act, _| {
                        act.adopt(name.clone(), displaced.ok().flatten());
                        act.record("promoted", None, Some(&version), format!("manual: {}", msg.reason));
                        Ok(json!({ "promoted": name, "serving": version }))
                    }))
                }
            };
            step
        }))
    }
}

impl Handler<Rollback> for TrainerActor {
    type Result = ResponseActFuture<Self, Result<Value, TrainerError>>;

    fn handle(&mut self, msg: Rollback, ctx: &mut Self::Context) -> Self::Result {
        match &self.phase {
            Phase::Canary(c) => {
                let (version, c_incumbent) = (c.version.clone(), c.incumbent.clone());
                self.end_canary(false, format!("manual: {}", msg.reason), ctx);
                return Box::pin(fut::ready(Ok(json!({ "rolled_back": version, "serving": c_incumbent }))));
            }
            Phase::Experiment(_) => return Box::pin(self.stop_experiment("rolled back by an operator")),
            Phase::Training { .. } | Phase::Waiting { .. } | Phase::Idle => {}
        }
        let Some((model, name)) = self.previous.take() else {
            return Box::pin(fut::ready(Err(TrainerError::Conflict(
                "nothing to roll back: no canary, no experiment, and no earlier version kept since start".into(),
            ))));
        };
        let version = model.version().to_owned();
        let swap = self.model.send(SwapModel { model });
        Box::pin(swap.into_actor(self).map(move |displaced, act, _| {
            act.metrics.rollout_rollbacks.inc();
            let from = act.serving_name.take();
            if let Some(name) = &name {
                if let Err(error) = registry::set_serving(&act.registry_dir, name) {
                    tracing::error!(error = %error, "cannot record the serving version");
                }
            }
            act.serving_name = name.clone();
            if let Some(displaced) = displaced.ok().flatten() {
                act.previous = Some((displaced, from));
            }
            act.record(
                "rolled_back",
                None,
                Some(&version),
                format!("manual: back to the previous version; {}", msg.reason),
            );
            Ok(json!({ "serving": version, "name": name }))
        }))
    }
}

impl TrainerActor {
    fn stop_experiment(&mut self, why: &str) -> impl ActorFuture<Self, Output = Result<Value, TrainerError>> + 'static {
        let why = why.to_owned();
        let ended = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Experiment(e) => Some(e),
            other => {
                self.phase = other;
                None
            }
        };
        let done = self.model.send(EndChallenger { promote: false });
        done.into_actor(self).map(move |_, act, _| {
            let Some(e) = ended else {
                return Err(TrainerError::Conflict("no experiment is running".into()));
            };
            act.metrics.set_challenger_share(0.0);
            act.record("experiment_stopped", None, Some(&e.a.1), format!("{why}; a ({}) keeps serving", e.a.0));
            Ok(json!({ "serving": e.a.1, "name": e.a.0 }))
        })
    }
}

impl Handler<StartExperiment> for TrainerActor {
    type Result = ResponseActFuture<Self, Result<Value, TrainerError>>;

    fn handle(&mut self, msg: StartExperiment, _ctx: &mut Self::Context) -> Self::Result {
        if !matches!(self.phase, Phase::Idle) {
            return Box::pin(fut::ready(Err(TrainerError::Conflict(format!(
                "cannot start an experiment while {}",
                self.phase_name()
            )))));
        }
        if !(msg.share > 0.0 && msg.share < 1.0) || msg.a == msg.b {
            return Box::pin(fut::ready(Err(TrainerError::BadRequest(
                "an experiment needs two different versions and a share of users for b strictly between 0 and 1".into(),
            ))));
        }
        let load = self.load_versions(vec![msg.a.clone(), msg.b.clone()]);
        Box::pin(load.into_actor(self).then(move |loaded, act, _| {
            let step: actix::fut::LocalBoxActorFuture<Self, Result<Value, TrainerError>> = match loaded {
                Err(error) => Box::pin(fut::ready(Err(error))),
                Ok(_) if !matches!(act.phase, Phase::Idle) => {
                    Box::pin(fut::ready(Err(TrainerError::Conflict("the loop became busy meanwhile".into()))))
                }
                Ok(mut models) => {
                    let b = models.pop().expect("two loaded");
                    let a = models.pop().expect("two loaded");
                    let (a_version, b_version) = (a.version().to_owned(), b.version().to_owned());
                    let (model, monitor) = (act.model.clone(), act.monitor.clone());
                    let swap_a = act.serving_name.as_deref() != Some(msg.a.as_str());
                    let share = msg.share;
                    let salt = now_ms() as u64;
                    let steps = async move {
                        let displaced = if swap_a {
                            model.send(SwapModel { model: Box::new(a) }).await.ok().flatten()
                        } else {
                            None
                        };
                        let _ = model
                            .send(StartChallenger {
                                model: Box::new(b),
                                variant: Arc::from("b"),
                                control_variant: Arc::from("a"),
                                share,
                                salt,
                            })
                            .await;
                        (displaced, monitor.send(GetCounts).await.unwrap_or_default())
                    };
                    Box::pin(steps.into_actor(act).map(move |(displaced, baseline), act, _| {
                        if swap_a {
                            act.adopt(msg.a.clone(), displaced);
                        }
                        act.metrics.set_challenger_share(share);
                        act.record(
                            "experiment_started",
                            None,
                            Some(&b_version),
                            format!(
                                "a = {} ({a_version}), b = {} ({b_version}) on {:.0} % of users",
                                msg.a,
                                msg.b,
                                share * 100.0
                            ),
                        );
                        act.phase = Phase::Experiment(ExperimentState {
                            a: (msg.a.clone(), a_version),
                            b: (msg.b.clone(), b_version),
                            share,
                            started_at_ms: now_ms(),
                            baseline,
                        });
                        Ok(json!({ "started": { "a": msg.a, "b": msg.b, "share": share } }))
                    }))
                }
            };
            step
        }))
    }
}

impl Handler<StopExperiment> for TrainerActor {
    type Result = ResponseActFuture<Self, Result<Value, TrainerError>>;

    fn handle(&mut self, _msg: StopExperiment, _ctx: &mut Self::Context) -> Self::Result {
        if !matches!(self.phase, Phase::Experiment(_)) {
            return Box::pin(fut::ready(Err(TrainerError::Conflict("no experiment is running".into()))));
        }
        Box::pin(self.stop_experiment("stopped by an operator"))
    }
}

/// Everything a training run needs, moved onto its thread.
struct Job {
    run: u64,
    events: Vec<LoggedEvent>,
    catalog: Arc<Catalog>,
    config: TrainerConfig,
    registry_dir: PathBuf,
    serving_path: Option<PathBuf>,
    drill: Drill,
    skip_gate: bool,
    reference_secs: u64,
}

impl Job {
    fn run(self) -> Result<Candidate, String> {
        let started = Instant::now();
        let cfg = &self.config;
        let mut data = WindowData::from_log(&self.events, &self.catalog);
        let interactions = data.dataset.interactions();
        if interactions < cfg.min_events {
            return Err(format!(
                "{interactions} positive events in the window; trainer.min_events asks for {}",
                cfg.min_events
            ));
        }
        let cases = data.cases();
        if cases < cfg.min_cases {
            return Err(format!(
                "{cases} users with at least three events in the window; trainer.min_cases asks for {}",
                cfg.min_cases
            ));
        }
        // The serving version, when it is a registry version: warm start and yardstick.
        let incumbent = match &self.serving_path {
            Some(path) => match registry::load(path, &self.catalog) {
                Ok(model) => Some(model),
                Err(error) => {
                    tracing::warn!(error = %error, "serving version not readable; training from scratch");
                    None
                }
            },
            None => None,
        };
        // The gate sees the true histories, whatever the model is trained on.
        let (requests, targets) = data.gate_requests(10);
        if self.drill == Drill::ShuffleItems {
            data.shuffle_training_items(cfg.seed ^ self.run);
        }
        let net = incumbent.as_ref().map_or_else(
            || NetConfig {
                hidden: cfg.hidden,
                layers: cfg.layers,
                heads: cfg.heads,
                inner: cfg.hidden * 2,
                max_len: cfg.max_len,
                ..NetConfig::default()
            },
            |m| m.config.clone(),
        );
        let file = TrainFile {
            model: net,
            train: TrainConfig {
                seed: cfg.seed ^ self.run,
                epochs: cfg.epochs.max(1),
                patience: 0,
                batch_size: cfg.batch_size.max(1),
                lr: cfg.learning_rate,
                warmup_epochs: if incumbent.is_some() { 0.0 } else { 1.0 },
                time_budget_secs: cfg.time_budget_secs,
                ..TrainConfig::default()
            },
            serve: incumbent.as_ref().map(|m| m.serve.clone()).unwrap_or_default(),
        };
        let trained =
            train_from(&data.dataset, &data.split, &file, false, incumbent.as_ref()).map_err(|e| e.to_string())?;
        let mut candidate = trained.model;
        let candidate_ndcg = ndcg(&score_all(&mut candidate, &requests, &self.catalog), &targets, 10);
        let warm_started = incumbent.is_some();
        let (incumbent_ndcg, yardstick) = match incumbent {
            Some(mut serving) => {
                let lists = score_all(&mut serving, &requests, &self.catalog);
                (ndcg(&lists, &targets, 10), format!("serving version {}", serving.version()))
            }
            None => {
                let mut popularity = WindowPopularity::new(&data, &self.catalog);
                let lists = score_all(&mut popularity, &requests, &self.catalog);
                (ndcg(&lists, &targets, 10), "window popularity (the serving model learns online)".to_owned())
            }
        };
        let passed = candidate_ndcg > incumbent_ndcg + cfg.gate_min_gain;
        let reference = WindowData::reference(&self.events, self.reference_secs);
        let mut result = Candidate {
            model: None,
            name: None,
            version: None,
            candidate_ndcg,
            incumbent_ndcg,
            yardstick,
            cases,
            events: interactions,
            users: data.dataset.users.len(),
            passed,
            warm_started,
            seconds: 0.0,
            reference,
        };
        if passed || self.skip_gate {
            let name = format!("auto-{}-{}", now_ms() / 1000, self.run);
            let (first, last) = data.dataset.time_window().unzip();
            let mut manifest = Manifest {
                format: String::new(),
                version: String::new(),
                created_at: rfc3339(now_ms() / 1000),
                config: candidate.config.clone(),
                serve: candidate.serve.clone(),
                data: DataWindow {
                    source: format!("liverec event log, last {} s (run {})", cfg.window_secs, self.run),
                    users: data.dataset.users.len(),
                    items: data.dataset.items.len(),
                    interactions,
                    train_interactions: data.split.train_interactions(),
                    first_timestamp: first,
                    last_timestamp: last,
                    split: "leave-one-out on the window; gate on the last interaction".into(),
                    ..DataWindow::default()
                },
                metrics: SavedMetrics { valid: Some(trained.valid), test: None },
                training: trained.summary,
                weights_sha256: String::new(),
            };
            let dir = self.registry_dir.join(&name);
            if let Err(error) = candidate.save(&dir, &mut manifest) {
                // A full disk, say: leave no half-written version behind for a restart to trip on.
                let _ = std::fs::remove_dir_all(&dir);
                return Err(error.to_string());
            }
            result.version = Some(candidate.version().to_owned());
            result.name = Some(name);
            result.model = Some(candidate);
        }
        result.seconds = started.elapsed().as_secs_f64();
        Ok(result)
    }
}
