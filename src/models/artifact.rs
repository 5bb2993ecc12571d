//! The saved form of a sequential model, shared by training, the demo, retraining and serving:
//! the three files of a model directory (safetensors weights, `vocab.json`, `manifest.json`),
//! the manifest with its data window and metrics, the vocabulary and cold-start priors, and
//! writing and reading a version. Nothing here runs the network: [`super::sequential`] turns
//! weights into a model and back.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::data::{hex, Dataset, Interaction, Layout};
use super::metrics::Metrics;
use super::sasrec::{age_bucket, gender_index, Config, SasRecError};
use crate::event::{Context, Device as DeviceClass};

/// File names inside a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const VOCAB_FILE: &str = "vocab.json";
/// Format tag in the manifest; bumped when the saved form changes incompatibly.
pub const FORMAT: &str = "liverec-sasrec/1";

#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: unsupported model format {found:?} (expected {FORMAT:?})")]
    Format { path: PathBuf, found: String },
    #[error("weights digest {found} does not match the manifest's {expected}")]
    Digest { expected: String, found: String },
    #[error(transparent)]
    Model(#[from] SasRecError),
}

impl From<candle_core::Error> for ModelFileError {
    fn from(error: candle_core::Error) -> Self {
        Self::Model(SasRecError::Candle(error))
    }
}

/// The three files of a model directory, in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedModel {
    /// `model.safetensors`
    pub weights: Vec<u8>,
    /// `vocab.json`
    pub vocab: String,
    /// `manifest.json`
    pub manifest: String,
}

/// How the model is served: the cold-start blend and negative feedback.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// History length at which model and popularity weigh the same (see the module docs).
    pub blend_history: f32,
    /// Pseudo-counts of global popularity added to each context segment's counts.
    pub segment_prior: f32,
    /// How strongly items similar to disliked ones are lowered (0 turns it off).
    pub negative_weight: f32,
    /// How often unseen catalogue items' attribute vectors are refreshed.
    pub cold_refresh_secs: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self { blend_history: 1.0, segment_prior: 50.0, negative_weight: 0.5, cold_refresh_secs: 10 }
    }
}

/// Item popularity in the training data, for cold start.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Popularity {
    /// Interactions per model item (index 0 is item 1).
    pub global: Vec<f32>,
    /// `[segment][item]` interactions per context segment.
    pub by_segment: Vec<Vec<f32>>,
}

/// The model's vocabulary and priors: everything derived from data rather than learned.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Vocab {
    /// Raw item ids; model item `i + 1` is `items[i]`.
    pub items: Vec<String>,
    /// Genre indices per item (parallel to `items`).
    pub item_genres: Vec<Vec<u16>>,
    /// Release year per item (parallel to `items`).
    pub item_years: Vec<Option<u16>>,
    pub genres: Vec<String>,
    /// Occupation names; occupation index `i + 1` is `occupations[i]`, 0 is unknown.
    pub occupations: Vec<String>,
    pub popularity: Popularity,
}

impl Vocab {
    /// The vocabulary of a dataset, with popularity counted over `train` (per user, as the
    /// split holds it).
    pub fn from_dataset(dataset: &Dataset, train: &[Vec<Interaction>]) -> Vocab {
        let mut occupations: Vec<String> = dataset.users.iter().filter_map(|u| u.occupation.clone()).collect();
        occupations.sort();
        occupations.dedup();
        let n = dataset.items.len();
        let mut global = vec![0f32; n];
        let mut by_segment = vec![vec![0f32; n]; Context::SEGMENTS];
        for i in train.iter().flatten() {
            global[i.item as usize] += 1.0;
            let seg = super::sasrec::segment_at(i.timestamp * 1000, DeviceClass::Other);
            by_segment[seg as usize][i.item as usize] += 1.0;
        }
        Vocab {
            items: dataset.items.iter().map(|i| i.id.clone()).collect(),
            item_genres: dataset.items.iter().map(|i| i.genres.clone()).collect(),
            item_years: dataset.items.iter().map(|i| i.year).collect(),
            genres: dataset.genres.clone(),
            occupations,
            popularity: Popularity { global, by_segment },
        }
    }

