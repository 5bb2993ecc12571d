//! The Redis key and channel names of a user (see the store's module docs for what each holds).

use crate::event::UserId;

/// Key names of one user.
pub(super) struct Keys {
    pub(super) history: String,
    /// Event ids as profiles written before kept them (a sorted set of the ids themselves): read
    /// and checked until it expires, never written.
    pub(super) legacy_ids: String,
    /// The event-id digests of the de-duplication window: one string of 8-byte digests.
    pub(super) digests: String,
    pub(super) suppressed: String,
    pub(super) profile: String,
}

pub(super) fn keys(prefix: &str, user: &UserId) -> Keys {
    let base = format!("{prefix}:{{{user}}}");
    Keys {
        history: format!("{base}:h"),
        legacy_ids: format!("{base}:ids"),
        digests: format!("{base}:e"),
        suppressed: format!("{base}:s"),
        profile: format!("{base}:p"),
    }
}

/// When the user was erased (a tombstone outlives the profile, so replays skip the user).
pub(super) fn tombstone_key(prefix: &str, user: &UserId) -> String {
    format!("{prefix}:{{{user}}}:erased")
}
/// The pub/sub channel carrying a user's pushed lists.
pub fn updates_channel(prefix: &str, user: &UserId) -> String {
    format!("{prefix}:updates:{{{user}}}")
}
