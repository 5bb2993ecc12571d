//! The loop's state as the admin API shows it.

use serde_json::{json, Value};

use super::{Phase, TrainerActor};
use crate::actors::model::CONTROL;
use crate::actors::monitor::ArmCounts;
use crate::monitor::{two_proportion_z, wilson};

impl TrainerActor {
    fn arm_report(counts: &ArmCounts, baseline: &ArmCounts, version: &str, variant: &str, share: f64) -> Value {
        let key = (version.to_owned(), variant.to_owned());
        let now = counts.get(&key).copied().unwrap_or_default();
        let then = baseline.get(&key).copied().unwrap_or_default();
        let (n, clicks) = (now.0.saturating_sub(then.0), now.1.saturating_sub(then.1));
        json!({
            "variant": variant,
            "version": version,
            "share": share,
            "impressions": n,
            "clicks": clicks,
            "ctr": wilson(clicks, n),
        })
    }

    pub(super) fn state(&self, counts: &ArmCounts) -> Value {
        let canary = match &self.phase {
            Phase::Canary(c) => {
                let ((cn, cc), (kn, kc)) = Self::canary_arms(c, counts);
                json!({
                    "run": c.run,
                    "name": c.name,
                    "version": c.version,
                    "incumbent": c.incumbent,
                    "started_at_ms": c.started_at_ms,
                    "arms": [
                        Self::arm_report(counts, &c.baseline, &c.incumbent, CONTROL, 1.0 - c.share),
                        Self::arm_report(counts, &c.baseline, &c.version, "canary", c.share),
                    ],
                    "z": two_proportion_z(cc, cn, kc, kn),
                })
            }
            _ => Value::Null,
        };
        let experiment = match &self.phase {
            Phase::Experiment(e) => {
                let a = Self::arm_report(counts, &e.baseline, &e.a.1, "a", 1.0 - e.share);
                let b = Self::arm_report(counts, &e.baseline, &e.b.1, "b", e.share);
                let get = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
                // Positive when b's CTR is higher.
                let z = two_proportion_z(
                    get(&b, "clicks"),
                    get(&b, "impressions"),
                    get(&a, "clicks"),
                    get(&a, "impressions"),
                );
                json!({
                    "a": { "name": e.a.0, "version": e.a.1 },
                    "b": { "name": e.b.0, "version": e.b.1 },
                    "started_at_ms": e.started_at_ms,
                    "variants": [a, b],
                    "z_b_minus_a": z,
                })
            }
            _ => Value::Null,
        };
        let training = match &self.phase {
            Phase::Training { run } => json!({ "run": run }),
            Phase::Waiting { run, from, .. } => json!({
                "run": run,
                "waiting_for_events": (from + self.config.fresh_events).saturating_sub(self.log.appended()),
            }),
            _ => Value::Null,
        };
        json!({
            "state": self.phase_name(),
            "serving_name": self.serving_name,
            "previous": self.previous.as_ref().map(|(m, name)| json!({ "version": m.version(), "name": name })),
            "training": training,
            "canary": canary,
            "experiment": experiment,
            "runs": self.runs.iter().rev().collect::<Vec<_>>(),
            "history": self.history.iter().rev().collect::<Vec<_>>(),
            "settings": {
                "trainer_enabled": self.config.enabled,
                "gate_min_gain": self.config.gate_min_gain,
                "canary_share": self.rollout.canary_share,
                "min_impressions": self.rollout.min_impressions,
                "z_threshold": self.rollout.z_threshold,
                "max_secs": self.rollout.max_secs,
            },
        })
    }
}
