//! Many subscribers over many users: each gets its own user's updates and never another's.

use std::collections::HashMap;

use futures_util::future::join_all;
use serde_json::json;

use crate::support::*;

const USERS: usize = 100;
const PER_USER: usize = 10;

#[actix_rt::test]
async fn a_thousand_subscribers_get_only_their_own_users_updates() {
    let server = start(test_config()).await;
    let users: Vec<String> = (0..USERS).map(|u| format!("fan-{u}")).collect();

    // Half of each user's subscribers on SSE, half on WebSocket (one socket per subscriber).
    let mut sse_clients = Vec::new();
    let mut ws_clients = Vec::new();
    for user in &users {
        for i in 0..PER_USER {
            if i % 2 == 0 {
                sse_clients.push((user.clone(), SseStream::connect(&server, user, None).await));
            } else {
                let mut ws = WsClient::connect(&server).await;
                ws.send_json(&json!({ "subscribe": user })).await;
                ws_clients.push((user.clone(), ws));
            }
        }
    }
    assert_eq!(sse_clients.len() + ws_clients.len(), USERS * PER_USER);
    eventually("every subscriber counted", || async {
        let sse = metric(&server, "liverec_stream_subscribers{kind=\"sse\"}").await;
        let ws = metric(&server, "liverec_stream_subscribers{kind=\"websocket\"}").await;
        (sse + ws == (USERS * PER_USER) as f64).then_some(())
    })
    .await;

    // Every subscriber first sees its user's initial list.
    let first_sse = join_all(sse_clients.iter_mut().map(|(user, sse)| async move {
        let list = sse.next_list().await;
        assert_eq!(list["user_id"].as_str(), Some(user.as_str()));
        list["seq"].as_u64().expect("seq")
    }))
    .await;
    let first_ws = join_all(ws_clients.iter_mut().map(|(user, ws)| async move {
        ws.next_of_type("subscribed").await;
        let list = ws.next_of_type("recommendations").await;
        assert_eq!(list["data"]["user_id"].as_str(), Some(user.as_str()));
        list["data"]["seq"].as_u64().expect("seq")
    }))
    .await;

    // One event per user, each on a different item.
    let batch: Vec<_> =
        users.iter().enumerate().map(|(i, u)| event(u, &format!("item-{:04}", i % 200), "click")).collect();
    post_events(&server, json!(batch)).await;
    let consumed: HashMap<&str, String> =
        users.iter().enumerate().map(|(i, u)| (u.as_str(), format!("item-{:04}", i % 200))).collect();

    // Every subscriber then gets a newer list of its own user, without the consumed item, and
    // nothing addressed to another user.
    let consumed = &consumed;
    join_all(sse_clients.iter_mut().zip(first_sse).map(|((user, sse), seq0)| async move {
        let list = sse.next_list().await;
        assert_eq!(list["user_id"].as_str(), Some(user.as_str()));
        assert!(list["seq"].as_u64().expect("seq") > seq0);
        assert!(!items(&list).contains(&consumed[user.as_str()]));
    }))
    .await;
    join_all(ws_clients.iter_mut().zip(first_ws).map(|((user, ws), seq0)| async move {
        let list = ws.next_of_type("recommendations").await;
        assert_eq!(list["data"]["user_id"].as_str(), Some(user.as_str()));
        assert!(list["data"]["seq"].as_u64().expect("seq") > seq0);
        assert!(!items(&list["data"]).contains(&consumed[user.as_str()]));
    }))
    .await;
    server.stop().await;
}
