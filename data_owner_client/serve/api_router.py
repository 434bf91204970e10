"""Thin routes of ``pema-client serve``: parse, call the service (:mod:`.serving`), answer; its
errors are answered in OpenAI's shape by :mod:`.errors`' handlers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from data_owner_client.serve.protocol import (
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from data_owner_client.serve.serving import OpenAIServing


def get_serving(request: Request) -> OpenAIServing:
    """The app's service (built by :func:`~data_owner_client.serve.app.create_app`)."""
    service: OpenAIServing = request.app.state.serving
    return service


Serving = Annotated[OpenAIServing, Depends(get_serving)]

router = APIRouter()  # the OpenAI API, behind the keys
public = APIRouter()  # for probes and scrapers


@public.get("/health", include_in_schema=False)
def health() -> dict[str, str]:
    return {"status": "ok"}


@public.get("/metrics", include_in_schema=False)
def prometheus(service: Serving) -> Response:
    registry = service.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
def list_models(service: Serving) -> ModelList:
    return service.list_models()


@router.get("/v1/models/{model}")
def get_model(model: str, service: Serving) -> ModelCard:
    return service.model(model).card()


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, service: Serving) -> Any:
    return await service.completion(body, request)


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatRequest, request: Request, service: Serving) -> Any:
    return await service.chat(body, request)
