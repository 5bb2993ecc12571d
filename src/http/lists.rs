//! The non-personal lists: `GET /v1/popular`, `GET /v1/trending`, `GET /v1/items/latest` and
//! `GET /v1/items/{item_id}/similar`. They are the same for every caller, so they are computed
//! once per segment and served to everyone, cacheable by browsers and CDNs.
//!
//! [`super::segment_lists::SegmentLists`] refreshes every `recs.lists_refresh_secs`: it reads the events applied since
//! the last refresh from the event log into the windowed counts of `models::popularity`, sums
//! them into a snapshot, and ranks the lists without a category for every segment of the hour
//! (every device at the current hour bucket, and all segments together), and the latest items
//! without a filter. Lists for a category or another availability, and similar items, are
//! computed on first request and kept until the next refresh. Each answer carries `Cache-Control: public, max-age=<refresh>`
//! and a strong `ETag` (FNV-1a of the body); a request whose `If-None-Match` names it gets `304`.
//!
//! In production mode an instance's event log holds the events of the users it owns (its Kafka
//! partitions, a share of users by hash), so its popular and trending lists are ranked from that
//! share: the same ranking in expectation, not the same bytes on every instance.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::segment_lists::{ListKey, LIST_MAX};
use super::state::AppState;
use crate::actors::lists::rec_items;
use crate::catalog::{Catalog, ItemView};
use crate::event::{now_ms, Context as EventContext, Device};
use crate::models::popularity::{Ranking, Window};
use crate::models::{Availability, ItemFilter, Scored};
use crate::recs::RecItem;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/popular").route(web::get().to(popular)));
    cfg.service(web::resource("/v1/trending").route(web::get().to(trending)));
    // Before `/v1/items/{item_id}`, and for GET only, so that PUT and DELETE of an item named
    // `latest` still reach the item (a GET of it answers the latest items).
    cfg.service(web::resource("/v1/items/latest").guard(actix_web::guard::Get()).to(latest));
    cfg.service(web::resource("/v1/items/{item_id}/similar").route(web::get().to(similar)));
}

/// Most characters of a category label (as in the catalogue).
const MAX_CATEGORY_LEN: usize = 128;

/// The time windows of `GET /v1/popular` and `GET /v1/trending`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum WindowParam {
    #[serde(rename = "1h")]
    Hour,
    #[serde(rename = "24h")]
    Day,
    #[serde(rename = "7d")]
    Week,
}

impl WindowParam {
    fn window(self) -> Window {
        match self {
            WindowParam::Hour => Window::Hour,
            WindowParam::Day => Window::Day,
            WindowParam::Week => Window::Week,
        }
    }
}

/// Which items a non-personal list shows: those lists may show now (default), those they may
/// not (deleted, withdrawn with `available: false`, or past `expires_at`), or both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AvailabilityParam {
    #[default]
    Available,
    Unavailable,
    Any,
}

impl From<AvailabilityParam> for Availability {
    fn from(param: AvailabilityParam) -> Self {
        match param {
            AvailabilityParam::Available => Availability::Available,
            AvailabilityParam::Unavailable => Availability::Unavailable,
            AvailabilityParam::Any => Availability::Any,
        }
    }
}

/// What a non-personal list ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ListKind {
    Popular,
    Trending,
    Similar,
}

/// A non-personal list: popular, trending or similar items (the same for every caller).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ItemList {
    pub kind: ListKind,
    /// The window counted (popular and trending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowParam>,
    /// The context segment ranked for (popular and trending): `all`, or `<device>/<part of the
    /// day>` (`night` 0-5 h, `morning`, `afternoon`, `evening` 18-23 h, UTC) for `device`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<String>,
    /// The item the list is like (similar).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_id: Option<String>,
    /// The model version that found them (similar).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub availability: AvailabilityParam,
    /// The position of the first item in the whole list.
    pub offset: usize,
    /// Pass as `offset` for the next page; absent at the end of the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<usize>,
    /// Best first. `score`: popular, the weighted events in the window (a view 1, a click 2,
    /// an add to cart 3, a purchase 4); trending, how far above its own baseline; similar, the
    /// model's similarity.
    pub items: Vec<RecItem>,
}

