//! Interaction data for offline training and evaluation: a loader for MovieLens-style data in
//! either layout (RecBole atomic files `*.inter`/`*.item`/`*.user`, or the original GroupLens
//! `u.data`/`u.item`/`u.user`), and the leave-one-out split of the evaluation protocol.
//!
//! The split is exact on purpose: every rating is an interaction; each user's interactions are
//! *stably* sorted by their integer timestamp, so equal timestamps (common in MovieLens) keep the
//! order of the file's lines; the last one is the test item, the one before it the validation
//! item, and the rest train. Timestamps are kept as integers: parsing them as `f32`, as some
//! tools do, merges neighbouring seconds and silently changes the split.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: no interaction file (expected *.inter or u.data)")]
    NoInteractions { path: PathBuf },
    #[error("{path}:{line}: {message}")]
    Parse { path: PathBuf, line: usize, message: String },
}

/// One rating (or other interaction) of a user.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    /// Dense item index into [`Dataset::items`].
    pub item: u32,
    /// Seconds since the Unix epoch, as in the file.
    pub timestamp: i64,
    /// The rating value, when the data has one.
    pub rating: Option<f32>,
}

/// Attributes of one item.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemInfo {
    /// The raw id in the data files.
    pub id: String,
    pub title: Option<String>,
    /// Indices into [`Dataset::genres`].
    pub genres: Vec<u16>,
    pub year: Option<u16>,
}

/// Attributes of one user (all optional: RecBole's `.user` and GroupLens' `u.user` have them).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UserInfo {
    /// The raw id in the data files.
    pub id: String,
    pub age: Option<u16>,
    pub gender: Option<String>,
    pub occupation: Option<String>,
}

/// Which file layout a dataset was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// RecBole atomic files: `NAME.inter`, `NAME.item`, `NAME.user`.
    Recbole,
    /// The original GroupLens files: `u.data`, `u.item`, `u.user`.
    Grouplens,
}

/// A whole interaction dataset, users' sequences sorted by time.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub items: Vec<ItemInfo>,
    /// Genre (category) names; items refer to them by index.
    pub genres: Vec<String>,
    pub users: Vec<UserInfo>,
    /// Per user (same index as `users`), interactions stably sorted by timestamp.
    pub sequences: Vec<Vec<Interaction>>,
}

/// Accumulates a dataset while reading, interning raw ids in order of first sight.
#[derive(Default)]
pub struct DatasetBuilder {
    dataset: Dataset,
    item_index: HashMap<String, u32>,
    user_index: HashMap<String, usize>,
    genre_index: HashMap<String, u16>,
}

impl DatasetBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The index of item `id`, adding it without attributes on first sight.
    pub fn item(&mut self, id: &str) -> u32 {
        if let Some(&idx) = self.item_index.get(id) {
            return idx;
        }
        let idx = u32::try_from(self.dataset.items.len()).expect("fewer than 2^32 items");
        self.dataset.items.push(ItemInfo { id: id.to_owned(), ..ItemInfo::default() });
        self.item_index.insert(id.to_owned(), idx);
        idx
    }

    /// The index of user `id`, adding it without attributes on first sight.
    pub fn user(&mut self, id: &str) -> usize {
        if let Some(&idx) = self.user_index.get(id) {
            return idx;
        }
        let idx = self.dataset.users.len();
        self.dataset.users.push(UserInfo { id: id.to_owned(), ..UserInfo::default() });
        self.dataset.sequences.push(Vec::new());
        self.user_index.insert(id.to_owned(), idx);
        idx
    }

    pub fn genre(&mut self, name: &str) -> u16 {
        if let Some(&idx) = self.genre_index.get(name) {
            return idx;
        }
        let idx = u16::try_from(self.dataset.genres.len()).unwrap_or(u16::MAX);
        self.dataset.genres.push(name.to_owned());
        self.genre_index.insert(name.to_owned(), idx);
        idx
    }

    /// Sets an item's attributes (genres by name).
    pub fn item_attributes(&mut self, id: &str, title: Option<String>, genres: &[&str], year: Option<u16>) {
        let idx = self.item(id) as usize;
        let genres = genres.iter().map(|g| self.genre(g)).collect();
        let info = &mut self.dataset.items[idx];
        info.title = title;
        info.genres = genres;
        info.year = year;
    }

    pub fn user_attributes(&mut self, info: UserInfo) {
        let idx = self.user(&info.id);
        self.dataset.users[idx] = info;
    }

    /// Appends one interaction; call in file line order (that order breaks timestamp ties).
    pub fn interaction(&mut self, user: &str, item: &str, timestamp: i64, rating: Option<f32>) {
        let item = self.item(item);
        let user = self.user(user);
        self.dataset.sequences[user].push(Interaction { item, timestamp, rating });
    }

    /// Sorts every user's interactions by timestamp. `sort_by_key` is stable, so ties keep the
    /// order in which they were added.
    pub fn build(mut self) -> Dataset {
        for seq in &mut self.dataset.sequences {
            seq.sort_by_key(|i| i.timestamp);
        }
        self.dataset
    }
}

