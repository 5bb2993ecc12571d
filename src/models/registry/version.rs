//! What a version is, wherever the registry keeps it: its name, its files (the manifest last),
//! what a listing shows of it, and the serving pointer.

use std::path::Path;

use serde::Serialize;

use super::error::RegistryError;
use crate::models::artifact::{Manifest, MANIFEST_FILE};

/// One version in the registry.
#[derive(Clone, Debug, Serialize)]
pub struct VersionInfo {
    /// Directory name inside the registry.
    pub name: String,
    /// The version reported with every list (`sasrec-<created>-<digest>`).
    pub version: String,
    pub created_at: String,
    /// Offline metrics recorded at training time (test and validation NDCG@10 and others).
    pub metrics: serde_json::Value,
}

impl VersionInfo {
    pub(super) fn from_manifest(name: String, manifest: Manifest) -> Self {
        VersionInfo {
            name,
            version: manifest.version,
            created_at: manifest.created_at,
            metrics: serde_json::to_value(&manifest.metrics).unwrap_or_default(),
        }
    }
}

/// What [`Registry::publish`] moved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    pub files: usize,
    pub bytes: u64,
    /// Requests that carried data: one per small file, one per part of a large one.
    pub parts: usize,
}

/// The file naming the version that serves (written on every promotion and rollback), so a
/// restart with `model.version = "latest"` comes back with what was serving, not with the
/// newest version (which may be a canary that was rolled back).
pub const SERVING_FILE: &str = "serving.json";

/// What `serving.json` holds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct ServingPointer {
    /// The version's directory name.
    pub(super) name: String,
    /// When it started serving (RFC 3339).
    since: String,
}

impl ServingPointer {
    pub(super) fn now(name: &str) -> String {
        let pointer = ServingPointer {
            name: name.to_owned(),
            since: crate::models::artifact::rfc3339(crate::event::now_ms() / 1000),
        };
        serde_json::to_string(&pointer).expect("two strings always serialise")
    }
}

/// Version names are single path components: no separators, nothing hidden or relative.
pub fn check_name(name: &str) -> Result<(), RegistryError> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') || name.chars().any(char::is_control) {
        return Err(RegistryError::BadName(name.to_owned()));
    }
    Ok(())
}

pub(super) fn manifest_of(path: &Path) -> Option<Manifest> {
    let text = std::fs::read_to_string(path.join(MANIFEST_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The files of a version, the manifest last (it marks the version complete).
pub(super) fn version_files(dir: &Path) -> std::io::Result<Vec<(String, u64)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if meta.is_file() && !name.starts_with('.') {
            files.push((name, meta.len()));
        }
    }
    files.sort_by_key(|(name, _)| (name == MANIFEST_FILE, name.clone()));
    Ok(files)
}
