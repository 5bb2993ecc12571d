"""What the sync and the asyncio clients share: the operations (method, path, body, how to decode
the answer), the retry policy, error decoding, the SSE decoder and a stream's resume state.
Nothing here does I/O."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import quote

from . import models as m
from .errors import ApiError

USER_AGENT = "liverec-client-python/0.1.0"


def seg(value: str) -> str:
    """One path segment: user and item ids may hold any printable character."""
    return quote(str(value), safe="")


def csv_param(values: Optional[Iterable[str]]) -> Optional[str]:
    if values is None:
        return None
    if isinstance(values, str):
        return values
    return ",".join(values)


@dataclass
class Call:
    """One request and how to read its answer."""

    method: str
    path: str
    params: Optional[Dict[str, Any]] = None
    json: Any = None
    decode: Optional[Callable[[Any], Any]] = None
    """Applied to the decoded JSON body; ``None``: return the JSON as it is."""
    idempotent: bool = False
    """Whether repeating it after a lost answer is harmless (a transport error after sending)."""
    ok: Tuple[int, ...] = ()
    """Error statuses returned as answers rather than raised (``/readyz``'s 503)."""
    content: Optional[bytes] = None
    content_type: Optional[str] = None
    cacheable: bool = False
    """A public list served with an ``ETag``: asked again with ``If-None-Match``, and the kept
    answer returned on ``304 Not Modified``."""

    def cache_key(self) -> Tuple[str, Tuple[Tuple[str, str], ...]]:
        return self.path, tuple(sorted((k, str(v)) for k, v in (self.params or {}).items()))

    def __post_init__(self) -> None:
        if self.params:
            self.params = {k: v for k, v in self.params.items() if v is not None}
        if self.method in ("GET", "PUT", "DELETE", "HEAD"):
            self.idempotent = True


@dataclass
class RetryPolicy:
    """When and how long to wait before trying a request again.

    ``429`` and ``503`` are retried, waiting what ``Retry-After`` says (else an exponential
    backoff from ``backoff`` to ``max_backoff`` seconds, with jitter); so are connection errors
    (nothing was sent), and other transport errors on idempotent requests (a batch of events is
    idempotent when every event has an ``event_id``). At most ``max_retries`` retries, and never a
    single wait over ``max_wait`` seconds (a longer ``Retry-After`` raises the error at once).
    """

    max_retries: int = 5
    backoff: float = 0.25
    max_backoff: float = 10.0
    max_wait: float = 60.0
    statuses: Tuple[int, ...] = (429, 503)

    def delay(self, attempt: int, retry_after: Optional[float]) -> Optional[float]:
        """Seconds to wait before retry number ``attempt`` (from 1), or ``None``: give up."""
        if attempt > self.max_retries:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_wait else None
        base = min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))
        return base * (0.5 + random.random() / 2)


