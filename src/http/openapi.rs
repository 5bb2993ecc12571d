//! `GET /openapi.json`: the OpenAPI 3.1 document of the HTTP API, generated from the handlers'
//! `#[utoipa::path]` attributes and the request and response types, so it cannot drift from
//! the code. The answers every route shares (401 without a valid credential, 429 over a rate
//! limit, 503 under load shedding or shutdown; 413, 415 and 422 where a JSON body is read) are
//! added here once, by [`SharedResponses`].

use std::sync::OnceLock;

use actix_web::{web, HttpResponse};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{header::HeaderBuilder, ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, PartialSchema as _};

use super::error::ErrorBody;
use super::{admin, events, health, items, lists, monitor, recommendations, stream, users};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/openapi.json").route(web::get().to(openapi_json)));
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "liverec",
        description = "A real-time recommendation server: post events, read and stream each user's \
                       recommendations as they change. Credentials: an API key or a per-user \
                       stream token, as `Authorization: Bearer`, `X-Api-Key` or `?access_token=` \
                       (a stream token on GET only; SECURITY.md). Errors are `{\"error\": {\"code\", \"message\", \"field\"}}`."
    ),
    paths(
        events::post_events,
        recommendations::get_recommendations,
        recommendations::post_recommendations,
        lists::popular,
        lists::trending,
        lists::latest,
        lists::similar,
        stream::sse,
        stream::websocket,
        items::get_item,
        items::put_item,
        items::delete_item,
        items::put_items,
        items::list_items,
        users::merge,
        users::export,
        users::erase,
        monitor::report,
        admin::models,
        admin::promote_version,
        admin::promote,
        admin::rollback,
        admin::retrain,
        admin::experiment,
        admin::start_experiment,
        admin::stop_experiment,
        admin::mint_token,
        health::healthz,
        health::readyz,
        health::metrics,
        openapi_json,
    ),
    components(schemas(ErrorBody)),
    security(("bearer" = []), ("api_key" = []), ("access_token" = [])),
    modifiers(&SharedResponses),
    tags(
        (name = "events", description = "Interactions in"),
        (name = "recommendations", description = "Lists out: read once or streamed"),
        (name = "items", description = "The catalogue"),
        (name = "lists", description = "Non-personal lists: popular, trending, latest and similar items, cacheable by anyone"),
        (name = "users", description = "Identity and privacy: merge, export, erase"),
        (name = "admin", description = "Model versions and the closed loop"),
        (name = "operations", description = "Health, metrics, monitor, this document"),
    )
)]
pub struct ApiDoc;

/// This document
///
/// The OpenAPI document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    security(()),
    responses((status = 200, description = "OpenAPI 3.1", body = Object))
)]
pub async fn openapi_json() -> HttpResponse {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let body = DOCUMENT.get_or_init(|| ApiDoc::openapi().to_json().expect("the OpenAPI document serialises"));
    HttpResponse::Ok().content_type("application/json").body(body.as_str())
}

/// Adds the security schemes, and to every operation the answers the middleware and the shared
/// extractors give: 401 where a credential is required, 429 and 503 on the API routes.
struct SharedResponses;

