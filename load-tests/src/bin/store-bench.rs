//! `store-bench`: drives the Redis profile store's append path directly, as fast as it takes
//! appends, and reports appended events per second and the CPU Redis and this process used.
//!
//! It calls `RedisStore::append` the way sessions do (one update per user batch, each followed by
//! its pushed list unless `--lists 0`; with `--watched 0.1` only a tenth of the users' lists, as
//! the owner stores only the lists of watched users), keeps at most `--window` appends waiting to
//! be durable (the Kafka consumer's bound), and counts an event only when its `Persisted` future resolves.
//!
//! ```sh
//! eval "$(scripts/services up)"
//! cargo run --release -p liverec-load --bin store-bench -- --redis "$LIVEREC_TEST_REDIS_URL"
//! ```
//!
//! Loopback only: it writes under its own key prefix (`--prefix`), which it deletes at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use liverec::config::RedisConfig;
use liverec::event::{EventId, EventType, ItemId, UserId};
use liverec::recs::{RecItem, RecList, RecUpdate};
use liverec::store::redis::RedisStore;
use liverec::store::{Interaction, ProfileLimits, ProfileStore as _, ProfileUpdate};
use liverec::telemetry::Metrics;

#[derive(Parser)]
#[command(name = "store-bench", about = "Appends to the Redis profile store at full speed (loopback only)")]
struct Cli {
    /// Redis to write to (loopback only).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Key prefix of the run (deleted afterwards).
    #[arg(long, default_value = "storebench")]
    prefix: String,
    /// Distinct users the events are spread over.
    #[arg(long, default_value_t = 20_000)]
    users: u64,
    /// Events in one append (one session batch of one user).
    #[arg(long, default_value_t = 1)]
    events_per_append: usize,
    /// Appends of one user queued back to back (a burst of one user, coalesced by the writer).
    #[arg(long, default_value_t = 1)]
    burst: usize,
    /// Pushed lists stored and published per append (0 or 1).
    #[arg(long, default_value_t = 1)]
    lists: u8,
    /// Share of users some instance watches (0-1): only their lists are stored and published, as
    /// the owner's session does with `redis.watch_ttl_secs` on (1: every list, as before).
    #[arg(long, default_value_t = 1.0)]
    watched: f64,
    /// Appends waiting to be durable at most.
    #[arg(long, default_value_t = 20_000)]
    window: usize,
    /// Seconds of measured load (after one second of warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// `redis.write_batch`.
    #[arg(long, default_value_t = 512)]
    write_batch: usize,
    /// `redis.pool_size`.
    #[arg(long, default_value_t = 8)]
    pool_size: usize,
    /// Extra `[redis]` keys as `key=value` (TOML values), e.g. `--set write_pipelines=4`.
    #[arg(long = "set")]
    set: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !cli.redis.contains("127.0.0.1") && !cli.redis.contains("localhost") {
        bail!("--redis must be a loopback address");
    }
    let mut config = RedisConfig {
        url: cli.redis.clone(),
        key_prefix: cli.prefix.clone(),
        pool_size: cli.pool_size,
        write_batch: cli.write_batch,
        ..RedisConfig::default()
    };
    if !cli.set.is_empty() {
        let mut table = toml::Table::try_from(&config).context("redis config as toml")?;
        for pair in &cli.set {
            let (key, value) = pair.split_once('=').context("--set wants key=value")?;
            let value: toml::Value = toml::from_str(&format!("v = {value}"))
                .map(|t: toml::Table| t["v"].clone())
                .unwrap_or_else(|_| toml::Value::String(value.to_owned()));
            table.insert(key.to_owned(), value);
        }
        config = table.try_into().context("--set: unknown or invalid [redis] key")?;
    }
    let system = actix_rt::System::new();
    let report = system.block_on(async move { run(&cli, &config).await })?;
    println!("{report}");
    Ok(())
}

