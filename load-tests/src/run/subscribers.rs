//! The subscribers of a run: WebSocket sockets watching several users each, SSE streams
//! watching one, and idle WebSocket sockets that only hold a connection. Each is a task on the
//! generator's thread that parses only the fields of a push it needs, borrowed, so that the
//! generator stays cheaper than the server.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;

use super::state::{user_name, Progress, Shared, SubKind, Subscriber, Watch};
use crate::scenario::Scenario;

/// Sockets per loopback source address: the ephemeral port range (about 28,000 ports by
/// default) bounds connections from one address to one server port.
const SOCKETS_PER_SOURCE: usize = 25_000;

#[derive(serde::Deserialize)]
struct Push<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow)]
    data: Option<PushData<'a>>,
}

#[derive(serde::Deserialize)]
struct PushData<'a> {
    #[serde(borrow)]
    user_id: &'a str,
    #[serde(borrow)]
    last_event_id: Option<&'a str>,
}

/// One subscriber to open.
struct Plan {
    kind: SubKind,
    /// The load users it watches (none for an idle socket).
    users: Vec<usize>,
    /// The user an idle socket subscribes to (outside the load's users).
    idle_user: String,
}

/// How opening the subscribers went, for the report.
#[derive(Debug, Clone, Copy)]
pub(super) struct Setup {
    /// Sockets and streams that opened.
    pub(super) opened: usize,
    /// Subscriptions the server should confirm.
    pub(super) expected_confirmations: usize,
    /// Seconds to open and confirm every subscriber.
    pub(super) connect_secs: f64,
    /// Loopback source addresses the sockets were spread over.
    pub(super) source_addresses: usize,
    /// Seconds from the confirmations until the server had no earlier work left (see
    /// `server::wait_quiet`); `None`: it never went quiet.
    pub(super) quiet_after_secs: Option<f64>,
}

/// The open subscribers: the tasks reading their pushes, and how opening them went.
pub(super) struct Opened {
    pub(super) tasks: Vec<actix_rt::task::JoinHandle<()>>,
    pub(super) setup: Setup,
}

