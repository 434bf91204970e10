"""The FastAPI app: ``create_app(settings, runner=None)``; a lifespan loads the model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from plm_owner_server import openapi
from plm_owner_server.access import RequestIds
from plm_owner_server.api_router import public, router
from plm_owner_server.auth import ApiKeys
from plm_owner_server.backend import Backend, load_backend
from plm_owner_server.errors import install_error_handlers
from plm_owner_server.metrics import Metrics
from plm_owner_server.settings import Settings
from plm_owner_server.state import AppState
from shared.keys import check_exposure
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


def api_keys(config: Settings) -> ApiKeys:
    """The keys file's keys; refuses a bad file, or no keys on a non-loopback address."""
    keys = ApiKeys.from_file(config.api_keys_file)
    check_exposure(
        config.host,
        keyed=not keys.open,
        insecure_no_auth=config.insecure_no_auth,
        exposed="the model",
    )
    return keys


def create_app(settings: Settings | None = None, runner: Backend | None = None) -> FastAPI:
    """The server app; tests pass a runner over a tiny model."""
    config = settings or Settings()
    keys = api_keys(config)
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model_runner = (
            runner if runner is not None else await asyncio.to_thread(load_backend, config)
        )
        metrics.watch(model_runner)
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
            model_runner.close()

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
    app.add_middleware(RequestIds)  # outermost: its id is set before anything else runs
    openapi.install(app)
    return app
