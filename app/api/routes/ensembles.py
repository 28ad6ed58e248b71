"""/v1/ensembles: several succeeded jobs' models of the same tasks (for example a study's best
trials) as one model whose prediction is the mean of their probabilities; download and predict
as for a job.

The API builds the ensemble itself (`mtl.ensemble`, in a worker thread): copies of the members'
models under `ensembles/<id>/model` in the artifact store, so it outlives their jobs.
"""

from __future__ import annotations

import time
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from app.api.deps import (
    EnsembleStoreDep,
    JobStoreDep,
    ModelFormatQuery,
    OwnerDep,
    PredictorsDep,
    SettingsDep,
    StorageDep,
)
from app.api.routes.studies import StudiesDep
from app.api.schemas import (
    MAX_ENSEMBLE_MEMBERS,
    MAX_OFFSET,
    ConflictOut,
    EnsembleCreate,
    EnsembleFromJobs,
    EnsembleFromStudy,
    EnsembleLinks,
    EnsembleList,
    EnsembleOut,
    PredictIn,
    PredictOut,
    error_responses,
)
from app.api.validation import body_openapi, parse_body
from app.core.ensembles import Member, build_ensemble
from app.core.errors import Conflict, Invalid, NotFound
from app.core.models import model_download, model_prefix, predict_texts
from service.async_store import AsyncJobStore
from service.ensembles import best_trials, new_ensemble_id
from service.records import EnsembleRecord, JobRecord
from service.storage import ensemble_key
from service.studies.store import AsyncStudyStore

__all__ = ["router"]

router = APIRouter(prefix="/v1/ensembles", tags=["ensembles"], responses=error_responses(401, 503))

#: the fewest members of an ensemble (`mtl.ensemble` refuses fewer)
MIN_MEMBERS = 2

EnsembleIdPath = Annotated[
    str, PathParam(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
]


async def get_ensemble(
    ensemble_id: EnsembleIdPath, owner: OwnerDep, ensembles: EnsembleStoreDep
) -> EnsembleRecord:
    """The ensemble; another owner's ensemble is reported exactly like an unknown id."""
    record = await ensembles.get(ensemble_id, owner)
    if record is None:
        raise NotFound(f"ensemble {ensemble_id} not found")
    return record


EnsembleDep = Annotated[EnsembleRecord, Depends(get_ensemble)]


async def valid_ensemble(request: Request) -> EnsembleFromJobs | EnsembleFromStudy:
    """The body, parsed strictly once (`EnsembleCreate`: a list of jobs, or a study's best)."""
    body = parse_body(EnsembleCreate, await request.body(), request.headers.get("content-type"))
    return body.root


ValidEnsembleDep = Annotated[EnsembleFromJobs | EnsembleFromStudy, Depends(valid_ensemble)]


def _links(ensemble_id: str) -> EnsembleLinks:
    base = f"/v1/ensembles/{ensemble_id}"
    return EnsembleLinks(self=base, model=f"{base}/model", predict=f"{base}/predict")


def ensemble_out(record: EnsembleRecord) -> EnsembleOut:
    return EnsembleOut(**record.model_dump(), links=_links(record.id))


def _member(record: JobRecord, label: str, loc: list[str | int]) -> Member:
    """A job that may join: succeeded (else 409), with its exported model (else 422)."""
    try:
        prefix = model_prefix(record, label)
    except Conflict as exc:
        raise Conflict(
            f"{label} is {record.state}: only a succeeded job's model can join an ensemble",
            exc.state,
        ) from None
    except NotFound as exc:
        raise Invalid(exc.message, loc) from None
    return Member(job_id=record.id, prefix=prefix, label=label, loc=loc)


async def _job_members(body: EnsembleFromJobs, owner: str, jobs: AsyncJobStore) -> list[Member]:
    members = []
    for i, job_id in enumerate(body.jobs):
        record = await jobs.get(job_id, owner)
        if record is None:
            raise NotFound(f"job {job_id} not found")
        members.append(_member(record, f"jobs[{i}] (job {job_id})", ["body", "jobs", i]))
    return members


async def _study_members(
    body: EnsembleFromStudy,
    owner: str,
    studies: AsyncStudyStore,
    jobs: AsyncJobStore,
) -> tuple[list[Member], list[int]]:
    """Every job of the study's `top` best completed search trials, best trial first."""
    study = await studies.get(body.study, owner)
    if study is None:
        raise NotFound(f"study {body.study} not found")
    spec = await studies.spec(study.id)
    maximize = spec.objective.maximize if spec is not None else True
    chosen = best_trials(await studies.trials(study.id), maximize, body.top)
    if len(chosen) < body.top:
        raise Conflict(
            f"study {study.id} has {len(chosen)} completed search trials, fewer than top "
            f"({body.top})",
            study.state,
        )
    pairs = [(trial.number, job_id) for trial in chosen for job_id in trial.jobs]
    if not MIN_MEMBERS <= len(pairs) <= MAX_ENSEMBLE_MEMBERS:
        raise Invalid(
            f"the {body.top} best trials of study {study.id} have {len(pairs)} jobs: an "
            f"ensemble has {MIN_MEMBERS} to {MAX_ENSEMBLE_MEMBERS} members",
            ["body", "top"],
        )
    members = []
    for number, job_id in pairs:
        record = await jobs.get(job_id, owner)
        if record is None:
            raise NotFound(f"job {job_id} (trial {number} of study {study.id}) not found")
        label = f"job {job_id} (trial {number})"
        members.append(_member(record, label, ["body", "study"]))
    return members, [trial.number for trial in chosen]


# ------------------------------------------------------------------------------ routes


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=EnsembleOut,
    summary="Make an ensemble of jobs' models (or of a study's best trials)",
    openapi_extra=body_openapi(
        "EnsembleCreate",
        {
            "jobs": {
                "summary": "Two jobs",
                "value": {"jobs": ["job_0123456789abcdef0123", "job_fedcba9876543210fedc"]},
            },
            "study": {
                "summary": "A study's 3 best trials (every seed's job)",
                "value": {"name": "best three", "study": "study_0123456789abcdef0123", "top": 3},
            },
        },
    ),
    responses={
        **error_responses(400, 413),
        404: {
            **error_responses(404)[404],
            "description": "a job or the study is not found (or belongs to another key)",
        },
        409: {
            "model": ConflictOut,
            "description": "a job has not succeeded, or the study has fewer completed trials",
        },
        422: {
            "description": "invalid body, or a job whose tasks or labels differ from the first's "
            '(`detail[].loc` names it: `["body", "jobs", i]`)'
        },
    },
)
async def create_ensemble(
    response: Response,
    body: ValidEnsembleDep,
    owner: OwnerDep,
    jobs: JobStoreDep,
    studies: StudiesDep,
    ensembles: EnsembleStoreDep,
    storage: StorageDep,
) -> EnsembleOut:
    """Every member must be a succeeded job of this key with an exported model, and all must
    have the same tasks and, per task, the same labels in the same order. The members' models
    are copied into the ensemble, so deleting a job later leaves it whole. Its prediction is
    the mean of the members' probabilities (equal weights)."""
    trials: list[int] | None = None
    if isinstance(body, EnsembleFromStudy):
        members, trials = await _study_members(body, owner, studies, jobs)
        study_id: str | None = body.study
    else:
        members = await _job_members(body, owner, jobs)
        study_id = None
    ensemble_id = new_ensemble_id()
    tasks = await anyio.to_thread.run_sync(build_ensemble, storage, ensemble_id, members)
    record = EnsembleRecord(
        id=ensemble_id,
        owner=owner,
        name=body.name,
        members=[m.job_id for m in members],
        study_id=study_id,
        trials=trials,
        created_at=time.time(),
        tasks=tasks,
    )
    try:
        await ensembles.create(record)
    except BaseException:
        await anyio.to_thread.run_sync(storage.delete, ensemble_key(ensemble_id))
        raise
    response.headers["Location"] = f"/v1/ensembles/{ensemble_id}"
    return ensemble_out(record)


