//! The compact binary form of an interaction in a user's history list (issue 13 item 4): about 35
//! bytes for a view with a UUID event id, against about 145 as JSON. Profiles written before hold
//! JSON entries, which start with `{`; this form starts with its version byte, so both load.
//!
//! Layout: version `1`; a flags byte (bits 0-2 the event type, 3 a value, 4 a rec id, 5 the rec id
//! is a UUID, 6 the event id is a UUID); the timestamp as a zigzag varint; the item id (varint
//! length, bytes); the event id (16 bytes if a UUID, else varint length and bytes); the value
//! (8 bytes, little endian) if present; the rec id (as the event id) if present. A UUID is packed
//! only when its text is the canonical lowercase form, so every id reads back byte for byte.
//!
//! The user's last pushed list (the `recs` field of `…:p`) has a compact form as well, about 120
//! bytes for 10 items against some 700 as published JSON: see [`encode_list`]. Lists stored
//! before it are JSON and still load.
//!
//! The profile string (`…:q`) holds the context, that list and the de-duplication window in one
//! value, which the append script writes: see [`decode_profile`].
//!
//! The memory store keeps a whole profile in one such string while the user's session does not
//! run: see [`encode_parked`].

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::event::{canonical_uuid, Context, Device, EventId, EventType, ItemId, UserId};
use crate::recs::{RecItem, RecList, CONTROL};
use crate::store::{ConsumedItem, EventDigest, Interaction, Profile};

const VERSION: u8 = 1;
const VALUE: u8 = 1 << 3;
const REC_ID: u8 = 1 << 4;
const REC_ID_UUID: u8 = 1 << 5;
const EVENT_ID_UUID: u8 = 1 << 6;

pub(super) fn encode(interaction: &Interaction) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + interaction.item_id.as_str().len());
    encode_into(&mut out, interaction);
    out
}

fn encode_into(out: &mut Vec<u8>, interaction: &Interaction) {
    let rec_id = interaction.rec_id.as_deref().map(|r| (r, canonical_uuid(r)));
    let type_index = EventType::ALL.iter().position(|t| *t == interaction.event_type).expect("a listed type") as u8;
    let mut flags = type_index;
    if interaction.value.is_some() {
        flags |= VALUE;
    }
    if let Some((_, uuid)) = rec_id {
        flags |= REC_ID | if uuid.is_some() { REC_ID_UUID } else { 0 };
    }
    if interaction.event_id.uuid_bytes().is_some() {
        flags |= EVENT_ID_UUID;
    }
    out.extend([VERSION, flags]);
    signed(out, interaction.timestamp);
    bytes(out, interaction.item_id.as_str().as_bytes());
    event_id(out, &interaction.event_id);
    if let Some(value) = interaction.value {
        out.extend(value.to_le_bytes());
    }
    if let Some((text, uuid)) = rec_id {
        id(out, text, uuid);
    }
}

/// Reads either form: JSON (written before this encoding) or the binary one.
pub(super) fn decode(entry: &[u8]) -> Option<Interaction> {
    if entry.first() == Some(&b'{') {
        return serde_json::from_slice(entry).ok();
    }
    let mut r = Reader(entry);
    if r.byte()? != VERSION {
        return None;
    }
    let flags = r.byte()?;
    let event_type = *EventType::ALL.get(usize::from(flags & 0b111))?;
    let timestamp = r.signed()?;
    let item_id = ItemId::from(r.text()?.as_str());
    let event_id = r.event_id(flags & EVENT_ID_UUID != 0)?;
    let value = if flags & VALUE != 0 { Some(f64::from_le_bytes(r.take(8)?.try_into().ok()?)) } else { None };
    let rec_id = if flags & REC_ID != 0 { Some(Arc::from(r.id(flags & REC_ID_UUID != 0)?.as_str())) } else { None };
    r.0.is_empty().then_some(Interaction { event_id, item_id, event_type, value, timestamp, rec_id })
}

const LIST_REC_ID_UUID: u8 = 1;
const LIST_LAST_EVENT: u8 = 1 << 1;
const LIST_LAST_EVENT_UUID: u8 = 1 << 2;
const LIST_CONTROL: u8 = 1 << 3;

