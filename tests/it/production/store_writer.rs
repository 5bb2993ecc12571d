//! The Redis store's writer lanes: one user's appends queued together become one script call, in
//! order, de-duplicated and trimmed, while many users spread over several lanes keep their order.
//!
//! The call count is read from `INFO commandstats`, so these tests start a Redis server of their
//! own (the shared one counts every other test's commands too).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use futures_util::future::join_all;
use liverec::config::RedisConfig;
use liverec::event::{EventId, EventType, ItemId, UserId};
use liverec::store::redis::RedisStore;
use liverec::store::{Interaction, ProfileLimits, ProfileStore, ProfileUpdate};
use liverec::telemetry::Metrics;

use crate::support::*;

/// A `redis-server` of the test's own (no persistence), stopped when dropped.
pub(super) struct PrivateRedis {
    child: Child,
    pub(super) url: String,
}

impl PrivateRedis {
    pub(super) async fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server from Debian's packages (scripts/services installs it)");
        let url = format!("redis://127.0.0.1:{port}");
        let redis = Self { child, url };
        eventually("the private redis answers", || async { redis.info("server").await.map(|_| ()) }).await;
        redis
    }

    async fn info(&self, section: &str) -> Option<String> {
        let client = redis::Client::open(self.url.as_str()).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("INFO").arg(section).query_async(&mut conn).await.ok()
    }

    /// How many times Redis ran `command` (from `INFO commandstats`).
    pub(super) async fn calls(&self, command: &str) -> u64 {
        let stats = self.info("commandstats").await.expect("commandstats");
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().expect("a count"))
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const LIMITS: ProfileLimits = ProfileLimits::sized(50, 1000, 10);

fn store(redis: &PrivateRedis, lanes: usize) -> (RedisStore, actix_rt::Arbiter) {
    let config = RedisConfig {
        url: redis.url.clone(),
        key_prefix: "writer".into(),
        write_pipelines: lanes,
        ..Default::default()
    };
    let arbiter = actix_rt::Arbiter::new();
    let store = RedisStore::start(&config, LIMITS, Arc::new(Metrics::default()), &arbiter.handle()).expect("store");
    (store, arbiter)
}

fn update(user: &str, ids: &[String]) -> ProfileUpdate {
    let interactions = ids
        .iter()
        .map(|id| Interaction {
            event_id: EventId::from(id.as_str()),
            item_id: ItemId::from(format!("item-{id}").as_str()),
            event_type: EventType::View,
            value: None,
            timestamp: 1,
            rec_id: None,
        })
        .collect();
    ProfileUpdate { user_id: UserId::from(user), interactions, context: None, suppressed: vec![] }
}

fn stored_ids(profile: &liverec::store::Profile) -> Vec<String> {
    profile.interactions.iter().map(|i| i.event_id.as_str().to_owned()).collect()
}

#[actix_rt::test]
async fn one_users_appends_queued_together_take_few_script_calls_applied_once_in_order() {
    let redis = PrivateRedis::start().await;
    let (store, arbiter) = store(&redis, 4);
    // Warm the pool and the script cache, so the count below is only the appends.
    store.append(update("warm", &["w0".into()])).await;
    let before = redis.calls("evalsha").await;

    // 300 appends of one user queued back to back; every tenth sends an already sent id again.
    let ids: Vec<String> = (0..300).map(|i| format!("e{i}")).collect();
    let persisted: Vec<_> = (0..300)
        .map(|i| {
            let mut batch = vec![ids[i].clone()];
            if i % 10 == 9 {
                batch.push(ids[i - 5].clone());
            }
            store.append(update("ann", &batch))
        })
        .collect();
    join_all(persisted).await;

    let calls = redis.calls("evalsha").await - before;
    assert!(calls < 300, "300 appends of one user queued together took {calls} script calls (one each)");
    let profile = store.load(&UserId::from("ann")).await.expect("load").expect("stored");
    assert_eq!(stored_ids(&profile), ids[250..].to_vec(), "the newest 50, in order, each once");
    assert_eq!(profile.event_ids.len(), 300, "every id remembered once");
    arbiter.stop();
}

