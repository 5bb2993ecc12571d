//! Production mode, graceful stop: an instance leaves the consumer group before it stops, so the
//! others take over its partitions at once instead of after the group's session timeout.

use super::partitions;
use crate::support::*;

/// `Server::stop` (what SIGTERM runs) closes the Kafka consumer before it returns: the closing
/// consumer revokes its partitions (committing what it applied and releasing the sessions) and
/// leaves the group. Before, the consumer's thread was only told to stop, and the process could
/// end with the consumer still a member, which the others waited out for the session timeout.
#[actix_rt::test]
async fn a_graceful_stop_hands_the_partitions_back_before_it_returns() {
    let _services = SERVICES.read().await;
    let config = production_config("leave");
    let a = start(config.clone()).await;
    let b = start(config).await;
    eventually("both instances own partitions", || async {
        let (pa, pb) = (partitions(&a).await?, partitions(&b).await?);
        (!pa.is_empty() && !pb.is_empty() && pa.len() + pb.len() == PARTITIONS as usize).then_some(())
    })
    .await;
    post_events(&a, event("leaver", "item-0001", "click")).await;
    let metrics = a.metrics.clone();
    let before = metrics.kafka_rebalances.get();
    a.stop().await;
    assert!(
        metrics.kafka_rebalances.get() > before,
        "the stopped instance revoked its partitions (and left the group) before stop returned"
    );
    eventually("the other instance owns every partition", || async {
        (partitions(&b).await?.len() == PARTITIONS as usize).then_some(())
    })
    .await;
    b.stop().await;
}
