//! The shared model registry (`model.registry_url = "s3://..."`) against the real S3-compatible
//! store the test command starts (s3proxy, `scripts/services up`, which exports its endpoint and
//! keys as `AWS_*`): a version published on one side is listed and served by another liverec
//! process with an empty cache, a file larger than a part moves in parts and comes back byte for
//! byte, and a wrong bucket or key stops start-up with the setting to check.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use liverec::config::ModelConfig;
use liverec::models::registry::{Registry, RegistryError};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt as _, PutPayload};
use serde_json::Value;

use crate::models::train_version;
use crate::support::*;

/// The test bucket, from the environment `scripts/services up` writes.
fn bucket() -> String {
    std::env::var("LIVEREC_TEST_S3_BUCKET").unwrap_or_else(|_| {
        panic!("LIVEREC_TEST_S3_BUCKET is not set: run the tests with scripts/test, which starts s3proxy (scripts/services up)")
    })
}

/// A fresh folder of this test's own.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(name));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `[model]` of a registry at `url` with its cache in `cache`.
fn model_config(url: &str, cache: &Path, part_mib: usize) -> ModelConfig {
    let mut config = test_config().model;
    config.registry_url = url.to_owned();
    config.registry_dir = cache.to_owned();
    config.registry_part_mib = part_mib;
    config
}

/// A liverec process serving the sequential model of the registry at `url`, with its own cache.
struct Instance {
    _child: KilledOnDrop,
    url: String,
}

impl Instance {
    /// `liverec serve` on `port` with the registry at `registry_url` and its cache in `cache`.
    fn command(registry_url: &str, cache: &Path, port: u16, extra_env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_liverec"));
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("LIVEREC_MODEL__KIND", "sequential")
            .env("LIVEREC_MODEL__REGISTRY_URL", registry_url)
            .env("LIVEREC_MODEL__REGISTRY_DIR", cache)
            .env("LIVEREC_DEMO__ITEMS", "200")
            .env("LIVEREC_DEMO__USERS", "300")
            .env("LIVEREC_LOG__LEVEL", "warn")
            .stdout(Stdio::null());
        for (key, value) in extra_env {
            command.env(key, value);
        }
        command
    }

    fn start(registry_url: &str, cache: &Path) -> Instance {
        let port = free_port();
        let child = Self::command(registry_url, cache, port, &[]).stderr(Stdio::null()).spawn().expect("spawn liverec");
        Instance { _child: KilledOnDrop(child), url: format!("http://127.0.0.1:{port}") }
    }

    async fn models(&self) -> Option<Value> {
        let mut response = client().get(format!("{}/v1/admin/models", self.url)).send().await.ok()?;
        if response.status() != 200 {
            return None;
        }
        response.json::<Value>().limit(16 * 1024 * 1024).await.ok()
    }
}

