//! The catalogue: items put over `PUT /v1/items/{id}` and read back.

use serde_json::json;

use crate::support::*;

#[actix_rt::test]
async fn catalogue_items_can_be_put_and_read() {
    let server = start(test_config()).await;
    let body =
        json!({ "title": "Blue Train", "categories": ["jazz"], "tags": ["1957"], "created_at": 1_700_000_000_000i64 });
    let created = put_json(&server, "/v1/items/blue-train", &body).await;
    assert_eq!(created.status, 201);
    assert_eq!(created.body["title"], "Blue Train");
    let updated = put_json(
        &server,
        "/v1/items/blue-train",
        &json!({ "title": "Blue Train (remastered)", "categories": ["jazz"] }),
    )
    .await;
    assert_eq!(updated.status, 200);
    let read = get(&server, "/v1/items/blue-train").await;
    assert_eq!(read.body["title"], "Blue Train (remastered)");
    assert_eq!(read.body["in_catalog"], true);
    // Items first seen in events are known but have no attributes.
    post_events(&server, event("someone", "seen-only", "view")).await;
    let seen = eventually("item interned", || async {
        let r = get(&server, "/v1/items/seen-only").await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(seen.body["in_catalog"], false);
    server.stop().await;
}
