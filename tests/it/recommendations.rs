//! What a recommendation list holds: how likes and dislikes move the items in it.

use serde_json::json;

use crate::support::*;

#[actix_rt::test]
async fn dislike_suppresses_the_item_and_lowers_similar_ones() {
    let server = start(test_config()).await;
    // Put three items in one category and teach that they go together.
    for id in ["neg-a", "neg-b", "neg-c"] {
        let put =
            put_json(&server, &format!("/v1/items/{id}"), &json!({ "title": id, "categories": ["negcat"] })).await;
        assert_eq!(put.status, 201);
    }
    let mut batch = Vec::new();
    for u in 0..6 {
        for id in ["neg-a", "neg-b", "neg-c"] {
            batch.push(event(&format!("neg-teacher-{u}"), id, "view"));
        }
    }
    post_events(&server, json!(batch)).await;
    eventually("teaching applied", || async {
        (metric(&server, "liverec_session_applied_events_total").await >= 18.0).then_some(())
    })
    .await;

    let mut sse = SseStream::connect(&server, "picky", None).await;
    sse.next_list().await;
    post_events(&server, json!(event("picky", "neg-a", "click"))).await;
    let liked = sse.next_list().await;
    let liked_items = items(&liked);
    assert!(liked_items.contains(&"neg-b".to_owned()) && liked_items.contains(&"neg-c".to_owned()), "{liked_items:?}");

    post_events(&server, json!(event("picky", "neg-b", "dislike"))).await;
    let after = sse.next_list().await;
    let after_items = items(&after);
    assert!(!after_items.contains(&"neg-b".to_owned()), "the disliked item is suppressed: {after_items:?}");
    let score = |list: &serde_json::Value, id: &str| {
        list["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|i| i["item_id"] == id)
            .map(|i| i["score"].as_f64().expect("score"))
    };
    let before_c = score(&liked, "neg-c").expect("c was listed");
    let after_c = score(&after, "neg-c").unwrap_or(f64::NEG_INFINITY);
    assert!(after_c < before_c, "a similar item is lowered: {before_c} -> {after_c}");
    server.stop().await;
}
