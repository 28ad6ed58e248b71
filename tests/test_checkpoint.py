"""Checkpoints: exact resume (weights, logs, RNG), atomic saves, pointers, pruning, safe formats."""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

from mtl.callbacks import Callback, TrainControl, TrainState
from mtl.checkpoint import Checkpointer
from mtl.config import DWAWeighting, TrainConfig
from mtl.errors import TrainingError
from mtl.strategies import DWA
from mtl.trainer import Trainer, TrainResult, train

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL, RTOL = 1e-6, 1e-5  # tight: the runs are meant to be the same computation


class Recorder(Callback):
    """Records every log and evaluation; optionally stops the run at a step.

    how="log": at the log of step `stop_at`, ask for a checkpoint and stop (the checkpoint is
    written in that same step). how="step": stop in on_step_end (needs a periodic checkpoint at
    that step). how="evaluate": stop at the first evaluation (an epoch boundary).
    """

    def __init__(self, stop_at: int | None = None, how: str = "log") -> None:
        self.stop_at = stop_at
        self.how = how
        self.logs: dict[int, dict[str, Any]] = {}
        self.evals: dict[int, dict[str, Any]] = {}
        self.checkpoints: list[int] = []
        self.begin_step: int | None = None
        self.outcome: str | None = None

    def on_train_begin(self, state: TrainState, control: TrainControl) -> None:
        self.begin_step = state.step

    def on_log(self, state: TrainState, metrics: dict[str, Any], control: TrainControl) -> None:
        self.logs[state.step] = copy.deepcopy(metrics)
        if self.how == "log" and state.step == self.stop_at:
            control.should_checkpoint = True
            control.stop("test stop")

    def on_step_end(self, state: TrainState, control: TrainControl) -> None:
        if self.how == "step" and state.step == self.stop_at:
            control.stop("test stop")

    def on_evaluate(
        self, state: TrainState, metrics: dict[str, Any], control: TrainControl
    ) -> None:
        self.evals[state.step] = copy.deepcopy(metrics)
        if self.how == "evaluate" and self.stop_at is not None:
            control.stop("test stop")

    def on_checkpoint(self, state: TrainState, path: Path, control: TrainControl) -> None:
        self.checkpoints.append(state.step)

    def on_train_end(self, state: TrainState, outcome: str, control: TrainControl) -> None:
        self.outcome = outcome


def fit(
    config: TrainConfig, out: Path, recorder: Recorder, resume: bool = True
) -> tuple[Trainer, TrainResult]:
    trainer = Trainer(config, out, callbacks=[recorder])
    return trainer, trainer.fit(resume=resume)


