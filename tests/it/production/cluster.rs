//! Production mode on a Redis Cluster: the three masters the test command starts
//! (`scripts/services up`, `LIVEREC_TEST_REDIS_CLUSTER_NODES`), two liverec instances on one Kafka
//! topic, and a master SIGKILLed under them (docs/production.md, "Redis Cluster").

use std::collections::HashSet;
use std::process::Command;

use deadpool_redis::redis::{self, AsyncCommands as _};
use liverec::bus::kafka::partition_for;
use liverec::config::Config;
use serde_json::{json, Value};

use super::two_instances;
use crate::support::*;

/// The cluster tests take this lock: the one that kills a master for writing, the others for
/// reading, so a dead master never surprises another test.
static CLUSTER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The cluster's nodes, from the environment the test command sets.
fn cluster_nodes() -> Vec<String> {
    let nodes = std::env::var("LIVEREC_TEST_REDIS_CLUSTER_NODES").unwrap_or_else(|_| {
        panic!("LIVEREC_TEST_REDIS_CLUSTER_NODES is not set: run the tests with scripts/test, which starts the Redis Cluster (scripts/services up)")
    });
    nodes.split(',').map(str::to_owned).collect()
}

/// The production configuration of one test with its store on the cluster. The single Redis's URL
/// points nowhere: nothing may go there.
fn cluster_config(name: &str) -> Config {
    let mut config = production_config(name);
    config.redis.cluster_nodes = cluster_nodes();
    config.redis.url = "redis://127.0.0.1:1".into();
    config
}

async fn cluster_conn() -> redis::cluster_async::ClusterConnection {
    redis::cluster::ClusterClient::new(cluster_nodes())
        .expect("cluster nodes")
        .get_async_connection()
        .await
        .expect("cluster connection")
}

/// The master (1 to 3, as `scripts/services cluster-kill` counts them) serving `key`'s slot, and
/// the slot.
async fn master_of(key: &str) -> (usize, u16) {
    let nodes = cluster_nodes();
    let mut first =
        redis::Client::open(nodes[0].as_str()).expect("url").get_multiplexed_async_connection().await.expect("node");
    let slot: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(&mut first).await.expect("keyslot");
    for (index, node) in nodes.iter().enumerate() {
        let mut conn =
            redis::Client::open(node.as_str()).expect("url").get_multiplexed_async_connection().await.expect("node");
        let table: String = redis::cmd("CLUSTER").arg("NODES").query_async(&mut conn).await.expect("cluster nodes");
        let mine = table.lines().find(|line| line.contains("myself")).expect("a line for the node itself");
        let serves = mine.split(' ').skip(8).any(|range| {
            let (from, to) = range.split_once('-').unwrap_or((range, range));
            matches!((from.parse::<u16>(), to.parse::<u16>()), (Ok(from), Ok(to)) if (from..=to).contains(&slot))
        });
        if serves {
            return (index + 1, slot);
        }
    }
    panic!("no master serves slot {slot}");
}

/// Event ids in a user's history in the cluster, in stored order.
async fn cluster_ids(conn: &mut redis::cluster_async::ClusterConnection, config: &Config, user: &str) -> Vec<String> {
    let key = format!("{}:{{{user}}}:h", config.redis.key_prefix);
    let entries: Vec<Vec<u8>> = conn.lrange(&key, 0, -1).await.unwrap_or_default();
    entries
        .iter()
        .map(|e| liverec::store::redis::decode_history_entry(e).expect("a stored interaction").event_id.to_string())
        .collect()
}

