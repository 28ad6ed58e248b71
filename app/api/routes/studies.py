"""/v1/studies: submit a search, follow it, cancel, delete; its model is its best trial's.

A study runs on the workers (`worker.studies`): the API stores the request, answers at once
(202) and reads what the driver writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response, status
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.api.deps import (
    DatasetStoreDep,
    JobStoreDep,
    ModelFormatQuery,
    OwnerDep,
    PredictorsDep,
    SettingsDep,
    StorageDep,
)
from app.api.schemas import (
    MAX_OFFSET,
    ConflictOut,
    PredictIn,
    PredictOut,
    StudyCancelOut,
    StudyDetail,
    StudyLinks,
    StudyList,
    StudyOut,
    error_responses,
)
from app.api.validation import (
    body_openapi,
    check_budget,
    check_model_name,
    check_sources,
    parse_body,
)
from app.core.errors import Conflict, Invalid, NotFound
from app.core.events import HubRegistry, server_sent_events
from app.core.models import delete_job_files, model_download, predict_texts
from mtl.config import TrainConfig
from service.async_store import DeleteOutcome
from service.configs import parse_strict
from service.records import JobRecord
from service.settings import Settings
from service.studies.records import (
    STUDY_TERMINAL,
    StudyRecord,
    StudyState,
    TrialKind,
    TrialRecord,
    TrialState,
)
from service.studies.spec import SpaceError, StudyCreate, apply_params, check_space, corners
from service.studies.store import AsyncStudyStore, new_study_id

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/studies", tags=["studies"], responses=error_responses(401, 503))

STREAM_ID = r"^\d{1,20}-\d{1,20}$"
#: task fields a search may not change (the data a job reads is checked once, on submit)
_FIXED_TASK_FIELDS = (".data", ".name", ".labels", ".num_classes", ".label_column")


async def get_studies(request: Request) -> AsyncStudyStore:
    return request.app.state.studies


StudiesDep = Annotated[AsyncStudyStore, Depends(get_studies)]
StudyIdPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]


async def get_study(study_id: StudyIdPath, owner: OwnerDep, studies: StudiesDep) -> StudyRecord:
    """The study; another owner's study is reported exactly like an unknown id."""
    record = await studies.get(study_id, owner)
    if record is None:
        raise NotFound(f"study {study_id} not found")
    return record


StudyDep = Annotated[StudyRecord, Depends(get_study)]


def _fixed_path(path: str) -> bool:
    if path.startswith("data."):
        return path.split(".")[1] in ("kind", "train", "validation", "test", "format", "folds")
    if path.startswith("tasks."):
        return any(path.endswith(f) or f + "." in path for f in _FIXED_TASK_FIELDS)
    return path.startswith("encoder.random_init")


async def valid_study(
    request: Request,
    owner: OwnerDep,
    datasets: DatasetStoreDep,
    settings: SettingsDep,
) -> tuple[StudyCreate, int]:
    """The study in the body, parsed strictly once and checked: its base config like a job
    body (model name, datasets), every search path in the schema, each range end and choice
    valid, the objective's tasks and labels known. Returns it with its planned trial count."""
    study = parse_body(StudyCreate, await request.body(), request.headers.get("content-type"))
    try:
        base = check_space(study)
    except SpaceError as exc:
        raise Invalid(str(exc), exc.loc) from None
    for i, param in enumerate(study.search_space):
        if _fixed_path(param.path):
            raise Invalid(
                f"{param.path} cannot be searched: the data, the tasks and their labels are "
                "the study's, fixed",
                ["body", "search_space", i, "path"],
            )
        kind = "float" if param.float else "int" if param.int else "choice"
        for j, value in enumerate(corners(param)):
            corner = parse_strict(TrainConfig, apply_params(study.base, {param.path: value}))
            at: list[str | int] = ["body", "search_space", i, kind]
            if kind == "choice":
                at.append(j)
            _rebase(check_model_name, corner, settings, at=at)
            _rebase(check_budget, corner, settings, at=at)
    if study.sampler == "grid" and any(p.float is not None for p in study.search_space):
        raise Invalid(
            "the grid sampler needs choices or int ranges, not float ranges",
            ["body", "sampler"],
        )
    limit = settings.max_active_jobs_per_key
    runs = len(study.selection.variants())
    if limit and study.budget.parallel * runs > limit:
        raise Invalid(
            f"{study.budget.parallel} trials at once of {runs} jobs each exceed "
            f"this key's limit of {limit} active jobs",
            ["body", "budget", "parallel"],
        )
    _rebase(check_model_name, base, settings, at=["body", "base"])
    _rebase(check_budget, base, settings, at=["body", "base"])
    try:
        await check_sources(base, owner, datasets, settings)
    except Invalid as exc:
        raise Invalid(exc.message, ["body", "base", *exc.loc[1:]], exc.type) from None
    planned = study.budget.trials
    if study.sampler == "grid":
        size = 1
        for param in study.search_space:
            size *= (
                len(param.choice)
                if param.choice
                else len(
                    range(param.int.low, param.int.high + 1, param.int.step)  # type: ignore[union-attr]
                )
            )
        planned = min(planned, size)
    return study, planned