impl Dataset {
    /// Reads a dataset directory in either layout (RecBole atomic files take precedence).
    pub fn load(dir: &Path) -> Result<(Dataset, Layout), DataError> {
        let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io { path: dir.to_owned(), source })?;
        let mut inter = None;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) == Some("inter") {
                inter = Some(path);
            }
        }
        if let Some(inter) = inter {
            return Ok((load_recbole(&inter)?, Layout::Recbole));
        }
        if dir.join("u.data").is_file() {
            return Ok((load_grouplens(dir)?, Layout::Grouplens));
        }
        Err(DataError::NoInteractions { path: dir.to_owned() })
    }

    pub fn interactions(&self) -> usize {
        self.sequences.iter().map(Vec::len).sum()
    }

    /// Earliest and latest timestamp (seconds), if there is any interaction.
    pub fn time_window(&self) -> Option<(i64, i64)> {
        let mut all = self.sequences.iter().flatten().map(|i| i.timestamp);
        let first = all.next()?;
        Some(all.fold((first, first), |(lo, hi), t| (lo.min(t), hi.max(t))))
    }
}

fn read_text(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_owned(), source })?;
    // GroupLens files are Latin-1; RecBole's are UTF-8. Latin-1 maps each byte to a char.
    Ok(match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => err.into_bytes().iter().map(|&b| char::from(b)).collect(),
    })
}

fn parse_error(path: &Path, line: usize, message: impl Into<String>) -> DataError {
    DataError::Parse { path: path.to_owned(), line, message: message.into() }
}

/// Seconds as an integer; a fractional timestamp is rounded (never parsed through `f32`).
/// Also `liverec import`'s reading of timestamps, so both read a file alike.
pub fn parse_timestamp(text: &str) -> Option<i64> {
    let text = text.trim();
    text.parse::<i64>().ok().or_else(|| text.parse::<f64>().ok().map(|f| f.round() as i64))
}

/// Release year from "1995", "01-Jan-1995" and the like: the last four digits in the text.
fn parse_year(text: &str) -> Option<u16> {
    let digits: Vec<char> = text.chars().filter(char::is_ascii_digit).collect();
    if digits.len() < 4 {
        return None;
    }
    let year: String = digits[digits.len() - 4..].iter().collect();
    year.parse().ok().filter(|y| (1800..=2200).contains(y))
}

/// A RecBole atomic file: a header of `name:type` columns, then tab-separated rows.
struct Atomic {
    columns: Vec<String>,
    rows: Vec<(usize, Vec<String>)>,
}

impl Atomic {
    fn read(path: &Path) -> Result<Atomic, DataError> {
        let text = read_text(path)?;
        let mut lines = text.lines().enumerate();
        let (_, header) = lines.next().ok_or_else(|| parse_error(path, 1, "empty file"))?;
        let columns = header.split('\t').map(|c| c.split(':').next().unwrap_or(c).trim().to_owned()).collect();
        let rows = lines
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, l)| (n + 1, l.split('\t').map(str::to_owned).collect()))
            .collect();
        Ok(Atomic { columns, rows })
    }

    fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }
}

fn field(row: &[String], col: Option<usize>) -> Option<&str> {
    col.and_then(|c| row.get(c)).map(|s| s.trim()).filter(|s| !s.is_empty())
}

