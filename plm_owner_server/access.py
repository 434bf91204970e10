"""Request ids and the access log: every response carries ``X-Request-ID`` (the caller's, when it
sends a sane one, else a new one), which also appears in error bodies and in the one log line per
request. The line names the route template, never the raw path or the body: no session ids,
token ids or texts reach the log."""

from __future__ import annotations

import logging
import re
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
_SANE = re.compile(r"[A-Za-z0-9._-]{1,64}")
log = logging.getLogger("pema.access")


class RequestIds:
    """Pure ASGI middleware: assigns the request id and logs the request when it ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(HEADER.encode(), b"").decode("latin-1")
        request_id = given if _SANE.fullmatch(given) else secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        start, status = time.perf_counter(), 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if all(name.lower() != HEADER.encode() for name, _ in headers):
                    headers.append((HEADER.encode(), request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            log.info(
                "%s %s %s %d %.1f ms",
                request_id,
                scope["method"],
                route,
                status,
                (time.perf_counter() - start) * 1e3,
            )
