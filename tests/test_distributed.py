"""Training on several devices: 2 CPU processes (gloo, torchrun as a real subprocess) train
like 1 process with the doubled batch; a killed rank fails the run and resume is exact; a stop
on rank 0 stops every rank; what would not be exact is refused by the config."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mtl.checkpoint import Checkpointer
from mtl.cli import app
from mtl.config import ConfigError, TrainConfig, load_config
from mtl.distributed import launch, shard, torchrun_command
from mtl.errors import TrainingError
from mtl.pipeline import build_train_data
from mtl.trainer import Trainer, train
from tests.conftest import BASE_CONFIG, _merge

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-4, 1e-5  # fp32: the same sums, reduced in another order

NO_DROPOUT = {
    "encoder": {"random_init": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
    "tasks": [
        {"name": "task_a", "num_classes": 5, "head": {"dropout": 0.0}},
        {"name": "task_b", "num_classes": 3, "head": {"dropout": 0.0}},
    ],
}
# 209 samples, global batch 32: 7 batches per epoch, the last of 17 rows (9 + 8 on 2 ranks)
SMALL = {"data": {"num_samples": 209, "eval_samples": 64}, "grad_conflict_every": 3}


def config(devices: int, **over: Any) -> dict[str, Any]:
    """BASE_CONFIG with `over`; with 2 devices each process takes half the batch."""
    raw = _merge(BASE_CONFIG, _merge(SMALL, over))
    raw["batch_size"] = raw["batch_size"] // devices
    raw["devices"] = devices
    return raw


#: name -> overrides of the jobs compared with one process (no dropout: the same masks)
EXACT_JOBS: dict[str, dict[str, Any]] = {
    "sum": NO_DROPOUT,
    # micro-batches: the first is not all-reduced (`no_sync`), the second is
    "static_accum": {
        **NO_DROPOUT,
        "weighting": {"name": "static", "weights": {"task_a": 1.5, "task_b": 0.5}},
        "grad_accum_steps": 2,
    },
    "uncertainty": {**NO_DROPOUT, "weighting": {"name": "uncertainty"}},
    "dwa": {**NO_DROPOUT, "weighting": {"name": "dwa"}, "epochs": 3},
}


def per_task_files(folder: Path) -> dict[str, Any]:
    """Two tasks with their own files (a batch holds one task: the other head is unused in
    that step), balanced class weights and label smoothing, batches of 8 (4 per rank)."""
    folder.mkdir(parents=True, exist_ok=True)
    words = {"pos": "wonderful", "neg": "terrible", "neu": "ordinary"}
    topics = {"sport": "football", "politics": "election"}

    def write(name: str, column: str, labels: dict[str, str], rows: range) -> str:
        path = folder / name
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", column])
            for i in rows:
                label = sorted(labels)[(i * 7) % len(labels)]
                writer.writerow([f"a {labels[label]} story number {i}", label])
        return str(path)

    return {
        "tasks": [
            {
                "name": "sentiment",
                "num_classes": 3,
                "class_weights": "balanced",
                "label_smoothing": 0.1,
                "head": {"dropout": 0.0},
                "data": {
                    "train": write("a.csv", "sentiment", words, range(43)),
                    "validation": write("a_val.csv", "sentiment", words, range(100, 112)),
                },
            },
            {
                "name": "topic",
                "num_classes": 2,
                "head": {"dropout": 0.0},
                "data": {
                    "train": write("b.csv", "topic", topics, range(19)),
                    "validation": write("b_val.csv", "topic", topics, range(200, 210)),
                },
            },
        ],
        "data": {"kind": "files", "train": str(folder / "unused.csv")},
        "encoder": {
            "random_init": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        },
        "batch_size": 8,
        "epochs": 2,
    }


def reference_config(devices: int) -> dict[str, Any]:
    """The run the kill test resumes: dropout on (each rank draws its own masks)."""
    return config(devices, checkpoint_every=4, epochs=2)


def run_entry(jobs: list[dict[str, Any]], folder: Path, **popen: Any) -> subprocess.Popen[Any]:
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"pids": str(folder / "pids"), "jobs": jobs}))
    return launch("tests.ddp_entry", [str(spec)], 2, cwd=ROOT, **popen)


def wait(proc: subprocess.Popen[Any], timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the run did not end in {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def ranks(out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


def final_tensors(out: Path) -> dict[str, torch.Tensor]:
    path = Checkpointer(out / "checkpoints").latest()
    assert path is not None
    tensors = load_file(str(path / "model.safetensors"))
    strategy = load_file(str(path / "strategy.safetensors"))
    tensors.update({f"strategy.{k}": v for k, v in strategy.items()})
    return tensors


def assert_close_metrics(a: Any, b: Any, where: str) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: {set(a)} != {set(b)}"
        for k in a:
            assert_close_metrics(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close_metrics(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class Logs:
    """What one process's run reported (the same shape as `logs.json`)."""

    def __init__(self) -> None:
        from mtl.callbacks import Callback

        logs: dict[str, Any] = {}
        evals: dict[str, Any] = {}

        class Rec(Callback):
            def on_log(self, state: Any, metrics: dict[str, Any], control: Any) -> None:
                logs[str(state.step)] = copy.deepcopy(metrics)

            def on_evaluate(self, state: Any, metrics: dict[str, Any], control: Any) -> None:
                evals[str(state.step)] = copy.deepcopy(metrics)

        self.callback = Rec()
        self.logs, self.evals = logs, evals


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One torchrun launch (2 gloo processes) trains every job in turn: the exact-equivalence
    jobs, per-task files, the uninterrupted reference of the kill test, and a stop at step 5."""
    folder = tmp_path_factory.mktemp("ddp")
    jobs: dict[str, dict[str, Any]] = {
        name: {"config": config(2, **over)} for name, over in EXACT_JOBS.items()
    }
    files = per_task_files(folder / "data")
    jobs["files"] = {"config": _merge(BASE_CONFIG, {**files, "batch_size": 4, "devices": 2})}
    jobs["reference"] = {"config": reference_config(2)}
    jobs["stop"] = {"config": config(2), "stop_at": 5}
    for name, job in jobs.items():
        job["out"] = str(folder / name)
    proc = run_entry(
        list(jobs.values()), folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    code, out = wait(proc, 300)
    assert code == 0, out[-4000:]
    outs = {name: Path(job["out"]) for name, job in jobs.items()}
    outs["_files_config"] = folder / "data"
    return outs


def one_process(raw: dict[str, Any], out: Path) -> tuple[Logs, Any]:
    logs = Logs()
    result = train(TrainConfig.model_validate(raw), out, callbacks=[logs.callback])
    return logs, result


def assert_same_run(two: Path, logs: Logs, result: Any, one_out: Path) -> None:
    reported = json.loads((two / "logs.json").read_text())
    assert set(reported["logs"]) == set(logs.logs) and logs.logs
    for step, metrics in logs.logs.items():
        assert_close_metrics(metrics, reported["logs"][step], f"step {step}")
    assert_close_metrics(logs.evals, reported["evals"], "evaluations")
    assert_close_metrics(result.metrics["validation"], reported["metrics"]["validation"], "final")
    assert [r["step"] for r in ranks(two)] == [result.state.step] * 2
    ones, twos = final_tensors(one_out), final_tensors(two)
    assert set(ones) == set(twos)
    for name, tensor in ones.items():
        # Adam divides each gradient by its own running scale, so a parameter whose gradient
        # is rounding noise (attention key biases: zero in exact arithmetic; rare tokens'
        # embedding rows) moves by up to ~lr per step whatever the noise: a looser atol
        torch.testing.assert_close(twos[name], tensor, rtol=RTOL, atol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("job", list(EXACT_JOBS))
def test_two_processes_train_like_one_with_the_doubled_batch(
    job: str, two_process_runs: dict[str, Path], tmp_path: Path, one_thread: None
) -> None:
    logs, result = one_process(config(1, **EXACT_JOBS[job]), tmp_path)
    assert result.outcome == "completed"
    assert_same_run(two_process_runs[job], logs, result, tmp_path)
    reported = json.loads((two_process_runs[job] / "logs.json").read_text())
    assert any("grad_cosine" in m for m in reported["logs"].values())
    if job in ("uncertainty", "dwa"):  # the weights moved, alike on both sides
        first, last = reported["logs"]["1"]["weights"], reported["logs"][max(logs.logs, key=int)]
        assert first != last["weights"]


@pytest.mark.slow
def test_per_task_files_with_class_weights_train_like_one_process(
    two_process_runs: dict[str, Path], tmp_path: Path, one_thread: None
) -> None:
    files = per_task_files(two_process_runs["_files_config"])
    logs, result = one_process(_merge(BASE_CONFIG, files), tmp_path)
    assert_same_run(two_process_runs["files"], logs, result, tmp_path)


@pytest.mark.slow
def test_a_stop_on_rank_0_stops_every_rank_at_the_same_step(
    two_process_runs: dict[str, Path],
) -> None:
    # the callback runs on rank 0 only; the launch exited 0 (the fixture checks it)
    assert (
        ranks(two_process_runs["stop"])
        == [{"step": 5, "outcome": "stopped", "stop_reason": "test stop at 5"}] * 2
    )
    assert not (two_process_runs["stop"] / "model").exists()


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_and_resume_is_exact(
    two_process_runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    job = {"config": reference_config(2), "out": str(out), "slow_after_checkpoint": 4}
    proc = run_entry([job], tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpointed").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 4"
        time.sleep(0.1)
    os.kill(int((tmp_path / "pids" / "rank-1.pid").read_text()), signal.SIGKILL)
    code, log = wait(proc, 120)
    assert code != 0, log[-3000:]
    assert not (out / "rank-0.json").exists()  # torchrun ended rank 0 too
    latest = Checkpointer(out / "checkpoints").latest()
    total = 14
    assert latest is not None and 4 <= int(latest.name.split("-")[1]) < total

    # resume with the CLI: `mtl train` launches torchrun itself (devices: 2 in the config)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(reference_config(2)))
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtl.cli",
            "train",
            str(config_file),
            "-o",
            str(out),
            "--no-tensorboard",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert cli.returncode == 0, (cli.stdout + cli.stderr)[-4000:]
    assert "model exported to" in cli.stdout
    assert (out / "model").is_dir()
    reference = two_process_runs["reference"]
    assert ranks(reference)[0]["step"] == total
    resumed, straight = final_tensors(out), final_tensors(reference)
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------ fast: config, sampler, CLI


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"weighting": {"name": "rlw"}}, "weighting.name"),
        ({"weighting": {"name": "gradnorm"}}, "weighting.name"),
        ({"weighting": {"name": "famo"}}, "weighting.name"),
        ({"gradient": {"name": "pcgrad"}}, "gradient.name"),
        ({"gradient": {"name": "mgda", "level": "parameters"}}, "gradient.name"),
        ({"gradient": {"name": "upgrad"}}, "gradient.name"),
    ],
)
def test_what_is_not_exact_on_several_devices_is_refused(over: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field}.*devices > 1 \(devices: 2\)"):
        load_config(config(2, **over))
    assert load_config(config(1, **over)).devices == 1  # one process: fine


def test_mlm_is_refused_on_several_devices(tmp_path: Path) -> None:
    raw = config(2, mlm={"weight": 0.5})
    raw["data"] = {"kind": "files", "train": str(tmp_path / "t.csv")}
    with pytest.raises(ConfigError, match=r"mlm\.weight .*devices > 1"):
        load_config(raw)


def test_devices_is_bounded() -> None:
    for bad in (0, 65):
        with pytest.raises(ConfigError, match="devices"):
            load_config({**config(1), "devices": bad})


def test_several_devices_outside_torchrun_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="devices: 2 trains in 2 processes started by"):
        Trainer(TrainConfig.model_validate(config(2)), tmp_path)


def test_the_cli_refuses_devices_for_a_strategy_that_needs_one_process(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config(1, gradient={"name": "pcgrad"})))
    result = CliRunner().invoke(app, ["train", str(path), "--devices", "2"])
    assert result.exit_code == 2
    assert "gradient.name" in result.output and "devices" in result.output


def test_shards_split_a_global_batch_contiguously() -> None:
    batch = list(range(100, 117))  # 17 rows
    parts = [shard(batch, r, 2) for r in range(2)]
    assert parts == [batch[:9], batch[9:]]
    parts = [shard(batch, r, 5) for r in range(5)]
    assert [len(p) for p in parts] == [4, 4, 3, 3, 3] and [i for p in parts for i in p] == batch
    assert [shard([7, 8], r, 3) for r in range(3)] == [[7], [8], []]


def test_two_ranks_take_exactly_the_global_batches_of_one_process() -> None:
    one = build_train_data(TrainConfig.model_validate(config(1)), None)
    two = build_train_data(TrainConfig.model_validate(config(2)), None)
    assert two.steps_per_epoch(1) == one.steps_per_epoch(1) == 7
    for epoch in (0, 1):
        plan1, plan2 = one.epoch_plan(epoch), two.epoch_plan(epoch)
        assert plan1.items == plan2.items  # length-grouped, a function of (seed, epoch)
        for i in range(len(plan1)):
            whole = plan1[i]
            shards = [plan2.shard(i, r, 2) for r in range(2)]
            rows = len(whole.input_ids)
            assert [s.local_rows for s in shards] == [rows - rows // 2, rows // 2]
            for t in whole.labels:
                joined = torch.cat([s.batch.labels[t] for s in shards])
                assert torch.equal(joined, whole.labels[t])
                assert torch.equal(shards[0].labels[t], whole.labels[t])
            assert shards[0].present == whole.present


def test_a_rank_without_rows_gets_an_unlabelled_stand_in() -> None:
    data = build_train_data(TrainConfig.model_validate(config(1)), None)
    plan = data.epoch_plan(0)
    plan.items[0] = (0, plan.items[0][1][:1])  # a global batch of one row
    empty = plan.shard(0, 1, 2)
    assert empty.local_rows == 0 and empty.rows == 1
    assert len(empty.batch.input_ids) == 1
    assert all(bool((y == -100).all()) for y in empty.batch.labels.values())
    assert empty.present == ["task_a", "task_b"]  # the global batch's


def test_the_launcher_runs_the_entry_module_under_torchrun() -> None:
    cmd = torchrun_command("my.entry", ["--x", "1"], 4)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc-per-node=4" in cmd
    assert cmd[-4:] == ["-m", "my.entry", "--x", "1"]
    with pytest.raises(ValueError):
        torchrun_command("my.entry", [], 0)


def test_sampling_the_gradient_cosine_does_not_change_accumulated_steps(
    tmp_path: Path, one_thread: None
) -> None:
    # a sampled step takes the task gradients apart; with 2 micro-batches per step its encoder
    # gradient once came out halved (divided by the accumulation twice)
    over = {**NO_DROPOUT, "grad_accum_steps": 2, "epochs": 1}
    sampled = train(TrainConfig.model_validate(config(1, **over)), tmp_path / "a")
    plain = train(
        TrainConfig.model_validate(config(1, **over, grad_conflict_every=0)), tmp_path / "b"
    )
    assert sampled.state.step == plain.state.step == 4
    b = final_tensors(tmp_path / "b")
    for name, tensor in final_tensors(tmp_path / "a").items():
        torch.testing.assert_close(tensor, b[name], rtol=RTOL, atol=1e-4, msg=name)
