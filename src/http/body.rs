//! Request bodies: the one JSON body reader and decoder every handler uses, with the same
//! answers everywhere (415 not JSON, 413 too large, 400 malformed, 422 wrong shape naming the
//! field).

use actix_web::{web, HttpRequest};

use super::error::{self, ApiError};
use super::state::AppState;

/// Reads a request body up to `limit` bytes, answering 413 past it, 415 for a body that does
/// not declare itself JSON, and 408 when it does not arrive within `server.body_timeout_secs`.
pub async fn read_json_body(req: &HttpRequest, payload: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
    if media_type(req).as_deref() != Some("application/json") {
        return Err(ApiError::new(
            actix_web::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as application/json",
        ));
    }
    read_body(req, payload, limit).await
}

/// The request's media type, lowercased, without parameters.
pub fn media_type(req: &HttpRequest) -> Option<String> {
    let content_type = req.headers().get(actix_web::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok())?;
    Some(content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

/// Reads a request body of any media type (the caller checked it) as [`read_json_body`] does.
pub async fn read_body(req: &HttpRequest, mut payload: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
    use futures_util::StreamExt as _;
    let too_large = || {
        ApiError::new(
            actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {limit} bytes"),
        )
    };
    if let Some(length) = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if length > limit {
            return Err(too_large());
        }
    }
    let state = req.app_data::<web::Data<AppState>>();
    let seconds = state.map_or(10, |s| s.config.server.body_timeout_secs);
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    // A client that declares a body and sends none (or a trickle) must not hold the connection.
    match tokio::time::timeout(std::time::Duration::from_secs(seconds), read).await {
        Ok(body) => body,
        Err(_) => {
            if let Some(state) = state {
                state.metrics.http_body_timeouts.inc();
            }
            Err(ApiError::new(
                actix_web::http::StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the request body did not arrive within {seconds} s (server.body_timeout_secs)"),
            ))
        }
    }
}

/// Reads and decodes a JSON request body into `T`: 415/413 as [`read_json_body`], 400 for bytes
/// that are not JSON, 422 with the `invalid` code and the field for JSON of the wrong shape.
pub async fn decode_json_body<T: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
    invalid: &'static str,
) -> Result<T, ApiError> {
    let body = read_json_body(req, payload, limit).await?;
    decode_json(&body, invalid)
}

/// Decodes a JSON body already read into `T`: 400 for bytes that are not JSON (or trailing data
/// after the value), 422 with the `invalid` code and the field for JSON of the wrong shape.
pub fn decode_json<T: serde::de::DeserializeOwned>(body: &[u8], invalid: &'static str) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| error::json_error(e, invalid))?;
    de.end()
        .map_err(|e| ApiError::bad_request("malformed_json", format!("trailing data after the JSON value: {e}")))?;
    Ok(value)
}
