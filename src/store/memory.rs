//! The in-memory profile store: the embedded default. Profiles live in this process only and are
//! lost when it stops. It parks profiles ([`ProfileStore::parks_profiles`]): it holds those of
//! users whose session does not run, and a running session holds its own. A parked profile is
//! kept packed, in one allocation (`codec::encode_parked`): 214 bytes for a user with one view
//! and a list of 10 where the profile's structure took about 460 in seven, and a map slot of 48
//! bytes instead of 328.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use parking_lot::Mutex;

use super::{codec, persisted_now, Persisted, Profile, ProfileLimits, ProfileStore, ProfileUpdate, StoreError};
use crate::event::{now_ms, UserId};
use crate::recs::RecUpdate;
use crate::telemetry::Metrics;

/// How much the embedded store keeps. It is a cache of recent users, not a database: past
/// `max_profiles` the least recently used profile goes, and so does one idle for `idle_ttl_secs`.
#[derive(Clone, Copy, Debug)]
pub struct MemoryBounds {
    pub max_profiles: usize,
    /// 0: profiles never expire by age (the cap still holds).
    pub idle_ttl_secs: u64,
    pub max_tombstones: usize,
}

impl MemoryBounds {
    /// No practical bound (unit tests of other modules).
    pub const UNBOUNDED: MemoryBounds =
        MemoryBounds { max_profiles: usize::MAX, idle_ttl_secs: 0, max_tombstones: usize::MAX };
}

/// A stored profile, packed, and when it was last read or written: `used` orders profiles for
/// LRU eviction (a store-wide counter, so no two share a value), `used_ms` dates them for the TTL.
struct Stored {
    packed: Box<[u8]>,
    used: AtomicU64,
    used_ms: AtomicI64,
}

impl Stored {
    fn profile(&self, user: &UserId) -> Profile {
        codec::decode_parked(&self.packed, user).unwrap_or_else(|| {
            // Only this store writes the form; a profile it cannot read is a bug, not input.
            tracing::error!(user = %user, "a parked profile did not decode; the user starts afresh");
            Profile::default()
        })
    }
}

fn pack(profile: &Profile) -> Box<[u8]> {
    codec::encode_parked(profile).into_boxed_slice()
}

pub struct MemoryStore {
    /// foldhash rather than SipHash (every applied event writes here); seeded per process, so
    /// user ids an outsider picks cannot be aimed at one shard or bucket.
    profiles: DashMap<UserId, Stored, foldhash::fast::RandomState>,
    /// Erased users and when.
    tombstones: DashMap<UserId, i64, foldhash::fast::RandomState>,
    limits: ProfileLimits,
    bounds: MemoryBounds,
    /// The LRU clock: bumped by every touch of a profile.
    clock: AtomicU64,
    /// One eviction scan at a time; others find the store already under its cap.
    evicting: Mutex<()>,
    metrics: Arc<Metrics>,
}

