//! The loop's state and the types its files share: the phase the loop is in (idle, waiting for
//! data, training, canary, experiment), the trigger messages and their errors, the variants of
//! the traffic split, and the records of runs and steps. Every other file of the trainer reads
//! these; this file names none of them.

use std::time::Instant;

use actix::prelude::*;
use serde::Serialize;

use crate::models::registry;
use crate::models::retrain::Drill;
use crate::models::Recommender;
use crate::monitor::drift::DriftReference;
use crate::monitor::ArmCounts;
use crate::recs::CONTROL;

/// Where a retraining request came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerSource {
    Monitor,
    Schedule,
    Admin,
    /// A new leader restarting the run its predecessor left in training.
    Failover,
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

/// Why the loop refused or failed an operator's request. The wording is the loop's own; the HTTP
/// layer chooses the status, the code and any route to suggest.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error("retraining is disabled (trainer.enabled = false)")]
    Disabled,
    #[error("an experiment is running; stop it before retraining")]
    ExperimentRunning,
    #[error("no canary or experiment to promote; name a version to promote")]
    NothingToPromote,
    /// Another step of the loop is in progress (`phase` names it).
    #[error("cannot {action} while {phase}")]
    Busy { action: &'static str, phase: LoopPhase },
    #[error("the loop became busy meanwhile")]
    BecameBusy,
    #[error("nothing to roll back: no canary, no experiment, and no earlier version kept since start")]
    NothingToRollBack,
    #[error("no experiment is running")]
    NoExperiment,
    #[error("an experiment needs two different versions and a share of users for b strictly between 0 and 1")]
    InvalidExperiment,
    /// The version asked for is not in the registry (or its name is not a valid one).
    #[error(transparent)]
    Version(registry::RegistryError),
    /// The version is in the registry but cannot be loaded.
    #[error(transparent)]
    Unreadable(registry::RegistryError),
    /// The loading thread stopped before it answered.
    #[error("loading stopped: {0}")]
    LoadStopped(String),
    /// Production mode: another instance leads the loop (`leader`, when known).
    #[error("this instance does not lead the loop{}", leader.as_ref().map(|l| format!("; the leader is {} (epoch {})", l.instance_id, l.epoch)).unwrap_or_default())]
    NotLeader { leader: Option<crate::cluster::lease::Holder> },
    /// Production mode: the control topic did not take the new desired state.
    #[error("the serving state could not be published: {0}")]
    Control(String),
}

impl From<crate::cluster::ClusterError> for TrainerError {
    fn from(error: crate::cluster::ClusterError) -> Self {
        match error {
            crate::cluster::ClusterError::NotLeader { leader } => TrainerError::NotLeader { leader },
            crate::cluster::ClusterError::Publish(message) => TrainerError::Control(message),
        }
    }
}

/// The experiment variants the loop names in the traffic split (their wire form is a string).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Users outside any canary or experiment, and the incumbent's arm of a canary.
    Control,
    Canary,
    /// The arms of an A/B experiment.
    A,
    B,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Control => CONTROL,
            Variant::Canary => "canary",
            Variant::A => "a",
            Variant::B => "b",
        }
    }
}

pub(super) enum Phase {
    Idle,
    /// A drift alarm came in; the run starts once `from + fresh_events` events are produced
    /// (`from` is unknown until the first count when the source must ask the broker).
    Waiting {
        run: u64,
        from: Option<u64>,
        request: RequestRetrain,
    },
    Training {
        run: u64,
    },
    Canary(CanaryState),
    Experiment(ExperimentState),
}

/// What the loop is doing, as the admin view and the loop's refusals name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoopPhase {
    Idle,
    /// A drift alarm came in; the run waits for fresh events.
    WaitingForData,
    Training,
    Canary,
    Experiment,
}

