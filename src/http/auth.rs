//! Credentials on requests: `Authorization: Bearer <API key or stream token>`, `X-Api-Key`, or
//! `?access_token=` (for `EventSource` and WebSocket clients in browsers, which cannot set
//! headers). Handlers take a [`Caller`] and ask it what they need; see `crate::auth`.

use std::future::{ready, Ready};

use actix_web::http::{header, StatusCode};
use actix_web::{dev::Payload, web, FromRequest, HttpRequest};

use super::error::ApiError;
use super::state::AppState;
use crate::auth::{AuthError, Principal, Role};
use crate::event::{Event, UserId};

/// Who is calling, established from the request's credentials.
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

/// The credential a request presents, if any.
pub fn credential(req: &HttpRequest) -> Option<String> {
    let headers = req.headers();
    if let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return Some(value.strip_prefix("Bearer ").unwrap_or(value).to_owned());
    }
    if let Some(value) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(value.to_owned());
    }
    req.query_string().split('&').find_map(|pair| pair.strip_prefix("access_token=")).map(str::to_owned)
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", error.to_string())
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        let Some(state) = req.app_data::<web::Data<AppState>>() else {
            return ready(Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "server state missing")));
        };
        let principal = state.auth.identify(credential(req).as_deref()).map(|who| match who {
            // The token names the user as the client knows them; liverec may keep a pseudonym.
            Principal::User(sub) => Principal::User(state.pseudonyms.user(&sub).to_string()),
            other => other,
        });
        ready(principal.map(Caller).map_err(ApiError::from))
    }
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

impl Caller {
    /// Allowed only with `role` (or admin).
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.0.has(role) {
            Ok(())
        } else {
            Err(forbidden(format!("{} may not do this; it needs the {role:?} role", self.0.describe()).to_lowercase()))
        }
    }

    /// Allowed to read `user`'s recommendations and stream.
    pub fn read(&self, user: &UserId) -> Result<(), ApiError> {
        if self.0.may_read(user.as_str()) {
            Ok(())
        } else {
            Err(forbidden(format!("{} may not read this user's recommendations", self.0.describe())))
        }
    }

    /// Allowed to post every one of `events`.
    pub fn produce(&self, events: &[Event]) -> Result<(), ApiError> {
        match events.iter().position(|e| !self.0.may_produce_for(e.user_id.as_str())) {
            None => Ok(()),
            Some(i) => Err(forbidden(format!("{} may not post events of this user", self.0.describe()))
                .with_field(format!("[{i}].user_id"))),
        }
    }
}
