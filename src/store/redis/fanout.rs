//! The cross-instance fan-out of pushed lists over Redis pub/sub (production mode): each user's
//! lists and erasures travel on `<prefix>:updates:{<user>}`, and the users each instance has
//! subscribers of are announced on `<prefix>:watch` (see `watch`). On a Redis Cluster the channels
//! are sharded (`SSUBSCRIBE`, Redis 7.0 and later): a channel lives on the master of its slot, the
//! user's, so a list crosses only that node instead of being copied to every node; there the
//! watch announcements are off and every list is stored and published.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis;
use futures_util::StreamExt as _;
use tokio::sync::mpsc;

use super::conn::cluster_client;
use super::keys::updates_channel;
use super::watch::{watch_channel, Announcement, WatchTable, ANNOUNCE_CHUNK};
use crate::config::RedisConfig;
use crate::event::UserId;
use crate::recs::RecList;
use crate::telemetry::Metrics;

/// Forwards lists published by other instances to local subscribers: subscribes to the channel of
/// every user this instance has a hub for, and re-subscribes after Redis comes back. An erasure
/// travels the same channel, so every instance closes the erased user's streams.
pub struct RedisFanout;

/// What arrives on a user's update channel.
#[derive(Debug)]
pub enum FanoutMessage {
    /// A list another instance published.
    List(RecList),
    /// The user was erased (on any instance).
    Erased(UserId),
    /// Some instance announced a subscriber of a user no instance watched before (as far as
    /// this one knew): the owner pushes a fresh list, stored and published.
    Watched(UserId),
}

/// The message published on a user's update channel when the user is erased. Lists are JSON
/// objects that start with `{"rec_id"`, so the two never mix.
pub(super) fn erased_notice(user: &UserId) -> String {
    serde_json::json!({ "erased": user }).to_string()
}

fn parse_update(payload: &str) -> Result<FanoutMessage, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Erased {
        erased: UserId,
    }
    if payload.starts_with("{\"erased\"") {
        return serde_json::from_str::<Erased>(payload).map(|e| FanoutMessage::Erased(e.erased));
    }
    serde_json::from_str(payload).map(FanoutMessage::List)
}

/// What the registry asks of the fan-out.
#[derive(Debug)]
pub enum FanoutCommand {
    /// Follow the user's update channel.
    Watch(UserId),
    Unwatch(UserId),
    /// A subscriber of the user arrived here: announce it now (after any `Watch` queued before,
    /// so the owner's answer finds this instance following the channel).
    Announce(UserId),
}

/// The registry's side of the fan-out: commands queue for `RedisFanout::run` (a closed channel,
/// the fan-out ended with the server, drops them), and the watch table answers `watched`.
pub struct FanoutHandle {
    commands: mpsc::UnboundedSender<FanoutCommand>,
    watches: Arc<WatchTable>,
}

impl FanoutHandle {
    /// A handle and the command queue `RedisFanout::run` takes.
    pub fn new(watches: Arc<WatchTable>) -> (Self, mpsc::UnboundedReceiver<FanoutCommand>) {
        let (commands, queue) = mpsc::unbounded_channel();
        (Self { commands, watches }, queue)
    }
}

impl crate::store::UpdateFanout for FanoutHandle {
    fn watch(&self, user: &UserId) {
        let _ = self.commands.send(FanoutCommand::Watch(user.clone()));
    }

    fn unwatch(&self, user: &UserId) {
        let _ = self.commands.send(FanoutCommand::Unwatch(user.clone()));
    }

    fn subscribed(&self, user: &UserId) {
        if self.watches.enabled() {
            let _ = self.commands.send(FanoutCommand::Announce(user.clone()));
        }
    }

    fn watched(&self, user: &UserId) -> bool {
        self.watches.watched(user)
    }

    fn announces(&self) -> bool {
        self.watches.enabled()
    }

    fn announced(&self, user: &UserId) -> bool {
        self.watches.announced(user)
    }
}

