//! `GET` and `PUT /v1/items/{item_id}`: catalogue attributes.

use actix_web::{web, HttpRequest, HttpResponse};

use super::auth::Caller;
use super::body::decode_json_body;
use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use crate::auth::Role;
use crate::catalog::{ItemAttributes, ItemView};
use crate::event::{check_id, ItemId};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/items/{item_id}").route(web::get().to(get_item)).route(web::put().to(put_item)));
}

fn item_id(raw: &str, state: &AppState) -> Result<ItemId, ApiError> {
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
        (status = 422, description = "Invalid attributes; `field` names the one", body = ErrorBody),
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
    let (_, created) = state.catalog.put(&id, attributes);
    let view = state.catalog.get(&id).expect("just put");
    Ok(if created { HttpResponse::Created().json(view) } else { HttpResponse::Ok().json(view) })
}