    /// Demographic features `[gender, age bucket, occupation]` of a dataset user.
    pub fn user_features(&self, user: &super::data::UserInfo) -> [u32; 3] {
        let occupation =
            user.occupation.as_ref().and_then(|o| self.occupations.binary_search(o).ok()).map_or(0, |i| i as u32 + 1);
        [gender_index(user.gender.as_deref()), age_bucket(user.age), occupation]
    }
}

/// Where the training data came from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataWindow {
    pub source: String,
    pub layout: Option<Layout>,
    pub users: usize,
    pub items: usize,
    pub interactions: usize,
    pub train_interactions: usize,
    /// First and last interaction time (seconds since the epoch).
    pub first_timestamp: Option<i64>,
    pub last_timestamp: Option<i64>,
    pub split: String,
    /// Events per partition of the events topic, when the window was read from Kafka
    /// (manifests written before, or from the in-memory log, have none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionEvents>,
    /// Records of the window that were not trained on, by reason (Kafka windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<SkippedEvents>,
}

/// One partition's part of a training window read from the events topic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionEvents {
    pub partition: i32,
    /// The first offset of the window (the first record at or after its start).
    pub from_offset: i64,
    /// The partition's high watermark when the window was read: the window ends before it.
    pub end_offset: i64,
    /// Events kept for training (before negative feedback is set aside).
    pub events: usize,
}

/// Records of a Kafka training window that were not trained on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedEvents {
    /// Records the ingest sends to the dead-letter topic.
    pub invalid: usize,
    /// Repeated event ids of a user (applied once).
    pub duplicates: usize,
    /// Events of erased users dated at or before their erasure.
    pub erased: usize,
    /// The oldest events beyond `trainer.max_events`.
    pub trimmed: usize,
}

/// Validation and test metrics at save time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SavedMetrics {
    pub valid: Option<Metrics>,
    pub test: Option<Metrics>,
}

/// How training went.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    pub seed: u64,
    pub epochs_run: usize,
    /// The middle of `selected_epochs`.
    pub best_epoch: usize,
    /// The epochs whose weights were kept (averaged, or the middle one's; see `train.select_window`).
    #[serde(default)]
    pub selected_epochs: Vec<usize>,
    /// Mean seconds of an epoch's training steps (without its validation pass).
    #[serde(default)]
    pub seconds_per_epoch: f64,
    /// Seconds spent in validation passes, all epochs together.
    #[serde(default)]
    pub eval_seconds: f64,
    /// The whole run: set-up, epochs, validation passes.
    pub seconds: f64,
    /// Candle's AdamW state is not saved; a warm start from these weights restarts the moments.
    pub optimizer_state_saved: bool,
    /// The training settings, as given (a `TrainConfig` serialised).
    pub settings: serde_json::Value,
}

/// `manifest.json`: what a model directory holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// Reported with every list the model produces: `sasrec-<created>-<weights digest>`.
    pub version: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub config: Config,
    pub serve: ServeConfig,
    pub data: DataWindow,
    pub metrics: SavedMetrics,
    pub training: TrainingSummary,
    /// SHA-256 of the weights file.
    pub weights_sha256: String,
}

/// RFC 3339 (UTC, seconds) of a time in seconds since the epoch.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Serialising the two JSON files through one closure.
mod erased {
    pub trait Json {
        fn to_json(&self) -> Result<String, serde_json::Error>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Result<String, serde_json::Error> {
            serde_json::to_string_pretty(self)
        }
    }
}

