//! Live recommendation streams: Server-Sent Events per user, and a WebSocket that may subscribe to
//! several users and send events.
//!
//! Both read a user's hub through a watch channel, which holds only the newest list: a client that
//! cannot keep up skips stale lists (counted in `liverec_push_dropped_stale_total`) instead of
//! making the server buffer them. Every list is serialised once, when published, and the same bytes
//! go to every subscriber.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason};
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamMap;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::events::{decode_value, publish};
use super::recommendations::tell_owner;
use super::state::AppState;
use crate::actors::lists::list_from_store;
use crate::actors::messages::{EnsureList, RecFilters};
use crate::actors::registry::Subscription;
use crate::event::UserId;
use crate::recs::RecUpdate;
use crate::telemetry::{Gauge, Metrics};
pub use liverec_wire::ws::{parse_message, Command, MessageError};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/users/{user_id}/recommendations/stream").route(web::get().to(sse)))
        .service(web::resource("/v1/ws").route(web::get().to(websocket)));
}

/// Counts a subscriber in a gauge for as long as it lives.
struct GaugeGuard {
    metrics: Arc<Metrics>,
    gauge: fn(&Metrics) -> &Gauge,
}

impl GaugeGuard {
    fn new(metrics: Arc<Metrics>, gauge: fn(&Metrics) -> &Gauge) -> Self {
        gauge(&metrics).inc();
        Self { metrics, gauge }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        (self.gauge)(&self.metrics).dec();
    }
}

/// Tracks the last sequence number a subscriber got, counting lists it skipped.
#[derive(Default)]
struct SeqTracker {
    last: Option<u64>,
}

impl SeqTracker {
    /// Whether `update` should be sent; counts skipped lists since the previous one sent.
    fn accept(&mut self, update: &RecUpdate, metrics: &Metrics) -> bool {
        let seq = update.list.seq;
        match self.last {
            Some(last) if seq == last => false,
            Some(last) => {
                if seq > last + 1 {
                    metrics.push_dropped_stale.add(seq - last - 1);
                }
                self.last = Some(seq);
                true
            }
            None => {
                self.last = Some(seq);
                true
            }
        }
    }
}

/// What a stream says when its token expires.
const TOKEN_EXPIRED: &str = "the stream token expired; reconnect with a fresh token";

/// Resolves when a stream token expires at `at`; never without one (API keys, auth off).
async fn token_expiry(at: Option<SystemTime>) {
    match at {
        Some(at) => tokio::time::sleep(at.duration_since(SystemTime::now()).unwrap_or_default()).await,
        None => std::future::pending().await,
    }
}

/// The close code for a protocol error: 1009 for a frame or a joined message over the limits,
/// 1007 for text that is not UTF-8, 1002 for the rest.
fn close_code(error: &actix_ws::ProtocolError) -> CloseCode {
    match error {
        actix_ws::ProtocolError::Overflow => CloseCode::Size,
        // actix-ws reports a joined message over `max_continuation_size`, and text frames whose
        // joined bytes are not UTF-8, as I/O errors: told apart by kind (it has no variant).
        actix_ws::ProtocolError::Io(error) if error.kind() == std::io::ErrorKind::InvalidData => CloseCode::Invalid,
        actix_ws::ProtocolError::Io(error) if error.to_string().contains("continuation size") => CloseCode::Size,
        _ => CloseCode::Protocol,
    }
}

fn subscribe(state: &AppState, user: &UserId) -> Subscription {
    let (subscription, session) = state.registry.subscribe(user);
    // The current list goes to the new subscriber at once: an impression the session did not
    // count if it published it to nobody.
    if let Some(current) = subscription.latest() {
        crate::actors::lists::report_impression(&state.registry.deps, &current, current.list.items.len());
    }
    match session {
        // The session produces a first list if the user has none yet; a full mailbox means it is
        // busy producing one anyway.
        Some(session) => {
            let _ = session.try_ensure_list(EnsureList { fresh: false });
        }
        // Production mode, user owned elsewhere (or idle): show the stored list, or one scored
        // from the stored profile, until the owner publishes a newer one.
        None if subscription.latest().is_none() => {
            // The owner counts it and attributes its clicks once told (see `tell_owner`).
            let (registry, bus) = (state.registry.clone(), state.bus.clone());
            let user = user.clone();
            let default_k = state.config.recs.default_k;
            actix_web::rt::spawn(async move {
                match list_from_store(&registry.deps, &user, default_k, &RecFilters::default()).await {
                    Ok(update) => {
                        let counted = registry.owned_by_ingest()
                            && tell_owner(&*bus, &registry.deps, &user, &update, default_k).await;
                        registry.deliver_elsewhere(update.list.clone(), counted);
                    }
                    Err(error) => tracing::warn!(error = %error, "no first list for a subscriber"),
                }
            });
        }
        None => {}
    }
    subscription
}

