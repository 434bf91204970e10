"""OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, for every 4xx and
5xx of ``pema-client serve``: typed errors, whose class chooses the status, type and code, and
the handlers that answer them."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from data_owner_client.client import ServerError
from data_owner_client.serve.engine import EngineClosed
from data_owner_client.serve.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)


class OpenAIError(Exception):
    """An error answered in OpenAI's shape; each subclass fixes its status, type and code (a
    refusal passed on from the PLM owner's server keeps that server's code)."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: str | None = None
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param
        if code is not None:
            self.code = code

    @property
    def info(self) -> ErrorInfo:
        return ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)


class BadRequestError(OpenAIError):
    status, type = 400, "invalid_request_error"


class ContextLengthExceededError(BadRequestError):
    code = "context_length_exceeded"


class EmptyPromptError(BadRequestError):
    code = "empty_prompt"


class NoChatTemplateError(BadRequestError):
    code = "no_chat_template"


class AuthenticationError(OpenAIError):
    status, type, code = 401, "authentication_error", "invalid_api_key"
    headers = {"WWW-Authenticate": "Bearer"}  # RFC 6750: how to authenticate


class ModelNotFoundError(OpenAIError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class RateLimitError(OpenAIError):
    status, type = 429, "rate_limit_error"


class PlmRefusedError(OpenAIError):
    """The PLM owner's server refused this service's own key: the operator's to fix."""

    status = 502


class UnavailableError(OpenAIError):
    status = 503


class PlmUnavailableError(UnavailableError):
    code = "plm_unavailable"


class InternalServerError(OpenAIError):
    """A failure of this service's own (the base's 500)."""


def as_openai_error(exc: Exception) -> OpenAIError:
    """Why a job failed, as an answer: the PLM owner's server away or failing is a 503 (retry
    later), its refusal of the request a 400 (or its 429), anything else a 500."""
    if isinstance(exc, OpenAIError):
        return exc
    away = "the PLM owner's server is unavailable; retry when it is back"
    if isinstance(exc, httpx.TransportError) or (
        isinstance(exc, ServerError) and exc.status >= 500
    ):
        return PlmUnavailableError(f"{away} ({exc})")
    if isinstance(exc, ServerError):
        return _refusal(exc)
    if isinstance(exc, EngineClosed):
        return UnavailableError(str(exc))
    if isinstance(exc, RuntimeError) and isinstance(
        exc.__cause__, ServerError | httpx.TransportError
    ):  # re-opening a session the server lost failed
        return PlmUnavailableError(f"{away} ({exc})")
    log.error("request failed", exc_info=exc)
    return InternalServerError(f"internal error: {exc}")


def _refusal(exc: ServerError) -> OpenAIError:
    """The PLM owner's server's 4xx, passed on with its code."""
    if exc.status == 429:
        return RateLimitError(exc.message, code=exc.code)
    if exc.status in (401, 403):
        message = f"the PLM owner's server refused this service's key: {exc.message}"
        return PlmRefusedError(message, code=exc.code)
    return BadRequestError(exc.message, code=exc.code)


def error_response(
    status: int, info: ErrorInfo, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An answer in OpenAI's error shape."""
    body = ErrorResponse(error=info).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def invalid(exc: RequestValidationError) -> BadRequestError:
    """A request that fails its schema, naming its first bad field (and up to five in all)."""
    errors = exc.errors()
    loc = [str(part) for part in errors[0]["loc"] if part != "body"][:1]  # the field sent
    message = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {_reason(e)}"
        for e in errors[:5]
    )
    return BadRequestError(f"invalid request: {message}", param=".".join(loc) or None)


def _reason(error: Any) -> str:
    """A validation error's message; our own checks' without pydantic's "Value error, "."""
    if error["type"] == "value_error" and "error" in error.get("ctx", {}):
        return str(error["ctx"]["error"])
    return str(error["msg"])


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error raised by a route in OpenAI's shape."""

    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc.status, exc.info, exc.headers)

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await openai_error(request, invalid(exc))

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = f"http_{exc.status_code}"
        info = ErrorInfo(message=str(exc.detail), type="invalid_request_error", code=code)
        return error_response(exc.status_code, info)

    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return await openai_error(request, as_openai_error(exc))

    handlers: dict[Any, Any] = {
        OpenAIError: openai_error,
        RequestValidationError: validation,
        StarletteHTTPException: http_error,
        Exception: crash,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
