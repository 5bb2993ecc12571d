//! What every fuzz target checks about a decoded event: the limits hold, and the event survives
//! a round trip through each wire encoding (JSON, Avro with schema 1 and 2) unchanged.

use liverec_wire::codec;
use liverec_wire::event::{hour_and_weekday, Event, EventLimits};

/// The server time the targets decode at (2025-06-15), fixed so runs are reproducible.
pub const NOW: i64 = 1_750_000_000_000;

/// Latest timestamp `validate` accepts: a day ahead of `NOW`.
const MAX_TIMESTAMP: i64 = NOW + 86_400_000;

/// Small limits, so that inputs near them are easy for the fuzzer to reach. Ids may be 36
/// characters: the server assigns a UUID (36) as the event id when the producer sent none, and
/// that event id must pass the same limit when the record is read back from Kafka. Keys may be
/// 12: Avro schema 2's `session_id` becomes the attribute `session_id` (10).
pub fn limits() -> EventLimits {
    EventLimits {
        max_id_len: 36,
        max_context_attributes: 3,
        max_context_key_len: 12,
        max_context_value_len: 16,
        ..EventLimits::default()
    }
}

fn check_id(what: &str, id: &str, max_len: usize) {
    assert!(!id.is_empty(), "{what} is empty");
    assert!(id.chars().count() <= max_len, "{what} {id:?} is longer than {max_len} characters");
    assert!(!id.chars().any(char::is_control), "{what} {id:?} holds a control character");
}

/// Panics unless `event` satisfies everything `EventIn::validate` promises.
pub fn check_event(event: &Event, limits: &EventLimits) {
    check_id("user_id", event.user_id.as_str(), limits.max_id_len);
    check_id("item_id", event.item_id.as_str(), limits.max_id_len);
    check_id("event_id", &event.event_id.as_str(), limits.max_id_len);
    if let Some(rec_id) = &event.rec_id {
        check_id("rec_id", rec_id, limits.max_id_len);
    }
    if let Some(value) = event.value {
        assert!(value.is_finite(), "value {value} is not finite");
        let (low, high, _) = limits.value_range(event.event_type);
        assert!((low..=high).contains(&value), "value {value} outside {low}..={high}");
    }
    assert!((0..=MAX_TIMESTAMP).contains(&event.timestamp), "timestamp {} out of range", event.timestamp);
    assert_eq!((event.context.hour, event.context.weekday), hour_and_weekday(event.timestamp));
    assert!(event.context.hour < 24 && event.context.weekday < 7);
    if let Some(country) = &event.context.country {
        assert!(
            (2..=3).contains(&country.len()) && country.chars().all(|c| c.is_ascii_uppercase()),
            "country {country:?} is not an upper-case alpha-2 or alpha-3 code"
        );
    }
    let attributes = &event.context.attributes;
    assert!(attributes.len() <= limits.max_context_attributes, "{} attributes", attributes.len());
    for (key, value) in attributes {
        check_id("attribute key", key, limits.max_context_key_len);
        assert!(value.chars().count() <= limits.max_context_value_len, "attribute value {value:?} too long");
        assert!(!value.chars().any(char::is_control), "attribute value {value:?} holds a control character");
    }
}

/// Panics unless `event` comes back unchanged from JSON and from Avro with both schemas.
pub fn check_round_trips(event: &Event, limits: &EventLimits) {
    let json = codec::encode_json(event);
    let back = codec::decode(&json, limits, NOW)
        .unwrap_or_else(|e| panic!("encode_json output does not decode: {e}: {}", String::from_utf8_lossy(&json)));
    assert_eq!(&back, event, "JSON round trip changed the event: {}", String::from_utf8_lossy(&json));
    let wire = codec::to_wire(event);
    for schema_id in [1, 2] {
        let avro = codec::encode_avro(&wire, schema_id, None)
            .unwrap_or_else(|e| panic!("a valid event does not encode as Avro schema {schema_id}: {e}"));
        let back = codec::decode(&avro, limits, NOW)
            .unwrap_or_else(|e| panic!("encode_avro output (schema {schema_id}) does not decode: {e}: {avro:?}"));
        assert_eq!(&back, event, "Avro round trip (schema {schema_id}) changed the event");
    }
}

/// Decodes one Kafka record value; checks the event it yields, if any.
pub fn decode_record(data: &[u8]) {
    let limits = limits();
    if let Ok(event) = codec::decode(data, &limits, NOW) {
        check_event(&event, &limits);
        check_round_trips(&event, &limits);
    }
}
