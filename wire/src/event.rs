//! Interaction events: the wire shape, validation, and the enriched form the actors work with.
//!
//! The wire type [`EventIn`] is what producers send (REST, WebSocket, later Kafka). It is checked
//! once by [`EventIn::validate`] against the limits in [`EventLimits`], which turns it into an
//! [`Event`]: ids are non-empty and bounded, the timestamp and event id are filled in, and the
//! enrichment (hour and weekday buckets, device class) is computed once, at ingest.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A user id as the producer sent it (or its anonymous visitor id).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(pub Arc<str>);

/// An item id as the producer sent it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ItemId(pub Arc<str>);

/// An event id: given by the producer, or a UUID v7 assigned by the server. A UUID written the
/// canonical way (lowercase, hyphenated: what the server assigns and most clients send) is kept
/// as its 16 bytes in place; any other id as text. Both read back exactly as they were written.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EventId(EventIdRepr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum EventIdRepr {
    /// A canonical UUID: 16 bytes where the text took a 52-byte allocation (about 3 KB a user
    /// of 50 events, held by the session, the stored profile and the event log).
    Uuid([u8; 16]),
    Text(Arc<str>),
}

impl EventId {
    /// The id of these 16 bytes, as a stored UUID reads back.
    pub fn from_uuid_bytes(bytes: [u8; 16]) -> Self {
        Self(EventIdRepr::Uuid(bytes))
    }

    /// A new UUID v7.
    pub fn new_v7() -> Self {
        Self(EventIdRepr::Uuid(uuid::Uuid::now_v7().into_bytes()))
    }

    /// The id as the producer wrote it.
    pub fn as_str(&self) -> EventIdText<'_> {
        match &self.0 {
            EventIdRepr::Uuid(bytes) => {
                let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
                uuid::Uuid::from_bytes(*bytes).hyphenated().encode_lower(&mut text);
                EventIdText(TextRepr::Uuid(text))
            }
            EventIdRepr::Text(text) => EventIdText(TextRepr::Borrowed(text)),
        }
    }

    /// The id's 16 bytes when it is a canonical UUID.
    pub fn uuid_bytes(&self) -> Option<[u8; 16]> {
        match &self.0 {
            EventIdRepr::Uuid(bytes) => Some(*bytes),
            EventIdRepr::Text(_) => None,
        }
    }
}

/// The text of an [`EventId`] (`Deref<Target = str>`), written out on the stack for a UUID.
pub struct EventIdText<'a>(TextRepr<'a>);

enum TextRepr<'a> {
    Uuid([u8; uuid::fmt::Hyphenated::LENGTH]),
    Borrowed(&'a str),
}

impl std::ops::Deref for EventIdText<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        match &self.0 {
            TextRepr::Uuid(text) => std::str::from_utf8(text).expect("a UUID is ASCII"),
            TextRepr::Borrowed(text) => text,
        }
    }
}

impl fmt::Debug for EventIdText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl PartialEq<&str> for EventIdText<'_> {
    fn eq(&self, other: &&str) -> bool {
        **self == **other
    }
}

impl fmt::Display for EventIdText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("EventId").field(&&*self.as_str()).finish()
    }
}

/// The 16 bytes of `text` if it is a UUID written the canonical way (lowercase, hyphenated), so
/// that writing the bytes back gives `text` again.
pub fn canonical_uuid(text: &str) -> Option<[u8; 16]> {
    let parsed = uuid::Uuid::try_parse(text).ok()?;
    (*parsed.hyphenated().encode_lower(&mut [0u8; uuid::fmt::Hyphenated::LENGTH]) == *text).then(|| parsed.into_bytes())
}

impl From<&str> for EventId {
    fn from(value: &str) -> Self {
        match canonical_uuid(value) {
            Some(bytes) => Self(EventIdRepr::Uuid(bytes)),
            None => Self(EventIdRepr::Text(Arc::from(value))),
        }
    }
}

impl Serialize for EventId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(EventId::from(&*text))
    }
}

macro_rules! id_impls {
    ($($ty:ident),*) => {$(
        impl $ty {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl From<&str> for $ty {
            fn from(value: &str) -> Self {
                Self(Arc::from(value))
            }
        }
    )*};
}
id_impls!(UserId, ItemId);

/// What the user did. `dislike` and `hide` are negative feedback: they suppress the item and lower
/// items similar to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    View,
    Click,
    AddToCart,
    Purchase,
    Rating,
    Dwell,
    Dislike,
    Hide,
}

