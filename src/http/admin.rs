//! `/v1/admin/*`: the model registry and the closed loop. Versions, the traffic split, the state
//! of training, canary and experiment, the history of every step; retraining on demand; manual
//! promotion and rollback; A/B experiments between two versions. Every switch happens between
//! two inference batches, so no request is dropped.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Caller;
use super::error::ApiError;
use super::{decode_json_body, AppState};
use crate::actors::model::CurrentVersion;
use crate::actors::trainer::{
    Drill, GetLoopState, Promote, RequestRetrain, Rollback, StartExperiment, StopExperiment, TrainerError,
    TriggerSource,
};
use crate::auth::Role;
use crate::models::registry::{self, RegistryError};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/admin/models").route(web::get().to(models)))
        .service(web::resource("/v1/admin/models/{name}/activate").route(web::post().to(promote_version)))
        .service(web::resource("/v1/admin/models/{name}/promote").route(web::post().to(promote_version)))
        .service(web::resource("/v1/admin/promote").route(web::post().to(promote)))
        .service(web::resource("/v1/admin/rollback").route(web::post().to(rollback)))
        .service(web::resource("/v1/admin/retrain").route(web::post().to(retrain)))
        .service(web::resource("/v1/admin/tokens").route(web::post().to(mint_token)))
        .service(
            web::resource("/v1/admin/experiments")
                .route(web::get().to(experiment))
                .route(web::post().to(start_experiment))
                .route(web::delete().to(stop_experiment)),
        );
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
                StatusCode::INTERNAL_SERVER_ERROR,
                "model_unreadable",
                "the model registry could not be read; see the server log",
            )
        }
    }
}

fn trainer_error(error: TrainerError) -> ApiError {
    match error {
        TrainerError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
        TrainerError::NotFound(m) => ApiError::not_found("model_not_found", m),
        TrainerError::BadRequest(m) => ApiError::bad_request("invalid_request", m),
        TrainerError::Failed(m) => {
            tracing::error!(error = %m, "model lifecycle step failed");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "model_unreadable", m)
        }
    }
}

/// A JSON body that may be left out entirely (no body, no content type): then the defaults.
async fn optional_body<T: serde::de::DeserializeOwned + Default>(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    invalid: &'static str,
) -> Result<T, ApiError> {
    let headers = req.headers();
    let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let empty = length == Some(0)
        || (length.is_none()
            && !headers.contains_key(header::TRANSFER_ENCODING)
            && !headers.contains_key(header::CONTENT_TYPE));
    if empty {
        return Ok(T::default());
    }
    decode_json_body(req, payload, state.config.server.max_body_bytes, invalid).await
}

