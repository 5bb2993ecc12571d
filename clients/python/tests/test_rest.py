"""REST calls against the embedded demo server (auth off)."""

from __future__ import annotations

import uuid

import pytest

from conftest import wait_until
from liverec_client import ApiError, Client, Context, Event, ModelsStatus, RecList


def user() -> str:
    return f"py-{uuid.uuid4().hex[:12]}"


def test_an_event_changes_the_users_list(server):
    u = user()
    with Client(server.url) as client:
        accepted = client.track(u, "item-0003", "click", context=Context(device="mobile", country="FR"))
        assert accepted.accepted == 1 and len(accepted.event_ids) == 1
        recs = wait_until(
            "a list reflecting the event",
            lambda: (r := client.recommendations(u, k=5)).last_event_id == accepted.event_ids[0] and r,
        )
        assert isinstance(recs, RecList)
        assert recs.user_id == u and 0 < len(recs.items) <= 5 and recs.rec_id
        assert all(isinstance(i.score, float) for i in recs.items)
        filtered = client.recommendations(u, k=3, exclude=[recs.items[0].item_id], categories=["action", "drama"])
        assert recs.items[0].item_id not in filtered.item_ids and len(filtered.items) <= 3


def test_a_batch_is_split_and_retried_sends_apply_once(server):
    u = user()
    events = [Event(u, f"item-00{10 + i}", "view") for i in range(5)] + [
        {"user_id": u, "item_id": "item-0020", "event_type": "rating", "value": 4},
        {"user_id": u, "item_id": "item-0021", "event_type": "click", "event_id": "my-own-id"},
    ]
    with Client(server.url, max_batch=3) as client:
        first = client.post_events(events)
        assert first.accepted == 7 and len(first.event_ids) == 7 and first.event_ids[6] == "my-own-id"
        assert len(set(first.event_ids)) == 7
        # The same batch again with the ids the client gave it (as a retry sends it): applied once.
        again = [dict(e.to_dict() if isinstance(e, Event) else e, event_id=i) for e, i in zip(events, first.event_ids)]
        assert client.post_events(again).accepted == 7
        interactions = wait_until(
            "the events in the profile",
            lambda: len(p := client.export_user(u).profile["interactions"]) >= 7 and p,
        )
        assert len(interactions) == 7


def test_an_invalid_event_names_its_field(server):
    u = user()
    with Client(server.url) as client:
        with pytest.raises(ApiError) as caught:
            client.post_events([Event(u, "item-0001", "view"), {"user_id": u, "item_id": "item-0002", "event_type": "stare"}])
        error = caught.value
        assert (error.status, error.code, error.field) == (422, "invalid_event", "[1].event_type")
        with pytest.raises(ApiError) as caught:
            client.recommendations(u, k=0)
        assert (caught.value.status, caught.value.code, caught.value.field) == (422, "out_of_range", "k")


def test_catalogue_calls(server):
    item = f"py-item-{uuid.uuid4().hex[:8]}"
    with Client(server.url) as client:
        put = client.put_item(item, title="Blue Train", categories=["jazz"], tags=["1957"], created_at=1700000000000)
        assert (put.item_id, put.title, put.categories, put.in_catalog, put.available) == (item, "Blue Train", ["jazz"], True, True)
        assert client.item(item).tags == ["1957"]
        bulk = client.put_items([{"item_id": item, "title": "Blue Train (2)"}, {"item_id": item + "-b", "available": False}])
        assert (bulk.created, bulk.replaced) == (1, 1)
        assert client.item(item + "-b").available is False
        page = client.items_page(limit=2)
        assert len(page.items) <= 2 and page.next_cursor
        ids = [i.item_id for i in client.items(limit=500)]
        assert item in ids and item + "-b" in ids and len(ids) == len(set(ids))
        client.delete_item(item)
        with pytest.raises(ApiError) as caught:
            client.item(item)
        assert (caught.value.status, caught.value.code) == (404, "item_not_found")


def test_user_calls(server):
    u, anon = user(), user()
    with Client(server.url) as client:
        client.track(anon, "item-0007", "click")
        wait_until("the anonymous visitor's event", lambda: client.export_user(anon).profile["interactions"])
        merged = client.merge_user(u, anon)
        assert (merged.user_id, merged.from_user, merged.moved) == (u, anon, 1)
        assert [i["item_id"] for i in client.export_user(u).profile["interactions"]] == ["item-0007"]
        erased = client.erase_user(u)
        assert erased.user_id == u and erased.erased_at > 0
        assert client.export_user(u).profile["interactions"] == []


def test_admin_calls(server):
    with Client(server.url) as client:
        models = client.models()
        assert isinstance(models, ModelsStatus) and models.serving and models.state in (
            "idle", "waiting_for_data", "training", "canary", "experiment")
        assert models.raw["serving"] == models.serving
        assert client.experiment() is None
        with pytest.raises(ApiError) as caught:
            client.start_experiment("no-such-a", "no-such-b", share=0.5)
        assert caught.value.status in (400, 404)
        with pytest.raises(ApiError) as caught:
            client.promote_version("no-such-version", reason="test")
        assert (caught.value.status, caught.value.code) == (404, "model_not_found")
        with pytest.raises(ApiError) as caught:
            client.promote()
        assert caught.value.code == "conflict"
        with pytest.raises(ApiError) as caught:
            client.mint_token("alice")
        assert (caught.value.status, caught.value.code) == (409, "auth_off")
        assert "ctr" in str(client.monitor()).lower()
        started = client.retrain(reason="python client test")
        assert started.run >= 1 and isinstance(started.coalesced, bool)
        wait_until("the run in the loop's runs", lambda: any(r.get("run") == started.run for r in client.models().runs))


def test_operations_calls(server):
    with Client(server.url) as client:
        assert client.health().status == "ok"
        ready = client.ready()
        assert ready.ready and ready.bus == "memory" and ready.durable is False and ready.catalog_items > 0
        assert "liverec_" in client.metrics()
        assert client.openapi()["openapi"].startswith("3.")
        assert client.request("GET", "/healthz") == {"status": "ok"}
