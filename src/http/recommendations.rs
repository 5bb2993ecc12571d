//! `GET /v1/users/{user_id}/recommendations`: the user's current list.
//!
//! Without filters and with `k` no larger than the pushed list, the answer is the list last
//! pushed to the user's streams, served from the hub without touching an actor (the same bytes
//! when `k` is the default). Filters or a larger `k` ask the session to score anew. A user the
//! process does not know (no session, no hub, no stored profile) is answered from no history
//! without starting a session or storing anything. In production mode a list answered from the
//! store is told to the owner of the user's partition, which counts it (see [`tell_owner`]).

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde::Deserialize;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use crate::actors::lists::list_from_store;
use crate::actors::messages::{GetRecommendations, RecFilters};
use crate::actors::SessionDeps;
use crate::bus::EventBus;
use crate::event::{Device, ItemId, UserId};
use crate::recs::{RecList, RecUpdate};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/users/{user_id}/recommendations").route(web::get().to(get_recommendations)));
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RecQuery {
    /// Credentials for clients that cannot set headers (read by the `Caller` extractor).
    #[allow(dead_code)]
    access_token: Option<String>,
    /// How many items (default `recs.default_k`, at most `recs.max_k`).
    #[param(minimum = 1)]
    k: Option<usize>,
    /// Comma-separated item ids to leave out.
    exclude: Option<String>,
    /// Comma-separated categories; only items in one of them are returned.
    categories: Option<String>,
    /// Device class to rank for, instead of the user's latest context.
    device: Option<Device>,
}

fn split(list: &Option<String>) -> Vec<String> {
    list.as_deref()
        .map(|s| s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default()
}

/// A user's recommendations
///
/// The user's current list. Without filters and with `k` no larger than the pushed list, this is
/// the list last pushed to the user's streams; filters or a larger `k` score anew. Needs the
/// `reader` role, or a stream token for this user.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/recommendations",
    tag = "recommendations",
    params(("user_id" = String, Path, min_length = 1, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$", description = "The user (1 to `events.max_id_len` characters)"), RecQuery),
    responses(
        (status = 200, description = "The list", body = RecList),
        (status = 400, description = "An invalid user id or query parameter", body = ErrorBody),
        (status = 403, description = "The credential may not read this user", body = ErrorBody),
    )
)]
pub async fn get_recommendations(
    path: web::Path<String>,
    query: web::Query<RecQuery>,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let user = state.user_id(&path, "user_id")?;
    caller.read(&user)?;
    let recs = &state.config.recs;
    let k = query.k.unwrap_or(recs.default_k);
    if k == 0 || k > recs.max_k {
        return Err(
            ApiError::bad_request("invalid_query", format!("k must be between 1 and {}", recs.max_k)).with_field("k")
        );
    }
    let exclude = split(&query.exclude);
    if exclude.len() > recs.max_k {
        return Err(ApiError::bad_request("invalid_query", "too many items to exclude").with_field("exclude"));
    }
    let filters = RecFilters {
        exclude: exclude.iter().map(|s| ItemId::from(s.as_str())).collect(),
        categories: split(&query.categories),
        device: query.device,
    };
    if filters.is_empty() && k <= recs.default_k {
        if let Some(latest) = state.registry.hub(&user).and_then(|h| h.latest()) {
            crate::actors::lists::report_impression(&state.registry.deps, &latest, k);
            return Ok(respond(&latest.list, &latest.json, k));
        }
    }
    let hub = state.registry.hub(&user);
    let session = match hub.as_ref().and_then(|h| h.session()) {
        Some(session) => Some(session),
        // Production mode: only the owner of the user's partition runs its session.
        None if state.registry.owned_by_ingest() => None,
        // A user this process knows (a hub, or a stored profile) gets a session; an unknown one
        // gets the cold-start list and leaves nothing behind, so requests for made-up ids
        // cannot fill memory with sessions and stored lists.
        None if hub.is_some() || stored(&state, &user).await => Some(state.registry.session(&user).1),
        None => None,
    };
    let from_session = match session {
        // A session stopped meanwhile (idle, or to make room) is answered from the store.
        Some(session) => session.recommend.send(GetRecommendations { k, filters: filters.clone() }).await.ok(),
        None => None,
    };
    let update = match from_session {
        Some(update) => update?,
        None => {
            let update = list_from_store(&state.registry.deps, &user, k, &filters).await?;
            if state.registry.owned_by_ingest() {
                tell_owner(&*state.bus, &state.registry.deps, &user, &update, k).await;
            } else {
                // Embedded mode: the cold-start list is shown here and nowhere else.
                crate::actors::lists::report_impression(&state.registry.deps, &update, k);
                state.registry.deps.cold_lists.remember(&user, &update, k);
            }
            update
        }
    };
    Ok(respond(&update.list, &update.json, k))
}

/// How long a `GET` waits for the events topic to take a shown-list record before it answers
/// anyway (the impression is then counted late, or not at all if the broker is down).
const TELL_OWNER_WAIT: Duration = Duration::from_secs(1);

/// Production mode: tells the owner of `user`'s partition (this instance or another) that the
/// list answered from the store was shown, through a control record on the user's partition.
/// The owner counts the impression, once for the cluster, and attributes clicks on it; the record
/// reaches it before any event the user posts after reading the answer. A list already told of
/// (the same stored list read again) is not told twice. Returns whether the owner was told.
pub(super) async fn tell_owner(
    bus: &dyn EventBus,
    deps: &SessionDeps,
    user: &UserId,
    update: &RecUpdate,
    k: usize,
) -> bool {
    let told = &deps.cold_lists;
    if told.holds(user, &update.list.rec_id) {
        return true;
    }
    let shown = RecList { items: update.list.items.iter().take(k).cloned().collect(), ..update.list.clone() };
    let json = serde_json::to_vec(&shown).expect("a list always serialises");
    let error = match tokio::time::timeout(TELL_OWNER_WAIT, bus.notify_shown(user, &json)).await {
        Ok(Ok(())) => {
            told.remember(user, &RecUpdate::shown_bare(&shown, k), k);
            return true;
        }
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("no answer within {TELL_OWNER_WAIT:?}"),
    };
    deps.metrics.monitor_refused.inc();
    tracing::warn!(error, "a list served from the store was not reported to its user's owner");
    false
}

/// Whether the store holds a profile of `user` (a store that cannot answer counts as no).
async fn stored(state: &AppState, user: &crate::event::UserId) -> bool {
    matches!(state.registry.deps.store.load(user).await, Ok(Some(_)))
}

fn respond(list: &RecList, json: &web::Bytes, k: usize) -> HttpResponse {
    if k >= list.items.len() {
        return HttpResponse::Ok().content_type("application/json").body(json.clone());
    }
    let mut shorter = list.clone();
    shorter.items.truncate(k);
    HttpResponse::Ok().json(shorter)
}
