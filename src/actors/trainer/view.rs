//! The loop's state as the admin API shows it (`GET /v1/admin/models`, `GET /v1/admin/experiments`):
//! a typed, serialisable snapshot built for HTTP. The actor builds it from its own state and never
//! reads it back.

use serde::Serialize;

use super::state::{CanaryState, ExperimentState, HistoryEntry, LoopPhase, NamedVersion, Phase, RunRecord, Variant};
use super::TrainerActor;
use crate::actors::monitor::ArmCounts;
use crate::actors::monitor::GetCounts;
use crate::cluster::record::DesiredState;
use crate::monitor::{arm_since, two_proportion_z, wilson, Arm, ArmTally, Rate};
use actix::prelude::*;

/// The state of the closed loop.
#[derive(Debug, Clone, Serialize)]
pub struct LoopState {
    /// What the loop is doing: `idle`, `waiting_for_data`, `training`, `canary` or `experiment`.
    pub state: LoopPhase,
    /// Registry name of the version serving everyone (none for the online model).
    pub serving_name: Option<String>,
    /// The version displaced by the last promotion, kept for an instant rollback.
    pub previous: Option<VersionRef>,
    /// The run being trained or waiting for fresh events.
    pub training: Option<TrainingView>,
    pub canary: Option<CanaryView>,
    pub experiment: Option<ExperimentView>,
    /// Recent runs, newest first.
    pub runs: Vec<RunRecord>,
    /// Recent steps of the loop, newest first.
    pub history: Vec<HistoryEntry>,
    pub settings: LoopSettings,
    /// Production mode: who leads the loop and the desired serving state (absent in the
    /// embedded mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterView>,
}

/// The loop across instances, as this instance sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterView {
    /// This instance's `cluster.instance_id`.
    pub instance_id: String,
    /// Whether this instance leads (trains and judges canaries).
    pub leader: bool,
    /// The leader's epoch (fencing token), instance id and advertised URL; absent while no
    /// instance holds the lease.
    pub epoch: Option<u64>,
    pub leader_instance_id: Option<String>,
    pub leader_advertise_url: Option<String>,
    /// The newest desired serving state read from the control topic.
    pub desired: Option<DesiredState>,
}

/// A model version, with its registry name when it has one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionRef {
    pub version: String,
    pub name: Option<String>,
}

/// A run in training, or waiting for fresh events before it trains.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainingView {
    pub run: u64,
    /// Events still to be logged before a waiting run starts (absent once training).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for_events: Option<u64>,
}

/// One arm of a canary or experiment, counted since it started.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArmView {
    pub variant: String,
    pub version: String,
    /// Share of users the arm serves.
    pub share: f64,
    pub impressions: u64,
    pub clicks: u64,
    /// Click-through rate with its 95 % Wilson interval.
    pub ctr: Rate,
}

/// The running canary against the incumbent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CanaryView {
    pub run: u64,
    pub name: String,
    pub version: String,
    pub incumbent: String,
    pub started_at_ms: i64,
    /// The control arm (the incumbent), then the canary.
    pub arms: Vec<ArmView>,
    /// Two-proportion z of the CTRs, positive when the incumbent's is higher.
    pub z: f64,
}

/// The running A/B experiment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExperimentView {
    pub a: NamedVersion,
    pub b: NamedVersion,
    pub started_at_ms: i64,
    /// Arm `a`, then arm `b`.
    pub variants: Vec<ArmView>,
    /// Two-proportion z of the CTRs, positive when b's is higher.
    pub z_b_minus_a: f64,
}

/// The settings that steer the loop's verdicts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoopSettings {
    pub trainer_enabled: bool,
    pub gate_min_gain: f64,
    pub canary_share: f64,
    pub min_impressions: u64,
    pub z_threshold: f64,
    pub max_secs: u64,
}

/// An arm's counts since `baseline` was read, with its share of users.
fn arm_view(counts: &ArmCounts, baseline: &ArmCounts, version: &str, variant: Variant, share: f64) -> ArmView {
    let ArmTally { impressions: n, clicks } = arm_since(counts, baseline, &Arm::new(version, variant.as_str()));
    ArmView {
        variant: variant.as_str().to_owned(),
        version: version.to_owned(),
        share,
        impressions: n,
        clicks,
        ctr: wilson(clicks, n),
    }
}

