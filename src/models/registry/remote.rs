//! The registry in object storage (`model.registry_url = "s3://bucket/prefix"`), through the
//! `object_store` crate: `<prefix>/<name>/<file>` for each file of a version, the manifest
//! uploaded last (so a version is complete, and listed, only once its manifest is there), and
//! `<prefix>/serving.json`. Endpoint, region and credentials come from the standard `AWS_*`
//! environment variables (`AWS_ENDPOINT`, `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`...).
//!
//! Model files reach hundreds of MB at 10^6 items, so none moves in one message: a file larger
//! than a part uploads as a multipart upload (`model.registry_part_mib` per part, two parts in
//! flight), and a download streams into a file of the local cache.
//!
//! Every call runs on a small runtime of the registry's own (two threads); the blocking methods
//! wait for it with a plain executor, so they never start a runtime inside another one.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::error::RegistryError;
use super::version::{check_name, version_files, Published, VersionInfo, SERVING_FILE};
use crate::models::artifact::{Manifest, MANIFEST_FILE};

/// Parts of one multipart upload in flight at once (memory: this many parts plus one).
const PARTS_IN_FLIGHT: usize = 2;
/// How long a listing of the versions is answered again before the store is asked anew.
const LIST_FRESH: Duration = Duration::from_secs(1);

/// Installs ring as rustls' process-wide crypto provider (once). reqwest is built without a
/// provider of its own (aws-lc-rs would compile a large C library), so every TLS client in the
/// process (the registry's, the OTLP exporter's) needs this before it is built.
pub fn install_tls() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: another provider was installed first, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// `s3://bucket/prefix`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryUrl {
    pub bucket: String,
    /// Without leading or trailing slashes; empty for the bucket's root.
    pub prefix: String,
}

impl RegistryUrl {
    pub fn parse(url: &str) -> Result<RegistryUrl, RegistryError> {
        let bad = |why: &str| RegistryError::BadUrl { url: url.to_owned(), why: why.to_owned() };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("expected s3://bucket/prefix (or \"\" for the local folder model.registry_dir)"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !bucket_ok {
            return Err(bad("the bucket name has 3 to 63 lowercase letters, digits, '-' and '.'"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|part| part == "." || part == "..") || prefix.contains("//") {
            return Err(bad("the prefix is a plain path (no empty, '.' or '..' parts)"));
        }
        Ok(RegistryUrl { bucket: bucket.to_owned(), prefix: prefix.to_owned() })
    }

    fn root(&self) -> ObjectPath {
        ObjectPath::from(self.prefix.as_str())
    }

    /// `<prefix>/<name>`, the folder of a version.
    fn version(&self, name: &str) -> ObjectPath {
        self.root().join(name)
    }
}

impl std::fmt::Display for RegistryUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.prefix.as_str() {
            "" => write!(f, "s3://{}", self.bucket),
            prefix => write!(f, "s3://{}/{prefix}", self.bucket),
        }
    }
}

/// What to check when the store says no, from what it said.
fn hint(error: &object_store::Error) -> &'static str {
    let text = format!("{error:?} {error}");
    if text.contains("NoSuchBucket") {
        "the bucket does not exist: check the bucket in model.registry_url (and the endpoint in AWS_ENDPOINT)"
    } else if matches!(
        error,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) || ["InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403 Forbidden"]
        .iter()
        .any(|s| text.contains(s))
    {
        "the credentials were refused: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    } else if text.contains("builder error") || text.contains("URL scheme is not allowed") {
        "the HTTP client refused the endpoint: an http:// AWS_ENDPOINT needs AWS_ALLOW_HTTP=true"
    } else if ["error sending request", "Connection refused", "connect", "dns error"].iter().any(|s| text.contains(s)) {
        "the endpoint cannot be reached: check AWS_ENDPOINT (and AWS_ALLOW_HTTP=true for an http:// endpoint)"
    } else if matches!(error, object_store::Error::NotFound { .. }) {
        "not found: check the bucket in model.registry_url and the endpoint in AWS_ENDPOINT"
    } else {
        "check model.registry_url and the AWS_ENDPOINT, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY environment variables"
    }
}

