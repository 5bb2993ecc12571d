//! `liverec import`: loads a catalogue and an interaction history from files into a running
//! server (REST) or straight into its Kafka topics.
//!
//! Items go first (`PUT /v1/items`, or the items topic), then events (`POST /v1/events`, or the
//! events topic), in batches, one at a time. Events go in time order (the file is indexed
//! first; `--file-order` streams it instead), because the server keeps each user's history in
//! arrival order. After every acknowledged batch the state file records how far each file has
//! come; `--resume` continues from there. Every event carries an id derived from its file and
//! line, so the batch that was in flight when an import stopped, sent again on resume, is
//! applied once (the server applies an event id once per user).
//!
//! This module sits above the library, beside `main.rs`: it talks to the server only through
//! its public interfaces (HTTP, the Kafka topics), and nothing in the library imports it.

mod error;
mod kafka;
/// Also the serving-path evaluation's way to post events (`crate::eval`).
pub(crate) mod rest;
mod source;
mod state;

use std::future::Future;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Instant;

use crate::config::{Config, Overrides};
use crate::event::{EventIn, EventType};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

pub use error::ImportError;
pub use source::TimeUnit;
use source::{Dataset, EventReader, ItemOut, ItemReader, ReadOptions, Rejected, TimeOrdered};
use state::{FileProgress, Order, RejectedLines, State};

/// What `liverec import` was asked to do: its command-line flags.
#[derive(clap::Args)]
pub struct Options {
    /// A dataset directory, or one file of events (.csv, .tsv, .jsonl, .inter, u.data).
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    /// A catalogue file (.csv, .tsv, .jsonl, .item) to import instead of the one found
    /// beside the data.
    #[arg(long, value_name = "FILE")]
    pub items: Option<PathBuf>,
    /// The server (http:// only). Default http://127.0.0.1:8080 unless --kafka is given;
    /// with --kafka, the catalogue goes there instead of to the items topic.
    #[arg(long, value_name = "URL")]
    pub target: Option<String>,
    /// Produce straight to the topics of these Kafka brokers: events to the events topic,
    /// the catalogue to the items topic (or over REST when --target is given too).
    #[arg(long, value_name = "BROKERS")]
    pub kafka: Option<String>,
    /// The events topic (default: kafka.events_topic of --config, else liverec.events). The
    /// items topic is kafka.items_topic of --config, else derived from it as the server does
    /// (liverec.events: liverec.items).
    #[arg(long, value_name = "TOPIC", requires = "kafka")]
    pub topic: Option<String>,
    /// The server's configuration file: [kafka] client settings and topics, and the [events]
    /// limits that records produced to Kafka are checked against.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A key with the producer role, when the server has auth on.
    #[arg(long, env = "LIVEREC_API_KEY", hide_env_values = true, value_name = "KEY")]
    pub api_key: Option<String>,
    /// FIELD=COLUMN: where an event field is in the data (repeatable). Fields: user_id,
    /// item_id, timestamp, event_type, value, event_id. Unmapped fields are read from a
    /// column of their own name (value also from `rating`), if there is one.
    #[arg(long = "map", value_name = "FIELD=COLUMN")]
    pub map: Vec<String>,
    /// FIELD=COLUMN for the catalogue: item_id, title, categories, tags, created_at,
    /// available, expires_at.
    #[arg(long = "item-map", value_name = "FIELD=COLUMN")]
    pub item_map: Vec<String>,
    /// The type of events whose line has none [default: rating for a line with a value,
    /// view otherwise].
    #[arg(long, value_name = "TYPE", value_parser = parse_event_type)]
    pub event_type: Option<EventType>,
    /// The unit of numeric timestamps (auto: seconds below 10^11, milliseconds above).
    #[arg(long, value_enum, default_value = "auto")]
    pub time_unit: TimeUnit,
    /// The separator of categories and tags in one column [default: | ; whitespace in
    /// RecBole files].
    #[arg(long, value_name = "CHAR")]
    pub list_separator: Option<char>,
    /// At most this many lines per second (default: as fast as the server takes them).
    #[arg(long, value_name = "N")]
    pub rate: Option<NonZeroU32>,
    /// Lines per request: at most the server's events.max_batch (halved on its own when
    /// the server answers 413).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub batch: usize,
    /// Continue an interrupted import after the last line its state file records.
    #[arg(long)]
    pub resume: bool,
    /// The state file [default: $XDG_STATE_HOME/liverec/import/, else
    /// ~/.local/state/liverec/import/, one file per data path and destination].
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Import the events only, not the catalogue.
    #[arg(long)]
    pub skip_items: bool,
    /// Send events in the order of the file, streaming it. By default they are sent in
    /// time order (the server keeps each user's history in arrival order), after a first
    /// read that keeps 32 bytes a line.
    #[arg(long)]
    pub file_order: bool,
    /// No progress bar and no start line.
    #[arg(long)]
    pub quiet: bool,
}

