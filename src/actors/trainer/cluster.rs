//! The loop across instances (production mode, `[cluster]`): what the trainer does differently
//! when one instance leads and every instance applies the desired serving state.
//!
//! - Only the leader acts: a follower ignores the monitor's and the schedule's triggers
//!   (`liverec_cluster_triggers_ignored_total`) and refuses an operator's requests
//!   ([`TrainerError::NotLeader`], `409 not_leader` naming the leader).
//! - The leader never talks to its model actor about what serves: a promotion, a canary's start
//!   and end, an experiment's start and stop, a rollback and an activation are published as the
//!   desired state (see `crate::cluster`), which every instance's control applier (the leader's
//!   included) makes serve. Each step of a training run is published too, so a successor knows it.
//! - A new leader starts from the newest record: a run its predecessor left training (or waiting
//!   for data) is restarted once, as a new run (a run interrupted again is abandoned); a canary
//!   left running is rolled back, because the new leader has no baseline of the arms' figures from
//!   the canary's start and would judge on figures it never saw whole (rolling back costs one
//!   retrain, a wrong promotion costs users); an experiment goes on, counted from the takeover.
//!   It then publishes the state again under its own epoch, which fences any record its
//!   predecessor might still publish.

use actix::prelude::*;

use super::experiments::{StartExperiment, StopExperiment};
use super::replies::{ExperimentArms, ExperimentStarted, NowServing, Promoted, RolledBack};
use super::rollout::{Promote, Rollback};
use super::state::{
    CanaryState, ExperimentState, LoopStep, NamedVersion, Phase, RequestRetrain, RunOutcome, TrainerError,
    TriggerSource, Variant,
};
use super::TrainerActor;
use crate::actors::control::ControlApplied;
use crate::actors::monitor::{GetCounts, SetReference};
use crate::cluster::record::{ChallengerState, DesiredState, RunPhase, RunState, ServingVersion, StateChange};
use crate::cluster::Leadership;
use crate::event::now_ms;
use crate::models::registry::RegistryError;
use crate::models::retrain::Drill;
use crate::monitor::drift::DriftReference;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt as _;

/// The lease changed hands (sent by the leadership watch).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(super) struct LeadershipChanged(pub(super) Leadership);

type Reply<T> = ResponseActFuture<TrainerActor, Result<T, TrainerError>>;

impl TrainerActor {
    /// In production mode: tells the actor who leads now, then of every change of the lease's
    /// holder (see [`leadership_feed`]).
    pub(super) fn follow_leadership(&mut self, ctx: &mut Context<Self>) {
        let Some(cluster) = &self.cluster else { return };
        let (mut feed, addr) = (leadership_feed(cluster.watch_leadership()), ctx.address());
        ctx.spawn(
            async move {
                while let Some(now) = feed.next().await {
                    addr.do_send(LeadershipChanged(now));
                }
            }
            .into_actor(self),
        );
    }
}

/// The leadership as it is now, then each change. The current value comes first: the lease task
/// starts before the trainer, and a watch's `changed` does not fire for the value already there
/// when it subscribed, so an instance that took the lease before its trainer subscribed never
/// learned that it led (its loop stood still, and `/v1/admin/models` said `leader: false` while
/// every other instance named it: the cluster tests' start-up wait that failed under load).
fn leadership_feed(leadership: watch::Receiver<Leadership>) -> WatchStream<Leadership> {
    WatchStream::new(leadership)
}

fn ready<T: 'static>(result: Result<T, TrainerError>) -> Reply<T> {
    Box::pin(fut::ready(result))
}

impl TrainerActor {
    pub(super) fn clustered(&self) -> bool {
        self.cluster.is_some()
    }

    pub(super) fn not_leader(&self) -> TrainerError {
        TrainerError::NotLeader { leader: self.cluster.as_ref().and_then(|c| c.leadership().leader) }
    }