/// A connected remote registry.
pub(super) struct Remote {
    url: RegistryUrl,
    store: Arc<AmazonS3>,
    part_size: usize,
    /// Taken on drop to shut it down without waiting (a drop may happen on an async thread).
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    /// Versions already listed (a version never changes once its manifest is up).
    known: Mutex<HashMap<String, VersionInfo>>,
    /// The last listing and when it was taken (see [`LIST_FRESH`]); held while listing, so
    /// callers at the same moment share one `LIST` request.
    listed: Mutex<Option<(Instant, Vec<VersionInfo>)>>,
    /// Serving pointers recorded from actors' threads, written in order by one task.
    serving_tx: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Remote {
    /// Builds the client from `AWS_*` and lists the prefix once: a wrong bucket, endpoint or
    /// credential fails here, at start-up, with the setting to check.
    pub(super) fn connect(url: RegistryUrl, part_size: usize) -> Result<Remote, RegistryError> {
        install_tls();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("liverec-registry")
            .enable_all()
            .build()
            .map_err(RegistryError::Runtime)?;
        // No limit on a whole request (a download of hundreds of MB streams for a while), but a
        // connection that goes quiet for a minute fails, and is retried.
        let options = ClientOptions::new()
            .with_timeout_disabled()
            .with_read_timeout(Duration::from_secs(60))
            .with_connect_timeout(Duration::from_secs(5));
        let retry = RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(60), ..RetryConfig::default() };
        let mut builder = AmazonS3Builder::new().with_client_options(options).with_retry(retry);
        // As `AmazonS3Builder::from_env`, over the options above (so AWS_* may override them).
        for (key, value) in std::env::vars() {
            if key.starts_with("AWS_") {
                if let Ok(config_key) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                    builder = builder.with_config(config_key, value);
                }
            }
        }
        let store = builder.with_bucket_name(&url.bucket).build().map_err(|source| RegistryError::Store {
            url: url.to_string(),
            action: "configure the client".into(),
            hint: hint(&source),
            source: Box::new(source),
        })?;
        let (serving_tx, serving_rx) = tokio::sync::mpsc::unbounded_channel();
        let remote = Remote {
            store: Arc::new(store),
            part_size,
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            known: Mutex::new(HashMap::new()),
            listed: Mutex::new(None),
            serving_tx,
            url,
        };
        remote.handle.spawn(write_serving_pointers(
            remote.store.clone(),
            remote.serving_path(),
            serving_rx,
            remote.url.to_string(),
        ));
        let (store, root) = (remote.store.clone(), remote.url.root());
        remote
            .run(async move { store.list_with_delimiter(Some(&root)).await })?
            .map_err(|source| remote.error("list the bucket", source))?;
        tracing::info!(url = %remote.url, part_mib = part_size >> 20, "model registry reachable");
        Ok(remote)
    }

    pub(super) fn url(&self) -> &RegistryUrl {
        &self.url
    }

    fn error(&self, action: impl Into<String>, source: object_store::Error) -> RegistryError {
        RegistryError::Store {
            url: self.url.to_string(),
            action: action.into(),
            hint: hint(&source),
            source: Box::new(source),
        }
    }

    fn serving_path(&self) -> ObjectPath {
        self.url.root().join(SERVING_FILE)
    }

    /// Runs `future` on the registry's runtime and waits for it.
    fn run<T: Send + 'static>(&self, future: impl Future<Output = T> + Send + 'static) -> Result<T, RegistryError> {
        futures_executor::block_on(self.handle.spawn(future)).map_err(|_| RegistryError::Stopped)
    }

    /// Every complete version: the folders under the prefix with a manifest. A listing younger
    /// than [`LIST_FRESH`] is answered again (`GET /v1/admin/models` polled by dashboards on every
    /// instance would otherwise send the store one `LIST` per call); this instance's own uploads
    /// show at once, other instances' within that time.
    pub(super) fn list(&self) -> Result<Vec<VersionInfo>, RegistryError> {
        let mut listed = self.listed.lock();
        if let Some((at, versions)) = listed.as_ref().filter(|(at, _)| at.elapsed() < LIST_FRESH) {
            tracing::trace!(age = ?at.elapsed(), "model versions listed from the last listing");
            return Ok(versions.clone());
        }
        let versions = self.list_now()?;
        *listed = Some((Instant::now(), versions.clone()));
        Ok(versions)
    }

    fn list_now(&self) -> Result<Vec<VersionInfo>, RegistryError> {
        let (store, root) = (self.store.clone(), self.url.root());
        let objects = self
            .run(async move { store.list(Some(&root)).try_collect::<Vec<_>>().await })?
            .map_err(|source| self.error("list versions", source))?;
        let root = self.url.root();
        let names: Vec<String> = objects
            .iter()
            .filter_map(|meta| {
                let parts: Vec<_> = meta.location.prefix_match(&root)?.collect();
                match parts.as_slice() {
                    [name, file] if file.as_ref() == MANIFEST_FILE => Some(name.as_ref().to_owned()),
                    _ => None,
                }
            })
            .filter(|name| check_name(name).is_ok())
            .collect();
        let mut versions = Vec::with_capacity(names.len());
        for name in names {
            if let Some(info) = self.known.lock().get(&name) {
                versions.push(info.clone());
                continue;
            }
            match self.manifest(&name) {
                Ok(Some(manifest)) => {
                    let info = VersionInfo::from_manifest(name.clone(), manifest);
                    self.known.lock().insert(name, info.clone());
                    versions.push(info);
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(error = %error, name, "model version manifest unreadable; not listed"),
            }
        }
        Ok(versions)
    }

    fn manifest(&self, name: &str) -> Result<Option<Manifest>, RegistryError> {
        let (store, path) = (self.store.clone(), self.url.version(name).join(MANIFEST_FILE));
        match self.run(async move { store.get(&path).await?.bytes().await })? {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(self.error(format!("read the manifest of {name}"), source)),
        }
    }

    /// Whether version `name` is complete (its manifest is up).
    pub(super) fn exists(&self, name: &str) -> Result<bool, RegistryError> {
        if self.known.lock().contains_key(name) {
            return Ok(true);
        }
        let (store, path) = (self.store.clone(), self.url.version(name).join(MANIFEST_FILE));
        match self.run(async move { store.head(&path).await })? {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(self.error(format!("look for version {name}"), source)),
        }
    }

    /// The bytes of `serving.json`, if there is one.
    pub(super) fn serving(&self) -> Result<Option<Vec<u8>>, RegistryError> {
        let (store, path) = (self.store.clone(), self.serving_path());
        match self.run(async move { store.get(&path).await?.bytes().await })? {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(self.error("read serving.json", source)),
        }
    }

    pub(super) fn set_serving(&self, pointer: String) -> Result<(), RegistryError> {
        let (store, path) = (self.store.clone(), self.serving_path());
        self.run(async move { store.put(&path, PutPayload::from(pointer)).await })?
            .map_err(|source| self.error("write serving.json", source))?;
        Ok(())
    }

    pub(super) fn record_serving(&self, pointer: String) {
        if self.serving_tx.send(pointer).is_err() {
            tracing::error!("the model registry stopped; the serving version was not recorded");
        }
    }

    /// Downloads version `name` into `cache/<name>`: each file streamed into a hidden folder,
    /// which is renamed once complete (so the cache never holds half a version).
    pub(super) fn download(&self, name: &str, cache: &Path) -> Result<(), RegistryError> {
        let started = Instant::now();
        let (store, folder) = (self.store.clone(), self.url.version(name));
        let listed = self
            .run(async move { store.list(Some(&folder)).try_collect::<Vec<_>>().await })?
            .map_err(|source| self.error(format!("list the files of {name}"), source))?;
        let folder = self.url.version(name);
        let mut files: Vec<(String, u64)> = listed
            .iter()
            .filter_map(|meta| {
                let parts: Vec<_> = meta.location.prefix_match(&folder)?.collect();
                match parts.as_slice() {
                    [file] => Some((file.as_ref().to_owned(), meta.size)),
                    _ => None,
                }
            })
            .collect();
        if !files.iter().any(|(file, _)| file == MANIFEST_FILE) {
            return Err(RegistryError::NotFound { location: self.url.to_string(), name: name.to_owned() });
        }
        files.sort_by_key(|(file, _)| (file == MANIFEST_FILE, file.clone()));
        let tmp = cache.join(format!(".download-{name}-{}-{}", std::process::id(), crate::event::now_ms()));
        std::fs::create_dir_all(&tmp).map_err(|e| RegistryError::Cache(tmp.clone(), e))?;
        let mut bytes = 0;
        for (file, size) in &files {
            let (store, from, to) = (self.store.clone(), folder.clone().join(file.as_str()), tmp.join(file));
            let written = self.run(stream_to_file(store, from, to.clone()))?;
            let written = match written {
                Ok(n) if n == *size => n,
                Ok(n) => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    let error = std::io::Error::other(format!("{file}: {n} bytes received, {size} listed"));
                    return Err(RegistryError::Cache(to, error));
                }
                Err(Fault::Store(source)) => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(self.error(format!("download {name}/{file}"), source));
                }
                Err(Fault::Io(error)) => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(RegistryError::Cache(to, error));
                }
            };
            bytes += written;
        }
        let target = cache.join(name);
        if let Err(error) = std::fs::rename(&tmp, &target) {
            let _ = std::fs::remove_dir_all(&tmp);
            // Another process of this host may have downloaded it meanwhile.
            if !target.join(MANIFEST_FILE).is_file() {
                return Err(RegistryError::Cache(target, error));
            }
        }
        tracing::info!(
            name,
            files = files.len(),
            bytes,
            seconds = started.elapsed().as_secs_f64(),
            "model version downloaded from the registry"
        );
        Ok(())
    }

    /// Uploads the version in `dir` as `name`: small files in one request, larger ones in parts,
    /// the manifest last. Refuses a name already taken.
    pub(super) fn upload(&self, dir: &Path, name: &str) -> Result<Published, RegistryError> {
        if self.exists(name)? {
            return Err(RegistryError::Exists { location: self.url.to_string(), name: name.to_owned() });
        }
        let started = Instant::now();
        let files = version_files(dir).map_err(|e| RegistryError::Unreadable(dir.to_owned(), e))?;
        let mut published = Published::default();
        for (file, size) in files {
            let (store, to, from) = (self.store.clone(), self.url.version(name).join(file.as_str()), dir.join(&file));
            let parts = match self.run(upload_file(store, from.clone(), to, size, self.part_size))? {
                Ok(parts) => parts,
                Err(Fault::Store(source)) => return Err(self.error(format!("upload {name}/{file}"), source)),
                Err(Fault::Io(error)) => return Err(RegistryError::Unreadable(from, error)),
            };
            published.files += 1;
            published.bytes += size;
            published.parts += parts;
        }
        tracing::info!(
            name,
            url = %self.url,
            files = published.files,
            bytes = published.bytes,
            parts = published.parts,
            seconds = started.elapsed().as_secs_f64(),
            "model version published to the registry"
        );
        *self.listed.lock() = None;
        Ok(published)
    }
}

