"""Jobs on several devices through the service: the worker's child launches torchrun (gloo on
this CPU), rank 0 reports and finishes, cancel reaches every rank, and a killed rank makes the
job resume from its last checkpoint (the lease expires, the reaper re-queues it)."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import httpx
import psutil
import pytest

from tests.service.conftest import DUMMY, long_config, submit, wait_for

pytestmark = pytest.mark.slow

TERMINAL = {"succeeded", "failed", "cancelled"}


def _ranks() -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "worker.ranks" in cmdline and "torch.distributed.run" not in " ".join(cmdline):
            out.append(proc)
    return out


def _rank(number: int) -> psutil.Process | None:
    for proc in _ranks():
        try:
            if proc.environ().get("RANK") == str(number):
                return proc
        except psutil.Error:
            continue
    return None


def _wait_no_ranks(timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _ranks():
        assert time.monotonic() < deadline, f"ranks still alive: {_ranks()}"
        time.sleep(0.2)


def _two_devices(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(cfg))
    cfg["devices"] = 2
    cfg["batch_size"] = max(1, cfg["batch_size"] // 2)  # per process: the same global batch
    return cfg


def test_a_two_device_job_trains_reports_and_exports(client: httpx.Client) -> None:
    job = submit(client, _two_devices(DUMMY))
    done = wait_for(client, job["id"], TERMINAL, timeout=240)
    assert done["state"] == "succeeded", done
    assert done["progress"]["step"] == done["progress"]["total_steps"] == 32
    history = client.get(f"/v1/jobs/{job['id']}/metrics").json()["items"]
    logs = [m for m in history if m["type"] == "log"]
    assert [m["step"] for m in logs] == [5, 10, 15, 20, 25, 30, 32]
    assert all(m["attempt"] == 1 for m in history)
    assert 0 <= done["final_metrics"]["validation"]["tasks"]["task_a"]["accuracy"] <= 1
    r = client.post(f"/v1/jobs/{job['id']}/predict", json={"texts": ["hello"]})
    assert r.status_code == 200, r.text
    _wait_no_ranks()  # every rank exits


def test_cancel_reaches_every_rank(client: httpx.Client) -> None:
    job = submit(client, _two_devices(long_config(steps=2000)))
    deadline = time.monotonic() + 180
    while client.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert len(_ranks()) == 2
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code in (200, 202)
    done = wait_for(client, job["id"], TERMINAL, timeout=60)
    assert done["state"] == "cancelled", done
    _wait_no_ranks()  # no rank outlives the cancel


def test_a_killed_rank_resumes_the_job_from_its_checkpoint(client: httpx.Client) -> None:
    job = submit(client, _two_devices(long_config(steps=80, checkpoint_every=20)))
    deadline = time.monotonic() + 180
    while (client.get(f"/v1/jobs/{job['id']}").json().get("checkpoint_step") or 0) < 20:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    victim = _rank(1)
    assert victim is not None
    victim.send_signal(signal.SIGKILL)
    done = wait_for(client, job["id"], TERMINAL, timeout=300)
    assert done["state"] == "succeeded", done
    assert done["attempt"] == 2 and done["restarts"] == 1, done
    history = client.get(f"/v1/jobs/{job['id']}/metrics").json()["items"]
    resumed = [m for m in history if m["attempt"] == 2]
    assert resumed and min(m["step"] for m in resumed) > 20
    _wait_no_ranks()