/// Runs `liverec serve` against `registry_url` with `extra_env`, expecting it to stop at start-up;
/// its stderr.
fn failed_start(registry_url: &str, extra_env: &[(&str, &str)]) -> String {
    let cache = temp_dir("registry-fail");
    let mut child =
        Instance::command(registry_url, &cache, free_port(), extra_env).stderr(Stdio::piped()).spawn().expect("spawn");
    // The start-up check gives up after its retries; a server that starts instead would run on.
    let deadline = std::time::Instant::now() + DEADLINE * 2;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("liverec started with model.registry_url = {registry_url:?} and {extra_env:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut stderr).expect("stderr");
    assert!(!status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "a start-up error, not a panic: {stderr}");
    stderr
}

#[actix_rt::test]
async fn a_version_published_to_the_shared_registry_is_listed_and_served_by_another_process_with_an_empty_cache() {
    let url = format!("s3://{}/{}", bucket(), unique("registry"));
    let publisher_cache = temp_dir("registry-pub");
    let publisher = Registry::open(&model_config(&url, &publisher_cache, 16)).expect("registry reachable");
    assert!(publisher.is_shared());
    assert!(publisher.list().expect("lists").is_empty());

    // Two versions, the older one marked serving: a restart comes back with it, not the newest.
    let staging = publisher.staging_dir();
    let v1 = train_version(&staging, "v1", 1, 1_700_000_000);
    let v2 = train_version(&staging, "v2", 2, 1_700_000_100);
    for name in ["v1", "v2"] {
        let published = publisher.publish(&staging.join(name), name).expect("published");
        assert_eq!(published.files, 3, "weights, vocabulary, manifest: {published:?}");
    }
    publisher.set_serving("v1").expect("serving recorded");
    assert!(matches!(publisher.publish(&staging.join("v1"), "v1"), Err(RegistryError::Exists { .. })));

    // A version whose manifest never arrived (an upload cut short) is not a version.
    let store = AmazonS3Builder::from_env().with_bucket_name(bucket()).build().expect("client");
    let prefix = url.trim_start_matches(&format!("s3://{}/", bucket())).to_owned();
    let partial = ObjectPath::from(format!("{prefix}/partial/model.safetensors"));
    store.put(&partial, PutPayload::from_static(b"half a version")).await.expect("put");

    // Another process, another (empty) cache.
    let cache = temp_dir("registry-sub");
    let instance = Instance::start(&url, &cache);
    let models = eventually("the second process serves", || instance.models()).await;
    assert_eq!(models["serving"], Value::from(v1.clone()), "serving.json names v1: {models}");
    let names: Vec<&str> =
        models["versions"].as_array().expect("versions").iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, ["v1", "v2"], "the partial upload is not listed");
    assert_eq!(models["registry_url"], Value::from(url.clone()));
    assert!(cache.join("v1").join("manifest.json").is_file(), "v1 downloaded into the empty cache");

    // A version switch on the second process downloads v2 as well.
    let mut response = client()
        .post(format!("{}/v1/admin/models/v2/activate", instance.url))
        .insert_header(("content-type", "application/json"))
        .send_body("{}")
        .await
        .expect("activate");
    assert_eq!(response.status(), 200, "{:?}", response.body().await);
    let models = eventually("v2 serves", || async {
        let models = instance.models().await?;
        (models["serving"] == v2.clone()).then_some(models)
    })
    .await;
    assert_eq!(models["serving"], Value::from(v2.clone()));
    assert!(cache.join("v2").join("manifest.json").is_file());
    // The promotion is recorded in the shared registry, for every instance that starts later.
    let serving = eventually("serving.json names v2", || async { (publisher.serving()? == "v2").then_some(()) }).await;
    assert_eq!(serving, ());

    assert!(matches!(publisher.resolve("partial"), Err(RegistryError::NotFound { .. })));
    drop(instance);
    let _ = std::fs::remove_dir_all(&cache);
    let _ = std::fs::remove_dir_all(&publisher_cache);
}

/// `liverec publish` with `env`: (success, stdout, stderr).
fn publish_cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_liverec"));
    command.arg("publish").args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run liverec publish");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

#[actix_rt::test]
async fn liverec_publish_uploads_a_trained_folder_to_the_configured_registry_once() {
    let url = format!("s3://{}/{}", bucket(), unique("publish-cli"));
    let trained = temp_dir("publish-cli-trained");
    train_version(&trained, "offline-v1", 1, 1_700_000_000);
    let folder = trained.join("offline-v1");
    let folder = folder.to_str().expect("utf-8 path");
    let cache = temp_dir("publish-cli-cache");
    let cache = cache.to_str().expect("utf-8 path");
    let env = [("LIVEREC_MODEL__REGISTRY_URL", url.as_str()), ("LIVEREC_MODEL__REGISTRY_DIR", cache)];

    let (ok, out, err) = publish_cli(&["--model", folder, "--name", "nightly-1"], &env);
    assert!(ok, "{out}{err}");
    assert!(out.contains("published nightly-1 to s3://") && out.contains("3 files"), "{out}");
    let reader = Registry::open(&model_config(&url, &temp_dir("publish-cli-reader"), 16)).expect("registry");
    let names: Vec<String> = reader.list().expect("lists").into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["nightly-1"]);

    // Versions are never overwritten; a folder that is not a version is named as such.
    let (ok, _, err) = publish_cli(&["--model", folder, "--name", "nightly-1"], &env);
    assert!(!ok && err.contains("already exists") && err.contains("nightly-1"), "{err}");
    let (ok, _, err) = publish_cli(&["--model", cache], &env);
    assert!(!ok && err.contains(cache), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&trained);
}

