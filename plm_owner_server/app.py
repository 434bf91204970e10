"""The FastAPI app: ``create_app(settings, runner=None)``; a lifespan loads the model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from plm_owner_server import openapi
from plm_owner_server.api_router import public, router
from plm_owner_server.auth import ApiKeys
from plm_owner_server.errors import install_error_handlers
from plm_owner_server.metrics import Metrics
from plm_owner_server.runner import ModelRunner
from plm_owner_server.settings import Settings
from plm_owner_server.state import AppState
from shared.protocol import PROTOCOL_VERSION

log = logging.getLogger(__name__)


async def _expire_sessions(state: AppState) -> None:
    """Free idle sessions' caches even when no request comes to trigger it."""
    while True:
        await asyncio.sleep(max(state.settings.session_ttl_s / 4, 0.05))
        try:
            await state.sessions.expire()
        except Exception:  # a failed sweep must not end the sweeping
            log.exception("expiring idle sessions failed; trying again later")


def create_app(settings: Settings | None = None, runner: ModelRunner | None = None) -> FastAPI:
    """The server app; tests pass a runner over a tiny model."""
    config = settings or Settings()
    keys = ApiKeys.from_file(config.api_keys_file)  # a bad keys file fails here, before loading
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model_runner = (
            runner if runner is not None else await asyncio.to_thread(ModelRunner.load, config)
        )
        state = await asyncio.to_thread(AppState.build, config, model_runner, keys, metrics)
        if keys.open:
            log.warning("no API keys configured (--api-keys-file): the server is open to anyone")
        log.info("serving %s (%s)", state.model_info.model_id, state.model_info.fingerprint)
        app.state.pema = state
        state.work.scheduler.start()
        sweeper = asyncio.create_task(_expire_sessions(state))
        try:
            yield
        finally:
            sweeper.cancel()
            await state.work.scheduler.stop()
            state.work.thread.shutdown()

    app = FastAPI(
        title="PEMA PLM-owner server",
        version=PROTOCOL_VERSION,
        description="Context representations, head and KV-cached sessions for offsite adaptation.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(public)
    metrics.install(app)
    openapi.install(app)
    return app
