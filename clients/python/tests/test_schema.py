"""The typed models and the client's calls against the server's own OpenAPI document: a field or
an operation the server adds, renames or drops fails here until the client follows."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Dict, Tuple

import pytest

import liverec_client as lc
from liverec_client import Client

# Dataclass -> (schema name, JSON names of renamed fields, fields the client adds).
MODELS: Dict[type, Tuple[str, Dict[str, str], Tuple[str, ...]]] = {
    lc.Accepted: ("Accepted", {}, ()),
    lc.RecItem: ("RecItem", {}, ()),
    lc.RecList: ("RecList", {}, ()),
    lc.Item: ("ItemView", {}, ()),
    lc.ItemPage: ("ItemPage", {}, ()),
    lc.ItemsPut: ("ItemsPut", {}, ()),
    lc.Merged: ("Merged", {"from_user": "from"}, ()),
    lc.Erased: ("Erased", {}, ()),
    lc.Export: ("Export", {}, ()),
    lc.MintedToken: ("MintedToken", {}, ()),
    lc.Health: ("Health", {}, ()),
    lc.Readiness: ("Readiness", {}, ()),
    lc.Event: ("EventIn", {}, ()),
    lc.Context: ("ContextIn", {}, ()),
    lc.ItemList: ("ItemList", {}, ()),
    lc.LatestItems: ("LatestItems", {}, ()),
    lc.BasketList: ("BasketList", {}, ()),
}

# Every operation of the document, and the Client method that makes it.
OPERATIONS = {
    ("GET", "/healthz"): "health",
    ("GET", "/readyz"): "ready",
    ("GET", "/metrics"): "metrics",
    ("GET", "/openapi.json"): "openapi",
    ("POST", "/v1/events"): "post_events",
    ("GET", "/v1/users/{user_id}/recommendations"): "recommendations",
    ("GET", "/v1/users/{user_id}/recommendations/stream"): "stream",
    ("GET", "/v1/ws"): None,  # the WebSocket: streams use SSE, events REST
    ("GET", "/v1/items"): "items_page",
    ("PUT", "/v1/items"): "put_items",
    ("GET", "/v1/items/{item_id}"): "item",
    ("PUT", "/v1/items/{item_id}"): "put_item",
    ("DELETE", "/v1/items/{item_id}"): "delete_item",
    ("POST", "/v1/users/{user_id}/merge"): "merge_user",
    ("GET", "/v1/users/{user_id}/export"): "export_user",
    ("DELETE", "/v1/users/{user_id}"): "erase_user",
    ("GET", "/v1/admin/models"): "models",
    ("POST", "/v1/admin/models/{name}/promote"): "promote_version",
    ("POST", "/v1/admin/promote"): "promote",
    ("POST", "/v1/admin/rollback"): "rollback",
    ("POST", "/v1/admin/retrain"): "retrain",
    ("POST", "/v1/admin/tokens"): "mint_token",
    ("GET", "/v1/admin/experiments"): "experiment",
    ("POST", "/v1/admin/experiments"): "start_experiment",
    ("DELETE", "/v1/admin/experiments"): "stop_experiment",
    ("GET", "/v1/monitor"): "monitor",
    ("GET", "/v1/popular"): "popular",
    ("GET", "/v1/trending"): "trending",
    ("GET", "/v1/items/latest"): "latest_items",
    ("GET", "/v1/items/{item_id}/similar"): "similar_items",
    ("POST", "/v1/recommendations"): "basket_recommendations",
}
# The non-personal lists came with their own change: a server from before it lacks them.
NEWER = {("GET", "/v1/popular"), ("GET", "/v1/trending"), ("GET", "/v1/items/latest"),
         ("GET", "/v1/items/{item_id}/similar"), ("POST", "/v1/recommendations")}
NEWER_SCHEMAS = {"ItemList", "LatestItems", "BasketList"}


@pytest.fixture(scope="module")
def document(server):
    with Client(server.url) as client:
        return client.openapi()


def json_names(cls, renamed):
    return {renamed.get(f.name, f.name) for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("cls", list(MODELS), ids=lambda c: c.__name__)
def test_each_model_has_its_schemas_fields(document, cls):
    name, renamed, extra = MODELS[cls]
    if name in NEWER_SCHEMAS and name not in document["components"]["schemas"]:
        pytest.skip(f"this server's document has no {name}")
    schema = document["components"]["schemas"][name]
    properties = set(schema.get("properties", {}))
    assert json_names(cls, renamed) - set(extra) == properties, f"{cls.__name__} differs from the schema {name}"
    required_fields = {renamed.get(f.name, f.name) for f in dataclasses.fields(cls)
                       if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    # What the document requires, the dataclass requires too (and nothing the document may omit).
    assert required_fields == set(schema.get("required", [])), f"{cls.__name__}: required fields differ from {name}"


def test_every_operation_has_a_client_method(document):
    in_document = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    missing = sorted(in_document - set(OPERATIONS))
    gone = sorted(set(OPERATIONS) - in_document - (NEWER if not NEWER & in_document else set()))
    assert not missing, f"operations the Python client does not cover: {missing}"
    assert not gone, f"operations the client maps that the server no longer has: {gone}"
    for name in filter(None, OPERATIONS.values()):
        assert callable(getattr(Client, name, None)), name
        assert callable(getattr(lc.AsyncClient, name, None)), f"AsyncClient.{name}"


def test_sync_and_async_clients_offer_the_same_calls():
    def public(cls):
        return {n for n, v in inspect.getmembers(cls) if not n.startswith("_") and callable(v)}

    assert public(Client) - {"close"} == public(lc.AsyncClient) - {"aclose"}


def test_event_types_and_devices_match_the_document(document):
    schemas = document["components"]["schemas"]
    assert tuple(schemas["EventType"]["enum"]) == lc.EVENT_TYPES
    assert tuple(schemas["Device"]["enum"]) == lc.DEVICES
