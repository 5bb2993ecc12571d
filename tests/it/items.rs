//! The catalogue in bulk: `PUT /v1/items` (a JSON array or NDJSON), `GET /v1/items` pages,
//! `DELETE /v1/items/{id}`, and items that leave every list (deleted, `available: false`,
//! `expires_at`), including lists already pushed to an SSE subscriber.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::support::*;

async fn put_raw(server: &liverec::Server, path: &str, content_type: &str, body: String) -> Response {
    let response = client()
        .put(format!("{}{path}", server.url()))
        .insert_header(("content-type", content_type))
        .send_body(body)
        .await
        .expect("PUT");
    read(response).await
}

async fn delete(server: &liverec::Server, path: &str) -> Response {
    read(client().delete(format!("{}{path}", server.url())).send().await.expect("DELETE")).await
}

async fn read(
    mut response: awc::ClientResponse<
        impl futures_util::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>> + Unpin,
    >,
) -> Response {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.body().await.expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Response { status, headers, body }
}

fn error_of(response: &Response) -> (u16, String, String) {
    let error = &response.body["error"];
    (response.status, error["code"].as_str().unwrap_or("").to_owned(), error["field"].as_str().unwrap_or("").to_owned())
}

#[actix_rt::test]
async fn items_are_put_in_bulk_as_an_array_or_ndjson_and_paged_through_once_each() {
    let mut config = test_config();
    config.demo.items = 0;
    config.demo.users = 0;
    let server = start(config).await;
    let array: Vec<Value> = (0..25)
        .map(|i| json!({ "item_id": format!("a-{i}"), "title": format!("A {i}"), "categories": ["jazz"] }))
        .collect();
    let put = put_raw(&server, "/v1/items", "application/json", json!(array).to_string()).await;
    assert_eq!((put.status, &put.body), (200, &json!({ "created": 25, "replaced": 0 })));
    let ndjson: String =
        (20..40).map(|i| format!("{}\n", json!({ "item_id": format!("a-{i}"), "tags": ["t"] }))).collect();
    let put = put_raw(&server, "/v1/items", "application/x-ndjson", ndjson).await;
    assert_eq!((put.status, &put.body), (200, &json!({ "created": 15, "replaced": 5 })));
    assert_eq!(get(&server, "/v1/items/a-21").await.body["tags"], json!(["t"]), "NDJSON replaced a-21");
    assert_eq!(get(&server, "/v1/items/a-3").await.body["title"], "A 3");

    // Items known only from events are not catalogue items; a deleted one leaves the pages.
    post_events(&server, event("someone", "event-only", "view")).await;
    eventually("event item interned", || async {
        (get(&server, "/v1/items/event-only").await.status == 200).then_some(())
    })
    .await;
    assert_eq!(delete(&server, "/v1/items/a-7").await.status, 204);
    assert_eq!(get(&server, "/v1/items/a-7").await.status, 404);
    assert_eq!(error_of(&delete(&server, "/v1/items/a-7").await).1, "item_not_found");

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let path = match &cursor {
            Some(c) => format!("/v1/items?limit=7&cursor={c}"),
            None => "/v1/items?limit=7".to_owned(),
        };
        let page = get(&server, &path).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let items = page.body["items"].as_array().expect("items");
        assert!(items.len() <= 7);
        seen.extend(items.iter().map(|i| i["item_id"].as_str().expect("id").to_owned()));
        cursor = page.body["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    assert!(cursor.is_none(), "paging ends");
    let expected: Vec<String> = (0..40).filter(|&i| i != 7).map(|i| format!("a-{i}")).collect();
    assert_eq!(seen, expected, "every catalogue item once, in the order put");
    server.stop().await;
}

#[actix_rt::test]
async fn bulk_and_paging_errors_name_the_field() {
    let mut config = test_config();
    config.events.max_batch = 3;
    let server = start(config).await;
    let bad = json!([{ "item_id": "ok" }, { "item_id": "x", "title": 5 }]);
    let r = put_raw(&server, "/v1/items", "application/json", bad.to_string()).await;
    assert_eq!(error_of(&r), (422, "invalid_item".into(), "[1].title".into()), "{}", r.body);
    assert_eq!(get(&server, "/v1/items/ok").await.status, 404, "a refused batch puts nothing");
    let r = put_raw(&server, "/v1/items", "application/json", json!([{ "title": "no id" }]).to_string()).await;
    assert_eq!(error_of(&r), (422, "invalid_item_id".into(), "[0].item_id".into()), "{}", r.body);
    let r = put_raw(
        &server,
        "/v1/items",
        "application/x-ndjson",
        "{\"item_id\":\"a\"}\n{\"item_id\":\"b\",\"colour\":1}\n".into(),
    )
    .await;
    assert_eq!(error_of(&r), (422, "invalid_item".into(), "[1].colour".into()), "{}", r.body);
    assert!(r.body["error"]["message"].as_str().is_some_and(|m| m.contains("colour")), "{}", r.body);
    let r = put_raw(&server, "/v1/items", "application/x-ndjson", "{\"item_id\":\"a\"}\nnot json\n".into()).await;
    assert_eq!(error_of(&r), (400, "malformed_json".into(), "[1]".into()), "{}", r.body);
    let many = json!([{ "item_id": "a" }, { "item_id": "b" }, { "item_id": "c" }, { "item_id": "d" }]);
    let r = put_raw(&server, "/v1/items", "application/json", many.to_string()).await;
    assert_eq!(r.status, 413);
    assert!(r.body["error"]["message"].as_str().is_some_and(|m| m.contains("events.max_batch")), "{}", r.body);
    let r = put_raw(&server, "/v1/items", "text/plain", "[]".into()).await;
    assert_eq!(r.status, 415);
    let r =
        put_raw(&server, "/v1/items", "application/json", json!([{ "item_id": "e", "expires_at": -1 }]).to_string())
            .await;
    assert_eq!(error_of(&r), (422, "invalid_item".into(), "[0].expires_at".into()), "{}", r.body);
    assert_eq!(error_of(&get(&server, "/v1/items?cursor=zz").await), (400, "invalid_cursor".into(), "cursor".into()));
    assert_eq!(error_of(&get(&server, "/v1/items?limit=0").await), (400, "invalid_limit".into(), "limit".into()));
    server.stop().await;
}

#[actix_rt::test]
async fn unavailable_and_expired_items_never_appear_in_a_list() {
    let server = start(test_config()).await;
    let list = get(&server, "/v1/users/browser/recommendations?k=20").await;
    assert_eq!(list.status, 200, "{}", list.body);
    let shown = items(&list.body);
    assert!(shown.len() >= 3, "{shown:?}");
    let (withdrawn, expired, deleted) = (&shown[0], &shown[1], &shown[2]);
    let now = liverec::event::now_ms();
    let r = put_json(&server, &format!("/v1/items/{withdrawn}"), &json!({ "available": false })).await;
    assert_eq!((r.status, &r.body["available"]), (200, &json!(false)), "{}", r.body);
    let r = put_raw(
        &server,
        "/v1/items",
        "application/json",
        json!([{ "item_id": expired, "expires_at": now - 1000 }]).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(get(&server, &format!("/v1/items/{expired}")).await.body["available"], false);
    assert_eq!(delete(&server, &format!("/v1/items/{deleted}")).await.status, 204);
    let gone: HashSet<&String> = [withdrawn, expired, deleted].into();
    // A new user (cold start), the same user, and a user with history.
    post_events(&server, event("reader", &shown[5], "view")).await;
    for user in ["browser", "newcomer", "reader"] {
        let list = get(&server, &format!("/v1/users/{user}/recommendations?k=50")).await;
        assert_eq!(list.status, 200);
        let ids = items(&list.body);
        assert!(ids.iter().all(|i| !gone.contains(i)), "{user} was shown an unavailable item: {ids:?}");
    }
    // Putting it back available brings it back.
    put_json(&server, &format!("/v1/items/{withdrawn}"), &json!({})).await;
    let list = get(&server, "/v1/users/someone-new/recommendations?k=20").await;
    assert!(items(&list.body).contains(withdrawn), "an item put back is shown again");
    server.stop().await;
}

/// Reads pushed lists until one lacks `item` (each read fails the test on a stall).
async fn next_list_without(sse: &mut SseStream, item: &str) -> Value {
    for _ in 0..10 {
        let list = sse.next_list().await;
        if !items(&list).iter().any(|i| i == item) {
            return list;
        }
    }
    panic!("ten pushed lists still show {item}");
}

#[actix_rt::test]
async fn a_subscriber_whose_list_holds_a_removed_item_gets_a_new_list_without_it() {
    let server = start(test_config()).await;
    post_events(&server, event("watcher", "item-0001", "view")).await;
    let mut sse = SseStream::connect(&server, "watcher", None).await;
    let first = sse.next_list().await;
    let shown = items(&first);
    assert!(shown.len() >= 2, "{first}");

    assert_eq!(delete(&server, &format!("/v1/items/{}", shown[0])).await.status, 204);
    let next = next_list_without(&mut sse, &shown[0]).await;
    assert!(next["seq"].as_u64() > first["seq"].as_u64());

    // An expiry a moment ahead: the list is pushed again when it passes.
    let expiring = items(&next)[0].clone();
    let at = liverec::event::now_ms() + 300;
    let r = put_json(&server, &format!("/v1/items/{expiring}"), &json!({ "expires_at": at })).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let later = next_list_without(&mut sse, &expiring).await;
    assert!(liverec::event::now_ms() >= at, "pushed once the expiry passed");
    assert!(!items(&later).contains(&shown[0]));
    server.stop().await;
}

#[actix_rt::test]
async fn a_new_item_past_catalog_max_items_is_refused_naming_the_key_and_a_delete_makes_room() {
    let mut config = test_config();
    config.demo.items = 0;
    config.demo.users = 0;
    config.catalog.max_items = 3;
    let server = start(config).await;
    let bulk = |items: Value| put_raw(&server, "/v1/items", "application/json", items.to_string());
    let put = bulk(json!([{ "item_id": "a" }, { "item_id": "b" }])).await;
    assert_eq!((put.status, &put.body), (200, &json!({ "created": 2, "replaced": 0 })));
    // Two new items with room for one: the whole batch is refused.
    let full = bulk(json!([{ "item_id": "c" }, { "item_id": "d" }])).await;
    assert_eq!(error_of(&full).0, 422, "{}", full.body);
    assert_eq!(full.body["error"]["code"], "catalog_full");
    let message = full.body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("catalog.max_items is 3"), "{message}");
    assert_eq!(get(&server, "/v1/items/c").await.status, 404, "a refused batch puts nothing");
    // Replacements always fit; one new item fills the catalogue.
    let put = bulk(json!([{ "item_id": "a", "title": "A" }, { "item_id": "c" }, { "item_id": "c" }])).await;
    assert_eq!((put.status, &put.body), (200, &json!({ "created": 1, "replaced": 2 })));
    let one_more = put_json(&server, "/v1/items/d", &json!({})).await;
    assert_eq!((one_more.status, &one_more.body["error"]["code"]), (422, &json!("catalog_full")));
    assert_eq!(put_json(&server, "/v1/items/a", &json!({ "title": "A2" })).await.status, 200);
    // Items known only from events do not count (catalog.max_event_items bounds them).
    post_events(&server, event("u", "event-only", "view")).await;
    assert_eq!(delete(&server, "/v1/items/b").await.status, 204);
    assert_eq!(put_json(&server, "/v1/items/d", &json!({})).await.status, 201, "the delete made room");
    server.stop().await;
}
