//! Who may do what: API keys with roles, and short-lived per-user stream tokens.
//!
//! - **API keys** are random secrets given to services. The configuration holds only a salted
//!   SHA-256 of each key (`liverec key` prints a new key once, with the entry to configure), never
//!   the key; presented keys are hashed with each entry's salt and compared in constant time.
//!   Roles: `producer` (post events, put items), `reader` (read any user's recommendations and
//!   streams, items), `admin` (everything, including `/v1/admin/*`, `/v1/monitor` and user data).
//! - **Stream tokens** are JWTs signed with HMAC-SHA256 (`HS256`) that name one user (`sub`) and
//!   expire (`exp`). Minted by `POST /v1/admin/tokens` or offline by `liverec token`, they let an
//!   end user's page read that user's recommendations, subscribe to that user's stream, and post
//!   that user's events, nothing else.
//!
//! Nothing here knows HTTP; `http::auth` reads credentials from requests.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use crate::config::{ApiKeyEntry, AuthConfig, AuthMode, Role};

/// Who is asking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// Auth is off: everything is allowed.
    Open,
    /// A configured API key.
    Key { id: String, role: Role },
    /// A stream token for one user.
    User(String),
}

impl Principal {
    /// May use an endpoint that needs `role` (admin may do everything).
    pub fn has(&self, role: Role) -> bool {
        match self {
            Principal::Open => true,
            Principal::Key { role: held, .. } => *held == role || *held == Role::Admin,
            Principal::User(_) => false,
        }
    }

    /// May read `user`'s recommendations and stream.
    pub fn may_read(&self, user: &str) -> bool {
        match self {
            Principal::User(sub) => sub == user,
            other => other.has(Role::Reader),
        }
    }

    /// May post events of `user`.
    pub fn may_produce_for(&self, user: &str) -> bool {
        match self {
            Principal::User(sub) => sub == user,
            other => other.has(Role::Producer),
        }
    }

