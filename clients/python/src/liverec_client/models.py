"""Typed requests and answers of the liverec HTTP API.

Each dataclass mirrors one schema of the server's OpenAPI document (``GET /openapi.json``): the
field names are the document's (``Merged.from_user`` is its ``from``, a Python keyword), and the
test suite checks them against a running server's document. Answers are decoded leniently:
fields the server adds later are ignored, so an older client keeps working against a newer
server.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

#: Event types the server accepts (``EventType``).
EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "rating", "dwell", "dislike", "hide")
#: Device classes (``Device``).
DEVICES = ("mobile", "desktop", "tablet", "tv", "other")


def _pick(cls, data: Mapping[str, Any], **rename: str) -> Dict[str, Any]:
    """The entries of ``data`` that are fields of ``cls`` (``rename``: field -> JSON name)."""
    out = {}
    for f in fields(cls):
        key = rename.get(f.name, f.name)
        if key in data:
            out[f.name] = data[key]
    return out


class _Decoded:
    """Decoding from the server's JSON: the fields of the dataclass that the answer holds (others
    are ignored), lists of nested dataclasses decoded too."""

    _nested: ClassVar[Dict[str, Any]] = {}
    """Field -> the dataclass of its list's elements."""
    _renamed: ClassVar[Dict[str, str]] = {}
    """Field -> its JSON name."""
    _lists: ClassVar[Tuple[str, ...]] = ()
    """Fields where a missing or null list is an empty one."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        d = _pick(cls, data, **cls._renamed)
        for name, kind in cls._nested.items():
            d[name] = [kind.from_dict(x) for x in d.get(name) or []]
        for name in cls._lists:
            d[name] = d.get(name) or []
        return cls(**d)


def uuid7() -> str:
    """A UUID version 7 (time-ordered, as the server assigns): used as an event's idempotency key."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80  # unix_ts_ms
    value |= 0x7 << 76  # version
    value |= ((rand >> 68) & 0xFFF) << 64  # rand_a
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass
class Context:
    """Request context sent with an event (``ContextIn``); what it leaves out keeps its value."""

    device: Optional[str] = None
    """``mobile``, ``desktop``, ``tablet``, ``tv`` or ``other``."""
    country: Optional[str] = None
    """ISO 3166 code, letters only."""
    attributes: Optional[Dict[str, str]] = None
    """A small free-form map."""

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in (("device", self.device), ("country", self.country), ("attributes", self.attributes)) if v is not None}


@dataclass
class Event:
    """One interaction (``EventIn``; JSON Schema in schemas/event.schema.json)."""

    user_id: str
    item_id: str
    event_type: str
    """One of :data:`EVENT_TYPES`."""
    value: Optional[float] = None
    """Rating, dwell seconds or amount."""
    timestamp: Optional[int] = None
    """Milliseconds since the epoch; the server's time when absent."""
    event_id: Optional[str] = None
    """Idempotency key. The batchers and :meth:`Client.post_events` with ``idempotent=True`` set a
    UUID v7 when absent, so that a retried batch is applied once."""
    rec_id: Optional[str] = None
    """The list this event responds to (click attribution)."""
    context: Optional[Union[Context, Dict[str, Any]]] = None

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"user_id": self.user_id, "item_id": self.item_id, "event_type": self.event_type}
        for name in ("value", "timestamp", "event_id", "rec_id"):
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        if self.context is not None:
            out["context"] = self.context.to_dict() if isinstance(self.context, Context) else dict(self.context)
        return out


EventLike = Union[Event, Mapping[str, Any]]


def event_dict(event: EventLike) -> Dict[str, Any]:
    """An event as the JSON object the server takes (an :class:`Event` or a mapping)."""
    return event.to_dict() if isinstance(event, Event) else dict(event)


@dataclass
class Accepted(_Decoded):
    """The answer to ``POST /v1/events`` (``Accepted``)."""

    accepted: int
    """Events accepted: the batch less those in ``erased``."""
    event_ids: List[str]
    """One id per event of the request, in order."""
    erased: List[int] = field(default_factory=list)
    """Indexes of events refused because their user was erased after them."""

    _lists = ("erased",)


@dataclass
class RecItem(_Decoded):
    """One recommended item (``RecItem``)."""

    item_id: str
    score: float



@dataclass
class RecList(_Decoded):
    """One recommendation list (``RecList``): answered by ``GET …/recommendations`` and pushed on
    streams. Send ``rec_id`` back on the events it leads to."""

    rec_id: str
    user_id: str
    model_version: str
    generated_at: int
    """Milliseconds since the epoch."""
    seq: int
    """Per-user number of pushed lists; the SSE event id."""
    items: List[RecItem]
    last_event_id: Optional[str] = None
    """The newest event of the user the list reflects."""
    variant: Optional[str] = None
    """``control``, ``canary``, ``a`` or ``b``."""

    _nested = {"items": RecItem}

    @property
    def item_ids(self) -> List[str]:
        return [i.item_id for i in self.items]


@dataclass
class Item(_Decoded):
    """A catalogue item as the server shows it (``ItemView``)."""

    item_id: str
    categories: List[str]
    tags: List[str]
    in_catalog: bool
    """False for an item known only from events."""
    available: bool
    """Whether lists may show it now."""
    title: Optional[str] = None
    created_at: Optional[int] = None
    expires_at: Optional[int] = None