async fn models(state: web::Data<AppState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let traffic = state.registry.deps.model.send(CurrentVersion).await?;
    let mut loop_state = state.trainer.send(GetLoopState).await?;
    let dir = state.config.model.registry_dir.clone();
    let versions = web::block(move || registry::list(&dir))
        .await
        .map_err(|_| ApiError::unavailable("unavailable", "the registry could not be listed", 1))?
        .map_err(registry_error)?;
    let rolled_back: Vec<&str> = loop_state["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["outcome"] == "rolled_back")
        .filter_map(|r| r["name"].as_str())
        .collect();
    let name_is = |path: &str, name: &str| loop_state.pointer(path).and_then(Value::as_str) == Some(name);
    let versions: Vec<Value> = versions
        .into_iter()
        .map(|v| {
            let status = if name_is("/serving_name", &v.name) {
                "serving"
            } else if name_is("/canary/name", &v.name) {
                "canary"
            } else if name_is("/experiment/b/name", &v.name) {
                "experiment_b"
            } else if rolled_back.contains(&v.name.as_str()) {
                "rolled_back"
            } else {
                "available"
            };
            let mut value = serde_json::to_value(&v).unwrap_or_default();
            value["status"] = json!(status);
            value
        })
        .collect();
    let fields = loop_state.as_object_mut().expect("the loop state is an object");
    let mut body = json!({
        "serving": traffic.serving(),
        "kind": state.config.model.kind,
        "registry_dir": state.config.model.registry_dir,
        "traffic": traffic,
        "versions": versions,
    });
    let out = body.as_object_mut().expect("an object");
    out.extend(std::mem::take(fields));
    Ok(HttpResponse::Ok().json(body))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Reason {
    reason: Option<String>,
}

/// The optional `{"reason": "…"}` of an operator's action, with its default.
async fn reason(req: &HttpRequest, payload: web::Payload, state: &AppState) -> Result<String, ApiError> {
    let body: Reason = optional_body(req, payload, state, "invalid_request").await?;
    Ok(body.reason.unwrap_or_else(|| "requested by an operator".into()))
}

async fn promote_version(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let name = path.into_inner();
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(registry_error(RegistryError::BadName(name)));
    }
    let reason = reason(&req, payload, &state).await?;
    let done = state.trainer.send(Promote { name: Some(name), reason }).await?.map_err(trainer_error)?;
    Ok(HttpResponse::Ok().json(done))
}

async fn promote(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let reason = reason(&req, payload, &state).await?;
    let done = state.trainer.send(Promote { name: None, reason }).await?.map_err(trainer_error)?;
    Ok(HttpResponse::Ok().json(done))
}

async fn rollback(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let reason = reason(&req, payload, &state).await?;
    let done = state.trainer.send(Rollback { reason }).await?.map_err(trainer_error)?;
    Ok(HttpResponse::Ok().json(done))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RetrainBody {
    reason: Option<String>,
    drill: Drill,
    skip_gate: bool,
}

async fn retrain(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let body: RetrainBody = optional_body(&req, payload, &state, "invalid_request").await?;
    if body.skip_gate && body.drill == Drill::None {
        return Err(ApiError::bad_request(
            "invalid_request",
            "skip_gate is for drills only: set \"drill\" as well (e.g. \"shuffle_items\")",
        )
        .with_field("skip_gate"));
    }
    let request = RequestRetrain {
        reason: body.reason.unwrap_or_else(|| "requested by an operator".into()),
        source: TriggerSource::Admin,
        drill: body.drill,
        skip_gate: body.skip_gate,
    };
    let ack = state.trainer.send(request).await?.map_err(trainer_error)?;
    Ok(HttpResponse::Accepted().json(ack))
}

async fn experiment(state: web::Data<AppState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let loop_state = state.trainer.send(GetLoopState).await?;
    Ok(HttpResponse::Ok().json(json!({ "experiment": loop_state["experiment"] })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExperimentBody {
    a: String,
    b: String,
    /// Share of users served by `b`.
    #[serde(default = "half")]
    share: f64,
}

fn half() -> f64 {
    0.5
}

async fn start_experiment(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let body: ExperimentBody =
        decode_json_body(&req, payload, state.config.server.max_body_bytes, "invalid_request").await?;
    let started = state
        .trainer
        .send(StartExperiment { a: body.a, b: body.b, share: body.share })
        .await?
        .map_err(trainer_error)?;
    Ok(HttpResponse::Created().json(started))
}

async fn stop_experiment(state: web::Data<AppState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let stopped = state.trainer.send(StopExperiment).await?.map_err(trainer_error)?;
    Ok(HttpResponse::Ok().json(stopped))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    user_id: String,
    /// Lifetime in seconds (default `auth.token_ttl_secs`, at most `auth.max_token_ttl_secs`).
    ttl_secs: Option<u64>,
}

/// A stream token for one user, for that user's page or app (see `crate::auth`).
async fn mint_token(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let body: TokenRequest =
        decode_json_body(&req, payload, state.config.server.max_body_bytes, "invalid_request").await?;
    let user = state.user_id(&body.user_id, "user_id")?;
    let ttl = body.ttl_secs.unwrap_or(state.auth.token_ttl_secs);
    if ttl == 0 || ttl > state.auth.max_token_ttl_secs {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("ttl_secs must be between 1 and {}", state.auth.max_token_ttl_secs),
        )
        .with_field("ttl_secs"));
    }
    if !state.auth.enabled() {
        return Err(ApiError::new(StatusCode::CONFLICT, "auth_off", "auth is off (auth.mode); no token is needed"));
    }
    let token = state.auth.mint(user.as_str(), ttl);
    Ok(HttpResponse::Created().json(json!({ "token": token, "user_id": user, "expires_in": ttl })))
}
