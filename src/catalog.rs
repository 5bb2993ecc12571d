//! The item catalogue: interns item ids to dense indices (what the models score over) and keeps
//! each item's attributes. Items appear either through `PUT /v1/items/{id}` or the first time an
//! event names them; the latter have no attributes until someone puts them.
//!
//! Items known only from events are bounded (`catalog.max_event_items`), and can be refused
//! altogether (`catalog.accept_unknown_items = false`): anyone who may post events could
//! otherwise grow the catalogue, and the cost of every list with it, without limit. Events are
//! checked with [`Catalog::admit`] where they enter (HTTP, WebSocket, Kafka); items that were
//! admitted once (or come back from stored profiles) are interned without a check.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;

use parking_lot::RwLock;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::event::ItemId;

/// Dense index of an item in the catalogue, stable for the life of the process.
pub type ItemIdx = u32;
/// Dense index of a category name.
pub type CategoryIdx = u16;

/// Catalogue attributes of an item, as clients put and get them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemAttributes {
    /// At most 1,024 characters.
    #[serde(default)]
    #[schema(max_length = 1024)]
    pub title: Option<String>,
    /// At most 64 labels of 1 to 128 characters.
    #[serde(default)]
    #[schema(max_items = 64)]
    pub categories: Vec<String>,
    /// At most 64 labels of 1 to 128 characters.
    #[serde(default)]
    #[schema(max_items = 64)]
    pub tags: Vec<String>,
    /// Milliseconds since the Unix epoch.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub created_at: Option<i64>,
    /// False takes the item out of every list (recommendations, pushed lists, cold start)
    /// while keeping it in the catalogue; absent means true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<bool>,
    /// Milliseconds since the Unix epoch from which the item is unavailable (a time in the past
    /// makes it unavailable at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub expires_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidItem {
    pub field: &'static str,
    pub message: String,
}

/// Bounds on attributes, so that one client cannot make the catalogue grow without limit.
pub const MAX_TITLE_LEN: usize = 1024;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_LEN: usize = 128;

impl ItemAttributes {
    pub fn validate(&self) -> Result<(), InvalidItem> {
        let bad = |field, message: String| Err(InvalidItem { field, message });
        if let Some(title) = &self.title {
            if title.chars().count() > MAX_TITLE_LEN {
                return bad("title", format!("must be at most {MAX_TITLE_LEN} characters"));
            }
        }
        for (field, labels) in [("categories", &self.categories), ("tags", &self.tags)] {
            if labels.len() > MAX_LABELS {
                return bad(field, format!("has {} entries; the limit is {MAX_LABELS}", labels.len()));
            }
            if labels
                .iter()
                .any(|l| l.is_empty() || l.chars().count() > MAX_LABEL_LEN || l.chars().any(char::is_control))
            {
                return bad(
                    field,
                    format!("entries must be 1 to {MAX_LABEL_LEN} characters without control characters"),
                );
            }
        }
        if matches!(self.created_at, Some(t) if t < 0) {
            return bad("created_at", "must be milliseconds since the Unix epoch".to_owned());
        }
        if matches!(self.expires_at, Some(t) if t < 0) {
            return bad("expires_at", "must be milliseconds since the Unix epoch".to_owned());
        }
        Ok(())
    }
}

struct Entry {
    id: ItemId,
    attributes: Option<Arc<ItemAttributes>>,
    categories: Vec<CategoryIdx>,
    /// Deleted (`DELETE /v1/items/{id}`): the index stays (models score over indices), the
    /// item is unavailable and no longer shown as part of the catalogue until put again.
    deleted: bool,
}

#[derive(Default)]
struct Inner {
    /// Item id to index: a table of indices alone, hashed and compared through the ids in
    /// `items` (a map keyed by the id held a second handle to it, 24 bytes a slot with the
    /// index: some 40 MiB more at 10^6 items). foldhash rather than SipHash: every event and
    /// every list looks item ids up here. Seeded per process, so ids an outsider picks cannot
    /// be aimed at one bucket.
    index: hashbrown::HashTable<ItemIdx>,
    hasher: foldhash::fast::RandomState,
    items: Vec<Entry>,
    /// Items without attributes: known only from events.
    event_only: usize,
    /// Items put and not deleted: what `catalog.max_items` bounds.
    listed: usize,
    category_index: HashMap<Arc<str>, CategoryIdx>,
    category_names: Vec<Arc<str>>,
    /// Items deleted or put with `available: false`: excluded from every list.
    hidden: BTreeSet<ItemIdx>,
    /// Items put with an `expires_at`, and when: excluded from every list from then on.
    expiring: BTreeMap<ItemIdx, i64>,
    /// One bit per item, set when it is in `hidden` or `expiring`: the models test every
    /// candidate against it (a bit per item is 125 KiB at 10^6 items) instead of copying the
    /// unavailable items into each request.
    flagged: Vec<u64>,
}