/// A transfer failed at the store or at the local file.
enum Fault {
    Store(object_store::Error),
    Io(std::io::Error),
}

impl From<object_store::Error> for Fault {
    fn from(error: object_store::Error) -> Self {
        Fault::Store(error)
    }
}

impl From<std::io::Error> for Fault {
    fn from(error: std::io::Error) -> Self {
        Fault::Io(error)
    }
}

/// Streams object `from` into file `to`; the bytes written.
async fn stream_to_file(store: Arc<AmazonS3>, from: ObjectPath, to: PathBuf) -> Result<u64, Fault> {
    let mut stream = store.get(&from).await?.into_stream();
    let mut file = tokio::fs::File::create(&to).await?;
    let mut written = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        file.write_all(&chunk).await?;
        written += chunk.len() as u64;
    }
    file.sync_all().await?;
    Ok(written)
}

/// Uploads file `from` as object `to`; the requests that carried data.
async fn upload_file(
    store: Arc<AmazonS3>,
    from: PathBuf,
    to: ObjectPath,
    size: u64,
    part_size: usize,
) -> Result<usize, Fault> {
    let mut file = tokio::fs::File::open(&from).await?;
    if size <= part_size as u64 {
        let mut bytes = Vec::with_capacity(size as usize);
        file.read_to_end(&mut bytes).await?;
        store.put(&to, PutPayload::from(bytes)).await?;
        return Ok(1);
    }
    let mut writer = WriteMultipart::new_with_chunk_size(store.put_multipart(&to).await?, part_size);
    let mut parts = 0;
    let result: Result<(), Fault> = async {
        loop {
            writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
            let part = read_part(&mut file, part_size).await?;
            if part.is_empty() {
                return Ok(());
            }
            parts += 1;
            writer.put(part);
        }
    }
    .await;
    match result {
        Ok(()) => {
            writer.finish().await?;
            Ok(parts)
        }
        Err(error) => {
            let _ = writer.abort().await;
            Err(error)
        }
    }
}

