//! `liverec import` as a user runs it (the built binary) against a real server on
//! 127.0.0.1:0: the MovieLens-100K and RecBole layouts without flags, a generic file with
//! `--map`, an import interrupted by Ctrl-C and resumed, a re-run, and the report of bad lines.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use liverec::Server;
use serde_json::Value;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_liverec");

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(&format!("import-{name}")));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.arg("import").args(args).env_remove("LIVEREC_API_KEY").env_remove("RUST_LOG");
    command
}

/// Runs `liverec import` to its end, off the test's thread (the server shares the runtime).
async fn import(args: &[&str]) -> Output {
    let mut command = command(args);
    actix_web::rt::task::spawn_blocking(move || command.output().expect("run liverec import")).await.expect("join")
}

/// The summary printed with `--json`.
fn summary(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no JSON summary ({e}): {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr)))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A user's history as the server exports it: (event id, item id, event type, value, timestamp).
async fn history_of(server: &Server, user: &str) -> Vec<(String, String, String, Option<f64>, i64)> {
    let export = get(server, &format!("/v1/users/{user}/export")).await;
    assert_eq!(export.status, 200, "{}", export.body);
    export.body["profile"]["interactions"]
        .as_array()
        .expect("interactions")
        .iter()
        .map(|i| {
            (
                i["event_id"].as_str().expect("event id").to_owned(),
                i["item_id"].as_str().expect("item id").to_owned(),
                i["event_type"].as_str().expect("event type").to_owned(),
                i["value"].as_f64(),
                i["timestamp"].as_i64().expect("timestamp"),
            )
        })
        .collect()
}

/// Waits until `users` hold `total` events between them, failing only on a stall.
async fn wait_for_events(server: &Server, users: &[&str], total: usize) {
    wait_for_progress("the imported events in their users' histories", Duration::from_secs(60), || async {
        let mut seen = 0;
        for user in users {
            seen += history_of(server, user).await.len();
        }
        if seen >= total {
            Progress::Done(())
        } else {
            Progress::Pending(seen)
        }
    })
    .await;
}

/// Waits until every user of `expected` has as many events as expected (failing on a stall),
/// then checks each history: the items of the file in its order, each event once.
async fn assert_histories(server: &Server, expected: &BTreeMap<String, Vec<(String, f64, i64)>>) {
    let total: usize = expected.values().map(Vec::len).sum();
    let users: Vec<&str> = expected.keys().map(String::as_str).collect();
    wait_for_events(server, &users, total).await;
    for (user, events) in expected {
        let history = history_of(server, user).await;
        let ids: HashSet<&String> = history.iter().map(|h| &h.0).collect();
        assert_eq!(ids.len(), history.len(), "{user}: an event applied twice: {history:?}");
        let got: Vec<(String, f64, i64)> =
            history.iter().map(|(_, item, _, value, ts)| (item.clone(), value.unwrap_or(f64::NAN), *ts)).collect();
        assert_eq!(&got, events, "{user}'s history");
        assert!(history.iter().all(|h| h.2 == "rating"), "rating files import as ratings: {history:?}");
    }
}

/// RecBole atomic files: `users` users with `per_user` ratings each, over `items` items.
fn write_recbole(dir: &Path, users: usize, per_user: usize, items: usize) -> BTreeMap<String, Vec<(String, f64, i64)>> {
    let mut item = String::from("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n");
    for i in 0..items {
        writeln!(item, "rb-item-{i}\tItem number {i}\t1999\tgenre-{} genre-{}", i % 3, i % 5).expect("write");
    }
    std::fs::write(dir.join("rb.item"), item).expect("write .item");
    let mut inter = String::from("user_id:token\titem_id:token\trating:float\ttimestamp:float\n");
    let mut expected = BTreeMap::new();
    for u in 0..users {
        let user = format!("rb-user-{u}");
        let events: &mut Vec<(String, f64, i64)> = expected.entry(user.clone()).or_default();
        for k in 0..per_user {
            let (item, rating, ts) = (
                format!("rb-item-{}", (u * 7 + k * 3) % items),
                (1 + (u + k) % 5) as f64,
                1_600_000_000 + (u * 1000 + k * 10) as i64,
            );
            writeln!(inter, "{user}\t{item}\t{rating}\t{ts}").expect("write");
            events.push((item, rating, ts * 1000));
        }
    }
    std::fs::write(dir.join("rb.inter"), inter).expect("write .inter");
    expected
}

