//! The `[auth]` and `[privacy]` sections: who may do what, and what is kept of whom.

use serde::{Deserialize, Serialize};

/// Settings of the `[auth]` config section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `auto`: on, except in the embedded demo (`demo.enabled`); `on`; `off`.
    pub mode: AuthMode,
    /// Configured keys (salted hashes only).
    pub api_keys: Vec<ApiKeyEntry>,
    /// Secret that signs stream tokens (at least 32 characters); required when auth is on.
    pub token_secret: String,
    /// Lifetime of minted stream tokens, and the longest one may ask for.
    pub token_ttl_secs: u64,
    pub max_token_ttl_secs: u64,
    /// Browser origins allowed to open WebSockets and to call the API cross-origin (CORS):
    /// `"*"`: any; empty: the server's own pages only.
    pub allowed_origins: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    Auto,
    On,
    Off,
}

/// One API key as configured: `liverec key --role ROLE` prints one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    /// A name for logs and rotation (not secret).
    pub id: String,
    pub role: Role,
    /// Hex salt, and hex SHA-256 of salt bytes followed by the key.
    pub salt: String,
    pub hash: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Producer,
    Reader,
    Admin,
}

/// Settings of the `[privacy]` config section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    pub pseudonymize: bool,
    /// The secret key of the pseudonyms (at least 32 characters when on). Changing it changes
    /// every pseudonym: stored profiles no longer match their users.
    pub salt: String,
    /// How long an erased user's tombstone is kept (0: forever).
    pub tombstone_ttl_secs: u64,
}
