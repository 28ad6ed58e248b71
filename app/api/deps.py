"""Dependencies of the routes, as `Annotated` aliases.

They are all `async def` on purpose: FastAPI runs a plain `def` dependency in the thread pool,
which costs a thread hop per dependency per request.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl

from celery import Celery
from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import error_response
from app.api.schemas import JobCreate
from app.api.validation import (
    check_budget,
    check_devices,
    check_model_name,
    check_sources,
    parse_job_body,
)
from app.core.errors import BadRequest, NotFound, Unauthorized
from app.core.predictors import PredictorCache
from service.async_store import AsyncJobStore
from service.datasets import AsyncDatasetStore
from service.ensembles import AsyncEnsembleStore
from service.records import JobRecord
from service.settings import ANONYMOUS, Settings
from service.storage import Storage

__all__ = [
    "CeleryDep",
    "DatasetStoreDep",
    "EnsembleStoreDep",
    "JobDep",
    "JobStoreDep",
    "KeyGate",
    "ModelFormatQuery",
    "OwnerDep",
    "PredictorsDep",
    "RedisDep",
    "SettingsDep",
    "StorageDep",
    "ValidJobDep",
    "authenticate",
]


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_redis(request: Request) -> Any:
    return request.app.state.redis


async def get_job_store(request: Request) -> AsyncJobStore:
    return request.app.state.jobs


async def get_dataset_store(request: Request) -> AsyncDatasetStore:
    return request.app.state.datasets


async def get_ensemble_store(request: Request) -> AsyncEnsembleStore:
    return request.app.state.ensembles


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


async def get_predictors(request: Request) -> PredictorCache:
    return request.app.state.predictors


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Any, Depends(get_redis)]
JobStoreDep = Annotated[AsyncJobStore, Depends(get_job_store)]
DatasetStoreDep = Annotated[AsyncDatasetStore, Depends(get_dataset_store)]
EnsembleStoreDep = Annotated[AsyncEnsembleStore, Depends(get_ensemble_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
ModelFormatQuery = Annotated[
    Literal["pytorch", "onnx"],
    Query(
        alias="format",
        description="`pytorch`: the whole folder (encoder, heads, tokenizer, ONNX graphs if "
        "any); `onnx`: without the PyTorch weights (the graphs, tokenizer and mtl.json: what "
        "`mtl.ort_predict` loads); 409 when the model has no ONNX export",
    ),
]
CeleryDep = Annotated[Celery, Depends(get_celery)]
PredictorsDep = Annotated[PredictorCache, Depends(get_predictors)]

_bearer = HTTPBearer(auto_error=False, description="an API key from the service settings")


#: query parameters that look like a credential: refused, whatever the header says (a key in a
#: URL ends up in access logs, proxies and browser history)
KEY_QUERY_PARAMS = frozenset(
    {
        "api_key", "apikey", "api-key", "x-api-key", "x_api_key", "key", "token",
        "access_token", "auth", "authorization", "bearer", "password", "secret",
    }
)  # fmt: skip


def refuse_credentials_in_query(settings: Settings, query: Iterable[tuple[str, str]]) -> None:
    """A query parameter named like a credential, or whose value is one of the API keys
    (whatever its name), is a 400: keys travel only in the Authorization header. Each value is
    compared with every key (`hmac.compare_digest`, no early exit)."""
    found = False
    for name, value in query:
        found |= name.lower() in KEY_QUERY_PARAMS
        for key in settings.api_keys.values():
            found |= hmac.compare_digest(value.encode(), key.encode())
    if found:
        raise BadRequest("API keys are accepted only in the Authorization header, never in the URL")


def authenticate(settings: Settings, authorization: str | None) -> str:
    """The owner of the key in `Authorization: Bearer <key>`; raises `Unauthorized`.

    Every configured key is compared, each with `hmac.compare_digest`, and the loop never
    exits early: the time taken does not tell which key (or which prefix) matched.
    """
    if settings.open_access:
        return ANONYMOUS
    scheme, credentials = get_authorization_scheme_param(authorization)
    if not credentials or scheme.lower() != "bearer":
        raise Unauthorized("an API key is required: Authorization: Bearer <key>")
    token = credentials.encode()
    owner = None
    for name, key in settings.api_keys.items():
        if hmac.compare_digest(token, key.encode()):  # no early exit: constant time per key
            owner = name
    if owner is None:
        raise Unauthorized("unknown API key")
    return owner


async def get_owner(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The owner of the presented key (every job and dataset belongs to one). `credentials`
    declares the scheme in the OpenAPI schema; the header itself is read by `authenticate`."""
    refuse_credentials_in_query(settings, request.query_params.multi_items())
    return authenticate(settings, request.headers.get("authorization"))


class KeyGate:
    """ASGI middleware: a request with a credential in its query string is answered 400, and a
    `/v1` request without a valid key 401, before anything reads its body (FastAPI reads and
    parses a body, a whole upload included, before it runs the route's dependencies). The
    routes check again through `OwnerDep`."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), True)
            guarded = scope["path"] == "/v1" or scope["path"].startswith("/v1/")
            try:
                refuse_credentials_in_query(self.settings, query)  # on every path
                if guarded and not self.settings.open_access:
                    authenticate(self.settings, Headers(scope=scope).get("authorization"))
            except (BadRequest, Unauthorized) as exc:
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


OwnerDep = Annotated[str, Depends(get_owner)]

JobIdPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]


async def get_job(job_id: JobIdPath, owner: OwnerDep, jobs: JobStoreDep) -> JobRecord:
    """The job record; another owner's job is reported exactly like an unknown id."""
    record = await jobs.get(job_id, owner)
    if record is None:
        raise NotFound(f"job {job_id} not found")
    return record


JobDep = Annotated[JobRecord, Depends(get_job)]


async def valid_job(
    request: Request,
    owner: OwnerDep,
    datasets: DatasetStoreDep,
    jobs: JobStoreDep,
    settings: SettingsDep,
) -> JobCreate:
    """The job in the request body, validated once: parsed strictly into the config type,
    its model name allowed, its size within the limits, a worker able to run it, the datasets
    it names owned and their contents fit for it."""
    job = parse_job_body(await request.body(), request.headers.get("content-type"))
    check_model_name(job, settings)
    check_budget(job, settings)
    await check_devices(job, settings, jobs)
    await check_sources(job, owner, datasets, settings)
    return job


ValidJobDep = Annotated[JobCreate, Depends(valid_job)]
