"""The CLI client (`mtl submit/jobs/status/logs/cancel/download/predict --job`) against the
real service: a real redis-server, a real worker process, the API under uvicorn."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from mtl.cli import app, load_plugins
from tests.service.conftest import DUMMY, KEYS, long_config, submit, wait_for, wait_step

load_plugins(app)  # the service client's commands (entry point `mtl.cli`: client)


@pytest.fixture
def cli(service: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("MTL_URL", service)
    monkeypatch.setenv("MTL_API_KEY", KEYS["alice"])
    monkeypatch.setenv("COLUMNS", "200")
    return CliRunner()


def test_submit_follow_status_predict_download(
    cli: CliRunner, client: httpx.Client, tmp_path: Path
) -> None:
    config = tmp_path / "job.json"
    config.write_text(json.dumps(DUMMY))
    out = cli.invoke(app, ["submit", str(config), "--name", "cli", "--follow"])
    assert out.exit_code == 0, out.output
    job_id = out.output.split("submitted ")[1].split()[0]
    assert f"job {job_id} ended: succeeded" in out.output
    assert "task_a" in out.output and "task_b" in out.output

    out = cli.invoke(app, ["status", job_id, "--json"])
    assert out.exit_code == 0, out.output
    status = json.loads(out.output)
    assert status["state"] == "succeeded" and status["name"] == "cli"

    out = cli.invoke(app, ["jobs"])
    assert out.exit_code == 0 and job_id in out.output and "succeeded" in out.output

    out = cli.invoke(app, ["logs", job_id])
    assert out.exit_code == 0, out.output
    events = [json.loads(line) for line in out.output.splitlines()]
    assert events[-1]["type"] == "end" and events[-1]["data"] == {"state": "succeeded"}
    steps = [e["step"] for e in events if e["type"] == "log"]
    assert steps == sorted(set(steps)) and steps[-1] == status["progress"]["step"]

    out = cli.invoke(app, ["predict", "--job", job_id, "one text", "another", "--json"])
    assert out.exit_code == 0, out.output
    predictions = json.loads(out.output)
    assert len(predictions) == 2 and set(predictions[0]) == {"task_a", "task_b"}
    total = sum(predictions[0]["task_a"]["probabilities"].values())
    assert abs(total - 1) < 1e-4

    target = tmp_path / "model.tar.gz"
    out = cli.invoke(app, ["download", job_id, "-o", str(target)])
    assert out.exit_code == 0, out.output
    with tarfile.open(target) as tar:
        names = tar.getnames()
    assert "model/mtl.json" in names and "model/heads.safetensors" in names


def test_cancel_and_errors(cli: CliRunner, client: httpx.Client, tmp_path: Path) -> None:
    job = submit(client, long_config(steps=2000))
    wait_step(client, job["id"], 3, timeout=120)
    out = cli.invoke(app, ["cancel", job["id"]])
    assert out.exit_code == 0, out.output
    assert wait_for(client, job["id"], {"cancelled"})["state"] == "cancelled"
    out = cli.invoke(app, ["cancel", job["id"]])  # idempotent
    assert out.exit_code == 0 and "cancelled" in out.output

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**DUMMY, "tasks": [{"name": "a", "num_classes": 1}]}))
    out = cli.invoke(app, ["submit", str(bad)])
    assert out.exit_code == 2 and "tasks.0.num_classes" in out.output

    out = cli.invoke(app, ["status", "no-such-job"])
    assert out.exit_code == 1 and "404" in out.output

    out = cli.invoke(app, ["jobs", "--api-key", "wrong-key-123"])
    assert out.exit_code == 1 and "401" in out.output
