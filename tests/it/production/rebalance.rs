//! Production mode, rebalances with the default cooperative assignment (`kafka.assignment`): an
//! instance that joins takes only the partitions that move, and the first keeps the rest, with
//! their sessions, throughout.

use std::collections::HashSet;

use liverec::bus::kafka::partition_for;

use super::{partitions, readiness};
use crate::support::*;

/// One instance owns every partition and has a running session for a user on each; a second
/// joins. The first gives up only the partitions the second takes (an eager assignment revoked
/// all of them and released every session), and a user on a partition it kept is served by the
/// same session as before the join: the next event starts none.
#[actix_rt::test]
async fn a_joining_instance_takes_only_the_partitions_that_move_and_the_rest_keep_their_sessions() {
    let _services = SERVICES.read().await;
    let config = production_config("cooperative");
    let a = start(config.clone()).await;
    eventually("the first instance owns every partition", || async {
        (partitions(&a).await?.len() == PARTITIONS as usize).then_some(())
    })
    .await;
    // A user on each partition, each with a running session on A.
    let users: Vec<String> = (0..PARTITIONS)
        .map(|p| (0..).map(|i| format!("coop-{i}")).find(|u| partition_for(u, PARTITIONS) == p).expect("a user"))
        .collect();
    let applied_before = a.metrics.session_applied.get();
    for user in &users {
        post_events(&a, event(user, "item-0001", "view")).await;
    }
    eventually("A applied one event per partition", || async {
        (a.metrics.session_applied.get() >= applied_before + users.len() as u64).then_some(())
    })
    .await;
    assert_eq!(a.metrics.kafka_partitions_revoked.get(), 0, "nothing revoked while A was alone");

    let b = start(config).await;
    let (kept, taken) = eventually("both instances own partitions, each partition one owner", || async {
        let (pa, pb) = (partitions(&a).await?, partitions(&b).await?);
        let all: HashSet<i32> = pa.iter().chain(&pb).copied().collect();
        let settled = all.len() == PARTITIONS as usize && pa.len() + pb.len() == PARTITIONS as usize;
        (settled && !pa.is_empty() && !pb.is_empty()).then_some((pa, pb))
    })
    .await;
    assert_eq!(
        a.metrics.kafka_partitions_revoked.get(),
        taken.len() as u64,
        "A gave up only the partitions B took ({taken:?}), and kept {kept:?}"
    );

    // A user on a partition A kept: its session outlived the rebalance.
    let user = users.iter().find(|u| kept.contains(&partition_for(u, PARTITIONS))).expect("a kept user");
    let (started, applied) = (a.metrics.sessions_started.get(), a.metrics.session_applied.get());
    post_events(&a, event(user, "item-0002", "view")).await;
    eventually("A applied the kept user's event", || async {
        (a.metrics.session_applied.get() > applied).then_some(())
    })
    .await;
    assert_eq!(a.metrics.sessions_started.get(), started, "the kept user's session was not restarted");
    a.stop().await;
    b.stop().await;
}

/// An instance whose `kafka.assignment` differs from the group's running members is refused by
/// the group: it says so in `/readyz` (degraded, `kafka_group_refused`) instead of looking
/// ready while it consumes nothing, and takes the partitions once the other members are gone.
#[actix_rt::test]
async fn an_instance_the_group_refuses_for_its_assignment_says_so_until_it_is_let_in() {
    let _services = SERVICES.read().await;
    let cooperative = production_config("mixed");
    let mut eager = cooperative.clone();
    eager.kafka.assignment = liverec::config::Assignment::RoundRobin;
    let a = start(eager).await;
    eventually("the eager instance owns every partition", || async {
        (partitions(&a).await?.len() == PARTITIONS as usize).then_some(())
    })
    .await;
    let b = start(cooperative).await;
    eventually("the refused instance reports it", || async {
        let ready = readiness(&b).await?;
        let reasons = ready["degraded_reasons"].as_array()?;
        (ready["degraded"] == true && reasons.iter().any(|r| r == "kafka_group_refused")).then_some(())
    })
    .await;
    assert_eq!(partitions(&b).await, Some(vec![]), "a refused instance owns no partition");
    a.stop().await;
    // The broker lets it in at its next try to join: another process's pace, hence the services' bound.
    eventually_within(
        SERVICE_DEADLINE,
        "once alone, the instance owns every partition and is no longer degraded",
        || async {
            let ready = readiness(&b).await?;
            let owned = ready["kafka_partitions"].as_array()?.len();
            (owned == PARTITIONS as usize && ready["degraded"] == false).then_some(())
        },
    )
    .await;
    b.stop().await;
}

/// An instance asking for a session timeout below the brokers' `group.min.session.timeout.ms`
/// (2 s on the services' broker; 6 s on a stock one) is fitted to it and consumes. Asked for as
/// configured, the broker refused every join and librdkafka retried for good: the instance
/// owned no partition and applied nothing.
#[actix_rt::test]
async fn an_instance_whose_session_timeout_the_brokers_refuse_asks_for_the_least_they_accept() {
    let _services = SERVICES.read().await;
    let mut config = production_config("short-session");
    config.kafka.session_timeout_ms = 1000;
    config.kafka.heartbeat_interval_ms = 500;
    let a = start(config).await;
    eventually("the instance owns every partition", || async {
        (partitions(&a).await?.len() == PARTITIONS as usize).then_some(())
    })
    .await;
    let applied = a.metrics.session_applied.get();
    post_events(&a, event("short-session-user", "item-0001", "view")).await;
    eventually("the instance applied the event", || async {
        (a.metrics.session_applied.get() > applied).then_some(())
    })
    .await;
    let ready = readiness(&a).await.expect("readiness");
    assert_eq!(ready["degraded"], false, "{ready}");
    a.stop().await;
}