impl MemoryStore {
    pub fn new(limits: ProfileLimits, bounds: MemoryBounds, metrics: Arc<Metrics>) -> Self {
        Self {
            profiles: DashMap::default(),
            tombstones: DashMap::default(),
            limits,
            bounds,
            clock: AtomicU64::new(0),
            evicting: Mutex::new(()),
            metrics,
        }
    }

    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    fn touch(&self, stored: &Stored) {
        stored.used.store(self.clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        stored.used_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Runs `change` on the user's profile, creating it if needed, then keeps the store under its
    /// cap.
    fn upsert(&self, user: &UserId, change: impl FnOnce(&mut Profile)) {
        self.write(user, |stored| {
            let mut profile = stored.map_or_else(Profile::default, |stored| stored.profile(user));
            change(&mut profile);
            pack(&profile)
        });
    }

    /// Stores what `packed` makes of the user's stored profile (`None`: there is none) in its
    /// place, then keeps the store under its cap. The entry's shard lock is released before any
    /// eviction scan takes the others.
    fn write(&self, user: &UserId, packed: impl FnOnce(Option<&Stored>) -> Box<[u8]>) {
        let created = match self.profiles.entry(user.clone()) {
            Entry::Occupied(mut entry) => {
                let packed = packed(Some(entry.get()));
                entry.get_mut().packed = packed;
                self.touch(entry.get());
                false
            }
            Entry::Vacant(entry) => {
                let stored = Stored { packed: packed(None), used: AtomicU64::new(0), used_ms: AtomicI64::new(0) };
                self.touch(&stored);
                entry.insert(stored);
                true
            }
        };
        if created {
            self.evict_over_cap();
            self.metrics.store_memory_profiles.set(self.profiles.len() as i64);
        }
    }

    /// Past the cap, drops the least recently used profiles down to 31/32 of it in one scan, so
    /// the scan (a pass over every profile) runs once per cap/32 new users, not on each.
    fn evict_over_cap(&self) {
        let max = self.bounds.max_profiles;
        if self.profiles.len() <= max {
            return;
        }
        let _scan = self.evicting.lock();
        let len = self.profiles.len();
        if len <= max {
            return;
        }
        let keep = max - max / 32;
        let mut ages: Vec<u64> = self.profiles.iter().map(|s| s.used.load(Ordering::Relaxed)).collect();
        let surplus = ages.len().saturating_sub(keep);
        if surplus == 0 {
            return;
        }
        let (_, &mut newest_dropped, _) = ages.select_nth_unstable(surplus - 1);
        drop(ages);
        self.profiles.retain(|_, s| s.used.load(Ordering::Relaxed) > newest_dropped);
        let evicted = len.saturating_sub(self.profiles.len());
        self.metrics.store_memory_evicted.add(evicted as u64);
        tracing::debug!(evicted, max_profiles = max, "memory store over its cap; least recently used profiles dropped");
    }

    /// Drops profiles idle past the TTL and expired or surplus tombstones, and gives the maps'
    /// spare capacity back after a large drop. Called periodically by the server.
    pub fn sweep_now(&self) -> Sweep {
        let now = now_ms();
        let before = self.profiles.len();
        if self.bounds.idle_ttl_secs > 0 {
            let cutoff = now.saturating_sub((self.bounds.idle_ttl_secs as i64).saturating_mul(1000));
            self.profiles.retain(|_, s| s.used_ms.load(Ordering::Relaxed) >= cutoff);
        }
        let after = self.profiles.len();
        let profiles_expired = before.saturating_sub(after);
        self.metrics.store_memory_evicted.add(profiles_expired as u64);
        let tombstones_before = self.tombstones.len();
        let ttl_ms = (self.limits.tombstone_ttl_secs as i64).saturating_mul(1000);
        if ttl_ms > 0 {
            self.tombstones.retain(|_, at| at.saturating_add(ttl_ms) >= now);
        }
        self.cap_tombstones();
        let tombstones_expired = tombstones_before.saturating_sub(self.tombstones.len());
        // A map keeps its largest capacity; after most of it emptied, give the memory back.
        if after < self.profiles.capacity() / 4 {
            self.profiles.shrink_to_fit();
        }
        if self.tombstones.len() < self.tombstones.capacity() / 4 {
            self.tombstones.shrink_to_fit();
        }
        self.metrics.store_memory_profiles.set(after as i64);
        self.metrics.store_memory_tombstones.set(self.tombstones.len() as i64);
        Sweep { profiles_expired, tombstones_expired }
    }

    /// Past the tombstone cap, drops the oldest erasures (replays from before them are then no
    /// longer recognised, as after `privacy.tombstone_ttl_secs`).
    fn cap_tombstones(&self) {
        let max = self.bounds.max_tombstones;
        let len = self.tombstones.len();
        if len <= max {
            return;
        }
        let keep = max - max / 32;
        let mut times: Vec<i64> = self.tombstones.iter().map(|t| *t).collect();
        let surplus = times.len().saturating_sub(keep);
        if surplus == 0 {
            return;
        }
        let (_, &mut newest_dropped, _) = times.select_nth_unstable(surplus - 1);
        self.tombstones.retain(|_, at| *at > newest_dropped);
        // Erasures at the same millisecond as the cut: drop one by one until under the cap.
        while self.tombstones.len() > max {
            let Some(user) = self.tombstones.iter().next().map(|t| t.key().clone()) else { break };
            self.tombstones.remove(&user);
        }
    }
}

/// What one [`MemoryStore::sweep_now`] dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub profiles_expired: usize,
    pub tombstones_expired: usize,
}

#[async_trait]
impl ProfileStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn load(&self, user: &UserId) -> Result<Option<Profile>, StoreError> {
        Ok(self.profiles.get(user).map(|s| {
            self.touch(&s);
            s.profile(user)
        }))
    }

    fn parks_profiles(&self) -> bool {
        true
    }

    async fn claim(&self, user: &UserId) -> Result<Option<Profile>, StoreError> {
        self.remove(user).await
    }

    fn park(&self, user: &UserId, profile: Profile) {
        let packed = pack(&profile);
        self.write(user, |_| packed);
    }

