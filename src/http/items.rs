//! The catalogue over REST: `GET`, `PUT` and `DELETE /v1/items/{item_id}` for one item,
//! `PUT /v1/items` for many (a JSON array or NDJSON) and `GET /v1/items` to page through it.
//!
//! Changes go through `actors::catalog_feed::CatalogFeed`: applied at once in the embedded mode,
//! through the Kafka items topic to every instance in production mode. An item deleted, put with
//! `available: false`, or past its `expires_at` leaves every list: scoring excludes it
//! (`actors::lists::build_request`), and sessions whose latest list shows it push a fresh one,
//! at once or, for an `expires_at` still ahead, when it passes.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::auth::Caller;
use super::body::{decode_json_body, media_type, read_body};
use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use crate::auth::Role;
use crate::bus::items::ItemChange;
use crate::catalog::{ItemAttributes, ItemIdx, ItemPage, ItemView};
use crate::event::{check_id, now_ms, ItemId};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/items").route(web::get().to(list_items)).route(web::put().to(put_items)));
    cfg.service(
        web::resource("/v1/items/{item_id}")
            .route(web::get().to(get_item))
            .route(web::put().to(put_item))
            .route(web::delete().to(delete_item)),
    );
}

/// Items on one page of `GET /v1/items` by default, and at most.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The item as it was put, for an answer given before this instance's catalogue shows it
/// (production mode, when the items consumer is slow).
fn view_of(id: ItemId, attributes: ItemAttributes, now: i64) -> ItemView {
    let available = attributes.available != Some(false) && attributes.expires_at.is_none_or(|at| at > now);
    let ItemAttributes { title, categories, tags, created_at, available: _, expires_at } = attributes;
    ItemView { item_id: id, title, categories, tags, created_at, in_catalog: true, available, expires_at }
}

pub(super) fn item_id(raw: &str, state: &AppState) -> Result<ItemId, ApiError> {
    check_id("item_id", raw, state.config.events.max_id_len)
        .map_err(|e| ApiError::bad_request("invalid_item_id", e.message).with_field(e.field))?;
    Ok(ItemId::from(raw))
}

/// An item
///
/// Its catalogue attributes; any valid credential may read the catalogue.
#[utoipa::path(
    get,
    path = "/v1/items/{item_id}",
    tag = "items",
    params(("item_id" = String, Path, min_length = 1, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$", description = "The item (1 to `events.max_id_len` characters)")),
    responses(
        (status = 200, description = "The item", body = ItemView),
        (status = 400, description = "An invalid item id", body = ErrorBody),
        (status = 404, description = "No such item", body = ErrorBody),
    )
)]
pub async fn get_item(
    path: web::Path<String>,
    state: web::Data<AppState>,
    _caller: Caller,
) -> Result<HttpResponse, ApiError> {
    // The catalogue is not user data: any caller with valid credentials may read it.
    let id = item_id(&path, &state)?;
    let view = state.catalog.get(&id).ok_or_else(|| ApiError::not_found("item_not_found", format!("no item {id}")))?;
    Ok(HttpResponse::Ok().json(view))
}

/// Put an item
///
/// Creates the item or replaces its attributes (categories feed diversity and cold-start
/// scoring). Needs the `producer` role.
#[utoipa::path(
    put,
    path = "/v1/items/{item_id}",
    tag = "items",
    params(("item_id" = String, Path, min_length = 1, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$", description = "The item (1 to `events.max_id_len` characters)")),
    request_body(content = ItemAttributes, content_type = "application/json"),
    responses(
        (status = 200, description = "The item's attributes were replaced", body = ItemView),
        (status = 201, description = "The item was created", body = ItemView),
        (status = 400, description = "An invalid item id, or a body that is not JSON", body = ErrorBody),
        (status = 403, description = "The credential may not change the catalogue", body = ErrorBody),
        (status = 422, description = "Invalid attributes (`invalid_item`; `field` names the one), or a new item past `catalog.max_items` (`catalog_full`)", body = ErrorBody),
        (status = 503, description = "Production mode: Kafka did not acknowledge the change (`bus_unavailable`)", body = ErrorBody),
    )
)]
pub async fn put_item(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Producer)?;
    let id = item_id(&path, &state)?;
    let attributes: ItemAttributes =
        decode_json_body(&req, payload, state.config.server.max_body_bytes, "invalid_item").await?;
    attributes.validate()?;
    let submitted = state.items.submit(vec![(id.clone(), ItemChange::Put(attributes.clone()))]).await?;
    let shown = submitted.applied_here.then(|| state.catalog.get(&id)).flatten();
    let view = shown.unwrap_or_else(|| view_of(id, attributes, now_ms()));
    Ok(if submitted.created > 0 { HttpResponse::Created().json(view) } else { HttpResponse::Ok().json(view) })
}

