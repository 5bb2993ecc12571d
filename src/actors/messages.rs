//! Messages exchanged by several actors.

use std::sync::Arc;
use std::time::Instant;

use actix::Message;

use crate::event::{Device, Event, ItemId};
use crate::recs::RecUpdate;
use crate::store::{Persisted, Profile};

/// Why a session could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    #[error("the recommendation model is unavailable")]
    ModelUnavailable,
    #[error("the session stopped")]
    Stopped,
}

/// Events for one user, applied in order. Answers once they are applied in memory, with a
/// future that resolves when they are durable in the profile store.
#[derive(Message, Debug)]
#[rtype(result = "Applied")]
pub struct ApplyEvents {
    pub events: Vec<Event>,
    /// When the server received the events (for event-to-push latency).
    pub received: Instant,
    /// The span that received them (HTTP or Kafka): applying continues its trace.
    pub span: tracing::Span,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub applied: usize,
    pub duplicates: usize,
}

/// What a session answers to events: what it applied, and when that is durable.
pub struct Applied {
    pub outcome: ApplyOutcome,
    pub persisted: Persisted,
}

impl std::fmt::Debug for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applied").field("outcome", &self.outcome).finish_non_exhaustive()
    }
}

/// Filters a client may put on a recommendation request.
#[derive(Debug, Clone, Default)]
pub struct RecFilters {
    pub exclude: Vec<ItemId>,
    pub categories: Vec<String>,
    pub device: Option<Device>,
}

impl RecFilters {
    pub fn is_empty(&self) -> bool {
        self.exclude.is_empty() && self.categories.is_empty() && self.device.is_none()
    }
}

/// A list for the user, computed now with `filters`. Unfiltered requests of the default length
/// also become the user's pushed list when they have none yet.
#[derive(Message, Debug)]
#[rtype(result = "Result<Arc<RecUpdate>, SessionError>")]
pub struct GetRecommendations {
    pub k: usize,
    pub filters: RecFilters,
}

/// A subscriber attached: make sure the user has a current list to show.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct EnsureList {
    /// Push a fresh list even if there is one (production mode: a watch appeared on another
    /// instance, and the lists pushed while nobody watched were neither stored nor published).
    pub fresh: bool,
}

/// Everything the session holds, as stored.
#[derive(Message, Debug)]
#[rtype(result = "Profile")]
pub struct Snapshot;

/// Hands over the whole history and forgets it (the anonymous side of a merge). The session stops.
#[derive(Message, Debug)]
#[rtype(result = "Profile")]
pub struct TakeHistory;

/// Folds another profile's history into this user's (the known side of a merge), then pushes.
#[derive(Message, Debug)]
#[rtype(result = "Applied")]
pub struct MergeHistory {
    pub from: Profile,
}

/// Stop now (the user's partition moved to another instance); pending writes are already queued.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Release;

/// Stop if nothing asked for the session for `ttl` and no list is being scored for it: the
/// registry's idle sweep sends it to sessions whose user has been quiet that long.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct StopIfIdle {
    pub ttl: std::time::Duration,
}

/// Rebuild from the store and push: the stored profile changed elsewhere (a merge).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Reload;

/// A list another instance served the user (production mode, a `GET` answered from the store):
/// counted here, by the owner, as an impression, and remembered so a click on it is attributed.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ShownElsewhere(pub std::sync::Arc<crate::recs::RecUpdate>);