    fn append(&self, update: ProfileUpdate) -> Persisted {
        let limits = self.limits;
        let user = update.user_id.clone();
        self.upsert(&user, |profile| profile.apply(update, limits));
        persisted_now()
    }

    fn save_recs(&self, update: &RecUpdate) {
        let recs = &update.list;
        self.upsert(&recs.user_id, |profile| profile.last_recs = Some(recs.clone()));
    }

    async fn remove(&self, user: &UserId) -> Result<Option<Profile>, StoreError> {
        let removed = self.profiles.remove(user).map(|(user, s)| s.profile(&user));
        self.metrics.store_memory_profiles.set(self.profiles.len() as i64);
        Ok(removed)
    }

    async fn erase(&self, user: &UserId, at_ms: i64) -> Result<(), StoreError> {
        self.tombstones.insert(user.clone(), at_ms);
        self.profiles.remove(user);
        self.cap_tombstones();
        self.metrics.store_memory_profiles.set(self.profiles.len() as i64);
        self.metrics.store_memory_tombstones.set(self.tombstones.len() as i64);
        Ok(())
    }

    async fn tombstone(&self, user: &UserId) -> Result<Option<i64>, StoreError> {
        let ttl_ms = (self.limits.tombstone_ttl_secs as i64).saturating_mul(1000);
        let expired = |at: i64| ttl_ms > 0 && at.saturating_add(ttl_ms) < now_ms();
        Ok(self.tombstones.get(user).map(|t| *t).filter(|&at| !expired(at)))
    }

