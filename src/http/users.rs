//! `POST /v1/users/{user_id}/merge` (fold an anonymous visitor's history into a user, as at
//! login) and `GET /v1/users/{user_id}/export` (everything stored about the user).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::error::{json_error, ApiError};
use super::{read_json_body, AppState};
use crate::actors::messages::{MergeHistory, Snapshot, TakeHistory};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/users/{user_id}/merge").route(web::post().to(merge)))
        .service(web::resource("/v1/users/{user_id}/export").route(web::get().to(export)));
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
) -> Result<HttpResponse, ApiError> {
    let user = state.user_id(&path, "user_id")?;
    let body = read_json_body(&req, payload, state.config.server.max_body_bytes).await?;
    let mut de = serde_json::Deserializer::from_slice(&body);
    let request: MergeRequest =
        serde_path_to_error::deserialize(&mut de).map_err(|e| json_error(e, "invalid_merge"))?;
    let from = state.user_id(&request.from, "from").map_err(|e| ApiError {
        status: actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
        ..e
    })?;
    if from == user {
        return Err(ApiError::unprocessable(
            "invalid_merge",
            "a user cannot be merged into itself",
        )
        .with_field("from"));
    }
    let (_, anonymous) = state.registry.session(&from);
    let history = anonymous.send(TakeHistory).await?;
    let moved = history.interactions.len();
    let (_, session) = state.registry.session(&user);
    let outcome = session.send(MergeHistory { from: history }).await?;
    Ok(HttpResponse::Ok().json(json!({
        "user_id": user,
        "from": from,
        "moved": moved,
        "merged": outcome.applied,
        "duplicates": outcome.duplicates,
    })))
}

async fn export(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let user = state.user_id(&path, "user_id")?;
    let (_, session) = state.registry.session(&user);
    let profile = session.send(Snapshot).await?;
    Ok(HttpResponse::Ok().json(json!({ "user_id": user, "profile": profile })))
}