fn canary_view(c: &CanaryState, counts: &ArmCounts) -> CanaryView {
    let control = arm_view(counts, &c.baseline, &c.incumbent, Variant::Control, 1.0 - c.share);
    let canary = arm_view(counts, &c.baseline, &c.version, Variant::Canary, c.share);
    let z = two_proportion_z(control.clicks, control.impressions, canary.clicks, canary.impressions);
    CanaryView {
        run: c.run,
        name: c.name.clone(),
        version: c.version.clone(),
        incumbent: c.incumbent.clone(),
        started_at_ms: c.started_at_ms,
        arms: vec![control, canary],
        z,
    }
}

fn experiment_view(e: &ExperimentState, counts: &ArmCounts) -> ExperimentView {
    let a = arm_view(counts, &e.baseline, &e.a.version, Variant::A, 1.0 - e.share);
    let b = arm_view(counts, &e.baseline, &e.b.version, Variant::B, e.share);
    let z_b_minus_a = two_proportion_z(b.clicks, b.impressions, a.clicks, a.impressions);
    ExperimentView { a: e.a.clone(), b: e.b.clone(), started_at_ms: e.started_at_ms, variants: vec![a, b], z_b_minus_a }
}

impl TrainerActor {
    /// The loop's state, with canary and experiment arms counted from `counts` (the monitor's).
    pub(super) fn state(&self, counts: &ArmCounts) -> LoopState {
        let training = match &self.phase {
            Phase::Training { run } => Some(TrainingView { run: *run, waiting_for_events: None }),
            Phase::Waiting { run, from, .. } => Some(TrainingView {
                run: *run,
                waiting_for_events: Some(match (from, self.source.produced_now().or(self.produced)) {
                    (Some(from), Some(now)) => (from + self.config.fresh_events).saturating_sub(now),
                    _ => self.config.fresh_events,
                }),
            }),
            _ => None,
        };
        LoopState {
            state: self.loop_phase(),
            serving_name: self.serving_name.clone(),
            previous: match &self.cluster {
                Some(_) => self
                    .cluster_current()
                    .previous
                    .map(|previous| VersionRef { version: previous.version, name: previous.name }),
                None => self
                    .previous
                    .as_ref()
                    .map(|kept| VersionRef { version: kept.model.version().to_owned(), name: kept.name.clone() }),
            },
            training,
            canary: match &self.phase {
                Phase::Canary(c) => Some(canary_view(c, counts)),
                _ => None,
            },
            experiment: match &self.phase {
                Phase::Experiment(e) => Some(experiment_view(e, counts)),
                _ => None,
            },
            runs: self.runs.iter().rev().cloned().collect(),
            history: self.history.iter().rev().cloned().collect(),
            settings: LoopSettings {
                trainer_enabled: self.config.enabled,
                gate_min_gain: self.config.gate_min_gain,
                canary_share: self.rollout.canary_share,
                min_impressions: self.rollout.min_impressions,
                z_threshold: self.rollout.z_threshold,
                max_secs: self.rollout.max_secs,
            },
            cluster: self.cluster.as_ref().map(|cluster| {
                let leader = cluster.leadership().leader;
                ClusterView {
                    instance_id: cluster.instance_id.clone(),
                    leader: self.leading,
                    epoch: leader.as_ref().map(|l| l.epoch),
                    leader_instance_id: leader.as_ref().map(|l| l.instance_id.clone()),
                    leader_advertise_url: leader.map(|l| l.advertise_url),
                    desired: self.desired.clone(),
                }
            }),
        }
    }
}

/// The state of the loop, for `GET /v1/admin/models` and `GET /v1/admin/experiments`.
#[derive(Message, Debug)]
#[rtype(result = "LoopState")]
pub struct GetLoopState;

impl Handler<GetLoopState> for TrainerActor {
    type Result = ResponseActFuture<Self, LoopState>;

