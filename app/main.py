"""The FastAPI application: `uvicorn --factory app.main:create_app`."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

import mtl
from app.api.deps import KeyGate
from app.api.errors import install_error_handlers
from app.api.openapi import install_openapi
from app.api.routes import configs, dashboard, datasets, docs, ensembles, health, jobs, studies
from app.core.events import HubRegistry
from app.core.headers import SecurityHeaders
from app.core.logs import install_access_log_redaction
from app.core.metrics import ServiceMetrics
from app.core.predictors import PredictorCache
from service.async_store import AsyncJobStore
from service.datasets import AsyncDatasetStore
from service.ensembles import AsyncEnsembleStore
from service.keys import Keys
from service.queue import make_celery
from service.settings import Settings, get_settings
from service.storage import Storage
from service.studies.store import AsyncStudyStore

__all__ = ["create_app"]

log = logging.getLogger("app")

STATIC_DIR = Path(__file__).resolve().parent / "static"

DESCRIPTION = """
Train multi-task sentence encoders as jobs.

* `POST /v1/jobs` with a training config (try the example: two tasks on dummy data, it runs
  on CPU in seconds), then follow `GET /v1/jobs/{id}/events` (server-sent events).
* Upload CSV/JSONL data with `POST /v1/datasets` and name it in a config as `dataset:<id>`.
* Average several succeeded jobs' models (or a study's best trials') with `POST /v1/ensembles`.
* Authorize with `Bearer <API key>` when the service has keys configured.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        if settings.open_access:
            log.warning("no API keys configured (MTL_API_KEYS): open access, for local use only")
        # Blocking pool: under a burst, requests wait for a free connection instead of failing.
        # A stalled Redis must cost a request `redis_timeout_s` and a 503, not a hang. One
        # immediate retry after a connection error (a pooled connection that died with a Redis
        # restart), none after a timeout: the command may still run when Redis wakes up, and
        # a retried submit script would make a second job.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.require_redis_url(),
            max_connections=settings.redis_max_connections,
            timeout=10,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            decode_responses=True,
            health_check_interval=30,
            socket_keepalive=True,
        )
        client = aioredis.Redis(connection_pool=pool)
        keys = Keys(settings.key_prefix)
        app.state.redis = client
        app.state.jobs = AsyncJobStore(
            client,
            keys,
            stream_maxlen=settings.stream_maxlen,
            stream_ttl_s=settings.stream_ttl_s,
            idempotency_ttl_s=settings.idempotency_ttl_s,
        )
        app.state.storage = Storage.from_settings(settings)
        app.state.datasets = AsyncDatasetStore(client, keys, app.state.storage)
        # The hub's blocking XREAD must return well within the socket timeout; subscribers
        # keep their own keep-alive timers.
        block_ms = int(min(settings.sse_keepalive_s, 2.0, settings.redis_timeout_s / 2) * 1000)
        app.state.hubs = HubRegistry(app.state.jobs, block_ms=block_ms)
        app.state.studies = AsyncStudyStore(client, keys)
        app.state.study_hubs = HubRegistry(app.state.studies, block_ms=block_ms)
        app.state.ensembles = AsyncEnsembleStore(client, keys)
        app.state.celery = make_celery(settings)
        app.state.publisher = ThreadPoolExecutor(1, thread_name_prefix="publish")
        app.state.predictors = PredictorCache(
            settings.predictor_cache_size,
            batch_wait_s=settings.predict_batch_wait_ms / 1000,
            max_batch=settings.predict_max_batch,
            on_batch=app.state.metrics.predict_batch.observe,
        )
        app.state.predict_limiter = anyio.CapacityLimiter(settings.predict_threads)
        settings.private_files()
        # Dataset folders an earlier API left without a record, an hour old: removed (logged).
        await datasets.sweep_orphans(app.state.datasets)
        # Everything imported so far lives as long as the process: keep it out of the
        # collector's full passes, which otherwise stall the event loop for ~100 ms.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await app.state.predictors.batcher.aclose()
            await app.state.hubs.close()
            await app.state.study_hubs.close()
            await client.aclose()
            app.state.publisher.shutdown(wait=True)
            app.state.celery.close()

    app = FastAPI(
        title="mtl-jobs",
        version=mtl.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        max_body_size=settings.max_body_bytes,
        docs_url=None,  # served by `docs.router` with local assets (no CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    install_access_log_redaction()
    app.state.metrics = ServiceMetrics()
    # (the last added is the outermost: CORS, the metrics, the security headers, the key check)
    app.add_middleware(KeyGate, settings=settings)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(app.state.metrics.middleware)
    if settings.cors_origins:
        # Only the listed origins, no credentials mode (the key travels in a header the page
        # sets itself); without MTL_CORS_ORIGINS no CORS header is ever sent.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=["Location", "Idempotent-Replayed", "Retry-After"],
            allow_credentials=False,
            max_age=600,
        )
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(health.router)
    # each router's prefix carries /v1 itself: its routes' paths (the Prometheus `route`
    # label) are then the URLs' templates
    app.include_router(jobs.router)
    app.include_router(configs.router)
    app.include_router(studies.router)
    app.include_router(ensembles.router)
    app.include_router(datasets.router, max_body_size=settings.max_upload_bytes + 64 * 1024)
    app.include_router(dashboard.router)
    app.include_router(docs.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