/// MovieLens-100K's files: `u.data` (lines of all users interleaved and not in time order, as
/// in the real file) and `u.item` with its 19 genre flags. The expected histories are in time
/// order.
fn write_ml100k(dir: &Path, users: usize, per_user: usize, items: usize) -> BTreeMap<String, Vec<(String, f64, i64)>> {
    let mut item = String::new();
    for i in 1..=items {
        let flags: Vec<&str> = (0..19).map(|g| if g == i % 19 || g == 8 { "1" } else { "0" }).collect();
        writeln!(item, "{i}|Movie {i} (1995)|01-Jan-1995||http://example.com/{i}|{}", flags.join("|")).expect("write");
    }
    std::fs::write(dir.join("u.item"), item).expect("write u.item");
    let mut data = String::new();
    let mut expected: BTreeMap<String, Vec<(String, f64, i64)>> = BTreeMap::new();
    for k in 0..per_user {
        for u in 1..=users {
            let (item, rating, ts) = (
                1 + (u * 5 + k * 11) % items,
                (1 + (u * k) % 5) as f64,
                880_000_000 + ((per_user - k) * 100 + u) as i64,
            );
            writeln!(data, "{u}\t{item}\t{rating}\t{ts}").expect("write");
            expected.entry(u.to_string()).or_default().push((item.to_string(), rating, ts * 1000));
        }
    }
    std::fs::write(dir.join("u.data"), data).expect("write u.data");
    for events in expected.values_mut() {
        events.sort_by_key(|e| e.2);
    }
    expected
}

