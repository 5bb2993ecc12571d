//! The import's state file: how far each file has been applied, and what was rejected, saved
//! after every batch the destination acknowledged so that `--resume` continues after the last
//! line applied.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::ImportError;
use super::source::{fnv1a, Reason, Rejected};

/// Line numbers kept per rejection reason.
const FIRST_LINES: usize = 5;

/// The order a file's lines are sent in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Front to back.
    #[default]
    File,
    /// By timestamp (ties and lines without one in file order).
    Time,
}

/// How far one file has come.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FileProgress {
    /// The file, as given.
    pub file: String,
    /// Its size when the import began: a changed file is not resumed.
    pub bytes: u64,
    pub order: Order,
    /// Where to continue: lines read (file order: every line up to it is done) or events
    /// taken in time order.
    pub position: u64,
    /// The line of the last record applied (or rejected). 0: none yet.
    pub line: u64,
    /// Lines the destination accepted.
    pub applied: u64,
    /// Lines refused (by the server, or not readable).
    pub rejected: u64,
    /// The whole file is done.
    pub done: bool,
}

/// The lines refused for one reason.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RejectedLines {
    pub file: String,
    pub reason: Reason,
    pub count: u64,
    /// The first few line numbers.
    pub first_lines: Vec<u64>,
    /// The message of the first one.
    pub example: String,
}

/// Everything `--resume` needs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// The `--data` path, absolute: a state file resumes only the import it was written by.
    pub data: String,
    /// Where the lines went: the target URL, or `kafka:BROKERS/TOPIC` (`kafka:BROKERS/ITEMS,EVENTS`
    /// when the catalogue went to the items topic).
    pub destination: String,
    pub items: Option<FileProgress>,
    pub events: Option<FileProgress>,
    pub rejected: Vec<RejectedLines>,
}

impl State {
    /// Counts `rejected` on `line` of `file`.
    pub fn reject(&mut self, file: &str, line: u64, rejected: &Rejected) {
        match self.rejected.iter_mut().find(|r| r.file == file && r.reason == rejected.reason) {
            Some(entry) => {
                entry.count += 1;
                if entry.first_lines.len() < FIRST_LINES {
                    entry.first_lines.push(line);
                }
            }
            None => self.rejected.push(RejectedLines {
                file: file.to_owned(),
                reason: rejected.reason.clone(),
                count: 1,
                first_lines: vec![line],
                example: rejected.message.clone(),
            }),
        }
    }

    pub fn finished(&self) -> bool {
        [&self.items, &self.events].iter().all(|p| p.as_ref().is_none_or(|p| p.done))
    }

    pub fn load(path: &Path) -> Result<Option<State>, ImportError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| ImportError::State {
                path: path.to_owned(),
                message: format!("not a state file written by liverec import: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ImportError::Io { path: path.to_owned(), source }),
        }
    }

    /// Writes the state to a temporary file and renames it over `path`, so that an interruption
    /// at any moment leaves the old state or the new one, never half of one.
    pub fn save(&self, path: &Path) -> Result<(), ImportError> {
        let io = |source| ImportError::Io { path: path.to_owned(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).expect("the state serialises");
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// Where the state of importing `data` into `destination` is kept unless `--state` says:
/// `$XDG_STATE_HOME/liverec/import/`, else `~/.local/state/liverec/import/`, else the
/// temporary directory; one file per data path and destination.
pub fn default_path(data: &Path, destination: &str) -> PathBuf {
    let absolute = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    let base = std::env::var_os("XDG_STATE_HOME")
        .and_then(absolute)
        .or_else(|| std::env::var_os("HOME").and_then(absolute).map(|h| h.join(".local").join("state")))
        .unwrap_or_else(std::env::temp_dir);
    let name = data.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "data".to_owned());
    let key = fnv1a(format!("{}\n{destination}", data.display()).as_bytes());
    base.join("liverec").join("import").join(format!("{name}-{key:016x}.json"))
}