impl Inner {
    /// The index of `id`, if known.
    fn find(&self, id: &ItemId) -> Option<ItemIdx> {
        let items = &self.items;
        self.index.find(self.hasher.hash_one(id), |&idx| items[idx as usize].id == *id).copied()
    }

    fn available_at(&self, idx: ItemIdx, now_ms: i64) -> bool {
        let flagged = self.flagged.get(idx as usize / 64).is_some_and(|w| w & (1 << (idx % 64)) != 0);
        !flagged || (!self.hidden.contains(&idx) && self.expiring.get(&idx).is_none_or(|&at| at > now_ms))
    }

    /// Sets the availability bit of `idx` from `hidden` and `expiring`.
    fn reflag(&mut self, idx: ItemIdx) {
        let word = idx as usize / 64;
        if self.flagged.len() <= word {
            self.flagged.resize(word + 1, 0);
        }
        if self.hidden.contains(&idx) || self.expiring.contains_key(&idx) {
            self.flagged[word] |= 1 << (idx % 64);
        } else {
            self.flagged[word] &= !(1 << (idx % 64));
        }
    }

    fn view(&self, idx: ItemIdx) -> ItemView {
        let entry = &self.items[idx as usize];
        let ItemAttributes { title, categories, tags, created_at, available: _, expires_at } =
            entry.attributes.as_deref().cloned().unwrap_or_default();
        ItemView {
            item_id: entry.id.clone(),
            title,
            categories,
            tags,
            created_at,
            in_catalog: entry.attributes.is_some(),
            available: self.available_at(idx, crate::event::now_ms()),
            expires_at,
        }
    }

    /// The index of `id`, adding it without attributes if it is new.
    fn add(&mut self, id: &ItemId) -> ItemIdx {
        if let Some(idx) = self.find(id) {
            return idx;
        }
        let idx = ItemIdx::try_from(self.items.len()).expect("fewer than 2^32 items");
        self.items.push(Entry { id: id.clone(), attributes: None, categories: Vec::new(), deleted: false });
        let Self { index, items, hasher, .. } = self;
        index.insert_unique(hasher.hash_one(id), idx, |&i| hasher.hash_one(&items[i as usize].id));
        self.event_only += 1;
        idx
    }

    fn category(&mut self, name: &str) -> CategoryIdx {
        if let Some(&idx) = self.category_index.get(name) {
            return idx;
        }
        let idx = CategoryIdx::try_from(self.category_names.len()).unwrap_or(CategoryIdx::MAX);
        let name: Arc<str> = Arc::from(name);
        self.category_index.insert(name.clone(), idx);
        self.category_names.push(name);
        idx
    }
}

/// The shared catalogue. Reads take a short read lock; inserting a new item takes the write lock
/// once per item for the life of the process.
#[derive(Default)]
pub struct Catalog {
    inner: RwLock<Inner>,
    /// What events may add.
    admission: Admission,
}

/// What events may add to the catalogue (the `[catalog]` settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// Whether an event may name an item the catalogue does not hold.
    pub accept_unknown_items: bool,
    /// Most items known only from events (0: no limit).
    pub max_event_items: usize,
}

impl Default for Admission {
    /// Anything, as the catalogue did before it had settings (tests, tools).
    fn default() -> Self {
        Admission { accept_unknown_items: true, max_event_items: 0 }
    }
}

/// Why an event's item was refused by [`Catalog::admit`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefusedItem {
    #[error("the item is not in the catalogue, and catalog.accept_unknown_items is false; put it first")]
    Unknown,
    #[error(
        "the catalogue already holds {max} items known only from events (catalog.max_event_items); put the item first"
    )]
    TooManyUnknown { max: usize },
}

