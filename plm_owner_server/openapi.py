"""The published OpenAPI schema, bounded by the served model and the owner's limits, so that a
client generated from it sends only what the server accepts: token ids below the vocabulary size,
top-k up to it, at most ``--max-batch-size`` sequences of at most the model's context each.

What a JSON schema cannot state (a request's total tokens or logits, rows and tokens of equal
length, a session's live rows and step budget) is checked by the server with its own error codes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from plm_owner_server.state import AppState

BODIES = ("/v1/represent", "/v1/sessions", "/v1/sessions/{session_id}/step")


def install(app: FastAPI) -> None:
    """Serve the bounded schema once the model is loaded (the plain one before)."""

    def openapi() -> dict[str, Any]:
        state: AppState | None = getattr(app.state, "pema", None)
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        if state is None:
            return schema  # not cached: the bounds come with the model
        for path in BODIES:
            for content in schema["paths"][path]["post"]["requestBody"]["content"].values():
                bound(content["schema"], state)
        app.openapi_schema = schema
        return schema

    setattr(app, "openapi", openapi)  # noqa: B010  # FastAPI's documented override


def bound(body: dict[str, Any], state: AppState) -> None:
    """Add the model's and the limits' bounds to one request body's schema, in place."""
    info, limits = state.model_info, state.model_info.limits
    props = body["properties"]
    if "sequences" in props:
        sequences = props["sequences"]
        sequences["maxItems"] = limits.max_batch_size
        sequences["items"]["maxItems"] = info.max_positions
        sequences["items"]["items"]["maximum"] = info.vocab_size - 1
    if "start" in props:
        _array(props["start"])["items"]["maximum"] = info.max_positions - 1
    if "tokens" in props:
        props["tokens"]["maxItems"] = limits.max_batch_size
        props["tokens"]["items"]["maximum"] = info.vocab_size - 1
    if "rows" in props:
        rows = _array(props["rows"])
        rows["maxItems"] = limits.max_batch_size
        rows["items"]["maximum"] = limits.max_batch_size - 1
    if "logits" in props:
        top_k = next(s for s in props["logits"]["anyOf"] if s.get("type") == "integer")
        top_k["maximum"] = info.vocab_size


def _array(schema: dict[str, Any]) -> dict[str, Any]:
    """The array branch of an optional array (``anyOf: [array, null]``)."""
    return next(s for s in schema.get("anyOf", [schema]) if s.get("type") == "array")
