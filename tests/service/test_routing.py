"""Routing and priorities through the service: real workers that declare 1 and 2 devices, the
API in this process (its own key prefix, queue and limits), the session's redis-server.

* a job that needs N devices only reaches a worker with at least N (a 2-device job waits for
  the 2-device worker while the 1-device one is idle), and one no live worker could run is a
  422 naming `devices`;
* queued jobs start high before normal before low, and their queue positions say so;
* a key at its device limit (`MTL_MAX_DEVICES_PER_KEY`) has its next job held, visibly, until
  its running job ends; other keys are not held back.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from service.embedded import RedisServer, start_worker, stop_process
from service.queue import (
    device_refusal,
    job_queue,
    queued_reason,
    worker_queues,
)
from service.settings import Settings
from tests.service.conftest import DUMMY, long_config, wait_ready_for

pytestmark = pytest.mark.slow

PREFIX = "routetest"
OWNERS = {
    "alice": "alice-route-01",
    "bob": "bob-route-0002",
    "carol": "carol-route-03",
    "dave": "dave-route-004",
}
TERMINAL = {"succeeded", "failed", "cancelled"}


# ------------------------------------------------------------------------- pure routing


def test_queue_names_and_the_order_a_worker_reads_them() -> None:
    assert job_queue("q") == "q"  # one device, normal: the base queue, as before routing
    assert job_queue("q", 2) == "q.d2" and job_queue("q", 1, "high") == "q.high"
    assert job_queue("q", 4, "low") == "q.d4.low"
    assert worker_queues("q", 2) == ["q.d2.high", "q.high", "q.d2", "q", "q.d2.low", "q.low"]
    assert worker_queues("q", 1) == ["q.high", "q", "q.low"]
    with pytest.raises(ValueError, match="priority"):
        job_queue("q", 1, "urgent")


def test_refusals_and_reasons_say_why() -> None:
    workers = {"a:1": 1, "b:2": 2}
    assert device_refusal(2, workers, 0) is None
    assert "largest of the 2 live workers has 2" in (device_refusal(3, workers, 0) or "")
    assert "limit of 2 devices per API key" in (device_refusal(3, workers, 2) or "")
    assert device_refusal(8, {}, 0) is None  # no worker alive: nothing is known, it waits
    assert queued_reason(1, False, 3, {}, 0).startswith("no worker is running")
    assert queued_reason(2, False, 1, {"a:1": 1}, 0).startswith("no live worker has 2 devices")
    assert queued_reason(2, False, 3, workers, 0) == (
        "waiting for a free worker with at least 2 devices (1 live); 2 queued before it"
    )
    assert queued_reason(2, True, 1, workers, 4).startswith("held: this API key's other jobs")


def test_a_worker_declares_the_gpus_it_sees_or_its_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert Settings(worker_devices=3).local_devices() == 3
    gpus = sum(1 for p in Path("/dev").glob("nvidia*") if p.name[6:].isdigit())
    assert Settings().local_devices() == max(1, gpus)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert Settings().local_devices() == 1  # none visible: one (CPU) device


# ------------------------------------------------------------------------- the stack


class Stack:
    def __init__(self, redis_server: RedisServer, root: Path) -> None:
        #: the settings the API and the workers share
        self.settings: dict[str, Any] = {
            "redis_url": redis_server.url,
            "data_dir": str(root / "data"),
            "key_prefix": PREFIX,
            "queue_name": PREFIX,
            "api_keys": OWNERS,
            "lease_ttl_s": 3,
            "cancel_poll_s": 0.2,
            "reaper_interval_s": 0.5,
            "heartbeat_s": 0.5,
            "max_devices_per_key": 3,
            "torch_threads": 1,
        }
        self.env = {
            f"MTL_{k.upper()}": json.dumps(v) if isinstance(v, dict) else str(v)
            for k, v in self.settings.items()
        } | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.root = root
        self.workers: dict[int, subprocess.Popen[bytes]] = {}

    def start_worker(self, devices: int) -> None:
        env = {**self.env, "MTL_WORKER_DEVICES": str(devices)}
        log = self.root / f"worker-{devices}.log"
        self.workers[devices] = start_worker(env, log_file=log, name=f"route{devices}@%h")

    def runs_on(self, job: dict[str, Any]) -> int:
        """The declared devices of the worker whose child runs `job` (running now)."""
        pid = int(job["_worker"].rsplit(":", 2)[1])
        parents = {p.pid for p in psutil.Process(pid).parents()}
        (devices,) = [d for d, proc in self.workers.items() if proc.pid in parents]
        return devices

    def stop(self) -> None:
        for proc in self.workers.values():
            stop_process(proc, timeout=15)


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(redis_server, tmp_path_factory.mktemp("routing"))
    try:
        s.start_worker(2)
        s.start_worker(1)
        for proc in s.workers.values():
            wait_ready_for(s.env, proc)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(Settings(**stack.settings))) as client:
        yield client


def as_(owner: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {OWNERS[owner]}"}


def submit(api: Any, owner: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    r = api.post("/v1/jobs", json={**config, **extra}, headers=as_(owner))
    assert r.status_code == 202, r.text
    out: dict[str, Any] = r.json()
    return out


def get(api: Any, owner: str, job_id: str) -> dict[str, Any]:
    out: dict[str, Any] = api.get(f"/v1/jobs/{job_id}", headers=as_(owner)).json()
    return out


def wait_state(
    api: Any, owner: str, job_id: str, states: set[str], timeout: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = get(api, owner, job_id)
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"{job_id} still {job['state']}: {job}"
        time.sleep(0.1)


def running(api: Any, stack: Stack, owner: str, job_id: str) -> int:
    """Wait until the job runs; the devices of the worker running it."""
    import redis

    wait_state(api, owner, job_id, {"running"} | TERMINAL)
    db = redis.Redis.from_url(stack.env["MTL_REDIS_URL"], decode_responses=True)
    try:
        token = db.hget(f"{PREFIX}:job:{job_id}", "worker")
    finally:
        db.close()
    assert token, job_id
    return stack.runs_on({"_worker": token})


def cancel(api: Any, owner: str, job_id: str) -> None:
    assert api.post(f"/v1/jobs/{job_id}/cancel", headers=as_(owner)).status_code in (200, 202)
    wait_state(api, owner, job_id, TERMINAL, timeout=60)


def two_devices(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(cfg))
    cfg["devices"] = 2
    cfg["batch_size"] = max(1, cfg["batch_size"] // 2)
    return cfg


# ------------------------------------------------------------------------- the scenario


def test_jobs_reach_only_workers_with_their_devices_in_priority_order_within_key_limits(
    api: Any, stack: Stack
) -> None:
    # no worker could ever run it: refused now, naming the field (here and in /configs)
    for path in ("/v1/jobs", "/v1/configs/validate"):
        r = api.post(path, json={**DUMMY, "devices": 3}, headers=as_("bob"))
        assert r.status_code == 422, r.text
        (err,) = r.json()["detail"]
        assert err["loc"] == ["body", "devices"]
        assert "largest of the 2 live workers has 2" in err["msg"]
    r = api.post("/v1/jobs", json={**DUMMY, "devices": 4}, headers=as_("bob"))
    assert r.status_code == 422 and "limit of 3 devices per API key" in r.text
    r = api.post("/v1/jobs", json={**DUMMY, "priority": "urgent"}, headers=as_("bob"))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "priority"]

    # a 2-device job goes to the 2-device worker; a 1-device job then runs beside it
    big = submit(api, "alice", two_devices(long_config(steps=5000)))
    assert big["devices"] == 2 and big["priority"] == "normal"
    assert running(api, stack, "alice", big["id"]) == 2
    small = submit(api, "bob", DUMMY)
    assert running(api, stack, "bob", small["id"]) == 1
    assert wait_state(api, "bob", small["id"], TERMINAL)["state"] == "succeeded"

    # alice holds 2 of her 3 devices: her next 2-device job is held, bob's is not; the idle
    # 1-device worker takes neither
    held = submit(api, "alice", two_devices(long_config(steps=5000)))
    assert held["state"] == "queued" and held["queued_reason"].startswith("held: this API key")
    waiting = submit(api, "bob", two_devices(long_config(steps=5000)))
    assert waiting["queued_reason"].startswith(
        "waiting for a free worker with at least 2 devices (1 live)"
    ), waiting
    time.sleep(2)  # several maintenance passes and idle polls of the 1-device worker
    for owner, job in (("alice", held), ("bob", waiting)):
        assert get(api, owner, job["id"])["state"] == "queued"

    # priorities, on the 1-device worker kept busy by carol's blocker (carol's three jobs
    # stay within her 3 devices: none is held)
    blocker = submit(api, "carol", long_config(steps=5000))
    assert running(api, stack, "carol", blocker["id"]) == 1
    low = submit(api, "carol", DUMMY, priority="low")
    normal = submit(api, "dave", DUMMY)
    high = submit(api, "carol", DUMMY, priority="high")
    order = (("carol", high), ("dave", normal), ("carol", low))
    positions = [get(api, owner, job["id"])["queue_position"] for owner, job in order]
    assert positions[0] == 1, positions  # before every normal job waiting, bob's too
    assert positions == sorted(positions), positions
    cancel(api, "carol", blocker["id"])
    done = [wait_state(api, owner, job["id"], TERMINAL) for owner, job in order]
    assert [d["state"] for d in done] == ["succeeded"] * 3, done
    starts = [d["started_at"] for d in done]
    assert starts == sorted(starts), done  # high, then normal, then low

    # bob's 2-device job never started on the idle 1-device worker
    cancel(api, "bob", waiting["id"])
    assert get(api, "bob", waiting["id"])["started_at"] is None
    # alice's running job ends: her held job is released to the workers
    assert get(api, "alice", held["id"])["state"] == "queued"
    cancel(api, "alice", big["id"])
    deadline = time.monotonic() + 10
    while (job := get(api, "alice", held["id"]))["state"] == "queued" and job[
        "queued_reason"
    ].startswith("held"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    if job["state"] == "queued":
        assert job["queued_reason"].startswith("waiting for a free worker with at least 2"), job
    cancel(api, "alice", held["id"])  # queued or just started on the 2-device worker