#[actix_rt::test]
async fn a_version_the_retraining_loop_trains_is_published_and_a_process_started_later_serves_it() {
    let url = format!("s3://{}/{}", bucket(), unique("registry-loop"));
    let trainer_cache = temp_dir("registry-loop-a");
    let (loop_url, loop_cache) = (url.clone(), trainer_cache.clone());
    let lp = crate::closed_loop::Loop::start("shared-registry", move |config| {
        config.model.registry_url = loop_url;
        config.model.registry_dir = loop_cache;
    })
    .await;
    // Trained from the live window, canaried, promoted by hand (serving.json in the store).
    let version = lp.bootstrap().await;

    let cache = temp_dir("registry-loop-b");
    let instance = Instance::start(&url, &cache);
    let models = eventually("the process started later serves", || instance.models()).await;
    assert_eq!(models["serving"], Value::from(version.clone()), "{models}");
    let name = models["serving_name"].as_str().unwrap_or_default().to_owned();
    assert!(name.starts_with("auto-"), "the loop's version, by its registry name: {models}");
    assert!(cache.join(&name).join("manifest.json").is_file(), "downloaded into the empty cache");
    drop(instance);
    lp.stop().await;
    let _ = std::fs::remove_dir_all(&cache);
    let _ = std::fs::remove_dir_all(&trainer_cache);
}

#[actix_rt::test]
async fn a_file_larger_than_a_part_moves_in_parts_and_comes_back_byte_for_byte() {
    let url = format!("s3://{}/{}", bucket(), unique("registry-parts"));
    let cache = temp_dir("registry-parts-a");
    let registry = Registry::open(&model_config(&url, &cache, 5)).expect("registry reachable");
    let staging = registry.staging_dir();
    let version = train_version(&staging, "big", 3, 1_700_000_000);
    // Eleven and a bit MiB of non-repeating bytes beside the model: three parts of 5 MiB.
    let size = 11 * (1 << 20) + 12_345;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let blob: Vec<u8> = (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(staging.join("big").join("extra.bin"), &blob).expect("written");

    let published = registry.publish(&staging.join("big"), "big").expect("published");
    assert_eq!(published.files, 4);
    assert_eq!(published.parts, 3 + 3, "extra.bin in three parts, the three small files in one each: {published:?}");

    let other_cache = temp_dir("registry-parts-b");
    let other = Registry::open(&model_config(&url, &other_cache, 5)).expect("registry reachable");
    let fetched = other.fetch("big").expect("downloaded");
    assert_eq!(fetched, other_cache.join("big"));
    let back = std::fs::read(fetched.join("extra.bin")).expect("read");
    assert_eq!(back.len(), blob.len());
    assert!(back == blob, "the downloaded file differs from the uploaded one");
    for file in ["model.safetensors", "vocab.json", "manifest.json"] {
        assert_eq!(
            std::fs::read(fetched.join(file)).expect("read"),
            std::fs::read(staging.join("big").join(file)).expect("read"),
            "{file}"
        );
    }
    let catalog = liverec::catalog::Catalog::new();
    let model = other.load("big", &catalog).expect("loads from the cache");
    assert_eq!(liverec::models::Recommender::version(&model), version);
    let _ = std::fs::remove_dir_all(&cache);
    let _ = std::fs::remove_dir_all(&other_cache);
}

#[actix_rt::test]
async fn a_wrong_bucket_or_key_stops_start_up_with_the_setting_to_check() {
    let missing = format!("s3://no-such-bucket-{}/models", std::process::id());
    let error = Registry::open(&model_config(&missing, &temp_dir("registry-missing"), 16))
        .err()
        .expect("a missing bucket is refused")
        .to_string();
    assert!(error.contains("model.registry_url") && error.contains("bucket does not exist"), "{error}");

    let stderr = failed_start(&missing, &[]);
    assert!(stderr.contains("model.registry_url") && stderr.contains("bucket does not exist"), "{stderr}");

    let url = format!("s3://{}/models", bucket());
    let stderr = failed_start(&url, &[("AWS_SECRET_ACCESS_KEY", "not-the-secret")]);
    assert!(stderr.contains("AWS_SECRET_ACCESS_KEY"), "{stderr}");

    let stderr = failed_start("models", &[]);
    assert!(stderr.contains("model.registry_url") && stderr.contains("s3://bucket/prefix"), "{stderr}");
}
