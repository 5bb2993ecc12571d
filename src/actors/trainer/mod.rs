//! `TrainerActor`: closes the loop from drift to a new serving version.
//!
//! 1. Triggers: `Retrain { reason }` from the monitor (drift or a CTR drop), a schedule
//!    (`trainer.schedule_secs`), or `POST /v1/admin/retrain`. While a run is training or its
//!    canary is being judged, further triggers are folded into it (counted, not queued).
//!    After a drift alarm the run waits for `trainer.fresh_events` new events first, so that the
//!    window holds the new behaviour.
//! 2. Training: the window of events becomes a dataset; a sequential model is trained on it on
//!    a thread of its own (serving goes on), warm-started from the serving version's weights when
//!    that version is a registry version. That thread reads the window from the
//!    [`source::TrainingSource`]: the in-memory event log (embedded), or the Kafka events topic,
//!    every partition (production).
//! 3. Gate: candidate and incumbent rank the whole catalogue for every user's held-out last
//!    interaction; the candidate must beat the incumbent's NDCG@10 by `trainer.gate_min_gain`.
//!    When the serving model learns online it has already seen the held-out part, so the
//!    yardstick is then popularity over the same training window (the canary judges the rest).
//! 4. Canary: a version that passes serves `rollout.canary_share` of users (stable hash). Once
//!    both arms have `rollout.min_impressions` impressions since the canary started, a
//!    two-proportion test on CTR decides: rolled back when the canary is worse by more than
//!    `rollout.z_threshold`, promoted otherwise. No verdict within `rollout.max_secs`: rolled back.
//! 5. Promotion: the canary serves everyone, `serving.json` in the registry names it (a restart
//!    comes back with it), and the monitor takes its first full window (or its training window:
//!    `monitor.drift_reference`) as the drift reference.
//!    The displaced model is kept for an instant manual rollback.
//!
//! A/B experiments between two registry versions use the same split and report per-variant CTR
//! with 95 % intervals; they end by promotion of `b` or by a stop that leaves `a` serving.
//!
//! Mailbox: default capacity (admin requests and a few triggers). Restart policy: none; losing
//! the actor would lose the loop's state, so every step is also logged and counted.
//!
//! Where the parts live: this file holds the actor, its triggers and the training run; `state`
//! the loop's phase, its trigger messages and errors, variants and run records (what the other
//! files share); `rollout` the canary verdict, promotion and rollback; `experiments` the A/B
//! experiments; `history` recording runs and steps; `view` the typed state the admin API shows
//! (`GetLoopState`); `replies` the answers to an operator's requests.
//! The training job itself (window, training, gate) is `models::retrain::Job`, run on a thread.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::model::{ModelHandle, StartChallenger};
use super::monitor::{GetCounts, MonitorActor, Retrain};
use crate::catalog::Catalog;
use crate::cluster::record::{DesiredState, RunPhase, ServingVersion, StateChange};
use crate::cluster::Cluster;
use crate::config::{RolloutConfig, TrainerConfig};
use crate::event::now_ms;
use crate::models::registry::Registry;
use crate::models::retrain::{Candidate, Job, RetrainError, SavedCandidate};
use crate::models::sequential::SequentialModel;
use crate::telemetry::Metrics;

// The files below add handlers and methods to the actor; this file names none of them, and
// `state` holds what they share, so the trainer's files import one way.
mod cluster;
pub mod experiments;
mod history;
pub mod replies;
pub mod rollout;
pub mod source;
pub mod state;
pub mod view;

use self::state::{
    CanaryState, HistoryEntry, Kept, LoopPhase, LoopStep, Phase, RequestRetrain, RetrainAck, RunOutcome, RunRecord,
    TrainerError, TriggerSource, Variant,
};
use crate::models::retrain::Drill;

/// A training run finished (on its thread).
#[derive(Message)]
#[rtype(result = "()")]
struct TrainingDone {
    run: u64,
    result: Result<Candidate, RetrainError>,
}

