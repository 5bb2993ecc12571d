//! `GET /v1/users/{user_id}/recommendations`: the user's current list; `POST
//! /v1/recommendations`: a list for a basket or an anonymous session, from its items alone.
//!
//! Without filters and with `k` no larger than the pushed list, the answer is the list last
//! pushed to the user's streams, served from the hub without touching an actor (the same bytes
//! when `k` is the default). Filters or a larger `k` ask the session to score anew. A user the
//! process does not know (no session, no hub, no stored profile) is answered from no history
//! without starting a session or storing anything. In production mode a list answered from the
//! store is told to the owner of the user's partition, which counts it (see [`tell_owner`]).

use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use crate::actors::lists::build_request;
use crate::actors::lists::list_from_store;
use crate::actors::messages::{GetRecommendations, RecFilters};
use crate::actors::model::{ModelError, Recommend};
use crate::actors::SessionDeps;
use crate::bus::EventBus;
use crate::config::RecsConfig;
use crate::event::{check_id, now_ms, Device, EventType, ItemId, UserId};
use crate::models::HistoryItem;
use crate::recs::{RecItem, RecList, RecUpdate};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/users/{user_id}/recommendations").route(web::get().to(get_recommendations)));
    cfg.service(web::resource("/v1/recommendations").route(web::post().to(post_recommendations)));
}

/// What personal answers say to caches: this user's alone, never to be stored (a shared cache
/// must not hand one user's list to another, and a browser need not keep it).
pub const PRIVATE: &str = "private, no-store";

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RecQuery {
    /// Credentials for clients that cannot set headers (read by the `Caller` extractor).
    #[allow(dead_code)]
    access_token: Option<String>,
    /// How many items (default `recs.default_k`, at most `recs.max_k`).
    #[param(minimum = 1)]
    #[serde(default, deserialize_with = "super::lists::param::k")]
    k: Option<usize>,
    /// Comma-separated item ids to leave out.
    exclude: Option<String>,
    /// Comma-separated categories; only items in one of them are returned.
    categories: Option<String>,
    /// Device class to rank for, instead of the user's latest context.
    #[serde(default, deserialize_with = "super::lists::param::device")]
    device: Option<Device>,
}

/// The `k` of every list request (personal, basket and non-personal): `recs.default_k` when
/// absent, else 1 to `recs.max_k`. Out of range is `422 out_of_range` (`field` `k`), as every
/// well-formed value outside its range is; a value that is not a number is the parser's `400`.
/// More items to exclude than a list can hold: `422 out_of_range`, `field` `exclude`.
fn too_many_excluded(recs: &RecsConfig) -> ApiError {
    ApiError::unprocessable("out_of_range", format!("at most {} items to exclude (recs.max_k)", recs.max_k))
        .with_field("exclude")
}

pub(super) fn checked_k(requested: Option<usize>, recs: &RecsConfig) -> Result<usize, ApiError> {
    let k = requested.unwrap_or(recs.default_k);
    if k == 0 || k > recs.max_k {
        return Err(ApiError::unprocessable(
            "out_of_range",
            format!("k must be between 1 and {} (recs.max_k)", recs.max_k),
        )
        .with_field("k"));
    }
    Ok(k)
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
        (status = 200, description = "The list", body = RecList,
         headers(("Cache-Control" = String, description = "`private, no-store`"))),
        (status = 400, description = "An invalid user id, or a query parameter of the wrong type or value, or an unknown one", body = ErrorBody),
        (status = 403, description = "The credential may not read this user", body = ErrorBody),
        (status = 422, description = "`k` out of range, or more items in `exclude` than `recs.max_k` (`out_of_range`, `field` names it)", body = ErrorBody),
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
    let k = checked_k(query.k, recs)?;
    let exclude = split(&query.exclude);
    if exclude.len() > recs.max_k {
        return Err(too_many_excluded(recs));
    }
    let filters = RecFilters {
        exclude: exclude.iter().map(|s| ItemId::from(s.as_str())).collect(),
        categories: split(&query.categories),
        device: query.device,
    };
    if filters.is_empty() && k <= recs.default_k {
        if let Some(latest) = state.registry.hub(&user).and_then(|h| h.latest()) {
            crate::actors::lists::report_impression(&state.registry.deps, &latest, k);
            return Ok(respond(&latest, k));
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
        Some(session) => session.recommend(GetRecommendations { k, filters: filters.clone() }).await.ok(),
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
    Ok(respond(&update, k))
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

fn respond(update: &RecUpdate, k: usize) -> HttpResponse {
    let mut response = HttpResponse::Ok();
    response.insert_header((header::CACHE_CONTROL, PRIVATE));
    if k >= update.list.items.len() {
        return response.content_type("application/json").body(update.json());
    }
    let mut shorter = update.list.clone();
    shorter.items.truncate(k);
    response.json(shorter)
}

/// Most items in a basket or anonymous session.
const BASKET_MAX: usize = 200;

/// A basket or an anonymous session to recommend for (`POST /v1/recommendations`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BasketRequest {
    /// The items of the basket or session, oldest first (0 to 200; none: the list for the
    /// context alone). They are never recommended back.
    #[schema(max_items = 200)]
    pub items: Vec<String>,
    /// How the session took the items up (default `view`; a cart: `add_to_cart`).
    #[serde(default)]
    pub event_type: Option<EventType>,
    /// The request's context: its `device` picks the context segment at the current part of
    /// the day.
    #[serde(default)]
    pub context: Option<BasketContext>,
    /// How many items (default `recs.default_k`, at most `recs.max_k`).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub k: Option<usize>,
    /// Item ids to leave out besides the basket's.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Only items in one of these categories.
    #[serde(default)]
    pub categories: Vec<String>,
    /// A stable id of the anonymous session (not stored): during a canary or an experiment it
    /// decides which variant serves the session, so its lists come from one model.
    #[serde(default)]
    pub session_id: Option<String>,
}

/// The context of a basket request.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BasketContext {
    pub device: Option<Device>,
}

/// The list for a basket or an anonymous session.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BasketList {
    pub model_version: String,
    /// The experiment variant that served it: `control` outside canaries and experiments.
    pub variant: String,
    /// Milliseconds since the Unix epoch.
    pub generated_at: i64,
    pub items: Vec<RecItem>,
}

