//! Serving a trained sequential model from the registry, and switching versions while serving.

use std::path::Path;

use liverec::config::ModelKind;
use liverec::models::artifact::{rfc3339, DataWindow, Manifest, SavedMetrics, ServeConfig};
use liverec::models::data::{Dataset, DatasetBuilder, Split};
use liverec::models::sasrec::Config as NetConfig;
use liverec::models::train::{train, TrainConfig, TrainFile};
use serde_json::json;

use crate::support::*;

/// Trains a tiny model on users walking a cycle of 20 items and saves it as `dir/name`.
pub(crate) fn train_version(dir: &Path, name: &str, seed: u64, created_secs: i64) -> String {
    let mut builder = DatasetBuilder::new();
    for item in 0..20 {
        builder.item(&format!("seq-{item}"));
    }
    for user in 0..30usize {
        for t in 0..8usize {
            builder.interaction(&format!("u{user}"), &format!("seq-{}", (user * 7 + t) % 20), t as i64 * 60, Some(4.0));
        }
    }
    let dataset = builder.build();
    let split = Split::leave_one_out(&dataset.sequences);
    train_and_save(&dataset, &split, seed, &dir.join(name), created_secs)
}

/// Trains a tiny model (hidden 16, `max_len` 8, 3 epochs) on `split` and saves it in `dir`;
/// returns its version.
pub(crate) fn train_and_save(dataset: &Dataset, split: &Split, seed: u64, dir: &Path, created_secs: i64) -> String {
    let file = TrainFile {
        model: NetConfig {
            hidden: 16,
            layers: 1,
            heads: 2,
            inner: 32,
            max_len: 8,
            dropout: 0.0,
            ..NetConfig::default()
        },
        train: TrainConfig { seed, epochs: 3, patience: 0, batch_size: 16, eval_every: 3, ..TrainConfig::default() },
        serve: ServeConfig::default(),
    };
    let mut trained = train(dataset, split, &file, false).expect("trains");
    let mut manifest = Manifest {
        format: String::new(),
        version: String::new(),
        created_at: rfc3339(created_secs),
        config: trained.model.config.clone(),
        serve: trained.model.serve.clone(),
        data: DataWindow::default(),
        metrics: SavedMetrics { valid: Some(trained.valid), test: None },
        training: trained.summary.clone(),
        weights_sha256: String::new(),
    };
    trained.model.save(dir, &mut manifest).expect("saves");
    manifest.version
}

