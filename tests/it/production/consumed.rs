//! The record of consumed items in the Redis store (issue 16 item 1): every item a user consumed,
//! with its latest time, kept beyond the stored history in the sorted set `…:c`, bounded by
//! `session.consumed_max` (the items consumed longest ago go first), written by the same script
//! call as the append, read with the profile and deleted by an erasure. A Redis server of the
//! test's own, so the script calls and the bytes counted are this test's only.

use std::sync::Arc;

use futures_util::future::join_all;
use liverec::config::RedisConfig;
use liverec::event::{EventId, EventType, ItemId, UserId};
use liverec::store::redis::RedisStore;
use liverec::store::{EventTypes, Interaction, Profile, ProfileLimits, ProfileStore, ProfileUpdate};
use liverec::telemetry::Metrics;
use redis::AsyncCommands as _;

use super::store_writer::PrivateRedis;
use crate::users::{buy_the_top_item_then_others, whole_list, SMALL_CATALOGUE};

fn store(
    redis: &PrivateRedis,
    prefix: &str,
    history_len: usize,
    consumed_max: usize,
) -> (RedisStore, actix_rt::Arbiter) {
    let config = RedisConfig { url: redis.url.clone(), key_prefix: prefix.into(), ..Default::default() };
    let limits = ProfileLimits {
        history_len,
        dedupe_window: 1000,
        suppressed_len: 10,
        tombstone_ttl_secs: 0,
        consumed_max,
        consumed_types: EventTypes::of(&[EventType::View, EventType::Purchase]),
    };
    let arbiter = actix_rt::Arbiter::new();
    let store = RedisStore::start(&config, limits, Arc::new(Metrics::default()), &arbiter.handle()).expect("store");
    (store, arbiter)
}

fn event(id: &str, item: &str, event_type: EventType, secs: i64) -> Interaction {
    Interaction {
        event_id: EventId::from(id),
        item_id: ItemId::from(item),
        event_type,
        value: None,
        timestamp: secs * 1000,
        rec_id: None,
    }
}

fn append(user: &UserId, interactions: Vec<Interaction>) -> ProfileUpdate {
    ProfileUpdate { user_id: user.clone(), interactions, context: None, suppressed: vec![] }
}

fn record(profile: &Profile) -> Vec<(String, u32)> {
    profile.consumed.iter().map(|c| (c.item_id.to_string(), c.at_secs)).collect()
}

fn expected(items: &[(&str, u32)]) -> Vec<(String, u32)> {
    items.iter().map(|(item, at)| ((*item).to_owned(), *at)).collect()
}