#[actix_rt::test]
async fn users_spread_over_several_writer_lanes_keep_their_order() {
    let redis = PrivateRedis::start().await;
    let (store, arbiter) = store(&redis, 4);
    let users: Vec<String> = (0..40).map(|u| format!("user-{u}")).collect();
    let mut persisted = Vec::new();
    for round in 0..30 {
        for user in &users {
            persisted.push(store.append(update(user, &[format!("{user}-{round}")])));
        }
    }
    join_all(persisted).await;
    for user in &users {
        let profile = store.load(&UserId::from(user.as_str())).await.expect("load").expect("stored");
        let expected: Vec<String> = (0..30).map(|round| format!("{user}-{round}")).collect();
        assert_eq!(stored_ids(&profile), expected, "{user}'s events in the order they were appended");
    }
    arbiter.stop();
}

/// Kafka redelivers the uncommitted tail to a new process after a crash: the same events appended
/// again by another store (other lanes), queued together with new ones, are applied once and in
/// order, by the store itself.
#[actix_rt::test]
async fn events_redelivered_to_a_new_process_are_applied_once_in_order() {
    let redis = PrivateRedis::start().await;
    let users: Vec<String> = (0..20).map(|u| format!("user-{u}")).collect();
    let ids = |user: &str, range: std::ops::Range<usize>| range.map(|n| format!("{user}-{n}")).collect::<Vec<_>>();
    let (first, arbiter) = store(&redis, 4);
    join_all(users.iter().flat_map(|user| ids(user, 0..10)).map(|id| {
        let user = id.rsplit_once('-').expect("user-n").0.to_owned();
        first.append(update(&user, &[id]))
    }))
    .await;
    arbiter.stop();

    let (second, arbiter) = store(&redis, 3);
    let mut persisted = Vec::new();
    for user in &users {
        // The tail from event 5 comes again, one event an append as the session sends them.
        for id in ids(user, 5..15) {
            persisted.push(second.append(update(user, &[id])));
        }
    }
    join_all(persisted).await;
    for user in &users {
        let profile = second.load(&UserId::from(user.as_str())).await.expect("load").expect("stored");
        assert_eq!(stored_ids(&profile), ids(user, 0..15), "{user}'s events once each, in order");
        assert_eq!(profile.event_ids.len(), 15, "{user}: every id remembered once");
    }
    arbiter.stop();
}

/// A list saved with no append of its user in the same pipeline is a script call of its own: it
/// replaces the stored list and leaves the context and the de-duplication window as they were.
#[actix_rt::test]
async fn a_list_stored_on_its_own_keeps_the_users_context_and_window() {
    use liverec::event::{Context, Device};
    use liverec::recs::{RecItem, RecList, RecUpdate};
    let redis = PrivateRedis::start().await;
    let (store, arbiter) = store(&redis, 2);
    let ann = UserId::from("ann");
    let mut first = update("ann", &["a1".into(), "a2".into()]);
    first.context = Some(Context { device: Device::Tablet, hour: 3, ..Default::default() });
    store.append(first).await;
    let list = RecUpdate::new(RecList {
        rec_id: "r-1".into(),
        user_id: ann.clone(),
        model_version: "m".into(),
        variant: "control".into(),
        generated_at: 1,
        seq: 4,
        last_event_id: Some(EventId::from("a2")),
        items: vec![RecItem { item_id: ItemId::from("i-9"), score: 0.5 }],
    });
    store.save_recs(&list);
    // Stored before anything else is queued, so it is a call of its own (not one shared with the
    // append below).
    eventually("the list stored on its own", || async {
        let stored = store.load(&ann).await.ok()??;
        (stored.last_recs.as_ref() == Some(&list.list)).then_some(())
    })
    .await;
    // An append with nothing new: the window is whole.
    store.append(update("ann", &["a1".into()])).await;
    let profile = store.load(&ann).await.expect("load").expect("stored");
    assert_eq!(profile.last_recs.as_ref(), Some(&list.list));
    assert_eq!(profile.context.as_ref().map(|c| c.device), Some(Device::Tablet));
    assert_eq!(stored_ids(&profile), ["a1", "a2"], "a1 again was skipped: the window is whole");
    assert_eq!(profile.event_ids.len(), 2);
    arbiter.stop();
}
