//! What `liverec import` reads: finding a dataset's files and their layout, and turning each
//! line into an event or an item, or into a rejection with its reason.
//!
//! Files are read line by line (never whole), so a file of any size imports in constant
//! memory and a rejection names its physical line (1 is the header, where there is one). The
//! MovieLens and RecBole layouts are the ones `liverec train --data DIR` reads
//! (`models::data`); their timestamps go through the same parser.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::catalog::ItemAttributes;
use crate::event::{EventIn, EventType};
use crate::models::data::{parse_timestamp, GROUPLENS_GENRES};
use serde::Serialize;

use super::error::ImportError;

/// The event fields `--map` may name.
pub const EVENT_FIELDS: [&str; 6] = ["user_id", "item_id", "timestamp", "event_type", "value", "event_id"];
/// The item fields `--item-map` may name.
pub const ITEM_FIELDS: [&str; 7] = ["item_id", "title", "categories", "tags", "created_at", "available", "expires_at"];

/// Which layout a dataset was found in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// GroupLens MovieLens-100K: `u.data` (tab-separated, no header) and `u.item` (`|`).
    Grouplens,
    /// RecBole atomic files: `NAME.inter` and `NAME.item`, tab-separated, `name:type` headers.
    Recbole,
    /// MovieLens CSV (ml-latest, ml-25m): `ratings.csv` and `movies.csv`.
    MovielensCsv,
    /// Any CSV or TSV file with a header, columns mapped with `--map`.
    Csv,
    /// One JSON object a line, keys mapped with `--map`.
    JsonLines,
}

/// How a file's lines split into fields.
#[derive(Clone, Debug)]
enum Format {
    /// Fields split on `delimiter`; double quotes group a field when `quoted`. `header`: the
    /// column names (given for files without a header line).
    Delimited { delimiter: char, quoted: bool, has_header: bool, columns: Option<Vec<String>> },
    /// One JSON object a line.
    Json,
    /// GroupLens `u.item`: `id|title|date|video date|url|` then one 0/1 flag per genre.
    GrouplensItem { genres: Vec<String> },
}

/// One file to import and how to read it.
#[derive(Clone, Debug)]
pub struct FileSpec {
    pub path: PathBuf,
    format: Format,
    /// Field name -> column name, from `--map` / `--item-map`: the column must exist.
    map: BTreeMap<String, String>,
    /// Field name -> the layout's column names for it (alternatives separated by `|`), used
    /// when the user mapped none and the column exists; then a column named as the field.
    defaults: &'static [(&'static str, &'static str)],
    /// Separator of list fields (categories, tags) held in one text column.
    list_separator: ListSeparator,
}

#[derive(Clone, Copy, Debug)]
enum ListSeparator {
    Char(char),
    Whitespace,
}

/// The files of one import.
#[derive(Debug)]
pub struct Dataset {
    pub layout: Layout,
    pub items: Option<FileSpec>,
    pub events: Option<FileSpec>,
}

/// What the user asked for on the command line about reading.
pub struct ReadOptions<'a> {
    pub data: &'a Path,
    pub items: Option<&'a Path>,
    pub map: &'a [String],
    pub item_map: &'a [String],
    pub list_separator: Option<char>,
}

fn parse_map(flag: &str, pairs: &[String], fields: &[&str]) -> Result<BTreeMap<String, String>, ImportError> {
    let mut map = BTreeMap::new();
    for pair in pairs {
        let Some((field, column)) = pair.split_once('=').filter(|(f, c)| !f.is_empty() && !c.is_empty()) else {
            return Err(ImportError::Usage(format!("{flag} {pair}: expected FIELD=COLUMN")));
        };
        if !fields.contains(&field) {
            return Err(ImportError::Usage(format!(
                "{flag} {pair}: no field {field}; the fields are {}",
                fields.join(", ")
            )));
        }
        map.insert(field.to_owned(), column.to_owned());
    }
    Ok(map)
}

fn extension(path: &Path) -> String {
    path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase()
}

