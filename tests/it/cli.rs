//! The `liverec` binary as a user runs it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_liverec");

#[test]
fn unknown_config_keys_stop_start_up_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("liverec-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("typo.toml");
    std::fs::write(&file, "[session]\nidle_ttl = 5\n").expect("write");
    let out = Command::new(BIN).args(["serve", "--config"]).arg(&file).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("idle_ttl"), "{stderr}");

    let out = Command::new(BIN).args(["serve"]).env("LIVEREC_SESION__IDLE_TTL_MS", "5").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sesion"));
}

#[test]
fn serve_starts_with_no_configuration_and_stops_on_sigterm() {
    let mut child = serve(&[], "json").stderr(Stdio::null()).spawn().expect("spawn");
    let addr = listening_addr(&mut child).expect("listening line");
    let body = http_get(&addr, "/readyz");
    assert!(body.contains("\"status\":\"ready\""), "{body}");
    assert!(body.contains("\"durable\":false"), "{body}");
    let recs = http_get(&addr, "/v1/users/newcomer/recommendations");
    assert!(recs.contains("\"items\":[{"), "the demo model answers at once: {recs}");

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "graceful exit: {exit:?}");
}

/// `liverec serve` with `args` on a free loopback port, logging in `format` to a piped stdout.
fn serve(args: &[&str], format: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("serve")
        .args(args)
        .env("LIVEREC_LISTEN", "127.0.0.1:0")
        .env("LIVEREC_LOG__FORMAT", format)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped());
    command
}

/// The address in the JSON log line announcing it; reading blocks until it is written (none if
/// the process ends first).
fn listening_addr(child: &mut std::process::Child) -> Option<String> {
    let stdout = child.stdout.take().expect("stdout");
    BufReader::new(stdout).lines().map_while(Result::ok).find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(&line).ok()?;
        (v["fields"]["message"] == "liverec listening").then(|| v["fields"]["addr"].as_str().map(str::to_owned))?
    })
}

/// A minimal HTTP/1.1 GET over a plain TCP socket.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

#[test]
fn schema_into_a_closed_pipe_exits_quietly() {
    let mut child =
        Command::new(BIN).arg("schema").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    // The reader goes away before the schema is written (as `| head -c 10` does after 10 bytes).
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
}

#[test]
fn eval_on_a_missing_directory_says_why_once() {
    let out = Command::new(BIN).args(["eval", "--data", "/nonexistent-liverec-data"]).output().expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent-liverec-data"), "{stderr}");
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
}

#[test]
fn logs_into_a_pipe_carry_no_colours_and_the_start_up_log_names_the_dashboard() {
    let mut child = serve(&[], "text").stderr(Stdio::null()).spawn().expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let done = line.contains("liverec listening");
        seen.push(line);
        if done {
            break;
        }
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    let log = seen.join("\n");
    assert!(log.contains("liverec listening"), "{log}");
    assert!(!log.contains('\u{1b}'), "no ANSI escapes when stdout is not a terminal: {log}");
    assert!(log.contains("dashboard=http://127.0.0.1:"), "the start-up log names the dashboard URL: {log}");
    let cwd = std::env::current_dir().expect("cwd");
    let registry = format!("registry={}", cwd.join("models").display());
    assert!(log.contains(&registry), "the start-up log says where trained versions go: {log}");
}

#[test]
fn the_loop_demo_config_starts_and_answers_its_own_curl_commands() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/loop-demo.toml");
    let registry = std::env::temp_dir().join(format!("liverec-loop-demo-{}", std::process::id()));
    let mut child = serve(&["--config", config], "json")
        .env("LIVEREC_MODEL__REGISTRY_DIR", &registry)
        .env_remove("LIVEREC_AUTH__TOKEN_SECRET")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let addr = listening_addr(&mut child);
    let models = addr.as_deref().map(|addr| http_get(addr, "/v1/admin/models"));
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let out = child.wait_with_output().expect("wait");
    let _ = std::fs::remove_dir_all(&registry);
    let models = models.unwrap_or_else(|| panic!("not started: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(models.starts_with("HTTP/1.1 200"), "the demo's curl commands carry no credential: {models}");
}

#[test]
fn a_weak_token_secret_says_why_auth_is_on_and_how_to_turn_it_off() {
    let out = Command::new(BIN)
        .args(["serve"])
        .env("LIVEREC_LISTEN", "127.0.0.1:0")
        .env("LIVEREC_DEMO__ENABLED", "false")
        .env_remove("LIVEREC_AUTH__TOKEN_SECRET")
        .env_remove("LIVEREC_AUTH__MODE")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("demo.enabled = false"), "why auth is on: {stderr}");
    assert!(stderr.contains("auth.mode = \"off\""), "how to turn it off: {stderr}");
}
