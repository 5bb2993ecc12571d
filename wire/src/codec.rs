//! Encoding of events on Kafka: JSON (the same document as `POST /v1/events` takes) or Avro.
//!
//! Avro records use the Confluent wire format (a zero magic byte, a 4-byte big-endian schema id,
//! then the Avro binary datum) without a schema registry: schema ids name the schemas shipped in
//! `schemas/avro/` (1 = `event-v1.avsc`, 2 = `event-v2.avsc`). Records are read with the newest
//! schema as the reader schema, so a record written with any older schema resolves to it.
//!
//! Evolution rule: a new version may only add fields that are optional (a union with `null`
//! first) and have a default. Old writers then stay readable (missing fields take their
//! defaults); a record written with a schema id this build does not know goes to the dead-letter
//! topic, so upgrade the consumers before the producers.

use std::sync::LazyLock;

use apache_avro::types::Value as AvroValue;
use apache_avro::Schema;

use crate::event::{ContextIn, Device, Event, EventIn, EventLimits, EventType, InvalidEvent};

const V1: &str = include_str!("../../schemas/avro/event-v1.avsc");
const V2: &str = include_str!("../../schemas/avro/event-v2.avsc");

/// Shipped schemas by id; the last one is the reader schema.
static SCHEMAS: LazyLock<Vec<(u32, Schema)>> = LazyLock::new(|| {
    vec![
        (1, Schema::parse_str(V1).expect("event-v1.avsc is a valid schema")),
        (2, Schema::parse_str(V2).expect("event-v2.avsc is a valid schema")),
    ]
});

/// The id of the newest shipped schema.
pub const LATEST_SCHEMA_ID: u32 = 2;

/// The most apache-avro may allocate for one string, byte array or collection while decoding.
/// It allocates the length a record claims before reading the bytes, so without this bound a
/// 13-byte record claiming a 400 MB string made the consumer allocate 400 MB (found by the
/// `decode_avro` fuzz target). A record is at most 1 MiB on a broker with default settings, so
/// no valid field is longer. The setting is process-wide and set once.
const AVRO_MAX_ALLOCATION_BYTES: usize = 1 << 20;

/// Why a record could not become an event; goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty record")]
    Empty,
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("JSON of the wrong shape for an event: {0}")]
    Shape(String),
    #[error("unknown Avro schema id {0}")]
    UnknownSchema(u32),
    #[error("not a valid Avro event: {0}")]
    Avro(String),
    #[error("invalid event: {0}")]
    Invalid(#[from] InvalidEvent),
}

impl DecodeError {
    /// A stable code for the dead-letter header.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::Json(_) => "malformed_json",
            DecodeError::Shape(_) => "invalid_event",
            DecodeError::UnknownSchema(_) => "unknown_schema",
            DecodeError::Avro(_) => "malformed_avro",
            DecodeError::Invalid(_) => "invalid_event",
        }
    }
}

/// Decodes and validates one record value.
pub fn decode(payload: &[u8], limits: &EventLimits, now: i64) -> Result<Event, DecodeError> {
    let event = match payload.first() {
        None => return Err(DecodeError::Empty),
        Some(0) => decode_avro(payload)?,
        Some(_) => serde_json::from_slice::<EventIn>(payload).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => DecodeError::Shape(e.to_string()),
            _ => DecodeError::Json(e.to_string()),
        })?,
    };
    Ok(event.validate(limits, now)?)
}

/// The wire form of a validated event, as JSON.
pub fn encode_json(event: &Event) -> Vec<u8> {
    serde_json::to_vec(&to_wire(event)).expect("events always serialise")
}

/// The validated event back in its wire shape, with the server-assigned id and time filled in.
pub fn to_wire(event: &Event) -> EventIn {
    EventIn {
        user_id: event.user_id.to_string(),
        item_id: event.item_id.to_string(),
        event_type: event.event_type,
        value: event.value,
        timestamp: Some(event.timestamp),
        event_id: Some(event.event_id.to_string()),
        rec_id: event.rec_id.as_deref().map(str::to_owned),
        context: Some(ContextIn {
            device: Some(event.context.device),
            country: event.context.country.as_deref().map(str::to_owned),
            attributes: event.context.attributes.clone(),
        }),
    }
}

fn schema(id: u32) -> Option<&'static Schema> {
    SCHEMAS.iter().find(|(i, _)| *i == id).map(|(_, s)| s)
}

