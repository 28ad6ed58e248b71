"""Metric summaries: the per-task numbers of one report, without its tables.

An evaluation report (the `on_evaluate` payload, see `mtl.callbacks`) holds, per task, the
loss, accuracy, macro-F1 and weighted-F1 plus per-class tables and a confusion matrix. What is
exported beside a model (`mtl.json`), kept in a job's record (latest, best and final scores),
returned by the API and shown by the CLI is its summary: the four numbers per task and their
mean. `summarise` cuts it, here and nowhere else. A training log (`on_log`) summarises the same
way (it has loss and accuracy only).

Pydantic, no torch: the service and the CLI use it without loading the training stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["SCORE_NAMES", "SplitScores", "TaskScores", "summarise"]

SCORE_NAMES = ("loss", "accuracy", "macro_f1", "weighted_f1")


class TaskScores(BaseModel):
    """One task's numbers (a log has no F1 scores; absent numbers are None)."""

    model_config = ConfigDict(extra="ignore")

    loss: float | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    weighted_f1: float | None = None

    def scores(self) -> dict[str, float]:
        """The numbers that are present, by name."""
        return {k: v for k, v in self.model_dump(include=set(SCORE_NAMES)).items() if v is not None}


class SplitScores(BaseModel):
    """The summary of one report: every task's numbers and their mean over tasks."""

    tasks: dict[str, TaskScores]
    mean: TaskScores | None = None


def summarise(report: Mapping[str, Any]) -> SplitScores:
    """The summary of an evaluation report or a training log (`{"tasks": {task: {...}},
    "mean": {...}}`; anything else in it, tables included, is left out)."""
    tasks = {name: TaskScores.model_validate(values) for name, values in report["tasks"].items()}
    mean = report.get("mean")
    return SplitScores(tasks=tasks, mean=TaskScores.model_validate(mean) if mean else None)