async fn run(cli: &Cli, config: &RedisConfig) -> anyhow::Result<String> {
    let limits = ProfileLimits::sized(50, 1000, 500);
    let arbiter = actix_rt::Arbiter::new();
    let store = Arc::new(RedisStore::start(config, limits, Arc::new(Metrics::default()), &arbiter.handle())?);
    if !store.ping().await {
        bail!("redis at {} does not answer", cli.redis);
    }
    delete_prefix(&cli.redis, &cli.prefix)?;

    let mut in_flight = FuturesUnordered::new();
    let started = Instant::now();
    let warm_up = Duration::from_secs(1);
    let end = warm_up + Duration::from_secs(cli.duration);
    let (mut measured_from, mut counted, mut total) = (None, 0u64, 0u64);
    let (mut redis_cpu0, mut own_cpu0, mut redis_in0) = (0.0, 0.0, 0.0);
    let mut seq = 0u64;
    let mut user_no = 0u64;
    while started.elapsed() < end {
        if measured_from.is_none() && started.elapsed() >= warm_up {
            measured_from = Some(Instant::now());
            redis_cpu0 = redis_cpu(&cli.redis)?;
            redis_in0 = redis_input_bytes(&cli.redis)?;
            own_cpu0 = own_cpu();
            counted = 0;
        }
        while in_flight.len() < cli.window {
            user_no = (user_no + 1) % cli.users;
            let user = UserId::from(format!("u{user_no}").as_str());
            for _ in 0..cli.burst {
                seq += 1;
                let interactions = (0..cli.events_per_append)
                    .map(|i| Interaction {
                        event_id: EventId::from(format!("e{seq}-{i}").as_str()),
                        item_id: ItemId::from(format!("item-{}", (seq * 7 + i as u64) % 5000).as_str()),
                        event_type: EventType::Click,
                        value: None,
                        timestamp: 1_700_000_000_000 + seq as i64,
                        rec_id: None,
                    })
                    .collect();
                let update = ProfileUpdate { user_id: user.clone(), interactions, context: None, suppressed: vec![] };
                in_flight.push(store.append(update));
                if cli.lists > 0 {
                    // Built either way: the session builds every list (its own subscribers and
                    // GETs), stored or not, so only the store's work differs.
                    let update = list(&user, seq);
                    if watched(user_no, cli.watched) {
                        store.save_recs(&update);
                    }
                }
            }
        }
        if in_flight.next().await.is_some() {
            counted += cli.events_per_append as u64;
            total += cli.events_per_append as u64;
        }
    }
    let measured = measured_from.map_or(Duration::ZERO, |t| t.elapsed()).as_secs_f64();
    let redis_cpu = redis_cpu(&cli.redis)? - redis_cpu0;
    let redis_in = redis_input_bytes(&cli.redis)? - redis_in0;
    let own = own_cpu() - own_cpu0;
    while in_flight.next().await.is_some() {}
    let keys = delete_prefix(&cli.redis, &cli.prefix)?;
    arbiter.stop();
    Ok(format!(
        "appended {:.0} events/s ({counted} events in {measured:.1} s; {total} in all; {} keys); \
         redis CPU {:.2} cores ({:.1} us/event); bench process CPU {:.2} cores ({:.1} us/event); \
         sent to redis {:.0} bytes/event",
        counted as f64 / measured,
        keys,
        redis_cpu / measured,
        redis_cpu * 1e6 / counted.max(1) as f64,
        own / measured,
        own * 1e6 / counted.max(1) as f64,
        redis_in / counted.max(1) as f64,
    ))
}

/// Whether user number `n` is one of the `share` of users watched (spread evenly over the ids).
fn watched(n: u64, share: f64) -> bool {
    ((n % 1000) as f64) < share * 1000.0
}

fn list(user: &UserId, seq: u64) -> Arc<RecUpdate> {
    RecUpdate::new(RecList {
        rec_id: format!("r{seq}"),
        user_id: user.clone(),
        model_version: "bench".into(),
        variant: "control".into(),
        generated_at: 1_700_000_000_000,
        seq,
        last_event_id: None,
        items: (0..10).map(|i| RecItem { item_id: ItemId::from(format!("item-{i}").as_str()), score: 0.5 }).collect(),
    })
}

/// Runs `redis-cli -u URL ARGS...` and returns its output (the bench keeps to the dependencies
/// the load generator already has).
fn redis_cli(url: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("redis-cli").arg("-u").arg(url).args(args).output().context("redis-cli")?;
    if !out.status.success() {
        bail!("redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Redis's own CPU seconds so far (user + system), from `INFO cpu`.
fn redis_cpu(url: &str) -> anyhow::Result<f64> {
    Ok(redis_cli(url, &["INFO", "cpu"])?
        .lines()
        .filter_map(|l| l.strip_prefix("used_cpu_sys:").or_else(|| l.strip_prefix("used_cpu_user:")))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum())
}

/// Bytes Redis has read from its clients so far (`INFO stats`, every client's commands).
fn redis_input_bytes(url: &str) -> anyhow::Result<f64> {
    Ok(redis_cli(url, &["INFO", "stats"])?
        .lines()
        .find_map(|l| l.strip_prefix("total_net_input_bytes:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0))
}

fn own_cpu() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Deletes the run's keys; returns how many there were.
fn delete_prefix(url: &str, prefix: &str) -> anyhow::Result<i64> {
    const SCRIPT: &str =
        "local ks = redis.call('KEYS', ARGV[1]) for _, k in ipairs(ks) do redis.call('UNLINK', k) end return #ks";
    let out = redis_cli(url, &["EVAL", SCRIPT, "0", &format!("{prefix}:*")])?;
    Ok(out.trim().parse().unwrap_or(0))
}
