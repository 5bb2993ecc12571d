//! Memory per user in Redis (issue 13 item 4): a user with 50 interactions, as production traffic
//! leaves them (one event per append, UUID v7 event ids, a context, the last pushed list), summed
//! with `MEMORY USAGE` over each of the user's keys. A Redis server of the test's own, so no other
//! test's keys are counted. `--nocapture` prints the bytes per user by key (docs/performance.md).

use std::sync::Arc;

use futures_util::future::join_all;
use liverec::config::RedisConfig;
use liverec::event::{Context, Device, EventId, EventType, ItemId, UserId};
use liverec::recs::{RecItem, RecList, RecUpdate};
use liverec::store::redis::RedisStore;
use liverec::store::{EventDigest, Interaction, ProfileLimits, ProfileStore, ProfileUpdate};
use liverec::telemetry::Metrics;
use redis::AsyncCommands as _;

use super::store_writer::PrivateRedis;

const USERS: usize = 100;
const INTERACTIONS: usize = 50;
/// The key suffixes of a user (src/store/redis/keys.rs).
const KEYS: [&str; 6] = ["h", "ids", "e", "s", "p", "q"];

fn interaction(user: usize, n: usize) -> Interaction {
    let event_type = match n % 10 {
        0 => EventType::Click,
        9 => EventType::AddToCart,
        _ => EventType::View,
    };
    Interaction {
        event_id: EventId::from(uuid::Uuid::now_v7().to_string().as_str()),
        item_id: ItemId::from(format!("item-{}", (user * 7919 + n * 104_729) % 100_000).as_str()),
        event_type,
        value: None,
        timestamp: 1_764_650_000_000 + (n as i64) * 20_000,
        rec_id: (event_type == EventType::Click).then(|| Arc::from(uuid::Uuid::now_v7().to_string().as_str())),
    }
}

fn list(user: &UserId, seq: u64) -> Arc<RecUpdate> {
    RecUpdate::new(RecList {
        rec_id: uuid::Uuid::now_v7().to_string(),
        user_id: user.clone(),
        model_version: "sasrec-3".into(),
        variant: "control".into(),
        generated_at: 1_764_650_000_000,
        seq,
        last_event_id: None,
        items: (0..10).map(|i| RecItem { item_id: ItemId::from(format!("item-{i}").as_str()), score: 0.5 }).collect(),
    })
}

