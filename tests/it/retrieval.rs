//! Two-stage retrieval through the real server (`model.retrieval.min_items` lowered so the demo
//! catalogue counts as large): a narrow category filter still fills the list, a withdrawn item
//! never appears, and the candidates are counted by source.

use serde_json::json;

use crate::support::*;

#[actix_rt::test]
async fn two_stage_lists_fill_a_narrow_filter_skip_withdrawn_items_and_count_their_sources() {
    let mut config = test_config();
    config.model.retrieval.min_items = 0;
    config.model.retrieval.cooccurrence_candidates = 5;
    config.model.retrieval.popular_candidates = 5;
    let server = start(config).await;
    // Twelve of the 200 demo items (test_config) in a category of their own; one of them withdrawn.
    let rare: Vec<String> = (0..12).map(|i| format!("item-{:04}", 10 + i * 15)).collect();
    for id in &rare {
        let r = put_json(&server, &format!("/v1/items/{id}"), &json!({ "categories": ["rare"] })).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let withdrawn = &rare[3];
    put_json(&server, &format!("/v1/items/{withdrawn}"), &json!({ "categories": ["rare"], "available": false })).await;
    post_events(&server, event("narrow", "item-0001", "view")).await;

    for user in ["narrow", "newcomer"] {
        let list = get(&server, &format!("/v1/users/{user}/recommendations?categories=rare&k=10")).await;
        assert_eq!(list.status, 200, "{}", list.body);
        let ids = items(&list.body);
        assert_eq!(ids.len(), 10, "11 rare items are available: {ids:?}");
        assert!(ids.iter().all(|id| rare.contains(id) && id != withdrawn), "{user}: {ids:?}");
    }
    let all = get(&server, "/v1/users/narrow/recommendations?k=50").await;
    assert!(!items(&all.body).contains(withdrawn));
    let cooccurrence = metric(&server, "liverec_model_candidates_total{source=\"cooccurrence\"}").await;
    let popular = metric(&server, "liverec_model_candidates_total{source=\"popular\"}").await;
    assert!(cooccurrence > 0.0 && popular > 0.0, "cooccurrence {cooccurrence}, popular {popular}");
    server.stop().await;
}
