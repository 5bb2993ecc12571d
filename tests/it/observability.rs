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

/// A bare OTLP/HTTP receiving end: accepts POSTs on a loopback port and keeps their bodies.
struct Collector {
    port: u16,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Collector {
    fn start() -> Collector {
        use std::io::{BufRead, BufReader, Read};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let kept = kept.clone();
                std::thread::spawn(move || {
                    let mut writer = stream.try_clone().expect("clone");
                    let mut reader = BufReader::new(stream);
                    // One request after another on a kept-alive connection.
                    loop {
                        let mut length = 0usize;
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            let header = line.trim_end();
                            if header.is_empty() {
                                break;
                            }
                            if let Some((name, value)) = header.split_once(':') {
                                if name.eq_ignore_ascii_case("content-length") {
                                    length = value.trim().parse().unwrap_or(0);
                                }
                            }
                        }
                        let mut body = vec![0; length];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        kept.lock().expect("lock").extend_from_slice(&body);
                        if writer
                            .write_all(
                                b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
                            )
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Collector { port, bodies }
    }

    fn received(&self) -> Vec<u8> {
        self.bodies.lock().expect("lock").clone()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[actix_rt::test]
async fn traces_of_the_event_path_go_over_otlp_and_logs_carry_the_trace_id() {
    use std::io::{BufRead, BufReader};
    let collector = Collector::start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_liverec"))
        .args(["serve"])
        .env("LIVEREC_LISTEN", "127.0.0.1:0")
        .env("LIVEREC_LOG__FORMAT", "json")
        .env("LIVEREC_LOG__LEVEL", "info,liverec::http::events=debug")
        .env("LIVEREC_TRACING__OTLP_ENDPOINT", format!("http://127.0.0.1:{}/v1/traces", collector.port))
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn liverec");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    {
        let (stdout, lines) = (child.stdout.take().expect("stdout"), lines.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["fields"]["message"] == "liverec listening" {
                        let _ = addr_tx.send(v["fields"]["addr"].as_str().unwrap_or_default().to_owned());
                    }
                }
                lines.lock().expect("lock").push(line);
            }
        });
    }
    let addr = addr_rx.recv_timeout(DEADLINE).expect("liverec listening");
    let url = format!("http://{addr}");
    let posted = client()
        .post(format!("{url}/v1/events"))
        .insert_header(("content-type", "application/json"))
        .send_body(event("traced", "item-0001", "click").to_string())
        .await
        .expect("post");
    assert_eq!(posted.status(), 202);

    // The log line of the accepted batch names its trace.
    let trace_id = eventually("a log line with the trace id", || async {
        let lines = lines.lock().expect("lock").clone();
        lines.iter().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            (v["fields"]["message"] == "events accepted").then(|| v["span"]["trace_id"].as_str().map(str::to_owned))?
        })
    })
    .await;
    assert_eq!(trace_id.len(), 32, "{trace_id}");
    let id_bytes: Vec<u8> =
        (0..16).map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).expect("hex")).collect();
    // The batch exporter sends the spans of that trace, from receive to push.
    eventually("the event path's spans at the collector", || async {
        let body = collector.received();
        let all =
            ["receive", "session_apply", "model_score", "push"].iter().all(|name| contains(&body, name.as_bytes()));
        (all && contains(&body, &id_bytes)).then_some(())
    })
    .await;
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    assert!(child.wait().expect("wait").success());
}
