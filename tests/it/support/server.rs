//! The server under test: its configuration, starting it on `127.0.0.1:0`, and waiting for
//! what it does with a deadline instead of sleeping.

use std::future::Future;
use std::time::{Duration, Instant};

use liverec::config::Config;
use liverec::Server;

/// How long any single wait may take before the test fails: generous, because a loaded CI
/// machine joining a Kafka consumer group can take many seconds. It bounds a hang; it asserts
/// nothing about speed.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The bound of a wait on what another process does in its own time (a client noticing that
/// Redis went away, a control record through Kafka): on a machine at load 16 two such waits
/// passed 60 s. Like [`DEADLINE`], it bounds a hang and asserts nothing about speed.
pub const SERVICE_DEADLINE: Duration = Duration::from_secs(180);

/// The configuration every test server starts from: the embedded default, a free port, a small
/// demo catalogue (so start-up is quick), and two threads of each kind.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    config.server.workers = 2;
    config.session.arbiters = 2;
    config.demo.items = 200;
    config.demo.users = 300;
    config.log.level = "warn".into();
    config
}

pub async fn start(config: Config) -> Server {
    liverec::telemetry::init_logging(&config.log);
    Server::start(config).await.expect("server starts")
}

/// Polls `check` until it returns `Some`, failing the test after [`DEADLINE`]. For one state
/// change that needs no amount of work (a flag flips, a reply arrives): a wait for an amount of
/// work takes [`wait_for_progress`] instead.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(DEADLINE, what, check).await
}

/// [`eventually`] with a bound of its own.
pub async fn eventually_within<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a [`wait_for_progress`] check sees: done with a value, or not yet at a marker of how far
/// the work has come (a count, a stage); any change of the marker is progress.
pub enum Progress<T, M> {
    Done(T),
    Pending(M),
}

/// Polls `check` until it is [`Progress::Done`]. It fails only on a stall: when the marker has
/// not moved for `stall`. However slow the machine, a wait that keeps moving keeps waiting;
/// nothing here demands an amount of work within a time.
pub async fn wait_for_progress<T, M, F, Fut>(what: &str, stall: Duration, mut check: F) -> T
where
    M: PartialEq + std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Progress<T, M>>,
{
    let mut last: Option<M> = None;
    let mut moved = Instant::now();
    loop {
        match check().await {
            Progress::Done(value) => return value,
            Progress::Pending(marker) => {
                if last.as_ref() != Some(&marker) {
                    last = Some(marker);
                    moved = Instant::now();
                }
            }
        }
        assert!(
            moved.elapsed() < stall,
            "stalled waiting for {what}: no progress for {stall:?} (last seen at {last:?})"
        );
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A free port on 127.0.0.1, for a liverec process started with `--listen`.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A child process (a liverec started as a user runs it) killed when the test ends, also when
/// it fails.
pub struct KilledOnDrop(pub std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
