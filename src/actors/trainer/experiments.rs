//! A/B experiments between two registry versions: `a` serves the rest, `b` its share of users
//! by the same stable split as the canary; an experiment ends by promoting `b` or by a stop that
//! leaves `a` serving.

use std::sync::Arc;

use super::replies::{ExperimentArms, ExperimentStarted, NowServing};
use actix::prelude::*;

use super::state::{ExperimentState, LoopStep, NamedVersion, Phase, TrainerError, Variant};
use super::TrainerActor;
use crate::actors::model::{EndChallenger, StartChallenger, SwapModel};
use crate::actors::monitor::GetCounts;
use crate::event::now_ms;
use crate::models::Recommender;

#[derive(Message, Debug)]
#[rtype(result = "Result<ExperimentStarted, TrainerError>")]
pub struct StartExperiment {
    pub a: String,
    pub b: String,
    pub share: f64,
}

#[derive(Message, Debug)]
#[rtype(result = "Result<NowServing, TrainerError>")]
pub struct StopExperiment;

impl TrainerActor {
    pub(super) fn stop_experiment(
        &mut self,
        why: &str,
    ) -> impl ActorFuture<Self, Output = Result<NowServing, TrainerError>> + 'static {
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
                return Err(TrainerError::NoExperiment);
            };
            Ok(act.experiment_stopped(e, &why))
        })
    }

    /// Bookkeeping of an experiment that ended with `a` serving (here, or in the cluster by a
    /// control record).
    pub(super) fn experiment_stopped(&mut self, e: ExperimentState, why: &str) -> NowServing {
        self.metrics.set_challenger_share(0.0);
        self.record(
            LoopStep::ExperimentStopped,
            None,
            Some(&e.a.version),
            format!("{why}; a ({}) keeps serving", e.a.name),
        );
        NowServing { serving: e.a.version, name: Some(e.a.name) }
    }
}

impl TrainerActor {
    /// Bookkeeping of an experiment that serves from now on (`scope` ends the history's detail).
    pub(super) fn experiment_started(
        &mut self,
        a: NamedVersion,
        b: NamedVersion,
        share: f64,
        baseline: crate::monitor::ArmCounts,
        scope: &str,
    ) {
        self.metrics.set_challenger_share(share);
        self.record(
            LoopStep::ExperimentStarted,
            None,
            Some(&b.version),
            format!(
                "a = {} ({}), b = {} ({}) on {:.0} % of users{scope}",
                a.name,
                a.version,
                b.name,
                b.version,
                share * 100.0
            ),
        );
        self.phase = Phase::Experiment(ExperimentState { a, b, share, started_at_ms: now_ms(), baseline });
    }
}

impl Handler<StartExperiment> for TrainerActor {
    type Result = ResponseActFuture<Self, Result<ExperimentStarted, TrainerError>>;

    fn handle(&mut self, msg: StartExperiment, ctx: &mut Self::Context) -> Self::Result {
        if self.clustered() {
            self.settle_takeover(ctx);
            return self.cluster_start_experiment(msg);
        }
        if !matches!(self.phase, Phase::Idle) {
            return Box::pin(fut::ready(Err(TrainerError::Busy {
                action: "start an experiment",
                phase: self.loop_phase(),
            })));
        }
        if !(msg.share > 0.0 && msg.share < 1.0) || msg.a == msg.b {
            return Box::pin(fut::ready(Err(TrainerError::InvalidExperiment)));
        }
        let load = self.load_versions(vec![msg.a.clone(), msg.b.clone()]);
        Box::pin(load.into_actor(self).then(move |loaded, act, _| {
            let step: actix::fut::LocalBoxActorFuture<Self, Result<ExperimentStarted, TrainerError>> = match loaded {
                Err(error) => Box::pin(fut::ready(Err(error))),
                Ok(_) if !matches!(act.phase, Phase::Idle) => Box::pin(fut::ready(Err(TrainerError::BecameBusy))),
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
                                variant: Arc::from(Variant::B.as_str()),
                                control_variant: Arc::from(Variant::A.as_str()),
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
                        let a = NamedVersion { name: msg.a.clone(), version: a_version };
                        let b = NamedVersion { name: msg.b.clone(), version: b_version };
                        act.experiment_started(a, b, share, baseline, "");
                        Ok(ExperimentStarted { started: ExperimentArms { a: msg.a, b: msg.b, share } })
                    }))
                }
            };
            step
        }))
    }
}

impl Handler<StopExperiment> for TrainerActor {
    type Result = ResponseActFuture<Self, Result<NowServing, TrainerError>>;

    fn handle(&mut self, msg: StopExperiment, ctx: &mut Self::Context) -> Self::Result {
        if self.clustered() {
            self.settle_takeover(ctx);
            return self.cluster_stop(msg);
        }
        if !matches!(self.phase, Phase::Experiment(_)) {
            return Box::pin(fut::ready(Err(TrainerError::NoExperiment)));
        }
        Box::pin(self.stop_experiment("stopped by an operator"))
    }
}
