//! The catalogue's changes on the wire: the compacted Kafka items topic (`kafka.items_topic`)
//! that carries every `PUT` and `DELETE` of `/v1/items` to every instance in production mode.
//!
//! A record's key is the item id; its value is the JSON object `PUT /v1/items/{item_id}` takes
//! (the item's attributes), or `{"deleted": true}` for a delete. Compaction keeps the newest
//! record of each item, so the topic read from its start is the whole catalogue.
//!
//! Why a delete is a `{"deleted": true}` record and not a tombstone (a record without a value):
//! compaction drops tombstones `delete.retention.ms` (a day by default) after it first cleans
//! them, and then the item's records are gone altogether. An instance started after that would
//! not know the item was deleted: if the serving model or an event names it, it would be an
//! ordinary, recommendable item there while older instances hide it. A marker record is the
//! newest of its key, so compaction keeps it for good, at the cost of one small record per
//! deleted id (putting the item again replaces it). Tombstones that another producer writes are
//! read as deletes too.

use std::time::Duration;

use futures_util::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::BusError;
use crate::catalog::ItemAttributes;
use crate::event::{check_id, ItemId};

/// One change of the catalogue, as a record of the items topic carries it.
#[derive(Clone, Debug, PartialEq)]
pub enum ItemChange {
    /// Create the item or replace its attributes.
    Put(ItemAttributes),
    /// Take the item out of the catalogue and out of every list.
    Delete,
}

/// Why a record of the items topic cannot be applied: the code names it in the dead-letter
/// topic's `liverec-error-code` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadItemRecord {
    #[error("item_id: the record's key {0}")]
    InvalidKey(String),
    #[error("the value is not JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    InvalidItem(String),
}

impl BadItemRecord {
    /// A stable code, as the REST API would answer.
    pub fn code(&self) -> &'static str {
        match self {
            BadItemRecord::InvalidKey(_) => "invalid_item_id",
            BadItemRecord::MalformedJson(_) => "malformed_json",
            BadItemRecord::InvalidItem(_) => "invalid_item",
        }
    }
}

/// The value `{"deleted": true}`.
const DELETED: &[u8] = br#"{"deleted":true}"#;

/// The record value of `change`.
pub fn encode(change: &ItemChange) -> Vec<u8> {
    match change {
        ItemChange::Put(attributes) => serde_json::to_vec(attributes).expect("attributes serialise to JSON"),
        ItemChange::Delete => DELETED.to_vec(),
    }
}

/// Reads one record of the items topic: its key (the item id, at most `max_id_len` characters)
/// and its value (attributes, `{"deleted": true}`, or none: a tombstone).
pub fn decode(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    max_id_len: usize,
) -> Result<(ItemId, ItemChange), BadItemRecord> {
    let key = key.ok_or_else(|| BadItemRecord::InvalidKey("is missing".into()))?;
    let key = std::str::from_utf8(key).map_err(|_| BadItemRecord::InvalidKey("is not UTF-8".into()))?;
    check_id("item_id", key, max_id_len).map_err(|e| BadItemRecord::InvalidKey(e.message))?;
    let id = ItemId::from(key);
    let Some(value) = value else { return Ok((id, ItemChange::Delete)) };
    let json: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| BadItemRecord::MalformedJson(e.to_string()))?;
    if json.as_object().is_some_and(|o| o.len() == 1 && o.get("deleted") == Some(&serde_json::Value::Bool(true))) {
        return Ok((id, ItemChange::Delete));
    }
    let attributes: ItemAttributes = serde_path_to_error::deserialize(json).map_err(|e| {
        let path = e.path().to_string();
        let error = e.into_inner();
        BadItemRecord::InvalidItem(if path.is_empty() || path == "." {
            error.to_string()
        } else {
            format!("{path}: {error}")
        })
    })?;
    attributes.validate().map_err(|e| BadItemRecord::InvalidItem(e.to_string()))?;
    Ok((id, ItemChange::Put(attributes)))
}

/// Produces catalogue changes to the items topic with the events' producer (idempotent,
/// `acks=all`, murmur2 on the key: one item's changes stay in order on one partition).
#[derive(Clone)]
pub struct KafkaItems {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
}

impl KafkaItems {
    pub fn new(producer: FutureProducer, topic: String, timeout: Duration) -> Self {
        Self { producer, topic, timeout }
    }

    /// Produces every change and returns, once the broker has acknowledged all of them, where
    /// each landed (partition, offset), in order. A change the broker refused fails the call;
    /// the others may be in the topic (a retry puts the same values again, which is harmless).
    pub async fn publish(&self, changes: &[(ItemId, ItemChange)]) -> Result<Vec<(i32, i64)>, BusError> {
        let payloads: Vec<Vec<u8>> = changes.iter().map(|(_, change)| encode(change)).collect();
        let sends = changes.iter().zip(&payloads).map(|((id, _), payload)| {
            let headers = OwnedHeaders::new().insert(Header { key: "content-type", value: Some("application/json") });
            let record = FutureRecord::to(&self.topic).key(id.as_str()).payload(payload.as_slice()).headers(headers);
            // send() copies the record into librdkafka before it returns its future.
            self.producer.send(record, self.timeout)
        });
        let mut landed = Vec::with_capacity(changes.len());
        for result in join_all(sends).await {
            match result {
                Ok(delivery) => landed.push((delivery.partition, delivery.offset)),
                Err((error, _)) => {
                    tracing::warn!(error = %error, "catalogue changes not acknowledged by kafka");
                    return Err(BusError::Unavailable(error.to_string()));
                }
            }
        }
        Ok(landed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn puts_and_deletes_round_trip_and_a_tombstone_is_a_delete() {
        let put =
            ItemChange::Put(ItemAttributes { title: Some("t".into()), available: Some(false), ..Default::default() });
        let decoded = decode(Some(b"i1"), Some(&encode(&put)), 64).expect("a put");
        assert_eq!(decoded, (ItemId::from("i1"), put));
        assert_eq!(
            decode(Some(b"i1"), Some(&encode(&ItemChange::Delete)), 64).expect("a delete").1,
            ItemChange::Delete
        );
        assert_eq!(decode(Some(b"i1"), None, 64).expect("a tombstone").1, ItemChange::Delete);
        // `deleted: false` is no delete, and no attribute either.
        assert_eq!(decode(Some(b"i1"), Some(br#"{"deleted":false}"#), 64).map_err(|e| e.code()), Err("invalid_item"));
    }

    #[test]
    fn bad_records_are_named_as_the_rest_api_would() {
        let code = |key: Option<&[u8]>, value: &[u8]| decode(key, Some(value), 8).map(|_| ()).map_err(|e| e.code());
        assert_eq!(code(None, b"{}"), Err("invalid_item_id"));
        assert_eq!(code(Some(b"much-too-long"), b"{}"), Err("invalid_item_id"));
        assert_eq!(code(Some(b"i"), b"\xff not json"), Err("malformed_json"));
        assert_eq!(code(Some(b"i"), br#"{"title": 3}"#), Err("invalid_item"));
        assert_eq!(code(Some(b"i"), br#"{"tags": [""]}"#), Err("invalid_item"));
        assert_eq!(code(Some(b"i"), br#"{"colour": "red"}"#), Err("invalid_item"));
        assert_eq!(code(Some(b"i"), b"{}"), Ok(()));
    }
}
