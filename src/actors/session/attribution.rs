//! Click and conversion attribution: the lists a session served to its user, and which of them
//! an event is a click or a conversion on. Pure state, so the rules are tested without an actor.
//!
//! CTR is a share by construction: only a list that was shown (reported once as an impression,
//! [`RecUpdate::show`]) can take a click, and each list takes at most one. A list published to
//! nobody, or whose impression the monitor refused, is no impression and gets no click.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actors::monitor::{Outcome, OutcomeKind};
use crate::catalog::{Catalog, ItemIdx};
use crate::event::{EventId, EventType, ItemId, UserId};
use crate::recs::{RecItem, RecList, RecUpdate};

/// Lists remembered per user for attribution.
const SERVED_KEPT: usize = 8;

/// A list served to the user, remembered to attribute clicks and conversions to it.
struct Served {
    list: Kept,
    at: Instant,
    clicked: bool,
    converted: bool,
}

/// A remembered list: the newest as published (shared with the user's hub), older ones as
/// what attribution reads of them.
enum Kept {
    Published(Arc<RecUpdate>),
    /// Boxed: a session that served one list (most) keeps no room for it.
    Compact(Box<Compact>),
}

/// What attribution keeps of a list once a newer one is out: its id (a UUID in its 16 bytes),
/// its arm (strings shared with the user's other kept lists of the same arm), its items as
/// catalogue indices (4 bytes an item; 16 as a shared id), and whether it was shown (shared with
/// the published list, which a stream may still show). About 210 bytes with ten items, where the
/// published list without its serialised forms took about 700 (`tests/heap_per_user.rs`).
struct Compact {
    rec_id: EventId,
    version: Arc<str>,
    variant: Arc<str>,
    items: Box<[ItemIdx]>,
    shown: Arc<AtomicBool>,
}

impl Kept {
    fn is(&self, rec_id: &str) -> bool {
        match self {
            Kept::Published(update) => update.list.rec_id == rec_id,
            Kept::Compact(compact) => *compact.rec_id.as_str() == *rec_id,
        }
    }

    fn is_shown(&self) -> bool {
        match self {
            Kept::Published(update) => update.is_shown(),
            Kept::Compact(compact) => compact.shown.load(Ordering::Acquire),
        }
    }

    /// Where the item `id` (catalogue index `idx`) is in the list.
    fn position(&self, id: &ItemId, idx: ItemIdx) -> Option<usize> {
        match self {
            Kept::Published(update) => update.list.items.iter().position(|i| i.item_id == *id),
            Kept::Compact(compact) => compact.items.iter().position(|&i| i == idx),
        }
    }

    /// The list's version and variant, as the monitor's shared strings.
    fn arm(&self) -> (Arc<str>, Arc<str>) {
        match self {
            Kept::Published(update) => (update.list.model_version.as_str().into(), update.list.variant.as_str().into()),
            Kept::Compact(compact) => (compact.version.clone(), compact.variant.clone()),
        }
    }

    /// The compact form of a published list; `like` is a kept list whose arm strings it shares
    /// when the arm is the same. None when an item is not in `catalog` (a list scored by another
    /// instance that names an item this one has not seen): that list stays as published.
    fn compact(update: &RecUpdate, like: Option<&Compact>, catalog: &Catalog) -> Option<Compact> {
        let list = &update.list;
        let share = |kept: Option<&Arc<str>>, text: &str| match kept {
            Some(s) if **s == *text => s.clone(),
            _ => Arc::from(text),
        };
        Some(Compact {
            rec_id: EventId::from(list.rec_id.as_str()),
            version: share(like.map(|c| &c.version), &list.model_version),
            variant: share(like.map(|c| &c.variant), &list.variant),
            items: catalog.lookup_all(list.items.iter().map(|i| &i.item_id))?,
            shown: update.shown_flag(),
        })
    }
}

/// Appends `item` to `queue`, dropping the oldest beyond `max`. The room grows by doubling from
/// one, never past `max`: most users of a busy server have one or two events while their session
/// lives (a first push reserves four: 0.6 KB a user), and a full history of 50 kept room for 64
/// (1.2 KB a user, `tests/heap_per_user.rs`).
pub(super) fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, max: usize) {
    if max == 0 {
        return;
    }
    while queue.len() >= max {
        queue.pop_front();
    }
    if queue.len() == queue.capacity() {
        queue.reserve_exact(crate::store::growth_within(queue.len(), max));
    }
    queue.push_back(item);
}