pub struct TrainerActor {
    config: TrainerConfig,
    rollout: RolloutConfig,
    registry: Registry,
    monitor_window_secs: u64,
    catalog: Arc<Catalog>,
    /// Where a run reads its window.
    source: source::TrainingSource,
    model: ModelHandle,
    monitor: Addr<MonitorActor>,
    metrics: Arc<Metrics>,
    phase: Phase,
    /// Registry name of the version serving everyone (none for the online model).
    serving_name: Option<String>,
    /// The model displaced by the last promotion, and its registry name.
    previous: Option<Kept>,
    next_run: u64,
    runs: VecDeque<RunRecord>,
    history: VecDeque<HistoryEntry>,
    checking: bool,
    /// A count of produced events is being asked for (a run waiting for fresh events).
    counting: bool,
    /// The last count of produced events (see `source::TrainingSource::produced`).
    produced: Option<u64>,
    /// Production mode: the loop's leadership and the control topic (none in the embedded mode;
    /// see `cluster`).
    cluster: Option<Arc<Cluster>>,
    /// Whether this instance leads the loop (always without a cluster).
    leading: bool,
    /// Took the lease; carries on from the newest record once the control topic is read.
    takeover_pending: bool,
    /// The newest desired state read from the control topic.
    desired: Option<DesiredState>,
    /// Production mode: the version this instance's monitor was last given as serving
    /// (`SetReference`), so every instance, not only the leader that promoted it, judges drift
    /// against the serving version's traffic.
    reference_version: Option<String>,
    /// The state this leader published last (ahead of `desired` until it is read back).
    intended: Option<StateChange>,
    /// What served at start, before any control record.
    started_serving: ServingVersion,
    /// The step of a run published last, so that each is published once.
    published_run: Option<(u64, RunPhase)>,
    /// Runs a new leader started again after its predecessor died training them.
    restarted_runs: Vec<u64>,
}

impl TrainerActor {
    #[allow(clippy::too_many_arguments)] // the loop's collaborators, each distinct
    pub fn new(
        config: &crate::config::Config,
        catalog: Arc<Catalog>,
        source: source::TrainingSource,
        model: ModelHandle,
        monitor: Addr<MonitorActor>,
        metrics: Arc<Metrics>,
        serving_name: Option<String>,
        registry: Registry,
    ) -> Self {
        Self {
            config: config.trainer.clone(),
            rollout: config.rollout.clone(),
            registry,
            monitor_window_secs: config.monitor.window_secs,
            catalog,
            source,
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
            counting: false,
            produced: None,
            cluster: None,
            leading: true,
            takeover_pending: false,
            desired: None,
            reference_version: None,
            intended: None,
            started_serving: ServingVersion { name: None, version: String::new() },
            published_run: None,
            restarted_runs: Vec::new(),
        }
    }

    /// Production mode: the loop runs across instances (see `cluster`); `serving` is what this
    /// instance serves at start.
    pub fn with_cluster(mut self, cluster: Arc<Cluster>, serving: ServingVersion) -> Self {
        self.leading = false;
        self.cluster = Some(cluster);
        self.started_serving = serving;
        self
    }

    fn loop_phase(&self) -> LoopPhase {
        match self.phase {
            Phase::Idle => LoopPhase::Idle,
            Phase::Waiting { .. } => LoopPhase::WaitingForData,
            Phase::Training { .. } => LoopPhase::Training,
            Phase::Canary(_) => LoopPhase::Canary,
            Phase::Experiment(_) => LoopPhase::Experiment,
        }
    }

