"""GPU check: the dummy example on CUDA with bf16 autocast, checkpoint/resume, predict.

python benchmarks/cuda_check.py        (needs a CUDA device; prints PASS lines)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtl.callbacks import Callback, TrainControl, TrainState  # noqa: E402
from mtl.config import load_config  # noqa: E402
from mtl.predict import Predictor  # noqa: E402
from mtl.trainer import Trainer, train  # noqa: E402


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: TrainState, control: TrainControl) -> None:
        if state.step == self.step:
            control.should_checkpoint = True
            control.stop("test stop")


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    raw = load_config(ROOT / "examples" / "dummy_two_task.yaml").model_dump()
    raw["device"] = "cuda"
    config = load_config(raw)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, Path(tmp) / "a")
        assert trainer.device.type == "cuda" and trainer.precision == "bf16", trainer.precision
        result = trainer.fit()
        val = result.metrics["validation"]["tasks"]
        print("accuracy", {t: round(m["accuracy"], 4) for t, m in val.items()})
        assert all(m["accuracy"] > 0.9 for m in val.values())
        print("PASS cuda bf16 training reaches > 0.9 on both tasks")

        stopped = train(config, Path(tmp) / "b", callbacks=[StopAt(50)])
        assert stopped.outcome == "stopped" and stopped.state.step == 50
        resumed = train(config, Path(tmp) / "b")
        assert resumed.outcome == "completed" and resumed.state.step == result.state.step
        print("PASS cuda stop at step 50 and resume to", resumed.state.step)

        predictor = Predictor.load(result.model_dir, device="cuda")
        out = predictor.predict(["a red summer dress", "too small, sent it back"])
        assert set(out[0]) == {"task_a", "task_b"}
        total = sum(out[0]["task_a"]["probabilities"].values())
        assert abs(total - 1) < 1e-4, total
        print("PASS cuda predict", out[0]["task_a"]["label"], round(total, 5))


if __name__ == "__main__":
    main()