/// Publishes announcements of `users` (in chunks of `ANNOUNCE_CHUNK`) as one pipeline.
async fn announce(
    conn: &mut redis::aio::MultiplexedConnection,
    channel: &str,
    users: Vec<UserId>,
    ttl: Duration,
) -> redis::RedisResult<()> {
    if users.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    let ttl_ms = ttl.as_millis() as u64;
    for chunk in users.chunks(ANNOUNCE_CHUNK) {
        let message = Announcement { watch: chunk.to_vec(), ttl_ms };
        pipe.publish(channel, serde_json::to_string(&message).expect("user ids serialise")).ignore();
    }
    pipe.query_async(conn).await
}

/// Records an announcement heard on the watch channel; yields the users it newly watches.
fn hear(watches: &WatchTable, payload: &str) -> Vec<UserId> {
    match serde_json::from_str::<Announcement>(payload) {
        Ok(message) => {
            let ttl = Duration::from_millis(message.ttl_ms);
            message.watch.into_iter().filter(|user| watches.heard(user.clone(), ttl)).collect()
        }
        Err(error) => {
            tracing::warn!(error = %error, "unreadable announcement on the watch channel");
            Vec::new()
        }
    }
}

/// How long a watch announcement holds (`redis.watch_ttl_secs`); zero, the announcements off, on a
/// Redis Cluster, where they are not carried yet: there every list is stored and published.
pub fn watch_ttl(config: &RedisConfig) -> Duration {
    if config.cluster_nodes.is_empty() {
        Duration::from_secs(config.watch_ttl_secs)
    } else {
        Duration::ZERO
    }
}

impl RedisFanout {
    /// Runs until `commands` closes. `deliver` gets every list published for a followed user,
    /// every erasure of one, and every user newly watched somewhere. With the watch table
    /// enabled it also announces `locally_watched()` (the users with subscribers here) every
    /// third of the watch TTL, and keeps the table from the announcements of every instance.
    /// On a cluster the table must be disabled (`watch_ttl` zero, see [`watch_ttl`]).
    pub async fn run(
        config: RedisConfig,
        commands: mpsc::UnboundedReceiver<FanoutCommand>,
        watches: Arc<WatchTable>,
        locally_watched: impl Fn() -> Vec<UserId> + 'static,
        deliver: impl Fn(FanoutMessage) + 'static,
        metrics: Arc<Metrics>,
    ) {
        if config.cluster_nodes.is_empty() {
            Self::run_single(config.url, config.key_prefix, commands, watches, locally_watched, deliver, metrics).await;
        } else {
            debug_assert!(!watches.enabled(), "no watch announcements on a cluster");
            Self::run_cluster(config.cluster_nodes, config.key_prefix, commands, deliver, metrics).await;
        }
    }

