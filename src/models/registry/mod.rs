//! The model registry: one folder per trained version (weights, vocabulary and a manifest written
//! last, so a version with a manifest is complete), and `serving.json` naming the version that
//! serves. The server loads the version named in `model.version` (or the serving one, or the
//! newest) at start-up, and can switch to another one while serving
//! (`POST /v1/admin/models/{name}/activate`).
//!
//! Two places hold it, behind one [`Registry`] handle:
//! - a local folder, `model.registry_dir` (the embedded default);
//! - object storage shared by every instance, `model.registry_url = "s3://bucket/prefix"`
//!   (`remote.rs`): versions upload in parts and download as a stream into a local cache
//!   folder, from which they load like local ones. A version trained on one instance is published
//!   there, and every other instance (one that starts later too) can load it.
//!
//! The handle's methods block (they read files or wait for the object store): call them from a
//! training thread or `spawn_blocking`, not from an actor. Remote calls run on a small runtime
//! the registry owns; [`Registry::record_serving`] is the one method for an actor's thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::artifact::ModelFileError;
use super::sequential::{intern_vocab, SequentialModel};
use crate::catalog::Catalog;
use crate::config::{ModelConfig, RetrievalConfig};
use crate::models::Recommender;

mod error;
mod remote;
mod version;

pub use error::RegistryError;
pub use remote::{install_tls, RegistryUrl};
pub use version::{check_name, Published, VersionInfo, SERVING_FILE};
use version::{manifest_of, version_files, ServingPointer};

/// The model registry (cheap to clone: every clone is the same registry).
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    /// Complete versions as folders: the registry itself when local; with a remote registry,
    /// downloaded versions and new ones waiting to be published.
    dir: PathBuf,
    /// Applied to every loaded model before its index is built, so the model actor keeps it.
    retrieval: RetrievalConfig,
}

enum Backend {
    Local,
    Remote(Box<remote::Remote>),
}

impl std::fmt::Display for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner.backend {
            Backend::Local => {
                write!(f, "{}", std::path::absolute(&self.inner.dir).unwrap_or(self.inner.dir.clone()).display())
            }
            Backend::Remote(remote) => write!(f, "{}", remote.url()),
        }
    }
}

impl Registry {
    /// The registry `config` names: the local folder `registry_dir`, or the object store of
    /// `registry_url` (checked now: a wrong bucket, endpoint or credential is a start-up error).
    pub fn open(config: &ModelConfig) -> Result<Registry, RegistryError> {
        if config.registry_url.is_empty() {
            return Ok(Registry::new(Backend::Local, config.registry_dir.clone(), config.retrieval.clone()));
        }
        let url = RegistryUrl::parse(&config.registry_url)?;
        if config.registry_part_mib < 5 {
            return Err(RegistryError::PartSize(config.registry_part_mib));
        }
        let dir = if config.registry_cache_dir.as_os_str().is_empty() {
            config.registry_dir.clone()
        } else {
            config.registry_cache_dir.clone()
        };
        let remote = remote::Remote::connect(url, config.registry_part_mib << 20)?;
        Ok(Registry::new(Backend::Remote(Box::new(remote)), dir, config.retrieval.clone()))
    }

    /// The local-folder registry in `dir` (a missing folder is an empty registry).
    pub fn local(dir: impl Into<PathBuf>) -> Registry {
        Registry::new(Backend::Local, dir.into(), RetrievalConfig::default())
    }

    fn new(backend: Backend, dir: PathBuf, retrieval: RetrievalConfig) -> Registry {
        Registry { inner: Arc::new(Inner { backend, dir, retrieval }) }
    }

    /// Whether versions live in object storage shared by every instance.
    pub fn is_shared(&self) -> bool {
        matches!(self.inner.backend, Backend::Remote(_))
    }

    /// Where a training run saves a new version (`<staging_dir>/<name>`) before [`Registry::publish`].
    pub fn staging_dir(&self) -> PathBuf {
        self.inner.dir.clone()
    }

