//! `/v1/admin/*`: the model registry and the closed loop. Versions, the traffic split, the state
//! of training, canary and experiment, the history of every step; retraining on demand; manual
//! promotion and rollback; A/B experiments between two versions. Every switch happens between
//! two inference batches, so no request is dropped.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Caller;
use super::body::decode_json_body;
use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use crate::actors::model::CurrentVersion;
use crate::actors::trainer::experiments::{StartExperiment, StopExperiment};
use crate::actors::trainer::rollout::{Promote, Rollback};
use crate::actors::trainer::state::{RequestRetrain, RunOutcome, TriggerSource};
use crate::actors::trainer::view::GetLoopState;
use crate::auth::Role;
use crate::models::registry::RegistryError;
use crate::models::retrain::Drill;

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

/// Production mode: the loop's requests (retrain, promote, activate, rollback, experiments) are
/// the leader's alone. On a follower they are answered `409 not_leader`, with the leader the
/// follower knows of, for the operator (or a script) to send the request there; they are not
/// forwarded, so that an operator always learns which instance acted.
fn refused_by_follower(state: &AppState) -> Option<HttpResponse> {
    let cluster = state.cluster.as_ref()?;
    let leadership = cluster.leadership();
    if leadership.leading {
        return None;
    }
    let message = match &leadership.leader {
        Some(leader) if !leader.advertise_url.is_empty() => format!(
            "this instance does not lead the loop; send the request to the leader, {} at {}",
            leader.instance_id, leader.advertise_url
        ),
        Some(leader) => format!(
            "this instance does not lead the loop; send the request to the leader, {} (it advertises no URL: set cluster.advertise_url)",
            leader.instance_id
        ),
        None => "no instance leads the loop right now (the lease is being taken over); retry shortly".to_owned(),
    };
    Some(HttpResponse::Conflict().json(json!({
        "error": { "code": "not_leader", "message": message },
        "leader": leadership.leader,
        "instance_id": cluster.instance_id,
    })))
}

/// A JSON body that may be left out entirely (no body, no content type), or be `null`: then the
/// defaults.
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
    let body: Option<T> = decode_json_body(req, payload, state.config.server.max_body_bytes, invalid).await?;
    Ok(body.unwrap_or_default())
}

/// Models and the loop
///
/// Versions in the registry with their status, the traffic split, the state of training,
/// canary and experiment, recent runs with their gate figures, and the history of every step
/// (see docs/monitoring.md). Needs the `admin` role.
#[utoipa::path(
    get,
    path = "/v1/admin/models",
    tag = "admin",
    responses(
        (status = 200, description = "The registry and the loop (fields in docs/monitoring.md)", body = Object),
        (status = 403, description = "The credential is not an admin", body = ErrorBody),
        (status = 500, description = "The model registry could not be read", body = ErrorBody),
    )
)]
pub async fn models(state: web::Data<AppState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let traffic = state.registry.deps.model.send(CurrentVersion).await?;
    let loop_state = state.trainer.send(GetLoopState).await?;
    let model_registry = state.model_registry.clone();
    let versions = web::block(move || model_registry.list())
        .await
        .map_err(|_| ApiError::unavailable("unavailable", "the registry could not be listed", 1))??;
    let rolled_back: Vec<&str> = loop_state
        .runs
        .iter()
        .filter(|r| r.outcome == RunOutcome::RolledBack)
        .filter_map(|r| r.name.as_deref())
        .collect();
    let serving_name = loop_state.serving_name.as_deref();
    let canary_name = loop_state.canary.as_ref().map(|c| c.name.as_str());
    let experiment_b = loop_state.experiment.as_ref().map(|e| e.b.name.as_str());
    let versions: Vec<Value> = versions
        .into_iter()
        .map(|v| {
            let name = Some(v.name.as_str());
            let status = if name == serving_name {
                "serving"
            } else if name == canary_name {
                "canary"
            } else if name == experiment_b {
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
    let mut body = json!({
        "serving": traffic.serving(),
        "kind": state.config.model.kind,
        "registry_dir": state.config.model.registry_dir,
        "registry_url": state.config.model.registry_url,
        "traffic": traffic,
        "versions": versions,
    });
    // The loop's fields sit beside the registry's at the top level of the answer.
    if let (Some(out), Ok(Value::Object(fields))) = (body.as_object_mut(), serde_json::to_value(&loop_state)) {
        out.extend(fields);
    }
    Ok(HttpResponse::Ok().json(body))
}

/// The optional body of an operator's action.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Reason {
    /// Why, for the history (default "requested by an operator").
    reason: Option<String>,
}

/// The optional `{"reason": "…"}` of an operator's action, with its default.
async fn reason(req: &HttpRequest, payload: web::Payload, state: &AppState) -> Result<String, ApiError> {
    let body: Reason = optional_body(req, payload, state, "invalid_request").await?;
    Ok(body.reason.unwrap_or_else(|| "requested by an operator".into()))
}

/// Promote a version
///
/// Serves the named registry version to everyone, now (between two inference batches); the
/// displaced version is kept for rollback. `/activate` is an alias. Needs the `admin` role.
#[utoipa::path(
    post,
    path = "/v1/admin/models/{name}/promote",
    tag = "admin",
    params(("name" = String, Path, description = "A version in the registry")),
    request_body(content = Option<Reason>, content_type = "application/json", description = "Optional; `null` or no body: the defaults"),
    responses(
        (status = 200, description = "Promoted", body = Object),
        (status = 400, description = "An invalid version name or body", body = ErrorBody),
        (status = 403, description = "The credential is not an admin", body = ErrorBody),
        (status = 404, description = "No such version", body = ErrorBody),
        (status = 409, description = "A step of the loop is in progress", body = ErrorBody),
    )
)]
pub async fn promote_version(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    if let Some(refused) = refused_by_follower(&state) {
        return Ok(refused);
    }
    let name = path.into_inner();
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(RegistryError::BadName(name).into());
    }
    let reason = reason(&req, payload, &state).await?;
    let done = state.trainer.send(Promote { name: Some(name), reason }).await??;
    Ok(HttpResponse::Ok().json(done))
}