impl EventType {
    pub const ALL: [EventType; 8] = [
        EventType::View,
        EventType::Click,
        EventType::AddToCart,
        EventType::Purchase,
        EventType::Rating,
        EventType::Dwell,
        EventType::Dislike,
        EventType::Hide,
    ];

    pub fn is_negative(self) -> bool {
        matches!(self, EventType::Dislike | EventType::Hide)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::View => "view",
            EventType::Click => "click",
            EventType::AddToCart => "add_to_cart",
            EventType::Purchase => "purchase",
            EventType::Rating => "rating",
            EventType::Dwell => "dwell",
            EventType::Dislike => "dislike",
            EventType::Hide => "hide",
        }
    }
}

/// Device class of the client that produced the event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    Mobile,
    Desktop,
    Tablet,
    Tv,
    #[default]
    Other,
}

impl Device {
    pub const COUNT: usize = 5;

    pub fn index(self) -> usize {
        match self {
            Device::Mobile => 0,
            Device::Desktop => 1,
            Device::Tablet => 2,
            Device::Tv => 3,
            Device::Other => 4,
        }
    }
}

/// Request context sent with an event.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct ContextIn {
    /// Device class; `other` when absent.
    #[serde(default)]
    pub device: Option<Device>,
    /// Country code (ISO 3166-1 alpha-2 or alpha-3, letters only).
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z]{2,3}$")]
    pub country: Option<String>,
    /// A small free-form map (bounded number of entries and lengths).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// One interaction event as producers send it. This type is the published JSON Schema
/// (`schemas/event.schema.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct EventIn {
    /// The user (or anonymous visitor) id. 1 to `events.max_id_len` characters.
    #[schema(min_length = 1, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$")]
    pub user_id: String,
    /// The item id. 1 to `events.max_id_len` characters.
    #[schema(min_length = 1, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$")]
    pub item_id: String,
    pub event_type: EventType,
    /// Rating (0 to `events.max_rating`, default 5), dwell seconds (0 to `events.max_dwell_secs`,
    /// default 86400) or purchase amount (0 to `events.max_amount`, default 1000000; the same
    /// range for every other event type).
    #[serde(default)]
    #[schemars(range(min = 0))]
    #[schema(minimum = 0)]
    pub value: Option<f64>,
    /// Milliseconds since the Unix epoch; server time when absent. At most a day ahead of the
    /// server's clock.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub timestamp: Option<i64>,
    /// Idempotency key: an event id seen before for the same user is applied once.
    /// The server assigns a UUID v7 when absent.
    #[serde(default)]
    #[schema(min_length = 1, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$")]
    pub event_id: Option<String>,
    /// The recommendation list (`rec_id`) this event responds to.
    #[serde(default)]
    #[schema(min_length = 1, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$")]
    pub rec_id: Option<String>,
    #[serde(default)]
    pub context: Option<ContextIn>,
}

// The positional form. serde's derived `Deserialize` of a struct also accepts a JSON array of
// its fields in declaration order (`["u", "i", "click"]`, `"context": []`), which the schema
// does not allow and nobody means to send. `remote = "Self"` turns the derives above into
// inherent functions; the trait impls below ask for a struct, take only a map (an object), and
// hand it to the derived code as it is, so an object decodes exactly as before, without
// buffering, and an array is "invalid type: sequence, expected an object".
macro_rules! object_only {
    ($($ty:ident),*) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct ObjectOnly;
                impl<'de> serde::de::Visitor<'de> for ObjectOnly {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("an object")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<$ty, A::Error> {
                        $ty::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    }
                }
                deserializer.deserialize_map(ObjectOnly)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                $ty::serialize(self, serializer)
            }
        }
    )*};
}
object_only!(EventIn, ContextIn);

/// Limits applied by [`EventIn::validate`], from the `[events]` config section.
#[derive(Clone, Debug)]
pub struct EventLimits {
    pub max_id_len: usize,
    pub max_context_attributes: usize,
    pub max_context_key_len: usize,
    pub max_context_value_len: usize,
    /// Highest `value` of a `rating` (ratings run from 0 to this).
    pub max_rating: f64,
    /// Highest `value` of a `dwell`, in seconds.
    pub max_dwell_secs: f64,
    /// Highest `value` of a `purchase` or `add_to_cart` (an amount), and of any other type.
    pub max_amount: f64,
}