/// A generic file's format by its extension.
fn generic(path: &Path, flag: &str) -> Result<(Layout, Format), ImportError> {
    let delimited = |delimiter, quoted| Format::Delimited { delimiter, quoted, has_header: true, columns: None };
    match extension(path).as_str() {
        "csv" => Ok((Layout::Csv, delimited(',', true))),
        "tsv" | "tab" => Ok((Layout::Csv, delimited('\t', false))),
        "jsonl" | "ndjson" | "json" => Ok((Layout::JsonLines, Format::Json)),
        "inter" | "item" => Ok((Layout::Recbole, delimited('\t', false))),
        other => Err(ImportError::Usage(format!(
            "{flag} {}: cannot tell the format from the extension {other:?}: use .csv, .tsv, .jsonl (or .ndjson), \
             .inter, or a dataset directory (MovieLens u.data, RecBole NAME.inter, MovieLens ratings.csv)",
            path.display()
        ))),
    }
}

/// Rating files name the value `rating`.
const RATING_DEFAULTS: &[(&str, &str)] = &[("value", "rating")];
const RECBOLE_ITEM_DEFAULTS: &[(&str, &str)] = &[("title", "movie_title|title"), ("categories", "class|genre")];
const MOVIELENS_CSV_EVENT_DEFAULTS: &[(&str, &str)] =
    &[("user_id", "userId"), ("item_id", "movieId"), ("value", "rating"), ("timestamp", "timestamp")];
const MOVIELENS_CSV_ITEM_DEFAULTS: &[(&str, &str)] = &[("item_id", "movieId"), ("categories", "genres")];

/// Reads `u.genre` (`name|index` lines) or falls back to the 19 MovieLens-100K genres.
fn grouplens_genres(dir: &Path) -> Result<Vec<String>, ImportError> {
    let path = dir.join("u.genre");
    if !path.is_file() {
        return Ok(GROUPLENS_GENRES.iter().map(|g| (*g).to_owned()).collect());
    }
    let text = std::fs::read(&path).map_err(|source| ImportError::Io { path: path.clone(), source })?;
    Ok(decode(&text)
        .lines()
        .filter_map(|l| l.split('|').next())
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect())
}