    /// Every complete version, oldest first.
    pub fn list(&self) -> Result<Vec<VersionInfo>, RegistryError> {
        let mut versions = match &self.inner.backend {
            Backend::Local => list_dir(&self.inner.dir)?,
            Backend::Remote(remote) => remote.list()?,
        };
        versions.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.name.cmp(&b.name)));
        Ok(versions)
    }

    /// The name of version `wanted` ("latest": the serving one, else the newest).
    pub fn resolve(&self, wanted: &str) -> Result<String, RegistryError> {
        if wanted == "latest" {
            if let Some(name) = self.serving() {
                return Ok(name);
            }
            let newest = self.list()?.pop().ok_or_else(|| RegistryError::Empty(self.to_string()))?;
            return Ok(newest.name);
        }
        check_name(wanted)?;
        if !self.exists(wanted)? {
            return Err(RegistryError::NotFound { location: self.to_string(), name: wanted.to_owned() });
        }
        Ok(wanted.to_owned())
    }

    fn exists(&self, name: &str) -> Result<bool, RegistryError> {
        match &self.inner.backend {
            Backend::Local => Ok(manifest_of(&self.inner.dir.join(name)).is_some()),
            Backend::Remote(remote) => remote.exists(name),
        }
    }

    /// A local folder holding version `name` complete (downloaded into the cache first when the
    /// registry is remote and the cache does not have it).
    pub fn fetch(&self, name: &str) -> Result<PathBuf, RegistryError> {
        check_name(name)?;
        let path = self.inner.dir.join(name);
        match &self.inner.backend {
            Backend::Local => {
                if manifest_of(&path).is_none() {
                    return Err(RegistryError::NotFound { location: self.to_string(), name: name.to_owned() });
                }
            }
            Backend::Remote(remote) => {
                if manifest_of(&path).is_none() {
                    remote.download(name, &self.inner.dir)?;
                }
            }
        }
        Ok(path)
    }

    /// Loads version `name` to serve it: [`Registry::load_whole`], then only what scoring needs
    /// is kept ([`SequentialModel::for_serving`]).
    pub fn load(&self, name: &str, catalog: &Catalog) -> Result<SequentialModel, RegistryError> {
        let mut model = self.load_whole(name, catalog)?;
        model.for_serving(catalog).map_err(ModelFileError::from)?;
        Ok(model)
    }

    /// Loads version `name` with all its weights (to train from it) and puts the items it knows
    /// into the catalogue (with their genres), so that its lists name real catalogue items; then
    /// prepares it (tables, and for a large catalogue the retrieval index), so it serves
    /// two-stage lists from its first request. Takes a moment (seconds at 10^6 items): run it
    /// off the inference thread.
    pub fn load_whole(&self, name: &str, catalog: &Catalog) -> Result<SequentialModel, RegistryError> {
        let path = self.fetch(name)?;
        let model = match SequentialModel::load(&path) {
            Ok((model, _manifest)) => model,
            // A cached copy that no longer matches its digest (a disk fault, a hand edit):
            // download it again once.
            Err(error) if self.is_shared() => {
                tracing::warn!(error = %error, name, "cached model version unreadable; downloading it again");
                std::fs::remove_dir_all(&path).map_err(|e| RegistryError::Cache(path.clone(), e))?;
                SequentialModel::load(&self.fetch(name)?)?.0
            }
            Err(error) => return Err(error.into()),
        };
        let mut model = model;
        intern_vocab(&model.vocab, catalog);
        model.configure_retrieval(&self.inner.retrieval);
        model.prepare(catalog).map_err(ModelFileError::from)?;
        Ok(model)
    }

    /// The version recorded as serving, if any (and if it still exists).
    pub fn serving(&self) -> Option<String> {
        let name = match &self.inner.backend {
            Backend::Local => {
                let text = std::fs::read_to_string(self.inner.dir.join(SERVING_FILE)).ok()?;
                serde_json::from_str::<ServingPointer>(&text).ok()?.name
            }
            Backend::Remote(remote) => match remote.serving() {
                Ok(text) => serde_json::from_slice::<ServingPointer>(&text?).ok()?.name,
                Err(error) => {
                    tracing::warn!(error = %error, "cannot read the serving version from the model registry");
                    return None;
                }
            },
        };
        (check_name(&name).is_ok() && self.exists(&name).unwrap_or(false)).then_some(name)
    }

    /// Records `name` as the serving version (local: a temporary file, then a rename; remote:
    /// one object, which S3 replaces whole).
    pub fn set_serving(&self, name: &str) -> Result<(), RegistryError> {
        check_name(name)?;
        match &self.inner.backend {
            Backend::Local => {
                write_serving(&self.inner.dir, name).map_err(|e| RegistryError::Unreadable(self.inner.dir.clone(), e))
            }
            Backend::Remote(remote) => remote.set_serving(ServingPointer::now(name)),
        }
    }

    /// [`Registry::set_serving`] without waiting, for an actor's thread: local, the small file
    /// is written now; remote, the write is queued behind earlier ones (so the last one
    /// recorded wins) and a failure is logged.
    pub fn record_serving(&self, name: &str) {
        match &self.inner.backend {
            Backend::Local => {
                if let Err(error) = self.set_serving(name) {
                    tracing::error!(error = %error, "cannot record the serving version; a restart may serve another");
                }
            }
            Backend::Remote(remote) => remote.record_serving(ServingPointer::now(name)),
        }
    }

    /// Makes the version saved in `local_dir` available to every instance as `name`: uploaded
    /// to the object store (files in parts, the manifest last) when the registry is remote;
    /// copied into the folder when local and `local_dir` is elsewhere (nothing to do when a
    /// training run saved it in [`Registry::staging_dir`]).
    pub fn publish(&self, local_dir: &Path, name: &str) -> Result<Published, RegistryError> {
        check_name(name)?;
        if manifest_of(local_dir).is_none() {
            return Err(RegistryError::NotFound { location: local_dir.display().to_string(), name: name.to_owned() });
        }
        match &self.inner.backend {
            Backend::Local => {
                let target = self.inner.dir.join(name);
                if same_dir(local_dir, &target) {
                    return Ok(Published::default());
                }
                if target.exists() {
                    return Err(RegistryError::Exists { location: self.to_string(), name: name.to_owned() });
                }
                copy_version(local_dir, &target).map_err(|e| RegistryError::Unreadable(target.clone(), e))
            }
            Backend::Remote(remote) => remote.upload(local_dir, name),
        }
    }
}