/// An event type named on the command line (`rating`, `add_to_cart`).
fn parse_event_type(name: &str) -> Result<EventType, String> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).map_err(|_| {
        let names: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        format!("not an event type; one of {}", names.join(", "))
    })
}

/// How an import ended.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Stopped by a signal before the end; `--resume` continues.
    pub interrupted: bool,
    /// Stopped by this error (the server or Kafka refused or did not answer); `--resume`
    /// continues once it is fixed.
    pub failed: Option<String>,
    pub state_file: PathBuf,
    pub items: Option<FileProgress>,
    pub events: Option<FileProgress>,
    pub rejected: Vec<RejectedLines>,
    /// Events (of this run) dated before an earlier event of the same user in the file: the
    /// server keeps a user's history in the order events arrive.
    pub events_out_of_order: u64,
}

impl Summary {
    /// The last line applied, as `file:line` (and its rank in time order).
    fn last_line(&self) -> Option<String> {
        let last = self.events.as_ref().filter(|e| e.line > 0).or(self.items.as_ref())?;
        Some(match last.order {
            Order::File => format!("{}:{}", last.file, last.line),
            Order::Time => format!("{}:{} (event {} of the file in time order)", last.file, last.line, last.position),
        })
    }

    /// The human summary, for stderr.
    pub fn text(&self) -> String {
        let mut out = String::new();
        match (&self.failed, self.interrupted) {
            (Some(error), _) => out.push_str(&format!("import: stopped: {error}\n")),
            (None, true) => out.push_str("import: interrupted\n"),
            (None, false) => out.push_str("import: done\n"),
        }
        for (what, progress) in [("items", &self.items), ("events", &self.events)] {
            if let Some(p) = progress {
                let done = match (p.done, p.order) {
                    (true, _) => "the whole file".to_owned(),
                    (false, Order::File) => format!("up to line {}", p.line),
                    (false, Order::Time) => format!("its first {} events in time order", p.position),
                };
                out.push_str(&format!(
                    "  {what}: {} applied, {} rejected ({}: {done})\n",
                    p.applied, p.rejected, p.file
                ));
            }
        }
        if !self.rejected.is_empty() {
            out.push_str("rejected lines, by reason:\n");
            for r in &self.rejected {
                let lines: Vec<String> = r.first_lines.iter().map(u64::to_string).collect();
                let more = if r.count > r.first_lines.len() as u64 { ", ..." } else { "" };
                out.push_str(&format!(
                    "  {:>8}  {}  {}: lines {}{more}; e.g. {}\n",
                    r.count,
                    r.reason,
                    r.file,
                    lines.join(", "),
                    r.example
                ));
            }
        }
        if self.events_out_of_order > 0 {
            out.push_str(&format!(
                "note: {} events were dated before an earlier line of the same user, and the server keeps each \
                 user's history in arrival order: without --file-order the import sends events in time order\n",
                self.events_out_of_order
            ));
        }
        if let Some(last) = self.last_line() {
            out.push_str(&format!("last line applied: {last}\n"));
        }
        out.push_str(&format!("state: {}\n", self.state_file.display()));
        let started = [&self.items, &self.events].iter().any(|p| p.as_ref().is_some_and(|p| p.line > 0));
        if (self.interrupted || self.failed.is_some()) && started {
            out.push_str("run the same command with --resume to continue after the last line applied\n");
        } else if self.failed.is_some() {
            out.push_str("nothing was applied: run the same command again to start\n");
        }
        out
    }
}

