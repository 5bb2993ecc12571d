//! The canary and its verdict, promotion and rollback: how a version comes to serve everyone,
//! and how the loop goes back to the one before.

use std::time::Duration;

use actix::prelude::*;

use super::replies::{NowServing, Promoted, RolledBack};
use super::state::{CanaryState, Kept, LoopStep, NamedVersion, Phase, RunOutcome, TrainerError, Variant};
use super::TrainerActor;
use crate::actors::model::{EndChallenger, SwapModel};
use crate::actors::monitor::{ArmCounts, GetCounts, SetReference};
use crate::config::RolloutConfig;
use crate::models::Recommender;
use crate::monitor::two_proportion_z;
use crate::monitor::{arm_since, Arm, ArmTally};

/// Promote the canary or the experiment's `b` (no name), or switch to a registry version.
#[derive(Message, Debug)]
#[rtype(result = "Result<Promoted, TrainerError>")]
pub struct Promote {
    pub name: Option<String>,
    pub reason: String,
}

/// Stop the canary or experiment, or go back to the version that served before the last
/// promotion.
#[derive(Message, Debug)]
#[rtype(result = "Result<RolledBack, TrainerError>")]
pub struct Rollback {
    pub reason: String,
}

/// What the canary's figures say so far.
#[derive(Debug, Clone, PartialEq)]
pub enum CanaryVerdict {
    /// Not worse than the incumbent: it serves everyone (with the figures, for the history).
    Promote(String),
    /// Worse, or no verdict in time: back to the incumbent.
    RollBack(String),
    /// Too few impressions yet, and time left.
    Wait,
}

/// The canary verdict: once both arms have `rollout.min_impressions` impressions, a
/// two-proportion test on CTR rolls the canary back when it is worse by more than
/// `rollout.z_threshold` and promotes it otherwise; no verdict within `rollout.max_secs` (of
/// `elapsed`) rolls it back.
pub fn canary_verdict(
    control: ArmTally,
    canary: ArmTally,
    rollout: &RolloutConfig,
    elapsed: Duration,
) -> CanaryVerdict {
    let (control_n, control_clicks) = (control.impressions, control.clicks);
    let (canary_n, canary_clicks) = (canary.impressions, canary.clicks);
    let min = rollout.min_impressions;
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
        if z > rollout.z_threshold {
            CanaryVerdict::RollBack(format!("{} > {}: worse", describe(z), rollout.z_threshold))
        } else {
            CanaryVerdict::Promote(format!("{}: not worse", describe(z)))
        }
    } else if elapsed >= Duration::from_secs(rollout.max_secs) {
        CanaryVerdict::RollBack(format!("no verdict within rollout.max_secs: {}", describe(0.0)))
    } else {
        CanaryVerdict::Wait
    }
}

impl TrainerActor {
    /// Arms of the canary since it started: (impressions, clicks) of control and canary.
    pub(super) fn canary_arms(canary: &CanaryState, counts: &ArmCounts) -> (ArmTally, ArmTally) {
        let since =
            |version: &str, variant: Variant| arm_since(counts, &canary.baseline, &Arm::new(version, variant.as_str()));
        (since(&canary.incumbent, Variant::Control), since(&canary.version, Variant::Canary))
    }

    pub(super) fn check_canary(&mut self, ctx: &mut Context<Self>) {
        if self.checking || !matches!(self.phase, Phase::Canary(_)) {
            return;
        }
        self.checking = true;
        ctx.spawn(self.monitor.send(GetCounts).into_actor(self).map(|counts, act, ctx| {
            act.checking = false;
            let Ok(counts) = counts else { return };
            let Phase::Canary(canary) = &act.phase else { return };
            let (control, canary_arm) = Self::canary_arms(canary, &counts);
            match canary_verdict(control, canary_arm, &act.rollout, canary.started.elapsed()) {
                CanaryVerdict::Promote(detail) => act.end_canary(true, detail, ctx),
                CanaryVerdict::RollBack(detail) => act.end_canary(false, detail, ctx),
                CanaryVerdict::Wait => {}
            }
        }));
    }