/// A pushed list in its stored form. Layout: version `1`; a flags byte (bit 0 the rec id is a
/// UUID, 1 a last event id, 2 it is a UUID, 3 the variant is `control`); the rec id (as an event
/// id above); the model version (varint length, bytes); the variant unless `control`; the
/// generation time as a zigzag varint; the sequence number as a varint; the last event id if
/// present; the number of items, then each item as the length of the prefix its id shares with
/// the previous item's id (a varint), the rest of the id (varint length, bytes) and the score
/// (`f32`, little endian, so it reads back exactly). The user id is not stored: the key names it.
pub(super) fn encode_list(list: &RecList) -> Vec<u8> {
    let rec_id = canonical_uuid(&list.rec_id);
    let last_event = list.last_event_id.as_ref();
    let mut flags = 0;
    if rec_id.is_some() {
        flags |= LIST_REC_ID_UUID;
    }
    if let Some(id) = last_event {
        flags |= LIST_LAST_EVENT | if id.uuid_bytes().is_some() { LIST_LAST_EVENT_UUID } else { 0 };
    }
    if list.variant == CONTROL {
        flags |= LIST_CONTROL;
    }
    let mut out = Vec::with_capacity(64 + 12 * list.items.len());
    out.extend([VERSION, flags]);
    id(&mut out, &list.rec_id, rec_id);
    bytes(&mut out, list.model_version.as_bytes());
    if list.variant != CONTROL {
        bytes(&mut out, list.variant.as_bytes());
    }
    signed(&mut out, list.generated_at);
    varint(&mut out, list.seq);
    if let Some(id) = last_event {
        event_id(&mut out, id);
    }
    varint(&mut out, list.items.len() as u64);
    let mut previous: &[u8] = b"";
    for item in &list.items {
        let item_id = item.item_id.as_str().as_bytes();
        let shared = previous.iter().zip(item_id).take_while(|(a, b)| a == b).count();
        varint(&mut out, shared as u64);
        bytes(&mut out, &item_id[shared..]);
        out.extend(item.score.to_le_bytes());
        previous = item_id;
    }
    out
}

/// Reads a stored list of `user` in either form: JSON (stored before the compact form) or the
/// compact one.
pub(super) fn decode_list(stored: &[u8], user: &UserId) -> Option<RecList> {
    if stored.first() == Some(&b'{') {
        return serde_json::from_slice(stored).ok();
    }
    let mut r = Reader(stored);
    if r.byte()? != VERSION {
        return None;
    }
    let flags = r.byte()?;
    let rec_id = r.id(flags & LIST_REC_ID_UUID != 0)?;
    let model_version = r.text()?;
    let variant = if flags & LIST_CONTROL != 0 { CONTROL.to_owned() } else { r.text()? };
    let generated_at = r.signed()?;
    let seq = r.varint()?;
    let last_event_id =
        if flags & LIST_LAST_EVENT != 0 { Some(r.event_id(flags & LIST_LAST_EVENT_UUID != 0)?) } else { None };
    let count = usize::try_from(r.varint()?).ok()?;
    // Every item takes at least 6 bytes: a corrupt count cannot make a large allocation.
    let mut items = Vec::with_capacity(count.min(r.0.len() / 6));
    let mut previous: Vec<u8> = Vec::new();
    for _ in 0..count {
        let shared = usize::try_from(r.varint()?).ok()?;
        let rest_len = usize::try_from(r.varint()?).ok()?;
        let rest = r.take(rest_len)?;
        let mut id = previous.get(..shared)?.to_vec();
        id.extend_from_slice(rest);
        let score = f32::from_le_bytes(r.take(4)?.try_into().ok()?);
        items.push(RecItem { item_id: ItemId::from(std::str::from_utf8(&id).ok()?), score });
        previous = id;
    }
    r.0.is_empty().then(|| RecList {
        rec_id,
        user_id: user.clone(),
        model_version,
        variant,
        generated_at,
        seq,
        last_event_id,
        items,
    })
}

/// The first byte of the profile string (a stored list starts with [`VERSION`], JSON with `{`).
const PROFILE: u8 = 2;

