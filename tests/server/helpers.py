"""Helpers of the server tests: an in-process server, msgpack bodies, the one error shape."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
import msgpack
import torch
from fastapi.testclient import TestClient
from pydantic import BaseModel

from plm_owner_server.app import create_app
from plm_owner_server.runner import ModelRunner
from plm_owner_server.settings import Settings
from shared.codec import decode_tensor, pack, unpack
from shared.protocol import MSGPACK, ErrorInfo, ErrorResponse, TopK, WireTensor

M = TypeVar("M", bound=BaseModel)
MSGPACK_HEADERS = {"content-type": MSGPACK}


@contextmanager
def serve(runner: ModelRunner, **settings: Any) -> Iterator[TestClient]:
    """An in-process server over ``runner`` (the lifespan runs) with these settings."""
    with TestClient(create_app(Settings(**settings), runner=runner)) as client:
        yield client


def assert_error(response: httpx.Response, status: int, code: str) -> ErrorInfo:
    """The answer is ``status`` with exactly the error shape and this code; returns the error."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "detail", "request_id"}, body
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    error = ErrorResponse.model_validate(body).error
    assert error.code == code, error
    assert error.message.strip(), error
    return error


def msgpack_body(body: BaseModel | dict[str, Any]) -> bytes:
    """A protocol model, or a raw dict the models would refuse to build, as msgpack."""
    if isinstance(body, BaseModel):
        return pack(body)
    return msgpack.packb(body, use_bin_type=True)


def post(
    client: TestClient | httpx.Client,
    path: str,
    body: BaseModel | dict[str, Any],
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST a msgpack body."""
    return client.post(
        path, content=msgpack_body(body), headers={**MSGPACK_HEADERS, **(headers or {})}
    )


def answer(response: httpx.Response, model: type[M], status: int = 200) -> M:
    """A successful msgpack answer as ``model``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == MSGPACK
    return unpack(response.content, model)


def assert_same_logits(got: WireTensor | TopK | None, want: WireTensor | TopK | None) -> None:
    """Both absent, both full logits within 1e-5, or both top-k with the same indices."""
    if want is None:
        assert got is None
    elif isinstance(want, TopK):
        assert isinstance(got, TopK)
        torch.testing.assert_close(
            decode_tensor(got.values), decode_tensor(want.values), rtol=0, atol=1e-5
        )
        assert torch.equal(decode_tensor(got.indices), decode_tensor(want.indices))
    else:
        assert isinstance(got, WireTensor)
        torch.testing.assert_close(decode_tensor(got), decode_tensor(want), rtol=0, atol=1e-5)
