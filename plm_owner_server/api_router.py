"""Thin routes of the `/v1` API: parse, call a service, respond."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from plm_owner_server.errors import ApiError
from plm_owner_server.state import AppState
from plm_owner_server.wire import body_docs, parse, respond
from shared.protocol import (
    MSGPACK,
    ErrorResponse,
    Health,
    ModelInfo,
    RepresentRequest,
    RepresentResponse,
    SessionOpenRequest,
    SessionOpenResponse,
    SessionStepRequest,
    SessionStepResponse,
)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 422, 429, 500)}


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.pema
    return state


State = Annotated[AppState, Depends(app_state)]


def owner(request: Request, state: State) -> str:
    return state.keys.owner(request)


Owner = Annotated[str, Depends(owner)]


router = APIRouter(prefix="/v1", responses=ERRORS)  # type: ignore[arg-type]
public = APIRouter()


@router.get("/health", response_model=Health, tags=["service"])
async def health() -> Health:
    return Health()


@public.get("/metrics", tags=["service"], response_class=Response)
async def metrics(state: State) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/model", response_model=ModelInfo, tags=["model"])
async def model_info(state: State, _: Owner) -> ModelInfo:
    """The served model: sizes, dtype, fingerprint, EOS ids and the server's limits."""
    return state.model_info


@router.get(
    "/tokenizer",
    tags=["model"],
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}}},
)
async def tokenizer(state: State, _: Owner) -> Response:
    """A zip of the tokenizer files; `AutoTokenizer.from_pretrained` loads the extracted folder."""
    return Response(
        state.tokenizer_zip,
        media_type="application/zip",
        headers={"ETag": f'"{state.model_info.fingerprint}"'},
    )


@router.get(
    "/head",
    tags=["model"],
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def head(state: State, _: Owner) -> Response:
    """The output head as safetensors; its `pema_head` metadata holds the head spec (JSON)."""
    if state.head_bytes is None:
        raise ApiError(403, "head_not_shared", "the server's owner does not share the output head")
    return Response(
        state.head_bytes,
        media_type="application/octet-stream",
        headers={"ETag": f'"{state.model_info.fingerprint}"'},
    )


@router.post(
    "/represent",
    tags=["representations"],
    response_model=RepresentResponse,
    openapi_extra=body_docs(RepresentRequest),
    responses={200: {"content": {MSGPACK: {}}}},
)
async def represent(request: Request, state: State, key: Owner) -> Response:
    """Representations f(c) of positions `start[b] .. len-1` of each sequence (and logits)."""
    body = await parse(request, RepresentRequest, state.settings.max_body_bytes)
    return respond(request, await state.representer.represent(key, body))


@router.post(
    "/sessions",
    tags=["sessions"],
    response_model=SessionOpenResponse,
    status_code=201,
    openapi_extra=body_docs(SessionOpenRequest),
    responses={201: {"content": {MSGPACK: {}}}},
)
async def open_session(request: Request, state: State, key: Owner) -> Response:
    """Prefill prompts into a server-side KV cache; returns each row's last representation."""
    body = await parse(request, SessionOpenRequest, state.settings.max_body_bytes)
    return respond(request, await state.sessions.open(key, body), status=201)


@router.post(
    "/sessions/{session_id}/step",
    tags=["sessions"],
    response_model=SessionStepResponse,
    openapi_extra=body_docs(SessionStepRequest),
    responses={200: {"content": {MSGPACK: {}}}},
)
async def step_session(
    session_id: str,
    request: Request,
    state: State,
    key: Owner,
) -> Response:
    """Append one token per listed row; rows left out are finished and freed."""
    body = await parse(request, SessionStepRequest, state.settings.max_body_bytes)
    return respond(request, await state.sessions.step(key, session_id, body))


@router.delete("/sessions/{session_id}", tags=["sessions"], status_code=204)
async def close_session(session_id: str, state: State, key: Owner) -> Response:
    """Close a session and free its cache."""
    await state.sessions.close(key, session_id)
    return Response(status_code=204)
