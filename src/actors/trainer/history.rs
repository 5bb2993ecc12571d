//! The loop's memory: a record of every training run and what became of it, and the history of
//! every step, both capped and shown newest first in the admin view.

use serde::Serialize;

use super::{Drill, RequestRetrain, TrainerActor, TriggerSource};
use crate::event::now_ms;

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

const KEPT: usize = 50;

impl TrainerActor {
    pub(super) fn record(&mut self, step: LoopStep, run: Option<u64>, version: Option<&str>, detail: String) {
        tracing::info!(step = step.as_str(), run, version, detail = %detail, "model lifecycle");
        self.history.push_back(HistoryEntry {
            at_ms: now_ms(),
            step,
            run,
            version: version.map(str::to_owned),
            detail,
        });
        while self.history.len() > KEPT * 4 {
            self.history.pop_front();
        }
    }

    pub(super) fn run_mut(&mut self, run: u64) -> Option<&mut RunRecord> {
        self.runs.iter_mut().find(|r| r.run == run)
    }

    pub(super) fn push_run(&mut self, run: u64, request: &RequestRetrain, outcome: RunOutcome) {
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
            outcome,
            detail: None,
        });
        while self.runs.len() > KEPT {
            self.runs.pop_front();
        }
    }
}
