"""Domain errors to HTTP: the one place where that mapping lives."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.core.errors import (
    Conflict,
    Invalid,
    NotFound,
    ServiceError,
    TooLarge,
    Unauthorized,
    Unavailable,
)

__all__ = ["install_error_handlers"]

log = logging.getLogger(__name__)

_STATUS: dict[type[ServiceError], int] = {
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    Invalid: 422,
    Unavailable: 503,
}


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    status = next(code for cls, code in _STATUS.items() if isinstance(exc, cls))
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    if isinstance(exc, Invalid):
        body: dict[str, object] = {
            "detail": [{"loc": exc.loc, "msg": exc.message, "type": exc.type}]
        }
    elif isinstance(exc, Conflict):
        body = {"detail": exc.message, "state": exc.state}
    else:
        body = {"detail": exc.message}
    return JSONResponse(body, status_code=status, headers=headers)


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.error("redis unavailable: %s", exc)
    return JSONResponse({"detail": "the job store (Redis) is unavailable"}, status_code=503)


def install_error_handlers(app: FastAPI) -> None:
    for cls in _STATUS:
        app.add_exception_handler(cls, _service_error)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
