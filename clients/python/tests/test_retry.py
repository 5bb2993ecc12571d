"""Retries against a real rate limit (429 with Retry-After), and the event batchers."""

from __future__ import annotations

import asyncio
import re
import uuid

import pytest

from conftest import wait_until
from liverec_client import NO_RETRY, ApiError, AsyncClient, Client, Event, RetryPolicy

# Two requests a second per address, in bursts of two: a client posting faster meets 429.
LIMITED = '[limits]\nper_ip_per_sec = 2\nper_ip_burst = 2\n'


def rate_limited(client: Client) -> float:
    text = client.metrics()
    match = re.search(r"^liverec_http_rate_limited_total(?:\{[^}]*\})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_429_is_retried_after_retry_after(make_server):
    srv = make_server(config=LIMITED)
    u = f"py-{uuid.uuid4().hex[:12]}"
    with Client(srv.url, retry=NO_RETRY) as bare:
        with pytest.raises(ApiError) as caught:
            for i in range(10):
                bare.track(u, f"item-{i:04}", "view")
        error = caught.value
        assert (error.status, error.code) == (429, "rate_limited") and error.retry_after is not None
    with Client(srv.url, retry=RetryPolicy(max_retries=50)) as client:
        before = rate_limited(client)
        ids = [client.track(u, f"item-{i:04}", "view").event_ids[0] for i in range(8)]
        assert rate_limited(client) > before, "the server never refused: the test proves nothing"
        profile = wait_until(
            "the events in the profile",
            lambda: len(p := client.export_user(u).profile["interactions"]) >= 8 + 1 and p,
        )
        # Each event once (plus the one the bare client got in before its 429).
        assert sorted(i["event_id"] for i in profile if i["event_id"] in ids) == sorted(ids)


def test_the_batcher_delivers_every_event_through_429s(make_server):
    srv = make_server(config=LIMITED)
    u = f"py-{uuid.uuid4().hex[:12]}"
    failures = []
    with Client(srv.url, retry=RetryPolicy(max_retries=50)) as client:
        with client.batcher(batch_size=4, flush_interval=0.05, on_error=lambda e, b: failures.append(e)) as batcher:
            ids = [batcher.track(Event(u, f"item-{i % 50:04}", "view")) for i in range(30)]
        assert failures == [] and batcher.accepted == 30 and batcher.failed == 0
        assert rate_limited(client) > 0, "the server never refused: the test proves nothing"
        profile = wait_until(
            "the events in the profile",
            lambda: len(p := client.export_user(u).profile["interactions"]) >= 30 and p,
        )
        assert sorted(i["event_id"] for i in profile) == sorted(ids)


def test_the_async_batcher_delivers_every_event_through_429s(make_server):
    srv = make_server(config=LIMITED)
    u = f"py-{uuid.uuid4().hex[:12]}"

    async def main():
        async with AsyncClient(srv.url, retry=RetryPolicy(max_retries=50)) as client:
            async with client.batcher(batch_size=5, flush_interval=0.05) as batcher:
                ids = [await batcher.track(Event(u, f"item-{i:04}", "click")) for i in range(20)]
            assert batcher.accepted == 20 and batcher.failed == 0
            return ids

    ids = asyncio.run(main())
    with Client(srv.url, retry=RetryPolicy(max_retries=50)) as client:
        assert rate_limited(client) > 0, "the server never refused: the test proves nothing"
        profile = wait_until(
            "the events in the profile",
            lambda: len(p := client.export_user(u).profile["interactions"]) >= 20 and p,
        )
        assert sorted(i["event_id"] for i in profile) == sorted(ids)


def test_a_batch_is_sent_after_the_flush_interval_without_flush(server):
    u = f"py-{uuid.uuid4().hex[:12]}"
    with Client(server.url) as client:
        batcher = client.batcher(batch_size=1000, flush_interval=0.2)
        try:
            event_id = batcher.track({"user_id": u, "item_id": "item-0001", "event_type": "view"})
            wait_until("the interval's batch", lambda: batcher.accepted == 1)
            assert [i["event_id"] for i in client.export_user(u).profile["interactions"]] == [event_id]
        finally:
            batcher.close()
