//! Connections that hold the server without using it: requests that declare a body and never
//! send it, heads that never finish, and more connections from one address than its share. The
//! server closes them within its timeouts, refuses those over the caps, and keeps answering
//! health checks throughout.

use actix_rt::net::TcpStream;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::*;

/// A request head for `POST /v1/events` that promises a body it never sends.
const NO_BODY: &str =
    "POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
/// A request head that never ends.
const HALF_HEAD: &str = "GET /healthz HTTP/1.1\r\nHost: localhost\r\n";

async fn open(server: &liverec::Server, head: &str) -> TcpStream {
    let mut conn = TcpStream::connect(server.addr).await.expect("connect");
    conn.write_all(head.as_bytes()).await.expect("write");
    conn
}

/// Reads until the server closes the connection; what it said before, or `None` if it is still
/// open at the deadline (a stall: the server holds it forever).
async fn closed_by_server(conn: &mut TcpStream) -> Option<String> {
    let mut said = Vec::new();
    let mut buf = [0u8; 4096];
    actix_rt::time::timeout(DEADLINE, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => said.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some(String::from_utf8_lossy(&said).into_owned())
}

/// The status of one request on a connection of its own.
async fn status_of(server: &liverec::Server, path: &str) -> String {
    let mut conn = open(server, &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")).await;
    let said = closed_by_server(&mut conn).await.expect("an answer");
    said.lines().next().unwrap_or_default().to_owned()
}

#[actix_rt::test]
async fn idle_connections_are_closed_and_health_checks_still_answer() {
    let mut config = test_config();
    config.server.body_timeout_secs = 1;
    config.server.client_request_timeout_ms = 1000;
    let server = start(config).await;
    let mut idle = Vec::new();
    for i in 0..300 {
        idle.push(open(&server, if i % 5 == 0 { HALF_HEAD } else { NO_BODY }).await);
    }
    eventually("/healthz to answer while 300 connections idle", || async {
        (get(&server, "/healthz").await.status == 200).then_some(())
    })
    .await;
    for conn in &mut idle {
        let said = closed_by_server(conn).await.expect("the server closes an idle connection within its timeouts");
        assert!(said.is_empty() || said.starts_with("HTTP/1.1 408"), "{said}");
    }
    assert!(metric(&server, "liverec_http_body_timeouts_total").await >= 1.0);
    assert_eq!(get(&server, "/healthz").await.status, 200);
    server.stop().await;
}

#[actix_rt::test]
async fn connections_over_the_per_ip_cap_are_refused_but_health_checks_pass() {
    let mut config = test_config();
    config.limits.connections_per_ip = 20;
    let server = start(config).await;
    let idle: Vec<TcpStream> = futures_util::future::join_all((0..20).map(|_| open(&server, NO_BODY))).await;
    // Once the server has counted the twenty, a request on one more connection is refused.
    let refused = eventually("a connection over the cap to be refused", || async {
        let status = status_of(&server, "/v1/users/u/recommendations").await;
        status.starts_with("HTTP/1.1 429").then_some(status)
    })
    .await;
    assert!(refused.starts_with("HTTP/1.1 429"));
    assert!(status_of(&server, "/healthz").await.starts_with("HTTP/1.1 200"), "probes pass the cap");
    assert!(metric(&server, "liverec_http_connections_refused_total").await >= 1.0);
    drop(idle);
    eventually("connections to be served again once the idle ones are gone", || async {
        status_of(&server, "/v1/users/u/recommendations").await.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
    server.stop().await;
}

#[actix_rt::test]
async fn the_total_connection_cap_keeps_room_for_health_checks() {
    let mut config = test_config();
    config.limits.connections_per_ip = 0;
    config.limits.max_connections = 40;
    let server = start(config).await;
    let idle: Vec<TcpStream> = futures_util::future::join_all((0..36).map(|_| open(&server, NO_BODY))).await;
    let refused = eventually("a connection over the total cap to be refused", || async {
        let status = status_of(&server, "/v1/users/u/recommendations").await;
        status.starts_with("HTTP/1.1 503").then_some(status)
    })
    .await;
    assert!(refused.starts_with("HTTP/1.1 503"));
    for _ in 0..10 {
        assert!(status_of(&server, "/healthz").await.starts_with("HTTP/1.1 200"), "probes keep their room");
    }
    drop(idle);
    server.stop().await;
}
