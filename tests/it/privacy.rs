//! Privacy: with pseudonymisation on, the pseudonym is all the server keeps of a user's id
//! (erasure is in `users`).

use serde_json::json;

use crate::support::*;

#[actix_rt::test]
async fn pseudonymised_ids_are_all_that_is_kept() {
    let mut config = test_config();
    config.privacy.pseudonymize = true;
    config.privacy.salt = "a salt that is thirty-two characters long".into();
    let server = start(config).await;
    let raw = "alice@example.com";
    post_events(&server, json!({ "user_id": raw, "item_id": "item-0001", "event_type": "click" })).await;
    // The client keeps using its own id; what comes back, and what is stored, is the pseudonym.
    let list = eventually("the list after the event", || async {
        let list = get(&server, &format!("/v1/users/{raw}/recommendations")).await.body;
        list["last_event_id"].is_string().then_some(list)
    })
    .await;
    let kept = list["user_id"].as_str().expect("user id").to_owned();
    assert!(kept.starts_with("u_") && kept.len() == 34, "{kept}");
    let export = get(&server, &format!("/v1/users/{raw}/export")).await.body;
    assert_eq!(export["user_id"], json!(kept));
    assert_eq!(export["profile"]["interactions"].as_array().map(Vec::len), Some(1));
    assert!(!export.to_string().contains("alice"), "the raw id is nowhere in the stored data: {export}");
    // The pseudonym itself addresses the same user.
    let same = get(&server, &format!("/v1/users/{kept}/export")).await.body;
    assert_eq!(same["profile"]["interactions"], export["profile"]["interactions"]);
    server.stop().await;
}