/// The newest items of the catalogue (`GET /v1/items/latest`).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct LatestItems {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub availability: AvailabilityParam,
    /// The position of the first item in the whole list.
    pub offset: usize,
    /// Pass as `offset` for the next page; absent at the end of the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<usize>,
    /// Newest `created_at` first; items put without one follow, the most recently known first.
    pub items: Vec<ItemView>,
}

/// The query of `GET /v1/popular` and `GET /v1/trending`: what the document describes is what
/// `web::Query` parses, and its errors go through the shared `QueryConfig` handler (`400
/// invalid_query`, `field` the parameter). Ranges are checked after parsing (`422 out_of_range`).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RankedQuery {
    /// Credentials for clients that cannot set headers (read by the `Caller` extractor).
    #[allow(dead_code)]
    access_token: Option<String>,
    /// How many items (default `recs.default_k`, at most `recs.max_k`).
    #[param(minimum = 1)]
    #[serde(default, deserialize_with = "param::k")]
    k: Option<usize>,
    /// Items to skip: the `next_offset` of the previous page (at most 500).
    #[param(minimum = 0, maximum = 500)]
    #[serde(default, deserialize_with = "param::offset")]
    offset: Option<usize>,
    /// Only items in this category.
    category: Option<String>,
    /// Rank for this device class at the current part of the day (its context segment);
    /// absent: every segment together.
    #[serde(default, deserialize_with = "param::device")]
    device: Option<Device>,
    /// The window counted: `1h`, `24h` (popular's default) or `7d`; trending: `1h` (its
    /// default) or `24h`, against the rest of the week.
    #[serde(default, deserialize_with = "param::window")]
    window: Option<WindowParam>,
    /// Which items by availability (default `available`).
    #[serde(default, deserialize_with = "param::availability")]
    availability: Option<AvailabilityParam>,
}

/// The query of `GET /v1/items/latest` and `GET /v1/items/{item_id}/similar` (as
/// [`RankedQuery`]; a struct of its own rather than a flattened part, which `deny_unknown_fields`
/// does not support).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ItemsQuery {
    /// Credentials for clients that cannot set headers (read by the `Caller` extractor).
    #[allow(dead_code)]
    access_token: Option<String>,
    /// How many items (default `recs.default_k`, at most `recs.max_k`).
    #[param(minimum = 1)]
    #[serde(default, deserialize_with = "param::k")]
    k: Option<usize>,
    /// Items to skip: the `next_offset` of the previous page (at most 500).
    #[param(minimum = 0, maximum = 500)]
    #[serde(default, deserialize_with = "param::offset")]
    offset: Option<usize>,
    /// Only items in this category.
    category: Option<String>,
    /// Which items by availability (default `available`).
    #[serde(default, deserialize_with = "param::availability")]
    availability: Option<AvailabilityParam>,
}

/// Readers of the list parameters whose errors name the parameter and the value: serde's own
/// name neither for a number (`invalid digit found in string`) and only the value for a choice.
/// The shared query error handler takes `field` from the message's leading `` `name` ``
/// ([`super::error::query_error`]).
pub(super) mod param {
    use serde::de::value::StrDeserializer;
    use serde::de::{DeserializeOwned, Deserializer, Error, IntoDeserializer};
    use serde::Deserialize;

    use crate::event::Device;
    use crate::http::lists::{AvailabilityParam, WindowParam};

    fn number<'de, D: Deserializer<'de>>(name: &str, d: D) -> Result<Option<usize>, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(Some).map_err(|_| D::Error::custom(format!("`{name}` must be a whole number, not `{text}`")))
    }

    fn choice<'de, D: Deserializer<'de>, T: DeserializeOwned>(name: &str, d: D) -> Result<Option<T>, D::Error> {
        let text = String::deserialize(d)?;
        let value: StrDeserializer<'_, serde::de::value::Error> = text.as_str().into_deserializer();
        T::deserialize(value).map(Some).map_err(|e| D::Error::custom(format!("`{name}`: {e}")))
    }

    pub fn k<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        number("k", d)
    }

    pub fn offset<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        number("offset", d)
    }

    pub fn limit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        number("limit", d)
    }

    pub fn device<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Device>, D::Error> {
        choice("device", d)
    }

    pub fn window<'de, D: Deserializer<'de>>(d: D) -> Result<Option<WindowParam>, D::Error> {
        choice("window", d)
    }

    pub fn availability<'de, D: Deserializer<'de>>(d: D) -> Result<Option<AvailabilityParam>, D::Error> {
        choice("availability", d)
    }
}