impl Dataset {
    /// Finds the files of `--data` (and `--items`) and how to read them.
    pub fn open(options: &ReadOptions<'_>) -> Result<Dataset, ImportError> {
        let data = options.data;
        let event_map = parse_map("--map", options.map, &EVENT_FIELDS)?;
        let item_map = parse_map("--item-map", options.item_map, &ITEM_FIELDS)?;
        let sep = |default: ListSeparator| options.list_separator.map_or(default, ListSeparator::Char);
        let tab = |has_header| Format::Delimited { delimiter: '\t', quoted: false, has_header, columns: None };

        let (layout, items, events) = if data.is_dir() {
            let mut inters: Vec<PathBuf> = std::fs::read_dir(data)
                .map_err(|source| ImportError::Io { path: data.to_owned(), source })?
                .flatten()
                .map(|e| e.path())
                .filter(|p| extension(p) == "inter")
                .collect();
            inters.sort();
            if let Some(inter) = inters.first() {
                if inters.len() > 1 {
                    return Err(ImportError::Usage(format!(
                        "--data {}: more than one .inter file; name one: --data {}",
                        data.display(),
                        inter.display()
                    )));
                }
                let item = inter.with_extension("item");
                let events = FileSpec {
                    path: inter.clone(),
                    format: tab(true),
                    map: event_map,
                    defaults: RATING_DEFAULTS,
                    list_separator: ListSeparator::Whitespace,
                };
                let items = item.is_file().then(|| FileSpec {
                    path: item,
                    format: tab(true),
                    map: item_map.clone(),
                    defaults: RECBOLE_ITEM_DEFAULTS,
                    list_separator: sep(ListSeparator::Whitespace),
                });
                (Layout::Recbole, items, Some(events))
            } else if data.join("u.data").is_file() {
                let columns = ["user_id", "item_id", "rating", "timestamp"].map(str::to_owned).to_vec();
                let events = FileSpec {
                    path: data.join("u.data"),
                    format: Format::Delimited {
                        delimiter: '\t',
                        quoted: false,
                        has_header: false,
                        columns: Some(columns),
                    },
                    map: event_map,
                    defaults: RATING_DEFAULTS,
                    list_separator: ListSeparator::Whitespace,
                };
                let item = data.join("u.item");
                let items = if item.is_file() {
                    Some(FileSpec {
                        path: item,
                        format: Format::GrouplensItem { genres: grouplens_genres(data)? },
                        map: BTreeMap::new(),
                        defaults: &[],
                        list_separator: ListSeparator::Char('|'),
                    })
                } else {
                    None
                };
                (Layout::Grouplens, items, Some(events))
            } else if data.join("ratings.csv").is_file() {
                let csv = || Format::Delimited { delimiter: ',', quoted: true, has_header: true, columns: None };
                let events = FileSpec {
                    path: data.join("ratings.csv"),
                    format: csv(),
                    map: event_map,
                    defaults: MOVIELENS_CSV_EVENT_DEFAULTS,
                    list_separator: ListSeparator::Char('|'),
                };
                let item = data.join("movies.csv");
                let items = item.is_file().then(|| FileSpec {
                    path: item,
                    format: csv(),
                    map: item_map.clone(),
                    defaults: MOVIELENS_CSV_ITEM_DEFAULTS,
                    list_separator: sep(ListSeparator::Char('|')),
                });
                (Layout::MovielensCsv, items, Some(events))
            } else {
                return Err(ImportError::Usage(format!(
                    "--data {}: no MovieLens (u.data, ratings.csv) or RecBole (NAME.inter) files in this directory; \
                     name a .csv, .tsv or .jsonl file instead",
                    data.display()
                )));
            }
        } else if data.is_file() {
            let (layout, format) = if data.file_name().is_some_and(|n| n == "u.data") {
                let columns = ["user_id", "item_id", "rating", "timestamp"].map(str::to_owned).to_vec();
                let format =
                    Format::Delimited { delimiter: '\t', quoted: false, has_header: false, columns: Some(columns) };
                (Layout::Grouplens, format)
            } else {
                generic(data, "--data")?
            };
            let defaults = match layout {
                Layout::Recbole | Layout::Grouplens => RATING_DEFAULTS,
                _ => &[],
            };
            let list_separator =
                if layout == Layout::Recbole { ListSeparator::Whitespace } else { sep(ListSeparator::Char('|')) };
            let items = if layout == Layout::Recbole && extension(data) == "inter" {
                let item = data.with_extension("item");
                item.is_file().then(|| FileSpec {
                    path: item,
                    format: tab(true),
                    map: item_map.clone(),
                    defaults: RECBOLE_ITEM_DEFAULTS,
                    list_separator: sep(ListSeparator::Whitespace),
                })
            } else {
                None
            };
            // A lone .item file is a catalogue only.
            if layout == Layout::Recbole && extension(data) == "item" {
                let items = FileSpec {
                    path: data.to_owned(),
                    format,
                    map: item_map.clone(),
                    defaults: RECBOLE_ITEM_DEFAULTS,
                    list_separator,
                };
                (layout, Some(items), None)
            } else {
                let events = FileSpec { path: data.to_owned(), format, map: event_map, defaults, list_separator };
                (layout, items, Some(events))
            }
        } else {
            return Err(ImportError::Usage(format!("--data {}: no such file or directory", data.display())));
        };

        let items = match options.items {
            Some(path) => {
                if !path.is_file() {
                    return Err(ImportError::Usage(format!("--items {}: no such file", path.display())));
                }
                let (layout, format) = generic(path, "--items")?;
                let defaults = if layout == Layout::Recbole { RECBOLE_ITEM_DEFAULTS } else { &[] };
                let list_separator = match layout {
                    Layout::Recbole => sep(ListSeparator::Whitespace),
                    _ => sep(ListSeparator::Char('|')),
                };
                Some(FileSpec { path: path.to_owned(), format, map: item_map, defaults, list_separator })
            }
            None => items,
        };
        Ok(Dataset { layout, items, events })
    }
}

/// GroupLens files are Latin-1, the others UTF-8: a line that is not UTF-8 is read as Latin-1
/// (each byte one character), as `models::data` does for whole files.
fn decode(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    }
}

/// Why a line was not imported. `code` is the server's error code for lines it refused, or one
/// of this module's for lines that could not be read; `field` the field to blame, if any.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
pub struct Reason {
    pub code: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub field: String,
}

impl Reason {
    pub fn new(code: &str, field: &str) -> Self {
        Self { code: code.to_owned(), field: field.to_owned() }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.code)
        } else {
            write!(f, "{} ({})", self.code, self.field)
        }
    }
}