    /// The desired state this instance knows: what it published last while leading, else the
    /// newest record read, else what served at start.
    pub(super) fn cluster_current(&self) -> StateChange {
        if let Some(intended) = &self.intended {
            return intended.clone();
        }
        match &self.desired {
            Some(desired) => desired.clone().into(),
            None => StateChange { control: self.started_serving.clone(), challenger: None, run: None, previous: None },
        }
    }

    /// Publishes `change`; the future resolves once the broker has it.
    fn publish_change(
        &mut self,
        change: StateChange,
    ) -> impl ActorFuture<Self, Output = Result<DesiredState, TrainerError>> {
        let queued = match &self.cluster {
            Some(cluster) => cluster.publish(change.clone()).map_err(TrainerError::from),
            None => Err(TrainerError::Control("no cluster".into())),
        };
        if queued.is_ok() {
            self.intended = Some(change);
        }
        async move { Ok(queued?.await?) }.into_actor(self)
    }

    fn run_state(&self, run: u64, phase: RunPhase) -> RunState {
        let reason =
            self.runs.iter().find(|r| r.run == run).and_then(|r| r.reasons.first().cloned()).unwrap_or_default();
        RunState { id: run, reason, phase, restarts: u32::from(self.restarted_runs.contains(&run)) }
    }

    /// Publishes a step of run `run` (once per step), so a successor knows where it stands.
    pub(super) fn publish_run(&mut self, run: u64, phase: RunPhase, ctx: &mut Context<Self>) {
        if !self.clustered() || !self.leading || self.published_run == Some((run, phase)) {
            return;
        }
        self.published_run = Some((run, phase));
        let mut change = self.cluster_current();
        change.run = Some(self.run_state(run, phase));
        ctx.spawn(self.publish_change(change).map(move |published, _, _| {
            if let Err(error) = published {
                tracing::warn!(error = %error, run, ?phase, "run step not published");
            }
        }));
    }

    /// Publishes the steps of the run in progress (called on every check of the loop).
    pub(super) fn sync_run(&mut self, ctx: &mut Context<Self>) {
        match self.phase {
            Phase::Waiting { run, .. } => self.publish_run(run, RunPhase::WaitingForData, ctx),
            Phase::Training { run } => self.publish_run(run, RunPhase::Training, ctx),
            _ => {}
        }
        self.settle_takeover(ctx);
    }

    /// A leader that took the lease carries on from the newest record once the control topic is
    /// read: before an operator's change too, which then builds on the takeover's record. (A
    /// takeover left to the next loop check could publish the previous leader's state after an
    /// operator's rollback, undoing it: seen once on a loaded machine.)
    pub(super) fn settle_takeover(&mut self, ctx: &mut Context<Self>) {
        if self.takeover_pending && self.cluster.as_ref().is_some_and(|c| c.applied_at_start()) {
            self.takeover_pending = false;
            self.take_over(ctx);
        }
    }

