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

/// Polls `check` until it returns `Some`, failing the test after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(DEADLINE, what, check).await
}

/// [`eventually`] with a bound of its own, for a wait that spans several stages of work (a
/// whole retraining run with its canary) on a machine shared with the rest of the suite.
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