fn decode_avro(payload: &[u8]) -> Result<EventIn, DecodeError> {
    if payload.len() < 5 {
        return Err(DecodeError::Avro("shorter than the 5-byte header".into()));
    }
    let id = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
    let writer = schema(id).ok_or(DecodeError::UnknownSchema(id))?;
    let reader = schema(LATEST_SCHEMA_ID).expect("the latest schema ships");
    apache_avro::util::max_allocation_bytes(AVRO_MAX_ALLOCATION_BYTES);
    let mut body = &payload[5..];
    let value = apache_avro::reader::datum::GenericDatumReader::builder(writer)
        .reader_schema(reader)
        .build()
        .and_then(|r| r.read_value(&mut body))
        .map_err(|e| DecodeError::Avro(e.to_string()))?;
    if !body.is_empty() {
        return Err(DecodeError::Avro(format!("{} bytes after the datum", body.len())));
    }
    from_avro(value)
}

fn from_avro(value: AvroValue) -> Result<EventIn, DecodeError> {
    let AvroValue::Record(fields) = value else {
        return Err(DecodeError::Avro("not a record".into()));
    };
    let bad = |field: &str| DecodeError::Avro(format!("field {field} has an unexpected type"));
    let mut event = EventIn::new(String::new(), String::new(), EventType::View);
    let mut context = ContextIn::default();
    for (name, value) in fields {
        let value = match value {
            AvroValue::Union(_, inner) => *inner,
            other => other,
        };
        match (name.as_str(), value) {
            (_, AvroValue::Null) => {}
            ("user_id", AvroValue::String(s)) => event.user_id = s,
            ("item_id", AvroValue::String(s)) => event.item_id = s,
            ("event_type", AvroValue::Enum(_, symbol)) => {
                event.event_type =
                    serde_json::from_value(serde_json::Value::String(symbol)).map_err(|_| bad("event_type"))?
            }
            ("value", AvroValue::Double(v)) => event.value = Some(v),
            ("timestamp", AvroValue::Long(v)) => event.timestamp = Some(v),
            ("event_id", AvroValue::String(s)) => event.event_id = Some(s),
            ("rec_id", AvroValue::String(s)) => event.rec_id = Some(s),
            ("device", AvroValue::String(s)) => {
                let device: Device = serde_json::from_value(serde_json::Value::String(s)).map_err(|_| bad("device"))?;
                context.device = Some(device);
            }
            ("country", AvroValue::String(s)) => context.country = Some(s),
            ("attributes", AvroValue::Map(map)) => {
                for (k, v) in map {
                    let AvroValue::String(v) = v else { return Err(bad("attributes")) };
                    context.attributes.insert(k, v);
                }
            }
            ("session_id", AvroValue::String(s)) => {
                context.attributes.insert("session_id".into(), s);
            }
            (field, _) => return Err(bad(field)),
        }
    }
    event.context = Some(context);
    Ok(event)
}

