//! User profile storage behind one small trait. The in-memory store is the embedded default;
//! durable stores (Redis) implement the same trait.

mod codec;
pub mod memory;
pub mod redis;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::event::{Context, EventId, EventType, ItemId, UserId};
use crate::recs::{RecList, RecUpdate};

/// One applied interaction, as the profile stores it (the type lives with the event log, which
/// owns the applied-interaction record; its JSON here is the stored format).
pub use crate::eventlog::Interaction;

/// Everything kept about a user.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// The last `session.history_len` interactions, oldest first.
    pub interactions: Vec<Interaction>,
    /// The latest request context.
    pub context: Option<Context>,
    /// Digests of the recent event ids, oldest first, used to apply a repeated event once.
    pub event_ids: Vec<EventDigest>,
    /// Items the user disliked or hid, oldest first.
    pub suppressed: Vec<ItemId>,
    /// The last list pushed to the user.
    pub last_recs: Option<RecList>,
    /// Every item the user consumed (by `ProfileLimits::consumed_types`) and when last, sorted by
    /// item, at most `ProfileLimits::consumed_max`: what stays out of the user's lists after the
    /// interactions that named them left the history (see `actors/session/consumed.rs`). Profiles
    /// stored before it have none; the session then starts it from the stored history.
    #[serde(default)]
    pub consumed: Vec<ConsumedItem>,
}

/// One consumed item and when the user last consumed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumedItem {
    pub item_id: ItemId,
    /// Seconds since the epoch (see [`consumed_secs`]).
    pub at_secs: u32,
}

/// The time of a consumption as the record keeps it: whole seconds since the epoch, saturated to
/// `u32` (until 2106), 4 bytes where the millisecond timestamp takes 8.
pub fn consumed_secs(timestamp_ms: i64) -> u32 {
    u32::try_from(timestamp_ms.max(0) / 1000).unwrap_or(u32::MAX)
}

/// A set of event types (`session.exclude_event_types`), a bit per type: `ProfileLimits` stays
/// `Copy` and a membership test is a mask.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventTypes(u16);

impl EventTypes {
    /// No type.
    pub const NONE: EventTypes = EventTypes(0);

    pub fn of(types: &[EventType]) -> Self {
        Self(types.iter().fold(0, |mask, t| mask | Self::bit(*t)))
    }

    pub fn contains(self, event_type: EventType) -> bool {
        self.0 & Self::bit(event_type) != 0
    }

    fn bit(event_type: EventType) -> u16 {
        1 << EventType::ALL.iter().position(|t| *t == event_type).expect("a listed type")
    }
}

/// The 64-bit digest of an event id that de-duplication remembers instead of the id: 8 bytes
/// rather than the id's 36 (a UUID) plus its allocation, in the session and in Redis. FNV-1a,
/// so it is the same in every process and release (the digests are stored). Two ids of one user
/// share a digest with a probability of about `window / 2^64` per event (5e-17 at 1,000): a
/// collision would skip an event as a repeat; ids are the user's own, so a producer crafting
/// collisions can only drop its own events.
///
/// It serialises as 16 hex digits (the export): a JSON number that large loses digits in
/// JavaScript.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventDigest(pub u64);

impl Serialize for EventDigest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{:016x}", self.0))
    }
}

impl<'de> Deserialize<'de> for EventDigest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let hex = String::deserialize(deserializer)?;
        u64::from_str_radix(&hex, 16).map(Self).map_err(serde::de::Error::custom)
    }
}

impl EventDigest {
    pub fn of(id: &EventId) -> Self {
        Self(
            id.as_str()
                .bytes()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)),
        )
    }
}

/// New state for one user, already de-duplicated by the session.
#[derive(Clone, Debug)]
pub struct ProfileUpdate {
    pub user_id: UserId,
    pub interactions: Vec<Interaction>,
    pub context: Option<Context>,
    pub suppressed: Vec<ItemId>,
}

/// Bounds every store applies when appending.
#[derive(Clone, Copy, Debug)]
pub struct ProfileLimits {
    pub history_len: usize,
    pub dedupe_window: usize,
    pub suppressed_len: usize,
    /// How long an erasure's tombstone is kept (0: forever); replays older than that are no
    /// longer recognised as belonging to an erased user.
    pub tombstone_ttl_secs: u64,
    /// Consumed items kept per user (`session.consumed_max`; 0: no record is kept).
    pub consumed_max: usize,
    /// The event types whose items count as consumed (`session.exclude_event_types`).
    pub consumed_types: EventTypes,
}