@router.get("", response_model=EnsembleList, summary="List ensembles (newest first)")
async def list_ensembles(
    request: Request,
    owner: OwnerDep,
    ensembles: EnsembleStoreDep,
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> EnsembleList:
    limit = min(limit, settings.page_size_max)
    records, total = await ensembles.page(owner, offset, limit)
    nxt = None
    if offset + limit < total:
        nxt = str(request.url.include_query_params(offset=offset + limit, limit=limit))
    return EnsembleList(
        items=[ensemble_out(r) for r in records], total=total, offset=offset, limit=limit, next=nxt
    )


@router.get(
    "/{ensemble_id}",
    response_model=EnsembleOut,
    summary="An ensemble: its members, tasks and labels",
    responses=error_responses(404),
)
async def get_ensemble_detail(ensemble: EnsembleDep) -> EnsembleOut:
    return ensemble_out(ensemble)


@router.delete(
    "/{ensemble_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an ensemble (its record and folder; the member jobs stay)",
    responses=error_responses(404),
)
async def delete_ensemble(
    ensemble: EnsembleDep,
    owner: OwnerDep,
    ensembles: EnsembleStoreDep,
    storage: StorageDep,
    predictors: PredictorsDep,
) -> Response:
    if not await ensembles.delete(ensemble.id, owner):
        raise NotFound(f"ensemble {ensemble.id} not found")
    key = ensemble_key(ensemble.id)
    predictors.evict(storage.staged_path(f"{key}/model"))
    await anyio.to_thread.run_sync(storage.delete, key)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{ensemble_id}/model",
    response_class=FileResponse,
    summary="The ensemble as a .tar.gz",
    responses={**error_responses(404), 200: {"content": {"application/gzip": {}}}},
)
async def download_ensemble(
    ensemble: EnsembleDep, storage: StorageDep, fmt: ModelFormatQuery = "pytorch"
) -> Response:
    """A `model/` folder: `mtl.json` (`"kind": "ensemble"`, the members and their weights, the
    tasks) and each member's exported model under `members/<i>/`; `mtl predict model ...` and
    `mtl.predict.Predictor.load` use it as one model."""
    suffix = "model.onnx" if fmt == "onnx" else "model"
    return await model_download(
        ensemble_key(ensemble.id), storage, f"{ensemble.id}-{suffix}.tar.gz", fmt
    )


@router.post(
    "/{ensemble_id}/predict",
    response_model=PredictOut,
    summary="Classify texts with the ensemble (the mean of its members' probabilities)",
    responses={
        **error_responses(400, 404, 413),
        409: {"model": ConflictOut, "description": "the model cannot be used"},
    },
)
async def predict_ensemble(
    request: Request,
    body: PredictIn,
    ensemble: EnsembleDep,
    settings: SettingsDep,
    storage: StorageDep,
    predictors: PredictorsDep,
) -> PredictOut:
    """The body, limits and answer of `POST /v1/jobs/{id}/predict` (`job_id` is the ensemble's
    id); every member's model runs, in the API process."""
    predictions = await predict_texts(
        ensemble_key(ensemble.id),
        body.texts,
        settings,
        storage,
        predictors,
        request.app.state.predict_limiter,
    )
    return PredictOut(job_id=ensemble.id, predictions=predictions)