/// The last lists served to one user, newest last.
#[derive(Default)]
pub(super) struct ServedLists {
    lists: VecDeque<Served>,
}

/// What an applied event is, as attribution sees it.
pub(super) struct Interacted<'a> {
    /// The list the client says the event came from (`rec_id` on the event).
    pub rec_id: Option<&'a str>,
    pub item: &'a ItemId,
    /// `item`'s catalogue index.
    pub item_idx: ItemIdx,
    pub event_type: EventType,
    pub value: Option<f64>,
}

impl ServedLists {
    /// Remembers `list`, served at `at`, forgetting the oldest beyond `SERVED_KEPT`.
    /// The list served before keeps only what attribution reads (see [`Compact`]).
    pub(super) fn remember(&mut self, update: &Arc<RecUpdate>, at: Instant, catalog: &Catalog) {
        let newest = self.lists.len().checked_sub(1);
        if let Some(i) = newest {
            if let Kept::Published(previous) = &self.lists[i].list {
                let like = i.checked_sub(1).and_then(|j| match &self.lists[j].list {
                    Kept::Compact(compact) => Some(&**compact),
                    Kept::Published(_) => None,
                });
                if let Some(compact) = Kept::compact(previous, like, catalog) {
                    self.lists[i].list = Kept::Compact(Box::new(compact));
                }
            }
        }
        let served = Served { list: Kept::Published(update.clone()), at, clicked: false, converted: false };
        push_bounded(&mut self.lists, served, SERVED_KEPT);
    }

    /// The remembered list named `rec_id`, if any, as `user`'s list (an older one rebuilt from
    /// what was kept of it: its arm, items and shown flag).
    pub(super) fn named(&self, rec_id: &str, user: &UserId, catalog: &Catalog) -> Option<Arc<RecUpdate>> {
        let served = self.lists.iter().find(|s| s.list.is(rec_id))?;
        Some(match &served.list {
            Kept::Published(update) => update.clone(),
            Kept::Compact(compact) => RecUpdate::sharing_shown(
                RecList {
                    rec_id: rec_id.to_owned(),
                    user_id: user.clone(),
                    model_version: compact.version.to_string(),
                    variant: compact.variant.to_string(),
                    generated_at: 0,
                    seq: 0,
                    last_event_id: None,
                    items: catalog
                        .ids_of(&compact.items)
                        .into_iter()
                        .map(|item_id| RecItem { item_id, score: 0.0 })
                        .collect(),
                },
                compact.shown.clone(),
            ),
        })
    }