/// The next line of a file read as records: its line number and the record, or why the line
/// was refused; `None` at the end of the file.
pub type NextLine<T> = Result<Option<(u64, Result<T, Rejected>)>, ImportError>;

/// A line that could not be read, with an example message.
#[derive(Debug)]
pub struct Rejected {
    pub reason: Reason,
    pub message: String,
}

fn reject(code: &str, field: &str, message: impl Into<String>) -> Rejected {
    Rejected { reason: Reason::new(code, field), message: message.into() }
}

/// One line's fields.
enum Row {
    Fields(Vec<String>),
    Json(serde_json::Map<String, serde_json::Value>),
}

/// Where a field is in a row.
#[derive(Clone, Debug)]
enum Col {
    Index(usize),
    Key(String),
    Absent,
}

/// Splits one CSV line. Double quotes group a field (`""` is a quote inside it); a quoted field
/// that does not end on its line is refused (fields spanning lines are not supported).
fn split_csv(line: &str, delimiter: char) -> Result<Vec<String>, Rejected> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    field.push('"');
                    chars.next();
                } else {
                    quoted = false;
                }
            } else {
                field.push(c);
            }
        } else if c == '"' && at_start {
            quoted = true;
            at_start = false;
        } else if c == delimiter {
            fields.push(std::mem::take(&mut field));
            at_start = true;
        } else {
            field.push(c);
            at_start = false;
        }
    }
    if quoted {
        return Err(reject(
            "malformed_csv",
            "",
            "a quoted field does not end on its line (fields spanning lines are not supported)",
        ));
    }
    fields.push(field);
    Ok(fields)
}

/// Reads one file line by line and turns lines into rows.
pub struct Reader {
    spec: FileSpec,
    lines: BufReader<File>,
    /// Lines read so far (the number of the last one).
    pub line: u64,
    /// Bytes read so far.
    pub offset: u64,
    /// The file's size, for the progress bar.
    pub size: u64,
    /// Where the last line read starts, and its length with its line ending.
    line_start: u64,
    line_len: usize,
    /// Column names of a delimited file.
    header: Vec<String>,
    buffer: Vec<u8>,
}