impl EventLimits {
    /// The range `value` must lie in for `event_type`, and what the value means (for the error).
    pub fn value_range(&self, event_type: EventType) -> (f64, f64, &'static str) {
        match event_type {
            EventType::Rating => (0.0, self.max_rating, "a rating"),
            EventType::Dwell => (0.0, self.max_dwell_secs, "dwell seconds"),
            EventType::Purchase | EventType::AddToCart => (0.0, self.max_amount, "an amount"),
            _ => (0.0, self.max_amount, "a value"),
        }
    }
}

impl Default for EventLimits {
    /// The defaults of the `[events]` section.
    fn default() -> Self {
        Self {
            max_id_len: 256,
            max_context_attributes: 16,
            max_context_key_len: 64,
            max_context_value_len: 256,
            max_rating: 5.0,
            max_dwell_secs: 86_400.0,
            max_amount: 1_000_000.0,
        }
    }
}

/// A validation failure naming the offending field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidEvent {
    pub field: String,
    pub message: String,
}

impl InvalidEvent {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self { field: field.to_owned(), message: message.into() }
    }

    /// Prefixes the field with the event's position in a batch, e.g. `[3].item_id`.
    pub fn at(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}.{}", self.field);
        self
    }
}

/// Context after validation and enrichment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Context {
    pub device: Device,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// Hour of day (UTC) of the event, 0..=23.
    pub hour: u8,
    /// Day of week (UTC) of the event, 0 = Monday.
    pub weekday: u8,
}

impl Context {
    /// Number of hour-of-day buckets used for context segments.
    pub const HOUR_BUCKETS: usize = 4;

    /// Night (0-5), morning (6-11), afternoon (12-17), evening (18-23).
    pub fn hour_bucket(&self) -> usize {
        usize::from(self.hour / 6).min(Self::HOUR_BUCKETS - 1)
    }

    /// A small dense segment index (device x hour bucket) used by popularity-by-context.
    pub fn segment(&self) -> usize {
        self.device.index() * Self::HOUR_BUCKETS + self.hour_bucket()
    }

    pub const SEGMENTS: usize = Device::COUNT * Self::HOUR_BUCKETS;

    /// Context of a request made now with no other information.
    pub fn at_time(timestamp_ms: i64, device: Device) -> Self {
        let (hour, weekday) = hour_and_weekday(timestamp_ms);
        Self { device, hour, weekday, ..Self::default() }
    }
}

/// A validated, enriched event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: EventId,
    pub user_id: UserId,
    pub item_id: ItemId,
    pub event_type: EventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    pub timestamp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rec_id: Option<Arc<str>>,
    pub context: Context,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// Hour of day and day of week (0 = Monday), in UTC.
pub fn hour_and_weekday(timestamp_ms: i64) -> (u8, u8) {
    let secs = timestamp_ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let hour = (secs.rem_euclid(86_400) / 3600) as u8;
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = (days + 3).rem_euclid(7) as u8;
    (hour, weekday)
}

/// Latest timestamp accepted: events from more than a day in the future are refused.
const MAX_FUTURE_MS: i64 = 86_400_000;

/// Checks one id field: non-empty, bounded, no control characters.
pub fn check_id(field: &str, value: &str, max_len: usize) -> Result<(), InvalidEvent> {
    if value.is_empty() {
        return Err(InvalidEvent::new(field, "must not be empty"));
    }
    let len = value.chars().count();
    if len > max_len {
        return Err(InvalidEvent::new(field, format!("is {len} characters long; the limit is {max_len}")));
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidEvent::new(field, "must not contain control characters"));
    }
    Ok(())
}

impl EventIn {
    /// An event with only the required fields set.
    pub fn new(user_id: impl Into<String>, item_id: impl Into<String>, event_type: EventType) -> Self {
        Self {
            user_id: user_id.into(),
            item_id: item_id.into(),
            event_type,
            value: None,
            timestamp: None,
            event_id: None,
            rec_id: None,
            context: None,
        }
    }