impl RefusedItem {
    /// A stable code for clients and the dead-letter topic.
    pub fn code(&self) -> &'static str {
        match self {
            RefusedItem::Unknown => "unknown_item",
            RefusedItem::TooManyUnknown { .. } => "too_many_unknown_items",
        }
    }
}

/// What `GET /v1/items/{id}` shows: the id, the attributes, and whether it is in the catalogue.
/// (The attributes are spelt out rather than flattened so that the OpenAPI schema of
/// [`ItemAttributes`], which allows no unknown fields, is not combined with these.)
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ItemView {
    #[schema(value_type = String)]
    pub item_id: ItemId,
    pub title: Option<String>,
    pub categories: Vec<String>,
    pub tags: Vec<String>,
    pub created_at: Option<i64>,
    /// False for an item known only from events, never put into the catalogue.
    pub in_catalog: bool,
    /// Whether lists may show the item now: false once it was put with `available: false` or
    /// its `expires_at` has passed.
    pub available: bool,
    /// When the item stops being available, if it was put with one.
    pub expires_at: Option<i64>,
}

impl From<ItemView> for ItemAttributes {
    fn from(view: ItemView) -> Self {
        ItemAttributes {
            title: view.title,
            categories: view.categories,
            tags: view.tags,
            created_at: view.created_at,
            available: (!view.available && view.expires_at.is_none()).then_some(false),
            expires_at: view.expires_at,
        }
    }
}

/// One page of the catalogue (`GET /v1/items`).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ItemPage {
    /// Items put into the catalogue (not those known only from events, nor deleted ones), in
    /// the order they first became known. A page may hold fewer than `limit` items.
    pub items: Vec<ItemView>,
    /// Pass as `cursor` for the next page; absent at the end of the catalogue.
    pub next_cursor: Option<String>,
}

impl Catalog {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty catalogue that admits event items as `admission` says.
    pub fn with_admission(admission: Admission) -> Self {
        Self { inner: RwLock::default(), admission }
    }

    /// Items known only from events.
    pub fn event_only(&self) -> usize {
        self.inner.read().event_only
    }

