"""The asyncio client against a real server (plain asyncio.run: no plugin needed)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from conftest import STALL_SECS
from liverec_client import ApiError, AsyncClient, RecList, StreamEnded


def user() -> str:
    return f"py-{uuid.uuid4().hex[:12]}"


async def poll(what, check, stall=STALL_SECS):
    deadline = time.monotonic() + stall
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"stalled for {stall:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


async def next_where(stream, predicate) -> RecList:
    async def find():
        async for recs in stream:
            if predicate(recs):
                return recs
        pytest.fail("the stream ended")

    return await asyncio.wait_for(find(), STALL_SECS)


def test_async_rest_calls(server):
    async def main():
        u = user()
        async with AsyncClient(server.url) as client:
            assert (await client.health()).status == "ok"
            accepted = await client.track(u, "item-0003", "click")

            async def reflected():
                recs = await client.recommendations(u, k=4)
                return recs if recs.last_event_id == accepted.event_ids[0] else None

            recs = await poll("a list reflecting the event", reflected)
            assert 0 < len(recs.items) <= 4
            item = await client.put_item(f"{u}-item", title="T", categories=["c"])
            assert (await client.item(item.item_id)).title == "T"
            ids = [i.item_id async for i in client.items(limit=300)]
            assert item.item_id in ids
            assert (await client.models()).serving
            assert (await client.ready()).ready
            with pytest.raises(ApiError) as caught:
                await client.rollback()
            assert caught.value.code == "conflict"
            assert (await client.erase_user(u)).user_id == u

    asyncio.run(main())


def test_an_async_stream_survives_a_server_restart(make_server):
    srv = make_server()
    u = user()

    async def main():
        async with AsyncClient(srv.url) as client:
            stream = client.stream(u, reconnect_delay=0.1, max_reconnect_delay=1.0)
            before = (await client.track(u, "item-0003", "click")).event_ids[0]
            first = await next_where(stream, lambda r: r.last_event_id == before)
            await asyncio.get_running_loop().run_in_executor(None, srv.restart)
            after = (await client.track(u, "item-0005", "click")).event_ids[0]
            recs = await next_where(stream, lambda r: r.last_event_id == after)
            assert stream.reconnects >= 1 and recs.generated_at > first.generated_at
            await stream.aclose()

    asyncio.run(main())


def test_async_subscribe_and_erasure(server):
    u = user()

    async def main():
        async with AsyncClient(server.url) as client:
            event = (await client.track(u, "item-0042", "click")).event_ids[0]
            got: "asyncio.Queue[RecList]" = asyncio.Queue()
            task = client.subscribe(u, got.put)  # a coroutine function works as the callback
            while (await asyncio.wait_for(got.get(), STALL_SECS)).last_event_id != event:
                pass
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

            stream = client.stream(u)
            await next_where(stream, lambda r: True)
            await client.erase_user(u)
            with pytest.raises(StreamEnded):
                await next_where(stream, lambda r: False)

    asyncio.run(main())


def test_async_stream_tokens_are_refreshed(auth_server, keys):
    roles, _ = keys
    u = user()

    async def main():
        async with AsyncClient(auth_server.url, api_key=roles["admin"]) as admin, AsyncClient(auth_server.url) as anonymous:
            minted = []

            async def fresh_token() -> str:
                minted.append((await admin.mint_token(u, ttl_secs=1)).token)
                return minted[-1]

            stream = anonymous.stream(u, token=fresh_token, reconnect_delay=0.1)
            await next_where(stream, lambda r: True)

            async def refreshed():
                return len(minted) >= 2

            # Reading the stream is what notices the expiry: read in a task while polling.
            reader = asyncio.ensure_future(next_where(stream, lambda r: len(minted) >= 2 and r.last_event_id is not None))
            await poll("a second token", refreshed)
            event = (await admin.track(u, "item-0003", "click")).event_ids[0]
            recs = await reader
            assert recs.last_event_id == event
            await stream.aclose()

    asyncio.run(main())