/// `k`, `offset`, `category` and `availability`, checked.
struct Page {
    k: usize,
    offset: usize,
    category: Option<String>,
    availability: AvailabilityParam,
}

fn out_of_range(field: &'static str, message: String) -> ApiError {
    ApiError::unprocessable("out_of_range", message).with_field(field)
}

fn page(
    state: &AppState,
    k: Option<usize>,
    offset: Option<usize>,
    category: &Option<String>,
    availability: Option<AvailabilityParam>,
) -> Result<Page, ApiError> {
    let k = super::recommendations::checked_k(k, &state.config.recs)?;
    let offset = offset.unwrap_or(0);
    if offset > LIST_MAX {
        return Err(out_of_range("offset", format!("offset must be between 0 and {LIST_MAX}")));
    }
    if let Some(category) = category {
        if category.is_empty() || category.chars().count() > MAX_CATEGORY_LEN {
            return Err(out_of_range("category", format!("category must be 1 to {MAX_CATEGORY_LEN} characters")));
        }
    }
    Ok(Page { k, offset, category: category.clone(), availability: availability.unwrap_or_default() })
}

impl ItemsQuery {
    fn page(&self, state: &AppState) -> Result<Page, ApiError> {
        page(state, self.k, self.offset, &self.category, self.availability)
    }
}

impl Page {
    fn filter(&self, catalog: &Catalog) -> ItemFilter {
        ItemFilter {
            // An unknown category matches no item: the honest answer is an empty list.
            categories: self
                .category
                .as_ref()
                .map(|c| catalog.category_idx(c).map(|idx| vec![idx]).unwrap_or_default()),
            availability: self.availability.into(),
        }
    }

    /// This page of `list`, checking availability again (an item withdrawn since the list was
    /// ranked leaves it at once), and the offset of the next page if there is one.
    fn cut<'a>(&self, list: &'a [Scored], catalog: &Catalog) -> (Vec<&'a Scored>, Option<usize>) {
        let categories = catalog.categories();
        let now = now_ms();
        let filter = ItemFilter { categories: None, availability: self.availability.into() };
        let mut passing = list.iter().filter(|s| filter.accepts(s.item, &categories, now)).skip(self.offset);
        let items: Vec<&Scored> = passing.by_ref().take(self.k).collect();
        let next = passing.next().map(|_| self.offset + items.len());
        (items, next)
    }
}

/// The name of context segment `segment` (device x part of the day).
fn segment_name(segment: Option<usize>) -> String {
    const DEVICES: [&str; Device::COUNT] = ["mobile", "desktop", "tablet", "tv", "other"];
    const PARTS: [&str; EventContext::HOUR_BUCKETS] = ["night", "morning", "afternoon", "evening"];
    match segment {
        None => "all".to_owned(),
        Some(s) => format!(
            "{}/{}",
            DEVICES.get(s / EventContext::HOUR_BUCKETS).unwrap_or(&"other"),
            PARTS[s % EventContext::HOUR_BUCKETS]
        ),
    }
}

/// `200` with `body`, or `304` when the request's `If-None-Match` names its ETag (or is `*`),
/// both cacheable by anyone for `max_age` seconds.
fn cacheable(req: &HttpRequest, body: Vec<u8>, max_age: u64) -> HttpResponse {
    let tag = String::from_utf8_lossy(&super::dashboard::etag(&body)).into_owned();
    let matches = super::dashboard::not_modified(req, &tag);
    let mut response = if matches { HttpResponse::NotModified() } else { HttpResponse::Ok() };
    response
        .insert_header((header::CACHE_CONTROL, format!("public, max-age={max_age}")))
        .insert_header((header::ETAG, tag));
    if matches {
        response.finish()
    } else {
        response.content_type("application/json").body(body)
    }
}

fn items_of(page: &[&Scored], catalog: &Catalog) -> Vec<RecItem> {
    rec_items(catalog, page.iter().copied())
}

fn json(value: &impl Serialize) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(value).map_err(|error| {
        tracing::error!(error = %error, "cannot serialise a list");
        ApiError::new(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
    })
}