    /// Ends the canary: `promote` makes it serve everyone, otherwise it is rolled back.
    fn end_canary(&mut self, promote: bool, detail: String, ctx: &mut Context<Self>) {
        if self.clustered() {
            let ended = self.cluster_end_canary(promote, detail);
            ctx.wait(ended.map(|ended, _, _| {
                if let Err(error) = ended {
                    tracing::warn!(error = %error, "canary verdict not published");
                }
            }));
            return;
        }
        let Phase::Canary(canary) = std::mem::replace(&mut self.phase, Phase::Idle) else { return };
        let done = self.model.send(EndChallenger { promote });
        ctx.wait(done.into_actor(self).map(move |displaced, act, _ctx| {
            act.metrics.set_challenger_share(0.0);
            let displaced = displaced.ok().flatten();
            if promote {
                act.adopt(canary.name.clone(), displaced);
                act.monitor.do_send(SetReference {
                    reference: canary.reference,
                    version: canary.version.to_string(),
                    run_started_ms: act.runs.iter().find(|r| r.run == canary.run).map(|r| r.started_at_ms),
                });
                if let Some(record) = act.run_mut(canary.run) {
                    record.outcome = RunOutcome::Promoted;
                    record.detail = Some(detail.clone());
                }
                act.record(LoopStep::Promoted, Some(canary.run), Some(&canary.version), detail);
            } else {
                act.metrics.rollout_rollbacks.inc();
                if let Some(record) = act.run_mut(canary.run) {
                    record.outcome = RunOutcome::RolledBack;
                    record.detail = Some(detail.clone());
                }
                act.record(LoopStep::RolledBack, Some(canary.run), Some(&canary.version), detail);
            }
        }));
    }

    /// A version serves everyone without a canary's promotion (a manual switch, an experiment's
    /// end, a rollback): the monitor judges drift against its own traffic from here (an empty
    /// training reference falls back to the version's first full window).
    fn serving_switched(&self, version: &str) {
        self.monitor.do_send(SetReference::serving(version.to_owned()));
    }

    /// Bookkeeping of a new version serving everyone.
    pub(super) fn adopt(&mut self, name: String, displaced: Option<Box<dyn Recommender>>) {
        self.metrics.rollout_promotions.inc();
        self.registry.record_serving(&name);
        let old = self.serving_name.replace(name);
        if let Some(model) = displaced {
            self.previous = Some(Kept { model, name: old });
        }
    }
}

impl Handler<Promote> for TrainerActor {
    type Result = ResponseActFuture<Self, Result<Promoted, TrainerError>>;

    fn handle(&mut self, msg: Promote, ctx: &mut Self::Context) -> Self::Result {
        if self.clustered() {
            self.settle_takeover(ctx);
            return self.cluster_promote(msg);
        }
        let canary_name = match &self.phase {
            Phase::Canary(c) => Some(c.name.clone()),
            _ => None,
        };
        // The canary, by default or by name.
        if let Some(canary_name) = canary_name.filter(|n| msg.name.is_none() || msg.name.as_ref() == Some(n)) {
            let version = match &self.phase {
                Phase::Canary(c) => c.version.clone(),
                _ => String::new(),
            };
            self.end_canary(true, format!("manual: {}", msg.reason), ctx);
            return Box::pin(fut::ready(Ok(Promoted { promoted: canary_name, serving: version })));
        }
        if let Phase::Experiment(e) = &self.phase {
            if msg.name.is_none() || msg.name.as_deref() == Some(e.b.name.as_str()) {
                let NamedVersion { name, version } = e.b.clone();
                self.phase = Phase::Idle;
                let done = self.model.send(EndChallenger { promote: true });
                return Box::pin(done.into_actor(self).map(move |displaced, act, _| {
                    act.metrics.set_challenger_share(0.0);
                    act.adopt(name.clone(), displaced.ok().flatten());
                    act.serving_switched(&version);
                    act.record(LoopStep::Promoted, None, Some(&version), "experiment ended: b promoted".into());
                    Ok(Promoted { promoted: name, serving: version })
                }));
            }
        }
        let Some(name) = msg.name else {
            return Box::pin(fut::ready(Err(TrainerError::NothingToPromote)));
        };
        if matches!(self.phase, Phase::Training { .. } | Phase::Waiting { .. } | Phase::Experiment(_)) {
            return Box::pin(fut::ready(Err(TrainerError::Busy {
                action: "switch versions",
                phase: self.loop_phase(),
            })));
        }
        let load = self.load_versions(vec![name.clone()]);
        Box::pin(load.into_actor(self).then(move |loaded, act, ctx| {
            let step: actix::fut::LocalBoxActorFuture<Self, Result<Promoted, TrainerError>> = match loaded {
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
                        act.serving_switched(&version);
                        act.record(LoopStep::Promoted, None, Some(&version), format!("manual: {}", msg.reason));
                        Ok(Promoted { promoted: name, serving: version })
                    }))
                }
            };
            step
        }))
    }
}