    /// Lets events name `ids`: every one is known afterwards, or none is added and the answer
    /// is the position (in `ids`) of the first that cannot be and why. An item that is already
    /// known always passes.
    pub fn admit<'a>(&self, ids: impl IntoIterator<Item = &'a ItemId>) -> Result<(), (usize, RefusedItem)> {
        let ids: Vec<&ItemId> = ids.into_iter().collect();
        let unknown = |inner: &Inner| -> Vec<usize> {
            let mut seen = std::collections::HashSet::new();
            ids.iter()
                .enumerate()
                .filter(|(_, id)| inner.find(id).is_none() && seen.insert(**id))
                .map(|(i, _)| i)
                .collect()
        };
        if unknown(&self.inner.read()).is_empty() {
            return Ok(());
        }
        let mut inner = self.inner.write();
        let unknown = unknown(&inner);
        let Some(&first) = unknown.first() else { return Ok(()) };
        if !self.admission.accept_unknown_items {
            return Err((first, RefusedItem::Unknown));
        }
        let max = self.admission.max_event_items;
        if max > 0 {
            let room = max.saturating_sub(inner.event_only);
            if let Some(&over) = unknown.get(room) {
                return Err((over, RefusedItem::TooManyUnknown { max }));
            }
        }
        for i in unknown {
            inner.add(ids[i]);
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.inner.read().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The index of `id`, adding the item (without attributes) on first sight.
    pub fn intern(&self, id: &ItemId) -> ItemIdx {
        if let Some(idx) = self.inner.read().find(id) {
            return idx;
        }
        self.inner.write().add(id)
    }

    /// [`Catalog::intern`], and the catalogue's own copy of the id: a state that keeps the id
    /// (a session's history, a stored profile, the event log) shares the catalogue's allocation
    /// instead of holding one more per event.
    pub fn intern_shared(&self, id: &ItemId) -> (ItemIdx, ItemId) {
        {
            let inner = self.inner.read();
            if let Some(idx) = inner.find(id) {
                return (idx, inner.items[idx as usize].id.clone());
            }
        }
        let mut inner = self.inner.write();
        let idx = inner.add(id);
        (idx, inner.items[idx as usize].id.clone())
    }

    /// The index of every one of `ids`, under one read lock; None if one is unknown.
    pub fn lookup_all<'a>(&self, ids: impl IntoIterator<Item = &'a ItemId>) -> Option<Box<[ItemIdx]>> {
        let inner = self.inner.read();
        ids.into_iter().map(|id| inner.find(id)).collect()
    }

    /// The index of `id` if the catalogue knows it.
    pub fn lookup(&self, id: &ItemId) -> Option<ItemIdx> {
        self.inner.read().find(id)
    }

    /// The index of `id` unless it is unknown or was deleted (as [`Catalog::get`] finds it),
    /// without building its view.
    pub fn lookup_live(&self, id: &ItemId) -> Option<ItemIdx> {
        let inner = self.inner.read();
        inner.find(id).filter(|&idx| !inner.items[idx as usize].deleted)
    }

    /// Sets the attributes of an item. Returns its index and whether it was new to the catalogue.
    pub fn put(&self, id: &ItemId, attributes: ItemAttributes) -> (ItemIdx, bool) {
        let idx = self.intern(id);
        let mut inner = self.inner.write();
        let categories = attributes.categories.iter().map(|c| inner.category(c)).collect();
        let hidden = attributes.available == Some(false);
        let expires_at = attributes.expires_at;
        let entry = &mut inner.items[idx as usize];
        let created = entry.attributes.is_none() || entry.deleted;
        let was_event_only = entry.attributes.is_none() && !entry.deleted;
        entry.attributes = Some(Arc::new(attributes));
        entry.categories = categories;
        entry.deleted = false;
        if was_event_only {
            inner.event_only = inner.event_only.saturating_sub(1);
        }
        if created {
            inner.listed += 1;
        }
        if hidden {
            inner.hidden.insert(idx);
        } else {
            inner.hidden.remove(&idx);
        }
        match expires_at {
            Some(at) => inner.expiring.insert(idx, at),
            None => inner.expiring.remove(&idx),
        };
        inner.reflag(idx);
        (idx, created)
    }

    /// Deletes an item put into the catalogue: it leaves every list and the catalogue's pages.
    /// Its index stays (the models score over indices); putting it again brings it back.
    /// Returns false when there is no such item in the catalogue.
    pub fn delete(&self, id: &ItemId) -> bool {
        let mut inner = self.inner.write();
        let Some(idx) = inner.find(id) else { return false };
        let entry = &mut inner.items[idx as usize];
        if entry.attributes.is_none() || entry.deleted {
            return false;
        }
        entry.deleted = true;
        entry.categories.clear();
        inner.hidden.insert(idx);
        inner.expiring.remove(&idx);
        inner.listed = inner.listed.saturating_sub(1);
        inner.reflag(idx);
        true
    }

    /// Deletes `id` whatever it is now (unknown, known only from events, put, deleted), as a
    /// delete read from the Kafka items topic must: once compaction has dropped the put before
    /// it, an instance reading the topic from the start sees the delete alone, and must still
    /// end with the item deleted (hidden from lists even when events or the model name it).
    /// Returns whether the item was in the catalogue.
    pub fn delete_any(&self, id: &ItemId) -> bool {
        let idx = self.intern(id);
        if self.delete(id) {
            return true;
        }
        let mut inner = self.inner.write();
        let entry = &mut inner.items[idx as usize];
        if !entry.deleted {
            // Known only from events until now.
            entry.deleted = true;
            inner.event_only = inner.event_only.saturating_sub(1);
            inner.hidden.insert(idx);
            inner.expiring.remove(&idx);
            inner.reflag(idx);
        }
        false
    }

    /// Items put and not deleted (what `GET /v1/items` pages and `catalog.max_items` bounds).
    pub fn listed(&self) -> usize {
        self.inner.read().listed
    }

    /// How many distinct ids of `ids` putting would add to [`Catalog::listed`]: those unknown,
    /// known only from events, or deleted.
    pub fn unlisted<'a>(&self, ids: impl IntoIterator<Item = &'a ItemId>) -> usize {
        let inner = self.inner.read();
        let mut seen = std::collections::HashSet::new();
        ids.into_iter()
            .filter(|id| seen.insert(*id))
            .filter(|id| {
                inner.find(id).is_none_or(|idx| {
                    let entry = &inner.items[idx as usize];
                    entry.attributes.is_none() || entry.deleted
                })
            })
            .count()
    }

    /// Items lists must not show at `now_ms`: deleted, put with `available: false`, or expired.
    /// Costs one entry per such item; the catalogue keeps no others.
    pub fn unavailable(&self, now_ms: i64) -> Vec<ItemIdx> {
        let inner = self.inner.read();
        let mut out: Vec<ItemIdx> = inner.hidden.iter().copied().collect();
        out.extend(inner.expiring.iter().filter(|(_, &at)| at <= now_ms).map(|(&idx, _)| idx));
        out
    }

    /// Whether lists may show `id` at `now_ms` (an item unknown here is available: lists only
    /// name known items).
    pub fn is_available(&self, id: &ItemId, now_ms: i64) -> bool {
        let inner = self.inner.read();
        inner.find(id).is_none_or(|idx| inner.available_at(idx, now_ms))
    }

    /// Up to `limit` items put into the catalogue from `cursor` on (see [`ItemPage`]). Scans at
    /// most `limit` times 8 entries (at least 1,024), so items known only from events between
    /// catalogue items can shorten a page but never make one slow.
    pub fn page(&self, cursor: Option<ItemIdx>, limit: usize) -> ItemPage {
        let inner = self.inner.read();
        let start = cursor.unwrap_or(0) as usize;
        let budget = limit.saturating_mul(8).max(1024);
        let mut items = Vec::new();
        let mut next = start;
        while next < inner.items.len() && items.len() < limit && next - start < budget {
            let entry = &inner.items[next];
            if entry.attributes.is_some() && !entry.deleted {
                items.push(inner.view(next as ItemIdx));
            }
            next += 1;
        }
        let next_cursor = (next < inner.items.len()).then(|| next.to_string());
        ItemPage { items, next_cursor }
    }

    /// Up to `limit` items of the catalogue (put, deleted or not) that `accept` lets through
    /// (given the item's categories and whether lists may show it at `now_ms`: never a deleted
    /// one, as for every other list, so `availability=unavailable` finds them), newest
    /// `created_at` first; items put without one follow, the most recently known first. One
    /// pass over the catalogue under the read lock.
    pub fn newest(
        &self,
        limit: usize,
        now_ms: i64,
        mut accept: impl FnMut(&[CategoryIdx], bool) -> bool,
    ) -> Vec<ItemIdx> {
        use std::cmp::Reverse;
        let inner = self.inner.read();
        // The best `limit` keys seen, worst on top (a min-heap through `Reverse`).
        let mut best: std::collections::BinaryHeap<Reverse<(Option<i64>, ItemIdx)>> =
            std::collections::BinaryHeap::with_capacity(limit + 1);
        for (idx, entry) in inner.items.iter().enumerate() {
            let Some(attributes) = entry.attributes.as_deref() else { continue };
            let idx = idx as ItemIdx;
            // A deleted item is hidden (unavailable) with no categories: `accept` decides.
            if !accept(&entry.categories, inner.available_at(idx, now_ms)) {
                continue;
            }
            best.push(Reverse((attributes.created_at, idx)));
            if best.len() > limit {
                best.pop();
            }
        }
        best.into_sorted_vec().into_iter().map(|Reverse((_, idx))| idx).collect()
    }

    /// The item, unless it is unknown or was deleted.
    pub fn get(&self, id: &ItemId) -> Option<ItemView> {
        let inner = self.inner.read();
        let idx = inner.find(id)?;
        if inner.items[idx as usize].deleted {
            return None;
        }
        Some(inner.view(idx))
    }

    /// The item id at `idx`.
    pub fn id_of(&self, idx: ItemIdx) -> Option<ItemId> {
        self.inner.read().items.get(idx as usize).map(|e| e.id.clone())
    }

    /// The items at `indices` as `GET /v1/items/{item_id}` shows them (deleted ones too, as
    /// unavailable), under one lock.
    pub fn views_of(&self, indices: &[ItemIdx]) -> Vec<ItemView> {
        let inner = self.inner.read();
        indices.iter().map(|&i| inner.view(i)).collect()
    }

    /// Item ids for many indices under one lock.
    pub fn ids_of(&self, indices: &[ItemIdx]) -> Vec<ItemId> {
        let inner = self.inner.read();
        indices.iter().map(|&i| inner.items[i as usize].id.clone()).collect()
    }

    pub fn category_idx(&self, name: &str) -> Option<CategoryIdx> {
        self.inner.read().category_index.get(name).copied()
    }

    /// A read view of every item's categories; holds the read lock while alive, so keep it short.
    pub fn categories(&self) -> Categories<'_> {
        Categories { inner: self.inner.read() }
    }
}

