//! Recommendation lists as clients see them, and the pre-serialised update pushed to streams.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::event::{EventId, ItemId, UserId};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RecItem {
    #[schema(value_type = String)]
    pub item_id: ItemId,
    pub score: f32,
}

/// One recommendation list. `rec_id` identifies it for click attribution (`rec_id` on events).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RecList {
    pub rec_id: String,
    #[schema(value_type = String)]
    pub user_id: UserId,
    pub model_version: String,
    /// The experiment variant the user was in: `control` outside canaries and experiments.
    #[serde(default = "control")]
    pub variant: String,
    /// Milliseconds since the Unix epoch.
    pub generated_at: i64,
    /// Per-user sequence number of pushed lists; the SSE event id.
    pub seq: u64,
    /// The newest event of the user this list reflects (none for a user without history), so a
    /// client can tell which of its actions a pushed list already takes into account.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub last_event_id: Option<EventId>,
    pub items: Vec<RecItem>,
}

/// The variant of a list served outside canaries and experiments.
pub const CONTROL: &str = "control";

fn control() -> String {
    CONTROL.to_owned()
}

/// A published list, serialised once and shared by every subscriber of the user.
#[derive(Debug)]
pub struct RecUpdate {
    pub list: RecList,
    /// The list as JSON (the body of `GET .../recommendations` with the default k), encoded on
    /// first use like the frames below (see [`RecUpdate::json`]).
    json: OnceLock<Bytes>,
    /// The whole SSE frame (`id`, `event` and `data` lines), built on first use: most users
    /// never open a stream, and two more copies of the list per user were a third of the heap
    /// of an idle embedded server (see [`RecUpdate::sse`]).
    sse: OnceLock<Bytes>,
    /// The WebSocket text message, built on first use (see [`RecUpdate::ws`]).
    ws: OnceLock<ByteString>,
    /// When this process published it (for the push-stage latency).
    pub published: std::time::Instant,
    /// Whether the list has been reported to the monitor as an impression: a list is one
    /// impression however often it is shown, and only a shown list can be clicked. Shared with
    /// what attribution keeps of it once a newer list is out ([`RecUpdate::shown_flag`]).
    shown: Arc<std::sync::atomic::AtomicBool>,
}

impl RecUpdate {
    pub fn new(list: RecList) -> Arc<Self> {
        Self::sharing_shown(list, Arc::default())
    }

    /// Whether this list has been reported as an impression, shared: what click attribution
    /// keeps of it once a newer list is out (see `session::attribution`), so a stream that shows
    /// the list later still makes it clickable.
    pub fn shown_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.shown.clone()
    }

    /// A list rebuilt from what attribution kept of it, sharing `shown` with the list as it was
    /// published.
    pub fn sharing_shown(list: RecList, shown: Arc<std::sync::atomic::AtomicBool>) -> Arc<Self> {
        Arc::new(Self {
            list,
            json: OnceLock::new(),
            sse: OnceLock::new(),
            ws: OnceLock::new(),
            published: std::time::Instant::now(),
            shown,
        })
    }

    /// The first `k` items of a shown list: what click attribution keeps of a list that is never
    /// pushed again (a few hundred bytes; it is never encoded).
    pub fn shown_bare(list: &RecList, k: usize) -> Arc<Self> {
        let update = Self::bare(RecList { items: list.items.iter().take(k).cloned().collect(), ..list.clone() });
        update.show();
        update
    }

    /// A list not yet shown: one served by another instance, kept for its impression and clicks
    /// only.
    pub fn bare(list: RecList) -> Arc<Self> {
        Self::sharing_shown(list, Arc::default())
    }

    /// The list as JSON. Encoded by the first reader (a `GET`, a stream, the Redis store's
    /// broadcast) and shared by every other: most lists of an embedded server are replaced
    /// before anyone reads them, and an encoded copy was about 600 bytes a user (see
    /// docs/performance.md, "Heap per user").
    pub fn json(&self) -> Bytes {
        self.json
            .get_or_init(|| {
                // Sized up front: growing the buffer by doubling (serde_json's writer) showed as
                // realloc and page faults in profiles of the per-event path.
                let mut buf = Vec::with_capacity(256 + 64 * self.list.items.len());
                serde_json::to_writer(&mut buf, &self.list).expect("a list always serialises");
                // `Bytes::from(Vec)` keeps the whole allocation for as long as the list is the
                // user's latest: the unused reserve goes back (a shrink in place for the
                // allocator).
                buf.shrink_to_fit();
                Bytes::from(buf)
            })
            .clone()
    }

    /// The whole SSE frame: `id` (`<incarnation>-<seq>`, see [`sse_incarnation`]), `event` and
    /// `data` lines. Encoded by the first stream that sends it and shared by every other.
    pub fn sse(&self) -> Bytes {
        self.sse
            .get_or_init(|| {
                let json = self.json();
                let seq = format!("{}-{}", sse_incarnation(), self.list.seq);
                let mut sse = Vec::with_capacity(json.len() + seq.len() + 40);
                for part in
                    [&b"id: "[..], seq.as_bytes(), &b"\nevent: recommendations\ndata: "[..], &json, &b"\n\n"[..]]
                {
                    sse.extend_from_slice(part);
                }
                Bytes::from(sse)
            })
            .clone()
    }

    /// The WebSocket text message: `{"type":"recommendations","data":<list>}`. Encoded by the
    /// first socket that sends it and shared by every other.
    pub fn ws(&self) -> ByteString {
        self.ws
            .get_or_init(|| {
                let json = self.json();
                let json = std::str::from_utf8(&json).expect("serde_json writes UTF-8");
                let mut ws = String::with_capacity(json.len() + 40);
                for part in ["{\"type\":\"recommendations\",\"data\":", json, "}"] {
                    ws.push_str(part);
                }
                ByteString::from(ws)
            })
            .clone()
    }

    /// Marks the list shown; true the first time only (the one impression it counts).
    pub fn show(&self) -> bool {
        !self.shown.swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// Takes back a [`RecUpdate::show`] whose impression could not be reported.
    pub fn unshow(&self) {
        self.shown.store(false, std::sync::atomic::Ordering::Release);
    }

    /// Whether the list has been shown (reported as an impression).
    pub fn is_shown(&self) -> bool {
        self.shown.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The first part of this process's SSE event ids: the time of its first stream frame in
/// milliseconds, so that a `Last-Event-ID` names a list of this process only. An embedded server
/// numbers a user's lists (`seq`) from 1 again after a restart, and a plain `seq` from before
/// it could name the new process's current list, which the stream would then hold back.
pub fn sse_incarnation() -> &'static str {
    static INCARNATION: OnceLock<String> = OnceLock::new();
    INCARNATION.get_or_init(|| crate::event::now_ms().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_frames_wrap_the_list_json() {
        let list: RecList = serde_json::from_value(serde_json::json!({
            "rec_id": "r1", "user_id": "u\"1", "model_version": "v1", "variant": "control",
            "generated_at": 5, "seq": 42, "last_event_id": null,
            "items": [{"item_id": "item-0001", "score": 0.5}, {"item_id": "é", "score": 1.0}]
        }))
        .expect("a list");
        let update = RecUpdate::new(list.clone());
        let json = serde_json::to_string(&list).expect("json");
        assert_eq!(update.json(), json.as_bytes());
        let id = format!("{}-42", sse_incarnation());
        assert_eq!(update.sse(), format!("id: {id}\nevent: recommendations\ndata: {json}\n\n").as_bytes());
        assert_eq!(&*update.ws(), format!("{{\"type\":\"recommendations\",\"data\":{json}}}"));
    }
}