def assert_same_metrics(a: Any, b: Any, where: str = "") -> None:
    """Same nested structure; floats equal to ~1e-6."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a)} != {set(b)}"
        for k in a:
            assert_same_metrics(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_metrics(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def last_checkpoint_tensors(out: Path) -> dict[str, torch.Tensor]:
    path = Checkpointer(out / "checkpoints").latest()
    assert path is not None
    tensors = load_file(str(path / "model.safetensors"))
    tensors.update(
        {f"strategy.{k}": v for k, v in load_file(str(path / "strategy.safetensors")).items()}
    )
    return tensors


RESUME_CASES: dict[str, tuple[dict[str, Any], int, str]] = {
    # stop at the first evaluation: the epoch-boundary checkpoint (step 8 of 16)
    "epoch_boundary": ({}, 8, "evaluate"),
    # stop mid-epoch with a requested checkpoint (step 5 of 16); dropout is on (0.1)
    "mid_epoch": ({}, 5, "log"),
    # the last batch of an epoch, checkpointed before the epoch's end-of-epoch bookkeeping
    "last_batch_of_epoch": ({}, 8, "log"),
    # DWA: its epoch loss sums are mid-way at the stop, its weights move from epoch 3
    "dwa": ({"weighting": {"name": "dwa"}, "epochs": 3}, 13, "log"),
    # RLW draws and PCGrad's random order come from the global RNG: restored
    "rlw_pcgrad": (
        {"weighting": {"name": "rlw"}, "gradient": {"name": "pcgrad"}, "grad_conflict_every": 2},
        6,
        "log",
    ),
    "uncertainty_mgda_parameters": (
        {"weighting": {"name": "uncertainty"}, "gradient": {"name": "mgda", "level": "parameters"}},
        5,
        "log",
    ),
    "gradnorm": ({"weighting": {"name": "gradnorm"}, "grad_conflict_every": 3}, 6, "log"),
    # two micro-batches per step: 4 steps per epoch, stop at step 3 of 8
    "grad_accum": ({"grad_accum_steps": 2}, 3, "log"),
    # the stop falls between two logs: the running statistics are restored too
    "between_logs": ({"log_every": 3, "checkpoint_every": 5}, 5, "step"),
    "static_weights": (
        {"weighting": {"name": "static", "weights": {"task_a": 1.5, "task_b": 0.5}}},
        11,
        "log",
    ),
    "mgda_representation": ({"gradient": {"name": "mgda", "level": "representation"}}, 5, "log"),
    # FAMO's logits and their Adam state move every step: buffers, restored
    "famo_upgrad": (
        {"weighting": {"name": "famo"}, "gradient": {"name": "upgrad", "level": "parameters"}},
        7,
        "log",
    ),
    # PCGrad's random order (global RNG) and one encoder backward per task
    "pcgrad_parameters": ({"gradient": {"name": "pcgrad", "level": "parameters"}}, 10, "log"),
    # per-task files (see `per_task_files`), batches drawn by temperature: 7 steps per epoch,
    # the stop falls in the second epoch, whose schedule differs from the first
    "per_task_files_temperature": (
        {"data": {"sampling": "temperature", "temperature": 2.0}, "epochs": 2},
        10,
        "log",
    ),
    # issue 12's options: the weight average is checkpointed (evaluations score it), R-Drop's
    # second head pass draws dropout from the restored RNG, the layer rates are in the
    # optimizer's state; the dependent head reads the parent's distribution (not detached)
    "ema_rdrop_layer_decay_depends": (
        {
            "averaging": {"kind": "ema", "ema_decay": 0.9},
            "rdrop": {"alpha": 1.0},
            "optimizer": {"name": "adam", "lr": 3e-3, "layer_decay": 0.7},
            "tasks": [
                {"name": "task_a", "num_classes": 5},
                {
                    "name": "task_b",
                    "num_classes": 3,
                    "depends_on": ["task_a"],
                    "depends_detach": False,
                },
            ],
        },
        5,
        "log",
    ),
    # SWA from step 4 of 16 every 3rd step: the stop (step 10) falls between two averages
    "swa": ({"averaging": {"kind": "swa", "swa_start": 0.25, "swa_every": 3}}, 10, "log"),
    # the MLM batches follow the step; the MLM head (tied to the embeddings) is checkpointed
    "mlm_per_task_files": ({"data": {}, "mlm": {"weight": 0.5}, "epochs": 2}, 9, "log"),
}
#: Cases whose tasks read their own files: `per_task_files` supplies the tasks and data.
FILE_CASES = {"per_task_files_temperature", "mlm_per_task_files"}


def per_task_files(folder: Path, write_rows: Any, labelled_rows: Any) -> dict[str, Any]:
    """Two tasks with their own train and validation files (40 and 16 training rows, batches
    of 8), and a main data block that serves no task."""
    folder.mkdir()
    rows = labelled_rows(60)

    def sentiment(part: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"text": r["text"], "sentiment": r["sentiment"]} for r in part]

    def topic(part: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"body": r["text"], "topic": r["topic"]} for r in part]

    files = {
        "a": write_rows(folder / "a.csv", sentiment(rows[:40])),
        "a_val": write_rows(folder / "a_val.csv", sentiment(rows[40:52])),
        "b": write_rows(folder / "b.jsonl", topic(rows[:16])),
        "b_val": write_rows(folder / "b_val.jsonl", topic(rows[52:])),
    }
    return {
        "tasks": [
            {
                "name": "sentiment",
                "num_classes": 3,
                "data": {"train": str(files["a"]), "validation": str(files["a_val"])},
            },
            {
                "name": "topic",
                "num_classes": 2,
                "data": {
                    "train": str(files["b"]),
                    "validation": str(files["b_val"]),
                    "text_column": "body",
                },
            },
        ],
        "data": {"kind": "files", "train": str(folder / "unused.csv")},
        "batch_size": 8,
    }


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_matches_an_uninterrupted_run(
    case: str, make_config: Any, write_rows: Any, labelled_rows: Any, tmp_path: Path
) -> None:
    overrides, stop_at, how = RESUME_CASES[case]
    if case in FILE_CASES:
        files = per_task_files(tmp_path / "data", write_rows, labelled_rows)
        overrides = {**files, **overrides, "data": {**files["data"], **overrides["data"]}}
    config = make_config(**overrides)
    # the default head dropout is 0.1 and the tiny BERT has dropout too: RNG matters
    assert config.tasks[0].head.dropout == 0.1

    straight_rec = Recorder()
    straight, straight_result = fit(config, tmp_path / "straight", straight_rec)
    total = straight.total_steps
    assert straight_result.outcome == "completed" and straight_result.state.step == total
    assert 0 < stop_at < total

    first_rec = Recorder(stop_at=stop_at, how=how)
    _, first = fit(config, tmp_path / "resumed", first_rec)
    assert first.outcome == "stopped"
    assert first.state.step == stop_at
    assert first.model_dir is None
    assert stop_at in first_rec.checkpoints

    second_rec = Recorder()
    resumed, second = fit(config, tmp_path / "resumed", second_rec)
    assert second_rec.begin_step == stop_at
    assert second.outcome == "completed" and second.state.step == total

    # the final weights (and strategy state) are the same
    assert_close(
        dict(resumed.model.state_dict()), dict(straight.model.state_dict()), atol=ATOL, rtol=RTOL
    )
    assert_close(
        last_checkpoint_tensors(tmp_path / "resumed"),
        last_checkpoint_tensors(tmp_path / "straight"),
        atol=ATOL,
        rtol=RTOL,
    )
    # every logged training metric of every step is the same
    assert set(first_rec.logs) | set(second_rec.logs) == set(straight_rec.logs)
    assert not set(first_rec.logs) & set(second_rec.logs)
    for step, metrics in straight_rec.logs.items():
        other = first_rec.logs.get(step) or second_rec.logs[step]
        assert_same_metrics(metrics, other, f"step {step}")
    assert_same_metrics(
        straight_result.metrics["validation"], second.metrics["validation"], "validation"
    )


def test_resume_keeps_a_sampled_grad_cosine_between_logs(make_config: Any, tmp_path: Path) -> None:
    # cosine sampled at step 4, logged at step 6; the run stops (checkpointed) at step 5
    config = make_config(log_every=3, checkpoint_every=5, grad_conflict_every=4)
    straight_rec = Recorder()
    fit(config, tmp_path / "straight", straight_rec)
    assert "grad_cosine" in straight_rec.logs[6]
    fit(config, tmp_path / "resumed", Recorder(stop_at=5, how="step"))
    second_rec = Recorder()
    fit(config, tmp_path / "resumed", second_rec)
    assert "grad_cosine" in second_rec.logs[6]


def test_resume_false_starts_over(make_config: Any, tmp_path: Path) -> None:
    config = make_config(epochs=1)
    _, first = fit(config, tmp_path, Recorder(stop_at=4, how="log"))
    assert first.state.step == 4
    rec = Recorder()
    _, again = fit(config, tmp_path, rec, resume=False)
    assert rec.begin_step == 0
    assert min(rec.logs) == 1 and again.state.step == 8


# ------------------------------------------------------------------------- the Checkpointer


def _save(ckpt: Checkpointer, step: int, *, is_best: bool = False) -> Path:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return ckpt.save(
        state=TrainState(step=step, total_steps=100),
        model=model,
        strategy=DWA(["a", "b"], DWAWeighting.model_validate({})),
        optimizer=optimizer,
        scheduler=scheduler,
        extra={"rng": {"torch": torch.get_rng_state(), "python": [1, 2, 3]}},
        config_json="{}",
        is_best=is_best,
    )


def test_latest_ignores_temporary_and_incomplete_dirs(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest() is None  # no directory yet
    good = _save(ckpt, 5)
    assert good.name == "step-00000005"
    # a crash mid-save: a temp dir (even with a state file) and a renamed dir without one
    tmp = tmp_path / ".tmp-step-00000009-4242"
    shutil.copytree(good, tmp)
    (tmp_path / "step-00000007").mkdir()
    (tmp_path / "step-00000007" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "last.json").unlink()  # no pointer: scan the step dirs
    assert ckpt.latest() == good
    # the pointer names a dir that is gone: fall back to the highest complete step
    (tmp_path / "last.json").write_text(json.dumps({"name": "step-00000011", "step": 11}))
    assert ckpt.latest() == good
    # a pointer to an incomplete dir is not trusted either
    (tmp_path / "last.json").write_text(json.dumps({"name": "step-00000007", "step": 7}))
    assert ckpt.latest() == good
    # a garbled pointer
    (tmp_path / "last.json").write_text("{not json")
    assert ckpt.latest() == good


def test_latest_follows_the_pointer(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    _save(ckpt, 3, is_best=True)
    later = _save(ckpt, 6)
    assert ckpt.latest() == later
    assert json.loads((tmp_path / "last.json").read_text()) == {"name": later.name, "step": 6}
    assert ckpt.best() == tmp_path / "step-00000003"


def test_pruning_keeps_only_last_and_best(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    _save(ckpt, 1)
    _save(ckpt, 2, is_best=True)
    (tmp_path / ".tmp-step-00000099-1").mkdir()  # a stale temp dir from a crashed save
    _save(ckpt, 3)
    _save(ckpt, 4)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.json", "last.json", "step-00000002", "step-00000004"]
    _save(ckpt, 5, is_best=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.json", "last.json", "step-00000005"]


def test_a_failed_save_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = Checkpointer(tmp_path)
    good = _save(ckpt, 2)
    real_save = torch.save

    def disk_full(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if str(f).endswith("extra.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(TrainingError, match=r"cannot write checkpoint step-00000004.*No space"):
        _save(ckpt, 4)
    monkeypatch.undo()
    assert ckpt.latest() == good
    assert json.loads((tmp_path / "last.json").read_text())["name"] == "step-00000002"
    assert not (tmp_path / "step-00000004").exists()
    assert not list(tmp_path.glob(".tmp-step-*"))  # the half-written save is cleaned up
    _save(ckpt, 6)
    assert ckpt.latest() == tmp_path / "step-00000006"


def test_disk_full_fails_the_run_with_a_reason_and_resume_continues(
    make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(checkpoint_every=3, epochs=2)
    real_save = torch.save
    calls = {"n": 0}

    def full_after_two(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if str(f).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_after_two)
    with pytest.raises(TrainingError, match="No space left on device"):
        train(config, tmp_path / "run")
    monkeypatch.undo()
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    latest = ckpt.latest()
    assert latest is not None and latest.name == "step-00000006"
    resumed = train(config, tmp_path / "run")
    straight = train(config, tmp_path / "straight")
    assert resumed.outcome == "completed" and resumed.state.step == straight.state.step == 16
    for name, tensor in last_checkpoint_tensors(tmp_path / "straight").items():
        torch.testing.assert_close(
            last_checkpoint_tensors(tmp_path / "run")[name], tensor, atol=1e-6, rtol=1e-5
        )


CRASH_SCRIPT = """
import os, sys
from pathlib import Path
import torch
import mtl.checkpoint as ck
from mtl.config import TrainConfig
from mtl.trainer import train
import json

