"""The asyncio client: :class:`AsyncClient`, :class:`AsyncRecStream` and :class:`AsyncEventBatcher`.
The same calls as :class:`liverec_client.Client`, awaited."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import httpx

from . import _core as c
from . import models as m
from .errors import LiverecError, StreamEnded

log = logging.getLogger("liverec_client")

AsyncTokenSource = Union[str, Callable[[], Union[str, Awaitable[str]]], None]


class AsyncClient:
    """A liverec server, over HTTP, for asyncio. Arguments as for :class:`liverec_client.Client`;
    ``async with AsyncClient(...) as client`` or ``await client.aclose()``."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        *,
        api_key: Optional[str] = None,
        timeout: float = 10.0,
        retry: Optional[c.RetryPolicy] = None,
        max_batch: int = 1000,
        cache_size: int = 256,
        http: Optional[httpx.AsyncClient] = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retry = retry or c.RetryPolicy()
        self.max_batch = max_batch
        #: Public lists (popular, trending, latest, similar) with their ETags: asked again
        #: with If-None-Match, a 304 answers from here. ``cache_size=0`` turns it off.
        self.cache = c.AnswerCache(cache_size)
        self._http = http or httpx.AsyncClient(timeout=timeout, headers={"user-agent": c.USER_AGENT})
        self._own_http = http is None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    def _headers(self, token: Optional[str] = None) -> Dict[str, str]:
        credential = token or self.api_key
        return {"authorization": f"Bearer {credential}"} if credential else {}

    async def _run(self, call: c.Call) -> Any:
        attempt = 0
        while True:
            attempt += 1
            conditional = self.cache.headers(call)
            try:
                response = await self._http.request(
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
                await asyncio.sleep(delay)
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
            await asyncio.sleep(delay)

    async def request(self, method: str, path: str, *, params: Optional[Dict[str, Any]] = None, json: Any = None) -> Any:
        return await self._run(c.Call(method.upper(), path, params=params, json=json))

    # ---- events ------------------------------------------------------------------------------

    async def post_events(self, events: Union[m.EventLike, Sequence[m.EventLike]], *, idempotent: bool = True) -> m.Accepted:
        batch = c.prepare_events([events] if isinstance(events, (m.Event, Mapping)) else list(events), idempotent)
        if not batch:
            return m.Accepted(accepted=0, event_ids=[])
        chunks = [batch[i : i + self.max_batch] for i in range(0, len(batch), self.max_batch)]
        parts = [await self._run(c.op_post_events(chunk)) for chunk in chunks]
        return c.merge_accepted(parts, [len(x) for x in chunks])

    async def track(self, user_id: str, item_id: str, event_type: str, **fields: Any) -> m.Accepted:
        return await self.post_events(m.Event(user_id, item_id, event_type, **fields))

    def batcher(self, **options: Any) -> "AsyncEventBatcher":
        return AsyncEventBatcher(self, **options)

    # ---- recommendations ---------------------------------------------------------------------

    async def recommendations(
        self,
        user_id: str,
        *,
        k: Optional[int] = None,
        exclude: Optional[Iterable[str]] = None,
        categories: Optional[Iterable[str]] = None,
        device: Optional[str] = None,
    ) -> m.RecList:
        return await self._run(c.op_recommendations(user_id, k, exclude, categories, device))

    def stream(
        self,
        user_id: str,
        *,
        token: AsyncTokenSource = None,
        last_event_id: Optional[str] = None,
        reconnect_delay: Optional[float] = None,
        max_reconnect_delay: float = 30.0,
        read_timeout: float = 60.0,
    ) -> "AsyncRecStream":
        """``async for recs in client.stream("alice")``: see :class:`AsyncRecStream`."""
        return AsyncRecStream(self, user_id, token, last_event_id, reconnect_delay, max_reconnect_delay, read_timeout)

    def subscribe(self, user_id: str, on_list: Callable[[m.RecList], Any], **options: Any) -> "asyncio.Task[None]":
        """Calls ``on_list`` (a function or a coroutine function) with every new list, in a task;
        cancel the task to stop. ``options`` as for :meth:`stream`."""
        stream = self.stream(user_id, **options)

        async def run() -> None:
            try:
                async for recs in stream:
                    result = on_list(recs)
                    if inspect.isawaitable(result):
                        await result
            finally:
                await stream.aclose()

        return asyncio.ensure_future(run())

    # ---- non-personal lists ------------------------------------------------------------------

    async def popular(
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
        return await self._run(c.op_ranked("popular", k, offset, category, device, window, availability))

    async def trending(
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
        return await self._run(c.op_ranked("trending", k, offset, category, device, window, availability))

    async def latest_items(
        self, *, k: Optional[int] = None, offset: Optional[int] = None, category: Optional[str] = None,
        availability: Optional[str] = None,
    ) -> m.LatestItems:
        """The newest items of the catalogue (``GET /v1/items/latest``). Cached by ETag."""
        return await self._run(c.op_latest_items(k, offset, category, availability))

    async def similar_items(
        self, item_id: str, *, k: Optional[int] = None, offset: Optional[int] = None, category: Optional[str] = None,
        availability: Optional[str] = None,
    ) -> m.ItemList:
        """Items like ``item_id`` (``GET /v1/items/{id}/similar``). Cached by ETag."""
        return await self._run(c.op_similar_items(item_id, k, offset, category, availability))

    async def basket_recommendations(
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
        return await self._run(c.op_basket(items, event_type, device, k, exclude, categories, session_id))

    # ---- catalogue ---------------------------------------------------------------------------

    async def put_item(self, item_id: str, **attributes: Any) -> m.Item:
        return await self._run(c.op_put_item(item_id, c.item_body(**attributes)))

    async def put_items(self, items: Sequence[Mapping[str, Any]]) -> m.ItemsPut:
        created = replaced = 0
        for i in range(0, len(items), self.max_batch):
            answer = await self._run(c.op_put_items(items[i : i + self.max_batch]))
            created, replaced = created + answer.created, replaced + answer.replaced
        return m.ItemsPut(created=created, replaced=replaced)

    async def item(self, item_id: str) -> m.Item:
        return await self._run(c.op_get_item(item_id))

    async def delete_item(self, item_id: str) -> None:
        await self._run(c.op_delete_item(item_id))

    async def items_page(self, *, cursor: Optional[str] = None, limit: Optional[int] = None) -> m.ItemPage:
        return await self._run(c.op_list_items(cursor, limit))

    async def items(self, *, limit: Optional[int] = None) -> AsyncIterator[m.Item]:
        cursor = None
        while True:
            page = await self.items_page(cursor=cursor, limit=limit)
            for item in page.items:
                yield item
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    # ---- users -------------------------------------------------------------------------------

    async def merge_user(self, user_id: str, from_user: str) -> m.Merged:
        return await self._run(c.op_merge(user_id, from_user))

    async def export_user(self, user_id: str) -> m.Export:
        return await self._run(c.op_export(user_id))

    async def erase_user(self, user_id: str) -> m.Erased:
        return await self._run(c.op_erase(user_id))

    # ---- admin -------------------------------------------------------------------------------

    async def models(self) -> m.ModelsStatus:
        return await self._run(c.op_models())

    async def promote_version(self, name: str, *, reason: Optional[str] = None) -> Dict[str, Any]:
        return await self._run(c.op_promote_version(name, reason))

    async def promote(self, *, reason: Optional[str] = None) -> Dict[str, Any]:
        return await self._run(c.op_promote(reason))

    async def rollback(self, *, reason: Optional[str] = None) -> Dict[str, Any]:
        return await self._run(c.op_rollback(reason))

    async def retrain(
        self, *, reason: Optional[str] = None, drill: Optional[str] = None, skip_gate: Optional[bool] = None
    ) -> m.RetrainStarted:
        return await self._run(c.op_retrain(reason, drill, skip_gate))

    async def mint_token(self, user_id: str, *, ttl_secs: Optional[int] = None) -> m.MintedToken:
        return await self._run(c.op_mint_token(user_id, ttl_secs))

    async def experiment(self) -> Optional[Dict[str, Any]]:
        return await self._run(c.op_experiment())

    async def start_experiment(self, a: str, b: str, *, share: Optional[float] = None) -> Dict[str, Any]:
        return await self._run(c.op_start_experiment(a, b, share))

    async def stop_experiment(self) -> Dict[str, Any]:
        return await self._run(c.op_stop_experiment())

    async def monitor(self) -> Dict[str, Any]:
        return await self._run(c.op_monitor())

    # ---- operations --------------------------------------------------------------------------

    async def health(self) -> m.Health:
        return await self._run(c.op_health())

    async def ready(self) -> m.Readiness:
        return await self._run(c.op_ready())

    async def metrics(self) -> str:
        response = await self._http.get(self.base_url + "/metrics")
        response.raise_for_status()
        return response.text

    async def openapi(self) -> Dict[str, Any]:
        return await self._run(c.op_openapi())


async def _token(source: AsyncTokenSource) -> Optional[str]:
    if callable(source):
        value = source()
        return await value if inspect.isawaitable(value) else value
    return source


class AsyncRecStream:
    """A user's lists over Server-Sent Events as an async iterator; behaves as
    :class:`liverec_client.RecStream` (reconnects, resuming with ``Last-Event-ID``,
    refreshes tokens, never an older list after a newer one). ``token`` may be a coroutine function. Stop with
    :meth:`aclose` or by leaving the ``async for``."""

    def __init__(self, client: AsyncClient, user_id: str, token: AsyncTokenSource, last_event_id: Optional[str],
                 reconnect_delay: Optional[float], max_reconnect_delay: float, read_timeout: float) -> None:
        self._client = client
        self.user_id = user_id
        self._token_source = token
        self._state = c.StreamState(
            reconnect_delay, max_reconnect_delay, last_event_id=last_event_id
        )
        self._read_timeout = read_timeout
        self._closed = asyncio.Event()
        self._gen: Optional[AsyncIterator[m.RecList]] = None

    @property
    def last(self) -> Optional[m.RecList]:
        return self._state.last

    @property
    def last_event_id(self) -> Optional[str]:
        """The id of the last list received (sent as ``Last-Event-ID`` when reconnecting; pass it
        as ``last_event_id=`` to a new stream to skip the list it names)."""
        return self._state.last_event_id

    @property
    def reconnects(self) -> int:
        return self._state.reconnects

    def __aiter__(self) -> AsyncIterator[m.RecList]:
        if self._gen is None:
            self._gen = self._lists()
        return self._gen

    async def __anext__(self) -> m.RecList:
        return await self.__aiter__().__anext__()

    async def aclose(self) -> None:
        self._closed.set()
        gen = self._gen
        # A generator suspended at a `yield` ends now; one reading in another task (cancel that
        # task to stop it at once) ends at its next line.
        if gen is not None and not getattr(gen, "ag_running", False):
            await gen.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> "AsyncRecStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _wait(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._closed.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _lists(self) -> AsyncIterator[m.RecList]:
        client, state = self._client, self._state
        url = f"{client.base_url}/v1/users/{c.seg(self.user_id)}/recommendations/stream"
        token = await _token(self._token_source)
        refreshed = False
        while not self._closed.is_set():
            timeout = httpx.Timeout(client.timeout, read=self._read_timeout)
            headers = {**client._headers(token), **state.headers()}
            try:
                async with client._http.stream("GET", url, headers=headers, timeout=timeout) as response:
                    if response.status_code != 200:
                        error = c.api_error(response.status_code, response.headers, await response.aread())
                        if error.status == 401 and callable(self._token_source) and not refreshed:
                            token, refreshed = await _token(self._token_source), True
                            continue
                        if error.status in (429, 503) or error.status >= 500:
                            await self._wait(state.next_delay(error.retry_after))
                            continue
                        raise error
                    state.connected()
                    refreshed = False
                    first = True
                    decoder = c.SseDecoder()
                    async for line in response.aiter_lines():
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
                            token, refreshed = await _token(self._token_source), True
                            break
                        elif msg.event == "erased":
                            raise StreamEnded("erased")
            except (httpx.TransportError, httpx.StreamError) as error:
                log.debug("stream of %s dropped: %r", self.user_id, error)
            if self._closed.is_set():
                return
            if not refreshed:
                await self._wait(state.next_delay())


class AsyncEventBatcher:
    """:class:`liverec_client.EventBatcher` for asyncio: ``await batcher.track(event)`` queues
    (waiting while ``max_pending`` events wait), a task posts batches of ``batch_size`` or every
    ``flush_interval`` seconds; ``await batcher.flush()``, ``await batcher.aclose()`` or
    ``async with``. Create it inside a running event loop."""

    def __init__(self, client: AsyncClient, *, batch_size: int = 100, flush_interval: float = 1.0, max_pending: int = 10_000,
                 on_error: Optional[Callable[[BaseException, List[Dict[str, Any]]], Any]] = None) -> None:
        self._client = client
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self._on_error = on_error
        self._pending: List[Dict[str, Any]] = []
        self._cond = asyncio.Condition()
        self._first_at: Optional[float] = None
        self._in_flight = 0
        self._closed = False
        self.accepted = 0
        self.failed = 0
        self._task = asyncio.ensure_future(self._run())

    async def track(self, event: m.EventLike) -> str:
        e = c.prepare_events([event], True)[0]
        async with self._cond:
            if self._closed:
                raise LiverecError("the batcher is closed")
            await self._cond.wait_for(lambda: len(self._pending) < self.max_pending or self._closed)
            self._pending.append(e)
            if self._first_at is None:
                self._first_at = time.monotonic()
            self._cond.notify_all()
        return e["event_id"]

    async def flush(self) -> None:
        async with self._cond:
            if self._pending:
                self._first_at = float("-inf")
            self._cond.notify_all()
            await self._cond.wait_for(lambda: not self._pending and not self._in_flight)

    async def aclose(self) -> None:
        await self.flush()
        async with self._cond:
            self._closed = True
            self._cond.notify_all()
        await self._task

    async def __aenter__(self) -> "AsyncEventBatcher":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def _due(self) -> bool:
        if not self._pending:
            return False
        return len(self._pending) >= self.batch_size or time.monotonic() - (self._first_at or 0) >= self.flush_interval

    async def _run(self) -> None:
        while True:
            async with self._cond:
                while not self._due():
                    if self._closed and not self._pending:
                        return
                    if self._first_at is None:
                        await self._cond.wait()
                    else:
                        wait = max(0.0, self._first_at + self.flush_interval - time.monotonic())
                        try:
                            await asyncio.wait_for(self._cond.wait(), wait)
                        except asyncio.TimeoutError:
                            pass
                batch, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size :]
                self._first_at = float("-inf") if self._pending else None
                self._in_flight = len(batch)
                self._cond.notify_all()
            try:
                answer = await self._client.post_events(batch)
                self.accepted += answer.accepted
            except Exception as error:
                self.failed += len(batch)
                if self._on_error is not None:
                    self._on_error(error, batch)
                else:
                    log.error("dropped %d events after retries: %s", len(batch), error)
            finally:
                async with self._cond:
                    self._in_flight = 0
                    self._cond.notify_all()