    fn trigger(&mut self, request: RequestRetrain, ctx: &mut Context<Self>) -> Result<RetrainAck, TrainerError> {
        match request.source {
            TriggerSource::Monitor => self.metrics.trainer_triggers_monitor.inc(),
            TriggerSource::Schedule => self.metrics.trainer_triggers_schedule.inc(),
            TriggerSource::Admin => self.metrics.trainer_triggers_admin.inc(),
            TriggerSource::Failover => {}
        }
        if !self.leading {
            // The leader alone trains; the monitor's and the schedule's triggers are its own.
            if request.source != TriggerSource::Admin {
                self.metrics.cluster_triggers_ignored.inc();
                tracing::debug!(reason = %request.reason, "retraining trigger ignored: another instance leads the loop");
            }
            return Err(self.not_leader());
        }
        if !self.config.enabled {
            self.record(LoopStep::TriggerIgnored, None, None, format!("{} (trainer.enabled = false)", request.reason));
            return Err(TrainerError::Disabled);
        }
        let running = match &self.phase {
            Phase::Training { run } | Phase::Waiting { run, .. } => Some(*run),
            Phase::Canary(canary) => Some(canary.run),
            Phase::Experiment(_) => return Err(TrainerError::ExperimentRunning),
            Phase::Idle => None,
        };
        if let Some(run) = running {
            self.metrics.trainer_coalesced.inc();
            if let Some(record) = self.run_mut(run) {
                record.reasons.push(request.reason.clone());
                record.sources.push(request.source);
            }
            self.record(LoopStep::TriggerCoalesced, Some(run), None, request.reason);
            return Ok(RetrainAck { run, coalesced: true });
        }
        let run = self.next_run;
        self.next_run += 1;
        if request.source == TriggerSource::Monitor && self.config.fresh_events > 0 {
            self.push_run(run, &request, RunOutcome::WaitingForData);
            self.record(
                LoopStep::WaitingForData,
                Some(run),
                None,
                format!("{}; training after {} new events", request.reason, self.config.fresh_events),
            );
            self.phase = Phase::Waiting { run, from: self.source.produced_now(), request };
        } else {
            self.start_training(run, request, ctx);
        }
        // A successor learns of the run from the control topic: published now, not at the next check.
        self.sync_run(ctx);
        Ok(RetrainAck { run, coalesced: false })
    }

    /// Starts a waiting run once enough new events are in. The count may need the broker (Kafka
    /// high watermarks), so it is asked off the actor's thread and the answer checked here; the
    /// first answer is the baseline when the trigger could not know it.
    fn check_waiting(&mut self, ctx: &mut Context<Self>) {
        let Phase::Waiting { run, .. } = self.phase else { return };
        if self.counting {
            return;
        }
        self.counting = true;
        ctx.spawn(self.source.produced().into_actor(self).map(move |produced, act, ctx| {
            act.counting = false;
            let produced = match produced {
                Ok(produced) => produced,
                Err(error) => {
                    tracing::warn!(error = %error, run, "cannot count new events; asking again");
                    return;
                }
            };
            act.produced = Some(produced);
            let Phase::Waiting { run: waiting, from, .. } = &mut act.phase else { return };
            if *waiting != run {
                return;
            }
            let Some(from) = *from else {
                *from = Some(produced);
                return;
            };
            if produced < from + act.config.fresh_events {
                return;
            }
            if let Phase::Waiting { run, request, .. } = std::mem::replace(&mut act.phase, Phase::Idle) {
                act.start_training(run, request, ctx);
            }
        }));
    }