/// Recommendations for a basket or an anonymous session
///
/// A list computed now from the items given (a cart, the articles a visitor read) and the
/// context, by the serving model, without a stored user: nothing is kept, and no stream is
/// pushed. The items themselves and `exclude` are left out; `categories` narrows it. Any valid
/// credential may ask. Answered with `Cache-Control: private, no-store`.
#[utoipa::path(
    post,
    path = "/v1/recommendations",
    tag = "recommendations",
    request_body(content = BasketRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The list", body = BasketList,
         headers(("Cache-Control" = String, description = "`private, no-store`"))),
        (status = 400, description = "The body is not JSON, or an invalid item id", body = ErrorBody),
        (status = 422, description = "A body of the wrong shape (`invalid_body`), `k` or `items` out of range (`out_of_range`), or an item the catalogue does not know (`unknown_item`); `field` names it", body = ErrorBody),
    )
)]
pub async fn post_recommendations(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    _caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let basket: BasketRequest =
        super::body::decode_json_body(&req, payload, state.config.server.max_body_bytes, "invalid_body").await?;
    let recs = &state.config.recs;
    let k = checked_k(basket.k, recs)?;
    if basket.items.len() > BASKET_MAX {
        return Err(ApiError::unprocessable("out_of_range", format!("at most {BASKET_MAX} items")).with_field("items"));
    }
    if basket.exclude.len() > recs.max_k {
        return Err(too_many_excluded(recs));
    }
    let max_id_len = state.config.events.max_id_len;
    let catalog = &state.catalog;
    let event_type = basket.event_type.unwrap_or(EventType::View);
    let now = now_ms();
    let mut history = Vec::with_capacity(basket.items.len());
    for (i, raw) in basket.items.iter().enumerate() {
        let field = format!("items[{i}]");
        check_id(&field, raw, max_id_len)
            .map_err(|e| ApiError::bad_request("invalid_item_id", e.message).with_field(e.field))?;
        let Some(item) = catalog.lookup(&ItemId::from(raw.as_str())) else {
            return Err(ApiError::unprocessable("unknown_item", format!("no item {raw}")).with_field(field));
        };
        // Oldest first, a millisecond apart: the order is what the models read.
        let timestamp = now - (basket.items.len() - i) as i64;
        history.push(HistoryItem { item, event_type, value: None, timestamp });
    }
    for (i, raw) in basket.exclude.iter().enumerate() {
        check_id(&format!("exclude[{i}]"), raw, max_id_len)
            .map_err(|e| ApiError::bad_request("invalid_item_id", e.message).with_field(e.field))?;
    }
    if let Some(session) = &basket.session_id {
        check_id("session_id", session, max_id_len)
            .map_err(|e| ApiError::unprocessable("invalid_body", e.message).with_field(e.field))?;
    }
    let filters = RecFilters {
        exclude: basket.exclude.iter().chain(&basket.items).map(|s| ItemId::from(s.as_str())).collect(),
        categories: basket.categories.clone(),
        device: basket.context.as_ref().and_then(|c| c.device),
    };
    let deps = &state.registry.deps;
    let request = build_request(deps, history.into(), None, std::iter::empty(), None, k, &filters);
    // The variant follows the session, or else the basket: the same basket, the same model.
    let user = crate::bus::user_hash(basket.session_id.as_deref().unwrap_or(&basket.items.join("\u{1f}")));
    let scored = match deps.model.send(Recommend { request, user, observation: None }).await {
        Ok(Ok(scored)) => scored,
        Ok(Err(ModelError::Overloaded)) => {
            return Err(ApiError::unavailable("unavailable", "the model is overloaded; retry shortly", 1))
        }
        Ok(Err(ModelError::Stopped)) | Err(_) => {
            return Err(ApiError::unavailable("unavailable", "recommendations are temporarily unavailable", 1))
        }
    };
    let items = crate::actors::lists::rec_items(catalog, &scored.items);
    let list = BasketList {
        model_version: scored.version.to_string(),
        variant: scored.variant.to_string(),
        generated_at: now,
        items,
    };
    Ok(HttpResponse::Ok().insert_header((header::CACHE_CONTROL, PRIVATE)).json(list))
}
