//! `liverec-load` as a library: scenario files, the run against a live server, and its report.
//! The binary (`main.rs`) parses the command line; the tests drive the same functions.

pub mod limits;
pub mod report;
pub mod run;
pub mod scenario;
pub mod svg;
pub mod synth;

pub use report::Report;
pub use run::{run, RunError, RunOptions};
pub use scenario::Scenario;