    async fn run_single(
        url: String,
        prefix: String,
        mut commands: mpsc::UnboundedReceiver<FanoutCommand>,
        watches: Arc<WatchTable>,
        locally_watched: impl Fn() -> Vec<UserId> + 'static,
        deliver: impl Fn(FanoutMessage) + 'static,
        metrics: Arc<Metrics>,
    ) {
        let mut watched: HashSet<UserId> = HashSet::new();
        let watch_channel = watch_channel(&prefix);
        let mut rounds = tokio::time::interval(watches.period());
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut delay = Duration::from_millis(50);
        loop {
            let client = match redis::Client::open(url.as_str()) {
                Ok(client) => client,
                Err(error) => {
                    tracing::error!(error = %error, "invalid redis url for update fan-out");
                    return;
                }
            };
            let pubsub = match client.get_async_pubsub().await {
                Ok(pubsub) => pubsub,
                Err(error) => {
                    metrics.store_errors.inc();
                    tracing::debug!(error = %error, "update fan-out cannot reach redis; retrying");
                    actix_rt::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    // Keep the watch list current while disconnected.
                    while let Ok(command) = commands.try_recv() {
                        apply(&mut watched, command);
                    }
                    continue;
                }
            };
            // Announcements go on an ordinary connection (a subscribed one cannot publish).
            let mut publisher = if watches.enabled() {
                match client.get_multiplexed_async_connection().await {
                    Ok(conn) => Some(conn),
                    Err(error) => {
                        metrics.store_errors.inc();
                        tracing::debug!(error = %error, "update fan-out cannot reach redis; retrying");
                        actix_rt::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            } else {
                None
            };
            delay = Duration::from_millis(50);
            let (mut sink, mut stream) = pubsub.split();
            let mut ok = publisher.is_none() || sink.subscribe(&watch_channel).await.is_ok();
            if ok && publisher.is_some() {
                // What was announced before now is unknown here: everyone counts as watched
                // for one TTL, and this instance's own watches are announced at once.
                watches.listening();
                rounds.reset_immediately();
            }
            for user in &watched {
                if !ok {
                    break;
                }
                ok = sink.subscribe(updates_channel(&prefix, user)).await.is_ok();
            }
            while ok {
                tokio::select! {
                    command = commands.recv() => {
                        let Some(command) = command else { return };
                        let result = match &command {
                            FanoutCommand::Watch(user) => sink.subscribe(updates_channel(&prefix, user)).await,
                            FanoutCommand::Unwatch(user) => sink.unsubscribe(updates_channel(&prefix, user)).await,
                            FanoutCommand::Announce(user) => match publisher.as_mut() {
                                Some(conn) => announce(conn, &watch_channel, vec![user.clone()], watches.ttl()).await,
                                None => Ok(()),
                            },
                        };
                        apply(&mut watched, command);
                        ok = result.is_ok();
                    }
                    _ = rounds.tick(), if publisher.is_some() => {
                        watches.expire();
                        let users = locally_watched();
                        if let Some(conn) = publisher.as_mut() {
                            ok = announce(conn, &watch_channel, users, watches.ttl()).await.is_ok();
                        }
                    }
                    message = stream.next() => {
                        let Some(message) = message else { break };
                        let Ok(payload) = message.get_payload::<String>() else { continue };
                        if message.get_channel_name() == watch_channel {
                            for user in hear(&watches, &payload) {
                                deliver(FanoutMessage::Watched(user));
                            }
                            continue;
                        }
                        match parse_update(&payload) {
                            Ok(message) => deliver(message),
                            Err(error) => tracing::warn!(error = %error, "unreadable list on an update channel"),
                        }
                    }
                }
            }
            metrics.store_errors.inc();
            tracing::warn!("update fan-out lost its redis connection; reconnecting");
        }
    }
}

impl RedisFanout {
    /// The fan-out on a cluster: one cluster connection (RESP3) subscribes to each watched user's
    /// sharded channel on the node of its slot; the messages of every node arrive on one queue.
    /// The connection keeps its subscriptions across reconnections to a node (a master that
    /// restarts gets them again); a subscription the connection refused is tried again with capped
    /// backoff.
    async fn run_cluster(
        nodes: Vec<String>,
        prefix: String,
        mut commands: mpsc::UnboundedReceiver<FanoutCommand>,
        deliver: impl Fn(FanoutMessage) + 'static,
        metrics: Arc<Metrics>,
    ) {
        let (push, mut pushes) = mpsc::unbounded_channel();
        let client = match cluster_client(&nodes, Some(push)) {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(error = %error, "invalid redis cluster nodes for update fan-out");
                return;
            }
        };
        let mut watched: HashSet<UserId> = HashSet::new();
        let initial = Duration::from_millis(50);
        let mut delay = initial;
        let connection = loop {
            match client.get_async_connection().await {
                Ok(connection) => break connection,
                Err(error) => {
                    metrics.store_errors.inc();
                    tracing::debug!(error = %error, "update fan-out cannot reach the redis cluster; retrying");
                    actix_rt::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    while let Ok(command) = commands.try_recv() {
                        apply(&mut watched, command);
                    }
                }
            }
        };
        // Watched users whose subscription is not (or may no longer be) in place.
        let mut unsubscribed: HashSet<UserId> = watched.clone();
        // The next attempt at them: a deadline, so that a steady flow of messages cannot put it off.
        let mut retry_at = tokio::time::Instant::now();
        delay = initial;
        loop {
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { return };
                    match &command {
                        FanoutCommand::Watch(user) => {
                            if connection.clone().ssubscribe(updates_channel(&prefix, user)).await.is_err() {
                                if unsubscribed.is_empty() {
                                    (delay, retry_at) = (initial, tokio::time::Instant::now() + initial);
                                }
                                unsubscribed.insert(user.clone());
                            }
                        }
                        FanoutCommand::Unwatch(user) => {
                            unsubscribed.remove(user);
                            let _ = connection.clone().sunsubscribe(updates_channel(&prefix, user)).await;
                        }
                        FanoutCommand::Announce(_) => {}
                    }
                    apply(&mut watched, command);
                }
                push = pushes.recv() => {
                    let Some(push) = push else { return };
                    match push.kind {
                        redis::PushKind::SMessage => {
                            let Some(Ok(payload)) = push.data.last().map(redis::from_redis_value_ref::<String>) else { continue };
                            match parse_update(&payload) {
                                Ok(message) => deliver(message),
                                Err(error) => tracing::warn!(error = %error, "unreadable list on an update channel"),
                            }
                        }
                        // The connection subscribes again by itself once it reaches the node again
                        // (the test that SIGKILLs a master checks it).
                        redis::PushKind::Disconnection => metrics.store_errors.inc(),
                        _ => {}
                    }
                }
                () = tokio::time::sleep_until(retry_at), if !unsubscribed.is_empty() => {
                    let attempts = unsubscribed.iter().map(|user| {
                        let (mut connection, channel) = (connection.clone(), updates_channel(&prefix, user));
                        async move { (user.clone(), connection.ssubscribe(channel).await.is_ok()) }
                    });
                    let done: Vec<UserId> = futures_util::future::join_all(attempts)
                        .await
                        .into_iter()
                        .filter_map(|(user, ok)| ok.then_some(user))
                        .collect();
                    for user in &done {
                        unsubscribed.remove(user);
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    retry_at = tokio::time::Instant::now() + delay;
                }
            }
        }
    }
}

