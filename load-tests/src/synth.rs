//! A synthetic large catalogue (issue 14, item 5): items with power-law popularity, categories
//! and attributes, and users whose tastes are a mixture of a few categories, with sessions that
//! drift between them. Written as RecBole atomic files (`synth.item`, `synth.user`,
//! `synth.inter`), the layout `liverec train --data DIR` and `liverec eval --data DIR` read.
//!
//! Deterministic per seed, and streamed: each item and each user draws from its own generator,
//! seeded from (seed, index), so nothing is kept per user and per item only its category (a
//! `u32` in a list per category, 4 MB at 10^6 items) and its count of interactions (for the
//! summary). 10^6 items and 10^7 interactions take tens of MB, not GBs.
//!
//! The shape of the data:
//! - **Categories** (`--categories`, by default about sqrt(items) / 2, between 8 and 500) are
//!   themselves of power-law size and popularity: item `i`'s first category is a Zipf draw
//!   (exponent 0.8) over categories, and 30% of items have a second one, uniform.
//! - **Item popularity** within a category is Zipf by rank (exponent `--zipf`, 1.0 by default):
//!   the category's first items are its hits.
//! - **Users** have 1 to 3 categories (a Zipf draw over categories too, so popular categories have
//!   more users) with random weights, and a Pareto activity: every user has at least
//!   [`MIN_PER_USER`] interactions (the leave-one-out split needs 3), the rest of `--interactions`
//!   is shared in proportion to activity, so the total is exact.
//! - **Sessions** of about 8 steps: a session starts in one of the user's categories; each step
//!   drifts to another of them with probability 0.15 and explores a random category with 0.03;
//!   35% of steps continue from the previous item (a neighbour in its category's ranking, a
//!   sequential signal a sequence model can learn), the rest draw a Zipf rank. Steps are 20 s to
//!   5 min apart, sessions 1 hour to 3 days.
//!
//! Item ids are `<prefix><n>` zero-padded to [`ITEM_PAD`] digits (`synth-0000042`), the form the
//! load tool's scenarios name items by (`item_prefix`, `item_pad`); users are `synth-user-<n>`.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Digits of an item id's number: enough for 10^7 items.
pub const ITEM_PAD: usize = 7;
/// Fewest interactions of a user.
pub const MIN_PER_USER: u64 = 5;
/// First timestamp of the data (seconds; 2023-11-14).
const EPOCH: i64 = 1_700_000_000;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub items: u32,
    pub users: u64,
    pub interactions: u64,
    pub seed: u64,
    /// 0: about sqrt(items) / 2, between 8 and 500.
    pub categories: u32,
    /// Zipf exponent of item popularity within a category.
    pub zipf: f64,
    /// Item ids are `<item_prefix><n>`.
    pub item_prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("--items must be between 1 and 10^7, not {0}")]
    Items(u32),
    #[error("--users must be at least 1")]
    Users,
    #[error("--interactions must be at least {MIN_PER_USER} per user ({min} for {users} users), not {interactions}")]
    Interactions { interactions: u64, users: u64, min: u64 },
    #[error("--zipf must be in (0, 3], not {0}")]
    Zipf(f64),
    #[error("--categories must be at most --items")]
    Categories,
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// What was written, for the summary line and the docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub items: u32,
    pub categories: u32,
    pub users: u64,
    pub interactions: u64,
    /// Items that appear in at least one interaction.
    pub items_seen: u32,
    /// Share of interactions on the most popular 1% of items.
    pub top1_share: f64,
    pub files: Vec<PathBuf>,
}

