"""The FastAPI app of ``pema-client serve``: OpenAI's ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` (:mod:`.api_router`) over the data owner's adapters, each decoded on an
:class:`~.engine.Engine` (:mod:`.serving`). Every 4xx/5xx has OpenAI's error shape
(:mod:`.errors`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request

from data_owner_client.serve.api_router import public, router
from data_owner_client.serve.errors import AuthenticationError, install_error_handlers
from data_owner_client.serve.metrics import ServeMetrics
from data_owner_client.serve.models import ServedAdapter
from data_owner_client.serve.serving import OpenAIServing
from shared.keys import KeysFile, bearer_key


def create_app(models: Sequence[ServedAdapter], keys: KeysFile | None = None) -> FastAPI:
    """The app serving ``models`` (engines started and stopped with it); ``keys``: the bearer
    keys it accepts (None: open)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for model in models:
            model.engine.start()
        try:
            yield
        finally:
            for model in models:
                await asyncio.to_thread(model.engine.close)

    def authorize(request: Request) -> None:
        if keys is None:
            return
        key = bearer_key(request.headers.get("authorization", ""))
        if key is None or keys.owner_of(key) is None:
            raise AuthenticationError(
                "missing or invalid API key: send 'Authorization: Bearer <key>' with a key of "
                "this service's keys file (not the PLM server's key)"
            )

    app = FastAPI(
        title="pema-client serve",
        description="The data owner's adapted model behind an OpenAI-compatible API.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    metrics = ServeMetrics(models)
    metrics.install(app)
    app.state.serving = OpenAIServing(models, metrics)
    app.include_router(public)
    app.include_router(router, dependencies=[Depends(authorize)])
    return app
