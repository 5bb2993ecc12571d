//! What one record of the events topic is to liverec: the decoding that the Kafka ingest applies
//! (`actors::kafka_ingest`) and that the trainer's window reader repeats (`bus::kafka_window`),
//! in one place, so the trainer learns from exactly the events the ingest applies.

use rdkafka::message::{Headers, Message};

use super::codec;
use super::kafka::{CONTROL_HEADER, CONTROL_RELOAD, CONTROL_SHOWN, PSEUDONYMIZED_HEADER, RECEIVED_HEADER};
use crate::catalog::Catalog;
use crate::event::{Event, EventLimits, UserId};
use crate::privacy::Pseudonyms;

/// One record of the events topic, decoded.
#[derive(Debug)]
pub enum EventRecord {
    /// A control record: the owner of the user it is keyed by reloads that user from the store
    /// (no user when the key is not UTF-8).
    Reload(Option<UserId>),
    /// A control record: another instance served the user a list (its JSON, cut to the items
    /// shown); the owner counts the impression and attributes clicks on it (no user when the key
    /// is not UTF-8).
    Shown(Option<UserId>, Vec<u8>),
    /// An event to apply, its user id the one liverec keeps.
    Event(Event),
    /// A record that cannot be applied (the ingest sends it to the dead-letter topic): a stable
    /// code, as the REST API would answer, and the reason.
    Invalid { code: &'static str, reason: String },
}

/// Decodes records as the ingest applies them: the wire codec and its validation, the
/// catalogue's admission of items known only from events (which adds them), and the mapping of
/// user ids to pseudonyms for records that liverec did not produce.
pub struct RecordDecoder<'a> {
    pub limits: &'a EventLimits,
    pub catalog: &'a Catalog,
    pub pseudonyms: &'a Pseudonyms,
}

impl RecordDecoder<'_> {
    /// `now` (milliseconds since the epoch) stands for a missing timestamp and bounds how far in
    /// the future one may be.
    pub fn decode(&self, record: &impl Message, now: i64) -> EventRecord {
        let user = || record.key().and_then(|k| std::str::from_utf8(k).ok()).map(UserId::from);
        match control(record) {
            Some(CONTROL_RELOAD) => return EventRecord::Reload(user()),
            Some(CONTROL_SHOWN) => return EventRecord::Shown(user(), record.payload().unwrap_or_default().to_vec()),
            _ => {}
        }
        let decoded = codec::decode(record.payload().unwrap_or_default(), self.limits, now)
            .map_err(|error| (error.code(), error.to_string()))
            .and_then(|event| {
                // The catalogue's bound on items known only from events holds for records too.
                match self.catalog.admit([&event.item_id]) {
                    Ok(()) => Ok(event),
                    Err((_, refused)) => Err((refused.code(), refused.to_string())),
                }
            });
        match decoded {
            Ok(mut event) => {
                if !is_pseudonymized(record) {
                    event.user_id = self.pseudonyms.user(event.user_id.as_str());
                }
                EventRecord::Event(event)
            }
            Err((code, reason)) => EventRecord::Invalid { code, reason },
        }
    }
}

/// The value of the record's control header, if it is a control record.
fn control(record: &impl Message) -> Option<&str> {
    let headers = record.headers()?;
    headers.iter().find(|h| h.key == CONTROL_HEADER).and_then(|h| h.value).and_then(|v| std::str::from_utf8(v).ok())
}

/// Whether liverec produced the record, so its user id is already the one liverec keeps.
fn is_pseudonymized(record: &impl Message) -> bool {
    record.headers().is_some_and(|headers| headers.iter().any(|h| h.key == PSEUDONYMIZED_HEADER))
}

/// When liverec first received the event (µs since the epoch), if the record says so.
pub fn received_micros(record: &impl Message) -> Option<i64> {
    record.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == RECEIVED_HEADER)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<i64>().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Admission;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    fn record(payload: &[u8], headers: OwnedHeaders) -> OwnedMessage {
        OwnedMessage::new(
            Some(payload.to_vec()),
            Some(b"ann".to_vec()),
            "t".into(),
            Timestamp::NotAvailable,
            0,
            0,
            Some(headers),
        )
    }

    #[test]
    fn records_decode_as_reloads_events_or_invalid_ones() {
        let limits = EventLimits::default();
        let catalog = Catalog::with_admission(Admission { accept_unknown_items: false, max_event_items: 0 });
        catalog.intern(&crate::event::ItemId::from("known"));
        let pseudonyms = Pseudonyms::default();
        let decoder = RecordDecoder { limits: &limits, catalog: &catalog, pseudonyms: &pseudonyms };
        let now = 1_700_000_000_000;
        let event = br#"{"user_id":"ann","item_id":"known","event_type":"view"}"#;
        let plain = OwnedHeaders::new().insert(Header { key: PSEUDONYMIZED_HEADER, value: Some("1") });
        assert!(
            matches!(decoder.decode(&record(event, plain.clone()), now), EventRecord::Event(e) if e.timestamp == now)
        );
        let unknown = br#"{"user_id":"ann","item_id":"unknown","event_type":"view"}"#;
        assert!(matches!(decoder.decode(&record(unknown, plain.clone()), now), EventRecord::Invalid { .. }));
        assert!(matches!(decoder.decode(&record(b"{", plain), now), EventRecord::Invalid { .. }));
        let reload = OwnedHeaders::new().insert(Header { key: CONTROL_HEADER, value: Some(CONTROL_RELOAD) });
        assert!(
            matches!(decoder.decode(&record(b"", reload), now), EventRecord::Reload(Some(u)) if u.as_str() == "ann")
        );
        let shown = OwnedHeaders::new().insert(Header { key: CONTROL_HEADER, value: Some(CONTROL_SHOWN) });
        assert!(matches!(
            decoder.decode(&record(b"{}", shown), now),
            EventRecord::Shown(Some(u), list) if u.as_str() == "ann" && list == b"{}"
        ));
    }
}
