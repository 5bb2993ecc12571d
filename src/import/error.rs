//! Why an import stops. A file of its own so that the readers and senders of `liverec import`
//! share it without importing the command's module (no import cycles between files).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A flag, a file or the data's layout is wrong: exit code 2.
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
    /// The server refused a request for a reason that is not one line's.
    #[error("the server refused the import: {status} {code}: {message}")]
    Refused { status: u16, code: String, message: String },
    #[error("the server is unreachable: {0}")]
    Unreachable(String),
    #[error("kafka: {0}")]
    Kafka(String),
}