/// Delete an item
///
/// Takes the item out of the catalogue and out of every list, including lists already pushed
/// (their subscribers get a new list). Putting it again brings it back. Needs the `producer` role.
#[utoipa::path(
    delete,
    path = "/v1/items/{item_id}",
    tag = "items",
    params(("item_id" = String, Path, min_length = 1, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$", description = "The item (1 to `events.max_id_len` characters)")),
    responses(
        (status = 204, description = "The item was deleted"),
        (status = 400, description = "An invalid item id", body = ErrorBody),
        (status = 403, description = "The credential may not change the catalogue", body = ErrorBody),
        (status = 404, description = "No such item in the catalogue", body = ErrorBody),
        (status = 503, description = "Production mode: Kafka did not acknowledge the change (`bus_unavailable`)", body = ErrorBody),
    )
)]
pub async fn delete_item(
    path: web::Path<String>,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Producer)?;
    let id = item_id(&path, &state)?;
    if state.catalog.get(&id).is_none_or(|item| !item.in_catalog) {
        return Err(ApiError::not_found("item_not_found", format!("no item {id} in the catalogue")));
    }
    state.items.submit(vec![(id, ItemChange::Delete)]).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The answer to `PUT /v1/items`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ItemsPut {
    /// Items new to the catalogue.
    pub created: usize,
    /// Items whose attributes were replaced.
    pub replaced: usize,
}

/// One item of a bulk put: its id and the attributes `PUT /v1/items/{item_id}` takes (the
/// schema only: items are decoded as `item_id` plus [`ItemAttributes`]).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct BulkItem {
    /// The item (1 to `events.max_id_len` characters).
    item_id: String,
    /// At most 1,024 characters.
    #[schema(max_length = 1024)]
    title: Option<String>,
    /// At most 64 labels of 1 to 128 characters.
    #[schema(max_items = 64)]
    categories: Option<Vec<String>>,
    /// At most 64 labels of 1 to 128 characters.
    #[schema(max_items = 64)]
    tags: Option<Vec<String>>,
    /// Milliseconds since the Unix epoch.
    #[schema(minimum = 0)]
    created_at: Option<i64>,
    /// False takes the item out of every list; absent means true.
    available: Option<bool>,
    /// Milliseconds since the Unix epoch from which the item is unavailable.
    #[schema(minimum = 0)]
    expires_at: Option<i64>,
}

/// Decodes one item of a bulk body; errors name `[i].field`.
fn decode_item(i: usize, value: serde_json::Value, state: &AppState) -> Result<(ItemId, ItemAttributes), ApiError> {
    let at = |field: &str| format!("[{i}].{field}");
    let serde_json::Value::Object(mut object) = value else {
        return Err(ApiError::unprocessable("invalid_item", format!("item {i} is not a JSON object"))
            .with_field(format!("[{i}]")));
    };
    let raw = match object.remove("item_id") {
        Some(serde_json::Value::String(raw)) => raw,
        Some(_) => return Err(ApiError::unprocessable("invalid_item_id", "must be a string").with_field(at("item_id"))),
        None => return Err(ApiError::unprocessable("invalid_item_id", "is required").with_field(at("item_id"))),
    };
    check_id("item_id", &raw, state.config.events.max_id_len)
        .map_err(|e| ApiError::unprocessable("invalid_item_id", e.message).with_field(at("item_id")))?;
    let attributes: ItemAttributes =
        serde_path_to_error::deserialize(serde_json::Value::Object(object)).map_err(|e| {
            let path = e.path().to_string();
            let field = if path.is_empty() || path == "." { format!("[{i}]") } else { at(&path) };
            ApiError::unprocessable("invalid_item", e.into_inner().to_string()).with_field(field)
        })?;
    attributes.validate().map_err(|e| ApiError::unprocessable("invalid_item", e.message).with_field(at(e.field)))?;
    Ok((ItemId::from(raw.as_str()), attributes))
}

