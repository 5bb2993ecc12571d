//! The demo catalogue and the synthetic sessions that warm the model, so that `liverec serve` with
//! no configuration shows sensible, reactive recommendations without any download or service.
//!
//! Items belong to genres; synthetic users have one or two favourite genres (more likely ones
//! depend on their device, so popularity by context differs) and browse mostly within them.

use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::catalog::{Catalog, ItemAttributes};
use crate::event::{Context, Device, EventType, ItemId};
use crate::models::{HistoryItem, Observation};

pub const GENRES: [&str; 10] =
    ["action", "comedy", "drama", "sci-fi", "horror", "romance", "documentary", "animation", "thriller", "family"];
const ADJECTIVES: [&str; 12] = [
    "Silent", "Golden", "Broken", "Hidden", "Electric", "Lost", "Crimson", "Endless", "Quiet", "Wild", "Frozen", "Last",
];
const NOUNS: [&str; 12] = [
    "River", "Empire", "Garden", "Signal", "Harbor", "Machine", "Summer", "Forest", "Station", "Letter", "Voyage",
    "Island",
];

/// Genres that users of a device lean towards, so context matters in the demo.
fn device_genres(device: Device) -> &'static [usize] {
    match device {
        Device::Mobile => &[0, 1, 8],
        Device::Desktop => &[2, 3, 6],
        Device::Tablet => &[5, 7, 1],
        Device::Tv => &[6, 9, 2],
        Device::Other => &[4, 3, 0],
    }
}

/// The id of demo item `i`.
pub fn item_id(i: usize) -> ItemId {
    ItemId::from(format!("item-{i:04}").as_str())
}

/// Puts `items` demo items into the catalogue.
pub fn load_catalog(catalog: &Catalog, items: usize, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for i in 0..items {
        let genre = i % GENRES.len();
        let mut categories = vec![GENRES[genre].to_owned()];
        if rng.random_bool(0.2) {
            let second = GENRES[rng.random_range(0..GENRES.len())];
            if second != GENRES[genre] {
                categories.push(second.to_owned());
            }
        }
        let title = format!(
            "{} {}",
            ADJECTIVES[rng.random_range(0..ADJECTIVES.len())],
            NOUNS[rng.random_range(0..NOUNS.len())]
        );
        let attributes = ItemAttributes {
            title: Some(title),
            categories,
            tags: vec![format!("year-{}", 1980 + rng.random_range(0..45))],
            created_at: Some(1_600_000_000_000 + i as i64 * 3_600_000),
            ..ItemAttributes::default()
        };
        catalog.put(&item_id(i), attributes);
    }
}

/// Synthetic browsing sessions over the demo catalogue, for `Recommender::observe`.
pub fn warmup_observations(catalog: &Catalog, items: usize, users: usize, seed: u64) -> Vec<Observation> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
    let per_genre = items.div_ceil(GENRES.len()).max(1);
    let devices = [Device::Mobile, Device::Desktop, Device::Tablet, Device::Tv, Device::Other];
    let mut observations = Vec::with_capacity(users);
    for _ in 0..users {
        let device = devices[rng.random_range(0..devices.len())];
        let leaning = device_genres(device);
        let favourite = leaning[rng.random_range(0..leaning.len())];
        let second = rng.random_range(0..GENRES.len());
        let hour = rng.random_range(0..24u8);
        let length = rng.random_range(8..30);
        let mut new = Vec::with_capacity(length);
        for step in 0..length {
            let genre = match rng.random_range(0..10) {
                0..=6 => favourite,
                7 | 8 => second,
                _ => rng.random_range(0..GENRES.len()),
            };
            // Skewed towards the first items of a genre: a few hits, a long tail.
            let rank = ((rng.random::<f64>().powi(3)) * per_genre as f64) as usize;
            let index = (rank * GENRES.len() + genre).min(items.saturating_sub(1));
            let Some(item) = catalog.lookup(&item_id(index)) else {
                continue;
            };
            let event_type = if rng.random_bool(0.3) { EventType::Click } else { EventType::View };
            new.push(HistoryItem { item, event_type, value: None, timestamp: step as i64 });
        }
        let context = Context { device, hour, ..Context::default() };
        observations.push(Observation { previous: Arc::from(Vec::new()), new, segment: context.segment() });
    }
    observations
}

/// The demo browsing sessions as a training dataset for the sequential model (views rate 3,
/// clicks 4; one step a minute), with the demo items' genres and release years.
pub fn training_dataset(catalog: &Catalog, items: usize, users: usize, seed: u64) -> crate::models::data::Dataset {
    let mut builder = crate::models::data::DatasetBuilder::new();
    for i in 0..items {
        let id = item_id(i);
        if let Some(view) = catalog.get(&id) {
            let genres: Vec<&str> = view.categories.iter().map(String::as_str).collect();
            let year = view.tags.iter().find_map(|t| t.strip_prefix("year-")).and_then(|y| y.parse().ok());
            builder.item_attributes(id.as_str(), view.title.clone(), &genres, year);
        }
    }
    for (u, observation) in warmup_observations(catalog, items, users, seed).into_iter().enumerate() {
        let indices: Vec<_> = observation.new.iter().map(|h| h.item).collect();
        for (h, id) in observation.new.iter().zip(catalog.ids_of(&indices)) {
            let rating = if h.event_type == EventType::Click { 4.0 } else { 3.0 };
            builder.interaction(&format!("demo-user-{u}"), id.as_str(), h.timestamp * 60, Some(rating));
        }
    }
    builder.build()
}

/// Trains a small sequential model on the demo sessions and saves it as `registry/demo`, so that
/// `model.kind = "sequential"` works out of the box without a download. Takes a few seconds on
/// two cores; the server serves the online model meanwhile.
pub fn train_sequential(
    catalog: &Catalog,
    items: usize,
    users: usize,
    seed: u64,
    registry: &std::path::Path,
) -> Result<std::path::PathBuf, String> {
    use crate::models::artifact::{rfc3339, DataWindow, Manifest, SavedMetrics, ServeConfig};
    use crate::models::data::Split;
    use crate::models::sasrec::Config as NetConfig;
    use crate::models::train::{train, TrainConfig, TrainFile};

    let dataset = training_dataset(catalog, items, users.min(800), seed);
    let split = Split::leave_one_out(&dataset.sequences);
    let file = TrainFile {
        model: NetConfig { hidden: 32, layers: 1, heads: 2, inner: 64, max_len: 20, ..NetConfig::default() },
        train: TrainConfig { seed, epochs: 4, patience: 0, eval_every: 4, ..TrainConfig::default() },
        serve: ServeConfig::default(),
    };
    let mut trained = train(&dataset, &split, &file, false).map_err(|e| e.to_string())?;
    let mut manifest = Manifest {
        format: String::new(),
        version: String::new(),
        created_at: rfc3339(crate::event::now_ms() / 1000),
        config: trained.model.config.clone(),
        serve: trained.model.serve.clone(),
        data: DataWindow {
            source: "demo sessions (generated)".into(),
            users: dataset.users.len(),
            items: dataset.items.len(),
            interactions: dataset.interactions(),
            ..DataWindow::default()
        },
        metrics: SavedMetrics { valid: Some(trained.valid), test: None },
        training: trained.summary.clone(),
        weights_sha256: String::new(),
    };
    let dir = registry.join("demo");
    trained.model.save(&dir, &mut manifest).map_err(|e| e.to_string())?;
    Ok(dir)
}