/// Category lookups under one read lock.
pub struct Categories<'a> {
    inner: parking_lot::RwLockReadGuard<'a, Inner>,
}

impl Categories<'_> {
    /// The categories of `idx` (empty for an unknown item or one without attributes).
    pub fn of(&self, idx: ItemIdx) -> &[CategoryIdx] {
        self.inner.items.get(idx as usize).map_or(&[][..], |e| e.categories.as_slice())
    }

    /// The name of category `idx`.
    pub fn name(&self, idx: CategoryIdx) -> Option<&str> {
        self.inner.category_names.get(usize::from(idx)).map(|n| &**n)
    }

    /// Whether lists may show `idx` at `now_ms` (see [`Catalog::unavailable`]): one bit test
    /// for the items that were never withdrawn, deleted or given an expiry.
    pub fn available_at(&self, idx: ItemIdx, now_ms: i64) -> bool {
        self.inner.available_at(idx, now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_index_finds_every_item_through_its_growth_and_shares_the_ids() {
        let catalog = Catalog::new();
        let ids: Vec<ItemId> = (0..20_000).map(|i| ItemId::from(format!("item-{i}").as_str())).collect();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(catalog.intern(id), i as ItemIdx, "dense, in arrival order");
        }
        for (i, id) in ids.iter().enumerate() {
            // A separate allocation of the same text finds the same index and the catalogue's copy.
            let again = ItemId::from(id.as_str());
            assert_eq!(catalog.lookup(&again), Some(i as ItemIdx));
            let (idx, shared) = catalog.intern_shared(&again);
            assert_eq!(idx, i as ItemIdx);
            assert!(Arc::ptr_eq(&shared.0, &catalog.ids_of(&[idx])[0].0), "the catalogue's own id");
        }
        assert_eq!(catalog.len(), ids.len());
        assert_eq!(catalog.lookup(&ItemId::from("item-20000")), None);
        assert_eq!(catalog.intern(&ItemId::from("item-20000")), 20_000);
    }

    #[test]
    fn interns_once_and_keeps_attributes() {
        let catalog = Catalog::new();
        let a = ItemId::from("a");
        let idx = catalog.intern(&a);
        assert_eq!(catalog.intern(&a), idx);
        assert!(!catalog.get(&a).expect("known").in_catalog);
        let attrs = ItemAttributes { categories: vec!["jazz".into()], ..Default::default() };
        assert_eq!(catalog.put(&a, attrs.clone()), (idx, true));
        assert_eq!(catalog.put(&a, attrs), (idx, false));
        let jazz = catalog.category_idx("jazz").expect("category");
        assert_eq!(catalog.categories().of(idx), &[jazz]);
        assert_eq!(catalog.id_of(idx), Some(a));
    }

    #[test]
    fn newest_orders_by_created_at_then_by_arrival_and_filters() {
        let catalog = Catalog::new();
        let put = |id: &str, created_at: Option<i64>, available: Option<bool>| {
            let attrs = ItemAttributes { created_at, available, ..Default::default() };
            catalog.put(&ItemId::from(id), attrs).0
        };
        let old = put("old", Some(1), None);
        let undated = put("undated", None, None);
        let new = put("new", Some(5), None);
        let later_undated = put("later-undated", None, None);
        let withdrawn = put("withdrawn", Some(9), Some(false));
        let gone = put("gone", Some(10), None);
        catalog.delete(&ItemId::from("gone"));
        catalog.intern(&ItemId::from("event-only"));
        // A deleted item is an unavailable one, as in every list: the filter decides.
        let all = catalog.newest(10, 0, |_, _| true);
        assert_eq!(all, vec![gone, withdrawn, new, old, later_undated, undated]);
        assert_eq!(catalog.newest(2, 0, |_, available| available), vec![new, old]);
        assert_eq!(catalog.newest(10, 0, |_, available| !available), vec![gone, withdrawn]);
    }

    #[test]
    fn rejects_oversized_attributes() {
        let attrs = ItemAttributes { tags: vec![String::new()], ..Default::default() };
        assert_eq!(attrs.validate().expect_err("empty tag").field, "tags");
        let attrs = ItemAttributes { title: Some("x".repeat(MAX_TITLE_LEN + 1)), ..Default::default() };
        assert_eq!(attrs.validate().expect_err("long title").field, "title");
    }

    #[test]
    fn events_add_items_up_to_the_cap_whole_batches_or_nothing() {
        let catalog = Catalog::with_admission(Admission { accept_unknown_items: true, max_event_items: 3 });
        let ids: Vec<ItemId> = (0..6).map(|i| ItemId::from(format!("i{i}").as_str())).collect();
        catalog.put(&ids[5], ItemAttributes::default());
        assert_eq!(catalog.admit([&ids[0], &ids[0], &ids[1]]), Ok(()));
        assert_eq!(catalog.event_only(), 2);
        // Two new items with room for one: nothing is added, and the second is named.
        let refused = catalog.admit([&ids[1], &ids[2], &ids[5], &ids[3]]);
        assert_eq!(refused, Err((3, RefusedItem::TooManyUnknown { max: 3 })));
        assert_eq!((catalog.len(), catalog.event_only()), (3, 2), "a refused batch adds nothing");
        assert_eq!(catalog.admit([&ids[2], &ids[0], &ids[5]]), Ok(()));
        assert_eq!(catalog.admit([&ids[3]]).map_err(|(_, why)| why.code()), Err("too_many_unknown_items"));
        assert_eq!(catalog.admit([&ids[0], &ids[5]]), Ok(()), "known items always pass");
        // Putting an item makes room: it is no longer known only from events.
        catalog.put(&ids[0], ItemAttributes::default());
        assert_eq!(catalog.admit([&ids[3]]), Ok(()));
        assert_eq!((catalog.len(), catalog.event_only()), (5, 3));
    }

    #[test]
    fn lookup_live_finds_what_get_finds() {
        let catalog = Catalog::new();
        let (put, event_only, deleted) = (ItemId::from("put"), ItemId::from("event-only"), ItemId::from("deleted"));
        catalog.put(&put, ItemAttributes::default());
        catalog.put(&deleted, ItemAttributes::default());
        catalog.intern(&event_only);
        assert!(catalog.delete(&deleted));
        for id in [&put, &event_only, &deleted, &ItemId::from("unknown")] {
            assert_eq!(catalog.lookup_live(id).is_some(), catalog.get(id).is_some(), "{id}");
        }
        assert_eq!(catalog.lookup_live(&put), catalog.lookup(&put));
        assert_eq!(catalog.lookup_live(&deleted), None);
    }

    #[test]
    fn newest_finds_deleted_items_among_the_unavailable_as_other_lists_do() {
        let catalog = Catalog::new();
        for (id, created_at) in [("kept", 1), ("withdrawn", 2), ("deleted", 3)] {
            catalog.put(&ItemId::from(id), ItemAttributes { created_at: Some(created_at), ..Default::default() });
        }
        catalog.put(
            &ItemId::from("withdrawn"),
            ItemAttributes { created_at: Some(2), available: Some(false), ..Default::default() },
        );
        assert!(catalog.delete(&ItemId::from("deleted")));
        let newest = |want_available: Option<bool>| {
            let found = catalog.newest(10, 0, |_, available| want_available.is_none_or(|want| want == available));
            catalog.ids_of(&found).iter().map(ItemId::to_string).collect::<Vec<_>>()
        };
        assert_eq!(newest(Some(true)), ["kept"]);
        assert_eq!(newest(Some(false)), ["deleted", "withdrawn"]);
        assert_eq!(newest(None), ["deleted", "withdrawn", "kept"]);
        let views = catalog.views_of(&catalog.newest(10, 0, |_, available| !available));
        assert_eq!(
            views.iter().map(|v| (v.item_id.to_string(), v.available)).collect::<Vec<_>>(),
            [("deleted".to_owned(), false), ("withdrawn".to_owned(), false)]
        );
    }

    #[test]
    fn deleted_withdrawn_and_expired_items_are_unavailable_and_pages_skip_the_deleted() {
        let catalog = Catalog::new();
        let ids: Vec<ItemId> = (0..5).map(|i| ItemId::from(format!("i{i}").as_str())).collect();
        for id in &ids {
            catalog.put(id, ItemAttributes::default());
        }
        catalog.intern(&ItemId::from("event-only"));
        catalog.put(&ids[1], ItemAttributes { available: Some(false), ..Default::default() });
        catalog.put(&ids[2], ItemAttributes { expires_at: Some(1_000), ..Default::default() });
        assert!(catalog.delete(&ids[3]));
        assert!(!catalog.delete(&ids[3]), "already deleted");
        assert!(!catalog.delete(&ItemId::from("event-only")), "not a catalogue item");
        let mut gone = catalog.unavailable(999);
        gone.sort_unstable();
        assert_eq!(gone, vec![1, 3], "not yet expired at 999");
        let mut gone = catalog.unavailable(1_000);
        gone.sort_unstable();
        assert_eq!(gone, vec![1, 2, 3]);
        assert!(catalog.get(&ids[3]).is_none());
        let view = catalog.categories();
        let available: Vec<bool> = (0..6).map(|i| view.available_at(i, 1_000)).collect();
        assert_eq!(available, [true, false, false, false, true, true], "the bitset agrees with unavailable()");
        assert!(view.available_at(2, 999) && view.available_at(1_000, 0), "not yet expired; unknown index");
        drop(view);
        let first = catalog.page(None, 2);
        let ids_of = |p: &ItemPage| p.items.iter().map(|v| v.item_id.to_string()).collect::<Vec<_>>();
        assert_eq!(ids_of(&first), ["i0", "i1"]);
        let second = catalog.page(first.next_cursor.as_deref().map(|c| c.parse().expect("cursor")), 10);
        assert_eq!(ids_of(&second), ["i2", "i4"]);
        assert_eq!(second.next_cursor, None);
        // Put again, it is back and available.
        assert_eq!(catalog.put(&ids[3], ItemAttributes::default()), (3, true));
        assert!(catalog.is_available(&ids[3], 0));
        assert!(catalog.categories().available_at(3, 0), "the bit is cleared");
    }

    #[test]
    fn listed_counts_items_put_and_not_deleted_and_a_delete_may_come_first() {
        let catalog = Catalog::new();
        let (a, b, c) = (ItemId::from("a"), ItemId::from("b"), ItemId::from("c"));
        catalog.intern(&c);
        catalog.put(&a, ItemAttributes::default());
        catalog.put(&a, ItemAttributes::default());
        assert_eq!(catalog.listed(), 1, "a replaced item counts once");
        assert_eq!(catalog.unlisted([&a, &b, &b, &c]), 2, "b is new and c known only from events");
        assert!(catalog.delete(&a));
        assert_eq!((catalog.listed(), catalog.unlisted([&a])), (0, 1));
        // A delete of an item this catalogue never saw put (its put compacted away): deleted all the same.
        assert!(!catalog.delete_any(&b));
        assert!(!catalog.is_available(&b, 0) && catalog.get(&b).is_none());
        assert!(!catalog.delete_any(&c));
        assert_eq!((catalog.event_only(), catalog.listed()), (0, 0));
        assert!(!catalog.is_available(&c, 0));
        let c_idx = catalog.intern(&c);
        assert!(!catalog.categories().available_at(c_idx, 0), "the models see the delete too");
        assert!(catalog.put(&b, ItemAttributes::default()).1, "put again, it is back");
        assert_eq!(catalog.listed(), 1);
    }

    #[test]
    fn unknown_items_can_be_refused_altogether() {
        let catalog = Catalog::with_admission(Admission { accept_unknown_items: false, max_event_items: 0 });
        let (known, unknown) = (ItemId::from("known"), ItemId::from("new"));
        catalog.put(&known, ItemAttributes::default());
        assert_eq!(catalog.admit([&known, &unknown]), Err((1, RefusedItem::Unknown)));
        assert_eq!(catalog.lookup(&unknown), None);
        // Without a cap, anything may be interned directly (stored profiles, admitted events).
        catalog.intern(&unknown);
        assert_eq!(catalog.admit([&unknown]), Ok(()));
    }
}
