"""TensorBoard event files: every task's scalars, each step once after a resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtl.callbacks import Callback, TrainControl, TrainState
from mtl.tensorboard import TensorBoardCallback
from mtl.trainer import train


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: TrainState, control: TrainControl) -> None:
        if state.step == self.step:
            control.should_checkpoint = True
            control.stop("test")


def test_event_files_hold_every_task_and_split(make_config: Any, tmp_path: Path) -> None:
    config = make_config(grad_conflict_every=2)
    log_dir = tmp_path / "tb"
    result = train(config, tmp_path / "run", callbacks=[TensorBoardCallback(log_dir)])
    scalars = _scalars(log_dir)
    for task in ("task_a", "task_b"):
        loss = scalars[f"train/{task}/loss"]
        assert [s for s, _ in loss] == list(range(1, result.state.step + 1))
        assert scalars[f"validation/{task}/macro_f1"][-1][0] == result.state.step
        assert [s for s, _ in scalars[f"weight/{task}"]][-1] == result.state.step
    assert all(-1.0 <= v <= 1.0 for _, v in scalars["grad_cosine/task_a|task_b"])
    logged = scalars["validation/mean/accuracy"][-1][1]
    assert abs(logged - result.metrics["validation"]["mean"]["accuracy"]) < 1e-6


def test_resumed_run_writes_each_step_once(make_config: Any, tmp_path: Path) -> None:
    config = make_config()
    log_dir = tmp_path / "tb"
    first = train(config, tmp_path / "run", callbacks=[TensorBoardCallback(log_dir), StopAt(5)])
    assert first.outcome == "stopped"
    second = train(config, tmp_path / "run", callbacks=[TensorBoardCallback(log_dir)])
    assert second.outcome == "completed"
    steps = [s for s, _ in _scalars(log_dir)["train/task_a/loss"]]
    assert steps == list(range(1, second.state.step + 1))