    /// Validates and enriches the event. `now` is the server time in ms (the default timestamp).
    pub fn validate(self, limits: &EventLimits, now: i64) -> Result<Event, InvalidEvent> {
        check_id("user_id", &self.user_id, limits.max_id_len)?;
        check_id("item_id", &self.item_id, limits.max_id_len)?;
        if let Some(value) = self.value {
            if !value.is_finite() {
                return Err(InvalidEvent::new("value", "must be a finite number"));
            }
            // One event must not be able to outweigh everyone else's in any aggregate: the
            // models and the monitor trust values only within these ranges.
            let (low, high, what) = limits.value_range(self.event_type);
            if !(low..=high).contains(&value) {
                return Err(InvalidEvent::new(
                    "value",
                    format!("{what} of a {} event must be between {low} and {high}", self.event_type.as_str()),
                ));
            }
        }
        let timestamp = match self.timestamp {
            None => now,
            Some(ts) if ts < 0 => {
                return Err(InvalidEvent::new("timestamp", "must be milliseconds since the Unix epoch, not negative"))
            }
            Some(ts) if ts > now.saturating_add(MAX_FUTURE_MS) => {
                return Err(InvalidEvent::new(
                    "timestamp",
                    "is more than a day in the future (timestamps are in milliseconds)",
                ))
            }
            Some(ts) => ts,
        };
        let event_id = match self.event_id {
            Some(id) => {
                check_id("event_id", &id, limits.max_id_len)?;
                EventId::from(id.as_str())
            }
            None => EventId::new_v7(),
        };
        let rec_id = match self.rec_id {
            Some(id) => {
                check_id("rec_id", &id, limits.max_id_len)?;
                Some(Arc::from(id))
            }
            None => None,
        };
        let context_in = self.context.unwrap_or_default();
        if let Some(country) = &context_in.country {
            let letters = country.chars().all(|c| c.is_ascii_alphabetic());
            if !letters || !(2..=3).contains(&country.len()) {
                return Err(InvalidEvent::new("context.country", "must be an ISO 3166-1 alpha-2 or alpha-3 code"));
            }
        }
        if context_in.attributes.len() > limits.max_context_attributes {
            return Err(InvalidEvent::new(
                "context.attributes",
                format!("has {} entries; the limit is {}", context_in.attributes.len(), limits.max_context_attributes),
            ));
        }
        for (key, value) in &context_in.attributes {
            check_id("context.attributes", key, limits.max_context_key_len)?;
            if value.chars().count() > limits.max_context_value_len || value.chars().any(char::is_control) {
                return Err(InvalidEvent::new(
                    &format!("context.attributes.{key}"),
                    format!("must be at most {} characters without control characters", limits.max_context_value_len),
                ));
            }
        }
        let (hour, weekday) = hour_and_weekday(timestamp);
        Ok(Event {
            event_id,
            user_id: UserId(Arc::from(self.user_id)),
            item_id: ItemId(Arc::from(self.item_id)),
            event_type: self.event_type,
            value: self.value,
            timestamp,
            rec_id,
            context: Context {
                device: context_in.device.unwrap_or_default(),
                country: context_in.country.map(|c| Arc::from(c.to_ascii_uppercase())),
                attributes: context_in.attributes,
                hour,
                weekday,
            },
        })
    }
}

