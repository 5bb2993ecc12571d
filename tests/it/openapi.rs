//! The OpenAPI document at `/openapi.json`, checked against the running server by schemathesis
//! (PyPI; scripts/test installs it and sets `LIVEREC_SCHEMATHESIS`): generated requests, valid
//! and invalid, on every operation, with auth on. The run fails on any 5xx, on a status, content
//! type, header or body the document does not declare, and on an operation that ignores its
//! credentials.

use std::process::Command;

use liverec::auth::{new_key, AuthMode, Role};

use crate::support::*;

/// The checks that define "the server keeps to its document". Left out: `positive_data_acceptance`
/// (some limits are configuration, e.g. `recs.max_k`, so valid-looking requests may get a 4xx
/// the document lists) and `negative_data_rejection` (serde accepts a JSON array in place of an
/// object, which the document does not describe; see docs/api.md).
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance,ignored_auth";

fn schemathesis() -> String {
    std::env::var("LIVEREC_SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into())
}

#[actix_rt::test]
async fn the_server_keeps_to_its_openapi_document() {
    let mut config = test_config();
    config.auth.mode = AuthMode::On;
    config.auth.token_secret = "a test secret that is long enough to sign".into();
    let (admin, entry) = new_key("schemathesis", Role::Admin).expect("random key");
    config.auth.api_keys.push(entry);
    // Thousands of requests in seconds from one address: no rate limit, so that every case
    // reaches the handlers (429 is in the document all the same).
    config.limits.per_ip_per_sec = 0;
    config.limits.per_key_per_sec = 0;
    let server = start(config).await;

    let mut response = client().get(format!("{}/openapi.json", server.url())).send().await.expect("openapi.json");
    assert_eq!(response.status().as_u16(), 200);
    let document: serde_json::Value = response.json().limit(4 << 20).await.expect("a JSON document");
    assert_eq!(document["openapi"], "3.1.0");
    assert!(document["paths"]["/v1/events"]["post"].is_object());

    let seed = std::env::var("LIVEREC_SCHEMATHESIS_SEED").unwrap_or_else(|_| "20261126".into());
    let url = format!("{}/openapi.json", server.url());
    let authorization = format!("Authorization: Bearer {admin}");
    let binary = schemathesis();
    let methods = ["get", "put", "post", "delete", "patch"];
    let operations = document["paths"]
        .as_object()
        .expect("paths")
        .values()
        .flat_map(|p| methods.map(|m| &p[m]))
        .filter(|o| o.is_object())
        .count();
    // schemathesis blocks; it runs on a blocking thread while this runtime keeps serving.
    let out = actix_rt::task::spawn_blocking(move || {
        Command::new(&binary)
            .args(["run", &url, "--checks", CHECKS, "--header", &authorization])
            .args(["--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "25"])
            // One worker: with two threads, Hypothesis' lambda descriptions parse source with
            // CPython's `ast` concurrently, which is not thread-safe and once failed a run with
            // "AST constructor recursion depth mismatch" (a tool error, not a finding).
            .args(["--seed", &seed, "--request-timeout", "20", "--workers", "1"])
            // An SSE stream never ends; its handshake is covered in tests/it/streams.rs.
            .args(["--exclude-path", "/v1/users/{user_id}/recommendations/stream"])
            .args(["--no-color", "--output-truncate", "false"])
            .env("NO_COLOR", "1")
            // Its caches go under target/, not into the source tree.
            .current_dir(env!("CARGO_TARGET_TMPDIR"))
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {binary} ({e}): scripts/test installs schemathesis from PyPI and sets \
                     LIVEREC_SCHEMATHESIS; or `pip install schemathesis`"
                )
            })
    })
    .await
    .expect("schemathesis thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found responses that break the OpenAPI document:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It really ran: every operation was tested but the excluded stream and the document itself
    // (schemathesis leaves out the URL it loaded the schema from).
    let tested = format!("Tested: {}", operations - 2);
    assert!(stdout.contains(&tested), "expected {tested:?}:\n{stdout}");
    server.stop().await;
}

/// Every error `code` the HTTP layer can answer (the first string literal of each `ApiError`
/// construction in `src/http/`) is listed in docs/api.md's status table.
#[test]
fn docs_api_lists_every_error_code_the_server_answers() {
    let root = env!("CARGO_MANIFEST_DIR");
    let docs = std::fs::read_to_string(format!("{root}/docs/api.md")).expect("docs/api.md");
    let makers = ["ApiError::new(", "bad_request(", "unprocessable(", "not_found(", "unavailable("];
    let mut missing = Vec::new();
    let mut found = 0;
    for entry in std::fs::read_dir(format!("{root}/src/http")).expect("src/http") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let source = std::fs::read_to_string(&path).expect("source");
        for maker in makers {
            for (at, _) in source.match_indices(maker) {
                let call = &source[at + maker.len()..];
                let call = &call[..call.find(')').unwrap_or(call.len()).min(160)];
                let Some(start) = call.find('"') else { continue };
                let rest = &call[start + 1..];
                let code = &rest[..rest.find('"').unwrap_or(0)];
                if code.is_empty() || !code.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    continue;
                }
                found += 1;
                if !docs.contains(&format!("`{code}`")) {
                    missing.push(format!("{code} ({})", path.display()));
                }
            }
        }
    }
    assert!(found > 20, "the scan found the error codes: {found}");
    missing.sort();
    missing.dedup();
    assert!(missing.is_empty(), "codes missing from docs/api.md: {missing:?}");
}