    fn sweep(&self) {
        let swept = self.sweep_now();
        if swept != Sweep::default() {
            tracing::debug!(
                profiles = swept.profiles_expired,
                tombstones = swept.tombstones_expired,
                "memory store swept idle profiles and expired tombstones"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, ItemId};
    use crate::store::{EventTypes, Interaction};

    fn interaction(id: &str, item: &str) -> Interaction {
        Interaction::view(id, item, 0)
    }

    #[actix_rt::test]
    async fn appends_dedupes_and_trims() {
        let store =
            MemoryStore::new(ProfileLimits::sized(2, 3, 1), MemoryBounds::UNBOUNDED, Arc::new(Metrics::default()));
        let user = UserId::from("u");
        let update = |ids: &[&str]| ProfileUpdate {
            user_id: user.clone(),
            interactions: ids.iter().map(|id| interaction(id, &format!("item-{id}"))).collect(),
            context: None,
            suppressed: vec![ItemId::from("x"), ItemId::from("y")],
        };
        store.append(update(&["a", "b"])).await;
        store.append(update(&["b", "c"])).await;
        let profile = store.load(&user).await.expect("load").expect("present");
        let ids: Vec<_> = profile.interactions.iter().map(|i| i.event_id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        assert_eq!(profile.event_ids.len(), 3);
        assert_eq!(profile.suppressed, vec![ItemId::from("y")]);
        assert!(store.remove(&user).await.expect("remove").is_some());
        assert!(store.load(&user).await.expect("load").is_none());
    }

    #[actix_rt::test]
    async fn consumed_items_outlive_the_history_keep_their_latest_time_and_the_oldest_go_past_the_cap() {
        let limits = ProfileLimits {
            history_len: 2,
            dedupe_window: 8,
            suppressed_len: 1,
            tombstone_ttl_secs: 0,
            consumed_max: 3,
            consumed_types: EventTypes::of(&[EventType::View, EventType::Purchase]),
        };
        let store = MemoryStore::new(limits, MemoryBounds::UNBOUNDED, Arc::new(Metrics::default()));
        let user = UserId::from("u");
        let event = |id: &str, item: &str, event_type: EventType, secs: i64| Interaction {
            event_type,
            ..Interaction::view(id, item, secs * 1000)
        };
        let append = |interactions: Vec<Interaction>| ProfileUpdate {
            user_id: user.clone(),
            interactions,
            context: None,
            suppressed: Vec::new(),
        };
        store
            .append(append(vec![
                event("e1", "x", EventType::View, 10),
                event("e2", "y", EventType::Purchase, 20),
                // Not a consuming type: the history has it, the record does not.
                event("e3", "z", EventType::Dislike, 30),
                // A repeat of e1: applied once, so x keeps its time.
                event("e1", "x", EventType::View, 99),
            ]))
            .await;
        store.append(append(vec![event("e4", "w", EventType::View, 40), event("e5", "y", EventType::View, 50)])).await;
        let profile = store.load(&user).await.expect("load").expect("present");
        assert_eq!(profile.interactions.len(), 2, "the history keeps two");
        let record = |p: &Profile| p.consumed.iter().map(|c| (c.item_id.to_string(), c.at_secs)).collect::<Vec<_>>();
        let expected = [("w", 40), ("x", 10), ("y", 50)].map(|(i, t)| (i.to_owned(), t));
        assert_eq!(record(&profile), expected, "by item, y at its later time, x beyond the history");
        // Past the cap the item consumed longest ago (x) goes.
        store.append(append(vec![event("e6", "v", EventType::View, 60)])).await;
        let profile = store.load(&user).await.expect("load").expect("present");
        let expected = [("v", 60), ("w", 40), ("y", 50)].map(|(i, t)| (i.to_owned(), t));
        assert_eq!(record(&profile), expected);
        store.erase(&user, now_ms()).await.expect("erase");
        assert!(store.load(&user).await.expect("load").is_none(), "the erasure takes the record too");
    }

    fn bounded(max_profiles: usize, max_tombstones: usize, tombstone_ttl_secs: u64) -> MemoryStore {
        let limits = ProfileLimits { tombstone_ttl_secs, ..ProfileLimits::sized(4, 4, 4) };
        let bounds = MemoryBounds { max_profiles, idle_ttl_secs: 0, max_tombstones };
        MemoryStore::new(limits, bounds, Arc::new(Metrics::default()))
    }

    fn one_event(user: &str) -> ProfileUpdate {
        ProfileUpdate {
            user_id: UserId::from(user),
            interactions: vec![interaction(&format!("{user}-e"), "item")],
            context: None,
            suppressed: Vec::new(),
        }
    }

    #[actix_rt::test]
    async fn past_the_cap_the_least_recently_used_profiles_go() {
        let store = bounded(64, 8, 0);
        for n in 0..64 {
            store.append(one_event(&format!("u{n}"))).await;
        }
        // u0 is read again, so u1 is now the least recently used.
        assert!(store.load(&UserId::from("u0")).await.expect("load").is_some());
        store.append(one_event("new")).await;
        assert!(store.len() <= 64);
        assert!(store.load(&UserId::from("u1")).await.expect("load").is_none(), "the oldest went");
        assert!(store.load(&UserId::from("u0")).await.expect("load").is_some(), "a recent read kept it");
        assert!(store.load(&UserId::from("new")).await.expect("load").is_some());
        assert_eq!(store.metrics.store_memory_evicted.get() as usize, 65 - store.len());
        assert_eq!(store.metrics.store_memory_profiles.get() as usize, store.len());
    }

    #[actix_rt::test]
    async fn a_parked_profile_is_handed_over_once_and_counts_towards_the_cap() {
        let store = bounded(64, 8, 0);
        assert!(store.parks_profiles());
        let user = UserId::from("u");
        let profile = Profile { interactions: vec![interaction("e", "item")], ..Profile::default() };
        store.park(&user, profile.clone());
        assert_eq!(store.metrics.store_memory_profiles.get(), 1);
        assert_eq!(store.load(&user).await.expect("load"), Some(profile.clone()), "a read leaves it parked");
        assert_eq!(store.claim(&user).await.expect("claim"), Some(profile), "handed over");
        assert_eq!(store.claim(&user).await.expect("claim"), None, "once");
        assert_eq!(store.metrics.store_memory_profiles.get(), 0);
        for n in 0..65 {
            store.park(&UserId::from(format!("p{n}").as_str()), Profile::default());
        }
        assert!(store.len() <= 64, "parking keeps the cap");
    }

    #[actix_rt::test]
    async fn tombstones_are_capped_oldest_first() {
        let store = bounded(8, 32, 0);
        for n in 0..40 {
            store.erase(&UserId::from(format!("u{n}").as_str()), 1_000 + n).await.expect("erase");
        }
        assert!(store.tombstones.len() <= 32);
        assert_eq!(store.tombstone(&UserId::from("u0")).await.expect("read"), None);
        assert_eq!(store.tombstone(&UserId::from("u39")).await.expect("read"), Some(1_039));
    }

    #[actix_rt::test]
    async fn a_sweep_drops_expired_tombstones() {
        let store = bounded(8, 32, 60);
        let now = now_ms();
        store.erase(&UserId::from("old"), now - 61_000).await.expect("erase");
        store.erase(&UserId::from("recent"), now).await.expect("erase");
        let swept = store.sweep_now();
        assert_eq!(swept.tombstones_expired, 1);
        assert_eq!(store.tombstones.len(), 1);
        assert_eq!(store.metrics.store_memory_tombstones.get(), 1);
    }
}
