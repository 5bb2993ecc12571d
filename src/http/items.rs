//! `GET` and `PUT /v1/items/{item_id}`: catalogue attributes.

use actix_web::{web, HttpRequest, HttpResponse};

use super::auth::Caller;
use super::error::ApiError;
use super::{decode_json_body, AppState};
use crate::auth::Role;
use crate::catalog::ItemAttributes;
use crate::event::{check_id, ItemId};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/items/{item_id}").route(web::get().to(get_item)).route(web::put().to(put_item)));
}

fn item_id(raw: &str, state: &AppState) -> Result<ItemId, ApiError> {
    check_id("item_id", raw, state.config.events.max_id_len)
        .map_err(|e| ApiError::bad_request("invalid_item_id", e.message).with_field(e.field))?;
    Ok(ItemId::from(raw))
}

async fn get_item(
    path: web::Path<String>,
    state: web::Data<AppState>,
    _caller: Caller,
) -> Result<HttpResponse, ApiError> {
    // The catalogue is not user data: any caller with valid credentials may read it.
    let id = item_id(&path, &state)?;
    let view = state.catalog.get(&id).ok_or_else(|| ApiError::not_found("item_not_found", format!("no item {id}")))?;
    Ok(HttpResponse::Ok().json(view))
}

async fn put_item(
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