NO_RETRY = RetryPolicy(max_retries=0)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """``Retry-After`` as seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        import datetime

        when = parsedate_to_datetime(value)
        return max(0.0, (when - datetime.datetime.now(when.tzinfo)).total_seconds())
    except (TypeError, ValueError):
        return None


def api_error(status: int, headers: Mapping[str, str], body: bytes) -> ApiError:
    """The :class:`ApiError` for an error answer."""
    decoded: Any = None
    code, message, fld = f"http_{status}", body.decode("utf-8", "replace")[:500] or f"HTTP {status}", None
    try:
        decoded = json.loads(body) if body else None
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), dict):
        err = decoded["error"]
        code = str(err.get("code", code))
        message = str(err.get("message", message))
        fld = err.get("field")
    return ApiError(status, code, message, fld, parse_retry_after(headers.get("retry-after")), decoded)


def decode_answer(call: Call, status: int, body: bytes) -> Any:
    if status == 204 or not body:
        return None
    data = json.loads(body)
    return call.decode(data) if call.decode else data


def prepare_events(events: Sequence[m.EventLike], idempotent: bool) -> List[Dict[str, Any]]:
    out = [m.event_dict(e) for e in events]
    if idempotent:
        for e in out:
            if not e.get("event_id"):
                e["event_id"] = m.uuid7()
    return out


def merge_accepted(parts: Sequence[m.Accepted], sizes: Sequence[int]) -> m.Accepted:
    """One :class:`Accepted` for a batch sent in several requests (indexes into the whole batch)."""
    accepted, ids, erased, offset = 0, [], [], 0
    for part, size in zip(parts, sizes):
        accepted += part.accepted
        ids.extend(part.event_ids)
        erased.extend(offset + i for i in part.erased)
        offset += size
    return m.Accepted(accepted=accepted, event_ids=ids, erased=erased)


# ---- operations -------------------------------------------------------------------------------


def op_post_events(batch: List[Dict[str, Any]]) -> Call:
    every_id = all(e.get("event_id") for e in batch)
    return Call("POST", "/v1/events", json=batch, decode=m.Accepted.from_dict, idempotent=every_id)


def op_recommendations(user_id: str, k, exclude, categories, device) -> Call:
    params = {"k": k, "exclude": csv_param(exclude), "categories": csv_param(categories), "device": device}
    return Call("GET", f"/v1/users/{seg(user_id)}/recommendations", params=params, decode=m.RecList.from_dict)


def item_body(
    title=None, categories=None, tags=None, created_at=None, available=None, expires_at=None, **extra
) -> Dict[str, Any]:
    body = {
        "title": title,
        "categories": list(categories) if categories is not None else None,
        "tags": list(tags) if tags is not None else None,
        "created_at": created_at,
        "available": available,
        "expires_at": expires_at,
        **extra,
    }
    return {k: v for k, v in body.items() if v is not None}


def op_put_item(item_id: str, attributes: Dict[str, Any]) -> Call:
    return Call("PUT", f"/v1/items/{seg(item_id)}", json=attributes, decode=m.Item.from_dict)


def op_put_items(items: Sequence[Mapping[str, Any]]) -> Call:
    return Call("PUT", "/v1/items", json=[dict(i) for i in items], decode=m.ItemsPut.from_dict)


def op_get_item(item_id: str) -> Call:
    return Call("GET", f"/v1/items/{seg(item_id)}", decode=m.Item.from_dict)


def op_delete_item(item_id: str) -> Call:
    return Call("DELETE", f"/v1/items/{seg(item_id)}")


def op_list_items(cursor: Optional[str], limit: Optional[int]) -> Call:
    return Call("GET", "/v1/items", params={"cursor": cursor, "limit": limit}, decode=m.ItemPage.from_dict)


def op_merge(user_id: str, from_user: str) -> Call:
    return Call("POST", f"/v1/users/{seg(user_id)}/merge", json={"from": from_user}, decode=m.Merged.from_dict)


def op_export(user_id: str) -> Call:
    return Call("GET", f"/v1/users/{seg(user_id)}/export", decode=m.Export.from_dict)


def op_erase(user_id: str) -> Call:
    return Call("DELETE", f"/v1/users/{seg(user_id)}", decode=m.Erased.from_dict)


def op_models() -> Call:
    return Call("GET", "/v1/admin/models", decode=m.ModelsStatus.from_dict)


def _reason(reason: Optional[str]) -> Optional[Dict[str, Any]]:
    return {"reason": reason} if reason is not None else None


def op_promote_version(name: str, reason: Optional[str]) -> Call:
    return Call("POST", f"/v1/admin/models/{seg(name)}/promote", json=_reason(reason))


def op_promote(reason: Optional[str]) -> Call:
    return Call("POST", "/v1/admin/promote", json=_reason(reason))


def op_rollback(reason: Optional[str]) -> Call:
    return Call("POST", "/v1/admin/rollback", json=_reason(reason))


def op_retrain(reason: Optional[str], drill: Optional[str], skip_gate: Optional[bool]) -> Call:
    body = {k: v for k, v in (("reason", reason), ("drill", drill), ("skip_gate", skip_gate)) if v is not None}
    return Call("POST", "/v1/admin/retrain", json=body or None, decode=m.RetrainStarted.from_dict)


def op_mint_token(user_id: str, ttl_secs: Optional[int]) -> Call:
    body: Dict[str, Any] = {"user_id": user_id}
    if ttl_secs is not None:
        body["ttl_secs"] = ttl_secs
    return Call("POST", "/v1/admin/tokens", json=body, decode=m.MintedToken.from_dict)


def op_experiment() -> Call:
    return Call("GET", "/v1/admin/experiments", decode=lambda d: d.get("experiment"))


def op_start_experiment(a: str, b: str, share: Optional[float]) -> Call:
    body: Dict[str, Any] = {"a": a, "b": b}
    if share is not None:
        body["share"] = share
    return Call("POST", "/v1/admin/experiments", json=body)


def op_stop_experiment() -> Call:
    return Call("DELETE", "/v1/admin/experiments")


def op_monitor() -> Call:
    return Call("GET", "/v1/monitor")


def op_ranked(kind: str, k, offset, category, device, window, availability) -> Call:
    params = {"k": k, "offset": offset, "category": category, "device": device, "window": window, "availability": availability}
    return Call("GET", f"/v1/{kind}", params=params, decode=m.ItemList.from_dict, cacheable=True)


def op_latest_items(k, offset, category, availability) -> Call:
    params = {"k": k, "offset": offset, "category": category, "availability": availability}
    return Call("GET", "/v1/items/latest", params=params, decode=m.LatestItems.from_dict, cacheable=True)


def op_similar_items(item_id: str, k, offset, category, availability) -> Call:
    params = {"k": k, "offset": offset, "category": category, "availability": availability}
    return Call("GET", f"/v1/items/{seg(item_id)}/similar", params=params, decode=m.ItemList.from_dict, cacheable=True)


def op_basket(items, event_type, device, k, exclude, categories, session_id) -> Call:
    body: Dict[str, Any] = {"items": list(items)}
    for name, value in (("event_type", event_type), ("k", k), ("session_id", session_id)):
        if value is not None:
            body[name] = value
    if device is not None:
        body["context"] = {"device": device}
    if exclude is not None:
        body["exclude"] = list(exclude)
    if categories is not None:
        body["categories"] = list(categories)
    # Nothing is stored: asking again is harmless.
    return Call("POST", "/v1/recommendations", json=body, decode=m.BasketList.from_dict, idempotent=True)


class AnswerCache:
    """The last answer and ``ETag`` of each cacheable call, for conditional requests; the least
    recently used go first past ``size`` entries. Safe to share between threads."""

    def __init__(self, size: int) -> None:
        import threading
        from collections import OrderedDict

        self.size = size
        self._entries: "OrderedDict[Any, Tuple[str, Any]]" = OrderedDict()
        self._lock = threading.Lock()
        #: Answers served from the cache on ``304 Not Modified``.
        self.hits = 0

    def headers(self, call: Call) -> Dict[str, str]:
        if not call.cacheable or self.size <= 0:
            return {}
        with self._lock:
            entry = self._entries.get(call.cache_key())
        return {"if-none-match": entry[0]} if entry else {}

    def hit(self, call: Call) -> Tuple[bool, Any]:
        """On a 304: (True, the kept answer), or (False, None) if it was evicted meanwhile."""
        with self._lock:
            entry = self._entries.get(call.cache_key())
            if entry is None:
                return False, None
            self._entries.move_to_end(call.cache_key())
            self.hits += 1
            return True, entry[1]

    def store(self, call: Call, etag: Optional[str], value: Any) -> None:
        if not call.cacheable or self.size <= 0 or not etag:
            return
        with self._lock:
            key = call.cache_key()
            self._entries[key] = (etag, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


def op_health() -> Call:
    return Call("GET", "/healthz", decode=m.Health.from_dict)


def op_ready() -> Call:
    return Call("GET", "/readyz", decode=m.Readiness.from_dict, ok=(503,))


def op_metrics() -> Call:
    return Call("GET", "/metrics")


def op_openapi() -> Call:
    return Call("GET", "/openapi.json")


# ---- streams ----------------------------------------------------------------------------------


@dataclass
class SseMessage:
    event: str
    data: str
    id: Optional[str]


class SseDecoder:
    """Server-Sent Events, line by line (the WHATWG event stream format)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: List[str] = []
        self.last_id: Optional[str] = None
        self.retry_ms: Optional[int] = None

    def line(self, line: str) -> Optional[SseMessage]:
        """Feeds one line (without its end); returns a message when a blank line ends one."""
        if line == "":
            if not self._data and not self._event:
                return None
            msg = SseMessage(self._event or "message", "\n".join(self._data), self.last_id)
            self._event, self._data = "", []
            return msg
        if line.startswith(":"):
            return None  # a comment: the server's heartbeat
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None