/// The `seq` a client's `Last-Event-ID` names, if it names a list of this process
/// (`<incarnation>-<seq>`). An id of another incarnation (a server since restarted, another
/// instance) or in the old plain-number form names a list the stream cannot know: it sends the
/// current list.
fn resumed_seq(last_event_id: &str, incarnation: &str) -> Option<u64> {
    let (of, seq) = last_event_id.trim().split_once('-')?;
    (of == incarnation).then(|| seq.parse().ok()).flatten()
}

struct SseState {
    subscription: Subscription,
    seq: SeqTracker,
    /// The client's `Last-Event-ID`: the list it already has is not sent again.
    resume_from: Option<u64>,
    heartbeat: tokio::time::Interval,
    shutdown: tokio::sync::watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    closing: bool,
    /// When the stream token the stream was opened with expires: the stream ends then.
    expires: Option<SystemTime>,
    _guard: GaugeGuard,
    _slot: super::limits::StreamSlot,
}

/// Live recommendations (SSE)
///
/// A Server-Sent Events stream of the user's lists: `event: recommendations` with the list as
/// `data` and `<incarnation>-<seq>` as `id` (send it back as `Last-Event-ID` to resume without a
/// repeat; an id from another server process gets the current list), a comment
/// line as heartbeat, `event: erased` when the user is erased, and `event: token_expired` (the
/// stream ends) when the stream token it was opened with expires. A client that falls behind
/// skips stale lists. Needs the `reader` role, or a stream token for this user (as
/// `?access_token=` from browsers).
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/recommendations/stream",
    tag = "recommendations",
    params(
        ("user_id" = String, Path, min_length = 1, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$", description = "The user"),
        ("access_token" = Option<String>, Query, description = "A stream token, for clients that cannot set headers (no API key)"),
    ),
    responses(
        (status = 200, description = "The stream; each `data` line is a RecList", body = String, content_type = "text/event-stream"),
        (status = 400, description = "An invalid user id", body = ErrorBody),
        (status = 403, description = "The credential may not read this user", body = ErrorBody),
    )
)]
pub async fn sse(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let user = state.user_id(&path, "user_id")?;
    caller.read(&user)?;
    let slot = state.limiters.open_stream(req.peer_addr().map(|a| a.ip()))?;
    let resume_from = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|id| resumed_seq(id, crate::recs::sse_incarnation()));
    let mut subscription = subscribe(&state, &user);
    // Deliver the current list (if any) at once.
    subscription.receiver().mark_changed();
    let period = Duration::from_secs(state.config.stream.heartbeat_secs);
    let initial = SseState {
        subscription,
        seq: SeqTracker::default(),
        resume_from,
        heartbeat: tokio::time::interval_at(tokio::time::Instant::now() + period, period),
        shutdown: state.shutdown.clone(),
        metrics: state.metrics.clone(),
        closing: false,
        expires: caller.expires,
        _guard: GaugeGuard::new(state.metrics.clone(), |m| &m.subscribers_sse),
        _slot: slot,
    };
    let retry = Bytes::from_static(b"retry: 2000\n\n");
    let updates = futures_util::stream::unfold(initial, |mut st| async move {
        if st.closing {
            return None;
        }
        loop {
            enum Next {
                Changed(bool),
                Heartbeat,
                Shutdown,
                Expired,
            }
            let next = tokio::select! {
                changed = st.subscription.receiver().changed() => Next::Changed(changed.is_ok()),
                _ = st.heartbeat.tick() => Next::Heartbeat,
                _ = st.shutdown.wait_for(|stopping| *stopping) => Next::Shutdown,
                _ = token_expiry(st.expires) => Next::Expired,
            };
            match next {
                Next::Changed(false) => return None,
                Next::Changed(true) => {
                    let Some(update) = st.subscription.receiver().borrow_and_update().clone() else {
                        if st.subscription.erased() {
                            st.closing = true;
                            return Some((Ok(Bytes::from_static(b"event: erased\ndata: {}\n\n")), st));
                        }
                        continue;
                    };
                    if st.resume_from.take() == Some(update.list.seq) {
                        st.seq.last = Some(update.list.seq);
                        continue;
                    }
                    // The list current at subscription time is not a push: its age is not latency.
                    let first = st.seq.last.is_none();
                    if st.seq.accept(&update, &st.metrics) {
                        st.metrics.push_sent_sse.inc();
                        if !first {
                            st.metrics.stage_push_seconds.observe_duration(update.published.elapsed());
                        }
                        return Some((Ok::<_, actix_web::Error>(update.sse()), st));
                    }
                }
                Next::Heartbeat => return Some((Ok(Bytes::from_static(b": heartbeat\n\n")), st)),
                Next::Shutdown => {
                    st.closing = true;
                    return Some((Ok(Bytes::from_static(b"event: shutdown\ndata: {}\n\n")), st));
                }
                Next::Expired => {
                    st.closing = true;
                    let event = format!("event: token_expired\ndata: {}\n\n", json!({ "message": TOKEN_EXPIRED }));
                    return Some((Ok(Bytes::from(event)), st));
                }
            }
        }
    });
    let body = futures_util::stream::once(async move { Ok(retry) }).chain(updates);
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(body))
}