/// Every complete version in `dir`. A missing directory is an empty registry.
fn list_dir(dir: &Path) -> Result<Vec<VersionInfo>, RegistryError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(RegistryError::Unreadable(dir.to_owned(), e)),
    };
    Ok(entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let manifest = manifest_of(&e.path())?;
            Some(VersionInfo::from_manifest(e.file_name().to_string_lossy().into_owned(), manifest))
        })
        .collect())
}

fn write_serving(dir: &Path, name: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{SERVING_FILE}.tmp"));
    std::fs::write(&tmp, ServingPointer::now(name))?;
    std::fs::rename(tmp, dir.join(SERVING_FILE))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Copies a version into a local registry: into a hidden folder first, renamed when complete.
fn copy_version(from: &Path, to: &Path) -> std::io::Result<Published> {
    let parent = to.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(".publish-{}-{}", std::process::id(), crate::event::now_ms()));
    std::fs::create_dir_all(&tmp)?;
    let mut published = Published::default();
    let copied = (|| {
        for (file, _) in version_files(from)? {
            published.bytes += std::fs::copy(from.join(&file), tmp.join(&file))?;
            published.files += 1;
            published.parts += 1;
        }
        std::fs::rename(&tmp, to)
    })();
    if copied.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    copied.map(|()| published)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::artifact::MANIFEST_FILE;

    #[test]
    fn an_empty_or_missing_registry_says_how_to_fill_it() {
        let dir = std::env::temp_dir().join(format!("liverec-registry-{}", std::process::id()));
        let registry = Registry::local(&dir);
        assert!(registry.list().expect("missing is empty").is_empty());
        let err = registry.resolve("latest").expect_err("empty");
        assert!(err.to_string().contains("liverec train"), "{err}");
        assert!(matches!(registry.resolve("../etc"), Err(RegistryError::BadName(_))));
        assert!(matches!(registry.resolve("v1"), Err(RegistryError::NotFound { .. })));
        assert!(matches!(registry.fetch(".hidden"), Err(RegistryError::BadName(_))));
        assert_eq!(registry.serving(), None);
        assert!(!registry.is_shared());
    }

    #[test]
    fn version_names_are_single_path_components() {
        for bad in ["", ".", "..", ".cache", "a/b", "a\\b", "/abs", "tab\there"] {
            assert!(matches!(check_name(bad), Err(RegistryError::BadName(_))), "{bad:?} accepted");
        }
        for good in ["demo", "auto-1700000000-3", "v1.2", "sasrec_small"] {
            assert!(check_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn the_manifest_is_the_last_file_of_a_version() {
        let dir = std::env::temp_dir().join(format!("liverec-registry-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for name in [MANIFEST_FILE, "vocab.json", "model.safetensors", ".partial"] {
            std::fs::write(dir.join(name), name).expect("written");
        }
        let files: Vec<String> = version_files(&dir).expect("listed").into_iter().map(|(n, _)| n).collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(files, ["model.safetensors", "vocab.json", MANIFEST_FILE]);
    }

    #[test]
    fn a_local_serving_pointer_names_an_existing_version_only() {
        let dir = std::env::temp_dir().join(format!("liverec-registry-serving-{}", std::process::id()));
        let registry = Registry::local(&dir);
        registry.set_serving("gone").expect("written");
        assert_eq!(registry.serving(), None, "a pointer to a missing version is ignored");
        std::fs::create_dir_all(dir.join("gone")).expect("dir");
        assert!(matches!(registry.set_serving("../x"), Err(RegistryError::BadName(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
