//! The desired serving state: the one record of the control topic (key [`RECORD_KEY`], JSON
//! value). The leader publishes a new one for every change of what serves (promotion, canary
//! start and end, experiment start and stop, rollback, manual activation) and for the steps of a
//! training run a successor must know of; every instance applies the newest it has read.

use serde::{Deserialize, Serialize};

/// The key of every control record: compaction keeps the newest one only.
pub const RECORD_KEY: &str = "serving";

/// A registry version serving (or the online model, which has no registry name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServingVersion {
    /// The registry name; none for the online (co-occurrence) model.
    pub name: Option<String>,
    /// The version every list reports (`model_version`).
    pub version: String,
}

/// A challenger serving a share of users: a canary, or arm `b` of an experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChallengerState {
    pub name: String,
    pub version: String,
    /// The variant its users are labelled with (`canary`, `b`).
    pub variant: String,
    /// The variant of the other users (`control`, `a`).
    pub control_variant: String,
    /// Share of users it serves.
    pub share: f64,
    /// Salt of the split: the same on every instance, so the same users get the challenger.
    pub salt: u64,
}

/// How far a training run has come, as a successor needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunPhase {
    WaitingForData,
    Training,
    Canary,
    Promoted,
    RolledBack,
    Rejected,
    Failed,
}

impl RunPhase {
    /// A run in this phase still needs a leader's work.
    pub fn in_progress(self) -> bool {
        matches!(self, RunPhase::WaitingForData | RunPhase::Training | RunPhase::Canary)
    }
}

/// The latest training run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    pub id: u64,
    pub reason: String,
    pub phase: RunPhase,
    /// Times the run was started again by a new leader (at most once).
    #[serde(default)]
    pub restarts: u32,
}

/// What the leader wants every instance to serve (the record's value).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    /// The lease's fencing token when it was published: a record with an epoch below the highest
    /// one seen is ignored by every instance.
    pub epoch: u64,
    /// Increases with every record (across leaders).
    pub seq: u64,
    /// The `cluster.instance_id` of the leader that published it.
    pub leader: String,
    pub at_ms: i64,
    /// The version serving every user outside a challenger's share.
    pub control: ServingVersion,
    pub challenger: Option<ChallengerState>,
    pub run: Option<RunState>,
    /// The version the last promotion displaced: where a rollback goes.
    #[serde(default)]
    pub previous: Option<ServingVersion>,
}

/// What the leader changes: a [`DesiredState`] without the fields publishing fills in.
#[derive(Clone, Debug, PartialEq)]
pub struct StateChange {
    pub control: ServingVersion,
    pub challenger: Option<ChallengerState>,
    pub run: Option<RunState>,
    pub previous: Option<ServingVersion>,
}

impl From<DesiredState> for StateChange {
    fn from(state: DesiredState) -> Self {
        StateChange { control: state.control, challenger: state.challenger, run: state.run, previous: state.previous }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BadControlRecord {
    #[error("a control record without a value")]
    Empty,
    #[error("a control record that is not a desired state: {0}")]
    Malformed(String),
}

/// The record's value.
pub fn encode(state: &DesiredState) -> Vec<u8> {
    serde_json::to_vec(state).expect("a desired state always serialises")
}

pub fn decode(value: Option<&[u8]>) -> Result<DesiredState, BadControlRecord> {
    let value = value.ok_or(BadControlRecord::Empty)?;
    serde_json::from_slice(value).map_err(|e| BadControlRecord::Malformed(e.to_string()))
}

/// Whether a record is fenced: its epoch is below the highest one already seen.
pub fn fenced(state: &DesiredState, highest_epoch: u64) -> bool {
    state.epoch < highest_epoch
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn state() -> DesiredState {
        DesiredState {
            epoch: 3,
            seq: 7,
            leader: "a".into(),
            at_ms: 1,
            control: ServingVersion { name: Some("v1".into()), version: "sasrec-1".into() },
            challenger: Some(ChallengerState {
                name: "v2".into(),
                version: "sasrec-2".into(),
                variant: "canary".into(),
                control_variant: "control".into(),
                share: 0.1,
                salt: 99,
            }),
            run: Some(RunState { id: 4, reason: "drift".into(), phase: RunPhase::Canary, restarts: 0 }),
            previous: None,
        }
    }

    #[test]
    fn a_record_round_trips_and_keeps_its_wire_shape() {
        let bytes = encode(&state());
        assert_eq!(decode(Some(&bytes)).expect("decodes"), state());
        let value: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(value["control"], json!({ "name": "v1", "version": "sasrec-1" }));
        assert_eq!(value["challenger"]["salt"], json!(99));
        assert_eq!(value["run"], json!({ "id": 4, "reason": "drift", "phase": "canary", "restarts": 0 }));
        assert!(matches!(decode(None), Err(BadControlRecord::Empty)));
        assert!(matches!(decode(Some(b"{}")), Err(BadControlRecord::Malformed(_))));
    }

    #[test]
    fn an_older_epoch_is_fenced_and_the_same_or_newer_is_not() {
        let record = state();
        assert!(fenced(&record, 4));
        assert!(!fenced(&record, 3));
        assert!(!fenced(&record, 2));
    }
}