async fn ranked(
    req: HttpRequest,
    query: RankedQuery,
    state: &AppState,
    ranking: Ranking,
) -> Result<HttpResponse, ApiError> {
    let page = page(state, query.k, query.offset, &query.category, query.availability)?;
    let (device, window) = (query.device, query.window);
    let (kind, window) = match ranking {
        Ranking::Popular => (ListKind::Popular, window.unwrap_or(WindowParam::Day)),
        Ranking::Trending => (ListKind::Trending, window.unwrap_or(WindowParam::Hour)),
    };
    if ranking == Ranking::Trending && window == WindowParam::Week {
        return Err(out_of_range(
            "window",
            "trending compares the window with the rest of the kept week: 1h or 24h".to_owned(),
        ));
    }
    let segment = device.map(|d| EventContext::at_time(now_ms(), d).segment());
    let key = ListKey::Ranked { ranking, window: window.window(), segment, filter: page.filter(&state.catalog) };
    let list = state.lists.list(key);
    let (items, next_offset) = page.cut(&list.items, &state.catalog);
    let body = ItemList {
        kind,
        window: Some(window),
        segment: Some(segment_name(segment)),
        item_id: None,
        model_version: None,
        category: page.category.clone(),
        availability: page.availability,
        offset: page.offset,
        next_offset,
        items: items_of(&items, &state.catalog),
    };
    Ok(cacheable(&req, json(&body)?, state.lists.max_age))
}

/// Popular items
///
/// The items with the most weighted events (view 1, click 2, add to cart 3, purchase 4) in the
/// window, in every context segment or in the `device`'s segment at the current part of the day;
/// filtered by category and availability; paged with `offset`. Recomputed every
/// `recs.lists_refresh_secs` and cacheable by anyone for as long (`ETag`, `304` on
/// `If-None-Match`). Any valid credential may read it.
#[utoipa::path(
    get,
    path = "/v1/popular",
    tag = "lists",
    params(RankedQuery),
    responses(
        (status = 200, description = "The list", body = ItemList,
         headers(("Cache-Control" = String, description = "`public, max-age=<recs.lists_refresh_secs>`"),
                 ("ETag" = String, description = "Send back as `If-None-Match`"))),
        (status = 304, description = "Not modified: the `If-None-Match` ETag is current",
         headers(("Cache-Control" = String), ("ETag" = String))),
        (status = 400, description = "A query parameter of the wrong type or value, or an unknown one", body = ErrorBody),
        (status = 422, description = "`k`, `offset` or `category` out of range (`out_of_range`, `field` names it)", body = ErrorBody),
    )
)]
pub async fn popular(
    req: HttpRequest,
    _caller: Caller,
    query: web::Query<RankedQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    ranked(req, query.into_inner(), &state, Ranking::Popular).await
}

/// Trending items
///
/// The items most above their own baseline: their weighted events in the window (default
/// `1h`) against what their rate over the rest of the kept week predicts, as
/// `(recent - baseline) / sqrt(baseline + 1)`; only items above their baseline. Segments,
/// filters, paging and caching as `GET /v1/popular`. Any valid credential may read it.
#[utoipa::path(
    get,
    path = "/v1/trending",
    tag = "lists",
    params(RankedQuery),
    responses(
        (status = 200, description = "The list", body = ItemList,
         headers(("Cache-Control" = String, description = "`public, max-age=<recs.lists_refresh_secs>`"),
                 ("ETag" = String, description = "Send back as `If-None-Match`"))),
        (status = 304, description = "Not modified: the `If-None-Match` ETag is current",
         headers(("Cache-Control" = String), ("ETag" = String))),
        (status = 400, description = "A query parameter of the wrong type or value, or an unknown one", body = ErrorBody),
        (status = 422, description = "`k`, `offset`, `category` or `window` (`7d`) out of range (`out_of_range`, `field` names it)", body = ErrorBody),
    )
)]
pub async fn trending(
    req: HttpRequest,
    _caller: Caller,
    query: web::Query<RankedQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    ranked(req, query.into_inner(), &state, Ranking::Trending).await
}

