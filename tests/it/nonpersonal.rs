//! The non-personal endpoints over real HTTP: popular and trending items (`GET /v1/popular`,
//! `GET /v1/trending`), the latest items, similar items, recommendations for a basket
//! (`POST /v1/recommendations`), their paging, filters and errors, and the caching of the
//! segment lists (`Cache-Control`, `ETag`, `304 Not Modified`).

use liverec::auth::AuthMode;
use serde_json::{json, Value};

use crate::support::*;

/// A server without the demo (no synthetic traffic: every count is the test's), auth off, and
/// lists refreshed every second.
async fn plain() -> liverec::Server {
    let mut config = test_config();
    config.demo.enabled = false;
    config.auth.mode = AuthMode::Off;
    config.recs.lists_refresh_secs = 1;
    start(config).await
}

/// Puts the items `(id, category, created_at)`.
async fn put_items(server: &liverec::Server, items: &[(&str, &str, i64)]) {
    for (id, category, created_at) in items {
        let body = json!({ "title": id, "categories": [category], "created_at": created_at });
        let put = put_json(server, &format!("/v1/items/{id}"), &body).await;
        assert!(put.status == 201 || put.status == 200, "{}", put.body);
    }
}

/// An event of `user` on `item` from `device`.
fn event_on(user: &str, item: &str, event_type: &str, device: &str) -> Value {
    json!({ "user_id": user, "item_id": item, "event_type": event_type, "context": { "device": device } })
}

/// A GET with an `If-None-Match` (or none): status, headers, and the body's bytes.
async fn conditional(
    server: &liverec::Server,
    path: &str,
    if_none_match: Option<&str>,
) -> (u16, awc::http::header::HeaderMap, Vec<u8>) {
    let mut request = client().get(format!("{}{path}", server.url()));
    if let Some(tag) = if_none_match {
        request = request.insert_header(("if-none-match", tag));
    }
    let mut response = request.send().await.expect("GET");
    let body = response.body().await.expect("body").to_vec();
    (response.status().as_u16(), response.headers().clone(), body)
}

fn header(headers: &awc::http::header::HeaderMap, name: &str) -> String {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
}

fn error_of(response: &Response) -> (u16, String, String) {
    let error = &response.body["error"];
    (response.status, error["code"].as_str().unwrap_or("").to_owned(), error["field"].as_str().unwrap_or("").to_owned())
}

