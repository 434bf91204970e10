"""Request bodies in (msgpack or JSON, bounded in size) and responses out (msgpack or JSON)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request, Response
from pydantic import BaseModel, ValidationError

from plm_owner_server.errors import ApiError, invalid
from shared.codec import pack, unpack_raw
from shared.protocol import MSGPACK

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 as soon as it is known to exceed ``max_bytes``."""
    too_large = ApiError(
        413, "body_too_large", f"request body exceeds {max_bytes} bytes; split the batch"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


def _decode(body: bytes, media_type: str) -> Any:
    if media_type == MSGPACK:
        return unpack_raw(body)
    if media_type in ("application/json", ""):
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"body is not valid JSON: {exc}") from exc
    raise ApiError(
        415,
        "unsupported_media_type",
        f"content type {media_type!r} is not supported; send {MSGPACK} or application/json",
    )


async def parse(request: Request, model: type[M], max_bytes: int) -> M:
    """Read, decode and validate a body as ``model``; every failure is a 4xx."""
    body = await read_body(request, max_bytes)
    try:
        obj = _decode(body, _media_type(request))
    except ValueError as exc:
        raise ApiError(400, "malformed_body", str(exc)) from exc
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise invalid(exc) from exc


def wants_msgpack(request: Request) -> bool:
    """Msgpack when the client accepts it, or sent it and did not ask for anything else."""
    accept = request.headers.get("accept", "")
    if MSGPACK in accept:
        return True
    return _media_type(request) == MSGPACK and "json" not in accept


def respond(request: Request, model: BaseModel, status: int = 200) -> Response:
    if wants_msgpack(request):
        return Response(pack(model), status_code=status, media_type=MSGPACK)
    return Response(
        model.model_dump_json(exclude_none=True), status_code=status, media_type="application/json"
    )


def body_docs(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for a route that parses its body itself."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return {
        "requestBody": {
            "required": True,
            "content": {MSGPACK: {"schema": schema}, "application/json": {"schema": schema}},
        }
    }