def _rebase(
    check: Callable[[TrainConfig, Settings], None],
    config: TrainConfig,
    settings: Settings,
    *,
    at: list[str | int],
) -> None:
    """Run a job check on a study's config, its error located at `at` in the study body."""
    try:
        check(config, settings)
    except Invalid as exc:
        raise Invalid(exc.message, [*at, *exc.loc[1:]], exc.type) from None


ValidStudyDep = Annotated[tuple[StudyCreate, int], Depends(valid_study)]


def _links(study_id: str) -> StudyLinks:
    base = f"/v1/studies/{study_id}"
    return StudyLinks(
        self=base,
        events=f"{base}/events",
        cancel=f"{base}/cancel",
        model=f"{base}/model",
        predict=f"{base}/predict",
    )


def study_out(record: StudyRecord) -> StudyOut:
    return StudyOut(**record.model_dump(), links=_links(record.id))


def leaderboard(trials: list[TrialRecord], maximize: bool) -> list[TrialRecord]:
    """Completed search trials best first, then the other search trials by number, then the
    baselines (their scores are not the search's: a single-task one scores one task)."""
    search = [t for t in trials if t.kind is TrialKind.SEARCH]
    done = [t for t in search if t.state is TrialState.COMPLETE and t.value is not None]
    done.sort(key=lambda t: -(t.value or 0.0) if maximize else (t.value or 0.0))
    rest = sorted((t for t in search if t not in done), key=lambda t: t.number)
    baselines = sorted((t for t in trials if t.kind is TrialKind.BASELINE), key=lambda t: t.number)
    return done + rest + baselines


async def _model_job(study: StudyRecord, jobs: JobStoreDep) -> JobRecord:
    if study.model_job is None:
        raise Conflict(
            f"study {study.id} has no model yet: it is the best trial's, once one completes",
            study.state,
        )
    job = await jobs.get(study.model_job, study.owner)
    if job is None:
        raise NotFound(f"the best trial's job {study.model_job} was deleted")
    return job


# ------------------------------------------------------------------------------ routes


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=StudyOut,
    summary="Start a study: search the setup that works, and compare with single-task models",
    openapi_extra=body_openapi("StudyCreate"),
    responses={
        **error_responses(400, 413),
        422: {"description": "invalid request; `detail[].loc` names the field"},
    },
)
async def submit_study(
    response: Response, study: ValidStudyDep, owner: OwnerDep, studies: StudiesDep
) -> StudyOut:
    spec, planned = study
    record = StudyRecord(
        id=new_study_id(),
        owner=owner,
        name=spec.name,
        created_at=time.time(),
        trials_planned=planned,
    )
    await studies.create(record, spec)
    response.headers["Location"] = f"/v1/studies/{record.id}"
    return study_out(record)