    fn start_training(&mut self, run: u64, request: RequestRetrain, ctx: &mut Context<Self>) {
        if self.run_mut(run).is_none() {
            self.push_run(run, &request, RunOutcome::Training);
        }
        if let Some(record) = self.run_mut(run) {
            record.outcome = RunOutcome::Training;
        }
        self.record(
            LoopStep::TrainingStarted,
            Some(run),
            None,
            format!("{} (window from {})", request.reason, self.source.describe()),
        );
        self.phase = Phase::Training { run };
        let job = Job {
            run,
            source: Arc::new(self.source.clone()),
            catalog: self.catalog.clone(),
            config: self.config.clone(),
            registry: self.registry.clone(),
            serving_name: self.serving_name.clone(),
            drill: request.drill,
            skip_gate: request.skip_gate,
            reference_secs: self.monitor_window_secs,
        };
        let addr = ctx.address();
        let spawned = std::thread::Builder::new().name("liverec-trainer".into()).spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run()))
                .unwrap_or_else(|_| Err(RetrainError::Panicked));
            addr.do_send(TrainingDone { run, result });
        });
        if let Err(error) = spawned {
            ctx.notify(TrainingDone { run, result: Err(RetrainError::NoThread(error)) });
        }
    }

    fn finish_training(&mut self, run: u64, result: Result<Candidate, RetrainError>, ctx: &mut Context<Self>) {
        self.phase = Phase::Idle;
        let candidate = match result {
            Ok(candidate) => candidate,
            Err(error) => {
                let error = error.to_string();
                self.metrics.trainer_runs_failed.inc();
                if let Some(record) = self.run_mut(run) {
                    record.outcome = RunOutcome::Failed;
                    record.detail = Some(error.clone());
                }
                self.record(LoopStep::TrainingFailed, Some(run), None, error);
                self.publish_run(run, RunPhase::Failed, ctx);
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
            record.name = candidate.saved.as_ref().map(|saved| saved.name.clone());
            record.version = candidate.saved.as_ref().map(|saved| saved.version.clone());
        }
        let verdict = format!(
            "NDCG@10 {:.4} vs {:.4} ({}) on {} held-out interactions",
            candidate.candidate_ndcg, candidate.incumbent_ndcg, candidate.yardstick, candidate.cases
        );
        if candidate.gate.passed() {
            self.metrics.trainer_runs_passed.inc();
            self.record(
                LoopStep::GatePassed,
                Some(run),
                candidate.saved.as_ref().map(|saved| saved.version.as_str()),
                verdict.clone(),
            );
        } else {
            self.metrics.trainer_runs_rejected.inc();
            self.record(LoopStep::GateRejected, Some(run), None, verdict.clone());
        }
        let Some(SavedCandidate { model, name, version }) = candidate.saved else {
            if let Some(record) = self.run_mut(run) {
                record.outcome = RunOutcome::Rejected;
                record.detail = Some(verdict);
            }
            self.publish_run(run, RunPhase::Rejected, ctx);
            return;
        };
        if !candidate.gate.passed() {
            self.record(
                LoopStep::GateSkipped,
                Some(run),
                Some(&version),
                "drill: sent to canary despite the gate".into(),
            );
        }
        if let Some(record) = self.run_mut(run) {
            record.outcome = RunOutcome::Canary;
        }
        if self.clustered() {
            // Every instance loads the version from the registry; this copy is not needed.
            drop(model);
            self.cluster_start_canary(run, name, version, candidate.reference, ctx);
            return;
        }
        let share = self.rollout.canary_share.clamp(0.0, 1.0);
        let start = StartChallenger {
            model: Box::new(model),
            variant: Arc::from(Variant::Canary.as_str()),
            control_variant: Arc::from(Variant::Control.as_str()),
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
            let canary = CanaryState {
                run,
                name,
                version,
                incumbent,
                started: Instant::now(),
                started_at_ms: now_ms(),
                share,
                baseline,
                reference: candidate.reference,
            };
            act.canary_started(canary, "");
        }));
    }

    /// Bookkeeping of a canary that serves from now on (`scope` ends the history's detail).
    fn canary_started(&mut self, canary: CanaryState, scope: &str) {
        self.metrics.rollout_canaries.inc();
        self.metrics.set_challenger_share(canary.share);
        self.record(
            LoopStep::CanaryStarted,
            Some(canary.run),
            Some(&canary.version),
            format!("serving {:.0} % of users against {}{scope}", canary.share * 100.0, canary.incumbent),
        );
        self.phase = Phase::Canary(canary);
    }

    /// Loads registry versions off the actor's thread.
    fn load_versions(
        &self,
        names: Vec<String>,
    ) -> impl std::future::Future<Output = Result<Vec<SequentialModel>, TrainerError>> + 'static {
        let (registry, catalog) = (self.registry.clone(), self.catalog.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                names
                    .iter()
                    .map(|name| {
                        let name = registry.resolve(name).map_err(TrainerError::Version)?;
                        registry.load(&name, &catalog).map_err(TrainerError::Unreadable)
                    })
                    .collect()
            })
            .await
            .map_err(|e| TrainerError::LoadStopped(e.to_string()))?
        }
    }
}

impl Actor for TrainerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(Duration::from_millis(self.rollout.check_interval_ms.max(50)), |act, ctx| {
            act.check_waiting(ctx);
            act.check_canary(ctx);
            act.sync_run(ctx);
        });
        self.follow_leadership(ctx);
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
