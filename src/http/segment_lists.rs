//! The non-personal lists as kept between refreshes ([`SegmentLists`]): the windowed counts read
//! from the event log, the lists ranked from them, and those computed on first request (see
//! `lists.rs`, which serves them).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use super::error::ApiError;
use crate::actors::model::{ModelHandle, Similar};
use crate::catalog::{Catalog, ItemIdx};
use crate::event::{now_ms, Context as EventContext, Device};
use crate::eventlog::EventLog;
use crate::models::popularity::{EventCounts, Ranking, Snapshot, Window};
use crate::models::{HistoryItem, ItemFilter, Scored};

/// Most items a list holds: `offset + k` past it gives a shorter page.
pub const LIST_MAX: usize = 500;
/// Lists kept per refresh besides the precomputed ones (similar items, categories): a client
/// that asks for many distinct lists gets them computed, not kept.
const MEMO_MAX: usize = 4096;

/// What a list is, as kept for one refresh.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum ListKey {
    Ranked { ranking: Ranking, window: Window, segment: Option<usize>, filter: ItemFilter },
    Latest { filter: ItemFilter },
    Similar { item: ItemIdx, filter: ItemFilter },
}

/// A list as kept: its items, best first, and the model version (similar items).
#[derive(Debug, Default)]
pub(super) struct Kept {
    pub(super) items: Vec<Scored>,
    pub(super) version: Option<String>,
}

/// The lists of one refresh.
struct Generation {
    snapshot: Snapshot,
    lists: Mutex<HashMap<ListKey, Arc<Kept>>>,
}

impl Generation {
    fn get(&self, key: &ListKey) -> Option<Arc<Kept>> {
        self.lists.lock().get(key).cloned()
    }

    fn keep(&self, key: ListKey, list: Kept) -> Arc<Kept> {
        let list = Arc::new(list);
        let mut lists = self.lists.lock();
        if lists.len() < MEMO_MAX {
            lists.insert(key, list.clone());
        }
        list
    }
}

/// What the counts have read of the event log.
struct Counting {
    counts: EventCounts,
    /// [`EventLog::appended`] at the last read.
    seen: u64,
}

/// The non-personal lists, refreshed every `recs.lists_refresh_secs` (see the module docs).
pub struct SegmentLists {
    catalog: Arc<Catalog>,
    event_log: Arc<EventLog>,
    counting: Mutex<Counting>,
    current: RwLock<Arc<Generation>>,
    /// `recs.lists_refresh_secs`: the refresh period and the `max-age` of every answer.
    pub max_age: u64,
}

