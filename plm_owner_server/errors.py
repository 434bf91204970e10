"""The one error shape, ``{"error": {"code", "message", "detail"}}``, for every 4xx and 5xx."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error a client caused (or may retry); rendered with the error shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.detail = status, code, message, detail
        self.headers = headers or {}


def error_response(
    request: Request, status: int, code: str, message: str, detail: Any = None
) -> JSONResponse:
    request_id = request.scope.get("state", {}).get("request_id")
    info = ErrorInfo(code=code, message=message, detail=detail, request_id=request_id)
    response = JSONResponse(ErrorResponse(error=info).model_dump(mode="json"), status_code=status)
    if request_id is not None:  # also on a 500, which bypasses the request-id middleware
        response.headers["x-request-id"] = request_id
    return response


def invalid(exc: ValidationError | RequestValidationError) -> ApiError:
    """A pydantic validation failure as a 422 naming each bad field."""
    errors = (
        exc.errors(include_url=False, include_input=False)
        if isinstance(exc, ValidationError)
        else exc.errors()
    )
    where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors[:5])
    detail = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in errors]
    # Errors on the body as a whole break a rule between fields (rows and tokens of different
    # lengths, a start outside its sequence) that a JSON schema cannot state.
    whole = all(not e["loc"] and e["type"] == "value_error" for e in errors)
    code = "inconsistent_request" if whole else "invalid_request"
    return ApiError(422, code, f"invalid request: {where}", detail)


_STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        response = error_response(request, exc.status, exc.code, exc.message, exc.detail)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = invalid(exc)
        return error_response(request, err.status, err.code, err.message, err.detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        response = error_response(request, exc.status_code, code, str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. the Allow header of a 405
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        route = getattr(request.scope.get("route"), "path", "unmatched")  # no ids from the path
        request_id = request.scope.get("state", {}).get("request_id")
        log.exception("unhandled error on %s %s (request %s)", request.method, route, request_id)
        return error_response(
            request, 500, "internal_error", "internal server error; see the server log"
        )
