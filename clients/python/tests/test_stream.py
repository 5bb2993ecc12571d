"""Recommendation streams (SSE): live lists, resume, restart, tokens, erasure."""

from __future__ import annotations

import queue
import threading
import uuid

import pytest

from conftest import STALL_SECS, wait_until
from liverec_client import ApiError, Client, RecList, StreamEnded


def user() -> str:
    return f"py-{uuid.uuid4().hex[:12]}"


class Collector:
    """Reads a stream in a thread; ``next_where`` waits for a list matching a condition."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.lists: "queue.Queue[RecList]" = queue.Queue()
        self.seen = []
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for recs in self.stream:
                self.lists.put(recs)
        except BaseException as error:
            self.error = error
            self.lists.put(None)

    def next(self) -> RecList:
        try:
            recs = self.lists.get(timeout=STALL_SECS)
        except queue.Empty:
            pytest.fail(f"no list for {STALL_SECS:.0f} s")
        if recs is None:
            raise self.error
        self.seen.append(recs)
        return recs

    def next_where(self, what: str, predicate) -> RecList:
        while True:
            recs = self.next()
            if predicate(recs):
                return recs

    def close(self) -> None:
        self.stream.close()
        self.thread.join(STALL_SECS)
        assert not self.thread.is_alive(), "the stream did not stop on close()"


def test_a_stream_delivers_the_current_list_then_each_new_one(server):
    u = user()
    with Client(server.url) as client:
        first_event = client.track(u, "item-0003", "click").event_ids[0]
        wait_until("a first list", lambda: client.recommendations(u).last_event_id == first_event)
        reader = Collector(client.stream(u))
        try:
            current = reader.next()
            assert current.last_event_id == first_event
            second = client.track(u, "item-0004", "click", rec_id=current.rec_id).event_ids[0]
            pushed = reader.next_where("the list after the click", lambda r: r.last_event_id == second)
            assert pushed.seq > current.seq
            seqs = [r.seq for r in reader.seen]
            assert seqs == sorted(set(seqs)), f"lists out of order or repeated: {seqs}"
        finally:
            reader.close()


def test_last_event_id_skips_the_list_the_client_has(server):
    u = user()
    with Client(server.url) as client:
        event = client.track(u, "item-0003", "click").event_ids[0]
        wait_until("a first list", lambda: client.recommendations(u).last_event_id == event)
        first = Collector(client.stream(u))
        try:
            current = first.next()
            event_id = first.stream.last_event_id
        finally:
            first.close()
        assert event_id.endswith(f"-{current.seq}"), event_id
        # A bare seq (the old form) names no server process: the current list comes again.
        plain = Collector(client.stream(u, last_event_id=str(current.seq)))
        try:
            assert plain.next().rec_id == current.rec_id
        finally:
            plain.close()
        reader = Collector(client.stream(u, last_event_id=event_id))
        try:
            newer = client.track(u, "item-0009", "view").event_ids[0]
            got = reader.next()
            # Without Last-Event-ID the first list would be the current one again.
            assert got.last_event_id == newer and got.seq > current.seq
        finally:
            reader.close()


def test_a_stream_survives_a_server_restart(make_server):
    srv = make_server()
    u = user()
    with Client(srv.url) as client:
        before = client.track(u, "item-0003", "click").event_ids[0]
        wait_until("a first list", lambda: client.recommendations(u).last_event_id == before)
        # Reconnect attempts 2 s apart: the new server mostly has the event's list by the time the
        # stream is back, numbered as low as the one the stream holds. The stream sends the
        # Last-Event-ID of the old server's list: the new process does not take it for its own
        # (the id names the incarnation), sends its list, and the stream delivers it all the same.
        reader = Collector(client.stream(u, reconnect_delay=2.0, max_reconnect_delay=2.0))
        try:
            reader.next()
            assert reader.stream.last_event_id is not None
            srv.restart()  # same port; the embedded server's memory is gone
            after = client.track(u, "item-0005", "click").event_ids[0]
            recs = reader.next_where("a list from the restarted server", lambda r: r.last_event_id == after)
            assert recs.user_id == u
            assert reader.stream.reconnects >= 1
            # Its numbering started again: delivered all the same (generated later).
            assert recs.generated_at > reader.seen[0].generated_at
        finally:
            reader.close()


def test_subscribe_calls_back_from_a_thread(server):
    u = user()
    got: "queue.Queue[RecList]" = queue.Queue()
    with Client(server.url) as client:
        event = client.track(u, "item-0011", "click").event_ids[0]
        with client.subscribe(u, got.put) as subscription:
            recs = got.get(timeout=STALL_SECS)
            while recs.last_event_id != event:
                recs = got.get(timeout=STALL_SECS)
        assert subscription.error is None, repr(subscription.error)
        assert not subscription._thread.is_alive()


def test_an_erased_user_ends_the_stream(server):
    u = user()
    with Client(server.url) as client:
        client.track(u, "item-0003", "click")
        reader = Collector(client.stream(u))
        reader.next()
        client.erase_user(u)
        with pytest.raises(StreamEnded):
            while True:
                reader.next()
        reader.close()


def test_stream_tokens_are_refreshed_when_they_expire(auth_server, keys):
    roles, _ = keys
    u = user()
    with Client(auth_server.url, api_key=roles["admin"]) as admin, Client(auth_server.url) as anonymous:
        minted = []

        def fresh_token() -> str:
            token = admin.mint_token(u, ttl_secs=1).token
            minted.append(token)
            return token

        reader = Collector(anonymous.stream(u, token=fresh_token, reconnect_delay=0.1))
        try:
            reader.next()
            # The one-second token expires (event: token_expired); the stream asks for another.
            wait_until("a second token", lambda: len(minted) >= 2)
            event = admin.track(u, "item-0003", "click").event_ids[0]
            reader.next_where("a list after the refresh", lambda r: r.last_event_id == event)
        finally:
            reader.close()


def test_a_refused_credential_is_raised_not_retried(auth_server, keys):
    roles, _ = keys
    with Client(auth_server.url, api_key="lrk_not_a_key") as client:
        with pytest.raises(ApiError) as caught:
            next(iter(client.stream("alice")))
        assert (caught.value.status, caught.value.code) == (401, "unauthorized")
    with Client(auth_server.url, api_key=roles["producer"]) as client:
        with pytest.raises(ApiError) as caught:
            next(iter(client.stream("alice")))
        assert caught.value.status == 403
    with Client(auth_server.url, api_key=roles["admin"]) as admin:
        token = admin.mint_token("alice").token
    with Client(auth_server.url) as client:
        with pytest.raises(ApiError) as caught:
            next(iter(client.stream("bob", token=token)))
        assert (caught.value.status, caught.value.code) == (403, "forbidden")