fn load_recbole(inter_path: &Path) -> Result<Dataset, DataError> {
    let mut builder = DatasetBuilder::new();
    let stem = inter_path.with_extension("");

    // Items and users first, so that indices follow the attribute files' order.
    let item_path = stem.with_extension("item");
    if item_path.is_file() {
        let file = Atomic::read(&item_path)?;
        let id = file.column("item_id").ok_or_else(|| parse_error(&item_path, 1, "no item_id column"))?;
        let title = file.column("movie_title").or(file.column("title"));
        let year = file.column("release_year").or(file.column("year"));
        let genres = file.column("class").or(file.column("genre")).or(file.column("categories"));
        for (_, row) in &file.rows {
            let Some(item_id) = field(row, Some(id)) else {
                continue;
            };
            let genre_list: Vec<&str> = field(row, genres).map(|g| g.split_whitespace().collect()).unwrap_or_default();
            builder.item_attributes(
                item_id,
                field(row, title).map(str::to_owned),
                &genre_list,
                field(row, year).and_then(parse_year),
            );
        }
    }
    let user_path = stem.with_extension("user");
    if user_path.is_file() {
        let file = Atomic::read(&user_path)?;
        let id = file.column("user_id").ok_or_else(|| parse_error(&user_path, 1, "no user_id column"))?;
        let (age, gender, occupation) = (file.column("age"), file.column("gender"), file.column("occupation"));
        for (_, row) in &file.rows {
            let Some(user_id) = field(row, Some(id)) else {
                continue;
            };
            builder.user_attributes(UserInfo {
                id: user_id.to_owned(),
                age: field(row, age).and_then(|a| a.parse().ok()),
                gender: field(row, gender).map(str::to_owned),
                occupation: field(row, occupation).map(str::to_owned),
            });
        }
    }

    let file = Atomic::read(inter_path)?;
    let missing = |name: &str| parse_error(inter_path, 1, format!("no {name} column"));
    let user = file.column("user_id").ok_or_else(|| missing("user_id"))?;
    let item = file.column("item_id").ok_or_else(|| missing("item_id"))?;
    let timestamp = file.column("timestamp").ok_or_else(|| missing("timestamp"))?;
    let rating = file.column("rating");
    for (line, row) in &file.rows {
        let (Some(u), Some(i)) = (field(row, Some(user)), field(row, Some(item))) else {
            return Err(parse_error(inter_path, *line, "missing user or item id"));
        };
        let ts = field(row, Some(timestamp))
            .and_then(parse_timestamp)
            .ok_or_else(|| parse_error(inter_path, *line, "bad timestamp"))?;
        let r = field(row, rating).and_then(|r| r.parse().ok());
        builder.interaction(u, i, ts, r);
    }
    Ok(builder.build())
}

/// The 19 genre flags of `u.item`, in order, for when `u.genre` is absent.
pub const GROUPLENS_GENRES: [&str; 19] = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
];

fn load_grouplens(dir: &Path) -> Result<Dataset, DataError> {
    let mut builder = DatasetBuilder::new();
    let genre_path = dir.join("u.genre");
    let genre_names: Vec<String> = if genre_path.is_file() {
        read_text(&genre_path)?
            .lines()
            .filter_map(|l| l.split('|').next())
            .filter(|g| !g.trim().is_empty())
            .map(str::to_owned)
            .collect()
    } else {
        GROUPLENS_GENRES.iter().map(|g| (*g).to_owned()).collect()
    };

    let item_path = dir.join("u.item");
    if item_path.is_file() {
        for (n, line) in read_text(&item_path)?.lines().enumerate() {
            let fields: Vec<&str> = line.split('|').collect();
            if fields.len() < 5 {
                continue;
            }
            let flags = &fields[fields.len().saturating_sub(genre_names.len())..];
            let genres: Vec<&str> =
                flags.iter().zip(&genre_names).filter(|(f, _)| f.trim() == "1").map(|(_, g)| g.as_str()).collect();
            if fields[0].trim().is_empty() {
                return Err(parse_error(&item_path, n + 1, "missing item id"));
            }
            // Titles carry the year in parentheses; RecBole strips it, so do we.
            let title = fields[1].trim();
            let title = title.rsplit_once(" (").filter(|(_, y)| parse_year(y).is_some()).map_or(title, |(t, _)| t);
            builder.item_attributes(
                fields[0].trim(),
                Some(title.to_owned()).filter(|t| !t.is_empty()),
                &genres,
                parse_year(fields[2]),
            );
        }
    }
    let user_path = dir.join("u.user");
    if user_path.is_file() {
        for line in read_text(&user_path)?.lines() {
            let fields: Vec<&str> = line.split('|').collect();
            if fields.len() < 4 || fields[0].trim().is_empty() {
                continue;
            }
            builder.user_attributes(UserInfo {
                id: fields[0].trim().to_owned(),
                age: fields[1].trim().parse().ok(),
                gender: Some(fields[2].trim().to_owned()).filter(|g| !g.is_empty()),
                occupation: Some(fields[3].trim().to_owned()).filter(|o| !o.is_empty()),
            });
        }
    }

    let data_path = dir.join("u.data");
    for (n, line) in read_text(&data_path)?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() < 4 {
            return Err(parse_error(&data_path, n + 1, "expected 4 tab-separated fields"));
        }
        let ts = parse_timestamp(fields[3]).ok_or_else(|| parse_error(&data_path, n + 1, "bad timestamp"))?;
        builder.interaction(fields[0].trim(), fields[1].trim(), ts, fields[2].trim().parse().ok());
    }
    Ok(builder.build())
}

