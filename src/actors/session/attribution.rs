//! Click and conversion attribution: the lists a session served to its user, and which of them
//! an event is a click or a conversion on. Pure state, so the rules are tested without an actor.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actors::monitor::{Outcome, OutcomeKind};
use crate::event::{EventType, ItemId};
use crate::recs::RecList;

/// Lists remembered per user for attribution.
const SERVED_KEPT: usize = 8;

/// A list served to the user, remembered to attribute clicks and conversions to it.
struct Served {
    rec_id: String,
    items: Vec<ItemId>,
    version: Arc<str>,
    variant: Arc<str>,
    at: Instant,
    clicked: bool,
    converted: bool,
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
    pub event_type: EventType,
    pub value: Option<f64>,
}

impl ServedLists {
    /// Remembers `list`, served at `at`, forgetting the oldest beyond `SERVED_KEPT`.
    pub(super) fn remember(&mut self, list: &RecList, at: Instant) {
        self.lists.push_back(Served {
            rec_id: list.rec_id.clone(),
            items: list.items.iter().map(|i| i.item_id.clone()).collect(),
            version: Arc::from(list.model_version.as_str()),
            variant: Arc::from(list.variant.as_str()),
            at,
            clicked: false,
            converted: false,
        });
        while self.lists.len() > SERVED_KEPT {
            self.lists.pop_front();
        }
    }

    /// The outcomes `event` makes at `now` on a served list: the one it names by `rec_id`, else
    /// the newest list within `window` that showed the item. Each list counts at most one click
    /// and one conversion, so a repeated click yields no outcome but is still attributed. `None`
    /// when the event is on no recent list (an organic event).
    pub(super) fn attribute(&mut self, event: &Interacted<'_>, now: Instant, window: Duration) -> Option<Vec<Outcome>> {
        let named = event.rec_id.and_then(|id| self.lists.iter().position(|s| s.rec_id == id));
        let served = match named {
            Some(i) => self.lists.get_mut(i),
            None => self
                .lists
                .iter_mut()
                .rev()
                .find(|s| now.saturating_duration_since(s.at) <= window && s.items.contains(event.item)),
        }?;
        let position = served.items.iter().position(|i| i == event.item);
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
        Some(
            outcomes
                .into_iter()
                .map(|kind| Outcome {
                    version: served.version.clone(),
                    variant: served.variant.clone(),
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
    use crate::event::UserId;
    use crate::recs::RecItem;

    fn list(rec_id: &str, items: &[&str]) -> RecList {
        RecList {
            rec_id: rec_id.into(),
            user_id: UserId::from("u1"),
            model_version: "v1".into(),
            variant: "control".into(),
            generated_at: 0,
            seq: 1,
            last_event_id: None,
            items: items.iter().map(|i| RecItem { item_id: ItemId::from(*i), score: 1.0 }).collect(),
        }
    }

    fn event<'a>(rec_id: Option<&'a str>, item: &'a ItemId, event_type: EventType) -> Interacted<'a> {
        Interacted { rec_id, item, event_type, value: Some(9.5) }
    }

    fn kinds(outcomes: &Option<Vec<Outcome>>) -> Option<Vec<OutcomeKind>> {
        outcomes.as_ref().map(|o| o.iter().map(|o| o.kind).collect())
    }

    const WINDOW: Duration = Duration::from_secs(60);

    #[test]
    fn a_click_named_by_rec_id_goes_to_that_list_even_if_a_newer_one_shows_the_item() {
        let start = Instant::now();
        let mut served = ServedLists::default();
        served.remember(&list("old", &["a", "b"]), start);
        served.remember(&list("new", &["b", "a"]), start);
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
    fn a_click_by_item_goes_to_the_newest_list_within_the_window() {
        let start = Instant::now();
        let mut served = ServedLists::default();
        served.remember(&list("r1", &["a"]), start);
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
        served.remember(&list("r1", &["a", "b"]), start);
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
        served.remember(&list("r1", &["a"]), start);
        let b = ItemId::from("b");
        assert!(served.attribute(&event(Some("r1"), &b, EventType::Click), start, WINDOW).is_none());
    }

    #[test]
    fn only_the_newest_lists_are_kept() {
        let start = Instant::now();
        let mut served = ServedLists::default();
        for n in 0..=SERVED_KEPT {
            served.remember(&list(&format!("r{n}"), &[&format!("i{n}")]), start);
        }
        let first = ItemId::from("i0");
        assert!(served.attribute(&event(Some("r0"), &first, EventType::Click), start, WINDOW).is_none());
        let last = ItemId::from(format!("i{SERVED_KEPT}").as_str());
        assert!(served.attribute(&event(None, &last, EventType::Click), start, WINDOW).is_some());
    }
}
