//! `ControlApplier`: makes this instance serve the desired serving state that the loop's leader
//! publishes on the control topic (see `crate::cluster`). Every instance runs one, the leader's
//! included, so the leader changes what serves exactly as the others do.
//!
//! Applying is idempotent: the applier remembers what it made serve (the control version and the
//! challenger, with its share and salt) and changes only what differs. A challenger that becomes
//! the control version is promoted in place (`EndChallenger { promote: true }`); any other version
//! is loaded from the registry off the actor threads (`spawn_blocking`) and swapped in between
//! two inference batches. The models it takes out of service are kept (the last two), so a
//! rollback to what served before is instant, and the online model (which has no registry name)
//! comes back as it was here; without a kept one, a fresh online model serves.
//!
//! Not an actor: the control topic's consumer calls [`ControlApplier::apply`] for each newest
//! record, one at a time, on the cluster's thread. It then tells the trainer what serves
//! ([`ControlApplied`]), so the loop's view and a new leader start from the applied state. A
//! state it could not apply whole (a version the registry cannot give yet) is tried again by the
//! caller after a backoff, until it applies or a newer record replaces it.

use std::sync::Arc;

use actix::prelude::*;

use super::model::{EndChallenger, ModelFactory, ModelHandle, StartChallenger, SwapModel};
use crate::catalog::Catalog;
use crate::cluster::record::{ChallengerState, DesiredState, ServingVersion};
use crate::models::registry::Registry;
use crate::models::Recommender;

/// Models taken out of service kept for an instant rollback.
const KEPT: usize = 2;

/// The desired state `state` is now what serves here (as far as it could be loaded: `serving` is
/// the control version actually serving).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ControlApplied {
    pub state: DesiredState,
    pub serving: ServingVersion,
}

/// Applies desired states to this instance's model actor (see the module docs).
pub struct ControlApplier {
    model: ModelHandle,
    registry: Registry,
    catalog: Arc<Catalog>,
    /// Builds a fresh online model when one must serve and none is kept.
    online: ModelFactory,
    /// What serves now.
    control: ServingVersion,
    challenger: Option<ChallengerState>,
    kept: Vec<(ServingVersion, Box<dyn Recommender>)>,
    /// The trainer, told of every state applied.
    applied: Recipient<ControlApplied>,
}

impl ControlApplier {
    /// `serving` is the version the instance started with.
    pub fn new(
        model: ModelHandle,
        registry: Registry,
        catalog: Arc<Catalog>,
        online: ModelFactory,
        serving: ServingVersion,
        applied: Recipient<ControlApplied>,
    ) -> Self {
        Self { model, registry, catalog, online, control: serving, challenger: None, kept: Vec::new(), applied }
    }

    fn keep(&mut self, version: ServingVersion, model: Box<dyn Recommender>) {
        self.kept.retain(|(kept, _)| *kept != version);
        self.kept.push((version, model));
        if self.kept.len() > KEPT {
            self.kept.remove(0);
        }
    }

    /// A kept model of `wanted`, or the version loaded from the registry, or a fresh online model.
    async fn obtain(&mut self, wanted: &ServingVersion) -> Result<Box<dyn Recommender>, String> {
        if let Some(at) = self.kept.iter().position(|(kept, _)| kept == wanted) {
            return Ok(self.kept.remove(at).1);
        }
        let Some(name) = wanted.name.clone() else {
            return Ok((self.online)());
        };
        let (registry, catalog) = (self.registry.clone(), self.catalog.clone());
        let loaded = tokio::task::spawn_blocking(move || registry.load(&name, &catalog))
            .await
            .map_err(|e| format!("loading stopped: {e}"))?
            .map_err(|e| e.to_string())?;
        if loaded.version() != wanted.version {
            tracing::warn!(
                name = ?wanted.name,
                wanted = %wanted.version,
                found = %loaded.version(),
                "the registry's version differs from the control record's; serving the registry's"
            );
        }
        Ok(Box::new(loaded))
    }

    /// Makes `state` serve here; changes only what differs from what serves. Returns whether all
    /// of it serves now (false when a version could not be loaded: the caller tries again).
    pub async fn apply(&mut self, state: DesiredState) -> bool {
        if self.control != state.control {
            let promoted = self.challenger.as_ref().is_some_and(|c| {
                state.control.name.as_deref() == Some(c.name.as_str()) && state.control.version == c.version
            });
            if promoted {
                if let Ok(Some(old)) = self.model.send(EndChallenger { promote: true }).await {
                    let version = self.control.clone();
                    self.keep(version, old);
                }
                self.challenger = None;
                self.control = state.control.clone();
                tracing::info!(version = %state.control.version, "control record applied: challenger promoted");
            } else {
                match self.obtain(&state.control).await {
                    Ok(model) => {
                        if let Ok(Some(old)) = self.model.send(SwapModel { model }).await {
                            let version = self.control.clone();
                            self.keep(version, old);
                        }
                        self.control = state.control.clone();
                        tracing::info!(version = %state.control.version, "control record applied: version swapped in");
                    }
                    Err(error) => tracing::error!(
                        error = %error,
                        name = ?state.control.name,
                        "cannot load the version the control record names; the one serving goes on"
                    ),
                }
            }
        }
        if self.challenger != state.challenger {
            match &state.challenger {
                None => {
                    if let Ok(Some(old)) = self.model.send(EndChallenger { promote: false }).await {
                        if let Some(ended) = self.challenger.take() {
                            self.keep(ServingVersion { name: Some(ended.name), version: ended.version }, old);
                        }
                    }
                    self.challenger = None;
                    tracing::info!("control record applied: challenger stopped");
                }
                Some(wanted) => {
                    let version = ServingVersion { name: Some(wanted.name.clone()), version: wanted.version.clone() };
                    match self.obtain(&version).await {
                        Ok(model) => {
                            let start = StartChallenger {
                                model,
                                variant: Arc::from(wanted.variant.as_str()),
                                control_variant: Arc::from(wanted.control_variant.as_str()),
                                share: wanted.share,
                                salt: wanted.salt,
                            };
                            if self.model.send(start).await.is_ok() {
                                self.challenger = Some(wanted.clone());
                                tracing::info!(version = %wanted.version, share = wanted.share, "control record applied: challenger serving");
                            }
                        }
                        Err(error) => tracing::error!(
                            error = %error,
                            name = %wanted.name,
                            "cannot load the challenger the control record names"
                        ),
                    }
                }
            }
        }
        let complete = self.control == state.control && self.challenger == state.challenger;
        let serving = self.control.clone();
        let _ = self.applied.send(ControlApplied { state, serving }).await;
        complete
    }
}
