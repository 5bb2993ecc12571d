//! `POST /v1/events`: one event or an array of them. The whole batch is decoded and validated
//! before anything is published, so an invalid batch applies nothing; then it is handed to the
//! event bus, and `202` means the bus accepted all of it.

use std::collections::HashMap;
use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use tracing::Instrument as _;

use super::auth::Caller;
use super::body::{decode_json, read_json_body};
use super::error::{json_error, ApiError, ErrorBody};
use super::state::AppState;
use crate::bus::EventBatch;
use crate::event::{now_ms, Event, EventId, EventIn, UserId};
use crate::telemetry::Counter;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/events").route(web::post().to(post_events)));
}

/// The answer to an accepted batch.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Accepted {
    /// How many events were accepted: the batch less those listed in `erased`.
    pub accepted: usize,
    /// The ids of the batch's events, in order (assigned by the server where the event had
    /// none), refused ones included so that indexes match the request.
    #[schema(value_type = Vec<String>)]
    pub event_ids: Vec<EventId>,
    /// Indexes (in the request) of events refused because their user was erased at or after
    /// their timestamp: they are never applied. Absent when none was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub erased: Option<Vec<usize>>,
}

/// The request body of `POST /v1/events`, for the OpenAPI document only: the handler decodes
/// the two forms itself (see [`decode_bytes`]) for precise error paths.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum EventsBody {
    One(EventIn),
    /// 1 to `events.max_batch` events, validated as a whole: one invalid event rejects all.
    Many(Vec<EventIn>),
}

/// Post events
///
/// One event, or an array of events applied in order. The whole batch is validated before
/// anything is published, so an invalid batch applies nothing; `202` means the event bus took
/// all of it (in production mode: Kafka acknowledged it). Repeating an `event_id` is harmless:
/// each id is applied once per user. Needs the `producer` role, or a stream token for the
/// events' user.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "events",
    request_body(content = EventsBody, content_type = "application/json"),
    responses(
        (status = 202, description = "Every event of the batch was accepted", body = Accepted),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 403, description = "The credential may not post events (of this user)", body = ErrorBody),
        (status = 409, description = "Every event of the batch is for an erased user and dated at or before the erasure (`user_erased`); nothing is applied", body = ErrorBody),
        (status = 413, description = "The body or the batch is larger than the limit", body = ErrorBody),
        (status = 422, description = "An event is invalid; `field` names it, e.g. `[3].item_id`. Also `unknown_item` (the catalogue lacks the item and `catalog.accept_unknown_items` is false) and `too_many_unknown_items` (`catalog.max_event_items` items are known only from events)", body = ErrorBody),
    )
)]
pub async fn post_events(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let received = Instant::now();
    let body = read_json_body(&req, payload, state.config.server.max_body_bytes).await?;
    let events = match decode_bytes(&body, &state) {
        Ok(events) => events,
        Err(error) => {
            state.metrics.ingest_invalid.inc();
            return Err(error);
        }
    };
    caller.produce(&events)?;
    let accepted = publish(&state, events, received, &state.metrics.ingest_events_http).await?;
    Ok(HttpResponse::Accepted().json(accepted))
}

/// Decodes and validates a JSON body holding one event or an array of events.
pub fn decode_bytes(body: &[u8], state: &AppState) -> Result<Vec<Event>, ApiError> {
    // Decoded as the form the body opens with, so an error's path is the field's, not the
    // untagged enum's "no variant matched".
    let is_array = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    let raw = if is_array {
        Raw::Many(decode_json(body, "invalid_event")?)
    } else {
        Raw::One(decode_json(body, "invalid_event")?)
    };
    validate(raw, state)
}

/// Decodes and validates events already parsed as JSON (WebSocket messages).
pub fn decode_value(value: serde_json::Value, many: bool, state: &AppState) -> Result<Vec<Event>, ApiError> {
    let raw = if many {
        Raw::Many(serde_path_to_error::deserialize(value).map_err(|e| json_error(e, "invalid_event"))?)
    } else {
        Raw::One(serde_path_to_error::deserialize(value).map_err(|e| json_error(e, "invalid_event"))?)
    };
    validate(raw, state)
}

enum Raw {
    One(EventIn),
    Many(Vec<EventIn>),
}

fn validate(raw: Raw, state: &AppState) -> Result<Vec<Event>, ApiError> {
    let many = matches!(raw, Raw::Many(_));
    let mut events = validate_ids(raw, state)?;
    admit_items(&events, many, state)?;
    for event in &mut events {
        event.user_id = state.pseudonyms.user(event.user_id.as_str());
    }
    Ok(events)
}