/// The latest items
///
/// Catalogue items by `created_at`, newest first (items put without one follow, the most
/// recently known first), filtered by category and availability (a deleted item is unavailable),
/// paged with `offset`. The list without filters is ranked every `recs.lists_refresh_secs`;
/// cached and cacheable as `GET /v1/popular`. Any valid credential may read it.
#[utoipa::path(
    get,
    path = "/v1/items/latest",
    tag = "lists",
    params(ItemsQuery),
    responses(
        (status = 200, description = "The items", body = LatestItems,
         headers(("Cache-Control" = String, description = "`public, max-age=<recs.lists_refresh_secs>`"),
                 ("ETag" = String, description = "Send back as `If-None-Match`"))),
        (status = 304, description = "Not modified: the `If-None-Match` ETag is current",
         headers(("Cache-Control" = String), ("ETag" = String))),
        (status = 400, description = "A query parameter of the wrong type or value, or an unknown one", body = ErrorBody),
        (status = 422, description = "`k`, `offset` or `category` out of range (`out_of_range`, `field` names it)", body = ErrorBody),
    )
)]
pub async fn latest(
    req: HttpRequest,
    _caller: Caller,
    query: web::Query<ItemsQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let page = query.page(&state)?;
    let list = state.lists.list(ListKey::Latest { filter: page.filter(&state.catalog) });
    let (items, next_offset) = page.cut(&list.items, &state.catalog);
    let views: Vec<ItemView> = state.catalog.views_of(&items.iter().map(|s| s.item).collect::<Vec<_>>());
    let body = LatestItems {
        category: page.category.clone(),
        availability: page.availability,
        offset: page.offset,
        next_offset,
        items: views,
    };
    Ok(cacheable(&req, json(&body)?, state.lists.max_age))
}

/// Similar items
///
/// Items like this one, from the serving model: the online model's co-occurrence neighbours
/// (what users took up near it lately), or the nearest item vectors of a trained sequential
/// model. Filtered by category and availability, paged with `offset`; the item itself is never
/// in it. Asked of the model once per `recs.lists_refresh_secs` and cacheable for as long. Any
/// valid credential may read it.
#[utoipa::path(
    get,
    path = "/v1/items/{item_id}/similar",
    tag = "lists",
    params(("item_id" = String, Path, min_length = 1, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$", description = "The item (1 to `events.max_id_len` characters)"), ItemsQuery),
    responses(
        (status = 200, description = "The list", body = ItemList,
         headers(("Cache-Control" = String, description = "`public, max-age=<recs.lists_refresh_secs>`"),
                 ("ETag" = String, description = "Send back as `If-None-Match`"))),
        (status = 304, description = "Not modified: the `If-None-Match` ETag is current",
         headers(("Cache-Control" = String), ("ETag" = String))),
        (status = 400, description = "An invalid item id, or a query parameter of the wrong type or value, or an unknown one", body = ErrorBody),
        (status = 404, description = "No such item (`item_not_found`)", body = ErrorBody),
        (status = 422, description = "`k`, `offset` or `category` out of range (`out_of_range`, `field` names it)", body = ErrorBody),
    )
)]
pub async fn similar(
    req: HttpRequest,
    path: web::Path<String>,
    _caller: Caller,
    query: web::Query<ItemsQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = super::items::item_id(&path, &state)?;
    let page = query.page(&state)?;
    // Indices from here until the response is built (one id lookup for the item, one lock for
    // the page's ids in `items_of`).
    let item = match state.catalog.lookup_live(&id) {
        Some(item) => item,
        None => return Err(ApiError::not_found("item_not_found", format!("no item {id}")).with_field("item_id")),
    };
    let list = state.lists.similar(&state.registry.deps.model, item, page.filter(&state.catalog)).await?;
    let (items, next_offset) = page.cut(&list.items, &state.catalog);
    let body = ItemList {
        kind: ListKind::Similar,
        window: None,
        segment: None,
        item_id: Some(id.to_string()),
        model_version: list.version.clone(),
        category: page.category.clone(),
        availability: page.availability,
        offset: page.offset,
        next_offset,
        items: items_of(&items, &state.catalog),
    };
    Ok(cacheable(&req, json(&body)?, state.lists.max_age))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_named_by_device_and_part_of_the_day() {
        assert_eq!(segment_name(None), "all");
        let evening_mobile = EventContext { device: Device::Mobile, hour: 20, ..EventContext::default() }.segment();
        assert_eq!(segment_name(Some(evening_mobile)), "mobile/evening");
        let night_tv = EventContext { device: Device::Tv, hour: 1, ..EventContext::default() }.segment();
        assert_eq!(segment_name(Some(night_tv)), "tv/night");
    }
}
