"""The synchronous client: :class:`Client`, :class:`RecStream` and :class:`EventBatcher`."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import httpx

from . import _core as c
from . import models as m
from .errors import LiverecError, StreamEnded

log = logging.getLogger("liverec_client")

TokenSource = Union[str, Callable[[], str], None]


class Client:
    """A liverec server, over HTTP.

    ``api_key`` (any role) is sent as ``Authorization: Bearer``; leave it out for the embedded
    demo, where auth is off. ``retry`` says which failures are retried and how long to wait
    (:class:`RetryPolicy`: 429 and 503 honouring ``Retry-After``, connection errors).
    ``max_batch`` splits larger event batches (the server's ``events.max_batch``, default 1,000).

    Use it as a context manager, or call :meth:`close`. One client may be shared by threads.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        *,
        api_key: Optional[str] = None,
        timeout: float = 10.0,
        retry: Optional[c.RetryPolicy] = None,
        max_batch: int = 1000,
        cache_size: int = 256,
        http: Optional[httpx.Client] = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retry = retry or c.RetryPolicy()
        self.max_batch = max_batch
        #: Public lists (popular, trending, latest, similar) with their ETags: asked again
        #: with If-None-Match, a 304 answers from here. ``cache_size=0`` turns it off.
        self.cache = c.AnswerCache(cache_size)
        self._http = http or httpx.Client(timeout=timeout, headers={"user-agent": c.USER_AGENT})
        self._own_http = http is None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    # ---- plumbing ----------------------------------------------------------------------------

    def _headers(self, token: Optional[str] = None) -> Dict[str, str]:
        credential = token or self.api_key
        return {"authorization": f"Bearer {credential}"} if credential else {}

    def _run(self, call: c.Call) -> Any:
        attempt = 0
        while True:
            attempt += 1
            conditional = self.cache.headers(call)
            try:
                response = self._http.request(
                    call.method,
                    self.base_url + call.path,
                    params=call.params,
                    json=call.json if call.content is None else None,
                    content=call.content,
                    headers={
                        **self._headers(),
                        **conditional,
                        **({"content-type": call.content_type} if call.content_type else {}),
                    },
                )
            except httpx.TransportError as error:
                retriable = isinstance(error, httpx.ConnectError) or call.idempotent
                delay = self.retry.delay(attempt, None) if retriable else None
                if delay is None:
                    raise
                log.debug("retrying %s %s after %s in %.2fs", call.method, call.path, error, delay)
                time.sleep(delay)
                continue
            status = response.status_code
            if status == 304 and conditional:
                found, value = self.cache.hit(call)
                if found:
                    return value
                continue  # evicted meanwhile: ask again without the ETag
            if status < 400 or status in call.ok:
                value = c.decode_answer(call, status, response.content)
                self.cache.store(call, response.headers.get("etag"), value)
                return value
            error = c.api_error(status, response.headers, response.content)
            delay = self.retry.delay(attempt, error.retry_after) if status in self.retry.statuses else None
            if delay is None:
                raise error
            log.debug("retrying %s %s after %s in %.2fs", call.method, call.path, error.code, delay)
            time.sleep(delay)

    def request(self, method: str, path: str, *, params: Optional[Dict[str, Any]] = None, json: Any = None) -> Any:
        """Any API call, retried like the others; returns the decoded JSON (``None`` for 204)."""
        return self._run(c.Call(method.upper(), path, params=params, json=json))

    # ---- events ------------------------------------------------------------------------------

    def post_events(self, events: Union[m.EventLike, Sequence[m.EventLike]], *, idempotent: bool = True) -> m.Accepted:
        """Posts events (one, or a list split into requests of ``max_batch``).

        With ``idempotent`` (the default) events without an ``event_id`` get a UUID v7 first, so
        a request retried after a lost answer is applied once. Each request is validated whole by
        the server: one invalid event raises :class:`ApiError` (``field`` names it) and that
        request applies nothing.
        """
        batch = c.prepare_events([events] if isinstance(events, (m.Event, Mapping)) else list(events), idempotent)
        if not batch:
            return m.Accepted(accepted=0, event_ids=[])
        chunks = [batch[i : i + self.max_batch] for i in range(0, len(batch), self.max_batch)]
        parts = [self._run(c.op_post_events(chunk)) for chunk in chunks]
        return c.merge_accepted(parts, [len(x) for x in chunks])

    def track(self, user_id: str, item_id: str, event_type: str, **fields: Any) -> m.Accepted:
        """Posts one event now: ``client.track("alice", "item-1", "click", rec_id=recs.rec_id)``."""
        return self.post_events(m.Event(user_id, item_id, event_type, **fields))

    def batcher(self, **options: Any) -> "EventBatcher":
        """An :class:`EventBatcher` posting through this client."""
        return EventBatcher(self, **options)

    # ---- recommendations ---------------------------------------------------------------------

    def recommendations(
        self,
        user_id: str,
        *,
        k: Optional[int] = None,
        exclude: Optional[Iterable[str]] = None,
        categories: Optional[Iterable[str]] = None,
        device: Optional[str] = None,
    ) -> m.RecList:
        """The user's current list (``GET /v1/users/{id}/recommendations``)."""
        return self._run(c.op_recommendations(user_id, k, exclude, categories, device))

    def stream(
        self,
        user_id: str,
        *,
        token: TokenSource = None,
        last_event_id: Optional[str] = None,
        reconnect_delay: Optional[float] = None,
        max_reconnect_delay: float = 30.0,
        read_timeout: float = 60.0,
    ) -> "RecStream":
        """The user's lists as they change (SSE), reconnecting until closed: see :class:`RecStream`."""
        return RecStream(self, user_id, token, last_event_id, reconnect_delay, max_reconnect_delay, read_timeout)

    def subscribe(self, user_id: str, on_list: Callable[[m.RecList], Any], **options: Any) -> "Subscription":
        """Calls ``on_list`` with every new list of the user, from a thread of its own, until the
        returned :class:`Subscription` is closed. ``options`` as for :meth:`stream`, plus
        ``on_error`` (called with the exception that ended the stream)."""
        return Subscription(self.stream(user_id, **{k: v for k, v in options.items() if k != "on_error"}), on_list, options.get("on_error"))

    # ---- non-personal lists ------------------------------------------------------------------

    def popular(
        self,
        *,
        k: Optional[int] = None,
        offset: Optional[int] = None,
        category: Optional[str] = None,
        device: Optional[str] = None,
        window: Optional[str] = None,
        availability: Optional[str] = None,
    ) -> m.ItemList:
        """The most popular items (``GET /v1/popular``): in ``window`` (``1h``, ``24h``, ``7d``), for
        ``device``'s context segment now, in ``category``; a page from ``offset``. Cached by ETag."""
        return self._run(c.op_ranked("popular", k, offset, category, device, window, availability))

    def trending(
        self,
        *,
        k: Optional[int] = None,
        offset: Optional[int] = None,
        category: Optional[str] = None,
        device: Optional[str] = None,
        window: Optional[str] = None,
        availability: Optional[str] = None,
    ) -> m.ItemList:
        """The items rising most against their own baseline (``GET /v1/trending``); arguments as
        :meth:`popular`."""
        return self._run(c.op_ranked("trending", k, offset, category, device, window, availability))

    def latest_items(
        self, *, k: Optional[int] = None, offset: Optional[int] = None, category: Optional[str] = None,
        availability: Optional[str] = None,
    ) -> m.LatestItems:
        """The newest items of the catalogue (``GET /v1/items/latest``). Cached by ETag."""
        return self._run(c.op_latest_items(k, offset, category, availability))

    def similar_items(
        self, item_id: str, *, k: Optional[int] = None, offset: Optional[int] = None, category: Optional[str] = None,
        availability: Optional[str] = None,
    ) -> m.ItemList:
        """Items like ``item_id`` (``GET /v1/items/{id}/similar``). Cached by ETag."""
        return self._run(c.op_similar_items(item_id, k, offset, category, availability))

    def basket_recommendations(
        self,
        items: Iterable[str],
        *,
        event_type: Optional[str] = None,
        device: Optional[str] = None,
        k: Optional[int] = None,
        exclude: Optional[Iterable[str]] = None,
        categories: Optional[Iterable[str]] = None,
        session_id: Optional[str] = None,
    ) -> m.BasketList:
        """A list for a basket or an anonymous session (``POST /v1/recommendations``): computed now
        from ``items`` (oldest first; taken up as ``event_type``, default ``view``) and
        ``device``, without a stored user; ``session_id`` keeps an anonymous session on one
        variant during an experiment."""
        return self._run(c.op_basket(items, event_type, device, k, exclude, categories, session_id))

    # ---- catalogue ---------------------------------------------------------------------------

    def put_item(self, item_id: str, **attributes: Any) -> m.Item:
        """Puts an item: ``title``, ``categories``, ``tags``, ``created_at``, ``available``, ``expires_at``."""
        return self._run(c.op_put_item(item_id, c.item_body(**attributes)))

    def put_items(self, items: Sequence[Mapping[str, Any]]) -> m.ItemsPut:
        """Puts many items at once (each a mapping with ``item_id``), in requests of ``max_batch``."""
        created = replaced = 0
        for i in range(0, len(items), self.max_batch):
            answer = self._run(c.op_put_items(items[i : i + self.max_batch]))
            created, replaced = created + answer.created, replaced + answer.replaced
        return m.ItemsPut(created=created, replaced=replaced)

    def item(self, item_id: str) -> m.Item:
        return self._run(c.op_get_item(item_id))

    def delete_item(self, item_id: str) -> None:
        self._run(c.op_delete_item(item_id))

    def items_page(self, *, cursor: Optional[str] = None, limit: Optional[int] = None) -> m.ItemPage:
        return self._run(c.op_list_items(cursor, limit))

    def items(self, *, limit: Optional[int] = None) -> Iterator[m.Item]:
        """Every item of the catalogue, following ``next_cursor``."""
        cursor = None
        while True:
            page = self.items_page(cursor=cursor, limit=limit)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    # ---- users -------------------------------------------------------------------------------

    def merge_user(self, user_id: str, from_user: str) -> m.Merged:
        """Folds ``from_user`` (an anonymous visitor) into ``user_id``."""
        return self._run(c.op_merge(user_id, from_user))

    def export_user(self, user_id: str) -> m.Export:
        return self._run(c.op_export(user_id))

    def erase_user(self, user_id: str) -> m.Erased:
        """Erases the user everywhere (admin)."""
        return self._run(c.op_erase(user_id))

    # ---- admin -------------------------------------------------------------------------------

    def models(self) -> m.ModelsStatus:
        return self._run(c.op_models())

    def promote_version(self, name: str, *, reason: Optional[str] = None) -> Dict[str, Any]:
        """Serves registry version ``name`` for everyone."""
        return self._run(c.op_promote_version(name, reason))

    def promote(self, *, reason: Optional[str] = None) -> Dict[str, Any]:
        """Promotes the running canary (or the experiment's ``b``)."""
        return self._run(c.op_promote(reason))

    def rollback(self, *, reason: Optional[str] = None) -> Dict[str, Any]:
        return self._run(c.op_rollback(reason))

    def retrain(
        self, *, reason: Optional[str] = None, drill: Optional[str] = None, skip_gate: Optional[bool] = None
    ) -> m.RetrainStarted:
        return self._run(c.op_retrain(reason, drill, skip_gate))

    def mint_token(self, user_id: str, *, ttl_secs: Optional[int] = None) -> m.MintedToken:
        """A stream token for one user's page (admin)."""
        return self._run(c.op_mint_token(user_id, ttl_secs))

    def experiment(self) -> Optional[Dict[str, Any]]:
        """The running experiment's figures, or ``None``."""
        return self._run(c.op_experiment())

    def start_experiment(self, a: str, b: str, *, share: Optional[float] = None) -> Dict[str, Any]:
        return self._run(c.op_start_experiment(a, b, share))

    def stop_experiment(self) -> Dict[str, Any]:
        return self._run(c.op_stop_experiment())

    def monitor(self) -> Dict[str, Any]:
        """CTR by version and variant, coverage, drift (docs/monitoring.md)."""
        return self._run(c.op_monitor())

    # ---- operations --------------------------------------------------------------------------

    def health(self) -> m.Health:
        return self._run(c.op_health())

    def ready(self) -> m.Readiness:
        return self._run(c.op_ready())

    def metrics(self) -> str:
        response = self._http.get(self.base_url + "/metrics")
        response.raise_for_status()
        return response.text

    def openapi(self) -> Dict[str, Any]:
        return self._run(c.op_openapi())


def _token(source: TokenSource) -> Optional[str]:
    return source() if callable(source) else source


class RecStream:
    """A user's recommendation lists over Server-Sent Events, as an iterator.

    Yields the current list at once, then each new one. When the connection drops, the server
    restarts or shuts down, it reconnects (after the server's ``retry`` or ``reconnect_delay``,
    doubling up to ``max_reconnect_delay`` while attempts fail, at least ``Retry-After`` on a
    429), resuming with ``Last-Event-ID`` (below); a connection
    silent for ``read_timeout`` seconds (the server sends a heartbeat every
    ``stream.heartbeat_secs``, 15 by default) counts as dropped. It never yields a list older
    than one it yielded (see :meth:`StreamState.accept`).

    ``Last-Event-ID`` (the id of the last list received) is sent on every reconnection: the
    server that sent it does not repeat that list; another server process (an embedded server
    since restarted, which numbers its lists from 1 again, or another instance) does not know the
    id and sends its current list, which the stream drops if it is a repeat (same ``rec_id``).

    ``token`` is a stream token or a function returning a fresh one: it is called again when the
    token expires (``event: token_expired``) or is refused (401). Errors that retrying cannot fix
    (400, 401 without a token function, 403) are raised; ``event: erased`` raises
    :class:`StreamEnded`. :meth:`close` (from any thread) ends the iteration.
    """

    def __init__(self, client: Client, user_id: str, token: TokenSource, last_event_id: Optional[str],
                 reconnect_delay: Optional[float], max_reconnect_delay: float, read_timeout: float) -> None:
        self._client = client
        self.user_id = user_id
        self._token_source = token
        self._state = c.StreamState(
            reconnect_delay, max_reconnect_delay, last_event_id=last_event_id
        )
        self._read_timeout = read_timeout
        self._closed = threading.Event()
        self._response: Optional[httpx.Response] = None
        self._lock = threading.Lock()

    @property
    def last(self) -> Optional[m.RecList]:
        """The newest list yielded."""
        return self._state.last

    @property
    def last_event_id(self) -> Optional[str]:
        """The id of the last list received (sent as ``Last-Event-ID`` when reconnecting; pass it
        as ``last_event_id=`` to a new stream to skip the list it names)."""
        return self._state.last_event_id

    @property
    def reconnects(self) -> int:
        """Connections made after the first."""
        return self._state.reconnects

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            response = self._response
        if response is not None:
            # Closing a response does not wake a thread blocked reading its socket; shutting the
            # socket down does (the read ends at once rather than at the next heartbeat).
            stream = response.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            try:
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
                response.close()
            except Exception:  # closing from another thread may race the reader: it stops anyway
                pass

    def __enter__(self) -> "RecStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _wait(self, seconds: float) -> None:
        self._closed.wait(seconds)

    def __iter__(self) -> Iterator[m.RecList]:
        client, state = self._client, self._state
        url = f"{client.base_url}/v1/users/{c.seg(self.user_id)}/recommendations/stream"
        token = _token(self._token_source)
        refreshed = False
        while not self._closed.is_set():
            timeout = httpx.Timeout(client.timeout, read=self._read_timeout)
            headers = {**client._headers(token), **state.headers()}
            try:
                with client._http.stream("GET", url, headers=headers, timeout=timeout) as response:
                    with self._lock:
                        self._response = response
                    if self._closed.is_set():  # close() came while connecting
                        return
                    if response.status_code != 200:
                        error = c.api_error(response.status_code, response.headers, response.read())
                        if error.status == 401 and callable(self._token_source) and not refreshed:
                            token, refreshed = _token(self._token_source), True
                            continue
                        if error.status in (429, 503) or error.status >= 500:
                            self._wait(state.next_delay(error.retry_after))
                            continue
                        raise error
                    state.connected()
                    refreshed = False
                    first = True
                    decoder = c.SseDecoder()
                    for line in response.iter_lines():
                        msg = decoder.line(line)
                        if decoder.retry_ms is not None:
                            state.server_retry = decoder.retry_ms / 1000
                        if msg is None:
                            continue
                        if msg.event == "recommendations":
                            recs = c.decode_list(msg)
                            if msg.id is not None:
                                state.last_event_id = msg.id
                            accepted = state.accept(recs, first)
                            first = False
                            if accepted:
                                yield recs
                        elif msg.event == "token_expired":
                            if not callable(self._token_source):
                                raise LiverecError("the stream token expired; pass a function as token to refresh it")
                            token, refreshed = _token(self._token_source), True
                            break
                        elif msg.event == "erased":
                            raise StreamEnded("erased")
                        if self._closed.is_set():
                            return
            except Exception as error:
                if self._closed.is_set():
                    return  # close() from another thread may break the read in any way
                if not isinstance(error, (httpx.TransportError, httpx.StreamError)):
                    raise
                log.debug("stream of %s dropped: %r", self.user_id, error)
            finally:
                with self._lock:
                    self._response = None
            if self._closed.is_set():
                return
            if not refreshed:
                self._wait(state.next_delay())


class Subscription:
    """A :class:`RecStream` read by a thread of its own, calling ``on_list`` for each list."""

    def __init__(self, stream: RecStream, on_list: Callable[[m.RecList], Any],
                 on_error: Optional[Callable[[BaseException], Any]] = None) -> None:
        self.stream = stream
        self.error: Optional[BaseException] = None
        self._on_list, self._on_error = on_list, on_error
        self._thread = threading.Thread(target=self._run, name=f"liverec-stream-{stream.user_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for recs in self.stream:
                self._on_list(recs)
        except BaseException as error:  # reported, not lost with the thread
            self.error = error
            if self._on_error is not None:
                self._on_error(error)
            else:
                log.warning("stream of %s ended: %s", self.stream.user_id, error)

    def close(self, timeout: Optional[float] = 10.0) -> None:
        """Stops the stream and waits for the thread."""
        self.stream.close()
        if threading.current_thread() is not self._thread:  # on_list may close its own subscription
            self._thread.join(timeout)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class EventBatcher:
    """Collects events and posts them in batches from a thread of its own.

    :meth:`track` returns at once; a batch goes out when ``batch_size`` events wait, or
    ``flush_interval`` seconds after the first of them, or on :meth:`flush` / :meth:`close`
    (also at the end of a ``with`` block). Each event gets an ``event_id`` first, so retries (the
    client's :class:`RetryPolicy`: 429 and 503 with ``Retry-After``, connection errors) apply it
    once. At most ``max_pending`` events wait: :meth:`track` then blocks until a batch is sent
    (backpressure rather than unbounded memory). A batch that still fails is passed to
    ``on_error(error, events)`` (default: logged) and dropped.
    """

    def __init__(self, client: Client, *, batch_size: int = 100, flush_interval: float = 1.0, max_pending: int = 10_000,
                 on_error: Optional[Callable[[BaseException, List[Dict[str, Any]]], Any]] = None) -> None:
        self._client = client
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self._on_error = on_error
        self._pending: List[Dict[str, Any]] = []
        self._cond = threading.Condition()
        self._first_at: Optional[float] = None
        self._in_flight = 0
        self._closed = False
        #: Events accepted by the server so far, and the ids it returned.
        self.accepted = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="liverec-batcher", daemon=True)
        self._thread.start()

    def track(self, event: m.EventLike, timeout: Optional[float] = None) -> str:
        """Queues one event; returns its ``event_id``. Raises ``TimeoutError`` if the queue stays
        full for ``timeout`` seconds (``None``: wait as long as it takes)."""
        e = c.prepare_events([event], True)[0]
        with self._cond:
            if self._closed:
                raise LiverecError("the batcher is closed")
            if not self._cond.wait_for(lambda: len(self._pending) < self.max_pending or self._closed, timeout):
                raise TimeoutError("the event batcher's queue stayed full")
            self._pending.append(e)
            if self._first_at is None:
                self._first_at = time.monotonic()
            self._cond.notify_all()
        return e["event_id"]

    def flush(self, timeout: Optional[float] = None) -> None:
        """Sends what waits now and returns once every event queued before has been sent (or
        failed)."""
        with self._cond:
            self._first_at = float("-inf") if self._pending else self._first_at
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: not self._pending and not self._in_flight, timeout):
                raise TimeoutError("events still pending")

    def close(self, timeout: Optional[float] = None) -> None:
        """Flushes and stops the thread."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> "EventBatcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _due(self) -> bool:
        if not self._pending:
            return False
        return len(self._pending) >= self.batch_size or time.monotonic() - (self._first_at or 0) >= self.flush_interval

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due():
                    if self._closed and not self._pending:
                        return
                    wait = None if self._first_at is None else max(0.0, self._first_at + self.flush_interval - time.monotonic())
                    self._cond.wait(wait)
                batch, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size :]
                # More than a batch was waiting: send the rest right after.
                self._first_at = float("-inf") if self._pending else None
                self._in_flight = len(batch)
                self._cond.notify_all()
            try:
                answer = self._client.post_events(batch)
                self.accepted += answer.accepted
            except Exception as error:
                self.failed += len(batch)
                if self._on_error is not None:
                    self._on_error(error, batch)
                else:
                    log.error("dropped %d events after retries: %s", len(batch), error)
            finally:
                with self._cond:
                    self._in_flight = 0
                    self._cond.notify_all()