async fn memory_usage(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> u64 {
    let bytes: Option<u64> =
        redis::cmd("MEMORY").arg("USAGE").arg(key).arg("SAMPLES").arg(0).query_async(conn).await.expect("MEMORY USAGE");
    bytes.unwrap_or(0)
}

#[actix_rt::test]
async fn a_user_with_50_interactions_takes_at_most_3000_bytes_in_redis() {
    let redis = PrivateRedis::start().await;
    let config = RedisConfig { url: redis.url.clone(), key_prefix: "mem".into(), ..Default::default() };
    let limits = ProfileLimits::sized(50, 1000, 500);
    let arbiter = actix_rt::Arbiter::new();
    let store = RedisStore::start(&config, limits, Arc::new(Metrics::default()), &arbiter.handle()).expect("store");
    let context =
        Context { device: Device::Mobile, country: Some(Arc::from("DE")), hour: 14, weekday: 2, ..Default::default() };

    let mut persisted = Vec::new();
    for n in 0..INTERACTIONS {
        for u in 0..USERS {
            let user = UserId::from(format!("user-{u}").as_str());
            let update = ProfileUpdate {
                user_id: user.clone(),
                interactions: vec![interaction(u, n)],
                context: Some(context.clone()),
                suppressed: vec![],
            };
            persisted.push(store.append(update));
            store.save_recs(&list(&user, n as u64 + 1));
        }
    }
    join_all(persisted).await;
    // The lists are ordered with the appends: one more append per user waits for them all.
    join_all((0..USERS).map(|u| {
        let user = UserId::from(format!("user-{u}").as_str());
        store.append(ProfileUpdate { user_id: user, interactions: vec![], context: None, suppressed: vec![] })
    }))
    .await;

    let client = redis::Client::open(redis.url.as_str()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
    let mut by_key = [0u64; KEYS.len()];
    for u in 0..USERS {
        for (k, suffix) in KEYS.iter().enumerate() {
            by_key[k] += memory_usage(&mut conn, &format!("mem:{{user-{u}}}:{suffix}")).await;
        }
        let profile = store.load(&UserId::from(format!("user-{u}").as_str())).await.expect("load").expect("stored");
        assert_eq!(profile.interactions.len(), INTERACTIONS, "every interaction stored");
    }
    let per_user: Vec<u64> = by_key.iter().map(|b| b / USERS as u64).collect();
    let total: u64 = per_user.iter().sum();
    println!("redis bytes per user with {INTERACTIONS} interactions ({USERS} users, MEMORY USAGE SAMPLES 0):");
    for (suffix, bytes) in KEYS.iter().zip(&per_user) {
        println!("  :{suffix:<4} {bytes:>6}");
    }
    println!("  total {total:>6}");
    // 2,908 measured with this layout; 3,100 with the profile hash before it, 3,698 with a string
    // of digests of its own and the last list as JSON.
    assert!(total <= 3000, "{total} bytes per user in Redis ({per_user:?} by key {KEYS:?})");
    arbiter.stop();
}

/// A profile as the store wrote it before the compact forms: interactions as JSON, the ids
/// themselves in a sorted set.
#[actix_rt::test]
async fn a_profile_written_in_the_json_and_id_set_form_still_loads_and_its_ids_still_deduplicate() {
    let (_redis, store, arbiter, mut conn) = older_form_store("old").await;
    let old = |id: &str, ts: i64| {
        format!(
            r#"{{"event_id":"{id}","item_id":"item-{id}","event_type":"click","timestamp":{ts},"rec_id":"r-{id}"}}"#
        )
    };
    let _: () = redis::pipe()
        .rpush("old:{ann}:h", &[old("e1", 1), old("e2", 2), old("e3", 3)])
        .zadd_multiple("old:{ann}:ids", &[(1, "e0"), (2, "e1"), (3, "e2"), (4, "e3")])
        .hset("old:{ann}:p", "context", r#"{"device":"tablet","hour":3,"weekday":4}"#)
        .query_async(&mut conn)
        .await
        .expect("the old form written");

    let ann = UserId::from("ann");
    let profile = store.load(&ann).await.expect("load").expect("stored");
    let ids: Vec<String> = profile.interactions.iter().map(|i| i.event_id.to_string()).collect();
    assert_eq!(ids, ["e1", "e2", "e3"]);
    assert_eq!(profile.interactions[2].rec_id.as_deref(), Some("r-e3"));
    assert_eq!(profile.context.map(|c| c.device), Some(Device::Tablet));
    assert_eq!(profile.event_ids, digests(&["e0", "e1", "e2", "e3"]), "the old ids, as digests, oldest first");

    // A replay of ids the old set holds (e0 left the history but not the window) is skipped by
    // the store itself, as a replay to another instance racing this one would be.
    let update = |names: &[&str]| ProfileUpdate {
        user_id: ann.clone(),
        interactions: names
            .iter()
            .map(|n| Interaction { event_type: EventType::View, ..interaction_named(n) })
            .collect(),
        context: None,
        suppressed: vec![],
    };
    store.append(update(&["e0", "e2", "e4", "e4"])).await;
    let profile = store.load(&ann).await.expect("load").expect("stored");
    let ids: Vec<String> = profile.interactions.iter().map(|i| i.event_id.to_string()).collect();
    assert_eq!(ids, ["e1", "e2", "e3", "e4"], "only the new id applied, once");
    assert_eq!(profile.event_ids, digests(&["e0", "e1", "e2", "e3", "e4"]));
    // e0 is in the old set only: still checked after the first append of this release.
    store.append(update(&["e0", "e4", "e5"])).await;
    let profile = store.load(&ann).await.expect("load").expect("stored");
    assert_eq!(
        profile.interactions.iter().map(|i| i.event_id.as_str()).collect::<Vec<_>>(),
        ["e1", "e2", "e3", "e4", "e5"]
    );
    arbiter.stop();
}

/// A profile as an earlier release wrote it: the digests in a string key of their own (`…:e`),
/// the last list as published JSON in the profile hash, with its `recs_seq`.
#[actix_rt::test]
async fn a_profile_written_with_the_digest_string_and_a_json_list_still_loads_deduplicates_and_moves_into_the_string() {
    let (_redis, store, arbiter, mut conn) = older_form_store("prev").await;
    let ann = UserId::from("ann");
    let packed: Vec<u8> = digests(&["e0", "e1", "e2"]).iter().flat_map(|d| d.0.to_be_bytes()).collect();
    let history = json_history(&["e1", "e2"]);
    let published = list(&ann, 7);
    let _: () = redis::pipe()
        .rpush("prev:{ann}:h", &history)
        .set("prev:{ann}:e", packed)
        .hset_multiple("prev:{ann}:p", &[("recs", published.json().as_ref()), ("recs_seq", b"7")])
        .query_async(&mut conn)
        .await
        .expect("the previous form written");

    let profile = store.load(&ann).await.expect("load").expect("stored");
    assert_eq!(profile.event_ids, digests(&["e0", "e1", "e2"]));
    assert_eq!(profile.last_recs.as_ref(), Some(&published.list), "the JSON list reads back as published");

    // e0 left the history but not the window: skipped, as e2 and the second e3.
    let update = |names: &[&str]| named_update(&ann, names);
    store.append(update(&["e0", "e2", "e3", "e3"])).await;
    let profile = store.load(&ann).await.expect("load").expect("stored");
    let ids: Vec<String> = profile.interactions.iter().map(|i| i.event_id.to_string()).collect();
    assert_eq!(ids, ["e1", "e2", "e3"], "only the new id applied, once");
    assert_eq!(profile.event_ids, digests(&["e0", "e1", "e2", "e3"]));
    let older: u32 = conn.exists(&["prev:{ann}:e", "prev:{ann}:p"]).await.expect("EXISTS");
    assert_eq!(older, 0, "the digests and the hash moved into the profile string");
    assert_eq!(profile.last_recs.as_ref(), Some(&published.list));

    // A newer list is stored in the compact form and reads back the same.
    let newer = list(&ann, 8);
    store.save_recs(&newer);
    store.append(update(&["e3", "e4"])).await;
    let profile = store.load(&ann).await.expect("load").expect("stored");
    assert_eq!(profile.last_recs.as_ref(), Some(&newer.list));
    assert_eq!(profile.event_ids, digests(&["e0", "e1", "e2", "e3", "e4"]));
    let stored: Vec<u8> = conn.get("prev:{ann}:q").await.expect("GET");
    assert_eq!(liverec::store::redis::decode_stored_list(&stored, &ann).as_ref(), Some(&newer.list));
    // The list in its compact form, five digests and the string's own six bytes.
    assert!(stored.len() * 3 < newer.json().len(), "{} bytes stored for {} of JSON", stored.len(), newer.json().len());
    arbiter.stop();
}

/// A profile as the release before the profile string wrote it: the window (the field `e`), the
/// context and the last list in the profile hash (`…:p`).
#[actix_rt::test]
async fn a_profile_written_in_the_hash_form_still_loads_deduplicates_and_moves_into_the_string() {
    let (_redis, store, arbiter, mut conn) = older_form_store("hash").await;
    let ann = UserId::from("ann");
    let packed: Vec<u8> = digests(&["e0", "e1", "e2"]).iter().flat_map(|d| d.0.to_be_bytes()).collect();
    let history = json_history(&["e1", "e2"]);
    let published = list(&ann, 7);
    let context = r#"{"device":"tablet","hour":3,"weekday":4}"#;
    let _: () = redis::pipe()
        .rpush("hash:{ann}:h", &history)
        .hset_multiple(
            "hash:{ann}:p",
            &[("e", packed.as_slice()), ("recs", published.json().as_ref()), ("context", context.as_bytes())],
        )
        .query_async(&mut conn)
        .await
        .expect("the hash form written");
    let profile = store.load(&ann).await.expect("load").expect("stored");
    assert_eq!(profile.event_ids, digests(&["e0", "e1", "e2"]));

    // e0 left the history but not the window: skipped, as e2 and the second e3.
    let update = |names: &[&str]| named_update(&ann, names);
    store.append(update(&["e0", "e2", "e3", "e3"])).await;
    let profile = store.load(&ann).await.expect("load").expect("stored");
    let ids: Vec<String> = profile.interactions.iter().map(|i| i.event_id.to_string()).collect();
    assert_eq!(ids, ["e1", "e2", "e3"], "only the new id applied, once");
    assert_eq!(profile.event_ids, digests(&["e0", "e1", "e2", "e3"]));
    assert_eq!(profile.last_recs.as_ref(), Some(&published.list), "the list moved along");
    assert_eq!(profile.context.map(|c| c.device), Some(Device::Tablet), "the context moved along");
    let hash: bool = conn.exists("hash:{ann}:p").await.expect("EXISTS");
    assert!(!hash, "the hash moved into the profile string");
    // Nothing new but a replay: the window still holds every id.
    store.append(update(&["e1", "e3"])).await;
    let profile = store.load(&ann).await.expect("load").expect("stored");
    assert_eq!(profile.interactions.len(), 3);
    assert_eq!(profile.event_ids, digests(&["e0", "e1", "e2", "e3"]));
    arbiter.stop();
}

/// A store on a Redis of its own (keys under `prefix`), with a connection that writes the forms
/// earlier releases stored.
async fn older_form_store(
    prefix: &str,
) -> (PrivateRedis, RedisStore, actix_rt::Arbiter, redis::aio::MultiplexedConnection) {
    let redis = PrivateRedis::start().await;
    let config = RedisConfig { url: redis.url.clone(), key_prefix: prefix.into(), ..Default::default() };
    let limits = ProfileLimits::sized(50, 1000, 10);
    let arbiter = actix_rt::Arbiter::new();
    let store = RedisStore::start(&config, limits, Arc::new(Metrics::default()), &arbiter.handle()).expect("store");
    let client = redis::Client::open(redis.url.as_str()).expect("client");
    let conn = client.get_multiplexed_async_connection().await.expect("connection");
    (redis, store, arbiter, conn)
}

fn digests(names: &[&str]) -> Vec<EventDigest> {
    names.iter().map(|n| EventDigest::of(&EventId::from(*n))).collect()
}

/// History entries as the JSON form stored them (views).
fn json_history(ids: &[&str]) -> Vec<String> {
    ids.iter()
        .map(|id| format!(r#"{{"event_id":"{id}","item_id":"item-{id}","event_type":"view","timestamp":5}}"#))
        .collect()
}

fn named_update(user: &UserId, names: &[&str]) -> ProfileUpdate {
    ProfileUpdate {
        user_id: user.clone(),
        interactions: names.iter().map(|n| interaction_named(n)).collect(),
        context: None,
        suppressed: vec![],
    }
}

fn interaction_named(id: &str) -> Interaction {
    Interaction {
        event_id: EventId::from(id),
        item_id: ItemId::from(format!("item-{id}").as_str()),
        event_type: EventType::View,
        value: None,
        timestamp: 10,
        rec_id: None,
    }
}
