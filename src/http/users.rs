//! `POST /v1/users/{user_id}/merge` (fold an anonymous visitor's history into a user, as at
//! login) and `GET /v1/users/{user_id}/export` (everything stored about the user).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::auth::Caller;
use super::body::decode_json_body;
use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use crate::actors::messages::{MergeHistory, Snapshot, TakeHistory};
use crate::auth::Role;
use crate::event::UserId;
use crate::store::ProfileUpdate;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/users/{user_id}/merge").route(web::post().to(merge)))
        .service(web::resource("/v1/users/{user_id}/export").route(web::get().to(export)))
        .service(web::resource("/v1/users/{user_id}").route(web::delete().to(erase)));
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeRequest {
    /// The user (typically an anonymous visitor id) whose history moves into the path's user.
    #[schema(min_length = 1, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$")]
    from: String,
}

/// The answer to a merge.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Merged {
    #[schema(value_type = String)]
    user_id: UserId,
    #[schema(value_type = String)]
    from: UserId,
    /// Interactions moved out of `from`.
    moved: usize,
    /// Of those, how many were new to the user (embedded mode only; in production mode the
    /// owning instance applies them).
    #[serde(skip_serializing_if = "Option::is_none")]
    merged: Option<usize>,
    /// Of those, how many the user already had (embedded mode only).
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicates: Option<usize>,
}

/// The answer to an erasure.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Erased {
    #[schema(value_type = String)]
    user_id: UserId,
    /// Milliseconds since the Unix epoch; the tombstone's time.
    erased_at: i64,
    /// Open streams of the user on this instance that were closed.
    subscriptions_closed: usize,
    /// Events of the user removed from the retained event log.
    events_removed_from_log: usize,
}

/// Everything liverec stores about a user.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Export {
    #[schema(value_type = String)]
    user_id: UserId,
    /// The stored profile: recent interactions, context, suppressed items, last list.
    #[schema(value_type = Object)]
    profile: crate::store::Profile,
}

/// Merge a visitor into a user
///
/// Folds an anonymous visitor's history into a user, as at login; the visitor is left empty.
/// Needs the `admin` role.
#[utoipa::path(
    post,
    path = "/v1/users/{user_id}/merge",
    tag = "users",
    params(("user_id" = String, Path, min_length = 1, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$", description = "The user that receives the history")),
    request_body(content = MergeRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The history was moved", body = Merged),
        (status = 400, description = "An invalid user id, or a body that is not JSON", body = ErrorBody),
        (status = 403, description = "The credential is not an admin", body = ErrorBody),
        (status = 422, description = "An invalid `from`, or a user merged into itself", body = ErrorBody),
    )
)]
pub async fn merge(
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
    let history = anonymous.take_history(TakeHistory).await?;
    let moved = history.interactions.len();
    let (_, session) = registry.session(&user);
    let applied = session.merge(MergeHistory { from: history }).await?;
    applied.persisted.await;
    let outcome = applied.outcome;
    Ok(HttpResponse::Ok().json(Merged {
        user_id: user,
        from,
        moved,
        merged: Some(outcome.applied),
        duplicates: Some(outcome.duplicates),
    }))
}

/// Production mode: the two users may be owned by other instances. Move the history in the
/// store (the append skips ids the user already has), then tell both owners to reload.
async fn merge_through_store(state: &AppState, user: UserId, from: UserId) -> Result<HttpResponse, ApiError> {
    let store = &state.store;
    let history = store.remove(&from).await?.unwrap_or_default();
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
    Ok(HttpResponse::Ok().json(Merged { user_id: user, from, moved, merged: None, duplicates: None }))
}

/// Erases the user everywhere this instance keeps them: the session and its memory, every open
/// stream of the user (SSE gets `event: erased`, WebSocket `{"type": "erased"}`), the stored
/// profile and last list (after any write already queued), and the retained event log; and
/// records a tombstone so that replayed events from before the erasure are never applied again
/// and the trainer never sees them. In production mode the owning instance reloads the (now
/// empty) profile.
#[utoipa::path(
    delete,
    path = "/v1/users/{user_id}",
    tag = "users",
    params(("user_id" = String, Path, min_length = 1, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$", description = "The user to erase")),
    responses(
        (status = 200, description = "The user was erased", body = Erased),
        (status = 400, description = "An invalid user id", body = ErrorBody),
        (status = 403, description = "The credential is not an admin", body = ErrorBody),
    )
)]
pub async fn erase(
    path: web::Path<String>,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let user = state.user_id(&path, "user_id")?;
    let at = crate::event::now_ms();
    let mut closed = state.registry.erase(&user).await;
    state.store.erase(&user, at).await?;
    // A session that started in between (an event raced the erasure) holds the old history.
    closed += state.registry.erase(&user).await;
    if state.store.parks_profiles() {
        // That session may have parked the old history when it stopped, between the two.
        state.store.erase(&user, at).await?;
    }
    let events = state.event_log.remove_user(&user, at);
    if let Err(error) = state.bus.notify_reload(&user).await {
        tracing::warn!(error = %error, "the owning instance was not told to drop the erased user");
    }
    state.metrics.privacy_erased.inc();
    // Events this server dates itself (no `timestamp`) take the clock when they arrive: answer
    // only once it has passed the erasure's millisecond, so that an event sent after the answer
    // is never dated at the erasure and refused as covered by it (at most a millisecond).
    while crate::event::now_ms() <= at {
        actix_rt::time::sleep(std::time::Duration::from_micros(250)).await;
    }
    Ok(HttpResponse::Ok().json(Erased {
        user_id: user,
        erased_at: at,
        subscriptions_closed: closed,
        events_removed_from_log: events,
    }))
}

/// Export a user's data
///
/// Everything liverec stores about the user (the right of access). Needs the `admin` role.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/export",
    tag = "users",
    params(("user_id" = String, Path, min_length = 1, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$", description = "The user")),
    responses(
        (status = 200, description = "The stored data", body = Export),
        (status = 400, description = "An invalid user id", body = ErrorBody),
        (status = 403, description = "The credential is not an admin", body = ErrorBody),
    )
)]
pub async fn export(
    path: web::Path<String>,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let user = state.user_id(&path, "user_id")?;
    let session = if state.registry.owned_by_ingest() {
        state.registry.hub(&user).and_then(|h| h.session())
    } else {
        Some(state.registry.session(&user).1)
    };
    let profile = match session {
        Some(session) => session.snapshot(Snapshot).await?,
        None => state.store.load(&user).await?.unwrap_or_default(),
    };
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, super::recommendations::PRIVATE))
        .json(Export { user_id: user, profile }))
}