torch.set_num_threads(1)  # the same as the test process: bit-for-bit comparable runs
config = TrainConfig.model_validate(json.loads(sys.argv[1]))
real_write = ck.Checkpointer._write
count = {"n": 0}

def crashing_write(self, tmp, *args, **kwargs):
    count["n"] += 1
    if count["n"] == 3:  # the third checkpoint: write the weights, then die like SIGKILL
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"half")
        os._exit(137)
    return real_write(self, tmp, *args, **kwargs)

ck.Checkpointer._write = crashing_write
train(config, Path(sys.argv[2]))
"""


def test_a_crash_mid_checkpoint_resumes_from_the_previous_one(
    config_dict: Any, make_config: Any, tmp_path: Path, one_thread: None
) -> None:
    raw = config_dict(checkpoint_every=3, epochs=2)
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, json.dumps(raw), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 137, proc.stderr[-2000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert list(ckpts.glob(".tmp-step-*")), "the crash should leave a half-written checkpoint"
    ckpt = Checkpointer(ckpts)
    assert ckpt.latest() == ckpts / "step-00000006"
    config = make_config(checkpoint_every=3, epochs=2)
    resumed = train(config, tmp_path / "run")
    straight = train(config, tmp_path / "straight")
    assert resumed.state.step == straight.state.step
    for name, tensor in last_checkpoint_tensors(tmp_path / "straight").items():
        torch.testing.assert_close(
            last_checkpoint_tensors(tmp_path / "run")[name], tensor, atol=1e-6, rtol=1e-5
        )


def test_training_checkpoints_use_safe_formats(make_config: Any, tmp_path: Path) -> None:
    config = make_config(weighting={"name": "uncertainty"}, epochs=3, early_stopping=None)
    rec = Recorder()
    _, result = fit(config, tmp_path, rec)
    assert result.outcome == "completed"
    assert rec.checkpoints == [8, 16, 24]  # one per evaluation (per epoch)
    ckpt_dir = tmp_path / "checkpoints"
    kept = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())
    best = json.loads((ckpt_dir / "best.json").read_text())["name"]
    assert kept == sorted({best, "step-00000024"})
    last = ckpt_dir / "step-00000024"
    assert sorted(p.name for p in last.iterdir()) == [
        "config.json",
        "extra.pt",
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "strategy.safetensors",
        "trainer_state.json",
    ]
    for name in ("optimizer.pt", "scheduler.pt", "extra.pt"):
        loaded = torch.load(last / name, weights_only=True)
        assert isinstance(loaded, dict) and loaded
    optimizer = torch.load(last / "optimizer.pt", weights_only=True)
    # encoder, 2 heads (matrices and vectors apart) and the uncertainty log-variances
    assert [g["name"] for g in optimizer["param_groups"]][-1] == "weighting"
    weights = load_file(str(last / "model.safetensors"))
    assert any(k.startswith("heads.task_a.") for k in weights)
    assert any(k.startswith("encoder.transformer.") for k in weights)
    strategy = load_file(str(last / "strategy.safetensors"))
    assert set(strategy) == {"log_vars"} and strategy["log_vars"].shape == (2,)
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 24 and state["epoch"] == 3 and state["batch_in_epoch"] == 0
    assert TrainConfig.model_validate_json((last / "config.json").read_text()) == config
