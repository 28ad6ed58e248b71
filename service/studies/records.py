"""A study's records: the study, each trial, the multi-task verdict. Defined once: the driver
(`worker.studies`) writes them, the API returns them, the CLI and the dashboard read them."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "STUDY_TERMINAL",
    "TRIAL_FINAL",
    "StudyRecord",
    "StudyState",
    "TaskVerdict",
    "TrialKind",
    "TrialRecord",
    "TrialState",
    "Verdict",
]


class StudyState(StrEnum):
    QUEUED = "queued"  # accepted; the driver has not looked at it yet
    SEARCHING = "searching"
    BASELINES = "baselines"  # the search is over: the single-task and `sum` runs
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


STUDY_TERMINAL = frozenset({StudyState.SUCCEEDED, StudyState.FAILED, StudyState.CANCELLED})


class TrialState(StrEnum):
    RUNNING = "running"  # its jobs are queued or running
    PRUNING = "pruning"  # the pruner stopped it: its jobs are being cancelled
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"
    CANCELLED = "cancelled"  # the study was cancelled


TRIAL_FINAL = frozenset(
    {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAILED, TrialState.CANCELLED}
)


class TrialKind(StrEnum):
    SEARCH = "search"
    BASELINE = "baseline"


class TrialRecord(BaseModel):
    """One configuration: its parameters, its jobs (one, or one per seed) and its score."""

    model_config = ConfigDict(extra="ignore")

    number: int = Field(description="the Optuna trial number (search) or 1000+ (baselines)")
    kind: TrialKind = TrialKind.SEARCH
    baseline: str | None = Field(None, description="`single:<task>` or `sum`")
    state: TrialState = TrialState.RUNNING
    params: dict[str, Any] = Field(default_factory=dict)
    jobs: list[str] = Field(default_factory=list)
    value: float | None = Field(None, description="the objective (mean over the jobs)")
    values: list[float] = Field(default_factory=list, description="per job (seed)")
    spread: float | None = Field(None, description="standard deviation over the jobs")
    last_step: int = Field(0, description="the last intermediate value reported to the pruner")
    intermediate: float | None = None
    started_at: float
    finished_at: float | None = None
    error: str | None = None
    same_as: int | None = Field(
        None,
        description="a baseline whose config is the same as this search trial's (the best "
        "one already used plain `sum` and no gradient strategy): its jobs are reused, not "
        "trained again",
    )


class TaskVerdict(BaseModel):
    multi_task: float | None = Field(description="the best trial's score on this task")
    single_task: float | None = Field(description="this task trained alone, same settings")
    difference: float | None = Field(description="multi_task - single_task")
    sum: float | None = Field(None, description="the best config with plain `sum` weighting")


class Verdict(BaseModel):
    """Does sharing one encoder help, and does the chosen strategy beat plain summing?"""

    split: str = Field(description="where the scores come from: test when the data has one")
    metric: str
    tasks: dict[str, TaskVerdict]
    delta_mtl: float | None = Field(
        description="mean over tasks of (multi - single) / single, in percent (Maninis et al. "
        "2019; the sign is flipped for a metric to minimise)"
    )
    objective_best: float | None = Field(description="the best trial's objective (validation)")
    objective_sum: float | None = Field(None, description="the `sum` baseline's objective")


class StudyRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    owner: str
    name: str | None = None
    state: StudyState = StudyState.QUEUED
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    trials_planned: int
    trials_started: int = 0
    trials_done: int = 0
    failures: int = 0
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] | None = None
    model_job: str | None = Field(None, description="the best trial's job: the study's model")
    importances: dict[str, float] | None = None
    verdict: Verdict | None = None
    cancel_requested: bool = False