    /// Name and version of each registry version named, off the actor's thread.
    fn versions_of(&self, names: Vec<String>) -> impl std::future::Future<Output = Result<Vec<String>, TrainerError>> {
        let registry = self.registry.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let listed = registry.list().map_err(TrainerError::Version)?;
                names
                    .iter()
                    .map(|name| {
                        registry.resolve(name).map_err(TrainerError::Version)?;
                        listed.iter().find(|v| &v.name == name).map(|v| v.version.clone()).ok_or_else(|| {
                            TrainerError::Version(RegistryError::NotFound {
                                location: registry.to_string(),
                                name: name.clone(),
                            })
                        })
                    })
                    .collect()
            })
            .await
            .map_err(|e| TrainerError::LoadStopped(e.to_string()))?
        }
    }

    /// Bookkeeping of a version serving everyone.
    fn adopt_name(&mut self, name: Option<String>) {
        self.metrics.rollout_promotions.inc();
        if let Some(name) = &name {
            self.registry.record_serving(name);
        }
        self.serving_name = name;
    }

    /// A candidate that passed the gate goes to canary: published with the split's salt.
    pub(super) fn cluster_start_canary(
        &mut self,
        run: u64,
        name: String,
        version: String,
        reference: DriftReference,
        ctx: &mut Context<Self>,
    ) {
        let mut change = self.cluster_current();
        let incumbent = change.control.version.clone();
        let share = self.rollout.canary_share.clamp(0.0, 1.0);
        let epoch = self.cluster.as_ref().and_then(|c| c.fence()).unwrap_or(0);
        change.challenger = Some(ChallengerState {
            name: name.clone(),
            version: version.clone(),
            variant: Variant::Canary.as_str().into(),
            control_variant: Variant::Control.as_str().into(),
            share,
            // The same users everywhere, and others for the next canary.
            salt: (epoch << 32) ^ run,
        });
        change.run = Some(self.run_state(run, RunPhase::Canary));
        self.published_run = Some((run, RunPhase::Canary));
        let monitor = self.monitor.clone();
        let published = self.publish_change(change);
        ctx.wait(published.then(move |published, act, _| {
            async move { (published, monitor.send(GetCounts).await.unwrap_or_default()) }.into_actor(act).map(
                move |(published, baseline), act, _| {
                    if let Err(error) = published {
                        if let Some(record) = act.run_mut(run) {
                            record.outcome = RunOutcome::Failed;
                            record.detail = Some(error.to_string());
                        }
                        act.record(
                            LoopStep::TrainingFailed,
                            Some(run),
                            Some(&version),
                            format!("canary not started: {error}"),
                        );
                        return;
                    }
                    let canary = CanaryState {
                        run,
                        name,
                        version,
                        incumbent,
                        started: std::time::Instant::now(),
                        started_at_ms: now_ms(),
                        share,
                        baseline,
                        reference,
                    };
                    act.canary_started(canary, " on every instance");
                },
            )
        }));
    }

    /// Ends the canary by publishing: promoted (it serves everyone) or rolled back.
    pub(super) fn cluster_end_canary(
        &mut self,
        promote: bool,
        detail: String,
    ) -> impl ActorFuture<Self, Output = Result<(), TrainerError>> {
        let canary = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Canary(canary) => Some(canary),
            other => {
                self.phase = other;
                None
            }
        };
        let published = canary.as_ref().map(|canary| {
            let mut change = self.cluster_current();
            change.challenger = None;
            if promote {
                change.previous = Some(change.control.clone());
                change.control = ServingVersion { name: Some(canary.name.clone()), version: canary.version.clone() };
            }
            let phase = if promote { RunPhase::Promoted } else { RunPhase::RolledBack };
            change.run = Some(self.run_state(canary.run, phase));
            self.published_run = Some((canary.run, phase));
            self.publish_change(change)
        });
        let published: actix::fut::LocalBoxActorFuture<Self, Result<DesiredState, TrainerError>> = match published {
            Some(published) => Box::pin(published),
            None => Box::pin(fut::ready(Err(TrainerError::NothingToRollBack))),
        };
        published.map(move |published, act, _| {
            let canary = canary.expect("published only with a canary");
            act.metrics.set_challenger_share(0.0);
            if let Err(error) = published {
                act.record(
                    LoopStep::LeadershipLost,
                    Some(canary.run),
                    Some(&canary.version),
                    format!("canary verdict not published ({error}); the leader decides"),
                );
                return Err(error);
            }
            if promote {
                act.adopt_name(Some(canary.name.clone()));
                act.reference_version = Some(canary.version.to_string());
                act.monitor.do_send(SetReference {
                    reference: canary.reference,
                    version: canary.version.to_string(),
                    run_started_ms: act.runs.iter().find(|r| r.run == canary.run).map(|r| r.started_at_ms),
                });
            } else {
                act.metrics.rollout_rollbacks.inc();
            }
            let outcome = if promote { RunOutcome::Promoted } else { RunOutcome::RolledBack };
            if let Some(record) = act.run_mut(canary.run) {
                record.outcome = outcome;
                record.detail = Some(detail.clone());
            }
            let step = if promote { LoopStep::Promoted } else { LoopStep::RolledBack };
            act.record(step, Some(canary.run), Some(&canary.version), detail);
            Ok(())
        })
    }

    pub(super) fn cluster_promote(&mut self, msg: Promote) -> Reply<Promoted> {
        if !self.leading {
            return ready(Err(self.not_leader()));
        }
        if let Phase::Canary(c) = &self.phase {
            if msg.name.is_none() || msg.name.as_ref() == Some(&c.name) {
                let (name, version) = (c.name.clone(), c.version.clone());
                let ended = self.cluster_end_canary(true, format!("manual: {}", msg.reason));
                return Box::pin(
                    ended.map(move |ended, _, _| ended.map(|()| Promoted { promoted: name, serving: version })),
                );
            }
        }
        if let Phase::Experiment(e) = &self.phase {
            if msg.name.is_none() || msg.name.as_deref() == Some(e.b.name.as_str()) {
                let NamedVersion { name, version } = e.b.clone();
                let mut change = self.cluster_current();
                change.previous = Some(change.control.clone());
                change.control = ServingVersion { name: Some(name.clone()), version: version.clone() };
                change.challenger = None;
                self.phase = Phase::Idle;
                let published = self.publish_change(change);
                return Box::pin(published.map(move |published, act, _| {
                    published?;
                    act.metrics.set_challenger_share(0.0);
                    act.adopt_name(Some(name.clone()));
                    act.record(LoopStep::Promoted, None, Some(&version), "experiment ended: b promoted".into());
                    Ok(Promoted { promoted: name, serving: version })
                }));
            }
        }
        let Some(name) = msg.name else {
            return ready(Err(TrainerError::NothingToPromote));
        };
        if matches!(self.phase, Phase::Training { .. } | Phase::Waiting { .. } | Phase::Experiment(_)) {
            return ready(Err(TrainerError::Busy { action: "switch versions", phase: self.loop_phase() }));
        }
        let lookup = self.versions_of(vec![name.clone()]);
        Box::pin(lookup.into_actor(self).then(move |found, act, _| {
            let step: actix::fut::LocalBoxActorFuture<Self, Result<Promoted, TrainerError>> = match found {
                Err(error) => Box::pin(fut::ready(Err(error))),
                Ok(_) if matches!(act.phase, Phase::Training { .. } | Phase::Waiting { .. } | Phase::Experiment(_)) => {
                    Box::pin(fut::ready(Err(TrainerError::BecameBusy)))
                }
                Ok(mut versions) => {
                    let version = versions.pop().expect("one version asked, one found");
                    let mut change = act.cluster_current();
                    // A canary in progress is rolled back: the operator chose another version.
                    if let Phase::Canary(canary) = std::mem::replace(&mut act.phase, Phase::Idle) {
                        change.challenger = None;
                        change.run = Some(act.run_state(canary.run, RunPhase::RolledBack));
                        act.published_run = Some((canary.run, RunPhase::RolledBack));
                        act.metrics.rollout_rollbacks.inc();
                        act.metrics.set_challenger_share(0.0);
                        if let Some(record) = act.run_mut(canary.run) {
                            record.outcome = RunOutcome::RolledBack;
                        }
                        act.record(
                            LoopStep::RolledBack,
                            Some(canary.run),
                            Some(&canary.version),
                            format!("manual promotion of {name} instead"),
                        );
                    }
                    change.previous = Some(change.control.clone());
                    change.control = ServingVersion { name: Some(name.clone()), version: version.clone() };
                    let published = act.publish_change(change);
                    Box::pin(published.map(move |published, act, _| {
                        published?;
                        act.adopt_name(Some(name.clone()));
                        act.record(LoopStep::Promoted, None, Some(&version), format!("manual: {}", msg.reason));
                        Ok(Promoted { promoted: name, serving: version })
                    }))
                }
            };
            step
        }))
    }

    pub(super) fn cluster_rollback(&mut self, msg: Rollback) -> Reply<RolledBack> {
        if !self.leading {
            return ready(Err(self.not_leader()));
        }
        match &self.phase {
            Phase::Canary(c) => {
                let (version, incumbent) = (c.version.clone(), c.incumbent.clone());
                let ended = self.cluster_end_canary(false, format!("manual: {}", msg.reason));
                return Box::pin(ended.map(move |ended, _, _| {
                    ended.map(|()| RolledBack::Canary { rolled_back: version, serving: incumbent })
                }));
            }
            Phase::Experiment(_) => {
                return Box::pin(
                    self.cluster_stop_experiment("rolled back by an operator").map(|s, _, _| s.map(RolledBack::To)),
                );
            }
            Phase::Training { .. } | Phase::Waiting { .. } | Phase::Idle => {}
        }
        let mut change = self.cluster_current();
        let Some(previous) = change.previous.take() else {
            return ready(Err(TrainerError::NothingToRollBack));
        };
        change.previous = Some(std::mem::replace(&mut change.control, previous.clone()));
        let published = self.publish_change(change);
        Box::pin(published.map(move |published, act, _| {
            published?;
            act.metrics.rollout_rollbacks.inc();
            if let Some(name) = &previous.name {
                act.registry.record_serving(name);
            }
            act.serving_name = previous.name.clone();
            act.record(
                LoopStep::RolledBack,
                None,
                Some(&previous.version),
                format!("manual: back to the previous version on every instance; {}", msg.reason),
            );
            Ok(RolledBack::To(NowServing { serving: previous.version, name: previous.name }))
        }))
    }

    fn cluster_stop_experiment(
        &mut self,
        why: &str,
    ) -> impl ActorFuture<Self, Output = Result<NowServing, TrainerError>> {
        let why = why.to_owned();
        let ended = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Experiment(e) => Some(e),
            other => {
                self.phase = other;
                None
            }
        };
        let published: actix::fut::LocalBoxActorFuture<Self, Result<DesiredState, TrainerError>> = match &ended {
            Some(_) => {
                let mut change = self.cluster_current();
                change.challenger = None;
                Box::pin(self.publish_change(change))
            }
            None => Box::pin(fut::ready(Err(TrainerError::NoExperiment))),
        };
        published.map(move |published, act, _| {
            published?;
            let e = ended.expect("published only with an experiment");
            Ok(act.experiment_stopped(e, &why))
        })
    }

    pub(super) fn cluster_stop(&mut self, _msg: StopExperiment) -> Reply<NowServing> {
        if !self.leading {
            return ready(Err(self.not_leader()));
        }
        if !matches!(self.phase, Phase::Experiment(_)) {
            return ready(Err(TrainerError::NoExperiment));
        }
        Box::pin(self.cluster_stop_experiment("stopped by an operator"))
    }

    pub(super) fn cluster_start_experiment(&mut self, msg: StartExperiment) -> Reply<ExperimentStarted> {
        if !self.leading {
            return ready(Err(self.not_leader()));
        }
        if !matches!(self.phase, Phase::Idle) {
            return ready(Err(TrainerError::Busy { action: "start an experiment", phase: self.loop_phase() }));
        }
        if !(msg.share > 0.0 && msg.share < 1.0) || msg.a == msg.b {
            return ready(Err(TrainerError::InvalidExperiment));
        }
        let lookup = self.versions_of(vec![msg.a.clone(), msg.b.clone()]);
        Box::pin(lookup.into_actor(self).then(move |found, act, _| {
            let step: actix::fut::LocalBoxActorFuture<Self, Result<ExperimentStarted, TrainerError>> = match found {
                Err(error) => Box::pin(fut::ready(Err(error))),
                Ok(_) if !matches!(act.phase, Phase::Idle) => Box::pin(fut::ready(Err(TrainerError::BecameBusy))),
                Ok(versions) => {
                    let (a_version, b_version) = (versions[0].clone(), versions[1].clone());
                    let mut change = act.cluster_current();
                    let swap_a = change.control.name.as_deref() != Some(msg.a.as_str());
                    if swap_a {
                        change.previous = Some(change.control.clone());
                        change.control = ServingVersion { name: Some(msg.a.clone()), version: a_version.clone() };
                    }
                    let share = msg.share;
                    change.challenger = Some(ChallengerState {
                        name: msg.b.clone(),
                        version: b_version.clone(),
                        variant: Variant::B.as_str().into(),
                        control_variant: Variant::A.as_str().into(),
                        share,
                        salt: now_ms() as u64,
                    });
                    let monitor = act.monitor.clone();
                    let published = act.publish_change(change);
                    Box::pin(published.then(move |published, act, _| {
                        async move { (published, monitor.send(GetCounts).await.unwrap_or_default()) }
                            .into_actor(act)
                            .map(move |(published, baseline), act, _| {
                                published?;
                                if swap_a {
                                    act.adopt_name(Some(msg.a.clone()));
                                }
                                let a = NamedVersion { name: msg.a.clone(), version: a_version };
                                let b = NamedVersion { name: msg.b.clone(), version: b_version };
                                act.experiment_started(a, b, share, baseline, ", every instance");
                                Ok(ExperimentStarted { started: ExperimentArms { a: msg.a, b: msg.b, share } })
                            })
                    }))
                }
            };
            step
        }))
    }

    /// This instance took the lease: it carries on from the newest record (see the module docs).
    fn take_over(&mut self, ctx: &mut Context<Self>) {
        let epoch = self.cluster.as_ref().and_then(|c| c.fence()).unwrap_or(0);
        let Some(desired) = self.desired.clone() else {
            self.record(LoopStep::LeadershipTaken, None, None, format!("epoch {epoch}; no control record yet"));
            return;
        };
        self.record(
            LoopStep::LeadershipTaken,
            None,
            Some(&desired.control.version),
            format!("epoch {epoch}, after {} (epoch {})", desired.leader, desired.epoch),
        );
        self.serving_name = desired.control.name.clone();
        if let Some(run) = &desired.run {
            self.next_run = self.next_run.max(run.id + 1);
        }
        let mut change: StateChange = desired.clone().into();
        let mut restart = None;
        match desired.run.clone().filter(|run| run.phase.in_progress()) {
            Some(run) if run.phase == RunPhase::Canary => {
                let version = desired.challenger.as_ref().map(|c| c.version.clone());
                change.challenger = None;
                change.run = Some(RunState { phase: RunPhase::RolledBack, ..run.clone() });
                self.metrics.rollout_rollbacks.inc();
                self.record(
                    LoopStep::RolledBack,
                    Some(run.id),
                    version.as_deref(),
                    "the leader changed during the canary: rolled back (no baseline of its arms survives a leader)"
                        .into(),
                );
            }
            Some(run) if run.restarts == 0 => restart = Some(run),
            Some(run) => {
                change.run = Some(RunState { phase: RunPhase::Failed, ..run.clone() });
                self.record(
                    LoopStep::TrainingFailed,
                    Some(run.id),
                    None,
                    "interrupted by a leader change a second time: abandoned".into(),
                );
            }
            None => {
                if let Some(b) = &desired.challenger {
                    // An operator's experiment goes on, counted from now.
                    self.phase = Phase::Experiment(ExperimentState {
                        a: NamedVersion {
                            name: desired.control.name.clone().unwrap_or_default(),
                            version: desired.control.version.clone(),
                        },
                        b: NamedVersion { name: b.name.clone(), version: b.version.clone() },
                        share: b.share,
                        started_at_ms: now_ms(),
                        baseline: Default::default(),
                    });
                }
            }
        }
        let published = self.publish_change(change);
        ctx.wait(published.map(move |published, act, ctx| {
            if let Err(error) = published {
                tracing::warn!(error = %error, "the new leader's control record was not published");
                return;
            }
            if let Some(run) = restart {
                let request = RequestRetrain {
                    reason: format!("restarted after a leader change: {}", run.reason),
                    source: TriggerSource::Failover,
                    drill: Drill::None,
                    skip_gate: false,
                };
                match act.trigger(request, ctx) {
                    Ok(ack) => act.restarted_runs.push(ack.run),
                    Err(error) => tracing::warn!(error = %error, "the interrupted run was not restarted"),
                }
            }
        }));
    }

    fn step_down(&mut self) {
        self.intended = None;
        self.takeover_pending = false;
        let phase = self.loop_phase();
        if matches!(self.phase, Phase::Canary(_) | Phase::Experiment(_) | Phase::Waiting { .. }) {
            // The new leader carries on from the newest record.
            self.phase = Phase::Idle;
        }
        self.record(LoopStep::LeadershipLost, None, None, format!("the lease was lost while {phase}"));
    }
}

