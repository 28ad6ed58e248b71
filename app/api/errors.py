"""Domain errors to HTTP: the one place where that mapping lives."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import (
    BadRequest,
    Conflict,
    Invalid,
    NotFound,
    ServiceError,
    TooLarge,
    TooManyJobs,
    Unauthorized,
    Unavailable,
)
from service.storage import StorageError

__all__ = ["error_response", "install_error_handlers"]

log = logging.getLogger(__name__)

_STATUS: dict[type[ServiceError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    Invalid: 422,
    TooManyJobs: 429,
    Unavailable: 503,
}


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc)


def error_response(exc: ServiceError) -> JSONResponse:
    """The HTTP answer to a domain error (also used by middleware, outside the routes)."""
    status = next(code for cls, code in _STATUS.items() if isinstance(exc, cls))
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    if isinstance(exc, TooManyJobs):
        headers = {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, Invalid):
        body: dict[str, object] = {
            "detail": [{"loc": exc.loc, "msg": exc.message, "type": exc.type}]
        }
    elif isinstance(exc, Conflict):
        body = {"detail": exc.message, "state": exc.state}
    else:
        body = {"detail": exc.message}
    return JSONResponse(body, status_code=status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own HTTP errors, as FastAPI answers them; a 405's `Allow` lists the methods
    of every operation on the path (Starlette lists only those of the first route it matched,
    and `GET /v1/jobs` and `POST /v1/jobs` are two routes)."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        allowed = _allowed_methods(request.app, request.url.path)
        if allowed:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
    return await http_exception_handler(request, exc)


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the OpenAPI schema lists for every template that matches `path`."""
    table: list[tuple[re.Pattern[str], list[str]]] | None = getattr(
        app.state, "allowed_methods", None
    )
    if table is None:
        table = [
            (
                re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)) + "$"),
                [m.upper() for m in operations],
            )
            for template, operations in app.openapi().get("paths", {}).items()
        ]
        app.state.allowed_methods = table
    return sorted({m for pattern, methods in table if pattern.match(path) for m in methods})


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, with non-finite numbers in the echoed input written as strings and lone
    surrogates escaped: a body holding `NaN`, `1e400` or `"\\ud800"` (Python's JSON parser
    accepts them all) must get its 422, not a 500 from a response strict JSON cannot hold."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)


def _finite(value: Any) -> Any:
    """The echoed input as strict UTF-8 JSON can hold it: non-finite numbers as strings, and
    lone surrogates (which no UTF-8 text holds) escaped."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_finite(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.error("redis unavailable: %s", exc)
    return JSONResponse({"detail": "the job store (Redis) is unavailable"}, status_code=503)


async def _storage_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("artifact store error on %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(
        {"detail": "the artifact store is unavailable or incomplete; try again later"},
        status_code=503,
    )


def install_error_handlers(app: FastAPI) -> None:
    for cls in _STATUS:
        app.add_exception_handler(cls, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(StorageError, _storage_down)