/// Where batches go.
enum Destination {
    Rest(rest::Client),
    /// Events to the events topic; items over REST with `--target`, else to the items topic.
    Kafka {
        producer: kafka::Producer,
        items_over_rest: Option<rest::Client>,
    },
}

/// A future that ends the import early when it completes (a signal).
pub type Interrupt = Pin<Box<dyn Future<Output = ()>>>;

/// What one phase (items, then events) needs besides its reader.
struct Run<'a> {
    state: State,
    state_path: PathBuf,
    limiter: Option<DefaultDirectRateLimiter>,
    batch: usize,
    quiet: bool,
    interrupt: &'a mut Interrupt,
    /// The latest timestamp seen per user in this run (for the out-of-order note).
    latest: std::collections::HashMap<String, i64>,
    out_of_order: u64,
}

/// Leaves the progress bar where it stopped.
fn interrupted(bar: &ProgressBar) -> Ended {
    bar.abandon();
    Ended::Interrupted
}

/// How a phase ended.
enum Ended {
    Done,
    Interrupted,
}

/// What a batch holds: items or events, and how each kind is sent.
trait Record: Serialize + Sized {
    async fn send(destination: &mut Destination, records: &[Self]) -> Result<Vec<(usize, Rejected)>, ImportError>;

    /// The user and time of an event, for the out-of-order note.
    fn user_time(&self) -> Option<(&str, i64)> {
        None
    }
}

impl Record for ItemOut {
    async fn send(destination: &mut Destination, records: &[Self]) -> Result<Vec<(usize, Rejected)>, ImportError> {
        match destination {
            Destination::Rest(client) | Destination::Kafka { items_over_rest: Some(client), .. } => {
                client.send(rest::Endpoint::Items, records).await
            }
            Destination::Kafka { producer, items_over_rest: None } => producer.send_items(records).await,
        }
    }
}

impl Record for EventIn {
    async fn send(destination: &mut Destination, records: &[Self]) -> Result<Vec<(usize, Rejected)>, ImportError> {
        match destination {
            Destination::Rest(client) => client.send(rest::Endpoint::Events, records).await,
            Destination::Kafka { producer, .. } => producer.send(records).await,
        }
    }

    fn user_time(&self) -> Option<(&str, i64)> {
        Some((&self.user_id, self.timestamp?))
    }
}

/// Lines of one file, turned into records, in file order or in time order.
trait Lines {
    type Record: Record;
    fn next(&mut self) -> source::NextLine<Self::Record>;
    fn path(&self) -> &std::path::Path;
    fn order(&self) -> Order {
        Order::File
    }
    /// How far the file has come, as the state file records it: lines read (file order) or
    /// events taken (time order).
    fn position(&self) -> u64;
    /// Continues after `position`.
    fn resume(&mut self, position: u64) -> Result<(), ImportError>;
    /// The line of the last record taken.
    fn last_line(&self) -> u64;
    /// (done, total) for the progress bar: bytes, or events in time order.
    fn progress(&self) -> (u64, u64);
    /// Lines found unreadable before sending began (time order indexes the whole file first).
    fn take_unreadable(&mut self) -> Vec<(u64, Rejected)> {
        Vec::new()
    }
}

