//! The loop's answers to an operator's promotion, rollback and experiment requests, as the admin
//! API returns them.

use serde::Serialize;

/// The answer to a promotion: which name now serves, as which version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Promoted {
    pub promoted: String,
    pub serving: String,
}

/// The version serving everyone after a stop or a rollback, with its registry name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NowServing {
    pub serving: String,
    pub name: Option<String>,
}

/// The answer to a rollback.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum RolledBack {
    /// The canary was rolled back; the incumbent serves on.
    Canary { rolled_back: String, serving: String },
    /// The experiment was stopped, or the previous version serves again.
    To(NowServing),
}

/// The answer to starting an experiment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExperimentStarted {
    pub started: ExperimentArms,
}

/// The registry names of an experiment's arms and the share of users `b` serves.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExperimentArms {
    pub a: String,
    pub b: String,
    pub share: f64,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_answers_to_operators_keep_their_json_shape() {
        let promoted = Promoted { promoted: "v2".into(), serving: "ver-2".into() };
        assert_eq!(
            serde_json::to_value(promoted).expect("serialises"),
            json!({ "promoted": "v2", "serving": "ver-2" })
        );
        let canary = RolledBack::Canary { rolled_back: "ver-2".into(), serving: "ver-1".into() };
        assert_eq!(
            serde_json::to_value(canary).expect("serialises"),
            json!({ "rolled_back": "ver-2", "serving": "ver-1" })
        );
        let back = RolledBack::To(NowServing { serving: "ver-1".into(), name: None });
        assert_eq!(serde_json::to_value(back).expect("serialises"), json!({ "serving": "ver-1", "name": null }));
        let started = ExperimentStarted { started: ExperimentArms { a: "v1".into(), b: "v2".into(), share: 0.5 } };
        assert_eq!(
            serde_json::to_value(started).expect("serialises"),
            json!({ "started": { "a": "v1", "b": "v2", "share": 0.5 } })
        );
    }
}
