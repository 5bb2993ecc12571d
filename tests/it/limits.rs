//! Limits that protect the server: request rates per IP and per API key (429 with
//! `Retry-After`), and open streams per IP.

use liverec::auth::{new_key, AuthMode, Role};
use serde_json::Value;

use crate::support::*;

#[actix_rt::test]
async fn rate_limits_answer_429_with_retry_after_per_ip_and_per_key() {
    let mut config = test_config();
    config.limits.per_ip_per_sec = 1;
    config.limits.per_ip_burst = 5;
    let server = start(config).await;
    // Twenty requests in a row from one IP: the bucket holds five and refills one a second.
    let mut limited = None;
    for _ in 0..20 {
        let response = client().get(format!("{}/v1/users/u/recommendations", server.url())).send().await.expect("get");
        if response.status().as_u16() == 429 {
            limited = Some(response);
            break;
        }
    }
    let mut response = limited.expect("the sixth request within a second or so is refused");
    let retry = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    assert!(retry >= Some(1), "Retry-After says when to come back: {retry:?}");
    let body: Value = serde_json::from_slice(&response.body().await.expect("body")).expect("json");
    assert_eq!(body["error"]["code"], "rate_limited");
    for _ in 0..20 {
        assert_eq!(get(&server, "/healthz").await.status, 200, "probes are never limited");
    }
    assert!(metric(&server, "liverec_http_rate_limited_total").await >= 1.0);
    server.stop().await;

    // Per credential: two keys from the same IP have separate buckets.
    let (mut config, keys) = (test_config(), [new_key("a", Role::Reader), new_key("b", Role::Reader)]);
    config.auth.mode = AuthMode::On;
    config.auth.token_secret = "a test secret that is long enough to sign".into();
    config.limits.per_key_per_sec = 1;
    config.limits.per_key_burst = 3;
    let keys: Vec<String> = keys
        .into_iter()
        .map(|k| {
            let (key, entry) = k.expect("random");
            config.auth.api_keys.push(entry);
            key
        })
        .collect();
    let server = start(config).await;
    let mut first_refused = false;
    for _ in 0..20 {
        if call(&server, "GET", "/v1/users/u/recommendations", Some(&keys[0]), None).await.0 == 429 {
            first_refused = true;
            break;
        }
    }
    assert!(first_refused, "the first key ran out");
    assert_eq!(call(&server, "GET", "/v1/users/u/recommendations", Some(&keys[1]), None).await.0, 200);
    server.stop().await;
}

#[actix_rt::test]
async fn streams_per_ip_are_limited_and_freed_when_closed() {
    let mut config = test_config();
    config.limits.streams_per_ip = 2;
    let server = start(config).await;
    let first = SseStream::connect(&server, "s1", None).await;
    let _second = WsClient::connect(&server).await;
    let third = client().get(format!("{}/v1/users/s3/recommendations/stream", server.url())).send().await.expect("sse");
    assert_eq!(third.status(), 429, "a third stream from the same address is refused");
    drop(first);
    eventually("a closed stream frees its slot", || async {
        let again = client().get(format!("{}/v1/users/s3/recommendations/stream", server.url())).send().await.ok()?;
        (again.status() == 200).then_some(())
    })
    .await;
    server.stop().await;
}