/// Up to `size` bytes of `file` (fewer only at its end).
async fn read_part(file: &mut tokio::fs::File, size: usize) -> std::io::Result<Bytes> {
    let mut buf = vec![0u8; size];
    let mut filled = 0;
    while filled < size {
        match file.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    buf.truncate(filled);
    Ok(Bytes::from(buf))
}

/// Writes the serving pointers recorded by actors, one after the other.
async fn write_serving_pointers(
    store: Arc<AmazonS3>,
    path: ObjectPath,
    mut pointers: tokio::sync::mpsc::UnboundedReceiver<String>,
    url: String,
) {
    while let Some(pointer) = pointers.recv().await {
        if let Err(error) = store.put(&path, PutPayload::from(pointer)).await {
            tracing::error!(error = %error, url, "cannot record the serving version; a restart may serve another");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_urls_name_a_bucket_and_a_prefix() {
        let url = RegistryUrl::parse("s3://models-bucket/liverec/prod/").expect("valid");
        assert_eq!(url, RegistryUrl { bucket: "models-bucket".into(), prefix: "liverec/prod".into() });
        assert_eq!(url.to_string(), "s3://models-bucket/liverec/prod");
        assert_eq!(url.version("auto-1-2").join(MANIFEST_FILE).as_ref(), "liverec/prod/auto-1-2/manifest.json");
        let root = RegistryUrl::parse("s3://bucket").expect("valid");
        assert_eq!(root.prefix, "");
        assert_eq!(root.version("v1").join(MANIFEST_FILE).as_ref(), "v1/manifest.json");
        assert_eq!(root.to_string(), "s3://bucket");
    }

    #[test]
    fn a_bad_registry_url_names_the_key_and_what_is_wrong() {
        for (url, why) in [
            ("models", "s3://bucket/prefix"),
            ("https://host/bucket", "s3://bucket/prefix"),
            ("s3://", "bucket name"),
            ("s3://Upper/x", "bucket name"),
            ("s3://ab/x", "bucket name"),
            ("s3://bucket/a/../b", "prefix"),
            ("s3://bucket/a//b", "prefix"),
        ] {
            let error = RegistryUrl::parse(url).expect_err(url).to_string();
            assert!(error.starts_with("model.registry_url = "), "{error}");
            assert!(error.contains(why), "{url}: {error}");
        }
    }
}