/// SplitMix64: small, fast and the same on every platform and crate version, so a seed means
/// the same data for as long as this file does.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for one stream (`kind`) and one index within it.
    pub fn for_index(seed: u64, kind: u64, index: u64) -> Rng {
        let mut rng = Rng(seed ^ kind.wrapping_mul(0xA076_1D64_78BD_642F) ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        rng.next_u64();
        rng
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// A Zipf rank in [0, n) with exponent `s`, by the inverse of the continuous approximation of
/// its CDF: O(1) time and no table, so a category of 10^5 items costs nothing to sample.
pub fn zipf(rng: &mut Rng, n: u64, s: f64) -> u64 {
    if n <= 1 {
        return 0;
    }
    let u = rng.unit();
    let top = (n + 1) as f64;
    let x = if (s - 1.0).abs() < 1e-9 {
        (u * top.ln()).exp()
    } else {
        let a = 1.0 - s;
        (1.0 + u * (top.powf(a) - 1.0)).powf(1.0 / a)
    };
    (x.floor() as u64).clamp(1, n) - 1
}

/// Streams of the generator (one per kind of draw, so adding users never changes the items).
const ITEM_STREAM: u64 = 1;
const USER_STREAM: u64 = 2;

/// An item's category and attributes, a function of (seed, index) alone.
struct ItemDraw {
    category: u32,
    second: Option<u32>,
    year: u16,
}

fn draw_item(spec: &Spec, categories: u32, index: u32) -> ItemDraw {
    let mut rng = Rng::for_index(spec.seed, ITEM_STREAM, u64::from(index));
    let category = zipf(&mut rng, u64::from(categories), 0.8) as u32;
    let second = rng.chance(0.3).then(|| rng.below(u64::from(categories)) as u32).filter(|&c| c != category);
    let year = 1950 + rng.below(76) as u16;
    ItemDraw { category, second, year }
}

/// A user's categories (1 to 3) and their cumulative weights.
struct Taste {
    categories: Vec<u32>,
    cumulative: Vec<f64>,
}

impl Taste {
    fn draw(rng: &mut Rng, categories: u32) -> Taste {
        let n = 1 + rng.below(3) as usize;
        let mut chosen: Vec<u32> = Vec::with_capacity(n);
        while chosen.len() < n.min(categories as usize) {
            let c = zipf(rng, u64::from(categories), 0.8) as u32;
            if !chosen.contains(&c) {
                chosen.push(c);
            }
        }
        let weights: Vec<f64> = chosen.iter().map(|_| 0.2 + rng.unit()).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cumulative = weights.iter().map(|w| {
            acc += w / total;
            acc
        });
        Taste { cumulative: cumulative.collect(), categories: chosen }
    }

    fn pick(&self, rng: &mut Rng) -> u32 {
        let u = rng.unit();
        let at = self.cumulative.iter().position(|&c| u < c).unwrap_or(self.categories.len() - 1);
        self.categories[at]
    }
}

/// A user's activity weight: Pareto (alpha 1.5), capped at 100 times the least active.
fn activity(seed: u64, user: u64) -> f64 {
    let mut rng = Rng::for_index(seed, USER_STREAM, user);
    let u = 1.0 - rng.unit();
    u.powf(-1.0 / 1.5).min(100.0)
}

impl Spec {
    fn validate(&self) -> Result<u32, SynthError> {
        if self.items == 0 || self.items > 10_000_000 {
            return Err(SynthError::Items(self.items));
        }
        if self.users == 0 {
            return Err(SynthError::Users);
        }
        let min = self.users.saturating_mul(MIN_PER_USER);
        if self.interactions < min {
            return Err(SynthError::Interactions { interactions: self.interactions, users: self.users, min });
        }
        if !(self.zipf > 0.0 && self.zipf <= 3.0) {
            return Err(SynthError::Zipf(self.zipf));
        }
        if self.categories > self.items {
            return Err(SynthError::Categories);
        }
        Ok(match self.categories {
            0 => ((f64::from(self.items).sqrt() / 2.0).round() as u32).clamp(8, 500).min(self.items),
            n => n,
        })
    }

    pub fn item_id(&self, index: u32) -> String {
        format!("{}{index:0width$}", self.item_prefix, width = ITEM_PAD)
    }
}

/// Category names: `cat-000` ...
pub fn category_name(index: u32) -> String {
    format!("cat-{index:03}")
}

fn create(dir: &Path, name: &str) -> Result<(PathBuf, BufWriter<File>), SynthError> {
    let path = dir.join(name);
    let file = File::create(&path).map_err(|source| SynthError::Write { path: path.clone(), source })?;
    Ok((path, BufWriter::with_capacity(1 << 20, file)))
}

/// Writes `synth.item`, `synth.user` and `synth.inter` into `dir` (created if missing).
pub fn generate(spec: &Spec, dir: &Path) -> Result<Summary, SynthError> {
    let categories = spec.validate()?;
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| SynthError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;

    // Items: attributes out, each item's index kept in its category's list (in index order, so
    // a category's first items are its most popular).
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); categories as usize];
    let mut rank_of: Vec<u32> = Vec::with_capacity(spec.items as usize);
    let (item_path, mut out) = create(dir, "synth.item")?;
    writeln!(out, "item_id:token\ttitle:token_seq\trelease_year:token\tclass:token_seq").map_err(io_err(&item_path))?;
    for i in 0..spec.items {
        let draw = draw_item(spec, categories, i);
        let list = &mut members[draw.category as usize];
        rank_of.push(list.len() as u32);
        list.push(i);
        let classes = match draw.second {
            Some(second) => format!("{} {}", category_name(draw.category), category_name(second)),
            None => category_name(draw.category),
        };
        writeln!(out, "{}\tItem {i}\t{}\t{classes}", spec.item_id(i), draw.year).map_err(io_err(&item_path))?;
    }
    out.flush().map_err(io_err(&item_path))?;
    drop(out);

    // Users: attributes, and the sum of activity weights that shares out the interactions.
    let (user_path, mut out) = create(dir, "synth.user")?;
    writeln!(out, "user_id:token\tage:token\tgender:token\toccupation:token").map_err(io_err(&user_path))?;
    let mut total_weight = 0.0;
    for u in 0..spec.users {
        total_weight += activity(spec.seed, u);
        let mut rng = Rng::for_index(spec.seed, USER_STREAM + 1, u);
        let age = 16 + rng.below(60);
        let gender = if rng.chance(0.5) { "F" } else { "M" };
        writeln!(out, "synth-user-{u}\t{age}\t{gender}\tother").map_err(io_err(&user_path))?;
    }
    out.flush().map_err(io_err(&user_path))?;
    drop(out);

    // Interactions, user by user (the loader sorts each user's by time; ties keep file order).
    let (inter_path, mut out) = create(dir, "synth.inter")?;
    writeln!(out, "user_id:token\titem_id:token\trating:float\ttimestamp:float").map_err(io_err(&inter_path))?;
    let mut counts = vec![0u32; spec.items as usize];
    let spare = (spec.interactions - spec.users * MIN_PER_USER) as f64;
    let (mut cumulative, mut given) = (0.0, 0u64);
    for u in 0..spec.users {
        cumulative += activity(spec.seed, u);
        // Cumulative rounding: the shares add up to exactly `spare`.
        let upto = if u + 1 == spec.users { spare as u64 } else { (spare * cumulative / total_weight) as u64 };
        let n = MIN_PER_USER + upto.saturating_sub(given);
        given = given.max(upto);
        let mut rng = Rng::for_index(spec.seed, USER_STREAM + 2, u);
        let taste = Taste::draw(&mut rng, categories);
        let mut t = EPOCH + rng.below(180 * 86_400) as i64;
        let mut category = taste.pick(&mut rng);
        let mut previous: Option<u32> = None;
        let mut left_in_session = 0u64;
        for _ in 0..n {
            if left_in_session == 0 {
                left_in_session = 1 + zipf(&mut rng, 40, 1.2) + rng.below(8);
                t += 3600 + rng.below(3 * 86_400) as i64;
                category = taste.pick(&mut rng);
                previous = None;
            } else {
                t += 20 + rng.below(280) as i64;
                if rng.chance(0.03) {
                    category = zipf(&mut rng, u64::from(categories), 0.8) as u32;
                    previous = None;
                } else if rng.chance(0.15) {
                    category = taste.pick(&mut rng);
                    previous = None;
                }
            }
            left_in_session -= 1;
            let list = &members[category as usize];
            if list.is_empty() {
                category = draw_item(spec, categories, rng.below(u64::from(spec.items)) as u32).category;
            }
            let list = &members[category as usize];
            let rank = match previous {
                Some(prev) if rng.chance(0.35) => {
                    let step = 1 + rng.below(5) as i64;
                    let r = i64::from(rank_of[prev as usize]) + if rng.chance(0.7) { step } else { -step };
                    r.clamp(0, list.len() as i64 - 1) as u64
                }
                _ => zipf(&mut rng, list.len() as u64, spec.zipf),
            };
            let item = list[rank as usize];
            previous = Some(item);
            counts[item as usize] += 1;
            let rating = 3 + rng.below(3);
            writeln!(out, "synth-user-{u}\t{}\t{rating}\t{t}", spec.item_id(item)).map_err(io_err(&inter_path))?;
        }
    }
    out.flush().map_err(io_err(&inter_path))?;
    drop(out);

    let items_seen = counts.iter().filter(|&&c| c > 0).count() as u32;
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let top = (counts.len() / 100).max(1);
    let top_sum: u64 = counts[..top].iter().map(|&c| u64::from(c)).sum();
    Ok(Summary {
        items: spec.items,
        categories,
        users: spec.users,
        interactions: spec.interactions,
        items_seen,
        top1_share: top_sum as f64 / spec.interactions as f64,
        files: vec![item_path, user_path, inter_path],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(items: u32, users: u64, interactions: u64) -> Spec {
        Spec { items, users, interactions, seed: 7, categories: 0, zipf: 1.0, item_prefix: "synth-".into() }
    }

    fn read(dir: &Path) -> Vec<String> {
        ["synth.item", "synth.user", "synth.inter"]
            .iter()
            .map(|f| std::fs::read_to_string(dir.join(f)).expect("written"))
            .collect()
    }

    #[test]
    fn same_seed_same_files_and_exact_counts() {
        let (a, b) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
        let summary = generate(&spec(2000, 300, 9000), a.path()).expect("generate");
        generate(&spec(2000, 300, 9000), b.path()).expect("generate");
        let (fa, fb) = (read(a.path()), read(b.path()));
        assert_eq!(fa, fb);
        assert_eq!(fa[0].lines().count(), 2001);
        assert_eq!(fa[1].lines().count(), 301);
        assert_eq!(fa[2].lines().count(), 9001);
        assert_eq!(summary.interactions, 9000);
        let other = tempfile::tempdir().expect("tmp");
        generate(&Spec { seed: 8, ..spec(2000, 300, 9000) }, other.path()).expect("generate");
        assert_ne!(read(other.path())[2], fa[2]);
    }

    #[test]
    fn popularity_is_skewed_and_the_loader_reads_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let summary = generate(&spec(5000, 500, 20_000), dir.path()).expect("generate");
        // Uniform popularity would give the top 1% about 1% of interactions.
        assert!(summary.top1_share > 0.10, "{summary:?}");
        let (dataset, layout) = liverec::models::data::Dataset::load(dir.path()).expect("loads");
        assert_eq!(layout, liverec::models::data::Layout::Recbole);
        assert_eq!(dataset.items.len(), 5000);
        assert_eq!(dataset.users.len(), 500);
        assert_eq!(dataset.interactions(), 20_000);
        assert!(dataset.sequences.iter().all(|s| s.len() >= MIN_PER_USER as usize));
        assert!(dataset.genres.len() >= 8);
        assert!(dataset.items.iter().all(|i| !i.genres.is_empty() && i.year.is_some()));
    }

    #[test]
    fn bad_specs_name_the_flag() {
        let dir = tempfile::tempdir().expect("tmp");
        let err = generate(&spec(100, 10, 20), dir.path()).expect_err("too few interactions");
        assert!(err.to_string().contains("--interactions"), "{err}");
        let err = generate(&spec(0, 10, 100), dir.path()).expect_err("no items");
        assert!(err.to_string().contains("--items"), "{err}");
    }

    #[test]
    fn zipf_stays_in_range_and_favours_low_ranks() {
        let mut rng = Rng::for_index(1, 0, 0);
        let draws: Vec<u64> = (0..10_000).map(|_| zipf(&mut rng, 1000, 1.0)).collect();
        assert!(draws.iter().all(|&r| r < 1000));
        let low = draws.iter().filter(|&&r| r < 10).count();
        assert!(low > 2500, "{low}");
    }
}
