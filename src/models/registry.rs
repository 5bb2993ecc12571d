//! The model registry: a folder with one sub-directory per trained version (weights, vocabulary
//! and a manifest written last, so a sub-directory with a manifest is complete). The server loads
//! the version named in `model.version` (or the newest) at start-up, and can switch to another
//! one while serving (`POST /v1/admin/models/{name}/activate`).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::artifact::{Manifest, ModelFileError, MANIFEST_FILE};
use super::sequential::{intern_vocab, SequentialModel};
use crate::catalog::Catalog;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("model registry {0} cannot be read: {1}")]
    Unreadable(PathBuf, std::io::Error),
    #[error("no model version in {0}; train one with `liverec train --data DIR --out {0}/<name>`")]
    Empty(PathBuf),
    #[error("no model version named {name:?} in {dir}")]
    NotFound { dir: PathBuf, name: String },
    #[error("model version names are plain directory names, not {0:?}")]
    BadName(String),
    #[error(transparent)]
    File(#[from] ModelFileError),
}

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

fn manifest_of(path: &Path) -> Option<Manifest> {
    let text = std::fs::read_to_string(path.join(MANIFEST_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Every complete version in `dir`, oldest first. A missing directory is an empty registry.
pub fn list(dir: &Path) -> Result<Vec<VersionInfo>, RegistryError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(RegistryError::Unreadable(dir.to_owned(), e)),
    };
    let mut versions: Vec<VersionInfo> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let manifest = manifest_of(&e.path())?;
            Some(VersionInfo {
                name: e.file_name().to_string_lossy().into_owned(),
                version: manifest.version,
                created_at: manifest.created_at,
                metrics: serde_json::to_value(&manifest.metrics).unwrap_or_default(),
            })
        })
        .collect();
    versions.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.name.cmp(&b.name)));
    Ok(versions)
}

/// The directory of version `wanted` ("latest": the newest).
pub fn resolve(dir: &Path, wanted: &str) -> Result<PathBuf, RegistryError> {
    if wanted == "latest" {
        if let Some(name) = serving(dir) {
            return Ok(dir.join(name));
        }
        let newest = list(dir)?.pop().ok_or_else(|| RegistryError::Empty(dir.to_owned()))?;
        return Ok(dir.join(newest.name));
    }
    if wanted.is_empty() || wanted.contains(['/', '\\']) || wanted.starts_with('.') {
        return Err(RegistryError::BadName(wanted.to_owned()));
    }
    let path = dir.join(wanted);
    if manifest_of(&path).is_none() {
        return Err(RegistryError::NotFound { dir: dir.to_owned(), name: wanted.to_owned() });
    }
    Ok(path)
}

/// The file naming the version that serves (written on every promotion and rollback), so a
/// restart with `model.version = "latest"` comes back with what was serving, not with the
/// newest directory (which may be a canary that was rolled back).
pub const SERVING_FILE: &str = "serving.json";

/// What `serving.json` holds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ServingPointer {
    /// The version's directory name.
    name: String,
    /// When it started serving (RFC 3339).
    since: String,
}

/// The version recorded as serving, if any (and if it still exists).
pub fn serving(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(SERVING_FILE)).ok()?;
    let pointer: ServingPointer = serde_json::from_str(&text).ok()?;
    manifest_of(&dir.join(&pointer.name)).is_some().then_some(pointer.name)
}

/// Records `name` as the serving version (write to a temporary file, then rename).
pub fn set_serving(dir: &Path, name: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{SERVING_FILE}.tmp"));
    let pointer =
        ServingPointer { name: name.to_owned(), since: super::artifact::rfc3339(crate::event::now_ms() / 1000) };
    std::fs::write(&tmp, serde_json::to_string(&pointer).expect("two strings always serialise"))?;
    std::fs::rename(tmp, dir.join(SERVING_FILE))
}

/// Loads a version and puts the items it knows into the catalogue (with their genres), so that
/// its lists name real catalogue items. Runs off the inference thread: loading takes a moment.
pub fn load(path: &Path, catalog: &Catalog) -> Result<SequentialModel, RegistryError> {
    let (model, _manifest) = SequentialModel::load(path)?;
    intern_vocab(&model.vocab, catalog);
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_or_missing_registry_says_how_to_fill_it() {
        let dir = std::env::temp_dir().join(format!("liverec-registry-{}", std::process::id()));
        assert!(list(&dir).expect("missing is empty").is_empty());
        let err = resolve(&dir, "latest").expect_err("empty");
        assert!(err.to_string().contains("liverec train"), "{err}");
        assert!(matches!(resolve(&dir, "../etc"), Err(RegistryError::BadName(_))));
        assert!(matches!(resolve(&dir, "v1"), Err(RegistryError::NotFound { .. })));
        assert_eq!(serving(&dir), None);
    }
}