impl Handler<LeadershipChanged> for TrainerActor {
    type Result = ();

    fn handle(&mut self, msg: LeadershipChanged, ctx: &mut Self::Context) {
        let was = self.leading;
        self.leading = msg.0.leading;
        if self.leading && !was {
            // Carry on from the newest record once the control topic is read (see sync_run).
            self.takeover_pending = true;
            self.sync_run(ctx);
        } else if !self.leading && was {
            self.step_down();
        }
    }
}

impl Handler<ControlApplied> for TrainerActor {
    type Result = ();

    fn handle(&mut self, msg: ControlApplied, _ctx: &mut Self::Context) {
        let newer = self.desired.as_ref().is_none_or(|d| (msg.state.epoch, msg.state.seq) >= (d.epoch, d.seq));
        if !newer {
            return;
        }
        if !self.leading {
            self.serving_name = msg.serving.name.clone();
            self.metrics.set_challenger_share(msg.state.challenger.as_ref().map_or(0.0, |c| c.share));
        }
        // A version this monitor was not told of serves now (a follower's view of a promotion,
        // a manual promotion, an experiment's end, a rollback): drift is judged against its own
        // traffic from here (an empty training reference falls back to the version's first full
        // window). The leader's own promotion told the monitor already, with its training window;
        // the online model serving from the start keeps the monitor's own first window.
        let told = self.reference_version.replace(msg.serving.version.clone());
        let first_and_online = told.is_none() && msg.serving.name.is_none();
        if told.as_deref() != Some(msg.serving.version.as_str()) && !first_and_online {
            self.monitor.do_send(SetReference::serving(msg.serving.version.clone()));
        }
        self.desired = Some(msg.state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::lease::Holder;

    #[actix_rt::test]
    async fn the_leadership_feed_starts_with_a_lease_taken_before_it_subscribed() {
        let holder = Holder { epoch: 1, instance_id: "i1".into(), advertise_url: String::new() };
        let (tx, _) = watch::channel(Leadership::default());
        // The lease task took the lease before the trainer subscribed.
        tx.send_replace(Leadership { leading: true, leader: Some(holder.clone()) });
        let mut feed = leadership_feed(tx.subscribe());
        let first = tokio::time::timeout(std::time::Duration::from_secs(60), feed.next()).await;
        assert_eq!(first.ok().flatten(), Some(Leadership { leading: true, leader: Some(holder.clone()) }));
        // Then every change.
        tx.send_replace(Leadership { leading: false, leader: Some(holder.clone()) });
        assert_eq!(feed.next().await, Some(Leadership { leading: false, leader: Some(holder) }));
    }
}
