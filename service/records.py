"""The job service's records, defined once: the job record, the event envelope, their states.

The worker writes them, the API reads and returns them, the CLI client reads them back.

* `JobRecord`: the job hash in Redis (`{p}:job:{id}`), the source of truth of a job. Redis
  keeps strings; `JobRecord.from_hash` parses them (numbers, flags, the JSON fields).
* `Event`: the envelope of every entry of a job's event stream (and of its metric history):
  ``{"type", "attempt", "step", "time", "data"}``. The Lua scripts write the same shape for
  `state` events (`service/lua/lib.lua`). `data` is the payload: a training log or an
  evaluation report (`mtl.callbacks` documents both), a checkpoint, a state change, a resume.
* `DatasetRecord`: an uploaded dataset (`{p}:dataset:{id}`, beside its owner).
* `EnsembleRecord`: an ensemble of jobs' models (`{p}:ensemble:{id}`; `mtl.ensemble`).
* Scores: `mtl.summary.TaskScores` per task, here with the step they belong to (`latest`) or
  with the monitored metric that made them the best (`best`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mtl.summary import SplitScores, TaskScores

__all__ = [
    "ACTIVE_STATES",
    "PRIORITIES",
    "TERMINAL_STATES",
    "BestScores",
    "DatasetRecord",
    "EnsembleRecord",
    "Event",
    "EventType",
    "FinalScores",
    "JobRecord",
    "JobState",
    "LatestScores",
    "Priority",
    "json_default",
]


Priority = Literal["high", "normal", "low"]
#: in the order workers take them (service/queue.py; service/lua/lib.lua ranks them alike)
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset({JobState.RUNNING, JobState.CANCELLING})


class EventType(StrEnum):
    LOG = "log"  # a training log (per-task loss and accuracy, weights, lr)
    EVALUATE = "evaluate"  # an evaluation report (validation or test)
    CHECKPOINT = "checkpoint"
    STATE = "state"  # the job changed state
    RESUME = "resume"  # an attempt resumed from a checkpoint (older reports were dropped)


class Event(BaseModel):
    """One entry of a job's event stream."""

    type: EventType
    attempt: int
    step: int
    time: float
    data: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def make(cls, type_: EventType | str, attempt: int, step: int, data: Any) -> Event:
        return cls(type=EventType(type_), attempt=attempt, step=step, time=time.time(), data=data)

    def to_json(self) -> str:
        """Compact JSON, never NaN (strict JSON readers would refuse it)."""
        return json.dumps(
            self.model_dump(mode="json"),
            separators=(",", ":"),
            allow_nan=False,
            default=json_default,
        )


def json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


class LatestScores(TaskScores):
    """A task's latest numbers on one split (`train` is the latest training log)."""

    step: int


class BestScores(TaskScores):
    """A task's numbers at the best evaluation: the one the trainer marked best by its
    monitor (with `min_delta`), i.e. the checkpoint that is exported."""

    metric: str = Field(description="the monitored metric's name, e.g. macro_f1")
    mode: str = Field(description="max or min")
    value: float | None = Field(description="this task's value of `metric` at `step`")
    step: int


#: The exported model's scores, by split: validation (when it was monitored) and test (when
#: the data has a test split).
FinalScores = dict[str, SplitScores]


#: record fields Redis holds as numbers or JSON (everything else is a plain string)
_FLOATS = (
    "created_at", "updated_at", "queued_at", "started_at", "attempt_started_at",
    "finished_at", "elapsed", "eta", "progress_at", "cancel_requested_at",
)  # fmt: skip
_INTS = (
    "attempt", "max_attempts", "step", "total_steps", "epoch", "checkpoint_step", "restarts",
    "published", "created_ms", "trial", "devices",
)  # fmt: skip
_JSON = ("latest", "best", "final_metrics")
_FLAGS = ("cancel", "model", "held")


class JobRecord(BaseModel):
    """A job, as its hash in Redis holds it (see `service.store` for who writes what)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    owner: str
    name: str | None = None
    state: JobState
    attempt: int
    max_attempts: int
    restarts: int = 0
    created_at: float
    created_ms: int | None = None
    updated_at: float | None = None
    queued_at: float | None = None
    started_at: float | None = None
    attempt_started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = Field(None, description="the lease token of the running attempt")
    published: int | None = Field(None, description="the attempt whose message was sent")
    idem_key: str | None = None
    study_id: str | None = Field(None, description="the study this job is a trial of")
    trial: int | None = Field(None, description="its trial number in that study")
    # routing (service.queue)
    priority: Priority = "normal"
    devices: int = Field(1, description="the devices the job trains on (its config's)")
    queue: str | None = Field(None, description="its Celery queue; None: the base queue")
    held: bool = Field(
        False, description="queued but not sent to the workers: its key is at its device limit"
    )
    # progress
    step: int = 0
    total_steps: int | None = None
    epoch: int | None = None
    elapsed: float | None = None
    eta: float | None = None
    progress_at: float | None = None
    checkpoint_step: int | None = None
    # scores
    latest: dict[str, dict[str, LatestScores]] = Field(default_factory=dict)
    best: dict[str, BestScores] = Field(default_factory=dict)
    final_metrics: FinalScores | None = None
    # the end
    cancel: bool = False
    cancel_requested_at: float | None = None
    error: str | None = None
    stop_reason: str | None = None
    model: bool = Field(False, description="an exported model exists")
    # the artifact store (service.storage): pointers the fenced scripts write
    artifacts: str | None = Field(
        None, description="where the model lies in the store (`model/`, `model.tar.gz`)"
    )
    checkpoint: str | None = Field(None, description="the unit of the last checkpoint (remote)")
    checkpoint_best: str | None = Field(None, description="the unit of the best checkpoint")

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_hash(cls, raw: Mapping[str, str]) -> JobRecord:
        """The record from the strings Redis holds (empty strings are absent values)."""
        out: dict[str, Any] = {k: v for k, v in raw.items() if v != ""}
        for name in _FLOATS:
            if name in out:
                out[name] = float(out[name])
        for name in _INTS:
            if name in out:
                out[name] = int(float(out[name]))
        for name in _JSON:
            if name in out:
                out[name] = json.loads(out[name])
        for name in _FLAGS:
            out[name] = out.get(name) == "1"
        return cls.model_validate(out)


class DatasetRecord(BaseModel):
    """An uploaded dataset: its file and what inspecting it found (the owner is kept beside
    it in Redis, not in the record)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    source: str = Field(description="what a job config names: `dataset:<id>`")
    name: str | None = None
    filename: str | None = None
    format: Literal["csv", "jsonl"]
    size_bytes: int
    rows: int
    columns: list[str]
    label_values: dict[str, list[str]] = Field(description="column -> distinct values")
    capped: dict[str, bool] = Field(
        default_factory=dict, description="column -> more values than listed"
    )
    missing: dict[str, int] = Field(default_factory=dict, description="column -> empty cells")
    created_at: float


class EnsembleRecord(BaseModel):
    """An ensemble: copies of its members' models in one folder (`mtl.ensemble`), whose
    prediction is the mean of theirs. It outlives its jobs (their models are copied)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    owner: str
    name: str | None = None
    members: list[str] = Field(description="the member jobs' ids, in order")
    study_id: str | None = Field(None, description="the study whose best trials these are")
    trials: list[int] | None = Field(None, description="those trials' numbers, best first")
    created_at: float
    tasks: dict[str, list[str]] = Field(description="task -> label names, in config order")
