//! The serving-path evaluation: a small generated split replayed through a real server's event
//! path gives every user the list the offline serving computation gives, user by user.

use liverec::config::{Config, RetrievalConfig};
use liverec::models::data::{Dataset, DatasetBuilder, Part, Split};
use liverec::models::eval::{evaluate, serving_lists, ServingRanker};
use liverec::models::sequential::SequentialModel;

use crate::support::*;

/// Users rate 14 to 21 distinct items of 40 (ratings 1 to 5, timestamps spread over days and
/// hours), so each history is longer than the session's window of 8.
fn split_of_generated_users() -> (Dataset, Split) {
    let mut b = DatasetBuilder::new();
    for item in 0..40 {
        b.item(&format!("m{item}"));
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    for user in 0..24u64 {
        let len = 14 + next(8) as usize;
        let mut seen = Vec::new();
        let mut t = 880_000_000 + user as i64 * 977;
        while seen.len() < len {
            // A drift through the catalogue, so the model has something to learn.
            let mut item = (user * 3 + seen.len() as u64 * 2 + next(3)) % 40;
            while seen.contains(&item) {
                item = (item + 1) % 40;
            }
            seen.push(item);
            t += 3_600 + next(40_000) as i64;
            b.interaction(&format!("user-{user}"), &format!("m{item}"), t, Some(1.0 + next(5) as f32));
        }
    }
    let dataset = b.build();
    let split = Split::leave_one_out(&dataset.sequences);
    (dataset, split)
}

#[actix_rt::test]
async fn served_lists_equal_offline_lists() {
    let (dataset, split) = split_of_generated_users();
    let dir = std::env::temp_dir().join(format!("liverec-served-it-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model_dir = dir.join("served");
    crate::models::train_and_save(&dataset, &split, 3, &model_dir, 1_700_000_000);

    // Offline: the serving computation on the saved model.
    let (mut model, _) = SequentialModel::load(&model_dir).expect("loads");
    let exact = RetrievalConfig { min_items: usize::MAX, ..RetrievalConfig::default() };
    let mut ranker = ServingRanker::new(&mut model, &dataset, &exact, liverec::eval::DEPTH, "offline")
        .expect("ranker")
        .with_window(8);
    // One user at a time here and in the server, so no score depends on the shape of a batch.
    let (valid_lists, test_lists) = serving_lists(&mut ranker, &dataset, &split, 1);
    let offline_test = evaluate(&dataset, &split, Part::Test, &mut ranker, 1).expect("evaluates");

    // Served: the same model behind a real server, the same events through POST /v1/events.
    let mut config: Config = test_config();
    // The window the model reads (max_len 8) and no more: older consumed items must stay out of
    // the lists all the same.
    config.session.history_len = 8;
    config.model.max_batch = 1;
    let config = liverec::eval::serve_model(config, &model_dir).expect("config");
    let server = start(config).await;
    let run = liverec::eval::evaluate_served(&server.url(), None, &dataset, &split).await.expect("served run");

    let users = (0..split.train.len()).filter(|&u| split.test[u].is_some()).count();
    assert_eq!(users, 24);
    for u in 0..split.train.len() {
        let user = &dataset.users[u].id;
        assert_eq!(run.valid_lists[u], valid_lists[u], "{user}: served list before the validation item");
        assert_eq!(run.test_lists[u], test_lists[u], "{user}: served list before the test item");
        // Nothing the user rated comes back, however long ago it fell out of the window.
        let rated: Vec<&str> = dataset.sequences[u][..dataset.sequences[u].len() - 1]
            .iter()
            .map(|i| dataset.items[i.item as usize].id.as_str())
            .collect();
        assert!(run.test_lists[u].iter().all(|i| !rated.contains(&i.as_str())), "{user}: {:?}", run.test_lists[u]);
    }
    assert_eq!(run.metrics.test, offline_test, "served and offline figures");
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The events go through the import's REST client: a server that takes fewer events per request
/// than the evaluation sends (`413 batch_too_large`) gets smaller batches, and every event once.
#[actix_rt::test]
async fn the_evaluation_posts_in_batches_the_server_takes() {
    let (dataset, split) = split_of_generated_users();
    let mut config: Config = test_config();
    config.demo.enabled = false;
    config.auth.mode = liverec::auth::AuthMode::Off;
    config.events.max_batch = 64;
    let server = start(config).await;
    let run = liverec::eval::evaluate_served(&server.url(), None, &dataset, &split).await.expect("served run");
    let train: usize = split.train.iter().map(Vec::len).sum();
    assert!(train > 64 * 4, "more events than a few of the server's batches: {train}");
    assert_eq!(run.events, train + split.valid.iter().flatten().count());
    let accepted = metric(&server, "liverec_ingest_events_total{source=\"http\"}").await;
    assert_eq!(accepted as usize, run.events, "each event accepted once");
    server.stop().await;
}

#[test]
fn serve_without_a_model_and_serve_with_a_target_are_refused_naming_the_flags() {
    let bin = env!("CARGO_BIN_EXE_liverec");
    let run = |args: &[&str]| std::process::Command::new(bin).args(args).output().expect("runs");
    let no_model = run(&["eval", "--data", "/nonexistent-liverec-data", "--serve"]);
    assert_eq!(no_model.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_model.stderr).contains("--model"), "{no_model:?}");
    let both = run(&["eval", "--data", "d", "--model", "m", "--serve", "--target", "http://127.0.0.1:1"]);
    assert_eq!(both.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&both.stderr);
    assert!(stderr.contains("--target") && stderr.contains("--serve"), "{stderr}");
}
