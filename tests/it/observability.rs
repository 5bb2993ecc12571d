//! The metrics exposition, checked by Prometheus' own linter (`promtool`, Debian package
//! `prometheus`, installed by scripts/test).

use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::support::*;

#[actix_rt::test]
async fn metrics_pass_promtool_check() {
    let server = start(test_config()).await;
    post_events(&server, event("observed", "item-0001", "click")).await;
    eventually("the event applied", || async {
        (metric(&server, "liverec_session_applied_events_total").await == 1.0).then_some(())
    })
    .await;
    let mut response = client().get(format!("{}/metrics", server.url())).send().await.expect("metrics");
    assert_eq!(response.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("text/plain; version=0.0.4"));
    let text = response.body().limit(16 << 20).await.expect("body");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/test (Debian package prometheus)");
    promtool.stdin.take().expect("stdin").write_all(&text).expect("write");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop().await;
}
