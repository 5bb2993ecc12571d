//! The `[demo]` section: the embedded demo's catalogue and warm-up.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoConfig {
    pub enabled: bool,
    pub items: usize,
    pub users: usize,
    pub seed: u64,
}
