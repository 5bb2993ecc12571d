//! `/v1/admin/models`: the model registry and the version serving now; switching versions while
//! serving (the swap happens between two batches, so no request is dropped).

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::error::ApiError;
use super::AppState;
use crate::actors::model::{CurrentVersion, SwapModel};
use crate::models::registry::{self, RegistryError};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/admin/models").route(web::get().to(models)))
        .service(web::resource("/v1/admin/models/{name}/activate").route(web::post().to(activate)));
}

fn registry_error(error: RegistryError) -> ApiError {
    match error {
        RegistryError::BadName(_) => ApiError::bad_request("invalid_model_name", error.to_string()),
        RegistryError::NotFound { .. } | RegistryError::Empty(_) => {
            ApiError::not_found("model_not_found", error.to_string())
        }
        RegistryError::Unreadable(..) | RegistryError::File(_) => {
            tracing::error!(error = %error, "model registry error");
            ApiError::new(
                actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
                "model_unreadable",
                "the model version could not be read; see the server log",
            )
        }
    }
}

async fn models(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let serving = state.registry.deps.model.send(CurrentVersion).await?;
    let dir = state.config.model.registry_dir.clone();
    let versions = web::block(move || registry::list(&dir))
        .await
        .map_err(|_| ApiError::unavailable("unavailable", "the registry could not be listed", 1))?
        .map_err(registry_error)?;
    Ok(HttpResponse::Ok().json(json!({
        "serving": serving,
        "kind": state.config.model.kind,
        "registry_dir": state.config.model.registry_dir,
        "versions": versions,
    })))
}

async fn activate(path: web::Path<String>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let dir = state.config.model.registry_dir.clone();
    let location = registry::resolve(&dir, &path).map_err(registry_error)?;
    let catalog = state.catalog.clone();
    // Loading reads and checks the weights: off the HTTP worker and off the inference thread.
    let model = web::block(move || registry::load(&location, &catalog))
        .await
        .map_err(|_| ApiError::unavailable("unavailable", "the model could not be loaded", 1))?
        .map_err(registry_error)?;
    let version = crate::models::Recommender::version(&model).to_owned();
    state.registry.deps.model.send(SwapModel { model: Box::new(model) }).await?;
    tracing::info!(version = %version, "model version activated");
    Ok(HttpResponse::Ok().json(json!({ "serving": version })))
}
