"""The non-personal lists (popular, trending, latest, similar, basket) and their ETag cache.
Skipped against a server whose OpenAPI document does not have them yet."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from conftest import wait_until
from liverec_client import ApiError, AsyncClient, BasketList, Client, ItemList, LatestItems


@pytest.fixture(scope="module")
def lists_server(server):
    with Client(server.url) as client:
        if "/v1/popular" not in client.openapi()["paths"]:
            pytest.skip("this server has no non-personal lists (GET /v1/popular)")
    return server


def test_popular_pages_and_filters(lists_server):
    u = f"py-{uuid.uuid4().hex[:8]}"
    with Client(lists_server.url) as client:
        client.post_events([{"user_id": u, "item_id": f"item-00{i:02}", "event_type": "purchase"} for i in range(40, 46)])
        first = wait_until("a popular list", lambda: len((p := client.popular(k=2)).items) == 2 and p)
        assert isinstance(first, ItemList) and first.kind == "popular" and first.offset == 0 and first.next_offset == 2
        second = client.popular(k=2, offset=first.next_offset)
        assert second.offset == 2 and not set(first.item_ids) & set(second.item_ids)
        category = client.item(first.item_ids[0]).categories[0]
        in_category = client.popular(k=5, category=category, window="7d")
        assert in_category.category == category and in_category.window == "7d"
        assert all(category in client.item(i).categories for i in in_category.item_ids)
        assert client.trending(k=3, device="mobile").kind == "trending"
        with pytest.raises(ApiError) as caught:
            client.popular(window="1y")
        assert caught.value.status in (400, 422) and caught.value.field == "window"


def test_public_lists_are_revalidated_with_their_etag(lists_server):
    with Client(lists_server.url) as client:
        first = client.popular(k=3)
        hits = client.cache.hits
        again = client.popular(k=3)
        # 304 Not Modified, answered from the kept copy (unless the period's refresh came between).
        assert client.cache.hits == hits + 1 or again.item_ids != first.item_ids
        assert again == first or again.item_ids != first.item_ids
    with Client(lists_server.url, cache_size=0) as uncached:
        uncached.popular(k=3)
        uncached.popular(k=3)
        assert uncached.cache.hits == 0


def test_latest_and_similar_items(lists_server):
    item = f"py-new-{uuid.uuid4().hex[:8]}"
    with Client(lists_server.url) as client:
        client.put_item(item, title="Brand new", categories=["drama"], created_at=int(time.time() * 1000))
        def newest():
            latest = client.latest_items(k=5)
            return latest if item in [i.item_id for i in latest.items] else None

        latest = wait_until("the new item among the latest", newest)
        assert isinstance(latest, LatestItems) and latest.items[0].item_id == item and latest.items[0].title == "Brand new"
        # Two users take up the same pair of new items: each becomes like the other (from the
        # next refresh of the lists, every recs.lists_refresh_secs).
        a, b = f"py-a-{uuid.uuid4().hex[:8]}", f"py-b-{uuid.uuid4().hex[:8]}"
        client.put_items([{"item_id": a, "categories": ["drama"]}, {"item_id": b, "categories": ["drama"]}])
        for u in (f"py-{uuid.uuid4().hex[:8]}", f"py-{uuid.uuid4().hex[:8]}"):
            client.post_events([{"user_id": u, "item_id": a, "event_type": "click"}, {"user_id": u, "item_id": b, "event_type": "click"}])
        similar = wait_until("b among the items like a", lambda: b in (s := client.similar_items(a, k=10)).item_ids and s)
        assert similar.kind == "similar" and similar.item_id == a and a not in similar.item_ids
        with pytest.raises(ApiError) as caught:
            client.similar_items("no-such-item")
        assert (caught.value.status, caught.value.code) == (404, "item_not_found")


def test_basket_recommendations(lists_server):
    with Client(lists_server.url) as client:
        basket = client.basket_recommendations(["item-0003", "item-0004"], event_type="add_to_cart", device="mobile", k=5,
                                                exclude=["item-0013"], session_id="anon-session-1")
        assert isinstance(basket, BasketList) and 0 < len(basket.items) <= 5 and basket.model_version
        assert not {"item-0003", "item-0004", "item-0013"} & set(basket.item_ids)
        with pytest.raises(ApiError) as caught:
            client.basket_recommendations(["item-0003"], k=0)
        assert caught.value.field == "k"


def test_async_lists(lists_server):
    async def main():
        async with AsyncClient(lists_server.url) as client:
            popular = await client.popular(k=3)
            assert popular.kind == "popular"
            hits = client.cache.hits
            again = await client.popular(k=3)
            assert client.cache.hits == hits + 1 or again.item_ids != popular.item_ids
            basket = await client.basket_recommendations(["item-0003"], k=3)
            assert "item-0003" not in basket.item_ids
            assert (await client.latest_items(k=2)).items

    asyncio.run(main())