#[actix_rt::test]
async fn a_trained_version_serves_and_another_replaces_it_while_serving() {
    let dir = std::env::temp_dir().join(format!("liverec-registry-it-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let v1 = train_version(&dir, "v1", 1, 1_700_000_000);
    let v2 = train_version(&dir, "v2", 2, 1_700_000_100);
    assert_ne!(v1, v2);

    let mut config = test_config();
    config.model.kind = ModelKind::Sequential;
    config.model.registry_dir = dir.clone();
    config.model.version = "v1".into();
    let server = start(config).await;

    let listed = get(&server, "/v1/admin/models").await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.body["serving"], json!(v1));
    let names: Vec<&str> = listed.body["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["v1", "v2"]);

    let mut sse = SseStream::connect(&server, "walker", None).await;
    let first = sse.next_list().await;
    assert_eq!(first["model_version"], json!(v1));
    assert_eq!(get(&server, "/v1/items/seq-3").await.status, 200, "the model's items are in the catalogue");

    let activated = post_json(&server, "/v1/admin/models/v2/activate", &json!({})).await;
    assert_eq!(activated.status, 200, "{}", activated.body);
    assert_eq!(activated.body["serving"], json!(v2));
    post_events(&server, json!({ "user_id": "walker", "item_id": "seq-3", "event_type": "click" })).await;
    let next = sse.next_list().await;
    assert_eq!(next["model_version"], json!(v2), "lists after the swap come from the new version");
    assert!(!items(&next).contains(&"seq-3".to_owned()));
    // Input drift is judged against the new version's own traffic from here.
    let pending = |version: String| {
        let server = &server;
        async move {
            let reference = json!(format!("first full window of {version} (pending)"));
            eventually("the switched version's drift reference", || async {
                (get(server, "/v1/monitor").await.body["drift"]["reference"] == reference).then_some(())
            })
            .await
        }
    };
    pending(v2.clone()).await;

    // Back to the version that served before, kept in memory for an instant rollback.
    let rolled = post_json(&server, "/v1/admin/rollback", &json!({ "reason": "checking" })).await;
    assert_eq!((rolled.status, rolled.body["serving"].clone()), (200, json!(v1)), "{}", rolled.body);
    pending(v1.clone()).await;
    let state = get(&server, "/v1/admin/models").await.body;
    assert_eq!(state["serving"], json!(v1));
    let steps: Vec<&str> =
        state["history"].as_array().expect("history").iter().filter_map(|h| h["step"].as_str()).collect();
    assert_eq!(&steps[..2], ["rolled_back", "promoted"], "newest first: {steps:?}");
    let nothing = post_json(&server, "/v1/admin/promote", &json!({})).await;
    assert_eq!((nothing.status, nothing.body["error"]["code"].clone()), (409, json!("conflict")));

    // An A/B experiment: v1 for some users, v2 for the others, by stable hash.
    let bad_share = post_json(&server, "/v1/admin/experiments", &json!({ "a": "v1", "b": "v2", "share": 1.5 })).await;
    assert_eq!(bad_share.status, 400, "{}", bad_share.body);
    let started = post_json(&server, "/v1/admin/experiments", &json!({ "a": "v1", "b": "v2", "share": 0.5 })).await;
    assert_eq!(started.status, 201, "{}", started.body);
    let mut seen = std::collections::HashMap::new();
    for u in 0..40 {
        let user = format!("ab-{u}");
        post_events(&server, json!({ "user_id": user, "item_id": "seq-1", "event_type": "click" })).await;
        let list = eventually("the user's list after the event", || async {
            let list = get(&server, &format!("/v1/users/{user}/recommendations")).await.body;
            list["last_event_id"].is_string().then_some(list)
        })
        .await;
        let version = list["model_version"].as_str().expect("version").to_owned();
        seen.insert(list["variant"].as_str().expect("variant").to_owned(), version);
    }
    assert_eq!(seen.get("a"), Some(&v1), "{seen:?}");
    assert_eq!(seen.get("b"), Some(&v2), "{seen:?}");
    let experiment = get(&server, "/v1/admin/experiments").await.body;
    let variants = experiment["experiment"]["variants"].as_array().expect("variants").clone();
    assert_eq!(variants.len(), 2, "{experiment}");
    let impressions: u64 = variants.iter().map(|v| v["impressions"].as_u64().expect("impressions")).sum();
    assert!(impressions >= 40, "{experiment}");
    assert!(variants.iter().all(|v| v["ctr"]["low"].as_f64() <= v["ctr"]["high"].as_f64()));
    let busy = post_json(&server, "/v1/admin/retrain", &json!({})).await;
    assert_eq!(busy.status, 409, "no retraining during an experiment: {}", busy.body);
    let stopped = client().delete(format!("{}/v1/admin/experiments", server.url())).send().await.expect("stop");
    assert_eq!(stopped.status(), 200);
    let state = get(&server, "/v1/admin/models").await.body;
    assert_eq!((state["serving"].clone(), state["traffic"]["challenger"].clone()), (json!(v1), json!(null)));

    let missing = post_json(&server, "/v1/admin/models/v9/activate", &json!({})).await;
    assert_eq!((missing.status, missing.body["error"]["code"].clone()), (404, json!("model_not_found")));
    let sneaky = post_json(&server, "/v1/admin/models/..hidden/activate", &json!({})).await;
    assert_eq!((sneaky.status, sneaky.body["error"]["code"].clone()), (400, json!("invalid_model_name")));
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
