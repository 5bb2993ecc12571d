//! The `[catalog]` section: how large the item catalogue may grow, and what events may add to it.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// Whether an event may name an item the catalogue does not hold (it is then added without
    /// attributes). False: such an event is refused (`422 unknown_item`; Kafka: dead letter).
    #[serde(default = "accept_unknown_items")]
    pub accept_unknown_items: bool,
    /// Most items known only from events (never put into the catalogue); an event naming one
    /// more is refused (`422 too_many_unknown_items`; Kafka: dead letter). 0: no limit.
    #[serde(default = "max_event_items")]
    pub max_event_items: usize,
    /// Most items in the catalogue (put and not deleted); putting one more is refused
    /// (`422 catalog_full`; Kafka: dead letter). Replacing or deleting an item always passes.
    /// 0: no limit.
    #[serde(default = "max_items")]
    pub max_items: usize,
}

fn accept_unknown_items() -> bool {
    true
}

fn max_event_items() -> usize {
    100_000
}

fn max_items() -> usize {
    10_000_000
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self {
            accept_unknown_items: accept_unknown_items(),
            max_event_items: max_event_items(),
            max_items: max_items(),
        }
    }
}