impl ProfileLimits {
    /// The bounds `config` sets: its `[session]` sizes, `privacy.tombstone_ttl_secs`, and the
    /// consumed record of `session.consumed_max` items of `session.exclude_event_types`.
    pub fn of(config: &crate::config::Config) -> Self {
        ProfileLimits {
            history_len: config.session.history_len,
            dedupe_window: config.session.dedupe_window,
            suppressed_len: config.session.suppressed_len,
            tombstone_ttl_secs: config.privacy.tombstone_ttl_secs,
            consumed_max: config.session.consumed_max,
            consumed_types: EventTypes::of(&config.session.exclude_event_types),
        }
    }

    /// These sizes, tombstones kept forever and no consumed record (tests and benchmarks of the
    /// stores).
    pub const fn sized(history_len: usize, dedupe_window: usize, suppressed_len: usize) -> Self {
        ProfileLimits {
            history_len,
            dedupe_window,
            suppressed_len,
            tombstone_ttl_secs: 0,
            consumed_max: 0,
            consumed_types: EventTypes::NONE,
        }
    }

    /// Whether `interaction` adds to the consumed record.
    pub fn consumes(&self, interaction: &Interaction) -> bool {
        self.consumed_max > 0 && self.consumed_types.contains(interaction.event_type)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("profile store unavailable: {0}")]
    Unavailable(String),
    #[error("stored profile is corrupt: {0}")]
    Corrupt(String),
}

/// Resolves once an append is durable. Stores retry failed writes until they succeed, so this
/// resolves late rather than wrongly; if the process stops first it never resolves, and whatever
/// waited on it (a Kafka offset) is never acknowledged.
pub type Persisted = futures_util::future::BoxFuture<'static, ()>;

/// A persisted future that is already complete (stores that write synchronously).
pub fn persisted_now() -> Persisted {
    Box::pin(std::future::ready(()))
}

#[async_trait]
pub trait ProfileStore: Send + Sync + 'static {
    /// A short name for logs and `/readyz` ("memory", "redis").
    fn kind(&self) -> &'static str;
    /// Whether writes are currently failing (and being retried).
    fn degraded(&self) -> bool {
        false
    }
    async fn load(&self, user: &UserId) -> Result<Option<Profile>, StoreError>;
    /// Whether the store holds a user's profile only while no session of this process runs the
    /// user (the memory store). Its sessions then neither append each event nor store each
    /// list: the session's state is the profile while it runs, a stopping session parks its
    /// whole state here ([`ProfileStore::park`]), and a starting one takes it back
    /// ([`ProfileStore::claim`]). Nothing is less durable for it: the store lives in the same
    /// process as the sessions. A user's history is then in memory once, not twice.
    fn parks_profiles(&self) -> bool {
        false
    }
    /// The profile a starting session rebuilds from: a parking store hands it over (it no
    /// longer holds it), others read it.
    async fn claim(&self, user: &UserId) -> Result<Option<Profile>, StoreError> {
        self.load(user).await
    }
    /// A stopping session's whole state, in place of what the store held (parking stores only).
    fn park(&self, _user: &UserId, _profile: Profile) {}
    /// Queues an append (skipping event ids the profile already holds, trimming to the limits).
    /// Appends for one user are applied in the order of the calls.
    fn append(&self, update: ProfileUpdate) -> Persisted;
    /// Stores the last list pushed to a user (best effort, ordered with appends), and tells other
    /// instances about it where the store carries updates between instances.
    fn save_recs(&self, update: &RecUpdate);
    /// Removes the profile, returning what it held.
    async fn remove(&self, user: &UserId) -> Result<Option<Profile>, StoreError>;

    /// Erases everything stored about `user` (after every write queued before it) and records a
    /// tombstone at `at_ms`: events of the user from before it are never applied again (replays).
    async fn erase(&self, user: &UserId, at_ms: i64) -> Result<(), StoreError>;

    /// When `user` was erased, if ever.
    async fn tombstone(&self, user: &UserId) -> Result<Option<i64>, StoreError>;

    /// Periodic housekeeping, called by the server: a store that holds state in this process
    /// drops what outlived its bounds (idle profiles, expired tombstones). Redis expires keys
    /// itself.
    fn sweep(&self) {}
}

impl Profile {
    /// Whether it holds nothing a session would restore.
    pub fn is_empty(&self) -> bool {
        self.interactions.is_empty()
            && self.event_ids.is_empty()
            && self.suppressed.is_empty()
            && self.consumed.is_empty()
            && self.last_recs.is_none()
    }