#[actix_rt::test]
async fn recbole_and_movielens_layouts_import_without_flags_and_a_rerun_applies_nothing_twice() {
    let server = start(test_config()).await;
    let target = server.url();
    let dir = scratch("layouts");

    // RecBole.
    let recbole = dir.join("recbole");
    std::fs::create_dir_all(&recbole).expect("dir");
    let expected = write_recbole(&recbole, 12, 8, 30);
    let state = dir.join("recbole-state.json");
    let args = [
        "--data",
        recbole.to_str().expect("utf-8"),
        "--target",
        &target,
        "--state",
        state.to_str().expect("utf-8"),
        "--quiet",
        "--json",
    ];
    let out = import(&args).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["items"]["applied"], 30, "{s}");
    assert_eq!(s["events"]["applied"], 96, "{s}");
    assert_eq!(s["events"]["done"], true, "{s}");
    assert_eq!(s["rejected"], Value::Array(vec![]), "{s}");
    assert_histories(&server, &expected).await;
    let item = get(&server, "/v1/items/rb-item-7").await;
    assert_eq!(item.status, 200, "{}", item.body);
    assert_eq!(item.body["title"], "Item number 7", "{}", item.body);
    assert_eq!(item.body["categories"], serde_json::json!(["genre-1", "genre-2"]), "{}", item.body);

    // A second run of the same import (a fresh state file) sends every line again: the event
    // ids are the same, so the server applies none of them twice.
    std::fs::remove_file(&state).expect("remove state");
    let out = import(&args).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let (applied, duplicates) = ("liverec_session_applied_events_total", "liverec_session_duplicate_events_total");
    wait_for_progress("the second run's events handled", Duration::from_secs(60), || async {
        let handled = metric(&server, applied).await + metric(&server, duplicates).await;
        if handled >= 192.0 {
            Progress::Done(())
        } else {
            Progress::Pending(handled as u64)
        }
    })
    .await;
    assert_eq!(metric(&server, duplicates).await, 96.0, "the second run is applied as duplicates only");
    assert_histories(&server, &expected).await;

    // MovieLens-100K.
    let ml = dir.join("ml-100k");
    std::fs::create_dir_all(&ml).expect("dir");
    let expected = write_ml100k(&ml, 10, 6, 40);
    let out = import(&[
        "--data",
        ml.to_str().expect("utf-8"),
        "--target",
        &target,
        "--state",
        dir.join("ml-state.json").to_str().expect("utf-8"),
        "--json",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!((s["items"]["applied"].as_u64(), s["events"]["applied"].as_u64()), (Some(40), Some(60)), "{s}");
    assert!(stderr(&out).contains("last line applied: "), "{}", stderr(&out));
    assert_histories(&server, &expected).await;
    let item = get(&server, "/v1/items/3").await;
    assert_eq!(item.body["title"], "Movie 3 (1995)", "{}", item.body);
    assert_eq!(item.body["categories"], serde_json::json!(["Animation", "Drama"]), "{}", item.body);

    // MovieLens CSV (ml-latest, ml-25m): quoted titles with commas, `|`-separated genres.
    let csv = dir.join("ml-latest");
    std::fs::create_dir_all(&csv).expect("dir");
    std::fs::write(
        csv.join("movies.csv"),
        "movieId,title,genres\nm1,\"American President, The (1995)\",Comedy|Drama|Romance\nm2,Heat (1995),(no genres listed)\n",
    )
    .expect("write movies.csv");
    std::fs::write(
        csv.join("ratings.csv"),
        "userId,movieId,rating,timestamp\nmlc-1,m2,4.5,964982703\nmlc-1,m1,3.0,964981247\nmlc-2,m1,5.0,964982224\n",
    )
    .expect("write ratings.csv");
    let state = dir.join("csv-state.json");
    let out = import(&[
        "--data",
        csv.to_str().expect("utf-8"),
        "--target",
        &target,
        "--state",
        state.to_str().expect("utf-8"),
        "--quiet",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let expected: BTreeMap<String, Vec<(String, f64, i64)>> = [
        ("mlc-1".to_owned(), vec![("m1".to_owned(), 3.0, 964_981_247_000), ("m2".to_owned(), 4.5, 964_982_703_000)]),
        ("mlc-2".to_owned(), vec![("m1".to_owned(), 5.0, 964_982_224_000)]),
    ]
    .into();
    assert_histories(&server, &expected).await;
    let item = get(&server, "/v1/items/m1").await;
    assert_eq!(item.body["title"], "American President, The (1995)", "{}", item.body);
    assert_eq!(item.body["categories"], serde_json::json!(["Comedy", "Drama", "Romance"]), "{}", item.body);
    assert_eq!(get(&server, "/v1/items/m2").await.body["categories"], serde_json::json!([]));
    server.stop().await;
}

/// A generic CSV of `users` x `per_user` click events, users interleaved.
fn write_clicks(path: &Path, users: usize, per_user: usize) {
    let mut csv = String::from("ts,uid,iid\n");
    for k in 0..per_user {
        for u in 0..users {
            writeln!(csv, "{},csv-user-{u},item-{:04}", 1_700_000_000_000_i64 + (k * 1000 + u) as i64, (u + k) % 200)
                .expect("write");
        }
    }
    std::fs::write(path, csv).expect("write csv");
}

#[actix_rt::test]
async fn an_import_interrupted_by_ctrl_c_resumes_after_the_last_line_and_applies_each_event_once() {
    interrupt_and_resume(&[]).await;
}

#[actix_rt::test]
async fn an_import_in_file_order_interrupted_by_ctrl_c_resumes_after_the_last_line() {
    interrupt_and_resume(&["--file-order"]).await;
}

/// Imports 1,000 clicks slowly, interrupts it with SIGINT after two batches, resumes it, and
/// checks that every event was applied once. `order` is empty (time order) or `--file-order`.
async fn interrupt_and_resume(order: &[&str]) {
    let server = start(test_config()).await;
    let target = server.url();
    let dir = scratch("resume");
    let (users, per_user) = (40, 25);
    let data = dir.join("clicks.csv");
    write_clicks(&data, users, per_user);
    let state = dir.join("state.json");
    let (data_arg, state_arg) = (data.to_str().expect("utf-8"), state.to_str().expect("utf-8"));
    let flags = ["--map", "user_id=uid", "--map", "item_id=iid", "--map", "timestamp=ts", "--event-type", "click"];
    let base: Vec<&str> = ["--data", data_arg, "--target", &target, "--state", state_arg, "--quiet"]
        .into_iter()
        .chain(flags)
        .chain(order.iter().copied())
        .collect();

    // Slowed to 100 lines a second, so that it is still running when it is interrupted.
    let mut slow = command(&[base.as_slice(), &["--rate", "100"]].concat());
    let child = slow.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let read_state = || -> Option<Value> { serde_json::from_slice(&std::fs::read(&state).ok()?).ok() };
    wait_for_progress("two batches applied", Duration::from_secs(60), || {
        let line = read_state().and_then(|s| s["events"]["line"].as_u64()).unwrap_or(0);
        async move {
            if line > 200 {
                Progress::Done(())
            } else {
                Progress::Pending(line)
            }
        }
    })
    .await;
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let out = actix_web::rt::task::spawn_blocking(move || child.wait_with_output()).await.expect("join").expect("wait");
    assert_eq!(out.status.code(), Some(130), "exit code of an interrupted import: {}", stderr(&out));
    let recorded = read_state().expect("state file");
    let line = recorded["events"]["line"].as_u64().expect("line");
    assert!(line < (users * per_user) as u64 + 1, "interrupted before the end: {recorded}");
    assert!(
        stderr(&out).contains(&format!("last line applied: {data_arg}:{line}")),
        "the last line applied, printed on interruption: {}",
        stderr(&out)
    );

    // Not resumed by accident: a run without --resume refuses to start over.
    let out = import(&base).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--resume"), "{}", stderr(&out));

    let out = import(&[base.as_slice(), &["--resume", "--json"]].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["events"]["applied"], users * per_user, "applied over both runs: {s}");
    assert_eq!(s["events"]["line"], users * per_user + 1, "{s}");

    let expected: BTreeMap<String, usize> = (0..users).map(|u| (format!("csv-user-{u}"), per_user)).collect();
    let names: Vec<&str> = expected.keys().map(String::as_str).collect();
    wait_for_events(&server, &names, users * per_user).await;
    for (user, n) in &expected {
        let history = history_of(&server, user).await;
        let ids: HashSet<&String> = history.iter().map(|h| &h.0).collect();
        assert_eq!((history.len(), ids.len()), (*n, *n), "{user}: each event exactly once: {history:?}");
        assert!(history.iter().all(|h| h.2 == "click"));
    }
    // Resumed after the recorded line: at most the one batch in flight at the interruption
    // (100 lines at --rate 100) was sent twice, and the server applied it once.
    let posted = metric(&server, "liverec_ingest_events_total{source=\"http\"}").await;
    let total = (users * per_user) as f64;
    assert!((total..=total + 100.0).contains(&posted), "{posted} events posted for {total} lines");
    server.stop().await;
}

#[actix_rt::test]
async fn bad_lines_are_reported_with_their_reasons_and_the_rest_is_imported() {
    let server = start(test_config()).await;
    let target = server.url();
    let dir = scratch("rejects");
    let data = dir.join("events.jsonl");
    let lines = [
        r#"{"user": "j-1", "item": "item-0001", "rating": 4, "time": 1700000000}"#,
        r#"{"user": "j-1", "item": "item-0002", "rating": 9, "time": 1700000001}"#, // 2: over max_rating
        r#"{"user": "j-2", "item": "item-0003", "rating": 3, "time": "yesterday"}"#, // 3: bad timestamp
        r#"{"user": "j-2", "item": "item-0004", "time": 1700000002, "kind": "like"}"#, // 4: no such type
        r#"{"user": "j-2", "item": "item-0005", "rating": 2, "time": 1700000003"#,  // 5: not JSON
        "",
        r#"{"item": "item-0006", "rating": 2, "time": 1700000004}"#, // 7: no user
        r#"{"user": "j-2", "item": "item-0007", "time": 1700000005, "kind": "click"}"#,
        r#"{"user": "j-1", "item": "item-0008", "rating": 6, "time": 1700000006}"#, // 9: over max_rating
        r#"{"user": "j-1", "item": "item-0009", "rating": 5, "time": 1700000007}"#,
    ];
    std::fs::write(&data, lines.join("\n")).expect("write");
    let state = dir.join("state.json");
    let args = [
        "--data",
        data.to_str().expect("utf-8"),
        "--target",
        &target,
        "--state",
        state.to_str().expect("utf-8"),
        "--map",
        "user_id=user",
        "--map",
        "item_id=item",
        "--map",
        "value=rating",
        "--map",
        "timestamp=time",
        "--map",
        "event_type=kind",
        "--json",
    ];
    let out = import(&args).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!((s["events"]["applied"].as_u64(), s["events"]["rejected"].as_u64()), (Some(3), Some(6)), "{s}");
    let reasons: BTreeMap<String, (u64, Vec<u64>)> = s["rejected"]
        .as_array()
        .expect("rejected")
        .iter()
        .map(|r| {
            let reason = format!(
                "{} {}",
                r["reason"]["code"].as_str().unwrap_or(""),
                r["reason"]["field"].as_str().unwrap_or("")
            );
            let lines = r["first_lines"].as_array().expect("lines").iter().filter_map(Value::as_u64).collect();
            (reason.trim().to_owned(), (r["count"].as_u64().unwrap_or(0), lines))
        })
        .collect();
    let want: BTreeMap<String, (u64, Vec<u64>)> = [
        ("invalid_event value", (2, vec![2, 9])),
        ("bad_timestamp timestamp", (1, vec![3])),
        ("unknown_event_type event_type", (1, vec![4])),
        ("malformed_json", (1, vec![5])),
        ("missing_field user_id", (1, vec![7])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(reasons, want, "{s}");
    let text = stderr(&out);
    assert!(text.contains("rejected lines, by reason:") && text.contains("invalid_event (value)"), "{text}");

    // The good lines are in: j-1's two ratings, j-2's click.
    let expected: [(&str, Vec<&str>); 2] = [("j-1", vec!["item-0001", "item-0009"]), ("j-2", vec!["item-0007"])];
    wait_for_events(&server, &["j-1", "j-2"], 3).await;
    for (user, items) in &expected {
        let got: Vec<String> = history_of(&server, user).await.into_iter().map(|h| h.1).collect();
        assert_eq!(&got, items, "{user}");
    }

    // A flag naming a column the file lacks: a clear error, nothing sent.
    let csv = dir.join("plain.csv");
    std::fs::write(&csv, "a,b\n1,2\n").expect("write");
    let out = import(&[
        "--data",
        csv.to_str().expect("utf-8"),
        "--target",
        &target,
        "--map",
        "user_id=uid",
        "--map",
        "item_id=b",
    ])
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--map user_id=uid: no column uid (the columns are: a, b)"), "{}", stderr(&out));
    server.stop().await;
}

/// Every catalogue item the server lists (`GET /v1/items`, page by page): id -> title.
async fn listed_items(server: &Server) -> BTreeMap<String, Value> {
    let mut listed = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/items?limit=1000&cursor={c}"),
            None => "/v1/items?limit=1000".to_owned(),
        };
        let page = get(server, &path).await;
        assert_eq!(page.status, 200, "{}", page.body);
        for item in page.body["items"].as_array().expect("items") {
            listed.insert(item["item_id"].as_str().expect("id").to_owned(), item["title"].clone());
        }
        cursor = page.body["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            return listed;
        }
    }
}

#[actix_rt::test]
async fn an_import_into_the_kafka_topics_reaches_the_catalogue_and_every_users_history() {
    let _services = SERVICES.read().await;
    let config = production_config("import");
    let server = start(config.clone()).await;
    let dir = scratch("kafka");
    let mut expected = write_recbole(&dir, 10, 6, 20);
    // One rating over events.max_rating and one item id over events.max_id_len: checked before
    // they are produced, reported with their lines.
    let inter = dir.join("rb.inter");
    let mut text = std::fs::read_to_string(&inter).expect("read");
    text.push_str("rb-user-0\trb-item-1\t9\t1600009999\n");
    std::fs::write(&inter, text).expect("write");
    let bad_line = 1 + 10 * 6 + 1;
    let item = dir.join("rb.item");
    let mut text = std::fs::read_to_string(&item).expect("read");
    let long_id = "x".repeat(config.events.max_id_len + 1);
    writeln!(text, "{long_id}\tToo long an id\t2000\tgenre-0").expect("write");
    std::fs::write(&item, text).expect("write");
    let bad_item_line = 1 + 20 + 1;
    let (data, state) = (dir.to_str().expect("utf-8"), dir.join("state.json"));
    let kafka = ["--data", data, "--kafka", &config.kafka.brokers, "--topic", &config.kafka.events_topic];

    // With --target too, the catalogue goes over REST: a target that does not answer stops the
    // import before anything is produced.
    let rest_state = dir.join("rest-state.json");
    let out = import(
        &[kafka.as_slice(), &["--target", "http://127.0.0.1:1", "--state", rest_state.to_str().expect("utf-8")]]
            .concat(),
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("http://127.0.0.1:1/healthz"), "{}", stderr(&out));

    // Without --target: the catalogue to the items topic (derived from --topic as the server
    // derives it), the events to the events topic.
    let out =
        import(&[kafka.as_slice(), &["--state", state.to_str().expect("utf-8"), "--quiet", "--json"]].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!((s["items"]["applied"].as_u64(), s["events"]["applied"].as_u64()), (Some(20), Some(60)), "{s}");
    assert_eq!((s["items"]["rejected"].as_u64(), s["events"]["rejected"].as_u64()), (Some(1), Some(1)), "{s}");
    let rejected: BTreeMap<String, Value> = s["rejected"]
        .as_array()
        .expect("rejected")
        .iter()
        .map(|r| (r["reason"]["code"].as_str().expect("code").to_owned(), r.clone()))
        .collect();
    let reasons: Vec<&String> = rejected.keys().collect();
    assert_eq!(reasons, ["invalid_event", "invalid_item_id"], "{s}");
    assert_eq!(rejected["invalid_event"]["reason"]["field"], "value", "{s}");
    assert_eq!(rejected["invalid_event"]["first_lines"], serde_json::json!([bad_line]), "{s}");
    assert_eq!(rejected["invalid_item_id"]["reason"]["field"], "item_id", "{s}");
    assert_eq!(rejected["invalid_item_id"]["first_lines"], serde_json::json!([bad_item_line]), "{s}");

    // The server lists the imported catalogue, read from the items topic.
    let imported = |listed: &BTreeMap<String, Value>| listed.keys().filter(|id| id.starts_with("rb-item-")).count();
    let listed = wait_for_progress("the imported items in the catalogue", Duration::from_secs(60), || async {
        let listed = listed_items(&server).await;
        match imported(&listed) {
            20 => Progress::Done(listed),
            n => Progress::Pending(n),
        }
    })
    .await;
    for i in 0..20 {
        assert_eq!(listed[&format!("rb-item-{i}")], format!("Item number {i}"), "{listed:?}");
    }
    assert!(!listed.contains_key(&long_id), "the refused item is not in the catalogue");
    let item = get(&server, "/v1/items/rb-item-7").await;
    assert_eq!(item.body["categories"], serde_json::json!(["genre-1", "genre-2"]), "{}", item.body);

    // And serves the users their imported histories.
    expected.retain(|_, events| !events.is_empty());
    assert_histories(&server, &expected).await;
    for user in expected.keys() {
        let list = get(&server, &format!("/v1/users/{user}/recommendations?k=5")).await;
        assert_eq!(list.status, 200, "{user}: {}", list.body);
        assert!(!list.body["items"].as_array().expect("items").is_empty(), "{user}: {}", list.body);
    }
    server.stop().await;
}

#[actix_rt::test]
async fn an_import_slowed_by_the_servers_rate_limit_waits_and_applies_everything() {
    // Two requests a second per address: most of the import's requests are answered 429 with
    // Retry-After, and it waits instead of failing.
    let mut config = test_config();
    config.limits.per_ip_per_sec = 2;
    config.limits.per_ip_burst = 1;
    let server = start(config).await;
    let dir = scratch("limited");
    let data = dir.join("clicks.csv");
    let (users, per_user) = (5, 8);
    write_clicks(&data, users, per_user);
    let state = dir.join("state.json");
    let out = import(&[
        "--data",
        data.to_str().expect("utf-8"),
        "--target",
        &server.url(),
        "--state",
        state.to_str().expect("utf-8"),
        "--map",
        "user_id=uid",
        "--map",
        "item_id=iid",
        "--map",
        "timestamp=ts",
        "--batch",
        "5",
        "--quiet",
        "--json",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(summary(&out)["events"]["applied"], users * per_user);
    assert!(metric(&server, "liverec_http_rate_limited_total").await > 0.0, "the server did refuse some requests");
    for u in 0..users {
        let user = format!("csv-user-{u}");
        let history = wait_for_progress("the user's events", Duration::from_secs(60), || {
            let (server, user) = (&server, &user);
            async move {
                // The test's own requests are rate limited too: a 429 is no answer yet.
                let export = get(server, &format!("/v1/users/{user}/export")).await;
                if export.status == 429 {
                    return Progress::Pending(None);
                }
                let history = export.body["profile"]["interactions"].as_array().cloned().unwrap_or_default();
                if history.len() >= per_user {
                    Progress::Done(history)
                } else {
                    Progress::Pending(Some(history.len()))
                }
            }
        })
        .await;
        assert_eq!(history.len(), per_user, "{user}: {history:?}");
        assert!(history.iter().all(|h| h["event_type"] == "view"), "lines without a value are views: {history:?}");
    }
    server.stop().await;
}

#[actix_rt::test]
async fn with_auth_on_the_import_needs_a_producer_key_and_takes_it_from_the_environment() {
    let mut config = test_config();
    config.auth.mode = liverec::auth::AuthMode::On;
    config.auth.token_secret = "a test secret that is long enough to sign".into();
    let (producer, producer_entry) = liverec::auth::new_key("ingest", liverec::auth::Role::Producer).expect("key");
    let (admin, admin_entry) = liverec::auth::new_key("ops", liverec::auth::Role::Admin).expect("key");
    config.auth.api_keys = vec![producer_entry, admin_entry];
    let server = start(config).await;
    let dir = scratch("auth");
    let data = dir.join("clicks.csv");
    write_clicks(&data, 2, 3);
    let target = server.url();
    let state = dir.join("state.json");
    let args = [
        "--data",
        data.to_str().expect("utf-8"),
        "--target",
        &target,
        "--state",
        state.to_str().expect("utf-8"),
        "--map",
        "user_id=uid",
        "--map",
        "item_id=iid",
        "--quiet",
    ];

    let out = import(&args).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains("401 unauthorized") && text.contains("--api-key") && text.contains("nothing was applied"),
        "{text}"
    );

    let mut command = command(&args);
    command.env("LIVEREC_API_KEY", &producer);
    let out = actix_web::rt::task::spawn_blocking(move || command.output().expect("run")).await.expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    for user in ["csv-user-0", "csv-user-1"] {
        let events = wait_for_progress("the user's events", Duration::from_secs(60), || async {
            let (_, body) = call(&server, "GET", &format!("/v1/users/{user}/export"), Some(&admin), None).await;
            let n = body["profile"]["interactions"].as_array().map_or(0, Vec::len);
            if n >= 3 {
                Progress::Done(n)
            } else {
                Progress::Pending(n)
            }
        })
        .await;
        assert_eq!(events, 3, "{user}");
    }
    server.stop().await;
}

#[actix_rt::test]
async fn batches_over_the_servers_max_batch_are_halved_until_they_pass() {
    let mut config = test_config();
    config.events.max_batch = 6;
    let server = start(config).await;
    let dir = scratch("max-batch");
    let data = dir.join("clicks.csv");
    let (users, per_user) = (4, 10);
    write_clicks(&data, users, per_user);
    let state = dir.join("state.json");
    let args = ["--data", data.to_str().expect("utf-8"), "--target", &server.url(), "--state"];
    let map = ["--map", "user_id=uid", "--map", "item_id=iid", "--map", "timestamp=ts", "--batch", "25", "--json"];
    let out = import(&[args.as_slice(), &[state.to_str().expect("utf-8")], &map].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(summary(&out)["events"]["applied"], users * per_user, "{}", stderr(&out));
    let names: Vec<String> = (0..users).map(|u| format!("csv-user-{u}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    wait_for_events(&server, &names, users * per_user).await;
    for user in names {
        assert_eq!(history_of(&server, user).await.len(), per_user, "{user}");
    }
    server.stop().await;
}
