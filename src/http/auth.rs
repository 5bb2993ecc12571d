//! Credentials on requests: `Authorization: Bearer <API key or stream token>`, `X-Api-Key`, or
//! `?access_token=` (for `EventSource` and WebSocket clients in browsers, which cannot set
//! headers: a stream token on a GET only, never an API key). Handlers take a [`Caller`] and ask it
//! what they need; see `crate::auth`.

use std::future::{ready, Ready};
use std::time::SystemTime;

use actix_web::http::{header, Method, StatusCode};
use actix_web::{dev::Payload, web, FromRequest, HttpRequest};

use super::error::ApiError;
use super::state::AppState;
use crate::auth::{AuthError, Principal, Role};
use crate::event::{Event, UserId};

/// Who is calling, established from the request's credentials.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    /// When the stream token presented expires (`None` for API keys and with auth off): a
    /// stream opened with it closes then.
    pub expires: Option<SystemTime>,
}

/// Where a request's credential came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `Authorization` or `X-Api-Key`.
    Header,
    /// `?access_token=`: only for stream tokens on GET (browsers' `EventSource` and WebSocket).
    Query,
}

/// The credential a request presents, if any.
pub fn credential(req: &HttpRequest) -> Option<String> {
    credential_with_source(req).map(|(credential, _)| credential)
}

/// The credential a request presents, and where.
pub fn credential_with_source(req: &HttpRequest) -> Option<(String, Source)> {
    let headers = req.headers();
    if let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return Some((value.strip_prefix("Bearer ").unwrap_or(value).to_owned(), Source::Header));
    }
    if let Some(value) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some((value.to_owned(), Source::Header));
    }
    req.query_string()
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token="))
        .map(|token| (token.to_owned(), Source::Query))
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", error.to_string())
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        let Some(state) = req.app_data::<web::Data<AppState>>() else {
            return ready(Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "server state missing")));
        };
        ready(identify(req, state))
    }
}

fn identify(req: &HttpRequest, state: &AppState) -> Result<Caller, ApiError> {
    let presented = credential_with_source(req);
    let (principal, expires) = state.auth.identify_until(presented.as_ref().map(|(c, _)| c.as_str()))?;
    // A query string ends up in logs, browser history and Referer headers: only a short-lived
    // stream token may travel there, and only to read.
    if presented.is_some_and(|(_, source)| source == Source::Query) {
        match principal {
            Principal::Key { .. } => {
                return Err(unauthorized(
                    "API keys are not accepted in ?access_token=; send them in the Authorization or X-Api-Key header",
                ))
            }
            Principal::User(_) if req.method() != Method::GET => return Err(unauthorized(
                "?access_token= is accepted only on GET requests (streams); send the token in the Authorization header",
            )),
            _ => {}
        }
    }
    let principal = match principal {
        // The token names the user as the client knows them; liverec may keep a pseudonym.
        Principal::User(sub) => Principal::User(state.pseudonyms.user(&sub).to_string()),
        other => other,
    };
    Ok(Caller { principal, expires })
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

impl Caller {
    /// Whether the stream token presented has expired since the request was made.
    pub fn expired(&self) -> bool {
        self.expires.is_some_and(|at| SystemTime::now() >= at)
    }

    /// Allowed only with `role` (or admin).
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.principal.has(role) {
            Ok(())
        } else {
            Err(forbidden(
                format!("{} may not do this; it needs the {role:?} role", self.principal.describe()).to_lowercase(),
            ))
        }
    }

    /// Allowed to read `user`'s recommendations and stream.
    pub fn read(&self, user: &UserId) -> Result<(), ApiError> {
        if self.principal.may_read(user.as_str()) {
            Ok(())
        } else {
            Err(forbidden(format!("{} may not read this user's recommendations", self.principal.describe())))
        }
    }

    /// Allowed to post every one of `events`.
    pub fn produce(&self, events: &[Event]) -> Result<(), ApiError> {
        match events.iter().position(|e| !self.principal.may_produce_for(e.user_id.as_str())) {
            None => Ok(()),
            Some(i) => Err(forbidden(format!("{} may not post events of this user", self.principal.describe()))
                .with_field(format!("[{i}].user_id"))),
        }
    }
}
