"""Python client for liverec, the real-time recommendation server that pushes.

    from liverec_client import Client

    with Client("http://127.0.0.1:8080") as client:
        client.track("alice", "item-0003", "click")
        print(client.recommendations("alice", k=5).item_ids)
        for recs in client.stream("alice"):       # the current list, then each new one
            print(recs.seq, recs.item_ids)

:class:`AsyncClient` (``liverec_client.aio``) offers the same calls for asyncio. API reference:
docs/clients/python.md in the liverec repository.
"""

from ._core import NO_RETRY, RetryPolicy
from .aio import AsyncClient, AsyncEventBatcher, AsyncRecStream
from .client import Client, EventBatcher, RecStream, Subscription
from .errors import ApiError, LiverecError, StreamEnded
from .models import (
    DEVICES,
    EVENT_TYPES,
    Accepted,
    BasketList,
    Context,
    Erased,
    Event,
    Export,
    Health,
    Item,
    ItemList,
    ItemPage,
    ItemsPut,
    LatestItems,
    Merged,
    MintedToken,
    ModelsStatus,
    ModelVersion,
    Readiness,
    RecItem,
    RecList,
    RetrainStarted,
    uuid7,
)

__version__ = "0.1.0"

__all__ = [
    "Accepted", "ApiError", "BasketList", "ItemList", "LatestItems", "AsyncClient", "AsyncEventBatcher", "AsyncRecStream", "Client", "Context",
    "DEVICES", "EVENT_TYPES", "Erased", "Event", "EventBatcher", "Export", "Health", "Item", "ItemPage",
    "ItemsPut", "LiverecError", "Merged", "MintedToken", "ModelVersion", "ModelsStatus", "NO_RETRY",
    "Readiness", "RecItem", "RecList", "RecStream", "RetrainStarted", "RetryPolicy", "StreamEnded",
    "Subscription", "uuid7",
]
