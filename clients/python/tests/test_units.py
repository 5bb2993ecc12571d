"""The pieces without I/O: SSE decoding, the stream's ordering rule, retry delays, ids."""

from __future__ import annotations

import uuid

from liverec_client import RecList, RetryPolicy, uuid7
from liverec_client._core import SseDecoder, StreamState, parse_retry_after


def recs(seq: int, generated_at: int, rec_id: str = "") -> RecList:
    return RecList(rec_id or f"r{seq}-{generated_at}", "u", "m", generated_at, seq, [])


def test_the_sse_decoder_reads_the_servers_frames():
    decoder = SseDecoder()
    lines = ["retry: 2000", "", ": heartbeat", "", "id: 3", "event: recommendations", 'data: {"a":', "data: 1}", "",
             "event: shutdown", "data: {}", ""]
    messages = [m for m in (decoder.line(line) for line in lines) if m is not None]
    assert decoder.retry_ms == 2000
    assert [(m.event, m.data, m.id) for m in messages] == [("recommendations", '{"a":\n1}', "3"), ("shutdown", "{}", "3")]


def test_a_stream_never_delivers_an_older_list_after_a_newer_one():
    state = StreamState(None, 30.0)
    assert state.accept(recs(5, 1000), True)
    assert not state.accept(recs(5, 1000, rec_id="r5-1000"), False), "the same list twice"
    assert not state.accept(recs(5, 1000, rec_id="r5-1000"), True), "the same list on a new connection"
    assert not state.accept(recs(4, 900), True), "an older list (a stored one from another instance)"
    assert state.accept(recs(6, 1001), False)
    # A restarted embedded server numbers from 1 again: its first list is newer all the same.
    assert state.accept(recs(1, 2000), True)
    assert not state.accept(recs(1, 1999, rec_id="other"), True), "as numbered as the last, and older"
    assert not state.accept(recs(1, 2001, rec_id="later"), False), "not first on its connection, not numbered higher"
    assert state.last.seq == 1 and state.accept(recs(2, 2000), False)


def test_last_event_id_is_sent_on_every_connection():
    # The server's ids name its process: one since restarted sends its current list anyway.
    assert "last-event-id" not in StreamState(None, 30.0).headers()
    state = StreamState(None, 30.0, last_event_id="1795698842339-7")
    assert state.headers()["last-event-id"] == "1795698842339-7"


def test_reconnect_delays_grow_and_reset():
    state = StreamState(1.0, 8.0)
    delays = [state.next_delay() for _ in range(6)]
    assert 0.8 <= delays[0] <= 1.2 and all(d <= 8.0 * 1.2 for d in delays) and delays[4] >= 6.4
    assert state.next_delay(retry_after=20.0) == 20.0
    state.connected()
    assert state.next_delay() <= 1.2


def test_retry_policy_honours_retry_after():
    policy = RetryPolicy(max_retries=3, max_wait=30)
    assert policy.delay(1, 2.0) == 2.0
    assert policy.delay(1, 31.0) is None, "a wait longer than max_wait raises instead"
    assert policy.delay(4, 1.0) is None
    assert 0 < policy.delay(2, None) <= 0.5
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_event_ids_are_uuid_v7_in_time_order():
    ids = [uuid7() for _ in range(50)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert len(set(ids)) == 50
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)