    /// Applies an update in place with the same rules every store follows: skip known event ids,
    /// keep the newest `limits` entries of each list, record the consumed items.
    pub fn apply(&mut self, update: ProfileUpdate, limits: ProfileLimits) {
        for interaction in update.interactions {
            let digest = EventDigest::of(&interaction.event_id);
            if self.event_ids.contains(&digest) {
                continue;
            }
            push_within(&mut self.event_ids, digest, limits.dedupe_window);
            if limits.consumes(&interaction) {
                self.record_consumed(&interaction.item_id, consumed_secs(interaction.timestamp), limits.consumed_max);
            }
            push_within(&mut self.interactions, interaction, limits.history_len);
        }
        for item in update.suppressed {
            self.suppressed.retain(|s| *s != item);
            self.suppressed.push(item);
        }
        if update.context.is_some() {
            self.context = update.context;
        }
        trim_front(&mut self.interactions, limits.history_len);
        trim_front(&mut self.event_ids, limits.dedupe_window);
        trim_front(&mut self.suppressed, limits.suppressed_len);
    }

    /// Records that `item` was consumed at `at_secs` (the later time if it already was), keeping
    /// at most `max` items: past it the one consumed longest ago goes (ties: the lower item id),
    /// as in the session and the Redis script.
    fn record_consumed(&mut self, item: &ItemId, at_secs: u32, max: usize) {
        match self.consumed.binary_search_by(|c| c.item_id.as_str().cmp(item.as_str())) {
            Ok(i) => self.consumed[i].at_secs = self.consumed[i].at_secs.max(at_secs),
            Err(i) => {
                reserve_within(&mut self.consumed, max.saturating_add(1));
                self.consumed.insert(i, ConsumedItem { item_id: item.clone(), at_secs });
            }
        }
        while self.consumed.len() > max {
            let oldest = self
                .consumed
                .iter()
                .enumerate()
                .min_by(|(_, a), (_, b)| (a.at_secs, a.item_id.as_str()).cmp(&(b.at_secs, b.item_id.as_str())))
                .map(|(i, _)| i);
            let Some(i) = oldest else { break };
            self.consumed.remove(i);
        }
    }
}

/// Appends `item`, dropping the oldest beyond `max`; the room grows by doubling but never past
/// `max` (a history of 50 kept room for 64: 1.1 KB a stored profile).
fn push_within<T>(list: &mut Vec<T>, item: T, max: usize) {
    if max == 0 {
        return;
    }
    trim_front(list, max - 1);
    reserve_within(list, max);
    list.push(item);
}

/// Room for one more entry in `list`, doubling from one but never past `max` (the growth of
/// `Vec::push` reserves up to twice what a capped list will ever hold).
fn reserve_within<T>(list: &mut Vec<T>, max: usize) {
    if list.len() == list.capacity() {
        list.reserve_exact(growth_within(list.len(), max));
    }
}

/// How many more entries a full list of `len` entries capped at `max` makes room for: as many
/// again (at least one), never past `max`. Shared by the store's lists and the session's queues.
pub fn growth_within(len: usize, max: usize) -> usize {
    (len * 2).clamp(len + 1, max.max(len + 1)) - len
}

fn trim_front<T>(list: &mut Vec<T>, keep: usize) {
    if list.len() > keep {
        list.drain(..list.len() - keep);
    }
}

/// The cross-instance fan-out of published lists (production mode), as the session registry asks
/// for it: follow a user's lists from other instances while this instance holds the user's hub.
/// Redis pub/sub implements it (`redis::FanoutCommand` senders); the embedded mode has none.
pub trait UpdateFanout: Send + Sync {
    /// Start delivering lists other instances publish for `user`.
    fn watch(&self, user: &UserId);
    /// Stop delivering them.
    fn unwatch(&self, user: &UserId);
    /// A subscriber of `user` arrived here: tell every instance (the owner stores and publishes
    /// the user's lists only while some instance watches it).
    fn subscribed(&self, _user: &UserId) {}
    /// Whether some instance announced a subscriber of `user` lately (always true where
    /// instances do not announce).
    fn watched(&self, _user: &UserId) -> bool {
        true
    }
    /// Whether instances announce their subscribers (`redis.watch_ttl_secs` > 0).
    fn announces(&self) -> bool {
        false
    }
    /// Whether an announcement of a subscriber of `user` is current, as heard: false while
    /// unknown (no announcements, or ones this instance may have missed before it listened).
    /// The owner counts a list it forwards to such a subscriber as an impression.
    fn announced(&self, _user: &UserId) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_digest_is_fnv1a_stored_ids_never_move_and_it_exports_as_hex() {
        // Digests are stored (Redis, exports): the function must never change.
        assert_eq!(EventDigest::of(&EventId::from("")), EventDigest(0xcbf2_9ce4_8422_2325));
        assert_eq!(EventDigest::of(&EventId::from("a")), EventDigest(0xaf63_dc4c_8601_ec8c));
        let json = serde_json::to_string(&EventDigest(0xaf63_dc4c_8601_ec8c)).expect("serialises");
        assert_eq!(json, r#""af63dc4c8601ec8c""#);
        assert_eq!(serde_json::from_str::<EventDigest>(&json).expect("reads back"), EventDigest(0xaf63_dc4c_8601_ec8c));
    }
}