/// The parts of a user's profile string, as the append script writes it: the form byte
/// ([`PROFILE`]), a flags byte (bit 0: an older set of event ids may still exist), the lengths of
/// the context and of the list (2 bytes each, big endian), the context (JSON), the list (stored
/// form, or JSON as stored before), then the 8-byte digests of the newest event ids, oldest first.
/// One string rather than a hash: a hash whose values pass 64 bytes (the window does) is a hash
/// table, some 220 bytes more per user, and its write is one `SET … EX` instead of an `HSET` and
/// an `EXPIRE`.
#[derive(Debug, PartialEq)]
pub(super) struct StoredProfile<'a> {
    /// The context as JSON (empty: none).
    pub(super) context: &'a [u8],
    /// The last list (empty: none).
    pub(super) list: &'a [u8],
    /// The de-duplication window.
    pub(super) window: &'a [u8],
}

pub(super) fn decode_profile(stored: &[u8]) -> Option<StoredProfile<'_>> {
    let mut r = Reader(stored);
    if r.byte()? != PROFILE {
        return None;
    }
    let _flags = r.byte()?;
    let lengths = r.take(4)?;
    let context = r.take(usize::from(u16::from_be_bytes([lengths[0], lengths[1]])))?;
    let list = r.take(usize::from(u16::from_be_bytes([lengths[2], lengths[3]])))?;
    (r.0.len() % 8 == 0).then_some(StoredProfile { context, list, window: r.0 })
}

/// Reads the list out of either a stored list or a profile string.
pub(super) fn decode_any_list(stored: &[u8], user: &UserId) -> Option<RecList> {
    match stored.first() {
        Some(&PROFILE) => decode_list(decode_profile(stored)?.list, user),
        _ => decode_list(stored, user),
    }
}

/// The first byte of a parked profile ([`encode_parked`]).
const PARKED: u8 = 3;

/// In a parked profile's context byte: a country follows.
const WITH_COUNTRY: u8 = 0x80;

/// The devices by [`Device::index`].
const DEVICES: [Device; Device::COUNT] = [Device::Mobile, Device::Desktop, Device::Tablet, Device::Tv, Device::Other];

/// A whole profile in one string, as the memory store keeps it while the user's session does not
/// run: 214 bytes in one allocation for a user with one view and a list of 10, where the profile
/// as a structure took a 328-byte map slot and about 460 bytes more in seven allocations (see
/// docs/performance.md, "Memory under many distinct users").
///
/// Layout: [`PARKED`]; the interactions (a count, then each as its length and [`encode`]'s form);
/// the context (a byte, 0: none, else 1 + the device index with bit 7 set when a country
/// follows, then the hour, the weekday, the country (length and bytes) if any and the attributes
/// (a count, then each key and value as length and bytes)); the last list (length and [`encode_list`]'s form, 0: none); the event-id
/// digests (a count, 8 bytes each, little endian); the suppressed items (a count, each as length
/// and bytes); the consumed items (a count, each id as length and bytes and its time as 4 bytes,
/// little endian). Counts and lengths are varints.
pub(super) fn encode_parked(profile: &Profile) -> Vec<u8> {
    let list = profile.last_recs.as_ref().map(encode_list);
    let mut out = Vec::with_capacity(
        16 + 48 * profile.interactions.len()
            + list.as_ref().map_or(0, Vec::len)
            + 8 * profile.event_ids.len()
            + 16 * (profile.suppressed.len() + profile.consumed.len()),
    );
    out.push(PARKED);
    varint(&mut out, profile.interactions.len() as u64);
    let mut entry = Vec::with_capacity(64);
    for interaction in &profile.interactions {
        entry.clear();
        encode_into(&mut entry, interaction);
        bytes(&mut out, &entry);
    }
    match &profile.context {
        None => out.push(0),
        Some(context) => {
            let country = if context.country.is_some() { WITH_COUNTRY } else { 0 };
            out.extend([(1 + context.device.index() as u8) | country, context.hour, context.weekday]);
            if let Some(country) = &context.country {
                bytes(&mut out, country.as_bytes());
            }
            varint(&mut out, context.attributes.len() as u64);
            for (key, value) in &context.attributes {
                bytes(&mut out, key.as_bytes());
                bytes(&mut out, value.as_bytes());
            }
        }
    }
    bytes(&mut out, list.as_deref().unwrap_or(&[]));
    varint(&mut out, profile.event_ids.len() as u64);
    for digest in &profile.event_ids {
        out.extend(digest.0.to_le_bytes());
    }
    varint(&mut out, profile.suppressed.len() as u64);
    for item in &profile.suppressed {
        bytes(&mut out, item.as_str().as_bytes());
    }
    varint(&mut out, profile.consumed.len() as u64);
    for consumed in &profile.consumed {
        bytes(&mut out, consumed.item_id.as_str().as_bytes());
        out.extend(consumed.at_secs.to_le_bytes());
    }
    out
}