#[actix_rt::test]
async fn popular_lists_count_weighted_events_by_segment_and_category_and_page() {
    let server = plain().await;
    put_items(&server, &[("sax", "jazz", 1), ("trumpet", "jazz", 2), ("guitar", "rock", 3), ("drums", "rock", 4)])
        .await;
    // sax: three clicks on mobile (6); guitar: two views on desktop (2); trumpet: one view on
    // mobile (1); drums: a dislike, which weighs nothing.
    let mut events = Vec::new();
    for user in ["u1", "u2", "u3"] {
        events.push(event_on(user, "sax", "click", "mobile"));
    }
    events.push(event_on("u4", "guitar", "view", "desktop"));
    events.push(event_on("u5", "guitar", "view", "desktop"));
    events.push(event_on("u6", "trumpet", "view", "mobile"));
    events.push(event_on("u7", "drums", "dislike", "mobile"));
    post_events(&server, json!(events)).await;

    let popular = eventually("every event counted in the popular list", || async {
        let list = get(&server, "/v1/popular").await;
        let total: f64 = list.body["items"].as_array()?.iter().filter_map(|i| i["score"].as_f64()).sum();
        (total == 9.0).then_some(list)
    })
    .await;
    assert_eq!(items(&popular.body), vec!["sax", "guitar", "trumpet"], "{}", popular.body);
    assert_eq!(popular.body["kind"], "popular");
    assert_eq!(popular.body["window"], "24h");
    assert_eq!(popular.body["segment"], "all");
    assert_eq!(popular.body["items"][0]["score"], 6.0, "three clicks weigh 2 each");
    assert!(popular.body.get("next_offset").is_none(), "the whole list fits");

    let rock = get(&server, "/v1/popular?category=rock").await;
    assert_eq!(items(&rock.body), vec!["guitar"], "{}", rock.body);
    let nothing = get(&server, "/v1/popular?category=polka").await;
    assert_eq!(items(&nothing.body), Vec::<String>::new(), "an unknown category matches nothing");
    let mobile = get(&server, "/v1/popular?device=mobile").await;
    assert_eq!(items(&mobile.body), vec!["sax", "trumpet"], "{}", mobile.body);
    assert!(mobile.body["segment"].as_str().is_some_and(|s| s.starts_with("mobile/")), "{}", mobile.body);

    // Paging: k then offset, with next_offset until the end.
    let first = get(&server, "/v1/popular?k=2").await;
    assert_eq!(items(&first.body), vec!["sax", "guitar"]);
    assert_eq!(first.body["next_offset"], 2);
    let second = get(&server, "/v1/popular?k=2&offset=2").await;
    assert_eq!(items(&second.body), vec!["trumpet"]);
    assert_eq!(second.body["offset"], 2);
    assert!(second.body.get("next_offset").is_none());

    // An item withdrawn leaves the list at once (not at the next refresh), and is what
    // `availability=unavailable` shows.
    let withdrawn = put_json(&server, "/v1/items/sax", &json!({ "categories": ["jazz"], "available": false })).await;
    assert_eq!(withdrawn.status, 200);
    assert_eq!(items(&get(&server, "/v1/popular").await.body), vec!["guitar", "trumpet"]);
    assert_eq!(items(&get(&server, "/v1/popular?availability=unavailable").await.body), vec!["sax"]);
    assert_eq!(items(&get(&server, "/v1/popular?availability=any").await.body), vec!["sax", "guitar", "trumpet"]);

    // Trending on a server younger than its window has no baseline: it ranks like popular.
    let trending = get(&server, "/v1/trending").await;
    assert_eq!(items(&trending.body), vec!["guitar", "trumpet"], "{}", trending.body);
    assert_eq!(trending.body["window"], "1h");
    server.stop().await;
}