/// Promote the canary
///
/// Ends the running canary or experiment early by promoting its challenger. Needs the `admin`
/// role.
#[utoipa::path(
    post,
    path = "/v1/admin/promote",
    tag = "admin",
    request_body(content = Option<Reason>, content_type = "application/json", description = "Optional; `null` or no body: the defaults"),
    responses(
        (status = 200, description = "Promoted", body = Object),
        (status = 400, description = "A body that is not JSON", body = ErrorBody),
        (status = 403, description = "The credential is not an admin", body = ErrorBody),
        (status = 404, description = "No version to promote", body = ErrorBody),
        (status = 409, description = "Nothing to promote, or a step in progress", body = ErrorBody),
    )
)]
pub async fn promote(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    if let Some(refused) = refused_by_follower(&state) {
        return Ok(refused);
    }
    let reason = reason(&req, payload, &state).await?;
    let done = state.trainer.send(Promote { name: None, reason }).await??;
    Ok(HttpResponse::Ok().json(done))
}

/// Roll back
///
/// Stops a canary or experiment, or returns to the version served before the last promotion.
/// Needs the `admin` role.
#[utoipa::path(
    post,
    path = "/v1/admin/rollback",
    tag = "admin",
    request_body(content = Option<Reason>, content_type = "application/json", description = "Optional; `null` or no body: the defaults"),
    responses(
        (status = 200, description = "Rolled back", body = Object),
        (status = 400, description = "A body that is not JSON", body = ErrorBody),
        (status = 403, description = "The credential is not an admin", body = ErrorBody),
        (status = 404, description = "No version to return to", body = ErrorBody),
        (status = 409, description = "Nothing to roll back, or a step in progress", body = ErrorBody),
    )
)]
pub async fn rollback(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    if let Some(refused) = refused_by_follower(&state) {
        return Ok(refused);
    }
    let reason = reason(&req, payload, &state).await?;
    let done = state.trainer.send(Rollback { reason }).await??;
    Ok(HttpResponse::Ok().json(done))
}

/// The optional body of a retraining request.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RetrainBody {
    /// Why, for the history (default "requested by an operator").
    reason: Option<String>,
    /// A deliberate fault, to check that the gate and the canary catch a bad model.
    drill: Drill,
    /// Skip the gate (drills only): the bad model goes straight to canary.
    skip_gate: bool,
}

/// Retrain
///
/// Starts a training run on the retained window (or joins the one in progress). Needs the
/// `admin` role.
#[utoipa::path(
    post,
    path = "/v1/admin/retrain",
    tag = "admin",
    request_body(content = Option<RetrainBody>, content_type = "application/json", description = "Optional; `null` or no body: the defaults"),
    responses(
        (status = 202, description = "The run was started or joined", body = Object),
        (status = 400, description = "A body that is not JSON, or `skip_gate` without a drill", body = ErrorBody),
        (status = 403, description = "The credential is not an admin", body = ErrorBody),
        (status = 409, description = "Retraining is not possible now", body = ErrorBody),
    )
)]
pub async fn retrain(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    if let Some(refused) = refused_by_follower(&state) {
        return Ok(refused);
    }
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
    let ack = state.trainer.send(request).await??;
    Ok(HttpResponse::Accepted().json(ack))
}