/// Lines of a file read front to back.
macro_rules! file_order {
    ($reader:ty, $record:ty) => {
        impl Lines for $reader {
            type Record = $record;
            fn next(&mut self) -> source::NextLine<$record> {
                <$reader>::next(self)
            }
            fn path(&self) -> &std::path::Path {
                self.reader.path()
            }
            fn position(&self) -> u64 {
                self.reader.line
            }
            fn resume(&mut self, position: u64) -> Result<(), ImportError> {
                self.reader.skip_to(position)
            }
            fn last_line(&self) -> u64 {
                self.reader.line
            }
            fn progress(&self) -> (u64, u64) {
                (self.reader.offset, self.reader.size)
            }
        }
    };
}
file_order!(ItemReader, ItemOut);
file_order!(EventReader, EventIn);

impl Lines for TimeOrdered {
    type Record = EventIn;
    fn next(&mut self) -> source::NextLine<EventIn> {
        TimeOrdered::next(self)
    }
    fn path(&self) -> &std::path::Path {
        self.events.reader.path()
    }
    fn order(&self) -> Order {
        Order::Time
    }
    fn position(&self) -> u64 {
        self.cursor as u64
    }
    fn resume(&mut self, position: u64) -> Result<(), ImportError> {
        self.skip(position as usize);
        Ok(())
    }
    fn last_line(&self) -> u64 {
        self.last_line
    }
    fn progress(&self) -> (u64, u64) {
        (self.cursor as u64, self.len() as u64)
    }
    fn take_unreadable(&mut self) -> Vec<(u64, Rejected)> {
        std::mem::take(&mut self.unreadable)
    }
}

/// Which of the two phases.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Items,
    Events,
}