impl Handler<Rollback> for TrainerActor {
    type Result = ResponseActFuture<Self, Result<RolledBack, TrainerError>>;

    fn handle(&mut self, msg: Rollback, ctx: &mut Self::Context) -> Self::Result {
        if self.clustered() {
            self.settle_takeover(ctx);
            return self.cluster_rollback(msg);
        }
        match &self.phase {
            Phase::Canary(c) => {
                let (version, c_incumbent) = (c.version.clone(), c.incumbent.clone());
                self.end_canary(false, format!("manual: {}", msg.reason), ctx);
                return Box::pin(fut::ready(Ok(RolledBack::Canary { rolled_back: version, serving: c_incumbent })));
            }
            Phase::Experiment(_) => {
                let stopped = self.stop_experiment("rolled back by an operator");
                return Box::pin(stopped.map(|stopped, _, _| stopped.map(RolledBack::To)));
            }
            Phase::Training { .. } | Phase::Waiting { .. } | Phase::Idle => {}
        }
        let Some(Kept { model, name }) = self.previous.take() else {
            return Box::pin(fut::ready(Err(TrainerError::NothingToRollBack)));
        };
        let version = model.version().to_owned();
        let swap = self.model.send(SwapModel { model });
        Box::pin(swap.into_actor(self).map(move |displaced, act, _| {
            act.metrics.rollout_rollbacks.inc();
            let from = act.serving_name.take();
            if let Some(name) = &name {
                act.registry.record_serving(name);
            }
            act.serving_name = name.clone();
            if let Some(displaced) = displaced.ok().flatten() {
                act.previous = Some(Kept { model: displaced, name: from });
            }
            act.serving_switched(&version);
            act.record(
                LoopStep::RolledBack,
                None,
                Some(&version),
                format!("manual: back to the previous version; {}", msg.reason),
            );
            Ok(RolledBack::To(NowServing { serving: version, name }))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout() -> RolloutConfig {
        RolloutConfig { min_impressions: 100, z_threshold: 2.0, max_secs: 600, ..RolloutConfig::default() }
    }

    fn tally(impressions: u64, clicks: u64) -> ArmTally {
        ArmTally { impressions, clicks }
    }

    #[test]
    fn a_canary_waits_for_impressions_on_both_arms() {
        let verdict = canary_verdict(tally(500, 50), tally(99, 0), &rollout(), Duration::from_secs(10));
        assert_eq!(verdict, CanaryVerdict::Wait);
    }

    #[test]
    fn a_canary_no_worse_than_the_incumbent_is_promoted() {
        let verdict = canary_verdict(tally(1000, 100), tally(1000, 98), &rollout(), Duration::from_secs(10));
        assert!(matches!(&verdict, CanaryVerdict::Promote(why) if why.ends_with("not worse")), "{verdict:?}");
    }

    #[test]
    fn a_clearly_worse_canary_is_rolled_back() {
        let verdict = canary_verdict(tally(2000, 200), tally(2000, 100), &rollout(), Duration::from_secs(10));
        assert!(matches!(&verdict, CanaryVerdict::RollBack(why) if why.ends_with(": worse")), "{verdict:?}");
    }

    #[test]
    fn a_canary_without_a_verdict_in_time_is_rolled_back() {
        let verdict = canary_verdict(tally(500, 50), tally(20, 2), &rollout(), Duration::from_secs(600));
        assert!(
            matches!(&verdict, CanaryVerdict::RollBack(why) if why.starts_with("no verdict within rollout.max_secs")),
            "{verdict:?}"
        );
    }
}