/// Lets the catalogue take the items the events name, or refuses the batch (`422`, naming the
/// first event whose item it would not take) when an item is unknown and
/// `catalog.accept_unknown_items` is off, or items known only from events are at
/// `catalog.max_event_items`. Refused rather than applied without the item: the event would
/// otherwise vanish after a `202`, and a client can put the item and send it again.
fn admit_items(events: &[Event], many: bool, state: &AppState) -> Result<(), ApiError> {
    state.catalog.admit(events.iter().map(|e| &e.item_id)).map_err(|(i, refused)| {
        let field = if many { format!("[{i}].item_id") } else { "item_id".to_owned() };
        ApiError::from(refused).with_field(field)
    })
}

fn validate_ids(raw: Raw, state: &AppState) -> Result<Vec<Event>, ApiError> {
    let limits = state.config.events.limits();
    let now = now_ms();
    match raw {
        Raw::One(event) => Ok(vec![event.validate(&limits, now)?]),
        Raw::Many(events) => {
            let max = state.config.events.max_batch;
            if events.is_empty() {
                return Err(ApiError::unprocessable("empty_batch", "the batch holds no event"));
            }
            if events.len() > max {
                return Err(ApiError::new(
                    actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
                    "batch_too_large",
                    format!("the batch holds {} events; the limit is {max}", events.len()),
                ));
            }
            events
                .into_iter()
                .enumerate()
                .map(|(i, e)| e.validate(&limits, now).map_err(|err| ApiError::from(err.at(&format!("[{i}]")))))
                .collect()
        }
    }
}

/// Indexes of `events` that an erasure of their user covers (dated at or before its tombstone):
/// sessions never apply them, so the client is told instead of getting a silent 202. A store
/// that cannot answer refuses nothing here; the session still skips what the tombstone covers.
async fn erased_indexes(state: &AppState, events: &[(UserId, i64)]) -> Vec<usize> {
    let mut tombstones: HashMap<&UserId, Option<i64>> = HashMap::new();
    let mut erased = Vec::new();
    for (i, (user, timestamp)) in events.iter().enumerate() {
        let at = match tombstones.get(user) {
            Some(at) => *at,
            None => {
                let at = state.store.tombstone(user).await.unwrap_or(None);
                tombstones.insert(user, at);
                at
            }
        };
        if at.is_some_and(|at| *timestamp <= at) {
            erased.push(i);
        }
    }
    erased
}

/// Publishes validated events, less those an erasure of their user covers (listed in the
/// answer, or `409 user_erased` when that is all of them).
pub async fn publish(
    state: &AppState,
    events: Vec<Event>,
    received: Instant,
    counter: &Counter,
) -> Result<Accepted, ApiError> {
    let event_ids: Vec<EventId> = events.iter().map(|e| e.event_id.clone()).collect();
    let stamps =
        |events: &[Event]| -> Vec<(UserId, i64)> { events.iter().map(|e| (e.user_id.clone(), e.timestamp)).collect() };
    let mut erased = erased_indexes(state, &stamps(&events)).await;
    if erased.len() == events.len() {
        state.metrics.privacy_skipped.add(erased.len() as u64);
        let field = if events.len() == 1 { "timestamp".to_owned() } else { "[0].timestamp".to_owned() };
        return Err(ApiError::new(
            actix_web::http::StatusCode::CONFLICT,
            "user_erased",
            "the user was erased at or after the time of every event of the batch; nothing was applied",
        )
        .with_field(field));
    }
    let total = events.len();
    let (events, kept): (Vec<Event>, Vec<usize>) =
        events.into_iter().enumerate().filter(|(i, _)| !erased.contains(i)).map(|(i, e)| (e, i)).unzip();
    let count = events.len();
    let span =
        crate::telemetry::span(|| tracing::info_span!("receive", events = count, trace_id = tracing::field::Empty));
    crate::telemetry::record_trace_id(&span);
    // Kept to see whether an erasure landed while the batch was being published.
    let published = stamps(&events);
    let batch = EventBatch { events, received, span: span.clone(), room: None };
    if let Err(error) = state.bus.publish(batch).instrument(span.clone()).await {
        state.metrics.ingest_shed.inc();
        return Err(error.into());
    }
    // An erasure of the user that completed meanwhile, dated after an event, makes the session
    // skip it: say so rather than count it accepted.
    let late = erased_indexes(state, &published).await;
    erased.extend(late.iter().map(|&i| kept[i]));
    erased.sort_unstable();
    state.metrics.privacy_skipped.add((total - count) as u64);
    counter.add(count as u64);
    state.metrics.stage_receive_seconds.observe_duration(received.elapsed());
    span.in_scope(|| tracing::debug!(events = count, "events accepted"));
    let accepted = total - erased.len();
    Ok(Accepted { accepted, event_ids, erased: (!erased.is_empty()).then_some(erased) })
}
