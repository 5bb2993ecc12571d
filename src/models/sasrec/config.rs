//! The network's configuration, its error type, and the buckets its inputs are mapped to
//! (release year, age, gender, feedback, hour and context segment).

use serde::{Deserialize, Serialize};

use crate::event::{hour_and_weekday, Context, Device as DeviceClass};
/// Buckets of release year (see [`year_bucket`]).
pub const YEAR_BUCKETS: usize = 50;
/// Buckets of user age (see [`age_bucket`]).
pub const AGE_BUCKETS: usize = 8;
/// Unknown, male, female.
pub const GENDERS: usize = 3;
/// Padding, rating 1..=5, any other positive interaction.
pub const FEEDBACK: usize = 7;
/// Additive attention mask for keys that must not be attended to. Finite, so that a row with no
/// visible key (a padding query) gives a uniform softmax rather than NaN.
pub(super) const MASKED: f32 = -1e9;

#[derive(Debug, thiserror::Error)]
pub enum SasRecError {
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("invalid model configuration: {0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, SasRecError>;

/// Which side information the network uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Features {
    /// Item genres (categories) in the item table.
    pub genres: bool,
    /// Item release-year bucket in the item table.
    pub year: bool,
    /// Hour-of-day bucket of each history event.
    pub hour: bool,
    /// Rating value (or "implicit") of each history event.
    pub feedback: bool,
    /// The request's context segment, added to the query.
    pub context: bool,
    /// The user's demographic segment, added to the query.
    pub user: bool,
    /// A learned per-item output bias.
    pub item_bias: bool,
    /// A learned position embedding (counted from the newest item); off, the network sees
    /// order only through the causal mask.
    pub position: bool,
}

impl Default for Features {
    fn default() -> Self {
        Self {
            genres: true,
            year: true,
            hour: true,
            feedback: true,
            context: true,
            user: true,
            item_bias: true,
            position: true,
        }
    }
}

/// Shape of the network. `items`, `genres` and `occupations` are filled in from the training
/// data; the rest come from the config file (or these defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Items in the vocabulary (index 0 is padding, items are 1..=items).
    pub items: usize,
    /// Genre (category) names known to the item table.
    pub genres: usize,
    /// Occupation names known to the user embedding (index 0 is unknown).
    pub occupations: usize,
    /// Width of every embedding and hidden state.
    pub hidden: usize,
    /// Self-attention blocks.
    pub layers: usize,
    /// Attention heads per block (must divide `hidden`).
    pub heads: usize,
    /// Width of the feed-forward layer.
    pub inner: usize,
    /// Most recent history items the network reads.
    pub max_len: usize,
    /// Dropout on embeddings and residual branches during training.
    pub dropout: f32,
    /// Dropout on attention weights during training.
    pub attention_dropout: f32,
    pub features: Features,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            items: 0,
            genres: 0,
            occupations: 0,
            hidden: 64,
            layers: 1,
            heads: 2,
            inner: 256,
            max_len: 50,
            dropout: 0.2,
            attention_dropout: 0.0,
            features: Features::default(),
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(SasRecError::Config(m.to_owned()));
        if self.hidden == 0 || self.heads == 0 || !self.hidden.is_multiple_of(self.heads) {
            return bad("hidden must be a positive multiple of heads");
        }
        if self.layers == 0 || self.max_len == 0 || self.inner == 0 {
            return bad("layers, max_len and inner must be positive");
        }
        if !(0.0..1.0).contains(&self.dropout) || !(0.0..1.0).contains(&self.attention_dropout) {
            return bad("dropout and attention_dropout must be in [0, 1)");
        }
        Ok(())
    }
}

/// Bucket of a release year: unknown, before 1940, decades to 1979, half-decades in the 1980s,
/// then one bucket per year from 1990 (where MovieLens has most of its items) to 2030; later
/// years share the 2030 bucket.
pub fn year_bucket(year: Option<u16>) -> u32 {
    match year {
        None => 0,
        Some(y) if y < 1940 => 1,
        Some(y) if y < 1980 => 2 + u32::from((y - 1940) / 10),
        Some(y) if y < 1990 => 6 + u32::from((y - 1980) / 5),
        Some(y) => (8 + u32::from(y.min(2030) - 1990)).min(YEAR_BUCKETS as u32 - 1),
    }
}

/// Bucket of an age, as MovieLens-1M groups them: unknown, <18, 18-24, 25-34, 35-44, 45-49,
/// 50-55, 56+.
pub fn age_bucket(age: Option<u16>) -> u32 {
    match age {
        None => 0,
        Some(a) if a < 18 => 1,
        Some(a) if a < 25 => 2,
        Some(a) if a < 35 => 3,
        Some(a) if a < 45 => 4,
        Some(a) if a < 50 => 5,
        Some(a) if a < 56 => 6,
        Some(_) => 7,
    }
}

pub fn gender_index(gender: Option<&str>) -> u32 {
    match gender.map(|g| g.trim().to_ascii_lowercase()) {
        Some(g) if g == "m" || g == "male" => 1,
        Some(g) if g == "f" || g == "female" => 2,
        _ => 0,
    }
}

/// Feedback index of a history event: its rating rounded to 1..=5, or 6 for anything else.
pub fn feedback_index(rating: Option<f32>) -> u32 {
    match rating {
        Some(r) if r.is_finite() => r.round().clamp(1.0, 5.0) as u32,
        _ => 6,
    }
}

/// Hour-of-day bucket (as [`Context::hour_bucket`]) of a time in ms since the epoch.
pub fn hour_bucket(timestamp_ms: i64) -> u32 {
    Context::at_time(timestamp_ms, DeviceClass::Other).hour_bucket() as u32
}

/// Context segment (as [`Context::segment`]) of a request at `timestamp_ms` from `device`.
pub fn segment_at(timestamp_ms: i64, device: DeviceClass) -> u32 {
    Context::at_time(timestamp_ms, device).segment() as u32
}

/// Weekday of a time in ms (0 = Monday); not a model input, used in reports.
pub fn weekday(timestamp_ms: i64) -> u8 {
    hour_and_weekday(timestamp_ms).1
}