    /// The outcomes `event` makes at `now` on a shown list: the one it names by `rec_id`, else
    /// the newest shown list within `window` that holds the item. Each list counts at most one
    /// click and one conversion, so a repeated click yields no outcome but is still attributed.
    /// `None` when the event is on no recent shown list (an organic event).
    pub(super) fn attribute(&mut self, event: &Interacted<'_>, now: Instant, window: Duration) -> Option<Vec<Outcome>> {
        let named = event.rec_id.and_then(|id| self.lists.iter().position(|s| s.list.is(id)));
        let served = match named {
            Some(i) => self.lists.get_mut(i).filter(|s| s.list.is_shown()),
            None => self.lists.iter_mut().rev().find(|s| {
                s.list.is_shown()
                    && now.saturating_duration_since(s.at) <= window
                    && s.list.position(event.item, event.item_idx).is_some()
            }),
        }?;
        let position = served.list.position(event.item, event.item_idx);
        position?;
        let mut outcomes = Vec::new();
        if !served.clicked {
            served.clicked = true;
            outcomes.push(OutcomeKind::Click);
        }
        let converts = matches!(event.event_type, EventType::Purchase | EventType::AddToCart);
        if converts && !served.converted {
            served.converted = true;
            outcomes.push(OutcomeKind::Conversion);
        }
        // The monitor's shared strings (made here for the newest list: clicks are rarer than
        // served lists).
        let (version, variant) = served.list.arm();
        Some(
            outcomes
                .into_iter()
                .map(|kind| Outcome {
                    version: version.clone(),
                    variant: variant.clone(),
                    kind,
                    position,
                    value: if kind == OutcomeKind::Conversion { event.value } else { None },
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use crate::event::UserId;
    use crate::recs::{RecItem, RecList};

    /// The catalogue of every test here: lists name its items, events carry their indices.
    fn catalog() -> &'static Catalog {
        static CATALOG: std::sync::LazyLock<Catalog> = std::sync::LazyLock::new(Catalog::new);
        &CATALOG
    }

    fn unshown(rec_id: &str, items: &[&str]) -> Arc<RecUpdate> {
        for item in items {
            catalog().intern(&ItemId::from(*item));
        }
        RecUpdate::new(RecList {
            rec_id: rec_id.into(),
            user_id: UserId::from("u1"),
            model_version: "v1".into(),
            variant: "control".into(),
            generated_at: 0,
            seq: 1,
            last_event_id: None,
            items: items.iter().map(|i| RecItem { item_id: ItemId::from(*i), score: 1.0 }).collect(),
        })
    }

    /// A list that was shown (counted as an impression).
    fn list(rec_id: &str, items: &[&str]) -> Arc<RecUpdate> {
        let update = unshown(rec_id, items);
        assert!(update.show());
        update
    }

    fn event<'a>(rec_id: Option<&'a str>, item: &'a ItemId, event_type: EventType) -> Interacted<'a> {
        Interacted { rec_id, item, item_idx: catalog().intern(item), event_type, value: Some(9.5) }
    }

    fn kinds(outcomes: &Option<Vec<Outcome>>) -> Option<Vec<OutcomeKind>> {
        outcomes.as_ref().map(|o| o.iter().map(|o| o.kind).collect())
    }

    const WINDOW: Duration = Duration::from_secs(60);

    #[test]
    fn a_click_named_by_rec_id_goes_to_that_list_even_if_a_newer_one_shows_the_item() {
        let start = Instant::now();
        let mut served = ServedLists::default();
        served.remember(&list("old", &["a", "b"]), start, catalog());
        served.remember(&list("new", &["b", "a"]), start, catalog());
        let b = ItemId::from("b");
        let outcomes = served.attribute(&event(Some("old"), &b, EventType::Click), start, WINDOW);
        let outcomes = outcomes.expect("attributed");
        assert_eq!(outcomes.len(), 1);
        assert_eq!(outcomes[0].position, Some(1));
        // The newer list was not clicked yet: a click on it by item still counts.
        let again = served.attribute(&event(None, &b, EventType::Click), start, WINDOW);
        assert_eq!(kinds(&again), Some(vec![OutcomeKind::Click]));
        assert_eq!(again.expect("attributed")[0].position, Some(0));
    }

    #[test]
    fn a_list_naming_an_item_this_catalogue_lacks_stays_published_and_is_still_clicked() {
        let start = Instant::now();
        let mut served = ServedLists::default();
        // Scored by another instance: "elsewhere-only" never reached this catalogue.
        let foreign = list("foreign", &["a"]);
        let mut items = foreign.list.items.clone();
        items.push(RecItem { item_id: ItemId::from("elsewhere-only"), score: 0.5 });
        let foreign = RecUpdate::new(RecList { items, ..foreign.list.clone() });
        assert!(foreign.show());
        served.remember(&foreign, start, catalog());
        served.remember(&list("next", &["b"]), start, catalog());
        assert!(matches!(served.lists[0].list, Kept::Published(_)), "not compacted without every index");
        let user = UserId::from("u1");
        let named = served.named("foreign", &user, catalog()).expect("named");
        assert_eq!(named.list.items.len(), 2);
        let unknown = ItemId::from("elsewhere-only");
        let event = Interacted {
            rec_id: Some("foreign"),
            item: &unknown,
            item_idx: ItemIdx::MAX,
            event_type: EventType::Click,
            value: None,
        };
        let outcomes = served.attribute(&event, start, WINDOW).expect("attributed");
        assert_eq!(outcomes[0].position, Some(1));
    }

    #[test]
    fn an_older_list_kept_compact_is_named_shown_and_clicked_like_the_published_one() {
        let start = Instant::now();
        let mut served = ServedLists::default();
        let rec_id = "0192f0c4-1a2b-7c3d-8e4f-5a6b7c8d9e0f";
        let old = unshown(rec_id, &["a", "b"]);
        served.remember(&old, start, catalog());
        served.remember(&list("new", &["c"]), start, catalog());
        assert!(matches!(served.lists[0].list, Kept::Compact(_)), "the older list is kept compact");
        let user = UserId::from("u1");
        let named = served.named(rec_id, &user, catalog()).expect("named");
        assert_eq!((named.list.rec_id.as_str(), named.list.model_version.as_str()), (rec_id, "v1"));
        let ids: Vec<&str> = named.list.items.iter().map(|i| i.item_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        // Showing the rebuilt list shows the published one: one impression, then clickable.
        assert!(named.show());
        assert!(!old.show(), "one flag for both");
        let b = ItemId::from("b");
        let outcomes = served.attribute(&event(Some(rec_id), &b, EventType::Click), start, WINDOW);
        assert_eq!(outcomes.expect("attributed")[0].position, Some(1));
    }

    #[test]
    fn a_click_by_item_goes_to_the_newest_list_within_the_window() {
        let start = Instant::now();
        let mut served = ServedLists::default();
        served.remember(&list("r1", &["a"]), start, catalog());
        let a = ItemId::from("a");
        let late = start + WINDOW + Duration::from_secs(1);
        assert!(served.attribute(&event(None, &a, EventType::Click), late, WINDOW).is_none());
        let within = start + WINDOW;
        assert_eq!(
            kinds(&served.attribute(&event(None, &a, EventType::Click), within, WINDOW)),
            Some(vec![OutcomeKind::Click])
        );
        let other = ItemId::from("z");
        assert!(served.attribute(&event(None, &other, EventType::Click), start, WINDOW).is_none());
    }

    #[test]
    fn each_list_counts_one_click_and_one_conversion() {
        let start = Instant::now();
        let mut served = ServedLists::default();
        served.remember(&list("r1", &["a", "b"]), start, catalog());
        let (a, b) = (ItemId::from("a"), ItemId::from("b"));
        assert_eq!(
            kinds(&served.attribute(&event(Some("r1"), &a, EventType::Click), start, WINDOW)),
            Some(vec![OutcomeKind::Click])
        );
        // A second click on the same list is attributed (not organic) but counts nothing more.
        assert_eq!(kinds(&served.attribute(&event(Some("r1"), &b, EventType::Click), start, WINDOW)), Some(vec![]));
        let bought = served.attribute(&event(Some("r1"), &a, EventType::Purchase), start, WINDOW);
        assert_eq!(kinds(&bought), Some(vec![OutcomeKind::Conversion]));
        assert_eq!(bought.expect("attributed")[0].value, Some(9.5));
        assert_eq!(kinds(&served.attribute(&event(Some("r1"), &a, EventType::Purchase), start, WINDOW)), Some(vec![]));
    }

    #[test]
    fn a_named_list_without_the_item_is_no_attribution() {
        let start = Instant::now();
        let mut served = ServedLists::default();
        served.remember(&list("r1", &["a"]), start, catalog());
        let b = ItemId::from("b");
        assert!(served.attribute(&event(Some("r1"), &b, EventType::Click), start, WINDOW).is_none());
    }

    #[test]
    fn only_the_newest_lists_are_kept() {
        let start = Instant::now();
        let mut served = ServedLists::default();
        for n in 0..=SERVED_KEPT {
            served.remember(&list(&format!("r{n}"), &[&format!("i{n}")]), start, catalog());
        }
        let first = ItemId::from("i0");
        assert!(served.attribute(&event(Some("r0"), &first, EventType::Click), start, WINDOW).is_none());
        let last = ItemId::from(format!("i{SERVED_KEPT}").as_str());
        assert!(served.attribute(&event(None, &last, EventType::Click), start, WINDOW).is_some());
    }

    /// The sequence of issue 12: a list published to nobody, shown once by a GET, two clicks
    /// naming it, then events without `rec_id` on items of later lists nobody saw. One
    /// impression, one click.
    #[test]
    fn lists_nobody_saw_take_no_clicks_and_a_shown_list_takes_one() {
        let start = Instant::now();
        let mut served = ServedLists::default();
        let first = unshown("r1", &["a", "b", "c", "d"]);
        served.remember(&first, start, catalog());
        let (a, b, c, d) = (ItemId::from("a"), ItemId::from("b"), ItemId::from("c"), ItemId::from("d"));
        // Published to no subscriber: not clickable yet.
        assert!(served.attribute(&event(Some("r1"), &a, EventType::Click), start, WINDOW).is_none());
        assert!(first.show(), "the GET shows it");
        assert!(!first.show(), "showing it again is no new impression");
        let mut clicks = 0;
        let mut count = |outcomes: Option<Vec<Outcome>>| {
            clicks += outcomes.unwrap_or_default().iter().filter(|o| o.kind == OutcomeKind::Click).count();
        };
        count(served.attribute(&event(Some("r1"), &a, EventType::Click), start, WINDOW));
        // Each event publishes a new list to nobody.
        served.remember(&unshown("r2", &["b", "c", "d"]), start, catalog());
        count(served.attribute(&event(Some("r1"), &b, EventType::Click), start, WINDOW));
        served.remember(&unshown("r3", &["c", "d"]), start, catalog());
        count(served.attribute(&event(None, &c, EventType::View), start, WINDOW));
        served.remember(&unshown("r4", &["d"]), start, catalog());
        count(served.attribute(&event(None, &d, EventType::Click), start, WINDOW));
        assert_eq!(clicks, 1);
    }

    /// Random sequences of lists (shown or not, on two arms) and events (named or not, on items
    /// in a list or not): per arm and in total, clicks never outnumber impressions.
    #[test]
    fn clicks_never_outnumber_impressions_over_random_sequences() {
        let arms = [("v1", "control"), ("v2", "canary")];
        let items: Vec<ItemId> = (0..6).map(|i| ItemId::from(format!("i{i}").as_str())).collect();
        for item in &items {
            catalog().intern(item);
        }
        let types = [EventType::View, EventType::Click, EventType::Purchase, EventType::AddToCart, EventType::Rating];
        for seed in 0..300u64 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut served = ServedLists::default();
            let mut published: Vec<Arc<RecUpdate>> = Vec::new();
            let mut impressions: HashMap<String, u64> = HashMap::new();
            let mut clicks: HashMap<String, u64> = HashMap::new();
            let mut now = Instant::now();
            for step in 0..200 {
                now += Duration::from_secs(rng.random_range(0..20));
                match rng.random_range(0..4) {
                    0 => {
                        let (version, variant) = arms[rng.random_range(0..arms.len())];
                        let len = rng.random_range(1..=4);
                        let mut update = unshown(&format!("r{step}"), &[]);
                        let list = RecList {
                            model_version: version.into(),
                            variant: variant.into(),
                            items: (0..len)
                                .map(|_| RecItem {
                                    item_id: items[rng.random_range(0..items.len())].clone(),
                                    score: 1.0,
                                })
                                .collect(),
                            ..update.list.clone()
                        };
                        update = RecUpdate::new(list);
                        if rng.random_bool(0.5) && update.show() {
                            *impressions.entry(variant.to_owned()).or_default() += 1;
                        }
                        served.remember(&update, now, catalog());
                        published.push(update);
                    }
                    1 if !published.is_empty() => {
                        // A GET or a new subscriber shows a list (again).
                        let update = &published[rng.random_range(0..published.len())];
                        if update.show() {
                            *impressions.entry(update.list.variant.clone()).or_default() += 1;
                        }
                    }
                    _ => {
                        let rec_id = published
                            .get(rng.random_range(0..published.len().max(1)))
                            .filter(|_| rng.random_bool(0.5))
                            .map(|u| u.list.rec_id.clone());
                        let item = &items[rng.random_range(0..items.len())];
                        let event_type = types[rng.random_range(0..types.len())];
                        let item_idx = catalog().intern(item);
                        let interacted =
                            Interacted { rec_id: rec_id.as_deref(), item, item_idx, event_type, value: None };
                        for outcome in served.attribute(&interacted, now, WINDOW).unwrap_or_default() {
                            if outcome.kind == OutcomeKind::Click {
                                *clicks.entry(outcome.variant.to_string()).or_default() += 1;
                            }
                        }
                    }
                }
            }
            for (variant, &n) in &clicks {
                let shown = impressions.get(variant).copied().unwrap_or(0);
                assert!(n <= shown, "seed {seed}: {variant} has {n} clicks on {shown} impressions");
            }
            let total_clicks: u64 = clicks.values().sum();
            let total_impressions: u64 = impressions.values().sum();
            assert!(total_clicks <= total_impressions, "seed {seed}");
        }
    }
}