/// Put many items
///
/// Creates or replaces up to `events.max_batch` items at once: a JSON array
/// (`application/json`) or one item per line (`application/x-ndjson`), each an object with
/// `item_id` and the attributes `PUT /v1/items/{item_id}` takes. The whole batch is checked
/// first: one invalid item refuses it, naming `[index].field`. Needs the `producer` role.
#[utoipa::path(
    put,
    path = "/v1/items",
    tag = "items",
    request_body(content(
        (Vec<BulkItem> = "application/json"),
        (BulkItem = "application/x-ndjson"),
    )),
    responses(
        (status = 200, description = "Every item was put", body = ItemsPut),
        (status = 400, description = "The body is not JSON (or a line is not)", body = ErrorBody),
        (status = 403, description = "The credential may not change the catalogue", body = ErrorBody),
        (status = 413, description = "The body is larger than `server.max_body_bytes`, or holds more than `events.max_batch` items", body = ErrorBody),
        (status = 415, description = "Neither `application/json` nor `application/x-ndjson`", body = ErrorBody),
        (status = 422, description = "An invalid item (`field` names it, e.g. `[3].title`), or new items past `catalog.max_items` (`catalog_full`)", body = ErrorBody),
        (status = 503, description = "Production mode: Kafka did not acknowledge the changes (`bus_unavailable`)", body = ErrorBody),
    )
)]
pub async fn put_items(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Producer)?;
    let ndjson = match media_type(&req).as_deref() {
        Some("application/json") => false,
        Some("application/x-ndjson" | "application/jsonl" | "application/jsonlines") => true,
        _ => {
            return Err(ApiError::new(
                actix_web::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the items as application/json (an array) or application/x-ndjson (one per line)",
            ))
        }
    };
    let body = read_body(&req, payload, state.config.server.max_body_bytes).await?;
    let max = state.config.events.max_batch;
    let too_many = |n: usize| {
        ApiError::new(
            actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("{n} items; at most events.max_batch ({max}) in one request"),
        )
    };
    let values: Vec<serde_json::Value> = if ndjson {
        let lines: Vec<&[u8]> =
            body.split(|&b| b == b'\n').filter(|l| l.iter().any(|b| !b.is_ascii_whitespace())).collect();
        if lines.len() > max {
            return Err(too_many(lines.len()));
        }
        lines
            .iter()
            .enumerate()
            .map(|(i, line)| {
                serde_json::from_slice(line).map_err(|e| {
                    ApiError::bad_request(
                        "malformed_json",
                        format!("item {i} (line {} of the items) is not JSON: {e}", i + 1),
                    )
                    .with_field(format!("[{i}]"))
                })
            })
            .collect::<Result<_, _>>()?
    } else {
        match super::body::decode_json::<serde_json::Value>(&body, "invalid_item")? {
            serde_json::Value::Array(values) => values,
            _ => return Err(ApiError::unprocessable("invalid_item", "the body must be a JSON array of items")),
        }
    };
    if values.len() > max {
        return Err(too_many(values.len()));
    }
    let changes = values
        .into_iter()
        .enumerate()
        .map(|(i, v)| decode_item(i, v, &state).map(|(id, attributes)| (id, ItemChange::Put(attributes))))
        .collect::<Result<Vec<_>, _>>()?;
    let submitted = state.items.submit(changes).await?;
    Ok(HttpResponse::Ok().json(ItemsPut { created: submitted.created, replaced: submitted.replaced }))
}

/// The query of `GET /v1/items`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Credentials for clients that cannot set headers (read by the `Caller` extractor).
    #[allow(dead_code)]
    access_token: Option<String>,
    /// `next_cursor` of the previous page; absent for the first.
    cursor: Option<String>,
    /// Most items on the page (default 100, at most 1,000).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "super::lists::param::limit")]
    limit: Option<usize>,
}

/// Page through the catalogue
///
/// Items put into the catalogue, in a stable order (the order they first became known), with
/// unavailable ones marked `available: false`; deleted items and items known only from events
/// are left out. Follow `next_cursor` until it is absent: every item then came exactly once
/// (items put meanwhile come on a later page). Any valid credential may read the catalogue.
#[utoipa::path(
    get,
    path = "/v1/items",
    tag = "items",
    params(PageQuery),
    responses(
        (status = 200, description = "One page", body = ItemPage),
        (status = 400, description = "An invalid `cursor` or `limit`", body = ErrorBody),
    )
)]
pub async fn list_items(
    query: web::Query<PageQuery>,
    state: web::Data<AppState>,
    _caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let cursor = match &query.cursor {
        None => None,
        Some(raw) => Some(raw.parse::<ItemIdx>().map_err(|_| {
            ApiError::bad_request("invalid_cursor", "pass the next_cursor of a previous page").with_field("cursor")
        })?),
    };
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request("invalid_limit", format!("must be 1 to {MAX_PAGE}")).with_field("limit"));
    }
    Ok(HttpResponse::Ok().json(state.catalog.page(cursor, limit)))
}