impl Reader {
    pub fn open(spec: &FileSpec) -> Result<Reader, ImportError> {
        let io = |source| ImportError::Io { path: spec.path.clone(), source };
        let file = File::open(&spec.path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut reader = Reader {
            spec: spec.clone(),
            lines: BufReader::with_capacity(1 << 16, file),
            line: 0,
            offset: 0,
            size,
            line_start: 0,
            line_len: 0,
            header: Vec::new(),
            buffer: Vec::new(),
        };
        if let Format::Delimited { delimiter, has_header, columns, quoted } = &spec.format {
            reader.header = match columns {
                Some(columns) => columns.clone(),
                None if *has_header => {
                    let Some(line) = reader.next_line()? else {
                        return Err(ImportError::Usage(format!(
                            "{}: empty file (expected a header line)",
                            spec.path.display()
                        )));
                    };
                    let fields = if *quoted {
                        split_csv(&line, *delimiter).unwrap_or_default()
                    } else {
                        line.split(*delimiter).map(str::to_owned).collect()
                    };
                    // RecBole headers carry types: `user_id:token`.
                    fields
                        .iter()
                        .map(|c| c.trim().trim_start_matches('\u{feff}'))
                        .map(|c| c.split(':').next().unwrap_or(c).to_owned())
                        .collect()
                }
                None => Vec::new(),
            };
        }
        Ok(reader)
    }

    pub fn path(&self) -> &Path {
        &self.spec.path
    }

    /// The next physical line, without its line ending; `None` at the end of the file.
    fn next_line(&mut self) -> Result<Option<String>, ImportError> {
        self.buffer.clear();
        let n = self
            .lines
            .read_until(b'\n', &mut self.buffer)
            .map_err(|source| ImportError::Io { path: self.spec.path.clone(), source })?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        self.line_start = self.offset;
        self.line_len = n;
        self.offset += n as u64;
        let mut bytes = &self.buffer[..];
        while let [rest @ .., b'\n' | b'\r'] = bytes {
            bytes = rest;
        }
        Ok(Some(decode(bytes)))
    }

    /// Skips lines up to and including `line` (resuming).
    pub fn skip_to(&mut self, line: u64) -> Result<(), ImportError> {
        while self.line < line {
            if self.next_line()?.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// Where each field is. A column named with `--map` (or `--item-map`) must be in the
    /// header; otherwise the layout's name for the field or the field's own name is used when
    /// present. `required` fields must be found.
    fn columns(&self, fields: &[&str], required: &[&str], flag: &str) -> Result<Vec<Col>, ImportError> {
        let mut columns = Vec::new();
        for &field in fields {
            let mapped = self.spec.map.get(field);
            let col = match &self.spec.format {
                Format::Json => Col::Key(mapped.cloned().unwrap_or_else(|| field.to_owned())),
                Format::GrouplensItem { .. } => Col::Absent,
                Format::Delimited { .. } => {
                    let position = |name: &str| self.header.iter().position(|h| h == name);
                    let fail = |how: String| {
                        ImportError::Usage(format!(
                            "{}: {how} (the columns are: {})",
                            self.spec.path.display(),
                            self.header.join(", ")
                        ))
                    };
                    if let Some(column) = mapped {
                        let at = position(column.as_str())
                            .ok_or_else(|| fail(format!("{flag} {field}={column}: no column {column}")))?;
                        Col::Index(at)
                    } else {
                        let layout = self.spec.defaults.iter().find(|(f, _)| *f == field).map(|(_, names)| *names);
                        let found =
                            layout.and_then(|names| names.split('|').find_map(position)).or_else(|| position(field));
                        match found {
                            Some(at) => Col::Index(at),
                            None if required.contains(&field) => {
                                return Err(fail(format!("no {field} column: name it with {flag} {field}=COLUMN")))
                            }
                            None => Col::Absent,
                        }
                    }
                }
            };
            columns.push(col);
        }
        Ok(columns)
    }

    /// The next line's row, `Ok(None)` at the end; blank lines are skipped.
    fn next_row(&mut self) -> Result<Option<Result<Row, Rejected>>, ImportError> {
        loop {
            let Some(line) = self.next_line()? else {
                return Ok(None);
            };
            if line.trim().is_empty() {
                continue;
            }
            return Ok(Some(self.parse(&line)));
        }
    }

    /// One line's fields.
    fn parse(&self, line: &str) -> Result<Row, Rejected> {
        {
            let row = match &self.spec.format {
                Format::Json => match serde_json::from_str::<serde_json::Value>(line) {
                    Ok(serde_json::Value::Object(map)) => Ok(Row::Json(map)),
                    Ok(_) => Err(reject("malformed_json", "", "the line is not a JSON object")),
                    Err(e) => Err(reject("malformed_json", "", e.to_string())),
                },
                Format::Delimited { delimiter, quoted: true, .. } => split_csv(line, *delimiter).map(Row::Fields),
                Format::Delimited { delimiter, .. } => {
                    Ok(Row::Fields(line.split(*delimiter).map(str::to_owned).collect()))
                }
                Format::GrouplensItem { .. } => Ok(Row::Fields(line.split('|').map(str::to_owned).collect())),
            };
            row
        }
    }
}

/// A row's text in a column; empty text is absent.
fn text(row: &Row, col: &Col) -> Option<String> {
    let value = match (row, col) {
        (Row::Fields(fields), Col::Index(i)) => fields.get(*i).map(|s| s.trim().to_owned()),
        (Row::Json(map), Col::Key(key)) => match map.get(key) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.trim().to_owned()),
            Some(other) => Some(other.to_string()),
        },
        _ => None,
    };
    value.filter(|s| !s.is_empty())
}

/// Event lines: rows to events, with the defaults of the import.
pub struct EventReader {
    pub reader: Reader,
    cols: Vec<Col>,
    /// The event type of lines without one (`--event-type`); else `rating` for a line with a
    /// value and `view` for one without.
    default_type: Option<EventType>,
    time_unit: TimeUnit,
    /// Prefix of the event ids derived from the file and line.
    id_prefix: String,
}

/// The unit of numeric timestamps in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TimeUnit {
    /// Seconds below 10^11 (before the year 5138), milliseconds above (after March 1973).
    Auto,
    #[value(name = "s")]
    Seconds,
    #[value(name = "ms")]
    Milliseconds,
}

