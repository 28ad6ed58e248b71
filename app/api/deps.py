"""Dependencies of the routes, as `Annotated` aliases.

They are all `async def` on purpose: FastAPI runs a plain `def` dependency in the thread pool,
which costs a thread hop per dependency per request.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.core.config import ANONYMOUS, Settings
from app.core.errors import NotFound, Unauthorized
from app.core.predictors import PredictorCache
from worker.datasets import AsyncDatasetStore
from worker.store import AsyncJobStore

__all__ = [
    "CeleryDep",
    "DatasetStoreDep",
    "JobDep",
    "JobStoreDep",
    "OwnerDep",
    "PredictorsDep",
    "RedisDep",
    "SettingsDep",
]


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_redis(request: Request) -> Any:
    return request.app.state.redis


async def get_job_store(request: Request) -> AsyncJobStore:
    return request.app.state.jobs


async def get_dataset_store(request: Request) -> AsyncDatasetStore:
    return request.app.state.datasets


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


async def get_predictors(request: Request) -> PredictorCache:
    return request.app.state.predictors


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Any, Depends(get_redis)]
JobStoreDep = Annotated[AsyncJobStore, Depends(get_job_store)]
DatasetStoreDep = Annotated[AsyncDatasetStore, Depends(get_dataset_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
PredictorsDep = Annotated[PredictorCache, Depends(get_predictors)]

_bearer = HTTPBearer(auto_error=False, description="an API key from the service settings")


async def get_owner(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The owner of the presented key (every job and dataset belongs to one)."""
    if settings.open_access:
        return ANONYMOUS
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("an API key is required: Authorization: Bearer <key>")
    token = credentials.credentials.encode()
    owner = None
    for name, key in settings.api_keys.items():
        if hmac.compare_digest(token, key.encode()):  # no early exit: constant time per key
            owner = name
    if owner is None:
        raise Unauthorized("unknown API key")
    return owner


OwnerDep = Annotated[str, Depends(get_owner)]

JobIdPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]


async def get_job(job_id: JobIdPath, owner: OwnerDep, jobs: JobStoreDep) -> dict[str, Any]:
    """The job record; another owner's job is reported exactly like an unknown id."""
    record = await jobs.get(job_id, owner)
    if record is None:
        raise NotFound(f"job {job_id} not found")
    return record


JobDep = Annotated[dict[str, Any], Depends(get_job)]