/// The experiment
///
/// The running A/B experiment with per-variant CTR, Wilson intervals and z, or null. Needs the
/// `admin` role.
#[utoipa::path(
    get,
    path = "/v1/admin/experiments",
    tag = "admin",
    responses(
        (status = 200, description = "`{\"experiment\": …}`", body = Object),
        (status = 403, description = "The credential is not an admin", body = ErrorBody),
    )
)]
pub async fn experiment(state: web::Data<AppState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let loop_state = state.trainer.send(GetLoopState).await?;
    Ok(HttpResponse::Ok().json(json!({ "experiment": loop_state.experiment })))
}

/// An A/B experiment between two registry versions.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExperimentBody {
    /// Version serving arm A.
    #[schema(min_length = 1)]
    a: String,
    /// Version serving arm B (another version than `a`).
    #[schema(min_length = 1)]
    b: String,
    /// Share of users served by `b`, strictly between 0 and 1 (default 0.5).
    #[serde(default = "half")]
    #[schema(exclusive_minimum = 0.0, exclusive_maximum = 1.0)]
    share: f64,
}

fn half() -> f64 {
    0.5
}

/// Start an experiment
///
/// Splits users between two versions by a stable hash of the user id. Needs the `admin` role.
#[utoipa::path(
    post,
    path = "/v1/admin/experiments",
    tag = "admin",
    request_body(content = ExperimentBody, content_type = "application/json"),
    responses(
        (status = 201, description = "Started", body = Object),
        (status = 400, description = "A body that is not JSON, or invalid arms or share", body = ErrorBody),
        (status = 403, description = "The credential is not an admin", body = ErrorBody),
        (status = 404, description = "No such version", body = ErrorBody),
        (status = 409, description = "A canary or experiment is already running", body = ErrorBody),
    )
)]
pub async fn start_experiment(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    if let Some(refused) = refused_by_follower(&state) {
        return Ok(refused);
    }
    let body: ExperimentBody =
        decode_json_body(&req, payload, state.config.server.max_body_bytes, "invalid_request").await?;
    let started = state.trainer.send(StartExperiment { a: body.a, b: body.b, share: body.share }).await??;
    Ok(HttpResponse::Created().json(started))
}

/// Stop the experiment
///
/// Ends it with its figures; arm A serves everyone. Needs the `admin` role.
#[utoipa::path(
    delete,
    path = "/v1/admin/experiments",
    tag = "admin",
    responses(
        (status = 200, description = "Stopped, with the final figures", body = Object),
        (status = 403, description = "The credential is not an admin", body = ErrorBody),
        (status = 409, description = "No experiment is running", body = ErrorBody),
    )
)]
pub async fn stop_experiment(state: web::Data<AppState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    if let Some(refused) = refused_by_follower(&state) {
        return Ok(refused);
    }
    let stopped = state.trainer.send(StopExperiment).await??;
    Ok(HttpResponse::Ok().json(stopped))
}

/// A request for a stream token.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The one user the token may read and post for.
    #[schema(min_length = 1, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$")]
    user_id: String,
    /// Lifetime in seconds (default `auth.token_ttl_secs`, at most `auth.max_token_ttl_secs`).
    #[schema(minimum = 1)]
    ttl_secs: Option<u64>,
}

/// A minted stream token.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct MintedToken {
    /// HS256-signed; send as `Authorization: Bearer` or `?access_token=`.
    token: String,
    #[schema(value_type = String)]
    user_id: crate::event::UserId,
    /// Seconds until it expires.
    expires_in: u64,
}

/// Mint a stream token
///
/// A short-lived token for one user, for that user's page or app: it opens that user's streams
/// and reads and posts for that user only (see SECURITY.md). Needs the `admin` role.
#[utoipa::path(
    post,
    path = "/v1/admin/tokens",
    tag = "admin",
    request_body(content = TokenRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The token", body = MintedToken),
        (status = 400, description = "A body that is not JSON, an invalid user id or lifetime", body = ErrorBody),
        (status = 403, description = "The credential is not an admin", body = ErrorBody),
        (status = 409, description = "Auth is off; no token is needed", body = ErrorBody),
    )
)]
pub async fn mint_token(
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
    Ok(HttpResponse::Created().json(MintedToken { token, user_id: user, expires_in: ttl }))
}
