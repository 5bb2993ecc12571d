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
    // The pseudonym sent as an id is another user's id: it is pseudonymised like any other.
    let other = get(&server, &format!("/v1/users/{kept}/export")).await.body;
    assert_ne!(other["user_id"], json!(kept), "{other}");
    assert_ne!(other["profile"]["interactions"], export["profile"]["interactions"], "{other}");
    server.stop().await;
}

/// An id shaped like a pseudonym is pseudonymised like any other: a stream token minted for the
/// raw id `u_<alice's 32 hex>` is a token for another user, and cannot read alice.
#[actix_rt::test]
async fn a_pseudonym_sent_as_a_raw_id_is_not_that_user() {
    use liverec::auth::{new_key, AuthMode, Role};
    let mut config = test_config();
    config.privacy.pseudonymize = true;
    config.privacy.salt = "a salt that is thirty-two characters long".into();
    config.auth.mode = AuthMode::On;
    config.auth.token_secret = "a test secret that is long enough to sign".into();
    let (admin, entry) = new_key("ops", Role::Admin).expect("random key");
    config.auth.api_keys.push(entry);
    let server = start(config).await;
    let (status, _) = call(
        &server,
        "POST",
        "/v1/events",
        Some(&admin),
        Some(json!({ "user_id": "alice", "item_id": "item-0001", "event_type": "click" })),
    )
    .await;
    assert_eq!(status, 202);
    let alice = eventually("alice's list after her click", || async {
        let (_, list) = call(&server, "GET", "/v1/users/alice/recommendations", Some(&admin), None).await;
        list["last_event_id"].is_string().then_some(list)
    })
    .await;
    let pseudonym = alice["user_id"].as_str().expect("user id").to_owned();
    assert!(pseudonym.starts_with("u_") && pseudonym.len() == 34, "{pseudonym}");
    let token = |user: String| {
        let admin = admin.clone();
        let server = &server;
        async move {
            let (status, minted) = call(
                server,
                "POST",
                "/v1/admin/tokens",
                Some(&admin),
                Some(json!({ "user_id": user, "ttl_secs": 600 })),
            )
            .await;
            assert_eq!(status, 201, "{minted}");
            minted["token"].as_str().expect("token").to_owned()
        }
    };
    let forged = token(pseudonym.clone()).await;
    let path = format!("/v1/users/{pseudonym}/recommendations");
    let (status, list) = call(&server, "GET", &path, Some(&forged), None).await;
    assert_ne!(list["user_id"], json!(pseudonym), "the pseudonym-shaped raw id reached alice: {status} {list}");
    let (status, export) = call(&server, "GET", "/v1/users/alice/export", Some(&forged), None).await;
    assert_eq!(status, 403, "{export}");
    server.stop().await;
}