/// 64-bit FNV-1a, for stable event ids (the same on every run and machine, unlike
/// `DefaultHasher`).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The id of the event on `line` of the file named `file_name`: the same on every run, so a
/// repeated import (a resumed one re-sends the batch that was in flight) is applied once.
pub fn event_id(prefix: &str, line: u64) -> String {
    format!("{prefix}-{line}")
}

impl EventReader {
    pub fn new(spec: &FileSpec, event_type: Option<EventType>, time_unit: TimeUnit) -> Result<Self, ImportError> {
        let reader = Reader::open(spec)?;
        let cols = reader.columns(&EVENT_FIELDS, &["user_id", "item_id"], "--map")?;
        let name = spec.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let id_prefix = format!("import-{:016x}", fnv1a(name.as_bytes()));
        Ok(Self { reader, cols, default_type: event_type, time_unit, id_prefix })
    }

    /// The next line as an event, or why it is not one; `None` at the end of the file.
    pub fn next(&mut self) -> NextLine<EventIn> {
        let Some(row) = self.reader.next_row()? else {
            return Ok(None);
        };
        let line = self.reader.line;
        Ok(Some((line, row.and_then(|row| self.event(&row, line)))))
    }

    fn event(&self, row: &Row, line: u64) -> Result<EventIn, Rejected> {
        let get = |i: usize| text(row, &self.cols[i]);
        let user = get(0).ok_or_else(|| reject("missing_field", "user_id", "no user id"))?;
        let item = get(1).ok_or_else(|| reject("missing_field", "item_id", "no item id"))?;
        let value = match get(4) {
            Some(v) => Some(
                v.parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| reject("bad_value", "value", format!("{v:?} is not a number")))?,
            ),
            None => None,
        };
        let event_type = match get(3) {
            Some(name) => serde_json::from_value(serde_json::Value::String(name.clone())).map_err(|_| {
                reject(
                    "unknown_event_type",
                    "event_type",
                    format!("{name:?} is not one of view, click, add_to_cart, purchase, rating, dwell, dislike, hide"),
                )
            })?,
            None => self.default_type.unwrap_or(if value.is_some() { EventType::Rating } else { EventType::View }),
        };
        let timestamp = match get(2) {
            Some(t) => {
                let parsed = parse_timestamp(&t)
                    .ok_or_else(|| reject("bad_timestamp", "timestamp", format!("{t:?} is not a number")))?;
                Some(self.time_unit.to_millis(parsed, &t))
            }
            None => None,
        };
        let mut event = EventIn::new(user, item, event_type);
        event.value = value;
        event.timestamp = timestamp;
        event.event_id = Some(get(5).unwrap_or_else(|| event_id(&self.id_prefix, line)));
        Ok(event)
    }
}

/// Where one event line is, and its time: the index `liverec import` sorts to send a file in
/// time order without holding its events (32 bytes a line).
#[derive(Clone, Copy)]
struct Entry {
    timestamp: Option<i64>,
    line: u64,
    offset: u64,
    len: u32,
}

/// An events file in time order: every line's time and place is read first, sorted by
/// (timestamp, line) (stable, so ties and lines without a time keep the file's order, the
/// latter first), then each line is read again at its place as it is sent.
pub struct TimeOrdered {
    pub events: EventReader,
    index: Vec<Entry>,
    /// Entries sent so far.
    pub cursor: usize,
    /// A second handle on the file, read at the entries' places.
    file: File,
    /// Lines that could not be read, found while indexing.
    pub unreadable: Vec<(u64, Rejected)>,
    /// The line of the entry sent last.
    pub last_line: u64,
}