impl Modify for SharedResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        components
            .add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Api-Key"))));
        components.add_security_scheme(
            "access_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::new("access_token"))),
        );
        let error = || ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
        let retry_after = || {
            HeaderBuilder::new()
                .schema(Some(u64::schema()))
                .description(Some("Seconds to wait before retrying"))
                .build()
        };
        let shared = [
            (
                "401",
                "Unauthorized",
                ResponseBuilder::new()
                    .description("No credential, or one that is unknown, expired or badly signed, or an API key in `?access_token=`")
                    .content("application/json", error())
                    .build(),
            ),
            (
                "429",
                "RateLimited",
                ResponseBuilder::new()
                    .description("Over the rate limit of the client IP or credential, or its open streams or connections")
                    .header("Retry-After", retry_after())
                    .content("application/json", error())
                    .build(),
            ),
            (
                "503",
                "Unavailable",
                ResponseBuilder::new()
                    .description(
                        "The event pipeline is saturated, a backing service is down, the server holds too many connections, or it is stopping",
                    )
                    .header("Retry-After", retry_after())
                    .content("application/json", error())
                    .build(),
            ),
        ];
        // What reading any JSON body can answer (`read_json_body`, `decode_json_body`); an
        // operation that says more about one of them keeps its own description.
        let body = [
            ("408", "BodyTimeout", "The body did not arrive within `server.body_timeout_secs`"),
            ("413", "PayloadTooLarge", "The body is larger than `server.max_body_bytes`"),
            ("415", "UnsupportedMediaType", "The body is not declared as application/json"),
            ("422", "InvalidBody", "A body of the wrong shape; `field` names where"),
        ]
        .map(|(status, name, description)| {
            (status, name, ResponseBuilder::new().description(description).content("application/json", error()).build())
        });
        for (_, name, response) in shared.iter().chain(&body) {
            components.responses.insert((*name).to_owned(), RefOr::T(response.clone()));
        }
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete].into_iter().flatten();
            for operation in operations {
                let public = operation
                    .security
                    .as_ref()
                    .is_some_and(|requirements| requirements.iter().all(|r| r == &Default::default()));
                let reads_body = operation.request_body.is_some();
                let applies = |status: &str| match status {
                    "401" => !public,
                    "408" | "413" | "415" | "422" => reads_body,
                    _ => true,
                };
                for (status, name, _) in shared.iter().chain(&body).filter(|(status, ..)| applies(status)) {
                    operation
                        .responses
                        .responses
                        .entry((*status).to_owned())
                        .or_insert_with(|| RefOr::Ref(Ref::from_response_name(*name)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route the server registers is in the document, and every operation says what it
    /// answers when things go wrong.
    #[test]
    fn the_document_covers_the_api() {
        let doc: serde_json::Value = serde_json::from_str(&ApiDoc::openapi().to_json().unwrap()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for (path, methods) in [
            ("/v1/events", &["post"][..]),
            ("/v1/users/{user_id}/recommendations", &["get"]),
            ("/v1/recommendations", &["post"]),
            ("/v1/popular", &["get"]),
            ("/v1/trending", &["get"]),
            ("/v1/items/latest", &["get"]),
            ("/v1/items/{item_id}/similar", &["get"]),
            ("/v1/users/{user_id}/recommendations/stream", &["get"]),
            ("/v1/ws", &["get"]),
            ("/v1/items/{item_id}", &["get", "put", "delete"]),
            ("/v1/items", &["get", "put"]),
            ("/v1/users/{user_id}/merge", &["post"]),
            ("/v1/users/{user_id}/export", &["get"]),
            ("/v1/users/{user_id}", &["delete"]),
            ("/v1/monitor", &["get"]),
            ("/v1/admin/models", &["get"]),
            ("/v1/admin/models/{name}/promote", &["post"]),
            ("/v1/admin/promote", &["post"]),
            ("/v1/admin/rollback", &["post"]),
            ("/v1/admin/retrain", &["post"]),
            ("/v1/admin/experiments", &["get", "post", "delete"]),
            ("/v1/admin/tokens", &["post"]),
            ("/healthz", &["get"]),
            ("/readyz", &["get"]),
            ("/metrics", &["get"]),
            ("/openapi.json", &["get"]),
        ] {
            for method in methods {
                let operation = &paths[path][method];
                assert!(operation.is_object(), "{method} {path} is missing");
                if path.starts_with("/v1/") {
                    for status in ["401", "429", "503"] {
                        assert!(operation["responses"][status].is_object(), "{method} {path} lacks {status}");
                    }
                    if operation.get("requestBody").is_some() {
                        for status in ["413", "415", "422"] {
                            assert!(operation["responses"][status].is_object(), "{method} {path} lacks {status}");
                        }
                    }
                }
            }
        }
        let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
        assert_eq!(schemes.len(), 3);
        assert!(paths["/healthz"]["get"]["responses"].get("401").is_none());
    }
}