/// One user per master (index 0 on master 1, ...), each consumed by instance A.
async fn a_user_per_master(prefix: &str, config: &Config, owned_by_a: &[i32]) -> [String; 3] {
    let mut found: [Option<String>; 3] = [None, None, None];
    for i in 0.. {
        let user = format!("{prefix}-{i}");
        if !owned_by_a.contains(&partition_for(&user, PARTITIONS)) {
            continue;
        }
        let (master, _) = master_of(&format!("{}:{{{user}}}:h", config.redis.key_prefix)).await;
        found[master - 1].get_or_insert(user);
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    found.map(|user| user.expect("a user"))
}

fn view(user: &str, id: &str) -> Value {
    json!({ "user_id": user, "item_id": format!("item-{:04}", id.len() * 7 % 200), "event_type": "view", "event_id": id })
}

/// A list on `stream` that reflects event `id` (the ones before it may predate it).
async fn list_after(stream: &mut SseStream, id: &str) -> Value {
    loop {
        let list = stream.next_list().await;
        if list["last_event_id"] == id {
            return list;
        }
    }
}

/// Events applied, a user's keys together on the slot of its hash tag on the master that serves
/// it, users spread over the three masters, and a list made on instance A reaching a subscriber
/// on instance B over the user's sharded channel (B consumes none of the users).
#[actix_rt::test]
async fn two_instances_on_a_cluster_store_each_user_on_one_slot_and_fan_out_lists() {
    let _services = SERVICES.read().await;
    let _cluster = CLUSTER.read().await;
    let config = cluster_config("cluster");
    let (a, b, owned_by_a) = two_instances(&config).await;
    let users = a_user_per_master("cl-user", &config, &owned_by_a).await;

    let mut streams = Vec::new();
    for user in &users {
        let mut stream = SseStream::connect(&b, user, None).await;
        stream.next_list().await;
        streams.push(stream);
    }
    for (user, stream) in users.iter().zip(&mut streams) {
        post_events(&b, json!([view(user, &format!("{user}-1")), view(user, &format!("{user}-2"))])).await;
        let list = list_after(stream, &format!("{user}-2")).await;
        assert_eq!(list["user_id"], json!(user), "B forwards the list A made");
    }

    let mut conn = cluster_conn().await;
    let mut masters = HashSet::new();
    for user in &users {
        let stored = eventually("the user's events in the cluster", || {
            let (mut conn, config) = (conn.clone(), &config);
            async move {
                let ids = cluster_ids(&mut conn, config, user).await;
                (ids.len() >= 2).then_some(ids)
            }
        })
        .await;
        assert_eq!(stored, [format!("{user}-1"), format!("{user}-2")]);
        let prefix = &config.redis.key_prefix;
        let (master, slot) = master_of(&format!("{prefix}:{{{user}}}:h")).await;
        masters.insert(master);
        // The profile string holds the de-duplication window with the context and the list.
        let key = format!("{prefix}:{{{user}}}:q");
        assert!(conn.exists::<_, bool>(&key).await.expect("EXISTS"), "{key} holds the window");
        assert_eq!(master_of(&key).await, (master, slot), "{key} is on the user's slot");
        assert_eq!(master_of(&format!("{prefix}:updates:{{{user}}}")).await, (master, slot), "the channel too");
    }
    assert_eq!(masters.len(), 3, "the users are spread over the three masters");
    let ready = get(&a, "/readyz").await;
    assert_eq!(ready.body["store"], "redis");
    assert_eq!(ready.body["degraded"], false, "{}", ready.body);
    a.stop().await;
    b.stop().await;
}

/// `scripts/services cluster-start N` when dropped, so a failed test leaves the cluster whole.
struct RestartMaster(Option<usize>);

impl Drop for RestartMaster {
    fn drop(&mut self) {
        if let Some(master) = self.0 {
            let _ = services(&["cluster-start", &master.to_string()]);
        }
    }
}

fn services(args: &[&str]) -> bool {
    Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services"))
        .args(args)
        .status()
        .is_ok_and(|status| status.success())
}

/// What docs/production.md promises when a master's process dies (three masters, no replicas):
/// the writes of its users wait, in order, while their events are still applied and served by the
/// owning instance, which reports the store degraded; the users of the other two masters are
/// stored and fanned out as before; once the master is back every accepted event of its users is
/// stored, each once and in order, and their lists reach other instances again.
#[actix_rt::test]
async fn a_sigkilled_master_holds_back_only_its_users_and_loses_no_accepted_event() {
    let _services = SERVICES.read().await;
    let _cluster = CLUSTER.write().await;
    let config = cluster_config("cluster-kill");
    let (a, b, owned_by_a) = two_instances(&config).await;
    let users = a_user_per_master("ck-user", &config, &owned_by_a).await;
    let (victim, others) = (&users[1], [&users[0], &users[2]]);
    let late = a_user_per_master("ck-late", &config, &owned_by_a).await[1].clone();
    let mut streams = Vec::new();
    for user in &users {
        post_events(&a, json!([view(user, &format!("{user}-0"))])).await;
        let mut stream = SseStream::connect(&b, user, None).await;
        list_after(&mut stream, &format!("{user}-0")).await;
        streams.push(stream);
    }

    assert!(services(&["cluster-kill", "2"]), "scripts/services cluster-kill 2");
    let mut restart = RestartMaster(Some(2));
    for round in 1..=5 {
        for user in &users {
            post_events(&a, json!([view(user, &format!("{user}-{round}"))])).await;
        }
    }
    // The other masters' users: stored, and their lists reach B, while master 2 is down.
    let mut conn = cluster_conn().await;
    for (index, user) in [(0, others[0]), (2, others[1])] {
        let expected: Vec<String> = (0..=5).map(|round| format!("{user}-{round}")).collect();
        eventually("the other masters' users stored while master 2 is down", || {
            let (mut conn, config, expected) = (conn.clone(), &config, &expected);
            async move { (&cluster_ids(&mut conn, config, user).await == expected).then_some(()) }
        })
        .await;
        list_after(&mut streams[index], &format!("{user}-5")).await;
    }
    // The victim's events are applied and served by A, its writes wait.
    let served = eventually("the victim's last event applied and served by A", || async {
        let recs = get(&a, &format!("/v1/users/{victim}/recommendations")).await;
        (recs.status == 200 && recs.body["last_event_id"] == json!(format!("{victim}-5"))).then_some(recs)
    })
    .await;
    assert_eq!(served.body["user_id"], json!(victim));
    // The writer says so once a write to the stopped master has failed (on a busy machine that
    // can come after the list is served).
    eventually("A reports the store unreachable", || async {
        let ready = get(&a, "/readyz").await;
        (ready.body["degraded_reasons"] == json!(["store_unreachable"])).then_some(())
    })
    .await;
    // A subscriber on B to another user of master 2 while it is down: its stream starts (from no
    // history, the profile being out of reach), and its lists arrive once the master is back.
    let mut late_stream = SseStream::connect(&b, &late, None).await;
    late_stream.next_list().await;
    assert!(metric(&a, "liverec_store_errors_total").await > 0.0);

    restart.0 = None;
    assert!(services(&["cluster-start", "2"]), "scripts/services cluster-start 2");
    let expected: Vec<String> = (0..=5).map(|round| format!("{victim}-{round}")).collect();
    eventually("every accepted event of the victim stored once master 2 is back", || {
        let (mut conn, config, expected) = (conn.clone(), &config, &expected);
        async move { (&cluster_ids(&mut conn, config, victim).await == expected).then_some(()) }
    })
    .await;
    eventually("no longer degraded", || async { (get(&a, "/readyz").await.body["degraded"] == false).then_some(()) })
        .await;
    // The victim's lists reach B again: a new event after the restart.
    post_events(&a, json!([view(victim, &format!("{victim}-6"))])).await;
    list_after(&mut streams[1], &format!("{victim}-6")).await;
    post_events(&a, json!([view(&late, &format!("{late}-1"))])).await;
    list_after(&mut late_stream, &format!("{late}-1")).await;
    let stored = cluster_ids(&mut conn, &config, victim).await;
    assert_eq!(stored.len(), stored.iter().collect::<HashSet<_>>().len(), "each event once: {stored:?}");
    a.stop().await;
    b.stop().await;
}
