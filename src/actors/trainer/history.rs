//! The loop's memory: a record of every training run and what became of it, and the history of
//! every step, both capped and shown newest first in the admin view.

use super::state::{HistoryEntry, LoopStep, RequestRetrain, RunOutcome, RunRecord};
use super::TrainerActor;
use crate::event::now_ms;

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
