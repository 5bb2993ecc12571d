//! `POST /v1/users/{user_id}/merge` (fold an anonymous visitor's history into a user, as at
//! login) and `GET /v1/users/{user_id}/export` (everything stored about the user).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::auth::Caller;
use super::error::ApiError;
use super::{decode_json_body, AppState};
use crate::actors::messages::{MergeHistory, Snapshot, TakeHistory};
use crate::auth::Role;
use crate::event::UserId;
use crate::store::{ProfileUpdate, StoreError};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/users/{user_id}/merge").route(web::post().to(merge)))
        .service(web::resource("/v1/users/{user_id}/export").route(web::get().to(export)))
        .service(web::resource("/v1/users/{user_id}").route(web::delete().to(erase)));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MergeRequest {
    from: String,
}

async fn merge(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let user = state.user_id(&path, "user_id")?;
    let request: MergeRequest =
        decode_json_body(&req, payload, state.config.server.max_body_bytes, "invalid_merge").await?;
    let from = state
        .user_id(&request.from, "from")
        .map_err(|e| ApiError { status: actix_web::http::StatusCode::UNPROCESSABLE_ENTITY, ..e })?;
    if from == user {
        return Err(ApiError::unprocessable("invalid_merge", "a user cannot be merged into itself").with_field("from"));
    }
    let registry = &state.registry;
    if registry.owned_by_ingest() {
        return merge_through_store(&state, user, from).await;
    }
    let (_, anonymous) = registry.session(&from);
    let history = anonymous.send(TakeHistory).await?;
    let moved = history.interactions.len();
    let (_, session) = registry.session(&user);
    let applied = session.send(MergeHistory { from: history }).await?;
    applied.persisted.await;
    let outcome = applied.outcome;
    Ok(HttpResponse::Ok().json(json!({
        "user_id": user,
        "from": from,
        "moved": moved,
        "merged": outcome.applied,
        "duplicates": outcome.duplicates,
    })))
}

/// Production mode: the two users may be owned by other instances. Move the history in the
/// store (the append skips ids the user already has), then tell both owners to reload.
async fn merge_through_store(state: &AppState, user: UserId, from: UserId) -> Result<HttpResponse, ApiError> {
    let store = &state.store;
    let history = store.remove(&from).await.map_err(store_unavailable)?.unwrap_or_default();
    let moved = history.interactions.len();
    let update = ProfileUpdate {
        user_id: user.clone(),
        interactions: history.interactions,
        context: history.context,
        suppressed: history.suppressed,
    };
    store.append(update).await;
    state.bus.notify_reload(&user).await?;
    state.bus.notify_reload(&from).await?;
    Ok(HttpResponse::Ok().json(json!({ "user_id": user, "from": from, "moved": moved })))
}

fn store_unavailable(error: StoreError) -> ApiError {
    tracing::warn!(error = %error, "profile store unavailable");
    ApiError::unavailable("store_unavailable", "user profiles are temporarily unavailable", 2)
}

/// Erases the user everywhere this instance keeps them: the session and its memory, every open
/// stream of the user (SSE gets `event: erased`, WebSocket `{"type": "erased"}`), the stored
/// profile and last list (after any write already queued), and the retained event log; and
/// records a tombstone so that replayed events from before the erasure are never applied again
/// and the trainer never sees them. In production mode the owning instance reloads the (now
/// empty) profile.
async fn erase(path: web::Path<String>, state: web::Data<AppState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let user = state.user_id(&path, "user_id")?;
    let at = crate::event::now_ms();
    let mut closed = state.registry.erase(&user).await;
    state.registry.deps.store.erase(&user, at).await.map_err(store_unavailable)?;
    // A session that started in between (an event raced the erasure) holds the old history.
    closed += state.registry.erase(&user).await;
    let events = state.registry.deps.event_log.remove_user(&user);
    if let Err(error) = state.bus.notify_reload(&user).await {
        tracing::warn!(error = %error, "the owning instance was not told to drop the erased user");
    }
    state.metrics.privacy_erased.inc();
    Ok(HttpResponse::Ok().json(json!({
        "user_id": user,
        "erased_at": at,
        "subscriptions_closed": closed,
        "events_removed_from_log": events,
    })))
}

async fn export(path: web::Path<String>, state: web::Data<AppState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let user = state.user_id(&path, "user_id")?;
    let session = if state.registry.owned_by_ingest() {
        state.registry.hub(&user).and_then(|h| h.session())
    } else {
        Some(state.registry.session(&user).1)
    };
    let profile = match session {
        Some(session) => session.send(Snapshot).await?,
        None => state.store.load(&user).await.map_err(store_unavailable)?.unwrap_or_default(),
    };
    Ok(HttpResponse::Ok().json(json!({ "user_id": user, "profile": profile })))
}