fn apply(watched: &mut HashSet<UserId>, command: FanoutCommand) {
    match command {
        FanoutCommand::Watch(user) => {
            watched.insert(user);
        }
        FanoutCommand::Unwatch(user) => {
            watched.remove(&user);
        }
        FanoutCommand::Announce(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_channels_carry_lists_and_erasures_apart() {
        let erased = parse_update(&erased_notice(&UserId::from("erin"))).expect("notice");
        assert!(matches!(erased, FanoutMessage::Erased(user) if user.as_str() == "erin"));
        let list = RecList {
            rec_id: "r1".into(),
            user_id: UserId::from("erin"),
            model_version: "v1".into(),
            variant: "control".into(),
            generated_at: 1,
            seq: 3,
            last_event_id: None,
            items: vec![],
        };
        let parsed = parse_update(&serde_json::to_string(&list).expect("list")).expect("list");
        assert!(matches!(parsed, FanoutMessage::List(l) if l == list));
        assert!(parse_update("{\"erased\": 5}").is_err());
    }

    #[test]
    fn an_announcement_names_its_users_and_yields_those_newly_watched() {
        let watches = WatchTable::new(Duration::ZERO);
        watches.listening(); // a zero TTL: the blind time is over at once
        let message = Announcement { watch: vec![UserId::from("ann"), UserId::from("bob")], ttl_ms: 30_000 };
        let payload = serde_json::to_string(&message).expect("serialises");
        assert_eq!(payload, r#"{"watch":["ann","bob"],"ttl_ms":30000}"#);
        assert_eq!(hear(&watches, &payload).len(), 2);
        assert!(hear(&watches, &payload).is_empty(), "announced again: nothing new");
        assert!(hear(&watches, "{\"watch\": 3}").is_empty());
    }
}
