//! What can go wrong with the registry, each error naming the setting or the version concerned.

use std::path::PathBuf;

use crate::models::artifact::ModelFileError;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("model registry {0} cannot be read: {1}")]
    Unreadable(PathBuf, std::io::Error),
    #[error(
        "no model version in {0}; train one with `liverec train --data DIR --out <folder>/<name>` into a local \
         registry, or let the retraining loop publish one"
    )]
    Empty(String),
    #[error("no model version named {name:?} in {location}")]
    NotFound { location: String, name: String },
    #[error("model version names are plain directory names, not {0:?}")]
    BadName(String),
    #[error("model version {name:?} already exists in {location}; versions are never overwritten")]
    Exists { location: String, name: String },
    #[error(transparent)]
    File(#[from] ModelFileError),
    #[error("model.registry_url = {url:?}: {why}")]
    BadUrl { url: String, why: String },
    /// The object store refused or could not be reached; `hint` names the setting to check.
    #[error("model registry {url} (model.registry_url): cannot {action}: {source}; {hint}")]
    Store { url: String, action: String, hint: &'static str, source: Box<object_store::Error> },
    #[error("model registry cache {0} (model.registry_cache_dir): {1}")]
    Cache(PathBuf, std::io::Error),
    #[error("model.registry_part_mib = {0}: parts of a multipart upload are at least 5 MiB (S3's smallest part)")]
    PartSize(usize),
    #[error("cannot start the model registry's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the model registry's runtime stopped")]
    Stopped,
}
