"""A callback that writes TensorBoard event files, one scalar per task and metric.

    train/<task>/loss, train/<task>/accuracy        every log
    weight/<task>, lr, grad_cosine/<a|b>            every log (cosines when sampled)
    <split>/<task>/<metric>                         every evaluation (loss, accuracy, F1s)
    <split>/mean/<metric>

Open with `tensorboard --logdir <dir>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtl.callbacks import Callback, TrainControl, TrainState

__all__ = ["TensorBoardCallback"]

EVAL_METRICS = ("loss", "accuracy", "macro_f1", "weighted_f1")


class TensorBoardCallback(Callback):
    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.writer: Any = None

    def on_train_begin(self, state: TrainState, control: TrainControl) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events past this step that a crashed attempt wrote, so a resumed
        # run shows each step once.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=state.step + 1)

    def on_log(self, state: TrainState, metrics: dict[str, Any], control: TrainControl) -> None:
        w, step = self.writer, state.step
        for task, m in metrics["tasks"].items():
            w.add_scalar(f"train/{task}/loss", m["loss"], step)
            w.add_scalar(f"train/{task}/accuracy", m["accuracy"], step)
        for task, value in metrics.get("weights", {}).items():
            w.add_scalar(f"weight/{task}", value, step)
        for pair, value in metrics.get("grad_cosine", {}).items():
            w.add_scalar(f"grad_cosine/{pair}", value, step)
        if "lr" in metrics:
            w.add_scalar("lr", metrics["lr"], step)
        for name, value in metrics.get("mlm", {}).items():  # the auxiliary MLM task
            w.add_scalar(f"train/mlm/{name}", value, step)

    def on_evaluate(
        self, state: TrainState, metrics: dict[str, Any], control: TrainControl
    ) -> None:
        split = metrics["split"]
        for task, m in metrics["tasks"].items():
            for name in EVAL_METRICS:
                self.writer.add_scalar(f"{split}/{task}/{name}", m[name], state.step)
        for name in EVAL_METRICS:
            self.writer.add_scalar(f"{split}/mean/{name}", metrics["mean"][name], state.step)
        self.writer.flush()

    def on_train_end(self, state: TrainState, outcome: str, control: TrainControl) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
