//! The in-memory profile store: the embedded default. Profiles live in this process only and are
//! lost when it stops.

use async_trait::async_trait;
use dashmap::DashMap;

use super::{persisted_now, Persisted, Profile, ProfileLimits, ProfileStore, ProfileUpdate, StoreError};
use crate::event::UserId;
use crate::recs::RecUpdate;

pub struct MemoryStore {
    profiles: DashMap<UserId, Profile>,
    /// Erased users and when.
    tombstones: DashMap<UserId, i64>,
    limits: ProfileLimits,
}

impl MemoryStore {
    pub fn new(limits: ProfileLimits) -> Self {
        Self { profiles: DashMap::new(), tombstones: DashMap::new(), limits }
    }

    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }
}

#[async_trait]
impl ProfileStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn load(&self, user: &UserId) -> Result<Option<Profile>, StoreError> {
        Ok(self.profiles.get(user).map(|p| p.clone()))
    }

    fn append(&self, update: ProfileUpdate) -> Persisted {
        let limits = self.limits;
        self.profiles.entry(update.user_id.clone()).or_default().apply(update, limits);
        persisted_now()
    }

    fn save_recs(&self, update: &RecUpdate) {
        let recs = &update.list;
        self.profiles.entry(recs.user_id.clone()).or_default().last_recs = Some(recs.clone());
    }

    async fn remove(&self, user: &UserId) -> Result<Option<Profile>, StoreError> {
        Ok(self.profiles.remove(user).map(|(_, p)| p))
    }

    async fn erase(&self, user: &UserId, at_ms: i64) -> Result<(), StoreError> {
        self.tombstones.insert(user.clone(), at_ms);
        self.profiles.remove(user);
        Ok(())
    }

    async fn tombstone(&self, user: &UserId) -> Result<Option<i64>, StoreError> {
        let ttl_ms = (self.limits.tombstone_ttl_secs as i64).saturating_mul(1000);
        let expired = |at: i64| ttl_ms > 0 && at.saturating_add(ttl_ms) < crate::event::now_ms();
        Ok(self.tombstones.get(user).map(|t| *t).filter(|&at| !expired(at)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventId, EventType, ItemId};
    use crate::store::Interaction;

    fn interaction(id: &str, item: &str) -> Interaction {
        Interaction {
            event_id: EventId::from(id),
            item_id: ItemId::from(item),
            event_type: EventType::View,
            value: None,
            timestamp: 0,
            rec_id: None,
        }
    }

    #[actix_rt::test]
    async fn appends_dedupes_and_trims() {
        let store = MemoryStore::new(ProfileLimits {
            history_len: 2,
            dedupe_window: 3,
            suppressed_len: 1,
            tombstone_ttl_secs: 0,
        });
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
}