/// The leave-one-out split: per user, train items, then the validation and test interactions.
#[derive(Clone, Debug, Default)]
pub struct Split {
    /// Per user, all interactions but the last two, in time order.
    pub train: Vec<Vec<Interaction>>,
    /// Per user, the second-to-last interaction (`None` for users with fewer than 3).
    pub valid: Vec<Option<Interaction>>,
    /// Per user, the last interaction (`None` for users with fewer than 3).
    pub test: Vec<Option<Interaction>>,
}

/// Which held-out interaction to evaluate on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    Valid,
    Test,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Valid => "valid",
            Part::Test => "test",
        })
    }
}

impl Split {
    /// Splits sequences that are already stably sorted by time (as [`Dataset`] keeps them).
    /// Users with fewer than three interactions keep them all in train and are not evaluated.
    pub fn leave_one_out(sequences: &[Vec<Interaction>]) -> Split {
        let mut split = Split::default();
        for seq in sequences {
            if seq.len() < 3 {
                split.train.push(seq.clone());
                split.valid.push(None);
                split.test.push(None);
                continue;
            }
            let n = seq.len();
            split.train.push(seq[..n - 2].to_vec());
            split.valid.push(Some(seq[n - 2]));
            split.test.push(Some(seq[n - 1]));
        }
        split
    }

    /// What a model sees and must predict for `user` on `part`: the history (oldest first, and
    /// exactly the items excluded from ranking) and the target. `None` if the user is not
    /// evaluated.
    pub fn case(&self, user: usize, part: Part) -> Option<(Vec<Interaction>, Interaction)> {
        let valid = self.valid[user]?;
        match part {
            Part::Valid => Some((self.train[user].clone(), valid)),
            Part::Test => {
                let mut history = self.train[user].clone();
                history.push(valid);
                Some((history, self.test[user]?))
            }
        }
    }

    pub fn train_interactions(&self) -> usize {
        self.train.iter().map(Vec::len).sum()
    }

    /// SHA-256 digests of the three parts in the reference format (see `shared/eval/README.md`):
    /// one `user<TAB>item` line per interaction with raw ids, sorted numerically by user (and,
    /// for train, then by item). Returns `(part, lines, hex digest)` for test, valid and train.
    pub fn digests(&self, dataset: &Dataset) -> Vec<(&'static str, usize, String)> {
        let key = |s: &str| (s.parse::<u64>().unwrap_or(u64::MAX), s.to_owned());
        let line =
            |user: usize, i: &Interaction| (key(&dataset.users[user].id), key(&dataset.items[i.item as usize].id));
        let digest = |mut lines: Vec<((u64, String), (u64, String))>, by_item: bool| {
            if by_item {
                lines.sort();
            } else {
                // Stable, by user only: the reference sorts test and valid by user alone.
                lines.sort_by(|a, b| a.0.cmp(&b.0));
            }
            let mut hasher = Sha256::new();
            for (u, i) in &lines {
                hasher.update(format!("{}\t{}\n", u.1, i.1).as_bytes());
            }
            (lines.len(), hex(&hasher.finalize()))
        };
        let held_out = |part: &[Option<Interaction>]| {
            part.iter().enumerate().filter_map(|(u, i)| i.as_ref().map(|i| line(u, i))).collect::<Vec<_>>()
        };
        let train = self
            .train
            .iter()
            .enumerate()
            .flat_map(|(u, seq)| seq.iter().map(move |i| (u, i)))
            .map(|(u, i)| line(u, i))
            .collect();
        let (test_n, test) = digest(held_out(&self.test), false);
        let (valid_n, valid) = digest(held_out(&self.valid), false);
        let (train_n, train) = digest(train, true);
        vec![("test", test_n, test), ("valid", valid_n, valid), ("train", train_n, train)]
    }
}

