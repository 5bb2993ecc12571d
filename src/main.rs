//! The `liverec` command: parses the command line and wires the server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use liverec::config::{Config, Overrides};
use liverec::Server;

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
    },
}

fn main() -> ExitCode {
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
                ..liverec::sim::SimConfig::default()
            };
            match actix_web::rt::System::new().block_on(liverec::sim::run(config)) {
                Ok(report) => {
                    println!("{}", serde_json::to_string_pretty(&report).expect("reports serialise"));
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("liverec: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&liverec::event::event_json_schema()).expect("schema serialises")
            );
            ExitCode::SUCCESS
        }
        Command::Serve { config, listen, print_config } => {
            let config = match Config::load(config.as_deref(), &Overrides { listen }) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("liverec: {error}");
                    return ExitCode::from(2);
                }
            };
            if print_config {
                match toml_text(&config) {
                    Ok(text) => print!("{text}"),
                    Err(error) => eprintln!("liverec: {error}"),
                }
                return ExitCode::SUCCESS;
            }
            liverec::telemetry::init_logging(&config.log);
            match actix_web::rt::System::new().block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("liverec: {error}");
                    ExitCode::FAILURE
                }
            }
        }
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