/// Reads what [`encode_parked`] wrote for `user`; `None` if it is not that form.
pub(super) fn decode_parked(stored: &[u8], user: &UserId) -> Option<Profile> {
    let mut r = Reader(stored);
    if r.byte()? != PARKED {
        return None;
    }
    let count = |r: &mut Reader<'_>| r.varint().and_then(|n| usize::try_from(n).ok());
    // Room for at most as many entries as the bytes left could hold (`bytes` the least one
    // takes), so a corrupt count cannot make a large allocation.
    let room = |n: usize, r: &Reader<'_>, bytes: usize| n.min(r.0.len() / bytes);
    let n = count(&mut r)?;
    let mut interactions = Vec::with_capacity(room(n, &r, 6));
    for _ in 0..n {
        let len = usize::try_from(r.varint()?).ok()?;
        interactions.push(decode(r.take(len)?)?);
    }
    let context = match r.byte()? {
        0 => None,
        first => {
            let device = *DEVICES.get(usize::from((first & !WITH_COUNTRY).checked_sub(1)?))?;
            let (hour, weekday) = (r.byte()?, r.byte()?);
            let country = if first & WITH_COUNTRY != 0 { Some(Arc::from(r.text()?)) } else { None };
            let mut attributes = BTreeMap::new();
            for _ in 0..count(&mut r)? {
                attributes.insert(r.text()?, r.text()?);
            }
            Some(Context { device, country, attributes, hour, weekday })
        }
    };
    let list_len = usize::try_from(r.varint()?).ok()?;
    let last_recs = match list_len {
        0 => None,
        len => Some(decode_list(r.take(len)?, user)?),
    };
    let n = count(&mut r)?;
    let mut event_ids = Vec::with_capacity(room(n, &r, 8));
    for _ in 0..n {
        event_ids.push(EventDigest(u64::from_le_bytes(r.take(8)?.try_into().ok()?)));
    }
    let n = count(&mut r)?;
    let mut suppressed = Vec::with_capacity(room(n, &r, 1));
    for _ in 0..n {
        suppressed.push(ItemId::from(r.text()?.as_str()));
    }
    let n = count(&mut r)?;
    let mut consumed = Vec::with_capacity(room(n, &r, 5));
    for _ in 0..n {
        let item_id = ItemId::from(r.text()?.as_str());
        consumed.push(ConsumedItem { item_id, at_secs: u32::from_le_bytes(r.take(4)?.try_into().ok()?) });
    }
    r.0.is_empty().then_some(Profile { interactions, context, event_ids, suppressed, last_recs, consumed })
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A signed number as a zigzag varint (small magnitudes, either sign, in few bytes).
fn signed(out: &mut Vec<u8>, n: i64) {
    varint(out, ((n << 1) ^ (n >> 63)) as u64);
}

fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// An event id as [`id`] writes one, from the bytes `EventId` keeps (no text written out first).
fn event_id(out: &mut Vec<u8>, id: &EventId) {
    match id.uuid_bytes() {
        Some(raw) => out.extend(raw),
        None => bytes(out, id.as_str().as_bytes()),
    }
}

fn id(out: &mut Vec<u8>, text: &str, uuid: Option<[u8; 16]>) {
    match uuid {
        Some(raw) => out.extend(raw),
        None => bytes(out, text.as_bytes()),
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn varint(&mut self) -> Option<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    /// A number as [`signed`] wrote it.
    fn signed(&mut self) -> Option<i64> {
        let zigzag = self.varint()?;
        Some(((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64))
    }

    fn text(&mut self) -> Option<String> {
        let len = usize::try_from(self.varint()?).ok()?;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    /// An event id as [`event_id`] wrote it.
    fn event_id(&mut self, uuid: bool) -> Option<EventId> {
        if uuid {
            Some(EventId::from_uuid_bytes(self.take(16)?.try_into().ok()?))
        } else {
            Some(EventId::from(self.text()?.as_str()))
        }
    }

    fn id(&mut self, uuid: bool) -> Option<String> {
        if uuid {
            let raw: [u8; 16] = self.take(16)?.try_into().ok()?;
            Some(uuid::Uuid::from_bytes(raw).hyphenated().to_string())
        } else {
            self.text()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interaction(event_id: &str, rec_id: Option<&str>, value: Option<f64>, timestamp: i64) -> Interaction {
        Interaction {
            event_id: EventId::from(event_id),
            item_id: ItemId::from("item-42 ünïcode"),
            event_type: EventType::Rating,
            value,
            timestamp,
            rec_id: rec_id.map(Arc::from),
        }
    }

    #[test]
    fn every_field_reads_back_exactly_and_uuids_take_16_bytes() {
        let uuid = "0190a3b2-7c4d-7e5f-8a6b-1c2d3e4f5a6b";
        for case in [
            interaction(uuid, Some(uuid), Some(4.5), 1_764_650_000_000),
            interaction("producer-id-17", Some("rec-x"), None, -3),
            // Upper case is a UUID too, but not the form `Uuid` writes: kept as text.
            interaction("0190A3B2-7C4D-7E5F-8A6B-1C2D3E4F5A6B", None, Some(0.0), 0),
        ] {
            let encoded = encode(&case);
            assert_eq!(decode(&encoded), Some(case.clone()), "{encoded:?}");
        }
        let packed = encode(&interaction(uuid, None, None, 1_764_650_000_000));
        let json = serde_json::to_vec(&interaction(uuid, None, None, 1_764_650_000_000)).expect("json");
        assert!(packed.len() * 3 < json.len(), "{} bytes packed against {} as JSON", packed.len(), json.len());
    }

    #[test]
    fn json_entries_written_before_still_load_and_garbage_does_not() {
        let json = br#"{"event_id":"e1","item_id":"i1","event_type":"click","timestamp":7,"rec_id":"r1"}"#;
        let read = decode(json).expect("the JSON form");
        assert_eq!((&*read.event_id.as_str(), read.item_id.as_str(), read.timestamp), ("e1", "i1", 7));
        assert_eq!(read.rec_id.as_deref(), Some("r1"));
        let mut truncated = encode(&interaction("e1", None, None, 1));
        truncated.pop();
        assert_eq!(decode(&truncated), None);
        assert_eq!(decode(&[2, 0]), None, "an unknown version");
    }

    fn list(rec_id: &str, variant: &str, last_event_id: Option<&str>, items: &[&str]) -> RecList {
        RecList {
            rec_id: rec_id.to_owned(),
            user_id: UserId::from("ann"),
            model_version: "sasrec-3".into(),
            variant: variant.into(),
            generated_at: 1_764_650_000_123,
            seq: 300,
            last_event_id: last_event_id.map(EventId::from),
            items: items
                .iter()
                .enumerate()
                .map(|(i, id)| RecItem { item_id: ItemId::from(*id), score: 0.1 + i as f32 / 3.0 })
                .collect(),
        }
    }

    /// The profile string as the append script writes it (writer.rs).
    fn profile(flags: u8, context: &[u8], list: &[u8], window: &[u8]) -> Vec<u8> {
        let mut out = vec![PROFILE, flags];
        out.extend((context.len() as u16).to_be_bytes());
        out.extend((list.len() as u16).to_be_bytes());
        out.extend([context, list, window].concat());
        out
    }

    #[test]
    fn a_profile_string_splits_into_context_list_and_window_and_a_bad_one_does_not() {
        let ann = UserId::from("ann");
        let stored = encode_list(&list("r-1", CONTROL, Some("e-7"), &["a", "b"]));
        let window = [7u8; 16];
        let whole = profile(1, br#"{"hour":3}"#, &stored, &window);
        assert_eq!(
            decode_profile(&whole),
            Some(StoredProfile { context: br#"{"hour":3}"#, list: &stored, window: &window })
        );
        assert_eq!(decode_any_list(&whole, &ann), decode_list(&stored, &ann));
        assert!(decode_any_list(&whole, &ann).is_some());
        assert_eq!(decode_any_list(&stored, &ann), decode_list(&stored, &ann), "a list stored alone");
        let empty = profile(0, b"", b"", b"");
        assert_eq!(decode_profile(&empty), Some(StoredProfile { context: b"", list: b"", window: b"" }));
        assert_eq!(decode_any_list(&empty, &ann), None);
        assert_eq!(decode_profile(&whole[..whole.len() - 1]), None, "a window of whole digests");
        assert_eq!(decode_profile(&whole[..8]), None, "cut inside the context");
        assert_eq!(decode_profile(&stored), None, "a list is not a profile");
    }

    #[test]
    fn a_list_reads_back_exactly_in_under_a_quarter_of_its_json() {
        let uuid = "0190a3b2-7c4d-7e5f-8a6b-1c2d3e4f5a6b";
        let ten: Vec<String> = (0..10).map(|i| format!("item-{}", 99_990 + i)).collect();
        let ten: Vec<&str> = ten.iter().map(String::as_str).collect();
        let ann = UserId::from("ann");
        for case in [
            list(uuid, CONTROL, Some(uuid), &ten),
            list("r-1", "canary-b", Some("e-7"), &["ü-1", "ü-2", "x", "", "x"]),
            list(uuid, CONTROL, None, &[]),
        ] {
            let stored = encode_list(&case);
            assert_eq!(decode_list(&stored, &ann), Some(case.clone()), "{stored:?}");
        }
        let typical = list(uuid, CONTROL, Some(uuid), &ten);
        let (stored, json) = (encode_list(&typical), serde_json::to_vec(&typical).expect("json"));
        assert!(stored.len() * 4 < json.len(), "{} bytes stored against {} as JSON", stored.len(), json.len());
        // A list stored before the compact form, as published.
        assert_eq!(decode_list(&json, &ann), Some(typical));
        let mut truncated = encode_list(&list("r", CONTROL, None, &["a", "b"]));
        truncated.pop();
        assert_eq!(decode_list(&truncated, &ann), None);
    }

    #[test]
    fn a_parked_profile_reads_back_exactly_and_a_cut_or_foreign_one_does_not() {
        let uuid = "0190a3b2-7c4d-7e5f-8a6b-1c2d3e4f5a6b";
        let ann = UserId::from("ann");
        let full = Profile {
            interactions: vec![
                interaction(uuid, Some(uuid), Some(4.5), 1_764_650_000_000),
                interaction("producer-id-17", None, None, -3),
            ],
            context: Some(Context {
                device: Device::Tv,
                country: Some(Arc::from("DE")),
                attributes: BTreeMap::from([("plan".to_owned(), "pro".to_owned()), ("ü".to_owned(), String::new())]),
                hour: 23,
                weekday: 6,
            }),
            event_ids: vec![EventDigest(0), EventDigest(u64::MAX), EventDigest(0x0123_4567_89ab_cdef)],
            suppressed: vec![ItemId::from("x"), ItemId::from("")],
            last_recs: Some(list(uuid, "canary-b", Some(uuid), &["item-1", "item-10", "item-2"])),
            consumed: vec![ConsumedItem { item_id: ItemId::from("item-1"), at_secs: u32::MAX }],
        };
        let no_country =
            Profile { context: Some(Context { device: Device::Other, ..Context::default() }), ..Profile::default() };
        for case in [full.clone(), no_country, Profile::default()] {
            let packed = encode_parked(&case);
            assert_eq!(decode_parked(&packed, &ann), Some(case), "{packed:?}");
        }
        let packed = encode_parked(&full);
        for cut in 0..packed.len() {
            assert_eq!(decode_parked(&packed[..cut], &ann), None, "cut at {cut}");
        }
        let mut longer = packed.clone();
        longer.push(0);
        assert_eq!(decode_parked(&longer, &ann), None, "bytes after the end");
        assert_eq!(decode_parked(&encode_list(full.last_recs.as_ref().expect("a list")), &ann), None, "a list");
        // The devices as the packed form numbers them.
        assert!(DEVICES.iter().enumerate().all(|(i, device)| device.index() == i));
    }
}
