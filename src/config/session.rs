//! The `[session]` section: what each user's session keeps.

use serde::{Deserialize, Serialize};

use crate::event::EventType;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// Interactions kept per user.
    pub history_len: usize,
    /// Recent event ids remembered per user for de-duplication.
    pub dedupe_window: usize,
    /// Negative-feedback items remembered per user.
    pub suppressed_len: usize,
    /// Idle time after which a session stops.
    pub idle_ttl_ms: u64,
    /// Most session actors running at once; starting one more stops the least recently used
    /// first (it rebuilds from the profile store on its next use).
    pub max_active: usize,
    /// Mailbox capacity of each session actor.
    pub mailbox_capacity: usize,
    /// Arbiter threads for sessions and ingest; 0 = one per core.
    pub arbiters: usize,
    /// Event types whose items are not recommended again.
    pub exclude_event_types: Vec<EventType>,
    /// Consumed items (by `exclude_event_types`) remembered per user beyond the history window,
    /// so that they stay out of the lists; 0 = only the history window excludes.
    pub consumed_max: usize,
    /// A consumed item may be recommended again this long after the user last consumed it
    /// (repeat-purchase catalogues); 0 = never.
    pub reshow_after_secs: u64,
    /// An answer for the pushed list that took at least this long is pushed even when newer
    /// events arrived meanwhile (one more request then covers them), so that under an
    /// overloaded model users still get lists at most one answer behind; 0 = such an answer is
    /// always dropped in favour of the next.
    pub late_list_ms: u64,
}
