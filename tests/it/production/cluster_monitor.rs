//! Production mode, the cluster-wide monitor (issue 15 item 3): every instance publishes its
//! monitor's counts to the monitor topic and reads everyone's into a cluster view, which
//! `/v1/monitor` shows at the top level with the instance's own under `local`; a list the owner
//! forwards to a subscriber on another instance counts once, and its click is attributed; so does
//! a list another instance answers from the store; an instance that starts later fills its
//! cluster view from the topic.

use std::time::Duration;

use liverec::bus::kafka::partition_for;
use liverec::config::Config;
use liverec::Server;
use serde_json::{json, Value};

use super::partitions;
use crate::support::*;

/// No change in any figure watched for this long fails the wait; it bounds a hang only.
const STALL: Duration = Duration::from_secs(60);

async fn monitor(server: &Server) -> Value {
    let response = get(server, "/v1/monitor").await;
    assert_eq!(response.status, 200, "{}", response.body);
    response.body
}

/// Impressions and clicks over every variant of a report (the top level or `local`).
fn served(report: &Value) -> (u64, u64) {
    report["variants"].as_array().map_or((0, 0), |variants| {
        variants.iter().fold((0, 0), |(i, c), v| {
            (i + v["impressions"].as_u64().unwrap_or(0), c + v["clicks"].as_u64().unwrap_or(0))
        })
    })
}

/// What one instance's `/v1/monitor` says: the cluster's impressions, clicks and events, and
/// its own.
#[derive(Debug, PartialEq, Clone, Copy)]
struct Figures {
    cluster: (u64, u64, u64),
    local: (u64, u64, u64),
}

async fn figures(server: &Server) -> Figures {
    let report = monitor(server).await;
    let of = |r: &Value| {
        let (impressions, clicks) = served(r);
        (impressions, clicks, r["events"].as_u64().unwrap_or(0))
    };
    Figures { cluster: of(&report), local: of(&report["local"]) }
}

/// Waits until both instances' cluster views hold exactly what their `local` parts add up to
/// (every report published and merged on both), and returns (A's, B's) figures then.
async fn settled(a: &Server, b: &Server, what: &str) -> (Figures, Figures) {
    wait_for_progress(what, STALL, || async {
        let (fa, fb) = (figures(a).await, figures(b).await);
        let sum = (fa.local.0 + fb.local.0, fa.local.1 + fb.local.1, fa.local.2 + fb.local.2);
        if fa.cluster == sum && fb.cluster == sum {
            Progress::Done((fa, fb))
        } else {
            Progress::Pending((fa, fb))
        }
    })
    .await
}

fn view(user: &str, id: &str, n: usize) -> Value {
    json!({ "user_id": user, "item_id": format!("item-{n:04}"), "event_type": "view", "event_id": id })
}

/// GETs `user`'s list from its owner until it reflects `event`: one impression, counted there
/// (called once the session has the event, so every GET is answered from its list, which counts
/// once however often it is read).
async fn read_once(owner: &Server, user: &str, event: &str) {
    eventually("the owner serves a list reflecting the event", || async move {
        let got = get(owner, &format!("/v1/users/{user}/recommendations")).await;
        (got.status == 200 && got.body["last_event_id"] == event).then_some(())
    })
    .await;
}