impl TimeOrdered {
    pub fn new(mut events: EventReader) -> Result<Self, ImportError> {
        let path = events.reader.spec.path.clone();
        let file = File::open(&path).map_err(|source| ImportError::Io { path: path.clone(), source })?;
        let mut index = Vec::new();
        let mut unreadable = Vec::new();
        while let Some((line, event)) = events.next()? {
            match event {
                Ok(event) => {
                    let len = u32::try_from(events.reader.line_len).map_err(|_| {
                        ImportError::Usage(format!("{}:{line}: a line longer than 4 GiB", path.display()))
                    })?;
                    index.push(Entry { timestamp: event.timestamp, line, offset: events.reader.line_start, len });
                }
                Err(rejected) => unreadable.push((line, rejected)),
            }
        }
        index.sort_by_key(|e| (e.timestamp, e.line));
        Ok(Self { events, index, cursor: 0, file, unreadable, last_line: 0 })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Continues after the first `taken` events in time order.
    pub fn skip(&mut self, taken: usize) {
        self.cursor = taken.min(self.index.len());
        self.last_line = self.cursor.checked_sub(1).map_or(0, |i| self.index[i].line);
    }

    /// The next event in time order.
    pub fn next(&mut self) -> NextLine<EventIn> {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let Some(entry) = self.index.get(self.cursor).copied() else {
            return Ok(None);
        };
        self.cursor += 1;
        let path = &self.events.reader.spec.path;
        let io = |source| ImportError::Io { path: path.clone(), source };
        let mut bytes = vec![0; entry.len as usize];
        self.file.seek(SeekFrom::Start(entry.offset)).map_err(io)?;
        self.file.read_exact(&mut bytes).map_err(io)?;
        while let [rest @ .., b'\n' | b'\r'] = &bytes[..] {
            bytes.truncate(rest.len());
        }
        self.last_line = entry.line;
        let event = self.events.reader.parse(&decode(&bytes)).and_then(|row| self.events.event(&row, entry.line));
        Ok(Some((entry.line, event)))
    }
}

impl TimeUnit {
    /// `value` (as parsed, rounded) in milliseconds. Fractional seconds keep their milliseconds.
    fn to_millis(self, value: i64, text: &str) -> i64 {
        let seconds = match self {
            TimeUnit::Seconds => true,
            TimeUnit::Milliseconds => false,
            TimeUnit::Auto => value.abs() < 100_000_000_000,
        };
        if !seconds {
            return value;
        }
        match text.trim().parse::<f64>() {
            Ok(f) if text.contains('.') => (f * 1000.0).round() as i64,
            _ => value.saturating_mul(1000),
        }
    }
}

/// One catalogue item as `PUT /v1/items` takes it.
#[derive(Debug, Serialize)]
pub struct ItemOut {
    pub item_id: String,
    #[serde(flatten)]
    pub attributes: ItemAttributes,
}

/// Item lines: rows to items.
pub struct ItemReader {
    pub reader: Reader,
    cols: Vec<Col>,
}

impl ItemReader {
    pub fn new(spec: &FileSpec) -> Result<Self, ImportError> {
        let reader = Reader::open(spec)?;
        let cols = reader.columns(&ITEM_FIELDS, &["item_id"], "--item-map")?;
        Ok(Self { reader, cols })
    }

    pub fn next(&mut self) -> NextLine<ItemOut> {
        let Some(row) = self.reader.next_row()? else {
            return Ok(None);
        };
        let line = self.reader.line;
        let item = row.and_then(|row| match &self.reader.spec.format {
            Format::GrouplensItem { genres } => grouplens_item(&row, genres),
            _ => self.item(&row),
        });
        Ok(Some((line, item)))
    }

    fn list(&self, row: &Row, i: usize) -> Vec<String> {
        if let (Row::Json(map), Col::Key(key)) = (row, &self.cols[i]) {
            if let Some(serde_json::Value::Array(values)) = map.get(key) {
                return values
                    .iter()
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                    .filter(|v| !v.is_empty())
                    .collect();
            }
        }
        let Some(text) = text(row, &self.cols[i]) else {
            return Vec::new();
        };
        let parts: Vec<&str> = match self.reader.spec.list_separator {
            ListSeparator::Whitespace => text.split_whitespace().collect(),
            ListSeparator::Char(c) => text.split(c).collect(),
        };
        // MovieLens CSV marks an item without genres so.
        parts
            .into_iter()
            .map(str::trim)
            .filter(|p| !p.is_empty() && *p != "(no genres listed)")
            .map(str::to_owned)
            .collect()
    }