@dataclass
class ItemPage(_Decoded):
    """One page of the catalogue (``ItemPage``)."""

    items: List[Item]
    next_cursor: Optional[str] = None
    """Pass as ``cursor`` for the next page; ``None`` at the end."""

    _nested = {"items": Item}


@dataclass
class ItemsPut(_Decoded):
    """The answer to ``PUT /v1/items`` (``ItemsPut``)."""

    created: int
    replaced: int



@dataclass
class Merged(_Decoded):
    """The answer to ``POST /v1/users/{id}/merge`` (``Merged``)."""

    user_id: str
    from_user: str
    """The JSON field ``from``."""
    moved: int
    merged: Optional[int] = None
    duplicates: Optional[int] = None

    _renamed = {"from_user": "from"}


@dataclass
class Erased(_Decoded):
    """The answer to ``DELETE /v1/users/{id}`` (``Erased``)."""

    user_id: str
    erased_at: int
    subscriptions_closed: int
    events_removed_from_log: int



@dataclass
class Export(_Decoded):
    """Everything stored about a user (``Export``)."""

    user_id: str
    profile: Dict[str, Any]



@dataclass
class MintedToken(_Decoded):
    """A per-user stream token (``MintedToken``)."""

    token: str
    user_id: str
    expires_in: int
    """Seconds until it expires."""



@dataclass
class Health(_Decoded):
    """``GET /healthz`` (``Health``)."""

    status: str



@dataclass
class Readiness(_Decoded):
    """``GET /readyz`` (``Readiness``); a ``503`` (shutting down, loading) is returned, not raised."""

    status: str
    """``ready``, ``shutting_down``, ``loading_catalog`` or ``loading_serving_version``."""
    bus: str
    store: str
    durable: bool
    degraded: bool
    degraded_reasons: List[str]
    catalog_items: int
    users: int
    kafka_partitions: List[int]


    @property
    def ready(self) -> bool:
        return self.status == "ready"


@dataclass
class ModelVersion(_Decoded):
    """One registry version in :class:`ModelsStatus`."""

    name: str
    status: str
    """``serving``, ``canary``, ``experiment_b``, ``rolled_back`` or ``available``."""
    version: Optional[str] = None
    created_at: Optional[str] = None
    metrics: Optional[Dict[str, Any]] = None



@dataclass
class ModelsStatus(_Decoded):
    """``GET /v1/admin/models``: the registry and the closed loop (docs/monitoring.md). The nested
    documents (traffic, runs, history, ...) are plain dicts; ``raw`` is the whole answer."""

    serving: str
    state: str
    """``idle``, ``waiting_for_data``, ``training``, ``canary`` or ``experiment``."""
    versions: List[ModelVersion]
    serving_name: Optional[str] = None
    kind: Optional[str] = None
    registry_dir: Optional[str] = None
    registry_url: Optional[str] = None
    traffic: Optional[Dict[str, Any]] = None
    canary: Optional[Dict[str, Any]] = None
    experiment: Optional[Dict[str, Any]] = None
    training: Optional[Dict[str, Any]] = None
    previous: Optional[Dict[str, Any]] = None
    runs: List[Dict[str, Any]] = field(default_factory=list)
    """Newest first."""
    history: List[Dict[str, Any]] = field(default_factory=list)
    """Newest first."""
    settings: Optional[Dict[str, Any]] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    _nested = {"versions": ModelVersion}
    _lists = ("runs", "history")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelsStatus":
        status = super().from_dict({k: v for k, v in data.items() if k != "raw"})
        status.raw = dict(data)
        return status


@dataclass
class RetrainStarted(_Decoded):
    """The answer to ``POST /v1/admin/retrain``."""

    run: int
    coalesced: bool
    """True when the request joined a run already waiting, training or in canary."""



@dataclass
class ItemList(_Decoded):
    """A non-personal list (``ItemList``): popular, trending or similar items, the same for
    every caller and cacheable (``Cache-Control: public``, ``ETag``)."""

    kind: str
    """``popular``, ``trending`` or ``similar``."""
    availability: str
    """``available``, ``unavailable`` or ``any``: which items it shows."""
    offset: int
    """The position of the first item in the whole list."""
    items: List[RecItem]
    window: Optional[str] = None
    """``1h``, ``24h`` or ``7d`` (popular and trending)."""
    segment: Optional[str] = None
    """``all`` or ``<device>/<part of the day>`` (popular and trending)."""
    item_id: Optional[str] = None
    """The item the list is like (similar)."""
    model_version: Optional[str] = None
    category: Optional[str] = None
    next_offset: Optional[int] = None
    """Pass as ``offset`` for the next page; ``None`` at the end."""

    _nested = {"items": RecItem}

    @property
    def item_ids(self) -> List[str]:
        return [i.item_id for i in self.items]


@dataclass
class LatestItems(_Decoded):
    """The newest items of the catalogue (``LatestItems``)."""

    availability: str
    offset: int
    items: List[Item]
    category: Optional[str] = None
    next_offset: Optional[int] = None

    _nested = {"items": Item}


@dataclass
class BasketList(_Decoded):
    """The list for a basket or an anonymous session (``BasketList``): computed now, nothing kept."""

    model_version: str
    variant: str
    generated_at: int
    items: List[RecItem]

    _nested = {"items": RecItem}

    @property
    def item_ids(self) -> List[str]:
        return [i.item_id for i in self.items]