/// Runs the import until the end of the data or `interrupt`.
pub async fn run(options: Options, mut interrupt: Interrupt) -> Result<Summary, ImportError> {
    let dataset = Dataset::open(&ReadOptions {
        data: &options.data,
        items: options.items.as_deref(),
        map: &options.map,
        item_map: &options.item_map,
        list_separator: options.list_separator,
    })?;
    let config = Config::load(options.config.as_deref(), &Overrides::default())
        .map_err(|e| ImportError::Usage(format!("--config: {e}")))?;
    let items_spec = dataset.items.as_ref().filter(|_| !options.skip_items);
    if options.batch == 0 {
        return Err(ImportError::Usage("--batch must be at least 1".to_owned()));
    }
    let http_client = |target: &str| rest::Client::new(target, options.api_key.clone(), options.batch);
    let (destination, described) = match (&options.kafka, &options.target) {
        (Some(brokers), target) => {
            let items_over_rest = match (items_spec, target) {
                (Some(_), Some(target)) => Some(http_client(target)?),
                _ => None,
            };
            let items_to_kafka = items_spec.is_some() && items_over_rest.is_none();
            let producer = kafka::Producer::new(&config, brokers, options.topic.as_deref(), items_to_kafka)?;
            let described = match &producer.items_topic {
                Some(items_topic) => format!("kafka:{brokers}/{items_topic},{}", producer.topic),
                None => format!("kafka:{brokers}/{}", producer.topic),
            };
            (Destination::Kafka { producer, items_over_rest }, described)
        }
        (None, target) => {
            let target = target.clone().unwrap_or_else(|| "http://127.0.0.1:8080".to_owned());
            (Destination::Rest(http_client(&target)?), target)
        }
    };

    let data = std::path::absolute(&options.data).unwrap_or_else(|_| options.data.clone());
    let state_path = options.state.clone().unwrap_or_else(|| state::default_path(&data, &described));
    let previous = State::load(&state_path)?;
    let state = match (previous, options.resume) {
        (Some(previous), true) => {
            if previous.data != data.display().to_string() || previous.destination != described {
                return Err(ImportError::State {
                    path: state_path,
                    message: format!(
                        "it records an import of {} into {}, not of {} into {described}",
                        previous.data,
                        previous.destination,
                        data.display()
                    ),
                });
            }
            previous
        }
        (None, true) => {
            return Err(ImportError::State {
                path: state_path,
                message: "no such file: nothing to resume (run without --resume to start)".to_owned(),
            })
        }
        (Some(previous), false) if !previous.finished() => {
            let last = previous.events.as_ref().filter(|e| e.line > 0).or(previous.items.as_ref());
            return Err(ImportError::State {
                path: state_path,
                message: format!(
                    "an import of this data stopped after {}: continue it with --resume, or delete the file to start over",
                    last.map_or_else(|| "no line".to_owned(), |p| format!("{}:{}", p.file, p.line))
                ),
            });
        }
        _ => State { data: data.display().to_string(), destination: described.clone(), ..State::default() },
    };
    if !options.quiet {
        eprintln!(
            "import: {} ({:?} layout) into {described}; state file {}",
            options.data.display(),
            dataset.layout,
            state_path.display()
        );
    }

    let batch = match options.rate {
        Some(rate) => options.batch.min(rate.get() as usize),
        None => options.batch,
    };
    let mut run = Run {
        state,
        state_path,
        limiter: options.rate.map(|rate| RateLimiter::direct(Quota::per_second(rate))),
        batch,
        quiet: options.quiet,
        interrupt: &mut interrupt,
        latest: std::collections::HashMap::new(),
        out_of_order: 0,
    };
    let mut destination = destination;
    match &destination {
        Destination::Rest(client) | Destination::Kafka { items_over_rest: Some(client), .. } => client.check().await?,
        Destination::Kafka { items_over_rest: None, .. } => {}
    }
    let ended = async {
        let mut ended = Ended::Done;
        if let Some(spec) = items_spec {
            let mut reader = ItemReader::new(spec)?;
            ended = run.phase(Phase::Items, &mut reader, &mut destination).await?;
        }
        if let (true, Some(spec)) = (matches!(ended, Ended::Done), &dataset.events) {
            let reader = EventReader::new(spec, options.event_type, options.time_unit)?;
            ended = if options.file_order {
                let mut reader = reader;
                run.phase(Phase::Events, &mut reader, &mut destination).await?
            } else {
                if !options.quiet {
                    eprintln!("import: reading {} to send its events in time order", spec.path.display());
                }
                let mut reader = TimeOrdered::new(reader)?;
                run.phase(Phase::Events, &mut reader, &mut destination).await?
            };
        }
        Ok::<_, ImportError>(ended)
    }
    .await;
    // Bad flags or data are answered as such; a destination that fails mid-way ends with the
    // summary of what was applied, so that the import can be resumed.
    let (interrupted, failed) = match ended {
        Ok(ended) => (matches!(ended, Ended::Interrupted), None),
        Err(error @ (ImportError::Usage(_) | ImportError::State { .. })) => return Err(error),
        Err(error) => (false, Some(error.to_string())),
    };
    let state = run.state;
    Ok(Summary {
        interrupted,
        failed,
        state_file: run.state_path,
        items: state.items,
        events: state.events,
        rejected: state.rejected,
        events_out_of_order: run.out_of_order,
    })
}