impl std::fmt::Display for LoopPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoopPhase::Idle => "idle",
            LoopPhase::WaitingForData => "waiting_for_data",
            LoopPhase::Training => "training",
            LoopPhase::Canary => "canary",
            LoopPhase::Experiment => "experiment",
        })
    }
}

/// The model displaced by the last promotion, kept for an instant rollback.
pub(super) struct Kept {
    pub(super) model: Box<dyn Recommender>,
    /// Its registry name (none for the online model).
    pub(super) name: Option<String>,
}

/// An arm of an experiment: a registry name and the version it holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NamedVersion {
    pub name: String,
    pub version: String,
}

pub(super) struct ExperimentState {
    pub(super) a: NamedVersion,
    pub(super) b: NamedVersion,
    pub(super) share: f64,
    pub(super) started_at_ms: i64,
    pub(super) baseline: ArmCounts,
}

pub(super) struct CanaryState {
    pub(super) run: u64,
    pub(super) name: String,
    pub(super) version: String,
    pub(super) incumbent: String,
    pub(super) started: Instant,
    pub(super) started_at_ms: i64,
    pub(super) share: f64,
    pub(super) baseline: ArmCounts,
    pub(super) reference: DriftReference,
}

/// A step of the loop, as the history names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoopStep {
    TriggerIgnored,
    TriggerCoalesced,
    WaitingForData,
    TrainingStarted,
    TrainingFailed,
    GatePassed,
    GateRejected,
    GateSkipped,
    CanaryStarted,
    Promoted,
    RolledBack,
    ExperimentStarted,
    ExperimentStopped,
    /// Production mode: this instance took the loop's lease, or lost it.
    LeadershipTaken,
    LeadershipLost,
}

impl LoopStep {
    /// The name the history and the log give the step.
    pub fn as_str(self) -> &'static str {
        match self {
            LoopStep::TriggerIgnored => "trigger_ignored",
            LoopStep::TriggerCoalesced => "trigger_coalesced",
            LoopStep::WaitingForData => "waiting_for_data",
            LoopStep::TrainingStarted => "training_started",
            LoopStep::TrainingFailed => "training_failed",
            LoopStep::GatePassed => "gate_passed",
            LoopStep::GateRejected => "gate_rejected",
            LoopStep::GateSkipped => "gate_skipped",
            LoopStep::CanaryStarted => "canary_started",
            LoopStep::Promoted => "promoted",
            LoopStep::RolledBack => "rolled_back",
            LoopStep::ExperimentStarted => "experiment_started",
            LoopStep::ExperimentStopped => "experiment_stopped",
            LoopStep::LeadershipTaken => "leadership_taken",
            LoopStep::LeadershipLost => "leadership_lost",
        }
    }
}

/// What became of a training run (so far).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// Waiting for fresh events after a drift alarm.
    WaitingForData,
    Training,
    /// The gate turned the candidate down.
    Rejected,
    Failed,
    /// Serving its share of users while the canary is judged.
    Canary,
    Promoted,
    RolledBack,
}

/// One training run and what became of it, as the admin view lists it.
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    pub run: u64,
    pub reasons: Vec<String>,
    pub sources: Vec<TriggerSource>,
    pub drill: Drill,
    pub started_at_ms: i64,
    pub seconds: Option<f64>,
    pub events: Option<usize>,
    pub users: Option<usize>,
    pub cases: Option<usize>,
    pub candidate_ndcg10: Option<f64>,
    pub incumbent_ndcg10: Option<f64>,
    pub yardstick: Option<String>,
    pub warm_started: Option<bool>,
    pub name: Option<String>,
    pub version: Option<String>,
    pub outcome: RunOutcome,
    pub detail: Option<String>,
}

/// One step of the loop (trigger, training, gate, canary, promotion, rollback), for the history.
#[derive(Clone, Debug, Serialize)]
pub struct HistoryEntry {
    pub at_ms: i64,
    pub step: LoopStep,
    pub run: Option<u64>,
    pub version: Option<String>,
    pub detail: String,
}
