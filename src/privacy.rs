//! Optional pseudonymisation: with `privacy.pseudonymize = true`, every user id is replaced, as
//! it enters (REST and WebSocket bodies, paths, Kafka records, stream tokens), by
//! `u_` + the first 32 hex digits of HMAC-SHA-256(`privacy.salt`, id). Only pseudonyms reach the
//! session, the profile store, the event log, the monitor and the logs; the same id always maps
//! to the same pseudonym, so clients keep using their own ids.
//!
//! Every id that enters is mapped, including one that already has a pseudonym's shape (`u_` and
//! 32 lowercase hex digits): taking such an id as it is would let anyone who learns alice's
//! pseudonym (from a log, a token, the store) read and post as alice by sending it as a raw id.
//! The one place an id is already liverec's own is a record liverec itself produced to Kafka; it
//! carries the `liverec-pseudonymized` header and the consumer keeps its id
//! ([`crate::bus::kafka::PSEUDONYMIZED_HEADER`]).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::PrivacyConfig;
use crate::event::UserId;

#[derive(Debug, thiserror::Error)]
#[error("privacy.salt must be at least 32 characters when privacy.pseudonymize is on")]
pub struct WeakSalt;

/// Maps user ids to what liverec stores.
#[derive(Clone, Default)]
pub struct Pseudonyms {
    key: Option<Vec<u8>>,
}

impl std::fmt::Debug for Pseudonyms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pseudonyms").field("on", &self.key.is_some()).finish()
    }
}

#[cfg(test)]
fn is_pseudonym(id: &str) -> bool {
    id.len() == 34 && id.starts_with("u_") && id[2..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Pseudonyms {
    pub fn new(config: &PrivacyConfig) -> Result<Pseudonyms, WeakSalt> {
        if !config.pseudonymize {
            return Ok(Pseudonyms { key: None });
        }
        if config.salt.chars().count() < 32 {
            return Err(WeakSalt);
        }
        Ok(Pseudonyms { key: Some(config.salt.as_bytes().to_vec()) })
    }

    /// The id liverec keeps for `raw`.
    pub fn user(&self, raw: &str) -> UserId {
        match &self.key {
            Some(key) => {
                let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
                mac.update(raw.as_bytes());
                let digest = mac.finalize().into_bytes();
                let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
                UserId::from(format!("u_{hex}").as_str())
            }
            None => UserId::from(raw),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_stable_and_keyed() {
        let config =
            |on: bool, salt: &str| PrivacyConfig { pseudonymize: on, salt: salt.into(), tombstone_ttl_secs: 0 };
        let on = |salt: &str| Pseudonyms::new(&config(true, salt)).expect("on");
        let (a, b) = (on("a secret salt of thirty-two chars"), on("another salt, also 32 characters"));
        let p = a.user("alice@example.com");
        assert!(is_pseudonym(p.as_str()) && !p.as_str().contains("alice"), "{p:?}");
        assert_eq!(a.user("alice@example.com"), p, "stable");
        assert_ne!(b.user("alice@example.com"), p, "keyed by the salt");
        assert!(is_pseudonym(a.user(p.as_str()).as_str()));
        assert_ne!(a.user(p.as_str()), p, "an id shaped like a pseudonym is mapped too");
        let off = Pseudonyms::new(&config(false, "")).expect("off");
        assert_eq!(off.user("alice").as_str(), "alice");
        assert!(Pseudonyms::new(&config(true, "short")).is_err());
    }
}