#[actix_rt::test]
async fn bad_parameters_get_clear_errors_naming_them() {
    let server = plain().await;
    put_items(&server, &[("sax", "jazz", 1), ("gone", "jazz", 2)]).await;
    let deleted = client().delete(format!("{}/v1/items/gone", server.url())).send().await.expect("DELETE");
    assert_eq!(deleted.status().as_u16(), 204);
    for (path, status, code, field) in [
        ("/v1/items/gone/similar", 404, "item_not_found", "item_id"),
        ("/v1/popular?k=0", 422, "out_of_range", "k"),
        ("/v1/popular?k=101", 422, "out_of_range", "k"),
        ("/v1/popular?offset=501", 422, "out_of_range", "offset"),
        ("/v1/popular?category=", 422, "out_of_range", "category"),
        ("/v1/trending?window=7d", 422, "out_of_range", "window"),
        ("/v1/items/latest?k=1000", 422, "out_of_range", "k"),
        ("/v1/items/sax/similar?k=0", 422, "out_of_range", "k"),
        ("/v1/items/nope/similar", 404, "item_not_found", "item_id"),
    ] {
        let response = get(&server, path).await;
        assert_eq!(error_of(&response), (status, code.to_owned(), field.to_owned()), "{path}: {}", response.body);
    }
    for (path, field, value) in [
        ("/v1/popular?k=abc", "k", "abc"),
        ("/v1/popular?window=2h", "window", "2h"),
        ("/v1/popular?device=fridge", "device", "fridge"),
        ("/v1/popular?colour=red", "colour", "colour"),
        ("/v1/popular?k=1&k=2", "k", "k"),
        ("/v1/items/latest?availability=sometimes", "availability", "sometimes"),
        ("/v1/items/sax/similar?window=1h", "window", "window"),
    ] {
        let response = get(&server, path).await;
        assert_eq!(error_of(&response), (400, "invalid_query".to_owned(), field.to_owned()), "{path}");
        let message = response.body["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(value), "{path}: the message names {value}: {message}");
    }
    // The lists' queries are read by `web::Query` like every other endpoint's, through the one
    // query error handler: another endpoint's unknown or repeated parameter is named the same way.
    for (path, field) in [("/v1/users/someone/recommendations?colour=red", "colour"), ("/v1/items/latest?k=1&k=2", "k")]
    {
        let response = get(&server, path).await;
        assert_eq!(
            error_of(&response),
            (400, "invalid_query".to_owned(), field.to_owned()),
            "{path}: {}",
            response.body
        );
    }
    let unknown = post_json(&server, "/v1/recommendations", &json!({ "items": ["sax", "ghost"] })).await;
    assert_eq!(error_of(&unknown), (422, "unknown_item".into(), "items[1]".into()), "{}", unknown.body);
    let k = post_json(&server, "/v1/recommendations", &json!({ "items": [], "k": 0 })).await;
    assert_eq!(error_of(&k), (422, "out_of_range".into(), "k".into()), "{}", k.body);
    let shape = post_json(&server, "/v1/recommendations", &json!({ "items": "sax" })).await;
    assert_eq!(error_of(&shape).0, 422, "{}", shape.body);
    assert_eq!(error_of(&shape).2, "items", "{}", shape.body);
    server.stop().await;
}

#[actix_rt::test]
async fn similar_items_and_basket_lists_come_from_the_online_models_neighbours() {
    let server = plain().await;
    put_items(
        &server,
        &[("tent", "outdoor", 1), ("stove", "outdoor", 2), ("mat", "camping", 3), ("novel", "books", 4)],
    )
    .await;
    // Campers take a tent then a stove; readers a novel alone; one camper a mat too.
    let mut events = Vec::new();
    for i in 0..6 {
        let user = format!("camper-{i}");
        events.push(event_on(&user, "tent", "view", "mobile"));
        events.push(event_on(&user, "stove", "view", "mobile"));
    }
    events.push(event_on("camper-0", "mat", "view", "mobile"));
    for i in 0..10 {
        events.push(event_on(&format!("reader-{i}"), "novel", "view", "desktop"));
    }
    post_events(&server, json!(events)).await;

    let similar = eventually("the model to learn the pairs", || async {
        let list = get(&server, "/v1/items/tent/similar").await;
        let ids = items(&list.body);
        // Both pairs learned (camper-0's mat comes with the others, applied user by user).
        (ids.first().map(String::as_str) == Some("stove") && ids.contains(&"mat".to_owned())).then_some(list)
    })
    .await;
    assert_eq!(similar.body["kind"], "similar");
    assert_eq!(similar.body["item_id"], "tent");
    assert_eq!(similar.body["model_version"], "cooccurrence-online-1");
    let ids = items(&similar.body);
    assert!(!ids.contains(&"tent".to_owned()) && !ids.contains(&"novel".to_owned()), "{ids:?}");
    assert_eq!(items(&get(&server, "/v1/items/tent/similar?category=books").await.body), Vec::<String>::new());
    // The category filter takes out a neighbour of another category.
    assert!(ids.contains(&"mat".to_owned()), "{ids:?}");
    assert_eq!(items(&get(&server, "/v1/items/tent/similar?category=outdoor").await.body), ["stove"]);
    assert_eq!(get(&server, "/v1/items/novel/similar").await.body["items"], json!([]), "nothing co-occurred");

    // A basket with the tent: the stove first, the tent never; nothing is stored for it.
    let basket = post_json(&server, "/v1/recommendations", &json!({ "items": ["tent"], "k": 3 })).await;
    assert_eq!(basket.status, 200, "{}", basket.body);
    assert_eq!(header(&basket.headers, "cache-control"), "private, no-store");
    let ids = items(&basket.body);
    assert_eq!(ids.first().map(String::as_str), Some("stove"), "{}", basket.body);
    assert!(!ids.contains(&"tent".to_owned()));
    assert_eq!(basket.body["variant"], "control");
    let excluded = post_json(
        &server,
        "/v1/recommendations",
        &json!({ "items": ["tent"], "exclude": ["stove"], "categories": ["camping"], "context": { "device": "mobile" },
                 "event_type": "add_to_cart", "session_id": "visitor-1" }),
    )
    .await;
    assert_eq!(items(&excluded.body), vec!["mat"], "{}", excluded.body);
    server.stop().await;
}

#[actix_rt::test]
async fn latest_items_are_newest_first_filtered_and_paged() {
    let server = plain().await;
    put_items(&server, &[("old", "news", 1_000), ("newer", "news", 3_000), ("sport", "sport", 4_000)]).await;
    put_json(&server, "/v1/items/newest", &json!({ "categories": ["news"], "created_at": 5_000, "available": false }))
        .await;
    // The default list is ranked by the refresh (every second here), not by a request: items
    // put since the last one join it at the next.
    let latest = eventually("the refresh to rank the items put", || async {
        let latest = get(&server, "/v1/items/latest").await;
        assert_eq!(latest.status, 200, "{}", latest.body);
        (items(&latest.body) == vec!["sport", "newer", "old"]).then_some(latest)
    })
    .await;
    assert_eq!(latest.body["items"][0]["created_at"], 4_000, "whole items, as GET /v1/items/{{id}} shows them");
    assert_eq!(
        items(&get(&server, "/v1/items/latest?category=news&availability=any").await.body),
        vec!["newest", "newer", "old"]
    );
    let page = get(&server, "/v1/items/latest?k=1&offset=1").await;
    assert_eq!((items(&page.body), page.body["next_offset"].clone()), (vec!["newer".to_owned()], json!(2)));
    // A deleted item is among the unavailable ones, as in every other list.
    assert_eq!(
        client().delete(format!("{}/v1/items/old", server.url())).send().await.expect("DELETE").status().as_u16(),
        204
    );
    assert_eq!(
        items(&get(&server, "/v1/items/latest?availability=unavailable").await.body),
        vec!["newest", "old"],
        "withdrawn and deleted"
    );
    // Only GET is taken by the list: an item named `latest` is still put and deleted.
    assert_eq!(put_json(&server, "/v1/items/latest", &json!({ "title": "Latest" })).await.status, 201);
    server.stop().await;
}

#[actix_rt::test]
async fn segment_lists_are_cacheable_and_revalidate_with_etags() {
    let server = plain().await;
    put_items(&server, &[("a", "x", 1), ("b", "x", 2)]).await;
    post_events(&server, json!([event_on("u1", "a", "click", "mobile")])).await;
    let path = "/v1/popular?k=5";
    let (status, headers, body) = eventually("a counted", || async {
        let answer = conditional(&server, path, None).await;
        let list: Value = serde_json::from_slice(&answer.2).unwrap_or(Value::Null);
        (items(&list) == vec!["a"]).then_some(answer)
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "cache-control"), "public, max-age=1");
    let tag = header(&headers, "etag");
    assert!(tag.starts_with('"') && tag.ends_with('"') && tag.len() == 18, "a strong ETag: {tag}");

    // The same list again: 304 with no body, and the validators again.
    let (status, headers, body304) = conditional(&server, path, Some(&tag)).await;
    assert_eq!(status, 304);
    assert!(body304.is_empty());
    assert_eq!(header(&headers, "etag"), tag);
    assert_eq!(header(&headers, "cache-control"), "public, max-age=1");
    // A weak form of the tag, a list of tags, and `*` match too; another tag does not.
    assert_eq!(conditional(&server, path, Some(&format!("W/{tag}"))).await.0, 304);
    assert_eq!(conditional(&server, path, Some(&format!("\"other\", {tag}"))).await.0, 304);
    assert_eq!(conditional(&server, path, Some("*")).await.0, 304);
    let (status, _, again) = conditional(&server, path, Some("\"0000000000000000\"")).await;
    assert_eq!((status, again), (200, body.clone()), "the same bytes for the same list");

    // New events change the list at a later refresh: the old tag then gets the new list.
    post_events(&server, json!([event_on("u2", "b", "purchase", "desktop")])).await;
    let (status, headers, changed) = eventually("the list to change", || async {
        let answer = conditional(&server, path, Some(&tag)).await;
        (answer.0 == 200).then_some(answer)
    })
    .await;
    assert_eq!(status, 200);
    assert_ne!(header(&headers, "etag"), tag);
    let list: Value = serde_json::from_slice(&changed).expect("JSON");
    assert_eq!(items(&list), vec!["b", "a"], "a purchase outweighs a click");

    // Similar and latest items are cacheable the same way; personal answers are not.
    for path in ["/v1/items/latest", "/v1/items/a/similar", "/v1/trending"] {
        let (status, headers, _) = conditional(&server, path, None).await;
        assert_eq!((status, header(&headers, "cache-control")), (200, "public, max-age=1".to_owned()), "{path}");
        let (status, _, _) = conditional(&server, path, Some(&header(&headers, "etag"))).await;
        assert_eq!(status, 304, "{path}");
    }
    for path in ["/v1/users/u1/recommendations", "/v1/users/u1/export"] {
        let (status, headers, _) = conditional(&server, path, None).await;
        assert_eq!((status, header(&headers, "cache-control")), (200, "private, no-store".to_owned()), "{path}");
        assert!(headers.get("etag").is_none(), "{path}");
    }
    server.stop().await;
}

#[actix_rt::test]
async fn any_valid_credential_reads_the_non_personal_lists() {
    let (server, keys) = crate::auth::secured().await;
    let keys = [keys.producer, keys.reader, keys.admin];
    let (status, token) =
        call(&server, "POST", "/v1/admin/tokens", Some(&keys[2]), Some(json!({ "user_id": "alice" }))).await;
    assert_eq!(status, 201, "{token}");
    let token = token["token"].as_str().expect("a token").to_owned();
    for path in ["/v1/popular", "/v1/trending", "/v1/items/latest", "/v1/items/item-0001/similar"] {
        assert_eq!(call(&server, "GET", path, None, None).await.0, 401, "{path} needs a credential");
        for credential in keys.iter().chain([&token]) {
            let (status, body) = call(&server, "GET", path, Some(credential), None).await;
            assert_eq!(status, 200, "{path}: {body}");
        }
    }
    let basket = json!({ "items": ["item-0001"] });
    assert_eq!(call(&server, "POST", "/v1/recommendations", None, Some(basket.clone())).await.0, 401);
    for credential in keys.iter().chain([&token]) {
        let (status, body) = call(&server, "POST", "/v1/recommendations", Some(credential), Some(basket.clone())).await;
        assert_eq!(status, 200, "{body}");
    }
    server.stop().await;
}

/// Production mode: the instance counts the events it consumes from Kafka (here it owns every
/// partition), so its lists follow what producers send.
#[actix_rt::test]
async fn in_production_mode_the_lists_count_the_events_the_instance_consumes() {
    let _services = SERVICES.read().await;
    let mut config = production_config("lists");
    config.recs.lists_refresh_secs = 1;
    let server = start(config).await;
    let events: Vec<Value> =
        (0..4).map(|i| event_on(&format!("buyer-{i}"), "item-0042", "purchase", "tablet")).collect();
    post_events(&server, json!(events)).await;
    let list = eventually("the consumed purchases counted", || async {
        let list = get(&server, "/v1/popular?device=tablet&k=1").await;
        (list.body["items"][0]["score"].as_f64() == Some(16.0)).then_some(list)
    })
    .await;
    assert_eq!(items(&list.body), vec!["item-0042"], "four purchases weigh 4 each: {}", list.body);
    assert!(list.body["segment"].as_str().is_some_and(|s| s.starts_with("tablet/")));
    server.stop().await;
}