@router.get("", response_model=StudyList, summary="List studies (newest first)")
async def list_studies(
    request: Request,
    owner: OwnerDep,
    studies: StudiesDep,
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> StudyList:
    limit = min(limit, settings.page_size_max)
    records, total = await studies.page(owner, offset, limit)
    nxt = None
    if offset + limit < total:
        nxt = str(request.url.include_query_params(offset=offset + limit, limit=limit))
    return StudyList(
        items=[study_out(r) for r in records], total=total, offset=offset, limit=limit, next=nxt
    )


@router.get(
    "/{study_id}",
    response_model=StudyDetail,
    summary="A study: state, leaderboard, best parameters, importances, the verdict",
    responses=error_responses(404),
)
async def get_study_detail(study: StudyDep, studies: StudiesDep) -> StudyDetail:
    spec = await studies.spec(study.id)
    maximize = spec.objective.maximize if spec is not None else True
    trials = leaderboard(await studies.trials(study.id), maximize)
    return StudyDetail(**study_out(study).model_dump(), trials=trials)


@router.get(
    "/{study_id}/events",
    response_class=EventSourceResponse,
    summary="Server-sent events: trial queued / reported / pruned / finished / failed, new best",
    responses=error_responses(401, 404, 503, json_content=True),
)
async def stream_study_events(
    request: Request,
    study: StudyDep,
    studies: StudiesDep,
    settings: SettingsDep,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", pattern=STREAM_ID, description="resume after this id"),
    ] = None,
    after: Annotated[str | None, Query(pattern=STREAM_ID, description="like Last-Event-ID")] = None,
) -> AsyncIterator[ServerSentEvent]:
    """Like a job's stream: every event has its stream id as `id` (reconnect with
    `Last-Event-ID`), and `end` follows the study's terminal state; `error` (`{"detail"}`)
    when the store (Redis) goes away: reconnect with `Last-Event-ID`."""
    hubs: HubRegistry = request.app.state.study_hubs
    cursor = last_event_id or after or "0-0"
    async for message in server_sent_events(
        hubs, studies, study.id, cursor, settings.sse_keepalive_s
    ):
        yield message


@router.post(
    "/{study_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=StudyCancelOut,
    summary="Cancel a study: its running trials are cancelled and no new one starts",
    responses={
        **error_responses(404),
        409: {"model": ConflictOut, "description": "the study is already over"},
    },
)
async def cancel_study(study: StudyDep, studies: StudiesDep) -> StudyCancelOut:
    if study.state in (StudyState.SUCCEEDED, StudyState.FAILED):
        raise Conflict(f"study {study.id} already {study.state}", study.state)
    if study.state is not StudyState.CANCELLED:
        await studies.request_cancel(study.id)
    state = study.state if study.state is StudyState.CANCELLED else StudyState.CANCELLING
    return StudyCancelOut(id=study.id, state=state)


@router.delete(
    "/{study_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a finished study, its trials' jobs and their files",
    responses={
        **error_responses(404),
        409: {"model": ConflictOut, "description": "the study has not finished"},
    },
)
async def delete_study(
    study: StudyDep,
    owner: OwnerDep,
    studies: StudiesDep,
    jobs: JobStoreDep,
    storage: StorageDep,
    predictors: PredictorsDep,
) -> Response:
    if study.state not in STUDY_TERMINAL:
        raise Conflict(f"study {study.id} is {study.state}: cancel it first", study.state)
    for trial in await studies.trials(study.id):
        for job_id in trial.jobs:
            record = await jobs.get(job_id, owner)
            deleted = await jobs.delete(job_id, owner)
            if deleted.outcome is DeleteOutcome.DELETED and record is not None:
                await delete_job_files(record, storage, predictors)
    await studies.delete(study.id, owner)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{study_id}/model",
    response_class=FileResponse,
    summary="The study's model (its best trial's) as a .tar.gz",
    responses={
        **error_responses(404),
        200: {"content": {"application/gzip": {}}},
        409: {"model": ConflictOut, "description": "no completed trial yet"},
    },
)
async def download_study_model(
    study: StudyDep, jobs: JobStoreDep, storage: StorageDep, fmt: ModelFormatQuery = "pytorch"
) -> Response:
    job = await _model_job(study, jobs)
    suffix = "model.onnx" if fmt == "onnx" else "model"
    return await model_download(job, storage, f"{study.id}-{suffix}.tar.gz", fmt)


@router.post(
    "/{study_id}/predict",
    response_model=PredictOut,
    summary="Classify texts with the study's model (its best trial's)",
    responses={
        **error_responses(400, 404, 413),
        409: {"model": ConflictOut, "description": "no usable model yet"},
    },
)
async def predict_study(
    request: Request,
    body: PredictIn,
    study: StudyDep,
    jobs: JobStoreDep,
    settings: SettingsDep,
    storage: StorageDep,
    predictors: PredictorsDep,
) -> PredictOut:
    job = await _model_job(study, jobs)
    predictions = await predict_texts(
        job, body.texts, settings, storage, predictors, request.app.state.predict_limiter
    )
    return PredictOut(job_id=job.id, predictions=predictions)