@dataclass
class StreamState:
    """What a reconnecting stream remembers: the newest list delivered (never deliver an older
    one after it), the last event id, and the backoff."""

    reconnect_delay: Optional[float]
    max_reconnect_delay: float
    last: Optional[m.RecList] = None
    last_event_id: Optional[str] = None
    """The id of the last list received, sent as ``Last-Event-ID`` on every reconnection. The
    server's ids are ``<incarnation>-<seq>``: a server process that did not send the id (an
    embedded server since restarted, which numbers from 1 again, or another instance) sends its
    current list, which :meth:`accept` drops if it is a repeat."""
    server_retry: Optional[float] = None
    failures: int = 0
    reconnects: int = 0
    connected_once: bool = field(default=False)

    def headers(self) -> Dict[str, str]:
        headers = {"accept": "text/event-stream", "cache-control": "no-cache"}
        if self.last_event_id is not None:
            headers["last-event-id"] = self.last_event_id
        return headers

    def accept(self, recs: m.RecList, first_on_connection: bool) -> bool:
        """Whether to deliver ``recs``: not the list already delivered, nor an older one.

        A list is newer when its ``seq`` is higher (the user's numbering, which production mode
        keeps in the store across instances and restarts), or when it is the first list of a
        new connection and was generated later: a restarted embedded server has lost its memory
        and numbers from 1 again. The same list twice (same ``rec_id``) is delivered once.
        """
        last = self.last
        if last is not None:
            if recs.rec_id == last.rec_id:
                return False
            if recs.seq <= last.seq and not (first_on_connection and recs.generated_at > last.generated_at):
                return False
        self.last = recs
        return True

    def next_delay(self, retry_after: Optional[float] = None) -> float:
        """Seconds to wait before the next connection attempt; grows while attempts fail."""
        base = self.reconnect_delay if self.reconnect_delay is not None else (self.server_retry or 1.0)
        delay = min(self.max_reconnect_delay, base * (2 ** self.failures))
        self.failures += 1
        delay *= 0.8 + random.random() * 0.4
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def connected(self) -> None:
        if self.connected_once:
            self.reconnects += 1
        self.connected_once = True
        self.failures = 0


def decode_list(msg: SseMessage) -> m.RecList:
    return m.RecList.from_dict(json.loads(msg.data))
