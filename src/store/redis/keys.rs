//! The Redis key and channel names of a user (see the store's module docs for what each holds).
//!
//! Every name carries the user's hash tag, `{<user>}`, so a Redis Cluster keeps all of them on one
//! slot: the script that appends to a user touches only keys of that slot, and the user's update
//! channel is on the same shard. Redis hashes what lies between the first `{` and the next `}`;
//! an id that starts with `}` would leave that empty (then the whole name is hashed, and the
//! user's keys would scatter), so such ids get the tag `{\x01}…` instead: no valid id holds a
//! control character, so no other user's names can be the same.

use crate::event::UserId;

/// Key names of one user.
pub(super) struct Keys {
    pub(super) history: String,
    /// Event ids as profiles written before kept them (a sorted set of the ids themselves): read
    /// and checked until it expires, never written.
    pub(super) legacy_ids: String,
    /// The event-id digests of the de-duplication window as the release before kept them, in a
    /// string of their own: read, and moved into the profile hash by the next append.
    pub(super) digests: String,
    pub(super) suppressed: String,
    /// A string: the context, the last list and the de-duplication window (see the script).
    pub(super) profile: String,
    /// The same as a hash, as the release before kept them: read, and moved into the profile
    /// string by the next write.
    pub(super) legacy_profile: String,
    /// A sorted set: every consumed item (member) and when last, in seconds (score).
    pub(super) consumed: String,
}

impl Keys {
    /// Every key of the user (an erasure deletes them all).
    pub(super) fn all(&self) -> [&str; 7] {
        [
            &self.history,
            &self.profile,
            &self.suppressed,
            &self.legacy_profile,
            &self.legacy_ids,
            &self.digests,
            &self.consumed,
        ]
    }
}

/// `{<user>}`, the part of every name of the user that Redis Cluster hashes (see the module docs).
fn tagged(user: &UserId) -> String {
    let user = user.as_str();
    if user.starts_with('}') {
        format!("{{\u{1}{user}}}")
    } else {
        format!("{{{user}}}")
    }
}

pub(super) fn keys(prefix: &str, user: &UserId) -> Keys {
    let base = format!("{prefix}:{}", tagged(user));
    Keys {
        history: format!("{base}:h"),
        legacy_ids: format!("{base}:ids"),
        digests: format!("{base}:e"),
        suppressed: format!("{base}:s"),
        profile: format!("{base}:q"),
        legacy_profile: format!("{base}:p"),
        consumed: format!("{base}:c"),
    }
}

/// When the user was erased (a tombstone outlives the profile, so replays skip the user).
pub(super) fn tombstone_key(prefix: &str, user: &UserId) -> String {
    format!("{prefix}:{}:erased", tagged(user))
}
/// The pub/sub channel carrying a user's pushed lists.
pub fn updates_channel(prefix: &str, user: &UserId) -> String {
    format!("{prefix}:updates:{}", tagged(user))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redis::conn::slot_of;

    #[test]
    fn every_name_of_a_user_is_on_the_users_slot_and_names_of_users_differ() {
        let users = ["ann", "a}b", "}x", "}", "a{b}", "{x}", "~}x", "ü:ser", "a b"];
        let mut seen = std::collections::HashSet::new();
        for user in users {
            let user = UserId::from(user);
            let k = keys("liverec", &user);
            let names = [
                k.history,
                k.legacy_ids,
                k.digests,
                k.suppressed,
                k.profile,
                k.legacy_profile,
                k.consumed,
                tombstone_key("liverec", &user),
                updates_channel("liverec", &user),
            ];
            let slot = slot_of(&names[0]);
            for name in &names {
                assert_eq!(slot_of(name), slot, "{name} of user {user:?}");
                assert!(seen.insert(name.clone()), "{name} is also another user's");
            }
        }
        // The layout of ordinary ids is the one documented (and stored before).
        assert_eq!(keys("liverec", &UserId::from("ann")).history, "liverec:{ann}:h");
        assert_eq!(updates_channel("liverec", &UserId::from("ann")), "liverec:updates:{ann}");
    }
}