#[actix_rt::test]
async fn the_redis_store_keeps_consumed_items_past_the_history_at_their_latest_time_and_forgets_the_oldest_first() {
    let redis = PrivateRedis::start().await;
    let (store, arbiter) = store(&redis, "con", 2, 3);
    let ann = UserId::from("ann");
    store.append(append(&ann, vec![event("w0", "warm", EventType::Dislike, 1)])).await;
    let calls = redis.calls("evalsha").await;

    store
        .append(append(
            &ann,
            vec![
                event("e1", "x", EventType::View, 10),
                event("e2", "y", EventType::Purchase, 20),
                // Not a consuming type: the history has it, the record does not.
                event("e3", "z", EventType::Dislike, 30),
                // A repeat of e1 with a later time: applied once, so x keeps its time.
                event("e1", "x", EventType::View, 99),
            ],
        ))
        .await;
    store
        .append(append(&ann, vec![event("e4", "w", EventType::View, 40), event("e5", "y", EventType::View, 50)]))
        .await;
    assert_eq!(redis.calls("evalsha").await - calls, 2, "one script call an append, as without the record");
    let profile = store.load(&ann).await.expect("load").expect("stored");
    assert_eq!(profile.interactions.len(), 2, "the history keeps two");
    assert_eq!(
        record(&profile),
        expected(&[("w", 40), ("x", 10), ("y", 50)]),
        "x past the history, y at its later time"
    );

    // Past the cap the item consumed longest ago (x) goes; a replay of e1 does not bring it back.
    store
        .append(append(&ann, vec![event("e6", "v", EventType::View, 60), event("e1", "x", EventType::View, 70)]))
        .await;
    let profile = store.load(&ann).await.expect("load").expect("stored");
    assert_eq!(record(&profile), expected(&[("v", 60), ("w", 40), ("y", 50)]));

    let client = redis::Client::open(redis.url.as_str()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
    let ttl: i64 = conn.ttl("con:{ann}:c").await.expect("TTL");
    assert!(ttl > 0, "the record expires with the profile (TTL {ttl})");
    store.erase(&ann, liverec::event::now_ms()).await.expect("erase");
    let left: u32 = conn.exists("con:{ann}:c").await.expect("EXISTS");
    assert_eq!(left, 0, "the erasure deletes the record");
    assert!(store.load(&ann).await.expect("load").is_none());
    arbiter.stop();
}

#[actix_rt::test]
async fn a_profile_stored_without_the_record_loads_and_starts_one() {
    let redis = PrivateRedis::start().await;
    // Written by a store that keeps no record (as the release before this one).
    let (before, arbiter) = store(&redis, "old", 50, 0);
    let bob = UserId::from("bob");
    before.append(append(&bob, vec![event("e1", "x", EventType::View, 10)])).await;
    arbiter.stop();
    let (store, arbiter) = store(&redis, "old", 50, 100);
    let profile = store.load(&bob).await.expect("load").expect("stored");
    assert_eq!(profile.interactions.len(), 1);
    assert!(profile.consumed.is_empty(), "no record stored before");
    store.append(append(&bob, vec![event("e2", "y", EventType::View, 20)])).await;
    let profile = store.load(&bob).await.expect("load").expect("stored");
    assert_eq!(record(&profile), expected(&[("y", 20)]), "the record starts with the next append");
    arbiter.stop();
}

/// Bytes of `…:c` per user with 50, 1,000 and 10,000 consumed items (catalogue ids of 10
/// characters, one consumption each, as the memory test's users), summed with `MEMORY USAGE …
/// SAMPLES 0`; then 1,000 again with `zset-max-listpack-entries 1024`. `--nocapture` prints them
/// (docs/production.md, "Redis layout").
#[actix_rt::test]
async fn the_record_takes_bytes_per_consumed_item_in_redis() {
    const USERS: usize = 20;
    let redis = PrivateRedis::start().await;
    let (store, arbiter) = store(&redis, "mem", 50, 10_000);
    let client = redis::Client::open(redis.url.as_str()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
    let mut measured = Vec::new();
    for (round, items) in [50usize, 1000, 10_000, 1000].into_iter().enumerate() {
        if round == 3 {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("zset-max-listpack-entries")
                .arg(1024)
                .query_async(&mut conn)
                .await
                .expect("CONFIG SET");
        }
        let users: Vec<UserId> = (0..USERS).map(|u| UserId::from(format!("u{round}-{u}").as_str())).collect();
        let appends = users.iter().enumerate().flat_map(|(u, user)| {
            (0..items)
                .collect::<Vec<_>>()
                .chunks(50)
                .map(|chunk| {
                    let events = chunk
                        .iter()
                        .map(|&n| {
                            let item = format!("item-{:05}", (u * 7919 + n * 104_729) % 100_000);
                            event(&format!("{user}-{n}"), &item, EventType::View, 1_764_650_000 + n as i64 * 20)
                        })
                        .collect();
                    store.append(append(user, events))
                })
                .collect::<Vec<_>>()
        });
        join_all(appends.collect::<Vec<_>>()).await;
        let mut bytes = 0u64;
        for user in &users {
            let key = format!("mem:{{{user}}}:c");
            let len: usize = conn.zcard(&key).await.expect("ZCARD");
            assert_eq!(len, items, "{key}: every consumed item kept");
            let used: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&key)
                .arg("SAMPLES")
                .arg(0)
                .query_async(&mut conn)
                .await
                .expect("MEMORY USAGE");
            bytes += used.unwrap_or(0);
        }
        measured.push((items, bytes / USERS as u64));
    }
    println!("redis bytes of the consumed record (…:c) per user ({USERS} users, MEMORY USAGE SAMPLES 0):");
    for (round, (items, bytes)) in measured.iter().enumerate() {
        let listpack = if round == 3 { ", zset-max-listpack-entries 1024" } else { "" };
        println!("  {items:>5} items {bytes:>8} bytes ({:.1} an item{listpack})", *bytes as f64 / *items as f64);
    }
    // 1,080 and about 102,300 measured (docs/production.md, "Redis layout"): a listpack up to 128
    // items, a skiplist past it.
    assert!(measured[0].1 <= 1_500, "{measured:?}");
    assert!(measured[1].1 <= 120_000, "{measured:?}");
    assert!(measured[3].1 * 3 < measured[1].1, "a listpack of 1,000 is the smaller form: {measured:?}");
    arbiter.stop();
}

/// Through a real production instance (Kafka, Redis): a user buys X, then more items than the
/// stored history holds; the instance stops and a new one (as another instance taking over the
/// partition) answers the user's list from the store, without X.
#[actix_rt::test]
async fn an_item_consumed_before_the_stored_history_stays_out_of_the_lists_after_a_restart() {
    let _services = crate::support::SERVICES.read().await;
    let mut config = crate::support::production_config("consumed");
    config.session.history_len = 4;
    config.demo.items = SMALL_CATALOGUE;
    let server = crate::support::start(config.clone()).await;
    let (x, others) = buy_the_top_item_then_others(&server, "dora", 5).await;
    let history = crate::support::eventually("the last purchase stored", || async {
        let ids = crate::support::stored_ids(crate::support::redis_conn(&config).await, &config, "dora").await;
        ids.contains(&"dora-5".to_owned()).then_some(ids)
    })
    .await;
    assert!(!history.contains(&"dora-0".to_owned()), "X left the stored history: {history:?}");
    server.stop().await;

    let server = crate::support::start(config).await;
    let list = whole_list(&server, "dora").await;
    assert!(!list.contains(&x), "{x}, bought before the stored history, came back: {list:?}");
    assert!(others.iter().all(|item| !list.contains(item)), "{list:?}");
    assert_eq!(list.len(), SMALL_CATALOGUE - 6, "every item bought is out, and only those: {list:?}");
    server.stop().await;
}
