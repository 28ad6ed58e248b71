"""How the training loop talks to the outside world: state, control flags and callbacks.

The loop never prints, never writes to Redis and never branches on "is anyone listening?". It
calls each callback's hooks with narrow arguments (the state plus the metrics of that moment).
A callback stops training by setting `control.should_stop` (this is how early stopping, the CLI's
Ctrl-C and the service's cancel button work); the loop checks the flag after every optimizer step.
Before every checkpoint and before the final export the loop calls `on_save`; a callback that
clears `control.allow_save` there vetoes the write and stops the run (the service's fence
against a superseded attempt writing into a job directory that another attempt now owns).

Metric payloads are plain JSON-serialisable dicts::

    on_log       {"tasks": {task: {"loss", "accuracy"}}, "weights": {task: w}, "lr": float,
                  "grad_cosine": {"a|b": c} (only on sampled steps), "loss": float,
                  "skipped_steps": steps skipped so far for a non-finite loss}
    on_evaluate  {"split": "validation"|"test", "tasks": {task: {"loss", "accuracy",
                  "macro_f1", "weighted_f1", "per_class": {label: {precision, recall, f1,
                  support}}, "confusion_matrix": [[...]], "labels": [...]}}, "mean": {...}}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = ["Callback", "CallbackList", "Outcome", "TrainControl", "TrainState"]


class Outcome(StrEnum):
    """How a run ended."""

    COMPLETED = "completed"  # every step (or early stopping): the best model is exported
    STOPPED = "stopped"  # a callback asked (cancel, Ctrl-C): the last checkpoint stays
    FAILED = "failed"  # an error ended it


@dataclass
class TrainState:
    """Where a run is. JSON-serialisable (saved in every checkpoint)."""

    step: int = 0  # optimizer steps done
    total_steps: int = 0
    epoch: int = 0  # current epoch, 0-based
    steps_per_epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already consumed (sampler position)
    elapsed: float = 0.0  # seconds of training, summed over resumed attempts
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    skipped_steps: int = 0  # non-finite steps skipped in a row (reset by a good step)
    skipped_total: int = 0  # every step skipped for a non-finite loss (`nonfinite_loss: skip`)
    stop_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def eta(self) -> float | None:
        """Seconds to the last step at the average pace so far."""
        if self.step <= 0 or self.total_steps <= 0:
            return None
        return self.elapsed / self.step * max(self.total_steps - self.step, 0)


@dataclass
class TrainControl:
    """Flags the callbacks set and the loop obeys."""

    should_stop: bool = False
    stop_reason: str | None = None
    # Callbacks can ask for an extra checkpoint at the next step boundary (e.g. before cancel).
    should_checkpoint: bool = False
    # Cleared by an `on_save` hook when this run must write nothing more (its output directory
    # belongs to someone else now, e.g. a superseded service attempt): the write is skipped and
    # the run stops.
    allow_save: bool = True

    def stop(self, reason: str) -> None:
        if not self.should_stop:
            self.should_stop = True
            self.stop_reason = reason


class Callback:
    """No-op hooks; subclass and override what you need."""

    def on_train_begin(self, state: TrainState, control: TrainControl) -> None: ...

    def on_step_end(self, state: TrainState, control: TrainControl) -> None:
        """Every optimizer step. Keep it cheap: this is on the hot path."""

    def on_log(self, state: TrainState, metrics: dict[str, Any], control: TrainControl) -> None: ...

    def on_evaluate(
        self, state: TrainState, metrics: dict[str, Any], control: TrainControl
    ) -> None: ...

    def on_save(self, state: TrainState, control: TrainControl) -> None:
        """Just before a checkpoint or the exported model is written. Clear
        `control.allow_save` to skip the write and stop the run."""

    def on_checkpoint(self, state: TrainState, path: Path, control: TrainControl) -> None: ...

    def on_train_end(self, state: TrainState, outcome: Outcome, control: TrainControl) -> None:
        """At the very end, however the run ended."""


@dataclass
class CallbackList(Callback):
    callbacks: list[Callback] = field(default_factory=list)

    def on_train_begin(self, state: TrainState, control: TrainControl) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(state, control)

    def on_step_end(self, state: TrainState, control: TrainControl) -> None:
        for cb in self.callbacks:
            cb.on_step_end(state, control)

    def on_log(self, state: TrainState, metrics: dict[str, Any], control: TrainControl) -> None:
        for cb in self.callbacks:
            cb.on_log(state, metrics, control)

    def on_evaluate(
        self, state: TrainState, metrics: dict[str, Any], control: TrainControl
    ) -> None:
        for cb in self.callbacks:
            cb.on_evaluate(state, metrics, control)

    def on_save(self, state: TrainState, control: TrainControl) -> None:
        for cb in self.callbacks:
            cb.on_save(state, control)

    def on_checkpoint(self, state: TrainState, path: Path, control: TrainControl) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(state, path, control)

    def on_train_end(self, state: TrainState, outcome: Outcome, control: TrainControl) -> None:
        for cb in self.callbacks:
            cb.on_train_end(state, outcome, control)
