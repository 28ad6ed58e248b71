"""The training entry the distributed tests start under torchrun (`mtl.distributed.launch`):
`python -m tests.ddp_entry SPEC.json` in every rank.

It joins the process group itself (so the trainer uses a group it does not own) and trains
each job of the spec in turn. SPEC: ``{"pids": DIR, "jobs": [{"config": {...}, "out": DIR,
"stop_at": step|null, "slow_after_checkpoint": step|null}]}``. Per job, every rank writes
`OUT/rank-<r>.json` (step, outcome, stop reason) and rank 0 `OUT/logs.json` (every train log,
every evaluation). `slow_after_checkpoint: k`: rank 0 writes `OUT/checkpointed` at the checkpoint
of step k, then sleeps after each step (so a test can kill a rank mid-run).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mtl.callbacks import Callback, TrainControl, TrainState
from mtl.config import TrainConfig
from mtl.trainer import train


class Recorder(Callback):
    def __init__(self, out: Path, stop_at: int | None, slow_after: int | None) -> None:
        self.out = out
        self.stop_at = stop_at
        self.slow_after = slow_after
        self.slow = False
        self.logs: dict[int, Any] = {}
        self.evals: dict[int, Any] = {}

    def on_log(self, state: TrainState, metrics: dict[str, Any], control: TrainControl) -> None:
        self.logs[state.step] = metrics

    def on_evaluate(
        self, state: TrainState, metrics: dict[str, Any], control: TrainControl
    ) -> None:
        self.evals[state.step] = metrics

    def on_checkpoint(self, state: TrainState, path: Path, control: TrainControl) -> None:
        if state.step == self.slow_after:
            (self.out / "checkpointed").write_text(str(state.step))
            self.slow = True

    def on_step_end(self, state: TrainState, control: TrainControl) -> None:
        if state.step == self.stop_at:
            control.stop(f"test stop at {state.step}")
        if self.slow:
            time.sleep(0.5)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    Path(spec["pids"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["pids"]) / f"rank-{rank}.pid").write_text(str(os.getpid()))
    for job in spec["jobs"]:
        out = Path(job["out"])
        out.mkdir(parents=True, exist_ok=True)
        recorder = Recorder(out, job.get("stop_at"), job.get("slow_after_checkpoint"))
        config = TrainConfig.model_validate(job["config"])
        result = train(config, out, callbacks=[recorder])
        summary = {"step": result.state.step, "outcome": str(result.outcome)}
        summary["stop_reason"] = result.state.stop_reason
        (out / f"rank-{rank}.json").write_text(json.dumps(summary))
        if rank == 0:
            logs = {"logs": recorder.logs, "evals": recorder.evals, "metrics": result.metrics}
            (out / "logs.json").write_text(json.dumps(logs))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