impl SavedModel {
    /// The saved form of `weights` (safetensors bytes) and `vocab`. Fills in the manifest's
    /// format, weights digest and version (`sasrec-<created_at digits>-<digest prefix>`); the
    /// caller has set the rest.
    pub fn new(weights: Vec<u8>, vocab: &Vocab, manifest: &mut Manifest) -> Result<Self, ModelFileError> {
        manifest.format = FORMAT.to_owned();
        manifest.weights_sha256 = hex(&Sha256::digest(&weights));
        let stamp: String = manifest.created_at.chars().filter(|c| c.is_ascii_digit()).collect();
        manifest.version = format!("sasrec-{stamp}-{}", &manifest.weights_sha256[..8]);
        let json = |value: &dyn erased::Json, name: &str| {
            value.to_json().map_err(|source| ModelFileError::Json { path: PathBuf::from(name), source })
        };
        Ok(SavedModel { weights, vocab: json(vocab, VOCAB_FILE)?, manifest: json(manifest, MANIFEST_FILE)? })
    }

    /// The manifest and vocabulary, checking the format and the weights digest.
    pub fn open(&self) -> Result<(Manifest, Vocab), ModelFileError> {
        let manifest: Manifest = serde_json::from_str(&self.manifest)
            .map_err(|source| ModelFileError::Json { path: PathBuf::from(MANIFEST_FILE), source })?;
        if manifest.format != FORMAT {
            return Err(ModelFileError::Format { path: PathBuf::from(MANIFEST_FILE), found: manifest.format });
        }
        let digest = hex(&Sha256::digest(&self.weights));
        if digest != manifest.weights_sha256 {
            return Err(ModelFileError::Digest { expected: manifest.weights_sha256, found: digest });
        }
        let vocab: Vocab = serde_json::from_str(&self.vocab)
            .map_err(|source| ModelFileError::Json { path: PathBuf::from(VOCAB_FILE), source })?;
        Ok((manifest, vocab))
    }

    /// Writes the three files into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> Result<(), ModelFileError> {
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, bytes).map_err(|source| ModelFileError::Io { path, source })
        };
        std::fs::create_dir_all(dir).map_err(|source| ModelFileError::Io { path: dir.to_owned(), source })?;
        write(WEIGHTS_FILE, &self.weights)?;
        write(VOCAB_FILE, self.vocab.as_bytes())?;
        // The manifest last: a directory with a manifest is complete.
        write(MANIFEST_FILE, self.manifest.as_bytes())
    }

    /// Reads a model directory written by [`SavedModel::write`].
    pub fn read(dir: &Path) -> Result<Self, ModelFileError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| ModelFileError::Io { path, source })
        };
        let text =
            |name: &str| -> Result<String, ModelFileError> { Ok(String::from_utf8_lossy(&read(name)?).into_owned()) };
        Ok(SavedModel { weights: read(WEIGHTS_FILE)?, vocab: text(VOCAB_FILE)?, manifest: text(MANIFEST_FILE)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_window_without_partitions_still_loads_and_one_with_them_round_trips() {
        // The data window of a manifest written before windows were read from Kafka.
        let old = r#"{"source":"liverec event log, last 3600 s (run 1)","layout":null,"users":20,"items":10,
            "interactions":100,"train_interactions":60,"first_timestamp":1000,"last_timestamp":1005,
            "split":"leave-one-out on the window; gate on the last interaction"}"#;
        let window: DataWindow = serde_json::from_str(old).expect("an old data window loads");
        assert_eq!((window.users, window.partitions.len(), window.skipped.is_none()), (20, 0, true));
        assert!(!serde_json::to_string(&window).expect("json").contains("partitions"), "nothing new is written");
        let window = DataWindow {
            partitions: vec![PartitionEvents { partition: 3, from_offset: 7, end_offset: 19, events: 12 }],
            skipped: Some(SkippedEvents { erased: 6, ..SkippedEvents::default() }),
            ..window
        };
        let json = serde_json::to_string(&window).expect("json");
        assert_eq!(serde_json::from_str::<DataWindow>(&json).expect("loads"), window);
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
