//! The Redis key and channel names of a user (see the store's module docs for what each holds).

use crate::event::UserId;

/// Key names of one user.
pub(super) struct Keys {
    pub(super) history: String,
    pub(super) ids: String,
    pub(super) suppressed: String,
    pub(super) profile: String,
}

pub(super) fn keys(prefix: &str, user: &UserId) -> Keys {
    let base = format!("{prefix}:{{{user}}}");
    Keys {
        history: format!("{base}:h"),
        ids: format!("{base}:ids"),
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