/// Encodes an event as an Avro record with the shipped schema `schema_id`, in the registry-less
/// Confluent framing. For producers written in Rust and for tests; other languages use the
/// `.avsc` files with their own Avro library and the same 5-byte header.
pub fn encode_avro(event: &EventIn, schema_id: u32, session_id: Option<&str>) -> Result<Vec<u8>, DecodeError> {
    let writer = schema(schema_id).ok_or(DecodeError::UnknownSchema(schema_id))?;
    let opt_str = |v: Option<&str>| {
        AvroValue::Union(
            u32::from(v.is_some()),
            Box::new(v.map_or(AvroValue::Null, |s| AvroValue::String(s.to_owned()))),
        )
    };
    let context = event.context.clone().unwrap_or_default();
    let device = context.device.and_then(|d| serde_json::to_value(d).ok().and_then(|v| v.as_str().map(str::to_owned)));
    let event_type = event.event_type.as_str().to_owned();
    let symbol_index = EventType::ALL.iter().position(|t| *t == event.event_type).unwrap_or(0) as u32;
    let mut fields = vec![
        ("user_id".to_owned(), AvroValue::String(event.user_id.clone())),
        ("item_id".to_owned(), AvroValue::String(event.item_id.clone())),
        ("event_type".to_owned(), AvroValue::Enum(symbol_index, event_type)),
        (
            "value".to_owned(),
            AvroValue::Union(
                u32::from(event.value.is_some()),
                Box::new(event.value.map_or(AvroValue::Null, AvroValue::Double)),
            ),
        ),
        (
            "timestamp".to_owned(),
            AvroValue::Union(
                u32::from(event.timestamp.is_some()),
                Box::new(event.timestamp.map_or(AvroValue::Null, AvroValue::Long)),
            ),
        ),
        ("event_id".to_owned(), opt_str(event.event_id.as_deref())),
        ("rec_id".to_owned(), opt_str(event.rec_id.as_deref())),
        ("device".to_owned(), opt_str(device.as_deref())),
        ("country".to_owned(), opt_str(context.country.as_deref())),
        (
            "attributes".to_owned(),
            AvroValue::Map(context.attributes.iter().map(|(k, v)| (k.clone(), AvroValue::String(v.clone()))).collect()),
        ),
    ];
    if schema_id >= 2 {
        fields.push(("session_id".to_owned(), opt_str(session_id)));
    }
    let datum = apache_avro::writer::datum::GenericDatumWriter::builder(writer)
        .build()
        .and_then(|w| w.write_value_to_vec(AvroValue::Record(fields)))
        .map_err(|e| DecodeError::Avro(e.to_string()))?;
    let mut out = Vec::with_capacity(datum.len() + 5);
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(&datum);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> EventLimits {
        // Amounts up to f64::MAX, so the round-trip tests cover the largest floats.
        EventLimits {
            max_id_len: 64,
            max_context_attributes: 4,
            max_context_key_len: 16,
            max_context_value_len: 64,
            max_amount: f64::MAX,
            ..EventLimits::default()
        }
    }

    fn wire() -> EventIn {
        EventIn {
            user_id: "u1".into(),
            item_id: "i1".into(),
            event_type: EventType::Purchase,
            value: Some(9.5),
            timestamp: Some(1_700_000_000_000),
            event_id: Some("e1".into()),
            rec_id: None,
            context: Some(ContextIn {
                device: Some(Device::Tablet),
                country: Some("fr".into()),
                ..ContextIn::default()
            }),
        }
    }

    #[test]
    fn json_round_trips() {
        let event = wire().validate(&limits(), 1_700_000_000_000).expect("valid");
        let decoded = decode(&encode_json(&event), &limits(), 1_700_000_000_000).expect("decodes");
        assert_eq!(decoded, event);
    }

    /// Values that serde_json without `float_roundtrip` read back changed (found by fuzzing: by
    /// one unit in the last place, and by many for large exponents).
    #[test]
    fn json_round_trips_keep_every_value_exactly() {
        for value in [9.720685119628905, 1.0565890307825225e270, 5e-324, f64::MAX, 0.1 + 0.2] {
            let event = EventIn { value: Some(value), ..wire() }.validate(&limits(), 1_700_000_000_000).expect("valid");
            let decoded = decode(&encode_json(&event), &limits(), 1_700_000_000_000).expect("decodes");
            assert_eq!(decoded.value.map(f64::to_bits), Some(value.to_bits()), "{value:e}");
        }
    }

    #[test]
    fn old_and_new_avro_writers_both_resolve() {
        let v1 = encode_avro(&wire(), 1, None).expect("v1");
        let v2 = encode_avro(&wire(), 2, Some("s-9")).expect("v2");
        let a = decode(&v1, &limits(), 1_700_000_000_000).expect("v1 decodes");
        let b = decode(&v2, &limits(), 1_700_000_000_000).expect("v2 decodes");
        assert_eq!(a.event_type, EventType::Purchase);
        assert_eq!(a.context.device, Device::Tablet);
        assert_eq!(a.context.country.as_deref(), Some("FR"));
        assert!(a.context.attributes.is_empty());
        assert_eq!(b.context.attributes.get("session_id").map(String::as_str), Some("s-9"));
        assert_eq!(a.event_id, b.event_id);
    }

    #[test]
    fn bad_records_say_why() {
        assert_eq!(decode(b"", &limits(), 0).expect_err("empty").code(), "empty");
        assert_eq!(decode(b"{nope", &limits(), 0).expect_err("json").code(), "malformed_json");
        assert_eq!(decode(&[0, 0, 0, 0, 9, 1], &limits(), 0).expect_err("schema").code(), "unknown_schema");
        assert_eq!(decode(&[0, 0, 0, 0, 1, 200], &limits(), 0).expect_err("avro").code(), "malformed_avro");
        // A Kafka record with a value out of its range goes to the dead-letter topic like any
        // other invalid event.
        let extreme = EventIn { event_type: EventType::Rating, value: Some(1e9), ..wire() };
        let record = serde_json::to_vec(&extreme).expect("json");
        assert_eq!(decode(&record, &limits(), 0).expect_err("out of range").code(), "invalid_event");
        let positional = br#"["u", "i", "click"]"#;
        assert_eq!(decode(positional, &limits(), 0).expect_err("an array").code(), "invalid_event");
        let empty_user = EventIn { user_id: String::new(), ..wire() };
        let record = serde_json::to_vec(&empty_user).expect("json");
        assert_eq!(decode(&record, &limits(), 0).expect_err("invalid").code(), "invalid_event");
    }

    #[test]
    fn a_huge_claimed_length_is_refused_before_allocating() {
        // Schema 2, user_id "u3", then an item_id claiming 402 220 478 bytes (from the fuzzer).
        let record = [0, 0, 0, 0, 2, 0x04, b'u', b'3', 0xfc, 0x96, 0xcb, 0xff, 0x02];
        let error = decode(&record, &limits(), 0).expect_err("truncated");
        assert_eq!(error.code(), "malformed_avro");
        // Refused by the allocation bound, not by running out of bytes after allocating.
        assert!(error.to_string().contains("maximum allowed: 1048576"), "{error}");
    }
}