impl Opened {
    /// Stops reading: the run is over.
    pub(super) fn close(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Opens every subscriber of the scenario (at most `connect_concurrency` at a time), registered
/// in `state` first so that pushes are matched from the first one, then waits (bounded) until
/// the server confirmed every subscription.
pub(super) async fn open(scenario: &Scenario, target: &str, state: &Shared, progress: Progress) -> Opened {
    let ws_total = scenario.ws_sockets + scenario.idle_ws_sockets;
    let clients = subscriber_clients(target, ws_total.max(scenario.sse_subscribers));
    let ws_url = target.replacen("http", "ws", 1) + "/v1/ws";
    let plans = plan(scenario);
    let expected_confirmations: usize =
        plans.iter().map(|p| if p.kind == SubKind::Idle { 1 } else { p.users.len() }).sum();
    register(state, &plans);
    progress.say(format!(
        "{}: opening {} WebSocket ({} subscriptions), {} SSE and {} idle WebSocket subscribers",
        scenario.name,
        scenario.ws_sockets,
        scenario.ws_sockets * scenario.ws_subs_per_socket,
        scenario.sse_subscribers,
        scenario.idle_ws_sockets
    ));
    let connect_started = Instant::now();
    let opening = futures_util::stream::iter(plans.into_iter().enumerate().map(|(sub, plan)| {
        let client = clients[sub % clients.len()].clone();
        let state = state.clone();
        let (ws_url, target) = (ws_url.clone(), target.to_owned());
        async move {
            match plan.kind {
                SubKind::Ws => {
                    open_ws(client, ws_url, plan.users.into_iter().map(user_name).collect(), sub, state).await
                }
                SubKind::Idle => open_ws(client, ws_url, vec![plan.idle_user], sub, state).await,
                SubKind::Sse => open_sse(client, target, user_name(plan.users[0]), sub, state).await,
            }
        }
    }))
    .buffer_unordered(scenario.connect_concurrency);
    let tasks: Vec<actix_rt::task::JoinHandle<()>> = opening.filter_map(|r| std::future::ready(r.ok())).collect().await;
    // Wait until the server confirmed every subscription, or until 30 s pass without a new one
    // (a stall, not a rate: a slow machine only takes longer).
    let (mut seen, mut moved) = (0, Instant::now());
    loop {
        let confirmed = state.borrow().confirmed;
        if confirmed >= expected_confirmations || moved.elapsed() > Duration::from_secs(30) {
            break;
        }
        if confirmed != seen {
            (seen, moved) = (confirmed, Instant::now());
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    progress.say(format!(
        "{} of {} subscriptions confirmed in {connect_secs:.1} s",
        state.borrow().confirmed,
        expected_confirmations
    ));
    let setup = Setup {
        opened: tasks.len(),
        expected_confirmations,
        connect_secs,
        source_addresses: clients.len(),
        quiet_after_secs: None,
    };
    Opened { tasks, setup }
}

/// The subscribers of a scenario: active WebSocket users, SSE streams, idle sockets.
fn plan(scenario: &Scenario) -> Vec<Plan> {
    let mut plans = Vec::new();
    for socket in 0..scenario.ws_sockets {
        let users: Vec<usize> = (0..scenario.ws_subs_per_socket)
            .map(|i| (socket * scenario.ws_subs_per_socket + i) % scenario.users)
            .collect();
        plans.push(Plan { kind: SubKind::Ws, users, idle_user: String::new() });
    }
    for i in 0..scenario.sse_subscribers {
        // Spread SSE streams over the users from the other end, so they meet WebSocket users.
        plans.push(Plan {
            kind: SubKind::Sse,
            users: vec![(scenario.users - 1) - i % scenario.users],
            idle_user: String::new(),
        });
    }
    for i in 0..scenario.idle_ws_sockets {
        plans.push(Plan { kind: SubKind::Idle, users: Vec::new(), idle_user: format!("idle-user-{i}") });
    }
    plans
}

/// Registers the planned subscribers in the shared state, in the order they are numbered.
fn register(state: &Shared, plans: &[Plan]) {
    let mut s = state.borrow_mut();
    for plan in plans {
        s.subscribers.push(Subscriber {
            kind: plan.kind,
            watches: plan.users.iter().map(|&user| Watch { user, acked: 0 }).collect(),
            closed: false,
        });
    }
}

/// Clients for subscriber sockets: one per loopback source address when there are more sockets
/// than one address has ephemeral ports for (IPv4 loopback targets only).
fn subscriber_clients(target: &str, sockets: usize) -> Vec<awc::Client> {
    let v4_loopback = target
        .split_once("://")
        .map_or(target, |(_, r)| r)
        .split([':', '/'])
        .next()
        .and_then(|h| h.parse::<Ipv4Addr>().ok())
        .is_some_and(|ip| ip.is_loopback());
    let sources = if v4_loopback { sockets.div_ceil(SOCKETS_PER_SOURCE).clamp(1, 250) } else { 1 };
    (0..sources)
        .map(|i| {
            let mut builder = awc::Client::builder()
                .connector(awc::Connector::new().limit(0).timeout(Duration::from_secs(30)))
                .timeout(Duration::from_secs(30));
            if sources > 1 {
                builder = builder.local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + i as u8)));
            }
            builder.finish()
        })
        .collect()
}

/// Opens one WebSocket, subscribes it to `users`, and leaves a task reading its pushes.
async fn open_ws(
    client: awc::Client,
    url: String,
    users: Vec<String>,
    sub: usize,
    state: Shared,
) -> Result<actix_rt::task::JoinHandle<()>, ()> {
    let connected = client.ws(&url).max_frame_size(1 << 20).connect().await;
    let Ok((_, mut framed)) = connected else {
        state.borrow_mut().errors.ws_connect += 1;
        return Err(());
    };
    for user in &users {
        let message = json!({ "subscribe": user }).to_string();
        if framed.send(awc::ws::Message::Text(message.into())).await.is_err() {
            state.borrow_mut().errors.subscribe += 1;
            return Err(());
        }
    }
    Ok(actix_rt::spawn(async move {
        while let Some(frame) = framed.next().await {
            let bytes = match frame {
                Ok(awc::ws::Frame::Text(bytes)) => bytes,
                Ok(awc::ws::Frame::Ping(payload)) => {
                    let _ = framed.send(awc::ws::Message::Pong(payload)).await;
                    continue;
                }
                Ok(awc::ws::Frame::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            };
            let Ok(message) = serde_json::from_slice::<Push<'_>>(&bytes) else { continue };
            let mut state = state.borrow_mut();
            match (message.kind, message.data) {
                ("recommendations", Some(data)) => state.on_push(sub, data.user_id, data.last_event_id),
                ("subscribed", _) => state.confirmed += 1,
                ("error", _) => state.errors.subscribe += 1,
                _ => {}
            }
        }
        let mut state = state.borrow_mut();
        state.subscribers[sub].closed = true;
        state.errors.stream_closed += 1;
    }))
}

/// Opens one SSE stream and leaves a task reading its pushes.
async fn open_sse(
    client: awc::Client,
    target: String,
    user: String,
    sub: usize,
    state: Shared,
) -> Result<actix_rt::task::JoinHandle<()>, ()> {
    let url = format!("{target}/v1/users/{user}/recommendations/stream");
    let response = match client.get(url).send().await {
        Ok(response) if response.status().is_success() => response,
        _ => {
            state.borrow_mut().errors.sse_connect += 1;
            return Err(());
        }
    };
    state.borrow_mut().confirmed += 1;
    Ok(actix_rt::spawn(async move {
        let mut body = response;
        let mut buffer: Vec<u8> = Vec::new();
        while let Some(Ok(chunk)) = body.next().await {
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = buffer.drain(..end + 2).collect();
                let mut is_list = false;
                let mut data: &[u8] = &[];
                for line in frame.split(|&b| b == b'\n') {
                    if line == b"event: recommendations" {
                        is_list = true;
                    } else if let Some(d) = line.strip_prefix(b"data: ") {
                        data = d;
                    }
                }
                if !is_list {
                    continue;
                }
                if let Ok(list) = serde_json::from_slice::<PushData<'_>>(data) {
                    state.borrow_mut().on_push(sub, list.user_id, list.last_event_id);
                }
            }
        }
        let mut state = state.borrow_mut();
        state.subscribers[sub].closed = true;
        state.errors.stream_closed += 1;
    }))
}
