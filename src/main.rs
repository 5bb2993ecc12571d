//! The `liverec` command: parses the command line and wires the server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use liverec::config::{Config, Overrides};
use liverec::import;
use liverec::Server;

/// jemalloc rather than glibc malloc: after many sessions stop, glibc kept the freed memory in
/// fragmented arenas (resident size 2-3x its baseline); jemalloc's background threads give unused
/// pages back within seconds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "liverec",
    version,
    about = "A real-time recommendation server that pushes fresh lists the moment a user acts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the embedded default needs no other service).
    Serve {
        /// A TOML file overriding config/default.toml.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address to listen on (also LIVEREC_LISTEN).
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Print the effective configuration as TOML and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Print the JSON Schema of an event.
    Schema,
    /// Add a trained version (a folder written by `liverec train`) to the model registry the
    /// configuration names: uploaded to `model.registry_url` (object storage shared by every
    /// instance; files in parts, the manifest last) or copied into `model.registry_dir`. It is
    /// listed by every instance then and can be promoted (`POST /v1/admin/models/NAME/promote`).
    Publish {
        /// The version's folder (model.safetensors, vocab.json, manifest.json).
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// The version's name in the registry (default: the folder's name).
        #[arg(long)]
        name: Option<String>,
        /// A TOML file overriding config/default.toml (the LIVEREC_* variables apply too).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Make a new API key: prints the key (once; give it to the client) and the entry to add
    /// under [[auth.api_keys]] (a salted hash, not the key).
    Key {
        /// A name for the key (shown in logs, used to find it when rotating).
        #[arg(long)]
        id: String,
        /// producer, reader or admin.
        #[arg(long, value_parser = ["producer", "reader", "admin"])]
        role: String,
    },
    /// Mint a stream token for one user offline, with the configured auth.token_secret.
    Token {
        /// The user the token is for.
        #[arg(long)]
        user: String,
        /// Lifetime in seconds (default auth.token_ttl_secs).
        #[arg(long)]
        ttl: Option<u64>,
        /// The configuration file holding (or the environment holding) auth.token_secret.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Simulate users with latent tastes against a running server (loopback only) and report
    /// the click-through rate they saw over time, as JSON.
    Simulate {
        /// The server, e.g. http://127.0.0.1:8080.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        target: String,
        #[arg(long, default_value_t = 200)]
        users: usize,
        #[arg(long, default_value_t = 400)]
        items: usize,
        #[arg(long, default_value_t = 8)]
        categories: usize,
        /// Steps (list fetch + one event) per second, over all users.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Seconds to run.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// Shift every user's taste after this many seconds (concept drift).
        #[arg(long)]
        shift_at: Option<u64>,
        /// Change the device mix after this many seconds (input drift).
        #[arg(long)]
        context_shift_at: Option<u64>,
        /// Seconds per reported CTR bucket.
        #[arg(long, default_value_t = 5)]
        bucket: u64,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Concurrent simulated clients.
        #[arg(long, default_value_t = 4)]
        workers: usize,
    },
    /// Train the sequential model on a MovieLens-style dataset (see docs/model.md).
    Train {
        /// Dataset directory: RecBole atomic files or GroupLens u.data/u.item/u.user.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Where to write model.safetensors, manifest.json, vocab.json and training.md.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A TOML file with optional [model], [train] and [serve] sections.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Load a catalogue and an interaction history from files into a running server (REST) or
    /// its Kafka topics (see docs/import.md).
    ///
    /// Reads a MovieLens directory (u.data and u.item, or ratings.csv and movies.csv), RecBole
    /// files (NAME.inter and NAME.item), or any CSV/TSV/JSON Lines file with its columns named by
    /// --map. Items go first, then events, in batches; events in time order (--file-order:
    /// the file's). After each batch the state file records how far the import has come;
    /// --resume continues from there, and every event has an id derived from its file and
    /// line, so nothing is applied twice.
    #[command(verbatim_doc_comment)]
    Import {
        #[command(flatten)]
        options: import::Options,
        /// Also print the summary as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate under the leave-one-out protocol: popularity, and the model if given.
    Eval {
        /// Dataset directory: RecBole atomic files or GroupLens u.data/u.item/u.user.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// A model directory written by `liverec train`.
        #[arg(long, value_name = "DIR")]
        model: Option<PathBuf>,
        /// Print one JSON object of metrics (digests and notes go to stderr).
        #[arg(long)]
        json: bool,
        /// Markdown report path (default: report.md in the model directory, else
        /// reports/eval.md).
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// Also rank through the serving path, exactly and with two-stage retrieval forced on
        /// with this many candidates per source (docs/model.md, "Two-stage retrieval").
        #[arg(long, value_name = "N")]
        two_stage_candidates: Option<usize>,
        /// Also rank with the network alone given what a server has, one difference at a time:
        /// no demographics (`sasrec-no-user`), the newest event's hour instead of the held-out
        /// one's (`sasrec-last-hour`), both (`sasrec-no-user-last-hour`).
        #[arg(long, requires = "model")]
        explain: bool,
        /// Also evaluate through the serving path: start an in-process server for --model, replay
        /// the split's events into it over HTTP and rank on the lists it serves
        /// (`sasrec-served`; docs/model.md, "Served and offline").
        #[arg(long, requires = "model")]
        serve: bool,
        /// With --serve: a server config file (as for `liverec serve --config`; `[session]`
        /// settings apply, the model, demo, auth and retraining are set for the evaluation).
        #[arg(long, value_name = "FILE", requires = "serve")]
        serve_config: Option<PathBuf>,
        /// Evaluate through a running server at this URL instead (`served`): it must not know
        /// the dataset's users yet.
        #[arg(long, value_name = "URL", conflicts_with = "serve")]
        target: Option<String>,
        /// API key (producer and reader) for --target when its auth is on.
        #[arg(long, value_name = "KEY", requires = "target", env = "LIVEREC_EVAL_API_KEY")]
        api_key: Option<String>,
    },
}

fn main() -> ExitCode {
    liverec::models::pin_compute_threads();
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate {
            target,
            users,
            items,
            categories,
            rate,
            duration,
            shift_at,
            context_shift_at,
            bucket,
            seed,
            workers,
        } => {
            let config = liverec::sim::SimConfig {
                target,
                users,
                items,
                categories,
                rate,
                duration: std::time::Duration::from_secs(duration),
                shift_at: shift_at.map(std::time::Duration::from_secs),
                context_shift_at: context_shift_at.map(std::time::Duration::from_secs),
                bucket: std::time::Duration::from_secs(bucket.max(1)),
                seed,
                workers,
                ..liverec::sim::SimConfig::default()
            };
            simulate(config)
        }
        Command::Train { data, out, config, quiet } => exit_code(offline::train(&data, &out, config.as_deref(), quiet)),
        Command::Eval {
            data,
            model,
            json,
            report,
            two_stage_candidates,
            explain,
            serve,
            serve_config,
            target,
            api_key,
        } => {
            let served = match (serve, target) {
                (true, _) => Some(offline::Served::InProcess { config: serve_config }),
                (false, Some(url)) => Some(offline::Served::Target { url, api_key }),
                (false, None) => None,
            };
            let options = offline::EvalOptions { two_stage_candidates, explain, served };
            exit_code(offline::eval(&data, model.as_deref(), json, report.as_deref(), options))
        }
        Command::Import { options, json } => import_command(options, json),
        Command::Key { id, role } => key(&id, &role),
        Command::Token { user, ttl, config } => token(&user, ttl, config.as_deref()),
        Command::Publish { model, name, config } => publish(&model, name.as_deref(), config.as_deref()),
        Command::Schema => {
            print_out(&serde_json::to_string_pretty(&liverec::event::event_json_schema()).expect("schema serialises"))
        }
        Command::Serve { config, listen, print_config } => serve_command(config.as_deref(), listen, print_config),
    }
}

/// `simulate`: sends synthetic user traffic to a server and prints the report.
fn simulate(config: liverec::sim::SimConfig) -> ExitCode {
    match actix_web::rt::System::new().block_on(liverec::sim::run(config)) {
        Ok(report) => print_out(&serde_json::to_string_pretty(&report).expect("reports serialise")),
        Err(error) => {
            eprintln!("liverec: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `import`: runs the import until its end or a signal, then prints the summary (stderr, and
/// stdout as JSON with `--json`). Exit codes: 0 done, 130 interrupted, 2 bad flags or data,
/// 1 anything else.
fn import_command(options: import::Options, json: bool) -> ExitCode {
    let interrupt: import::Interrupt = Box::pin(wait_for_signal());
    match actix_web::rt::System::new().block_on(import::run(options, interrupt)) {
        Ok(summary) => {
            eprint!("{}", summary.text());
            if json {
                print_out(&serde_json::to_string(&summary).expect("summaries serialise"));
            }
            match (&summary.failed, summary.interrupted) {
                (Some(_), _) => ExitCode::FAILURE,
                (None, true) => ExitCode::from(130),
                (None, false) => ExitCode::SUCCESS,
            }
        }
        Err(error) => {
            eprintln!("liverec import: {error}");
            match error {
                import::ImportError::Usage(_) | import::ImportError::State { .. } => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// `key`: prints a new API key, and the configuration entry that admits it.
fn key(id: &str, role: &str) -> ExitCode {
    let role = match role {
        "producer" => liverec::auth::Role::Producer,
        "reader" => liverec::auth::Role::Reader,
        _ => liverec::auth::Role::Admin,
    };
    match liverec::auth::new_key(id, role) {
        Ok((key, entry)) => {
            eprintln!("# The key, shown once: give it to the client (Authorization: Bearer <key>).");
            println!("{key}");
            eprintln!("# Add this entry to the configuration (it holds only a salted hash):");
            let entry = toml::to_string(&serde_json::json!({ "auth": { "api_keys": [entry] } }))
                .expect("key entries serialise");
            eprintln!("{entry}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("liverec: no random bytes from the system: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `token`: prints a stream token for `user`, signed with the configured secret.
fn token(user: &str, ttl: Option<u64>, config: Option<&std::path::Path>) -> ExitCode {
    let config = match load_config(config, &Overrides::default()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let on = liverec::auth::AuthConfig { mode: liverec::auth::AuthMode::On, ..config.auth.clone() };
    match liverec::auth::Auth::new(&on, false) {
        Ok(auth) => print_out(&auth.mint(user, ttl.unwrap_or(config.auth.token_ttl_secs))),
        Err(error) => {
            eprintln!("liverec: {error}");
            ExitCode::from(2)
        }
    }
}

/// The configuration `path` and the environment give, or the exit code of a command that cannot
/// start (2, the error printed).
fn load_config(path: Option<&std::path::Path>, overrides: &Overrides) -> Result<Config, ExitCode> {
    Config::load(path, overrides).map_err(|error| {
        eprintln!("liverec: {error}");
        ExitCode::from(2)
    })
}

/// `publish`: adds the version in `dir` to the configured registry as `name`.
fn publish(dir: &std::path::Path, name: Option<&str>, config: Option<&std::path::Path>) -> ExitCode {
    let config = match load_config(config, &Overrides::default()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let Some(name) = name.map(str::to_owned).or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
    else {
        eprintln!("liverec: --model {} has no folder name; give the version's name with --name", dir.display());
        return ExitCode::from(2);
    };
    let published = liverec::models::registry::Registry::open(&config.model)
        .and_then(|registry| registry.publish(dir, &name).map(|published| (registry, published)));
    match published {
        Ok((registry, published)) if published.files == 0 => {
            println!("{name} is already in {registry} (--model is the registry's own folder)");
            ExitCode::SUCCESS
        }
        Ok((registry, published)) => {
            println!(
                "published {name} to {registry}: {} files, {} bytes, {} parts",
                published.files, published.bytes, published.parts
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("liverec: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `serve`: loads the configuration, installs logging and tracing, and runs the server until a
/// signal (or prints the configuration).
fn serve_command(
    config: Option<&std::path::Path>,
    listen: Option<std::net::SocketAddr>,
    print_config: bool,
) -> ExitCode {
    let config = match load_config(config, &Overrides { listen }) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if print_config {
        match toml_text(&config) {
            Ok(text) => print!("{text}"),
            Err(error) => eprintln!("liverec: {error}"),
        }
        return ExitCode::SUCCESS;
    }
    let _telemetry = match liverec::telemetry::init(&config.log, &config.tracing) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("liverec: {error}");
            return ExitCode::from(2);
        }
    };
    match actix_web::rt::System::new().block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("liverec: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `text` and a newline to stdout. A reader that has gone away (`liverec schema | head`)
/// ends the command quietly, as any Unix filter does; `println!` would panic there.
fn print_out(text: &str) -> ExitCode {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("liverec: cannot write to stdout: {error}");
            ExitCode::FAILURE
        }
    }
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("liverec: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text an outer message
/// already carries (`cannot read x: <os error>` would otherwise repeat the OS error).
fn describe(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// `train` and `eval`: offline work on a dataset, no server.
mod offline {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use anyhow::Context as _;
    use liverec::models::artifact::{rfc3339, DataWindow, Manifest, SavedMetrics};
    use liverec::models::data::{Dataset, Layout, Split, ML100K_DIGESTS};
    use liverec::models::eval::{
        evaluate, evaluate_all, markdown_report, serving_lists, PartMetrics, PopularityRanker, Ranker,
        SequentialRanker, ServingRanker,
    };
    use liverec::models::sequential::SequentialModel;
    use liverec::models::train::{train as train_model, TrainFile};

    fn load(data: &Path) -> anyhow::Result<(Dataset, Layout, Split)> {
        let (dataset, layout) = Dataset::load(data)?;
        let split = Split::leave_one_out(&dataset.sequences);
        eprintln!(
            "data: {} ({layout:?} layout): {} users, {} items, {} interactions",
            data.display(),
            dataset.users.len(),
            dataset.items.len(),
            dataset.interactions()
        );
        Ok((dataset, layout, split))
    }

    /// Prints the split's digests and whether they are MovieLens-100K's reference ones.
    fn digest_notes(dataset: &Dataset, split: &Split) -> Vec<String> {
        let digests = split.digests(dataset);
        let matches = digests.iter().zip(ML100K_DIGESTS).all(|((_, n, d), (_, rn, rd))| *n == rn && d == rd);
        let mut notes: Vec<String> =
            digests.iter().map(|(part, n, d)| format!("split {part}: {n} lines, sha256 {d}")).collect();
        notes.push(if matches {
            "split digests match the MovieLens-100K reference split".to_owned()
        } else {
            "split digests differ from the MovieLens-100K reference (expected for other data)".to_owned()
        });
        for note in &notes {
            eprintln!("{note}");
        }
        notes
    }

    fn write_report(path: &Path, text: &str) -> anyhow::Result<()> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report: {}", path.display());
        Ok(())
    }

    fn print_table(results: &BTreeMap<String, PartMetrics>) {
        println!(
            "{:<12} {:<6} {:>7} {:>8} {:>7} {:>7} {:>8}",
            "model", "part", "HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20"
        );
        for (name, m) in results {
            for (part, m) in [("test", m.test), ("valid", m.valid)] {
                println!(
                    "{name:<12} {part:<6} {:>7.4} {:>8.4} {:>7.4} {:>7.4} {:>8.4}",
                    m.hr10, m.ndcg10, m.mrr10, m.hr20, m.ndcg20
                );
            }
        }
    }

    pub fn train(data: &Path, out: &Path, config: Option<&Path>, quiet: bool) -> anyhow::Result<()> {
        liverec::models::keep_freed_memory();
        let file: TrainFile = match config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => TrainFile::default(),
        };
        let (dataset, layout, split) = load(data)?;
        let mut notes = digest_notes(&dataset, &split);
        let mut trained = train_model(&dataset, &split, &file, !quiet)?;
        let seconds = trained.summary.seconds;
        let selected = trained.summary.selected_epochs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", ");
        eprintln!(
            "trained in {seconds:.1} s ({:.1} s an epoch, {:.1} s validating): {} epochs, kept epochs {selected} (valid ndcg@10 {:.4})",
            trained.summary.seconds_per_epoch,
            trained.summary.eval_seconds,
            trained.summary.epochs_run,
            trained.valid.ndcg10
        );

        // Test metrics are computed after model selection, for the record only.
        let test = {
            let mut ranker = SequentialRanker::new(&mut trained.model, &dataset, "sasrec");
            evaluate(&dataset, &split, liverec::models::data::Part::Test, &mut ranker, 512)?
        };
        let (first, last) = dataset.time_window().unzip();
        let now = liverec::event::now_ms() / 1000;
        let mut manifest = Manifest {
            format: String::new(),
            version: String::new(),
            created_at: rfc3339(now),
            config: trained.model.config.clone(),
            serve: trained.model.serve.clone(),
            data: DataWindow {
                source: data.display().to_string(),
                layout: Some(layout),
                users: dataset.users.len(),
                items: dataset.items.len(),
                interactions: dataset.interactions(),
                train_interactions: split.train_interactions(),
                first_timestamp: first,
                last_timestamp: last,
                split: "leave-one-out by user: last = test, second-to-last = valid".to_owned(),
                ..DataWindow::default()
            },
            metrics: SavedMetrics { valid: Some(trained.valid), test: Some(test) },
            training: trained.summary.clone(),
            weights_sha256: String::new(),
        };
        trained.model.save(out, &mut manifest)?;
        eprintln!("saved {} to {}", manifest.version, out.display());

        let mut pop = PopularityRanker::new(&dataset, &split);
        let mut results = evaluate_all(&dataset, &split, &mut [&mut pop], 512)?;
        results.insert("sasrec".to_owned(), PartMetrics { test, valid: trained.valid });
        print_table(&results);
        notes.push(format!(
            "model {}: trained in {seconds:.1} s ({:.1} s an epoch of training steps, {:.1} s in validation passes), {} epochs, kept epochs {selected} ({})",
            manifest.version,
            trained.summary.seconds_per_epoch,
            trained.summary.eval_seconds,
            trained.summary.epochs_run,
            if file.train.average_checkpoints { "their weights averaged" } else { "the middle one's weights" }
        ));
        let mut report = markdown_report("liverec train: evaluation", &results, &notes);
        report.push_str(
            "
## Training log

| epoch | loss | valid NDCG@10 | seconds (training) | seconds (validation) |
|---|---|---|---|---|
",
        );
        for e in &trained.log {
            report.push_str(&format!(
                "| {} | {:.4} | {} | {:.1} | {:.1} |
",
                e.epoch,
                e.loss,
                e.valid_ndcg10.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}")),
                e.seconds,
                e.eval_seconds
            ));
        }
        write_report(&out.join("training.md"), &report)
    }

    /// Where the serving-path evaluation runs.
    pub enum Served {
        /// An in-process server for the evaluated model, with this config file's settings.
        InProcess { config: Option<PathBuf> },
        /// A running server.
        Target { url: String, api_key: Option<String> },
    }

    /// The serving-path evaluation (see `liverec::eval`); returns the row's name, its metrics
    /// and the served lists.
    fn served(
        served: Served,
        model_dir: Option<&Path>,
        dataset: &Dataset,
        split: &Split,
    ) -> anyhow::Result<(String, liverec::eval::ServedRun)> {
        let started = std::time::Instant::now();
        let (name, run) = actix_web::rt::System::new().block_on(async {
            match served {
                Served::InProcess { config } => {
                    let dir = model_dir.context("--serve needs --model")?;
                    let base = liverec::config::Config::load(config.as_deref(), &Default::default())?;
                    let config = liverec::eval::serve_model(base, dir)?;
                    // No logging set up: the server's log lines go to stdout, where --json prints.
                    let server = liverec::Server::start(config).await?;
                    let run = liverec::eval::evaluate_served(&server.url(), None, dataset, split).await;
                    server.stop().await;
                    anyhow::Ok(("sasrec-served".to_owned(), run?))
                }
                Served::Target { url, api_key } => {
                    let run = liverec::eval::evaluate_served(&url, api_key, dataset, split).await?;
                    anyhow::Ok(("served".to_owned(), run))
                }
            }
        })?;
        eprintln!(
            "{name}: {} events replayed and {} users asked, in {:.1} s",
            run.events,
            2 * run.test_lists.iter().filter(|l| !l.is_empty()).count(),
            started.elapsed().as_secs_f64()
        );
        Ok((name, run))
    }

    /// What `liverec eval` ranks besides popularity and the network.
    pub struct EvalOptions {
        /// Two-stage retrieval forced on with this many candidates per source.
        pub two_stage_candidates: Option<usize>,
        /// The network given what a server has, one difference at a time.
        pub explain: bool,
        /// The serving-path evaluation.
        pub served: Option<Served>,
    }

    pub fn eval(
        data: &Path,
        model_dir: Option<&Path>,
        json: bool,
        report: Option<&Path>,
        options: EvalOptions,
    ) -> anyhow::Result<()> {
        let EvalOptions { two_stage_candidates, explain, served: served_by } = options;
        liverec::models::keep_freed_memory();
        let (dataset, _, split) = load(data)?;
        let mut notes = digest_notes(&dataset, &split);
        let mut pop = PopularityRanker::new(&dataset, &split);
        let mut loaded = match model_dir {
            Some(dir) => {
                let (model, manifest) =
                    SequentialModel::load(dir).with_context(|| format!("loading model from {}", dir.display()))?;
                notes.push(format!("model: {} ({})", manifest.version, dir.display()));
                Some(model)
            }
            None => None,
        };
        let started = std::time::Instant::now();
        let mut results = match loaded.as_mut() {
            Some(model) => {
                let mut ranker = SequentialRanker::new(model, &dataset, "sasrec");
                let rankers: &mut [&mut dyn Ranker] = &mut [&mut pop, &mut ranker];
                evaluate_all(&dataset, &split, rankers, 512)?
            }
            None => evaluate_all(&dataset, &split, &mut [&mut pop], 512)?,
        };
        if let (true, Some(model)) = (explain, loaded.as_mut()) {
            for (name, no_user, last_hour) in [
                ("sasrec-no-user", true, false),
                ("sasrec-last-hour", false, true),
                ("sasrec-no-user-last-hour", true, true),
            ] {
                let mut ranker = SequentialRanker::new(model, &dataset, name);
                if no_user {
                    ranker = ranker.without_demographics();
                }
                if last_hour {
                    ranker = ranker.hour_of_last_event();
                }
                results.extend(evaluate_all(&dataset, &split, &mut [&mut ranker], 512)?);
            }
        }
        // The serving computation offline: what the server returns for the same events.
        let mut offline_lists = None;
        if let Some(model) = loaded.as_mut() {
            let exact = liverec::config::RetrievalConfig { min_items: usize::MAX, ..Default::default() };
            // The session's window of the server evaluated in process (its config file's), else
            // the default.
            let window = match &served_by {
                Some(Served::InProcess { config }) => {
                    liverec::config::Config::load(config.as_deref(), &Default::default())?.session.history_len
                }
                _ => liverec::config::Config::default().session.history_len,
            };
            let mut ranker = ServingRanker::new(model, &dataset, &exact, 20, "sasrec-serving")?.with_window(window);
            results.extend(evaluate_all(&dataset, &split, &mut [&mut ranker], 512)?);
            if served_by.is_some() {
                offline_lists = Some(serving_lists(&mut ranker, &dataset, &split, 512));
            }
            notes.push(
                "sasrec-serving: the serving computation offline (top 20 of Recommender::score: popularity \
                 blend, every history item excluded, the newest event's hour, unknown demographics)"
                    .to_owned(),
            );
        }
        if let Some(served_by) = served_by {
            let (name, run) = served(served_by, model_dir, &dataset, &split)?;
            if let Some((valid, test)) = &offline_lists {
                let differ = |a: &[Vec<String>], b: &[Vec<String>]| a.iter().zip(b).filter(|(x, y)| x != y).count();
                let note = format!(
                    "{name}: lists different from sasrec-serving's: {} of {} users before the validation item, \
                     {} before the test item",
                    differ(valid, &run.valid_lists),
                    run.valid_lists.iter().filter(|l| !l.is_empty()).count(),
                    differ(test, &run.test_lists)
                );
                eprintln!("{note}");
                notes.push(note);
            }
            results.insert(name, run.metrics);
        }
        if let (Some(candidates), Some(model)) = (two_stage_candidates, loaded.as_mut()) {
            use liverec::config::RetrievalConfig;
            let forced = RetrievalConfig {
                min_items: 0,
                ann_candidates: candidates,
                popular_candidates: candidates,
                cold_candidates: candidates,
                // Lists of 40 with 4 probed: the index scans about a tenth of a small catalogue
                // (with the default 1,000 per list, MovieLens's 1,682 items make one list, an
                // exact scan).
                ann_list_size: 40,
                ann_probe: 4,
                ..RetrievalConfig::default()
            };
            let two_stage_name = format!("sasrec-serving-two-stage-{candidates}");
            let mut ranker = ServingRanker::new(model, &dataset, &forced, 20, &two_stage_name)?;
            results.extend(evaluate_all(&dataset, &split, &mut [&mut ranker], 512)?);
            notes.push(format!(
                "sasrec-serving-two-stage-*: as sasrec-serving, with two-stage retrieval: {candidates} \
                 candidates per source, ann_probe {}, ann_list_size {}",
                forced.ann_probe, forced.ann_list_size
            ));
        }
        notes.push(format!("evaluated in {:.2} s", started.elapsed().as_secs_f64()));
        if json {
            println!("{}", serde_json::to_string(&results)?);
        } else {
            print_table(&results);
        }
        let path: PathBuf = match (report, model_dir) {
            (Some(path), _) => path.to_owned(),
            (None, Some(dir)) => dir.join("report.md"),
            (None, None) => PathBuf::from("reports/eval.md"),
        };
        write_report(&path, &markdown_report("liverec eval", &results, &notes))
    }
}

fn toml_text(config: &Config) -> Result<String, String> {
    toml::to_string_pretty(config).map_err(|e| e.to_string())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let memory_only = config.store.kind == liverec::config::StoreKind::Memory;
    let server = Server::start(config).await?;
    if memory_only {
        tracing::warn!(
            "embedded mode: events and profiles are kept in memory only and are lost when the process stops"
        );
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.stop().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