#[actix_rt::test]
async fn every_instance_sees_the_clusters_traffic_its_own_apart_a_forwarded_list_once_and_a_late_one_the_past() {
    let _services = SERVICES.read().await;
    let mut config: Config = production_config("cluster-monitor");
    config.cluster.report_interval_ms = 200;
    config.redis.watch_ttl_secs = 2;
    config.stream.heartbeat_secs = 1;
    let (mut config_a, mut config_b) = (config.clone(), config.clone());
    config_a.cluster.instance_id = "instance-a".into();
    config_b.cluster.instance_id = "instance-b".into();
    let a = start(config_a).await;
    let b = start(config_b).await;
    let owned_by_a = eventually("both instances own partitions", || async {
        let (pa, pb) = (partitions(&a).await?, partitions(&b).await?);
        (!pa.is_empty() && !pb.is_empty() && pa.len() + pb.len() == PARTITIONS as usize).then_some(pa)
    })
    .await;
    let owner_is_a = |user: &str| owned_by_a.contains(&partition_for(user, PARTITIONS));
    let users: Vec<String> = (0..).map(|i| format!("cm-user-{i}")).take(40).collect();
    let (of_a, of_b): (Vec<&String>, Vec<&String>) = users.iter().partition(|u| owner_is_a(u));
    let (of_a, of_b) = (&of_a[..5], &of_b[..3]);

    // Traffic on users owned by each instance, posted to both: one event and one list read each.
    for (n, user) in of_a.iter().chain(of_b).enumerate() {
        let through = if n % 2 == 0 { &a } else { &b };
        post_events(through, view(user, &format!("{user}-e1"), n)).await;
    }
    let posted = (of_a.len() + of_b.len()) as u64;
    eventually("every event applied by its owner", || async {
        let (fa, fb) = (figures(&a).await, figures(&b).await);
        (fa.local.2 + fb.local.2 == posted).then_some(())
    })
    .await;
    for user in of_a {
        read_once(&a, user, &format!("{user}-e1")).await;
    }
    for user in of_b {
        read_once(&b, user, &format!("{user}-e1")).await;
    }
    let (fa, fb) = settled(&a, &b, "both cluster views hold both instances' traffic").await;
    let (na, nb) = (of_a.len() as u64, of_b.len() as u64);
    assert_eq!(fa.local, (na, 0, na), "A counts its own users only: {fa:?}");
    assert_eq!(fb.local, (nb, 0, nb), "B counts its own users only: {fb:?}");
    assert_eq!(fa.cluster, (na + nb, 0, na + nb), "the cluster view sums both: {fa:?}");
    let report = monitor(&b).await;
    assert_eq!(report["instance"], "instance-b");
    let mut reporting: Vec<&str> =
        report["instances"].as_array().expect("instances").iter().filter_map(|i| i["id"].as_str()).collect();
    reporting.sort_unstable();
    assert_eq!(reporting, ["instance-a", "instance-b"], "{report}");
    assert_eq!(report["active_users"], na + nb);
    assert_eq!(report["local"]["active_users"], nb);

    // A subscriber on B of a user A owns, once A no longer counts every user as watched (for one
    // TTL after it listens it cannot know who is).
    let user = users.iter().find(|u| owner_is_a(u) && !of_a.contains(u)).expect("another user of A").clone();
    let warm = of_a[0];
    let unwatched = "liverec_store_lists_unwatched_total";
    let mut n = 100;
    eventually("A skips a list nobody watches", || {
        n += 1;
        let (a, b, n) = (&a, &b, n);
        async move {
            if metric(a, unwatched).await > 0.0 {
                return Some(());
            }
            post_events(b, view(warm, &format!("{warm}-w{n}"), n)).await;
            None
        }
    })
    .await;
    let mut stream = SseStream::connect(&b, &user, None).await;
    stream.next_list().await;
    // Events until one of A's lists reaches the stream: A heard B's announcement by then. An
    // event whose list A did not forward (the announcement not heard yet) is followed by another
    // after a watch TTL.
    let ttl = Duration::from_secs(config.redis.watch_ttl_secs);
    let started = std::time::Instant::now();
    for n in 200.. {
        assert!(started.elapsed() < DEADLINE, "no list of A's reached the subscriber on B");
        let id = format!("{user}-s{n}");
        post_events(&b, view(&user, &id, n)).await;
        let arrived =
            actix_rt::time::timeout(ttl, async { while stream.next_list().await["last_event_id"] != id.as_str() {} });
        if arrived.await.is_ok() {
            break;
        }
    }
    let (before_a, before_b) = settled(&a, &b, "the reports of the set-up merged").await;

    // One more event: A's list for it is forwarded to the stream on B and counts once, on A.
    let id = format!("{user}-forwarded");
    post_events(&b, view(&user, &id, 300)).await;
    let forwarded = loop {
        let list = stream.next_list().await;
        if list["last_event_id"] == id.as_str() {
            break list;
        }
    };
    // A marker B counts after it delivered the list (its monitor takes reports in order): once
    // B's local view has it, B has counted whatever it would count of the forwarded list.
    let marker = of_b[0];
    let events_before = figures(&b).await.local.2;
    post_events(&b, view(marker, &format!("{marker}-m"), 301)).await;
    eventually("the marker applied", || async { (figures(&b).await.local.2 > events_before).then_some(()) }).await;
    read_once(&b, marker, &format!("{marker}-m")).await;
    let (after_a, after_b) = settled(&a, &b, "the forwarded list counted").await;
    assert_eq!(after_b.local.0, before_b.local.0 + 1, "B counted its marker and not the forwarded list");
    assert_eq!(after_a.local.0, before_a.local.0 + 1, "the owner counted the forwarded list once");
    assert_eq!(after_a.cluster.0, before_a.cluster.0 + 2, "one forwarded list and one marker in the cluster");

    // A click on it (named by rec_id, as a client sends it): attributed to the shown list.
    let item = items(&forwarded)[0].clone();
    let click = json!({ "user_id": user, "item_id": item, "event_type": "click", "rec_id": forwarded["rec_id"] });
    post_events(&b, click).await;
    let (clicked_a, clicked_b) = settled(&a, &b, "the click counted").await;
    let (clicked_a, clicked_b) = if clicked_a.cluster.1 == 0 {
        // Settled before the click reached A's monitor: wait for it (a stall fails the test).
        wait_for_progress("the click in both cluster views", STALL, || async {
            let (fa, fb) = (figures(&a).await, figures(&b).await);
            if fa.cluster.1 == 1 && fb.cluster.1 == 1 {
                Progress::Done((fa, fb))
            } else {
                Progress::Pending((fa, fb))
            }
        })
        .await
    } else {
        (clicked_a, clicked_b)
    };
    assert_eq!((clicked_a.local.1, clicked_b.local.1), (1, 0), "the owner attributes the click");
    assert_eq!((clicked_a.cluster.1, clicked_b.cluster.1), (1, 1));
    drop(stream);

    // A list B answers from the store for a user A owns and nobody watches (B runs no session
    // of theirs, A stores no list of theirs): B tells A on the user's partition, so A counts the
    // impression once and attributes the click on it.
    let quiet = users.iter().rev().find(|u| owner_is_a(u) && !of_a.contains(u) && **u != user).expect("a user of A");
    let events_before = figures(&a).await.local.2;
    post_events(&b, view(quiet, &format!("{quiet}-q1"), 400)).await;
    eventually("A applied the quiet user's event", || async {
        (figures(&a).await.local.2 > events_before).then_some(())
    })
    .await;
    let got = get(&b, &format!("/v1/users/{quiet}/recommendations")).await;
    assert_eq!(got.status, 200, "{}", got.body);
    let item = items(&got.body)[0].clone();
    let click = json!({ "user_id": quiet, "item_id": item, "event_type": "click", "rec_id": got.body["rec_id"] });
    post_events(&b, click).await;
    let wanted = (clicked_a.local.0 + 1, clicked_a.local.1 + 1);
    let (clicked_a, clicked_b) = wait_for_progress("the list B served counted on A, with its click", STALL, || async {
        let (fa, fb) = (figures(&a).await, figures(&b).await);
        let sum = (fa.local.0 + fb.local.0, fa.local.1 + fb.local.1, fa.local.2 + fb.local.2);
        if (fa.local.0, fa.local.1) >= wanted && fa.cluster == sum && fb.cluster == sum {
            Progress::Done((fa, fb))
        } else {
            Progress::Pending((fa, fb))
        }
    })
    .await;
    assert_eq!((clicked_a.local.0, clicked_a.local.1), wanted, "A counted B's list and its click once: {clicked_a:?}");
    assert_eq!((clicked_b.local.0, clicked_b.local.1), (after_b.local.0, 0), "B counted neither: {clicked_b:?}");

    // An instance started now reads the topic from a window ago: its cluster view holds what
    // the others counted before it existed, and its own part is empty.
    let mut config_c = config.clone();
    config_c.cluster.instance_id = "instance-c".into();
    let c = start(config_c).await;
    let joined = wait_for_progress("the new instance's cluster view filled from the topic", STALL, || async {
        let fc = figures(&c).await;
        if fc.cluster == clicked_a.cluster {
            Progress::Done(fc)
        } else {
            Progress::Pending(fc)
        }
    })
    .await;
    assert_eq!(joined.local, (0, 0, 0), "{joined:?}");
    a.stop().await;
    b.stop().await;
    c.stop().await;
}