    /// A short description for logs and error messages (never a secret).
    pub fn describe(&self) -> String {
        match self {
            Principal::Open => "anyone (auth off)".into(),
            Principal::Key { id, role } => format!("key {id} ({role:?})").to_lowercase(),
            Principal::User(_) => "a stream token".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("credentials required: an API key or a stream token (Authorization: Bearer ...)")]
    Missing,
    #[error("unknown API key")]
    UnknownKey,
    #[error("invalid stream token: {0}")]
    BadToken(&'static str),
    #[error("the stream token expired")]
    Expired,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// Says why auth is on and both ways out: a real secret, or auth off for a local trial.
    #[error(
        "auth is on ({why}) and auth.token_secret is shorter than 32 characters: set \
         LIVEREC_AUTH__TOKEN_SECRET to a long random secret, or, for a trial on your own machine, \
         turn auth off with auth.mode = \"off\" (LIVEREC_AUTH__MODE=off)"
    )]
    WeakSecret { why: &'static str },
    #[error("auth.api_keys[{0}]: salt and hash must be hex (as `liverec key` prints them)")]
    BadEntry(usize),
}

type HmacSha256 = Hmac<Sha256>;

/// The checker built from the configuration.
#[derive(Clone)]
pub struct Auth {
    enabled: bool,
    keys: Vec<(ApiKeyEntry, Vec<u8>, [u8; 32])>,
    secret: Vec<u8>,
    pub token_ttl_secs: u64,
    pub max_token_ttl_secs: u64,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("enabled", &self.enabled).field("keys", &self.keys.len()).finish()
    }
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(salt: &[u8], key: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(key.as_bytes());
    hasher.finalize().into()
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Random bytes from the operating system.
pub fn random_bytes(n: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = vec![0; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// A new API key for `role`: the key (shown once) and the entry to configure.
pub fn new_key(id: &str, role: Role) -> std::io::Result<(String, ApiKeyEntry)> {
    let key = format!("lrk_{}", URL_SAFE_NO_PAD.encode(random_bytes(32)?));
    let salt = random_bytes(16)?;
    let hash = hex(&digest(&salt, &key));
    Ok((key, ApiKeyEntry { id: id.to_owned(), role, salt: hex(&salt), hash }))
}

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
}

impl Auth {
    /// Builds the checker; `demo` says whether the embedded demo runs (auth `auto` is off then).
    pub fn new(config: &AuthConfig, demo: bool) -> Result<Auth, AuthConfigError> {
        let enabled = match config.mode {
            AuthMode::On => true,
            AuthMode::Off => false,
            AuthMode::Auto => !demo,
        };
        let mut keys = Vec::new();
        for (i, entry) in config.api_keys.iter().enumerate() {
            let salt = unhex(&entry.salt).ok_or(AuthConfigError::BadEntry(i))?;
            let hash: [u8; 32] =
                unhex(&entry.hash).and_then(|h| h.try_into().ok()).ok_or(AuthConfigError::BadEntry(i))?;
            keys.push((entry.clone(), salt, hash));
        }
        if enabled && config.token_secret.chars().count() < 32 {
            let why = match config.mode {
                AuthMode::Auto => "auth.mode = \"auto\" turns it on outside the demo, and demo.enabled = false",
                _ => "auth.mode = \"on\"",
            };
            return Err(AuthConfigError::WeakSecret { why });
        }
        Ok(Auth {
            enabled,
            keys,
            secret: config.token_secret.as_bytes().to_vec(),
            token_ttl_secs: config.token_ttl_secs,
            max_token_ttl_secs: config.max_token_ttl_secs,
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Who presents `credential` (an API key or a stream token), or `None` when none was given.
    pub fn identify(&self, credential: Option<&str>) -> Result<Principal, AuthError> {
        self.identify_until(credential).map(|(principal, _)| principal)
    }

    /// [`Auth::identify`], with the moment a stream token expires (`None` for everything else):
    /// a stream opened with a token closes then.
    pub fn identify_until(&self, credential: Option<&str>) -> Result<(Principal, Option<SystemTime>), AuthError> {
        if !self.enabled {
            return Ok((Principal::Open, None));
        }
        let credential = credential.map(str::trim).filter(|c| !c.is_empty()).ok_or(AuthError::Missing)?;
        if credential.matches('.').count() == 2 {
            let claims = self.verify_claims(credential)?;
            let expires = UNIX_EPOCH + std::time::Duration::from_secs(claims.exp);
            return Ok((Principal::User(claims.sub), Some(expires)));
        }
        // Every entry is checked, matched or not, so timing does not tell which one matched.
        let mut found = None;
        for (entry, salt, hash) in &self.keys {
            if bool::from(digest(salt, credential).ct_eq(hash)) {
                found = Some(entry);
            }
        }
        found.map(|e| (Principal::Key { id: e.id.clone(), role: e.role }, None)).ok_or(AuthError::UnknownKey)
    }

    /// A stream token for `user`, valid `ttl_secs`.
    pub fn mint(&self, user: &str, ttl_secs: u64) -> String {
        let iat = now_secs();
        let claims = Claims { sub: user.to_owned(), iat, exp: iat + ttl_secs };
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims serialise"));
        let signing_input = format!("{header}.{payload}");
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes keys of any length");
        mac.update(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    /// The user a stream token names, after checking its signature and expiry.
    pub fn verify_token(&self, token: &str) -> Result<String, AuthError> {
        self.verify_claims(token).map(|claims| claims.sub)
    }

    fn verify_claims(&self, token: &str) -> Result<Claims, AuthError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::BadToken("not three dot-separated parts"));
        };
        let header: serde_json::Value = URL_SAFE_NO_PAD
            .decode(header)
            .ok()
            .and_then(|h| serde_json::from_slice(&h).ok())
            .ok_or(AuthError::BadToken("unreadable header"))?;
        if header["alg"] != "HS256" {
            return Err(AuthError::BadToken("only HS256 tokens are accepted"));
        }
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| AuthError::BadToken("unreadable signature"))?;
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes keys of any length");
        mac.update(header_payload(token).as_bytes());
        mac.verify_slice(&signature).map_err(|_| AuthError::BadToken("bad signature"))?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|p| serde_json::from_slice(&p).ok())
            .ok_or(AuthError::BadToken("unreadable claims"))?;
        if claims.exp <= now_secs() {
            return Err(AuthError::Expired);
        }
        Ok(claims)
    }
}

/// `header.payload` of a token (what the signature covers).
fn header_payload(token: &str) -> &str {
    token.rsplit_once('.').map_or(token, |(signed, _)| signed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(keys: Vec<ApiKeyEntry>) -> Auth {
        let config = AuthConfig {
            mode: AuthMode::On,
            api_keys: keys,
            token_secret: "0123456789abcdef0123456789abcdef".into(),
            token_ttl_secs: 60,
            max_token_ttl_secs: 3600,
            allowed_origins: vec![],
        };
        Auth::new(&config, false).expect("valid")
    }

    #[test]
    fn keys_are_checked_against_salted_hashes_with_their_role() {
        let (key, entry) = new_key("ingest", Role::Producer).expect("random");
        assert!(!entry.hash.contains(&key) && entry.salt.len() == 32);
        let auth = auth(vec![entry]);
        let who = auth.identify(Some(&key)).expect("known");
        assert_eq!(who, Principal::Key { id: "ingest".into(), role: Role::Producer });
        assert!(who.has(Role::Producer) && !who.has(Role::Reader) && !who.has(Role::Admin));
        assert_eq!(auth.identify(Some("lrk_wrong")), Err(AuthError::UnknownKey));
        assert_eq!(auth.identify(None), Err(AuthError::Missing));
        let admin = Principal::Key { id: "ops".into(), role: Role::Admin };
        assert!(admin.has(Role::Reader) && admin.may_read("anyone"));
    }

    #[test]
    fn stream_tokens_name_one_user_and_expire() {
        let auth = auth(vec![]);
        let token = auth.mint("alice", 60);
        let who = auth.identify(Some(&token)).expect("valid token");
        assert_eq!(who, Principal::User("alice".into()));
        assert!(who.may_read("alice") && !who.may_read("bob") && !who.has(Role::Reader));
        assert!(who.may_produce_for("alice") && !who.may_produce_for("bob"));
        let (_, expires) = auth.identify_until(Some(&token)).expect("valid token");
        let left = expires.and_then(|at| at.duration_since(SystemTime::now()).ok()).expect("expires in the future");
        assert!(left.as_secs() <= 60, "a token expires when its ttl says: {left:?}");
        // Tampering with the claims breaks the signature.
        let (header, rest) = token.split_once('.').expect("parts");
        let (_, signature) = rest.split_once('.').expect("parts");
        let forged_claims = URL_SAFE_NO_PAD.encode(br#"{"sub":"bob","iat":0,"exp":99999999999}"#);
        let forged = format!("{header}.{forged_claims}.{signature}");
        assert_eq!(auth.verify_token(&forged), Err(AuthError::BadToken("bad signature")));
        assert_eq!(auth.verify_token(&auth.mint("alice", 0)), Err(AuthError::Expired));
        let other = Auth { secret: b"another secret, also 32 characters".to_vec(), ..auth.clone() };
        assert!(other.verify_token(&token).is_err(), "another secret does not verify it");
    }

    #[test]
    fn auto_is_off_in_the_demo_and_a_weak_secret_is_refused() {
        let mut config = AuthConfig {
            mode: AuthMode::Auto,
            api_keys: vec![],
            token_secret: String::new(),
            token_ttl_secs: 60,
            max_token_ttl_secs: 3600,
            allowed_origins: vec![],
        };
        assert!(!Auth::new(&config, true).expect("demo").enabled());
        assert!(matches!(Auth::new(&config, false), Err(AuthConfigError::WeakSecret { .. })));
        config.mode = AuthMode::Off;
        assert_eq!(Auth::new(&config, false).expect("off").identify(None), Ok(Principal::Open));
    }
}
