"""/v1/jobs: submit, list, inspect, stream, cancel, delete, download, predict."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from app.api.deps import (
    CeleryDep,
    JobDep,
    JobStoreDep,
    ModelFormatQuery,
    OwnerDep,
    PredictorsDep,
    SettingsDep,
    StorageDep,
    ValidJobDep,
)
from app.api.schemas import (
    MAX_OFFSET,
    CancelOut,
    ConflictOut,
    JobCreate,
    JobList,
    JobOut,
    Links,
    MetricsOut,
    PredictIn,
    PredictOut,
    Progress,
    error_responses,
    example_job,
)
from app.api.validation import job_body_openapi
from app.core.errors import Conflict, NotFound, TooManyJobs
from app.core.events import HubRegistry, server_sent_events
from app.core.models import delete_job_files, model_download, predict_texts
from service.async_store import (
    AsyncJobStore,
    CancelOutcome,
    CreateOutcome,
    DeleteOutcome,
    NewJob,
)
from service.queue import enqueue, queued_reason, routing
from service.records import Event, EventType, JobRecord, JobState
from service.settings import Settings
from service.storage import Storage, archive_dir, job_key

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401, 503))


STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


# ------------------------------------------------------------------------------ helpers


def _links(job_id: str) -> Links:
    base = f"/v1/jobs/{job_id}"
    return Links(
        self=base,
        events=f"{base}/events",
        metrics=f"{base}/metrics",
        cancel=f"{base}/cancel",
        model=f"{base}/model",
        predict=f"{base}/predict",
    )


def job_out(record: JobRecord, position: int | None = None, reason: str | None = None) -> JobOut:
    total, step = record.total_steps, record.step
    queued = record.state is JobState.QUEUED
    return JobOut(
        id=record.id,
        name=record.name,
        state=record.state,
        attempt=record.attempt,
        max_attempts=record.max_attempts,
        restarts=record.restarts,
        queue_position=position if queued else None,
        queued_reason=reason if queued else None,
        priority=record.priority,
        devices=record.devices,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        progress=Progress(
            step=step,
            total_steps=total,
            epoch=record.epoch,
            elapsed=record.elapsed,
            eta=record.eta,
            fraction=round(step / total, 4) if total else None,
            updated_at=record.progress_at,
        ),
        latest_metrics=record.latest,
        best_metrics=record.best,
        final_metrics=record.final_metrics,
        checkpoint_step=record.checkpoint_step,
        cancel_requested=record.cancel,
        error=record.error,
        has_model=record.model,
        study_id=record.study_id,
        trial=record.trial,
        links=_links(record.id),
    )


async def _reasons(
    jobs: AsyncJobStore,
    settings: Settings,
    records: list[JobRecord],
    positions: dict[str, int | None] | None = None,
) -> tuple[dict[str, int | None], dict[str, str]]:
    """The queue positions (looked up unless given) and `queued_reason`s of the queued ones
    among `records`."""
    queued = [r for r in records if r.state is JobState.QUEUED]
    if not queued:
        return {}, {}
    if positions is None:
        positions = await jobs.queue_positions(r.id for r in queued)
    workers = await jobs.worker_devices(within_s=3 * settings.heartbeat_s)
    reasons = {
        r.id: queued_reason(
            r.devices, r.held, positions.get(r.id), workers, settings.max_devices_per_key
        )
        for r in queued
    }
    return positions, reasons


def _fingerprint(body: JobCreate) -> str:
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------ routes


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    summary="Submit a training job",
    openapi_extra=job_body_openapi(
        {
            "two_task_dummy": {
                "summary": "Two tasks on dummy data (CPU, a few seconds)",
                "value": example_job(),
            }
        }
    ),
    responses={
        **error_responses(400, 413),
        409: {
            "model": ConflictOut,
            "description": "the Idempotency-Key is in use by a different request",
        },
        422: {"description": "invalid config or datasets; `detail[].loc` names the field"},
        429: {
            "description": "the API key has its limit of queued and running jobs "
            "(MTL_MAX_ACTIVE_JOBS_PER_KEY); retry after `Retry-After` seconds",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        },
    },
)
async def submit_job(
    request: Request,
    body: ValidJobDep,
    response: Response,
    owner: OwnerDep,
    jobs: JobStoreDep,
    settings: SettingsDep,
    celery: CeleryDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            description="retrying with the same key returns the same job",
        ),
    ] = None,
) -> JobOut:
    """Validate the config and the datasets it names, then queue the job.

    The body is the training config (the schema `mtl train` reads) with an optional `name`.
    """
    key = hashlib.sha256(idempotency_key.encode()).hexdigest() if idempotency_key else None
    created = await jobs.create(
        NewJob(
            owner=owner,
            name=body.name,
            config_json=body.train_config_json(),
            max_attempts=settings.max_restarts + 1,
            idempotency_key=jobs.keys.idempotency(owner, key) if key else None,
            fingerprint=_fingerprint(body),
            max_active=settings.max_active_jobs_per_key,
            **routing(settings, body.devices, body.priority),
        )
    )
    if created.outcome is CreateOutcome.CONFLICT:
        raise Conflict("this Idempotency-Key was already used for a different request")
    if created.outcome is CreateOutcome.LIMITED:
        raise TooManyJobs(
            f"this API key already has {created.active} queued or running jobs, the limit is "
            f"{settings.max_active_jobs_per_key}: wait for one to finish, or cancel one",
            settings.retry_after_s,
        )
    record = created.record
    if record is None:  # an idempotent replay of a job deleted since
        raise NotFound(f"job {created.job_id} not found")
    job_id = record.id
    if created.outcome is CreateOutcome.CREATED and not record.held:
        try:
            # one dedicated publisher thread: a pool of threads contending for the GIL with
            # the event loop shows up as tail latency
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                request.app.state.publisher, enqueue, celery, settings, job_id, 1, record.queue
            )
            await jobs.mark_published(job_id, 1)
        except Exception:  # the record is safe; the reaper publishes unconfirmed messages
            log.exception("job %s: publishing failed; the reaper will retry", job_id)
    elif created.outcome is not CreateOutcome.CREATED:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    _, reasons = await _reasons(jobs, settings, [record], {job_id: created.position})
    return job_out(record, created.position, reasons.get(job_id))


@router.get("", response_model=JobList, summary="List jobs (newest first)")
async def list_jobs(
    request: Request,
    owner: OwnerDep,
    jobs: JobStoreDep,
    settings: SettingsDep,
    state: JobState | None = None,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    limit = min(limit, settings.page_size_max)
    records, total = await jobs.page(owner, state, offset, limit)
    positions, reasons = await _reasons(jobs, settings, records)
    nxt = None
    if offset + limit < total:
        nxt = str(request.url.include_query_params(offset=offset + limit, limit=limit))
    return JobList(
        items=[job_out(r, positions.get(r.id), reasons.get(r.id)) for r in records],
        total=total,
        offset=offset,
        limit=limit,
        next=nxt,
    )


@router.get(
    "/{job_id}",
    response_model=JobOut,
    summary="A job's state, progress and metrics",
    responses=error_responses(404),
)
async def get_job(job: JobDep, jobs: JobStoreDep, settings: SettingsDep) -> JobOut:
    positions, reasons = await _reasons(jobs, settings, [job])
    return job_out(job, positions.get(job.id), reasons.get(job.id))


@router.get("/{job_id}/config", summary="The job's training config", responses=error_responses(404))
async def get_config(job: JobDep, jobs: JobStoreDep) -> dict[str, Any]:
    raw = await jobs.load_config(job.id)
    if raw is None:
        raise NotFound(f"job {job.id} not found")
    config: dict[str, Any] = json.loads(raw)
    return config


@router.get(
    "/{job_id}/tensorboard",
    response_class=FileResponse,
    summary="The job's TensorBoard event files as a .tar.gz",
    responses={
        **error_responses(404),
        200: {"content": {"application/gzip": {}}},
        409: {"model": ConflictOut, "description": "not yet"},
    },
)
async def download_tensorboard(job: JobDep, storage: StorageDep) -> FileResponse:
    """Open with `tar xzf ...; tensorboard --logdir tensorboard`. (With a remote store: the
    files uploaded so far, at each checkpoint and at the end.)"""
    path = await anyio.to_thread.run_sync(_tensorboard_archive, storage, job.id)
    if path is None:
        raise Conflict(f"job {job.id} has no TensorBoard files yet", job.state)
    cleanup = None if storage.in_place else BackgroundTask(shutil.rmtree, path.parent, True)
    return FileResponse(
        path,
        media_type="application/gzip",
        filename=f"{job.id}-tensorboard.tar.gz",
        background=cleanup,
    )


def _tensorboard_archive(storage: Storage, job_id: str) -> Path | None:
    key = f"{job_key(job_id)}/tensorboard"
    if storage.in_place:
        log_dir = storage.local(key)
        if not log_dir.is_dir():
            return None
        return archive_dir(log_dir, log_dir.with_name("tensorboard.tar.gz"), "tensorboard")
    folder = storage.cache_dir / "downloads" / uuid.uuid4().hex
    try:
        log_dir = storage.fetch_tree(key, folder / "tensorboard")
        if not any(log_dir.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return archive_dir(log_dir, folder / "tensorboard.tar.gz", "tensorboard")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


@router.get(
    "/{job_id}/metrics",
    response_model=MetricsOut,
    summary="The metric history",
    responses=error_responses(404),
)
async def get_metrics(
    job: JobDep,
    jobs: JobStoreDep,
    task: Annotated[str | None, Query(max_length=64)] = None,
    split: Literal["train", "validation", "test"] | None = None,
    since_step: Annotated[int | None, Query(ge=0, le=2**53)] = None,
) -> MetricsOut:
    """Train logs (split `train`) and evaluations, one item per (kind, split, step).

    A resumed attempt replaces what earlier attempts reported after its checkpoint, so no
    step appears twice.
    """
    items = []
    for raw in await jobs.metrics(job.id, since_step):
        event = Event.model_validate_json(raw)
        data = event.data
        is_log = event.type is EventType.LOG
        event_split = "train" if is_log else data.get("split", "validation")
        if split is not None and event_split != split:
            continue
        if task is not None:
            if task not in (data.get("tasks") or {}):
                continue
            data = {**data, "tasks": {task: data["tasks"][task]}}
            data.pop("mean", None)
        items.append({**event.model_dump(mode="json"), "split": event_split, "data": data})
    items.sort(key=lambda e: (e["step"], e["type"] != EventType.LOG, e["time"]))
    return MetricsOut(job_id=job.id, items=items)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Server-sent events: logs, evaluations, checkpoints, state changes",
    responses=error_responses(401, 404, 503, json_content=True),
)
async def stream_events(
    request: Request,
    job: JobDep,
    jobs: JobStoreDep,
    settings: SettingsDep,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            pattern=STREAM_ID.pattern,
            description="resume after this event id",
        ),
    ] = None,
    after: Annotated[
        str | None,
        Query(
            pattern=STREAM_ID.pattern,
            description="like Last-Event-ID, for clients that cannot set headers",
        ),
    ] = None,
) -> AsyncIterator[ServerSentEvent]:
    """Every event has its Redis stream id as `id`: reconnect with `Last-Event-ID` to get
    exactly the events missed. Comments keep idle connections alive; after the job reaches a
    terminal state the stream sends `end` and closes. If the job store (Redis) goes away the
    stream sends `error` (`{"detail"}`, no `id`) and closes: reconnect with `Last-Event-ID`."""
    hubs: HubRegistry = request.app.state.hubs
    cursor = last_event_id or after or "0-0"
    events_sent = request.app.state.metrics.events
    async for message in server_sent_events(
        hubs, jobs, job.id, cursor, settings.sse_keepalive_s, on_event=events_sent.inc
    ):
        yield message


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=CancelOut,
    summary="Cancel a job",
    responses={
        **error_responses(404),
        409: {"model": ConflictOut, "description": "the job already succeeded or failed"},
    },
)
async def cancel_job(job: JobDep, jobs: JobStoreDep) -> CancelOut:
    """A queued job is cancelled at once (it never starts); a running one stops within one
    training step and keeps its last checkpoint. Idempotent."""
    cancelled = await jobs.cancel(job.id)
    if cancelled.outcome is CancelOutcome.MISSING:
        raise NotFound(f"job {job.id} not found")
    if cancelled.outcome is CancelOutcome.FINISHED:
        raise Conflict(f"job {job.id} already {cancelled.previous}", cancelled.previous)
    return CancelOut(id=job.id, state=JobState(cancelled.outcome))


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a finished job (its keys and files)",
    responses={
        **error_responses(404),
        409: {"model": ConflictOut, "description": "the job has not finished"},
    },
)
async def delete_job(
    job: JobDep,
    owner: OwnerDep,
    jobs: JobStoreDep,
    storage: StorageDep,
    predictors: PredictorsDep,
) -> Response:
    deleted = await jobs.delete(job.id, owner)
    if deleted.outcome is DeleteOutcome.MISSING:
        raise NotFound(f"job {job.id} not found")
    if deleted.outcome is DeleteOutcome.NOT_FINISHED:
        raise Conflict(f"job {job.id} is {deleted.state}: cancel it first", deleted.state)
    await delete_job_files(job, storage, predictors)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{job_id}/model",
    response_class=FileResponse,
    summary="The exported model as a .tar.gz",
    responses={
        **error_responses(404),
        200: {"content": {"application/gzip": {}}},
        409: {"model": ConflictOut, "description": "not yet"},
    },
)
async def download_model(
    job: JobDep, storage: StorageDep, fmt: ModelFormatQuery = "pytorch"
) -> Response:
    """A `model/` folder: the encoder (`transformers.AutoModel.from_pretrained`), tokenizer,
    `heads.safetensors` and `mtl.json` (tasks, labels, pooling)."""
    suffix = "model.onnx" if fmt == "onnx" else "model"
    return await model_download(job, storage, f"{job.id}-{suffix}.tar.gz", fmt)


@router.post(
    "/{job_id}/predict",
    response_model=PredictOut,
    summary="Classify texts",
    responses={
        **error_responses(400, 404, 413),
        409: {"model": ConflictOut, "description": "the job has no usable model (yet)"},
    },
)
async def predict(
    request: Request,
    body: PredictIn,
    job: JobDep,
    settings: SettingsDep,
    storage: StorageDep,
    predictors: PredictorsDep,
) -> PredictOut:
    """Runs in the API process (threads), so it never waits behind training jobs."""
    predictions = await predict_texts(
        job, body.texts, settings, storage, predictors, request.app.state.predict_limiter
    )
    return PredictOut(job_id=job.id, predictions=predictions)