impl Run<'_> {
    fn progress(&mut self, phase: Phase) -> &mut Option<FileProgress> {
        match phase {
            Phase::Items => &mut self.state.items,
            Phase::Events => &mut self.state.events,
        }
    }

    /// Sends one file in batches, saving the state after each; stops at the end of the file or
    /// on the interrupt (leaving the batch in flight unrecorded: it is sent again on resume).
    async fn phase<L: Lines>(
        &mut self,
        phase: Phase,
        lines: &mut L,
        destination: &mut Destination,
    ) -> Result<Ended, ImportError> {
        let file = lines.path().display().to_string();
        let state_path = self.state_path.clone();
        let order = lines.order();
        let bytes = std::fs::metadata(lines.path())
            .map_err(|source| ImportError::Io { path: lines.path().to_owned(), source })?
            .len();
        let progress = self.progress(phase).get_or_insert_with(|| FileProgress {
            file: file.clone(),
            bytes,
            order,
            ..FileProgress::default()
        });
        if progress.bytes != bytes {
            return Err(ImportError::State {
                path: state_path,
                message: format!(
                    "{file} has changed since the import began ({} bytes then, {bytes} now): delete the state file \
                     to import it from the start",
                    progress.bytes
                ),
            });
        }
        if progress.file != file || progress.order != order {
            return Err(ImportError::State {
                path: state_path,
                message: format!(
                    "it records progress in {} in {:?} order, not {file} in {order:?} order (--file-order must be \
                     given to a resumed import as it was to the first run)",
                    progress.file, progress.order
                ),
            });
        }
        if progress.done {
            return Ok(Ended::Done);
        }
        let start = progress.position;
        lines.resume(start)?;
        // Lines a time-ordered read found unreadable are counted once, with the first batch.
        let mut unreadable_before = if start == 0 { lines.take_unreadable() } else { Vec::new() };
        let bar = self.bar(phase, lines.progress());
        let started = Instant::now();
        let mut sent = 0u64;
        loop {
            let mut records = Vec::with_capacity(self.batch);
            let mut record_lines = Vec::with_capacity(self.batch);
            let mut unreadable = std::mem::take(&mut unreadable_before);
            let mut at_end = false;
            while records.len() < self.batch {
                match lines.next()? {
                    None => {
                        at_end = true;
                        break;
                    }
                    Some((line, Ok(record))) => {
                        records.push(record);
                        record_lines.push(line);
                    }
                    Some((line, Err(rejected))) => unreadable.push((line, rejected)),
                }
            }
            let (position, last_line) = (lines.position(), lines.last_line());
            let mut refused = Vec::new();
            if !records.is_empty() {
                if let Some(limiter) = &self.limiter {
                    let n = NonZeroU32::new(records.len() as u32).expect("a batch holds a record");
                    tokio::select! {
                        ready = limiter.until_n_ready(n) => { ready.expect("batches are at most the rate"); }
                        () = &mut *self.interrupt => return Ok(interrupted(&bar)),
                    }
                }
                tokio::select! {
                    result = L::Record::send(destination, &records) => refused = result?,
                    () = &mut *self.interrupt => return Ok(interrupted(&bar)),
                }
            }
            // Acknowledged: record it all, then save.
            let applied = (records.len() - refused.len()) as u64;
            sent += records.len() as u64;
            if order == Order::File {
                self.note_order(&records, &refused);
            }
            for (line, rejected) in &unreadable {
                self.state.reject(&file, *line, rejected);
            }
            for (i, rejected) in &refused {
                self.state.reject(&file, record_lines[*i], rejected);
            }
            let progress = self.progress(phase).as_mut().expect("set above");
            progress.line = last_line;
            progress.position = position;
            progress.applied += applied;
            progress.rejected += (unreadable.len() + refused.len()) as u64;
            progress.done = at_end;
            let message = format!(
                "line {} · {} applied · {} rejected · {:.0}/s",
                progress.line,
                progress.applied,
                progress.rejected,
                sent as f64 / started.elapsed().as_secs_f64().max(1e-3)
            );
            self.state.save(&self.state_path)?;
            bar.set_position(lines.progress().0);
            bar.set_message(message);
            if at_end {
                bar.finish();
                return Ok(Ended::Done);
            }
        }
    }

    /// Counts events dated before an earlier event of their user (in this run).
    fn note_order<R: Record>(&mut self, records: &[R], refused: &[(usize, Rejected)]) {
        for (i, record) in records.iter().enumerate() {
            if refused.iter().any(|(j, _)| *j == i) {
                continue;
            }
            let Some((user, timestamp)) = record.user_time() else {
                continue;
            };
            match self.latest.get_mut(user) {
                Some(latest) if timestamp < *latest => self.out_of_order += 1,
                Some(latest) => *latest = timestamp,
                None => {
                    self.latest.insert(user.to_owned(), timestamp);
                }
            }
        }
    }

    fn bar(&self, phase: Phase, (done, total): (u64, u64)) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{prefix:>6} [{bar:30}] {percent:>3}%  {msg}")
                .expect("progress template is valid")
                .progress_chars("=> "),
        );
        bar.set_prefix(match phase {
            Phase::Items => "items",
            Phase::Events => "events",
        });
        bar.set_position(done);
        bar
    }
}
