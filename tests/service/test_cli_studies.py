"""`mtl study submit/status/cancel` against the real service: a real redis-server, a real worker
process (which drives the study), the API under uvicorn."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from mtl.cli import app, load_plugins
from tests.service.conftest import KEYS
from tests.service.test_studies import TERMINAL, base_config, study_body, wait_study

load_plugins(app)  # the service client's commands (entry point `mtl.cli`: client)


@pytest.fixture
def cli(service: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("MTL_URL", service)
    monkeypatch.setenv("MTL_API_KEY", KEYS["alice"])
    monkeypatch.setenv("COLUMNS", "200")
    return CliRunner()


def slow_study() -> dict[str, Any]:
    """A study whose first trial trains long enough to be cancelled mid-run."""
    slow = base_config(max_steps=3000, eval_every=50, log_every=5)
    slow["data"]["num_samples"] = 4096
    slow["batch_size"] = 8
    return study_body(base=slow, budget={"trials": 3, "parallel": 1})


def wait_first_trial_trains(client: httpx.Client, study_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        trials = client.get(f"/v1/studies/{study_id}").json()["trials"]
        if trials and trials[0]["jobs"]:
            job = client.get(f"/v1/jobs/{trials[0]['jobs'][0]}").json()
            if job["progress"]["step"] >= 3:
                return
        assert time.monotonic() < deadline, trials
        time.sleep(0.1)


def test_submit_follow_then_status(cli: CliRunner, client: httpx.Client, tmp_path: Path) -> None:
    body = study_body(name="from the cli", budget={"trials": 2, "parallel": 1})  # + baselines
    file = tmp_path / "study.yaml"
    file.write_text(yaml.safe_dump(body))
    out = cli.invoke(app, ["study", "submit", str(file), "--follow"])
    assert out.exit_code == 0, out.output
    study_id = re.search(r"submitted (study_\w+)", out.output)[1]  # type: ignore[index]
    assert f"study {study_id} ended: succeeded" in out.output
    api = client.get(f"/v1/studies/{study_id}").json()
    assert api["state"] == "succeeded" and api["name"] == "from the cli"

    # the live table ends with every trial and the best; then the verdict, with the API's numbers
    live, verdict = out.output.split("multi-task verdict")
    assert "2/2 trials done" in live
    assert f"best so far: trial {api['best_trial']} = {api['best_value']:.4f}" in live
    for trial in api["trials"]:
        label = trial["baseline"] or str(trial["number"])
        row = next(line for line in live.splitlines() if re.match(rf"^│ {label}\b", line))
        assert "complete" in row and f"{trial['value']:.4f}" in row, row
    v = api["verdict"]
    for task in ("task_a", "task_b"):
        t = v["tasks"][task]
        row = next(line for line in verdict.splitlines() if line.startswith(f"│ {task} "))
        cells = [c.strip() for c in row.strip().strip("│").split("│")]
        assert cells == [
            task,
            f"{t['multi_task']:.4f}",
            f"{t['single_task']:.4f}",
            f"{t['difference']:+.4f}",
            f"{t['sum']:.4f}",
        ]
    assert f"Δ_MTL: {v['delta_mtl']:+.2f} %" in verdict

    # status --json is the API's study, number for number
    out = cli.invoke(app, ["study", "status", study_id, "--json"])
    assert out.exit_code == 0, out.output
    status = json.loads(out.output)
    assert status == client.get(f"/v1/studies/{study_id}").json()
    assert (status["trials_done"], status["trials_planned"]) == (2, 2)

    # status as tables: state, trials done/planned, the best, the leaderboard, the verdict
    out = cli.invoke(app, ["study", "status", study_id])
    assert out.exit_code == 0, out.output
    text = out.output
    assert f"{study_id} (from the cli)  succeeded  trials 2/2 done" in text
    assert f"best: trial {api['best_trial']} = {api['best_value']:.4f}" in text
    assert "weighting.name=" in text and "leaderboard" in text
    board = [
        line.split("│")[1].strip()
        for line in text.split("leaderboard")[1].split("└")[0].splitlines()
        if line.startswith("│")
    ]
    search = [t for t in api["trials"] if t["kind"] == "search"]
    assert board[:2] == [f"{search[0]['number']} ★", str(search[1]["number"])]  # best first
    assert sorted(board[2:]) == ["single:task_a", "single:task_b", "sum"]
    assert f"Δ_MTL: {v['delta_mtl']:+.2f} %" in text


def test_cancel_a_running_study(cli: CliRunner, client: httpx.Client, tmp_path: Path) -> None:
    sid = client.post("/v1/studies", json=slow_study()).json()["id"]
    wait_first_trial_trains(client, sid)
    out = cli.invoke(app, ["study", "cancel", sid])
    assert out.exit_code == 0, out.output
    assert f"{sid}: cancelling" in out.output
    done = wait_study(client, sid, TERMINAL, timeout=60)
    assert done["state"] == "cancelled" and [t["state"] for t in done["trials"]] == ["cancelled"]
    out = cli.invoke(app, ["study", "cancel", sid])  # idempotent
    assert out.exit_code == 0 and f"{sid}: cancelled" in out.output
    out = cli.invoke(app, ["study", "status", sid])
    assert out.exit_code == 0, out.output
    assert f"{sid} (test study)  cancelled" in out.output and "no verdict" in out.output


def test_follow_exits_1_when_the_study_does_not_succeed(
    cli: CliRunner, client: httpx.Client, tmp_path: Path
) -> None:
    """`submit --follow` of a study cancelled meanwhile (by the API, from another thread)."""
    file = tmp_path / "study.json"
    file.write_text(json.dumps(slow_study()))
    cancelled: list[str] = []

    def cancel_when_training() -> None:
        with httpx.Client(base_url=str(client.base_url), headers=client.headers) as c:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                items = c.get("/v1/studies", params={"limit": 1}).json()["items"]
                if items and items[0]["state"] not in TERMINAL and items[0]["trials_started"]:
                    wait_first_trial_trains(c, items[0]["id"])
                    c.post(f"/v1/studies/{items[0]['id']}/cancel")
                    cancelled.append(items[0]["id"])
                    return
                time.sleep(0.1)

    thread = threading.Thread(target=cancel_when_training, daemon=True)
    thread.start()
    out = cli.invoke(app, ["study", "submit", str(file), "--follow"])
    thread.join(timeout=10)
    assert cancelled and out.exit_code == 1, out.output
    assert f"submitted {cancelled[0]}" in out.output
    assert f"study {cancelled[0]} ended: cancelled" in out.output


def test_errors(cli: CliRunner, tmp_path: Path) -> None:
    out = cli.invoke(app, ["study", "status", "study_nope"])
    assert out.exit_code == 1 and "HTTP 404: study study_nope not found" in out.output
    out = cli.invoke(app, ["study", "cancel", "study_nope"])
    assert out.exit_code == 1 and "HTTP 404: study study_nope not found" in out.output

    bad = study_body()
    bad["search_space"].append({"path": "optimizer.nope", "choice": [1, 2]})
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(bad))
    out = cli.invoke(app, ["study", "submit", str(file)])
    assert out.exit_code == 1 and "HTTP 422: search_space.2.path" in out.output, out.output

    # the file itself: unreadable, not JSON, not a mapping (exit 2, nothing submitted)
    for name, text, why in [
        ("missing.yaml", None, "cannot read"),
        ("broken.json", "{", "not valid JSON"),
        ("list.yaml", "- a list\n", "must be a mapping"),
    ]:
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        out = cli.invoke(app, ["study", "submit", str(path)])
        assert out.exit_code == 2 and why in out.output, (name, out.output)