    fn handle(&mut self, _msg: GetLoopState, _ctx: &mut Self::Context) -> Self::Result {
        Box::pin(
            self.monitor.send(GetCounts).into_actor(self).map(|counts, act, _| act.state(&counts.unwrap_or_default())),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde_json::json;

    use super::*;
    use crate::monitor::drift::DriftReference;
    use crate::recs::CONTROL;

    fn counts(entries: &[(&str, &str, u64, u64)]) -> ArmCounts {
        entries.iter().map(|&(v, a, n, c)| (Arm::new(v, a), ArmTally { impressions: n, clicks: c })).collect()
    }

    // The JSON the admin API served before the view was typed (a `json!` literal then): the
    // same keys and value types, so clients and dashboards read it unchanged.
    #[test]
    fn the_canary_view_keeps_its_json_shape() {
        let canary = CanaryState {
            run: 3,
            name: "auto-1-3".into(),
            version: "v-new".into(),
            incumbent: "v-old".into(),
            started: Instant::now(),
            started_at_ms: 1_700_000_000_000,
            share: 0.25,
            baseline: counts(&[("v-old", CONTROL, 10, 1)]),
            reference: DriftReference::default(),
        };
        let now = counts(&[("v-old", CONTROL, 110, 11), ("v-new", "canary", 40, 2)]);
        let view = serde_json::to_value(canary_view(&canary, &now)).expect("serialises");
        let z = two_proportion_z(10, 100, 2, 40);
        assert_eq!(
            view,
            json!({
                "run": 3,
                "name": "auto-1-3",
                "version": "v-new",
                "incumbent": "v-old",
                "started_at_ms": 1_700_000_000_000i64,
                "arms": [
                    { "variant": CONTROL, "version": "v-old", "share": 0.75, "impressions": 100, "clicks": 10,
                      "ctr": wilson(10, 100) },
                    { "variant": "canary", "version": "v-new", "share": 0.25, "impressions": 40, "clicks": 2,
                      "ctr": wilson(2, 40) },
                ],
                "z": z,
            })
        );
    }

    #[test]
    fn the_experiment_view_keeps_its_json_shape() {
        let experiment = ExperimentState {
            a: NamedVersion { name: "v1".into(), version: "ver-a".into() },
            b: NamedVersion { name: "v2".into(), version: "ver-b".into() },
            share: 0.5,
            started_at_ms: 42,
            baseline: ArmCounts::new(),
        };
        let now = counts(&[("ver-a", "a", 200, 20), ("ver-b", "b", 180, 27)]);
        let view = serde_json::to_value(experiment_view(&experiment, &now)).expect("serialises");
        assert_eq!(
            view,
            json!({
                "a": { "name": "v1", "version": "ver-a" },
                "b": { "name": "v2", "version": "ver-b" },
                "started_at_ms": 42,
                "variants": [
                    { "variant": "a", "version": "ver-a", "share": 0.5, "impressions": 200, "clicks": 20,
                      "ctr": wilson(20, 200) },
                    { "variant": "b", "version": "ver-b", "share": 0.5, "impressions": 180, "clicks": 27,
                      "ctr": wilson(27, 180) },
                ],
                "z_b_minus_a": two_proportion_z(27, 180, 20, 200),
            })
        );
    }

    #[test]
    fn a_phase_is_named_alike_in_the_view_and_in_refusals() {
        for phase in
            [LoopPhase::Idle, LoopPhase::WaitingForData, LoopPhase::Training, LoopPhase::Canary, LoopPhase::Experiment]
        {
            assert_eq!(serde_json::to_value(phase).expect("serialises"), json!(phase.to_string()));
        }
        assert_eq!(LoopPhase::WaitingForData.to_string(), "waiting_for_data");
    }

    #[test]
    fn a_training_run_shows_waiting_events_only_while_it_waits() {
        let training = TrainingView { run: 1, waiting_for_events: None };
        assert_eq!(serde_json::to_value(training).expect("serialises"), json!({ "run": 1 }));
        let waiting = TrainingView { run: 2, waiting_for_events: Some(7) };
        assert_eq!(serde_json::to_value(waiting).expect("serialises"), json!({ "run": 2, "waiting_for_events": 7 }));
    }
}