    fn item(&self, row: &Row) -> Result<ItemOut, Rejected> {
        let get = |i: usize| text(row, &self.cols[i]);
        let item_id = get(0).ok_or_else(|| reject("missing_field", "item_id", "no item id"))?;
        let millis = |i: usize, field: &str| -> Result<Option<i64>, Rejected> {
            get(i)
                .map(|t| {
                    parse_timestamp(&t)
                        .map(|v| TimeUnit::Auto.to_millis(v, &t))
                        .ok_or_else(|| reject("bad_timestamp", field, format!("{t:?} is not a number")))
                })
                .transpose()
        };
        let available = match get(5).map(|a| a.to_ascii_lowercase()) {
            None => None,
            Some(a) if matches!(a.as_str(), "true" | "1" | "yes") => Some(true),
            Some(a) if matches!(a.as_str(), "false" | "0" | "no") => Some(false),
            Some(a) => return Err(reject("bad_value", "available", format!("{a:?} is not true or false"))),
        };
        let attributes = ItemAttributes {
            title: get(1),
            categories: self.list(row, 2),
            tags: self.list(row, 3),
            created_at: millis(4, "created_at")?,
            available,
            expires_at: millis(6, "expires_at")?,
        };
        check(ItemOut { item_id, attributes })
    }
}

/// Checks an item as the server will (the bounds are constants of the catalogue, not settings),
/// so that a bad item is reported with its line instead of refusing its whole batch.
fn check(item: ItemOut) -> Result<ItemOut, Rejected> {
    if item.item_id.chars().any(char::is_control) {
        return Err(reject("invalid_item_id", "item_id", "must not contain control characters"));
    }
    item.attributes.validate().map_err(|e| reject("invalid_item", e.field, e.message))?;
    Ok(item)
}

/// One `u.item` line: id, title (with its year, as MovieLens writes it), the genres whose flag
/// is 1.
fn grouplens_item(row: &Row, genres: &[String]) -> Result<ItemOut, Rejected> {
    let Row::Fields(fields) = row else {
        return Err(reject("malformed_line", "", "not a u.item line"));
    };
    if fields.len() < 5 {
        return Err(reject(
            "wrong_field_count",
            "",
            format!("{} fields separated by |; u.item lines have at least 5", fields.len()),
        ));
    }
    let item_id = fields[0].trim().to_owned();
    if item_id.is_empty() {
        return Err(reject("missing_field", "item_id", "no item id"));
    }
    let flags = &fields[fields.len().saturating_sub(genres.len())..];
    let categories = flags.iter().zip(genres).filter(|(f, _)| f.trim() == "1").map(|(_, g)| g.clone()).collect();
    let title = Some(fields[1].trim().to_owned()).filter(|t| !t.is_empty());
    check(ItemOut { item_id, attributes: ItemAttributes { title, categories, ..ItemAttributes::default() } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_with_quotes_and_delimiters() {
        let fields = split_csv(r#"1,"American President, The (1995)",Comedy|Drama|Romance"#, ',').expect("valid");
        assert_eq!(fields, ["1", "American President, The (1995)", "Comedy|Drama|Romance"]);
        assert_eq!(split_csv(r#"a,"say ""hi""",c"#, ',').expect("valid"), ["a", "say \"hi\"", "c"]);
        assert_eq!(split_csv("a,,c", ',').expect("valid"), ["a", "", "c"]);
        assert_eq!(split_csv(r#"a,"open"#, ',').expect_err("unterminated").reason.code, "malformed_csv");
    }

    #[test]
    fn timestamps_in_seconds_become_milliseconds() {
        assert_eq!(TimeUnit::Auto.to_millis(881_250_949, "881250949"), 881_250_949_000);
        assert_eq!(TimeUnit::Auto.to_millis(1_700_000_000_000, "1700000000000"), 1_700_000_000_000);
        assert_eq!(TimeUnit::Auto.to_millis(881_250_950, "881250949.5"), 881_250_949_500);
        assert_eq!(TimeUnit::Milliseconds.to_millis(5, "5"), 5);
        assert_eq!(TimeUnit::Seconds.to_millis(200_000_000_000, "200000000000"), 200_000_000_000_000);
    }

    #[test]
    fn event_ids_are_stable_per_file_and_line() {
        // Pinned: a changed derivation would make a re-run after an upgrade apply lines twice.
        assert_eq!(fnv1a(b"u.data"), fnv1a(b"u.data"));
        assert_ne!(fnv1a(b"u.data"), fnv1a(b"ratings.csv"));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(event_id("import-00", 7), "import-00-7");
    }
}
