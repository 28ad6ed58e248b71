"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    StringConstraints,
    field_validator,
    model_validator,
)

from mtl.config import TrainConfig
from mtl.datafiles.reading import is_valid_unicode
from service.records import (
    BestScores,
    DatasetRecord,
    EnsembleRecord,
    FinalScores,
    JobState,
    LatestScores,
    Priority,
)
from service.studies.records import StudyRecord, StudyState, TrialRecord

__all__ = [
    "MAX_OFFSET",
    "CancelOut",
    "ConflictOut",
    "DatasetList",
    "DatasetOut",
    "EnsembleCreate",
    "EnsembleFromJobs",
    "EnsembleFromStudy",
    "EnsembleLinks",
    "EnsembleList",
    "EnsembleOut",
    "ErrorOut",
    "JobCreate",
    "JobList",
    "JobOut",
    "MetricsOut",
    "PredictIn",
    "PredictOut",
    "StudyCancelOut",
    "StudyDetail",
    "StudyLinks",
    "StudyList",
    "StudyOut",
    "error_responses",
    "example_job",
]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: the largest `offset` of a list page (Redis range indices are signed 64-bit; no list is
#: anywhere near this long)
MAX_OFFSET = 1_000_000_000


class ErrorOut(BaseModel):
    """The body of every error answer except 409 and 422."""

    detail: str


class ConflictOut(BaseModel):
    """409: the resource's state forbids the action; `state` is that state."""

    detail: str
    state: str | None = None


_ERRORS: dict[int, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "the body is not valid JSON (or multipart form data)"},
    401: {"model": ErrorOut, "description": "no API key, an unknown one, or a key in the URL"},
    404: {
        "model": ErrorOut,
        "description": "no such id for this API key (another key's ids get the same answer)",
    },
    409: {"model": ConflictOut, "description": "the resource's state forbids this"},
    413: {
        "model": ErrorOut,
        "description": "the request body is larger than the cap (a body whose Content-Length "
        "is already over it gets the plain text `Content Too Large`, before it is read)",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
    503: {"model": ErrorOut, "description": "the job store (Redis) is unavailable"},
}


def error_responses(*codes: int, json_content: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the listed error codes (the routes' own descriptions win).

    `json_content`: spell the content out as `application/json` (a route whose own media type
    is another, e.g. the event stream, would otherwise document its errors under that type).
    """
    if not json_content:
        return {code: dict(_ERRORS[code]) for code in codes}
    return {
        code: {
            "description": _ERRORS[code]["description"],
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{_ERRORS[code]['model'].__name__}"}
                }
            },
        }
        for code in codes
    }


@cache
def example_job() -> dict[str, Any]:
    """The two-task dummy job that Swagger UI offers (runs on CPU in seconds)."""
    # a path beside the package (not importlib.resources: an editable install made before
    # app/ had an __init__.py maps it as a namespace package, which resources cannot read)
    return json.loads(EXAMPLES.joinpath("dummy_job.json").read_text("utf-8"))


class JobCreate(TrainConfig):
    """The training config (the same schema `mtl train` reads), plus an optional `name` and
    the job's `priority` (neither is part of the config the worker trains with)."""

    name: str | None = Field(None, max_length=200, description="a label for people")
    priority: Priority = Field(
        "normal",
        description="high jobs start before normal ones, normal before low (among the jobs "
        "waiting for the same workers); a running job is never interrupted",
    )

    def train_config_json(self) -> str:
        """The training config alone, as the worker reads it."""
        return self.model_dump_json(exclude={"name", "priority"})


class Links(BaseModel):
    self: str
    events: str
    metrics: str
    cancel: str
    model: str
    predict: str


class Progress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: int | None = None
    elapsed: float | None = Field(None, description="seconds of training, over all attempts")
    eta: float | None = Field(None, description="seconds to the last step at the pace so far")
    fraction: float | None = None
    updated_at: float | None = None


class JobOut(BaseModel):
    id: str
    name: str | None = None
    state: JobState
    attempt: int
    max_attempts: int
    restarts: int = 0
    queue_position: int | None = Field(None, description="1 = next to start (while queued)")
    queued_reason: str | None = Field(
        None, description="why it has not started yet (while queued): workers, limits, its place"
    )
    priority: Priority = "normal"
    devices: int = Field(1, description="the devices it trains on")
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress
    latest_metrics: dict[str, dict[str, LatestScores]] = Field(
        default_factory=dict, description="task -> split -> latest values"
    )
    best_metrics: dict[str, BestScores] = Field(
        default_factory=dict,
        description="task -> its values at the best validation (by the monitor metric): the "
        "evaluation whose checkpoint is exported",
    )
    final_metrics: FinalScores | None = Field(
        None, description="the exported model's validation and test scores"
    )
    checkpoint_step: int | None = None
    cancel_requested: bool = False
    error: str | None = None
    has_model: bool = False
    study_id: str | None = Field(None, description="the study this job is a trial of")
    trial: int | None = Field(None, description="its trial number in that study")
    links: Links


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    offset: int
    limit: int
    next: str | None = None


class CancelOut(BaseModel):
    id: str
    state: JobState


class MetricsOut(BaseModel):
    job_id: str
    items: list[dict[str, Any]] = Field(
        description="log and evaluate events, ordered by step: {type, attempt, step, time, data}"
    )


class PredictIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(..., min_length=1, description="texts to classify")

    @field_validator("texts")
    @classmethod
    def _unicode(cls, texts: list[str]) -> list[str]:
        for i, text in enumerate(texts):
            if not is_valid_unicode(text):
                raise ValueError(f"text {i} is not valid Unicode (a lone surrogate escape)")
        return texts


class PredictOut(BaseModel):
    job_id: str = Field(
        description="the job whose model answered (a study's best trial's job), or the ensemble"
    )
    predictions: list[dict[str, Any]] = Field(
        description="one per text: task -> {label, probabilities: {label: p}}"
    )


#: a dataset, as the API returns it (the record itself: defined once, in `service.records`)
DatasetOut = DatasetRecord


class DatasetList(BaseModel):
    items: list[DatasetOut]
    total: int
    offset: int
    limit: int
    next: str | None = None


# ------------------------------------------------------------------------------------ studies


class StudyLinks(BaseModel):
    self: str
    events: str
    cancel: str
    model: str
    predict: str


class StudyOut(StudyRecord):
    """A study: its state, budget, best trial and (once over) the multi-task verdict."""

    links: StudyLinks


class StudyDetail(StudyOut):
    trials: list[TrialRecord] = Field(
        description="the leaderboard: completed trials best first, then the others"
    )


class StudyList(BaseModel):
    items: list[StudyOut]
    total: int
    offset: int
    limit: int
    next: str | None = None


class StudyCancelOut(BaseModel):
    id: str
    state: StudyState


# ---------------------------------------------------------------------------------- ensembles

#: the most members of an ensemble (each is a whole model in the API's memory when it predicts)
MAX_ENSEMBLE_MEMBERS = 16

Id = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]


class EnsembleFromJobs(BaseModel):
    """An ensemble of the listed jobs' models: succeeded jobs of this key, same tasks and labels."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200, description="a label for people")
    jobs: list[Id] = Field(
        ...,
        min_length=2,
        max_length=MAX_ENSEMBLE_MEMBERS,
        json_schema_extra={"uniqueItems": True},
        description="job ids, in order (their predictions get equal weights)",
    )

    @field_validator("jobs")
    @classmethod
    def _distinct(cls, jobs: list[str]) -> list[str]:
        for i, job_id in enumerate(jobs):
            if job_id in jobs[:i]:
                raise ValueError(f"jobs[{i}] repeats jobs[{jobs.index(job_id)}]")
        return jobs


class EnsembleFromStudy(BaseModel):
    """An ensemble of a study's `top` best completed search trials: every job of each (one per
    seed or fold), best trial first."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200, description="a label for people")
    study: Id = Field(..., description="a study id of this key")
    top: int = Field(..., ge=1, le=MAX_ENSEMBLE_MEMBERS, description="how many trials")


class EnsembleCreate(RootModel[EnsembleFromJobs | EnsembleFromStudy]):
    """`{"jobs": [...]}` or `{"study": id, "top": k}`, each with an optional `name`. A body with
    `study` is read as the second kind, any other as the first (so a 422 names the field of
    the kind meant, not of both)."""

    @model_validator(mode="wrap")
    @classmethod
    def _one_kind(cls, data: Any, handler: Any) -> Any:
        if isinstance(data, EnsembleCreate | EnsembleFromJobs | EnsembleFromStudy):
            return handler(data)
        study = isinstance(data, dict) and "study" in data
        model = EnsembleFromStudy if study else EnsembleFromJobs
        return cls.model_construct(model.model_validate(data, strict=True))


class EnsembleLinks(BaseModel):
    self: str
    model: str
    predict: str


class EnsembleOut(EnsembleRecord):
    """An ensemble: its members (job ids), the study and trials they come from, its tasks."""

    links: EnsembleLinks


class EnsembleList(BaseModel):
    items: list[EnsembleOut]
    total: int
    offset: int
    limit: int
    next: str | None = None