impl SegmentLists {
    /// Starts the lists and their refresh task on the current runtime; the task ends with the
    /// server (`shutdown`) or when the lists are dropped.
    pub fn start(
        refresh_secs: u64,
        catalog: Arc<Catalog>,
        event_log: Arc<EventLog>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let empty = Generation { snapshot: EventCounts::default().snapshot(now_ms()), lists: Mutex::default() };
        let lists = Arc::new(SegmentLists {
            catalog,
            event_log,
            counting: Mutex::new(Counting { counts: EventCounts::default(), seen: 0 }),
            current: RwLock::new(Arc::new(empty)),
            max_age: refresh_secs,
        });
        let weak: Weak<SegmentLists> = Arc::downgrade(&lists);
        let period = Duration::from_secs(refresh_secs.max(1));
        actix_rt::spawn(async move {
            let mut ticks = actix_rt::time::interval(period);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = shutdown.changed() => return,
                }
                let Some(lists) = weak.upgrade() else { return };
                // Sums every bucket of the week and ranks the precomputed lists: off the I/O thread.
                if tokio::task::spawn_blocking(move || lists.refresh(now_ms())).await.is_err() {
                    tracing::error!("refreshing the non-personal lists panicked");
                }
            }
        });
        lists
    }

    /// Reads the new events, and replaces the lists with ones ranked from the counts at `now`.
    pub fn refresh(&self, now: i64) {
        let snapshot = {
            let mut counting = self.counting.lock();
            let (events, seen) = self.event_log.appended_since(counting.seen);
            counting.seen = seen;
            for event in events {
                let weight = HistoryItem::of(&event.interaction, event.item).weight();
                counting.counts.add(event.item, event.segment, weight, event.timestamp, now);
            }
            counting.counts.prune(now);
            counting.counts.snapshot(now)
        };
        let generation = Generation { snapshot, lists: Mutex::default() };
        // Every list a request without a category can ask for now.
        let filter = ItemFilter::default();
        let segments = std::iter::once(None).chain(
            [Device::Mobile, Device::Desktop, Device::Tablet, Device::Tv, Device::Other]
                .map(|d| Some(EventContext::at_time(now, d).segment())),
        );
        for segment in segments {
            for (ranking, window) in [
                (Ranking::Popular, Window::Hour),
                (Ranking::Popular, Window::Day),
                (Ranking::Popular, Window::Week),
                (Ranking::Trending, Window::Hour),
                (Ranking::Trending, Window::Day),
            ] {
                let key = ListKey::Ranked { ranking, window, segment, filter: filter.clone() };
                let list = self.rank(&generation.snapshot, &key);
                generation.keep(key, list);
            }
        }
        // The default latest list too, so that no request ranks it under the catalogue's read
        // lock (filtered ones are still ranked on their first request).
        let key = ListKey::Latest { filter };
        let list = self.rank(&generation.snapshot, &key);
        generation.keep(key, list);
        *self.current.write() = Arc::new(generation);
    }

    fn generation(&self) -> Arc<Generation> {
        self.current.read().clone()
    }

    /// Ranks a popular, trending or latest list (not similar items: the model finds those).
    fn rank(&self, snapshot: &Snapshot, key: &ListKey) -> Kept {
        match key {
            ListKey::Ranked { ranking, window, segment, filter } => {
                let categories = self.catalog.categories();
                let now = snapshot.now_ms;
                let items = snapshot
                    .ranked(*ranking, *window, *segment, LIST_MAX, |item| filter.accepts(item, &categories, now));
                Kept { items, version: None }
            }
            ListKey::Latest { filter } => {
                let items = self
                    .catalog
                    .newest(LIST_MAX, now_ms(), |categories, available| filter.accepts_parts(categories, || available))
                    .into_iter()
                    .map(|item| Scored { item, score: 0.0 })
                    .collect();
                Kept { items, version: None }
            }
            ListKey::Similar { .. } => Kept::default(),
        }
    }

    /// The list for `key` of the current refresh, ranked now if no request asked for it yet.
    pub(super) fn list(&self, key: ListKey) -> Arc<Kept> {
        let generation = self.generation();
        if let Some(list) = generation.get(&key) {
            return list;
        }
        let list = self.rank(&generation.snapshot, &key);
        generation.keep(key, list)
    }

    /// Items like `item` from the serving model, asked once per refresh.
    pub(super) async fn similar(
        &self,
        model: &ModelHandle,
        item: ItemIdx,
        filter: ItemFilter,
    ) -> Result<Arc<Kept>, ApiError> {
        let generation = self.generation();
        let key = ListKey::Similar { item, filter: filter.clone() };
        if let Some(list) = generation.get(&key) {
            return Ok(list);
        }
        let found = model.send(Similar { item, k: LIST_MAX, filter }).await?;
        if found.version.is_empty() {
            return Err(ApiError::unavailable("unavailable", "the model is restarting", 1));
        }
        Ok(generation.keep(key, Kept { items: found.items, version: Some(found.version) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ItemAttributes;
    use crate::event::ItemId;

    fn lists(catalog: Arc<Catalog>) -> SegmentLists {
        SegmentLists {
            catalog,
            event_log: EventLog::new(60, 100),
            counting: Mutex::new(Counting { counts: EventCounts::default(), seen: 0 }),
            current: RwLock::new(Arc::new(Generation {
                snapshot: EventCounts::default().snapshot(0),
                lists: Mutex::default(),
            })),
            max_age: 30,
        }
    }

    #[test]
    fn the_refresh_ranks_the_default_latest_list_so_that_no_request_does() {
        let catalog = Arc::new(Catalog::new());
        for (id, created_at) in [("old", 1), ("new", 2)] {
            catalog.put(&ItemId::from(id), ItemAttributes { created_at: Some(created_at), ..Default::default() });
        }
        let lists = lists(catalog.clone());
        let default = ListKey::Latest { filter: ItemFilter::default() };
        assert!(lists.generation().get(&default).is_none(), "nothing ranked before the first refresh");
        lists.refresh(now_ms());
        let kept = lists.generation().get(&default).expect("ranked by the refresh");
        let ids = catalog.ids_of(&kept.items.iter().map(|s| s.item).collect::<Vec<_>>());
        assert_eq!(ids, [ItemId::from("new"), ItemId::from("old")]);
        let filtered = ListKey::Latest {
            filter: ItemFilter { availability: crate::models::Availability::Any, ..ItemFilter::default() },
        };
        assert!(lists.generation().get(&filtered).is_none(), "filtered lists wait for their first request");
    }
}