/// A WebSocket: `{"subscribe": "<user>"}`, `{"unsubscribe": "<user>"}`, `{"event": {...}}`,
/// `{"events": [...]}` in; lists, acknowledgements and errors out.
/// Live recommendations (WebSocket)
///
/// One socket for several users: send `{"type": "subscribe", "user_id": …}` (up to
/// `stream.ws_max_subscriptions`), `unsubscribe`, or `event`/`events` to post; receive
/// `{"type": "recommendations", "data": RecList}`, `erased`, JSON errors, and `token_expired`
/// before the close (1008) when the stream token it was opened with expires (docs/api.md).
/// Browsers must come from an origin in `auth.allowed_origins`.
#[utoipa::path(
    get,
    path = "/v1/ws",
    tag = "recommendations",
    params(("access_token" = Option<String>, Query, description = "A stream token, for clients that cannot set headers (no API key)")),
    responses(
        (status = 101, description = "Switched to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket handshake", body = ErrorBody),
        (status = 403, description = "The page's origin is not allowed", body = ErrorBody),
    )
)]
pub async fn websocket(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, actix_web::Error> {
    check_origin(&req, &state)?;
    let slot = state.limiters.open_stream(req.peer_addr().map(|a| a.ip()))?;
    let (response, session, stream) =
        actix_ws::handle(&req, body).map_err(|e| ApiError::bad_request("not_a_websocket", e.to_string()))?;
    let stream = stream
        .max_frame_size(state.config.stream.ws_max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(state.config.stream.ws_max_message_bytes);
    actix_web::rt::spawn(run_socket(state.into_inner(), caller, slot, session, stream));
    Ok(response)
}

/// Refuses a WebSocket handshake from a browser page of another origin unless
/// `auth.allowed_origins` lists it (`"*"`: any). Clients that send no `Origin` (not browsers)
/// pass; with an empty list only the server's own origin does.
fn check_origin(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let Some(origin) = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let allowed = &state.config.auth.allowed_origins;
    let host = req.connection_info().host().to_owned();
    let same_origin = origin.split_once("://").is_some_and(|(_, rest)| rest == host);
    if allowed.iter().any(|a| a == "*" || a == origin) || (allowed.is_empty() && same_origin) {
        Ok(())
    } else {
        Err(ApiError::new(
            actix_web::http::StatusCode::FORBIDDEN,
            "origin_not_allowed",
            format!("WebSocket connections from {origin} are not allowed (auth.allowed_origins)"),
        ))
    }
}

struct Socket {
    state: Arc<AppState>,
    /// Who opened the socket: what it may subscribe to and post.
    caller: Caller,
    session: actix_ws::Session,
    subscriptions: StreamMap<UserId, WatchStream<Option<Arc<RecUpdate>>>>,
    holds: Vec<Subscription>,
    seqs: std::collections::HashMap<UserId, SeqTracker>,
}

enum Flow {
    Continue,
    Close(Option<CloseReason>),
}

async fn run_socket(
    state: Arc<AppState>,
    caller: Caller,
    _slot: super::limits::StreamSlot,
    session: actix_ws::Session,
    mut stream: actix_ws::AggregatedMessageStream,
) {
    let _guard = GaugeGuard::new(state.metrics.clone(), |m| &m.subscribers_ws);
    let period = Duration::from_secs(state.config.stream.heartbeat_secs);
    let timeout = Duration::from_secs(state.config.stream.client_timeout_secs);
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut shutdown = state.shutdown.clone();
    let mut last_heard = Instant::now();
    let expires = caller.expires;
    let mut socket = Socket {
        caller,
        state,
        session,
        subscriptions: StreamMap::new(),
        holds: Vec::new(),
        seqs: std::collections::HashMap::new(),
    };
    let reason = loop {
        let flow = tokio::select! {
            message = stream.recv() => {
                last_heard = Instant::now();
                match message {
                    None => break None,
                    // A message that arrives after the token expired is not acted on.
                    Some(Ok(_)) if socket.caller.expired() => socket.token_expired().await,
                    Some(Ok(message)) => socket.on_message(message).await,
                    Some(Err(error)) => {
                        socket.state.metrics.ws_invalid_messages.inc();
                        let code = close_code(&error);
                        Flow::Close(Some(CloseReason { code, description: Some(error.to_string()) }))
                    }
                }
            }
            Some((user, update)) = socket.subscriptions.next(), if !socket.subscriptions.is_empty() => {
                socket.on_update(user, update).await
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > timeout {
                    Flow::Close(Some(CloseReason { code: CloseCode::Away, description: Some("ping timeout".into()) }))
                } else if socket.session.ping(b"").await.is_err() {
                    break None;
                } else {
                    Flow::Continue
                }
            }
            _ = shutdown.wait_for(|stopping| *stopping) => {
                Flow::Close(Some(CloseReason { code: CloseCode::Away, description: Some("server shutting down".into()) }))
            }
            _ = token_expiry(expires) => socket.token_expired().await,
        };
        match flow {
            Flow::Continue => {}
            Flow::Close(reason) => break reason,
        }
    };
    let _ = socket.session.close(reason).await;
}

impl Socket {
    /// Says the stream token expired, then closes with 1008 (policy violation).
    async fn token_expired(&mut self) -> Flow {
        let _ = self.send(json!({ "type": "token_expired", "message": TOKEN_EXPIRED }).to_string()).await;
        Flow::Close(Some(CloseReason { code: CloseCode::Policy, description: Some("stream token expired".into()) }))
    }

    async fn send(&mut self, text: impl Into<bytestring::ByteString>) -> Flow {
        match self.session.text(text).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close(None),
        }
    }

    /// Refuses a message the client got wrong (counted as invalid).
    async fn send_error(&mut self, error: ApiError) -> Flow {
        self.state.metrics.ws_invalid_messages.inc();
        self.send_failure(error).await
    }

    /// Reports a failure that is not the client's fault (a full pipeline, an unavailable bus).
    async fn send_failure(&mut self, error: ApiError) -> Flow {
        let text = format!("{{\"type\":\"error\",{}", &error.body_json()[1..]);
        self.send(text).await
    }

    async fn on_update(&mut self, user: UserId, update: Option<Arc<RecUpdate>>) -> Flow {
        let Some(update) = update else {
            if self.holds.iter().any(|h| h.user() == &user && h.erased()) {
                self.subscriptions.remove(&user);
                self.seqs.remove(&user);
                self.holds.retain(|h| h.user() != &user);
                return self.send(json!({ "type": "erased", "user_id": user }).to_string()).await;
            }
            return Flow::Continue;
        };
        let metrics = self.state.metrics.clone();
        let tracker = self.seqs.entry(user).or_default();
        let first = tracker.last.is_none();
        if !tracker.accept(&update, &metrics) {
            return Flow::Continue;
        }
        metrics.push_sent_ws.inc();
        if !first {
            metrics.stage_push_seconds.observe_duration(update.published.elapsed());
        }
        self.send(update.ws()).await
    }

    async fn on_message(&mut self, message: AggregatedMessage) -> Flow {
        match message {
            AggregatedMessage::Text(text) => self.on_text(&text).await,
            AggregatedMessage::Binary(_) => {
                self.send_error(ApiError::bad_request("unsupported_frame", "send JSON text frames, not binary")).await
            }
            AggregatedMessage::Ping(bytes) => match self.session.pong(&bytes).await {
                Ok(()) => Flow::Continue,
                Err(_) => Flow::Close(None),
            },
            AggregatedMessage::Pong(_) => Flow::Continue,
            AggregatedMessage::Close(_) => Flow::Close(None),
        }
    }

    async fn on_text(&mut self, text: &str) -> Flow {
        match parse_message(text, self.state.config.events.max_id_len) {
            Ok(Command::Subscribe(raw)) => self.subscribe(&raw).await,
            Ok(Command::Unsubscribe(raw)) => self.unsubscribe(&raw).await,
            Ok(Command::Events { value, many }) => self.events(value, many).await,
            Err(error) => self.send_error(error.into()).await,
        }
    }

    async fn subscribe(&mut self, raw: &str) -> Flow {
        let user = self.state.pseudonyms.user(raw);
        if let Err(error) = self.caller.read(&user) {
            return self.send_error(error.with_field("subscribe")).await;
        }
        if !self.subscriptions.contains_key(&user) {
            let max = self.state.config.stream.ws_max_subscriptions;
            if self.subscriptions.len() >= max {
                return self
                    .send_error(
                        ApiError::bad_request(
                            "too_many_subscriptions",
                            format!("a socket may subscribe to at most {max} users"),
                        )
                        .with_field("subscribe"),
                    )
                    .await;
            }
            let mut hold = subscribe(&self.state, &user);
            let rx = hold.take_receiver();
            self.holds.push(hold);
            // WatchStream yields the current list first, then every change.
            self.subscriptions.insert(user.clone(), WatchStream::new(rx));
            self.seqs.insert(user.clone(), SeqTracker::default());
        }
        self.send(json!({ "type": "subscribed", "user_id": user }).to_string()).await
    }

    async fn unsubscribe(&mut self, raw: &str) -> Flow {
        let user = self.state.pseudonyms.user(raw);
        self.subscriptions.remove(&user);
        self.seqs.remove(&user);
        self.holds.retain(|h| h.user() != &user);
        self.send(json!({ "type": "unsubscribed", "user_id": user }).to_string()).await
    }

    async fn events(&mut self, value: Value, many: bool) -> Flow {
        let received = Instant::now();
        let state = self.state.clone();
        let events = match decode_value(value, many, &state) {
            Ok(events) => events,
            Err(error) => {
                state.metrics.ingest_invalid.inc();
                return self.send_error(error).await;
            }
        };
        if let Err(error) = self.caller.produce(&events) {
            return self.send_error(error).await;
        }
        match publish(&state, events, received, &state.metrics.ingest_events_ws).await {
            Ok(accepted) => {
                let mut ack = json!({ "type": "ack", "accepted": accepted.accepted, "event_ids": accepted.event_ids });
                if let Some(erased) = accepted.erased {
                    ack["erased"] = json!(erased);
                }
                self.send(ack.to_string()).await
            }
            Err(error) => self.send_failure(error).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::resumed_seq;

    #[test]
    fn a_last_event_id_resumes_only_a_list_of_this_incarnation() {
        assert_eq!(resumed_seq("1795698842339-7", "1795698842339"), Some(7));
        assert_eq!(resumed_seq(" 1795698842339-7 ", "1795698842339"), Some(7));
        assert_eq!(resumed_seq("1795698800000-7", "1795698842339"), None, "a server since restarted");
        assert_eq!(resumed_seq("7", "1795698842339"), None, "the old plain form: unknown incarnation");
        assert_eq!(resumed_seq("1795698842339-x", "1795698842339"), None);
        assert_eq!(resumed_seq("", "1795698842339"), None);
    }
}