/// The reference digests of MovieLens-100K's split, from `shared/eval/README.md`.
pub const ML100K_DIGESTS: [(&str, usize, &str); 3] = [
    ("test", 943, "d45c5d7f8e2a6d6eea803e9ec75d9e3813fffb04ffe2dc9295ee8b7d10af488a"),
    ("valid", 943, "c52173fad1f00005e0b39d18acbf6245167b4885d9ffba43c1b90740a5f2aca5"),
    ("train", 98114, "9a15353a4a6188b017dc1be3349b2cafc1b32e7152ce130e3de62aaa2e55752e"),
];

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(rows: &[(&str, &str, i64)]) -> Dataset {
        let mut b = DatasetBuilder::new();
        for &(u, i, t) in rows {
            b.interaction(u, i, t, Some(4.0));
        }
        b.build()
    }

    fn items(ds: &Dataset, seq: &[Interaction]) -> Vec<String> {
        seq.iter().map(|i| ds.items[i.item as usize].id.clone()).collect()
    }

    #[test]
    fn split_sorts_stably_and_keeps_file_order_on_ties() {
        // User 1's last two share a timestamp: file order decides (b before c), even though
        // they come after an earlier-timestamped line in the file.
        let ds = dataset(&[
            ("1", "a", 10),
            ("1", "b", 30),
            ("2", "x", 5),
            ("1", "c", 30),
            ("1", "d", 20),
            ("2", "y", 5),
            ("2", "z", 5),
            ("3", "p", 1),
            ("3", "q", 2),
        ]);
        let split = Split::leave_one_out(&ds.sequences);
        assert_eq!(items(&ds, &split.train[0]), vec!["a", "d"]);
        assert_eq!(items(&ds, &[split.valid[0].expect("valid")]), vec!["b"]);
        assert_eq!(items(&ds, &[split.test[0].expect("test")]), vec!["c"]);
        // All ties: pure file order.
        assert_eq!(items(&ds, &split.train[1]), vec!["x"]);
        assert_eq!(items(&ds, &[split.valid[1].expect("valid")]), vec!["y"]);
        assert_eq!(items(&ds, &[split.test[1].expect("test")]), vec!["z"]);
        // Too short to evaluate: everything stays in train.
        assert_eq!(items(&ds, &split.train[2]), vec!["p", "q"]);
        assert!(split.valid[2].is_none() && split.test[2].is_none());

        let (history, target) = split.case(0, Part::Test).expect("evaluated");
        assert_eq!(items(&ds, &history), vec!["a", "d", "b"]);
        assert_eq!(items(&ds, &[target]), vec!["c"]);
        assert!(split.case(2, Part::Valid).is_none());
    }

    #[test]
    fn digests_follow_the_reference_format() {
        let ds = dataset(&[
            ("10", "5", 1),
            ("10", "30", 2),
            ("10", "4", 3),
            ("10", "7", 4),
            ("9", "2", 1),
            ("9", "1", 2),
            ("9", "3", 3),
        ]);
        let split = Split::leave_one_out(&ds.sequences);
        let digests = split.digests(&ds);
        let sha = |text: &str| hex(&Sha256::digest(text.as_bytes()));
        // Numeric order: user 9 before user 10, and train items 5 before 30.
        assert_eq!(digests[0], ("test", 2, sha("9\t3\n10\t7\n")));
        assert_eq!(digests[1], ("valid", 2, sha("9\t1\n10\t4\n")));
        assert_eq!(digests[2], ("train", 3, sha("9\t2\n10\t5\n10\t30\n")));
    }

    #[test]
    fn parses_years_and_integer_timestamps() {
        assert_eq!(parse_year("01-Jan-1995"), Some(1995));
        assert_eq!(parse_year("1995"), Some(1995));
        assert_eq!(parse_year(""), None);
        // 881250949 and 881250950 are one apart; f32 would merge them.
        assert_eq!(parse_timestamp("881250949"), Some(881_250_949));
        assert_eq!(parse_timestamp("881250950.0"), Some(881_250_950));
        assert_eq!(parse_timestamp("x"), None);
    }
}
