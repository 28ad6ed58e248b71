"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import JobStoreDep, RedisDep, SettingsDep

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The API process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Redis answers and at least one worker sent a heartbeat recently",
    responses={503: {"description": "not ready; the body says what is missing"}},
)
async def readyz(redis: RedisDep, jobs: JobStoreDep, settings: SettingsDep) -> JSONResponse:
    try:
        redis_ok = bool(await redis.ping())
        workers = await jobs.workers_alive(within_s=3 * settings.heartbeat_s) if redis_ok else []
    except Exception:
        redis_ok, workers = False, []
    ready = redis_ok and bool(workers)
    body = {"status": "ready" if ready else "not ready", "redis": redis_ok, "workers": workers}
    return JSONResponse(body, status_code=200 if ready else 503)
