"""Every error a client can cause, as one exception type with its HTTP status, mapped to a response once.

Every error body is ``{"error": message}`` (the Open Inference Protocol's shape, used by /v1 too, so a
client needs one rule). Messages name the field or parameter and what was expected. An exception nobody
expected (a bug, CUDA out of memory) is a 500 with the same JSON shape, never a plain-text page.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fieldkube.serving.batcher import InferenceTimeoutError, OverloadedError, ShuttingDownError
from fieldkube.serving.inference import TilingError
from fieldkube.serving.registry import ModelNotAvailableError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A client-visible error: HTTP status, message, optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def error_response(
    request: Request, status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one place that shapes error bodies."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def describe_validation(errors: Sequence[Any]) -> str:
    """'query parameter 'tile': Input should be greater than or equal to 32 (got '8')'."""
    parts = []
    for item in errors:
        loc = [str(p) for p in item.get("loc", ())]
        where = (
            f"{loc[0]} parameter {'.'.join(loc[1:])!r}" if len(loc) > 1 else (loc[0] if loc else "request")
        )
        got = f" (got {item['input']!r})" if "input" in item and item.get("type") != "missing" else ""
        parts.append(f"{where}: {item.get('msg', 'invalid')}{got}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Map every client-caused exception to its status once, for all routes."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(request, error.status, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        status = 400 if request.url.path.startswith("/v2") else 422
        return error_response(request, status, describe_validation(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(request, error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(TilingError)
    async def _tiling(request: Request, error: TilingError) -> JSONResponse:
        return error_response(request, 400, str(error))

    @app.exception_handler(ModelNotAvailableError)
    async def _no_model(request: Request, error: ModelNotAvailableError) -> JSONResponse:
        return error_response(request, 503, str(error), {"Retry-After": "5"} if error.retryable else None)

    @app.exception_handler(OverloadedError)
    async def _overloaded(request: Request, error: OverloadedError) -> JSONResponse:
        return error_response(request, 429, str(error), {"Retry-After": str(error.retry_after_s)})

    @app.exception_handler(ShuttingDownError)
    async def _shutting_down(request: Request, error: ShuttingDownError) -> JSONResponse:
        return error_response(request, 503, str(error), {"Retry-After": str(error.retry_after_s)})

    @app.exception_handler(InferenceTimeoutError)
    async def _timeout(request: Request, error: InferenceTimeoutError) -> JSONResponse:
        return error_response(request, 503, str(error), {"Retry-After": str(error.retry_after_s)})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer is sent; the client gets JSON, not a text page.
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(error).__name__, error)
        return error_response(
            request, 500, f"internal error while serving {request.url.path}: {type(error).__name__}: {error}"
        )