/// The JSON Schema of one event, as published in `schemas/event.schema.json`.
pub fn event_json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(EventIn)).expect("a schema is always valid JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_read_back_as_written_and_canonical_uuids_are_kept_in_place() {
        let canonical = "0190c6f2-8a4b-7cde-8f01-23456789abcd";
        let written =
            [canonical, "0190C6F2-8A4B-7CDE-8F01-23456789ABCD", "{0190c6f2-8a4b-7cde-8f01-23456789abcd}", "e-1", ""];
        for text in written {
            let id = EventId::from(text);
            assert_eq!(&*id.as_str(), text);
            assert_eq!(id.to_string(), text);
            assert_eq!(serde_json::to_string(&id).unwrap(), serde_json::to_string(text).unwrap());
            assert_eq!(serde_json::from_str::<EventId>(&serde_json::to_string(text).unwrap()).unwrap(), id);
            assert_eq!(id.uuid_bytes().is_some(), text == canonical, "{text}");
        }
        // Another spelling of the same UUID is another id, as the text always was.
        assert_ne!(EventId::from(written[0]), EventId::from(written[1]));
        let assigned = EventId::new_v7();
        assert!(assigned.uuid_bytes().is_some());
        assert_eq!(EventId::from(&*assigned.as_str()), assigned);
        assert!(std::mem::size_of::<EventId>() <= 24);
    }

    fn limits() -> EventLimits {
        EventLimits {
            max_id_len: 16,
            max_context_attributes: 2,
            max_context_key_len: 8,
            max_context_value_len: 8,
            ..EventLimits::default()
        }
    }

    fn event(user: &str, item: &str) -> EventIn {
        EventIn::new(user, item, EventType::Click)
    }

    #[test]
    fn fills_in_time_id_and_enrichment() {
        // 2024-01-01T13:00:00Z was a Monday.
        let now = 1_704_114_000_000;
        let e = event("u", "i").validate(&limits(), now).expect("valid");
        assert_eq!(e.timestamp, now);
        assert_eq!(e.context.hour, 13);
        assert_eq!(e.context.weekday, 0);
        assert_eq!(e.context.hour_bucket(), 2);
        assert_eq!(e.context.device, Device::Other);
        assert_eq!(uuid::Uuid::parse_str(&e.event_id.as_str()).map(|u| u.get_version_num()), Ok(7));
    }

    #[test]
    fn rejects_bad_ids_and_values() {
        let now = 1_704_114_000_000;
        let cases = [
            (event("", "i"), "user_id"),
            (event("u", &"x".repeat(17)), "item_id"),
            (event("u\n", "i"), "user_id"),
            (EventIn { value: Some(f64::NAN), ..event("u", "i") }, "value"),
            (EventIn { value: Some(1e9), event_type: EventType::Rating, ..event("u", "i") }, "value"),
            (EventIn { value: Some(1e308), event_type: EventType::Rating, ..event("u", "i") }, "value"),
            (EventIn { value: Some(-1.0), event_type: EventType::Rating, ..event("u", "i") }, "value"),
            (EventIn { value: Some(86_401.0), event_type: EventType::Dwell, ..event("u", "i") }, "value"),
            (EventIn { value: Some(1e38), event_type: EventType::Purchase, ..event("u", "i") }, "value"),
            (EventIn { value: Some(-5.0), event_type: EventType::Purchase, ..event("u", "i") }, "value"),
            (EventIn { value: Some(1e7), event_type: EventType::View, ..event("u", "i") }, "value"),
            (EventIn { timestamp: Some(-1), ..event("u", "i") }, "timestamp"),
            (EventIn { timestamp: Some(now * 1000), ..event("u", "i") }, "timestamp"),
            (
                EventIn {
                    context: Some(ContextIn { country: Some("F1".into()), ..ContextIn::default() }),
                    ..event("u", "i")
                },
                "context.country",
            ),
            (
                EventIn {
                    context: Some(ContextIn {
                        attributes: [("a", "1"), ("b", "2"), ("c", "3")]
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect(),
                        ..ContextIn::default()
                    }),
                    ..event("u", "i")
                },
                "context.attributes",
            ),
        ];
        for (input, field) in cases {
            let err = input.validate(&limits(), now).expect_err(field);
            assert_eq!(err.field, field);
        }
    }

    #[test]
    fn values_at_the_ends_of_their_ranges_are_accepted() {
        let now = 1_704_114_000_000;
        for (event_type, value) in [
            (EventType::Rating, 0.0),
            (EventType::Rating, 5.0),
            (EventType::Dwell, 86_400.0),
            (EventType::Purchase, 1_000_000.0),
            (EventType::AddToCart, 0.0),
        ] {
            let input = EventIn { value: Some(value), event_type, ..event("u", "i") };
            assert_eq!(input.validate(&limits(), now).map(|e| e.value), Ok(Some(value)), "{event_type:?}");
        }
    }

    #[test]
    fn the_positional_form_is_refused_and_objects_decode_as_before() {
        let array = serde_json::from_str::<EventIn>(r#"["u", "i", "click"]"#).expect_err("an array event");
        assert!(array.to_string().contains("expected an object"), "{array}");
        let context = r#"{"user_id": "u", "item_id": "i", "event_type": "click", "context": []}"#;
        let error = serde_json::from_str::<EventIn>(context).expect_err("an array context");
        assert!(error.to_string().contains("expected an object"), "{error}");
        let object = r#"{"user_id": "u", "item_id": "i", "event_type": "click", "value": 1.5,
            "context": {"device": "tv", "country": "fr"}}"#;
        let decoded: EventIn = serde_json::from_str(object).expect("an object");
        assert_eq!(decoded.context.and_then(|c| c.device), Some(Device::Tv));
        let unknown = r#"{"user_id": "u", "item_id": "i", "event_type": "click", "extra": 1}"#;
        assert!(serde_json::from_str::<EventIn>(unknown).is_err(), "unknown fields are still refused");
        let round = EventIn { value: Some(2.0), ..event("u", "i") };
        let back: EventIn = serde_json::from_value(serde_json::to_value(&round).expect("json")).expect("back");
        assert_eq!(back, round);
    }

    #[test]
    fn weekday_of_epoch_is_thursday() {
        assert_eq!(hour_and_weekday(0), (0, 3));
        assert_eq!(hour_and_weekday(-1), (23, 2));
    }
}
