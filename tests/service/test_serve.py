"""`app.serve.serve` (what `mtl serve` runs): embedded Redis, one worker, the API; and what
happens to them when Redis or `mtl serve` itself is SIGKILLed, and when a second `mtl serve`
starts on the same data directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from app.core.events import STORE_UNAVAILABLE
from service.embedded import REPO_ROOT, free_port, stop_process
from service.keys import Keys
from tests.service.conftest import KEYS, auth, long_config, read_sse, submit, wait_for, wait_step
from tests.service.test_faults import TERMINAL, alive, wait_until
from tests.service.test_faults_stack import Follower, same_stream


def test_serve_runs_the_swagger_example(tmp_path: Path) -> None:
    port = free_port()
    redis_port = free_port()
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTL_")}
    env.update(MTL_TORCH_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    code = (
        "from app.serve import serve; "
        f"serve(port={port}, data_dir={str(data_dir)!r}, redis_port={redis_port}, "
        "log_level='warning')"
    )
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            cwd=str(REPO_ROOT),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert "open access" in log.read_text()  # no keys: a warning at start-up

        with httpx.Client(base_url=url, timeout=30) as client:
            spec = client.get("/openapi.json").json()
            content = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
            example = content["application/json"]["examples"]["two_task_dummy"]["value"]
            r = client.post("/v1/jobs", json=example)  # exactly what "Try it out" sends
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            events, _ = read_sse(client, job_id)
            job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "succeeded", job
        first_log = next(e for e in events if e.get("event") == "log")
        assert first_log["received"] < job["finished_at"]  # streamed live, not replayed after
        assert events[-1]["event"] == "end"
        assert (data_dir / "jobs" / job_id / "model" / "mtl.json").is_file()
        assert any((data_dir / "redis").glob("appendonly*"))  # persistence in the data dir
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process(proc, sig=signal.SIGKILL)
                raise
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    # everything it started is gone: Redis no longer answers
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", redis_port)) != 0


# ------------------------------------------------------------------ faults under `mtl serve`

SERVE_ENV = {
    "MTL_API_KEYS": json.dumps(KEYS),
    "MTL_HEARTBEAT_S": "0.5",  # /readyz sees the worker again soon after Redis is back
    "MTL_REAPER_INTERVAL_S": "0.5",
    "MTL_CANCEL_POLL_S": "0.2",
    "MTL_SSE_KEEPALIVE_S": "1",
    "MTL_REDIS_TIMEOUT_S": "1",
    "MTL_TORCH_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}


class Served:
    """`mtl serve` (`app.serve.serve`) in a process of its own, on one data directory; it can
    be started again on the same directory (new ports) after a test killed it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.data_dir = directory / "data"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.port = self.redis_port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def log(self) -> Path:
        return self.dir / f"serve-{self.starts}.log"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def start(self) -> Served:
        self.starts += 1
        self.port, self.redis_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MTL_")}
        env.update(SERVE_ENV, PYTHONPATH=str(REPO_ROOT))
        code = (
            "from app.serve import serve; "
            f"serve(port={self.port}, data_dir={str(self.data_dir)!r}, "
            f"redis_port={self.redis_port}, log_level='warning')"
        )
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code], env=env, cwd=str(REPO_ROOT), stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_until(self.ready, "mtl serve to be ready", 120, interval=0.2)
        return self

    def ready(self) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, self.log_text()[-3000:]
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def descendants(self) -> dict[int, str]:
        """Every process under `mtl serve`: redis-server, the worker and its pool process."""
        return {p.pid: p.name() for p in psutil.Process(self.pid).children(recursive=True)}

    def redis_pid(self) -> int:
        [pid] = [pid for pid, name in self.descendants().items() if name == "redis-server"]
        return pid

    def db(self) -> redis.Redis:
        """A client of the embedded Redis (its password is in its config, 0600)."""
        conf = (self.data_dir / "redis" / "redis.conf").read_text()
        [password] = [
            line.split()[1] for line in conf.splitlines() if line.startswith("requirepass")
        ]
        return redis.Redis(port=self.redis_port, password=password, decode_responses=True)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process(self.process, sig=signal.SIGKILL)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    handle = Served(tmp_path_factory.mktemp("serve"))
    try:
        yield handle.start()
    finally:
        handle.stop()


@pytest.mark.slow
def test_a_second_serve_on_the_same_data_dir_exits_naming_the_first(served: Served) -> None:
    """While one `mtl serve` runs, `mtl serve` on the same data directory exits with status 1
    at once, naming the first one's pid, and starts nothing: no redis-server on the same AOF
    (it would have written a config with a new password first)."""
    conf = served.data_dir / "redis" / "redis.conf"
    before = conf.read_text()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTL_")}
    started = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "mtl.cli", "serve", "--data-dir", str(served.data_dir),
         "--port", str(free_port())],
        env=env, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert second.returncode == 1, (second.stdout, second.stderr)
    assert f"in use by another `mtl serve` (pid {served.pid})" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr and elapsed < 20, (second.stderr, elapsed)
    assert conf.read_text() == before
    assert (served.data_dir / "serve.lock").read_text().strip() == str(served.pid)
    assert served.ready()  # the first one is untouched


class ReadyzPoller(threading.Thread):
    """Polls `/readyz` every 20 ms, recording (status code, its `redis` field)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.seen: list[tuple[int, bool]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self.stop.is_set():
                try:
                    r = client.get(f"{self.url}/readyz")
                    self.seen.append((r.status_code, r.json()["redis"]))
                except httpx.TransportError:
                    self.seen.append((0, False))
                self.stop.wait(0.02)

    def back_to_ready(self) -> bool:
        """`/readyz` went 503 with `redis: false`, and is 200 again."""
        down = self.seen.index((503, False)) if (503, False) in self.seen else None
        return down is not None and (200, True) in self.seen[down:]


@pytest.mark.slow
def test_a_killed_redis_is_restarted_with_its_aof(served: Served) -> None:
    """SIGKILL to the embedded redis-server while a job trains and a client follows its
    events: within seconds a new redis-server answers on the same port (the dead one was
    reaped), `/readyz` went 503 (`redis: false`) and is 200 again, the job, whose records
    came back from the AOF, succeeds under the same attempt, and the client's stream is the
    job's stream exactly (if it ended with the `error` event, the client reconnected with
    Last-Event-ID)."""
    with httpx.Client(base_url=served.url, headers=auth(), timeout=30) as client:
        total = 300
        job_id = submit(client, long_config(steps=total, checkpoint_every=50))["id"]
        follower = Follower(served.url, job_id)
        follower.start()
        assert wait_step(client, job_id, 20)["state"] == "running"
        poller = ReadyzPoller(served.url)
        poller.start()
        wait_until(lambda: poller.seen, "a first /readyz")
        old = served.redis_pid()
        os.kill(old, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(poller.back_to_ready, "/readyz 503, then 200 again", 30)
        back_after = time.monotonic() - killed
        poller.stop.set()
        assert back_after < 10, back_after
        assert not Path(f"/proc/{old}").exists()  # reaped by `mtl serve`, not left a zombie
        new = served.redis_pid()
        assert new != old
        db = served.db()  # the same port and password
        assert db.hget(Keys("mtl").job(job_id), "attempt") == "1"  # the record, from the AOF
        db.close()
        # the supervisor logs "is back" after its start() returns, which may be just after the
        # new server first answers /readyz
        back = f"redis-server is back (pid {new}"
        wait_until(lambda: back in served.log_text(), "the supervisor's 'is back' line", 10)
        log = served.log_text()
        assert f"redis-server (pid {old}) was killed by signal 9" in log, log[-3000:]

        final = wait_for(client, job_id, TERMINAL, timeout=120)
        assert (final["state"], final["attempt"], final["restarts"]) == ("succeeded", 1, 0), final
        got = follower.wait()
        full, _ = read_sse(client, job_id)
    same_stream(got, full)
    errors = [e for e in got if e.get("event") == "error"]
    assert all(e["data"] == {"detail": STORE_UNAVAILABLE} for e in errors), errors
    print(f"redis back after {back_after:.2f}s; error events: {len(errors)}; "
          f"connects: {follower.connects}")  # fmt: skip


@pytest.mark.slow
def test_the_children_of_a_killed_serve_die_with_it(served: Served) -> None:
    """SIGKILL to `mtl serve` itself (as the OOM killer would) while a job trains: its
    redis-server, its worker and the worker's training process are all gone within seconds
    (PR_SET_PDEATHSIG), the data directory's lock went with it, and a new `mtl serve` on the
    same directory starts and still has the job."""
    with httpx.Client(base_url=served.url, headers=auth(), timeout=30) as client:
        job_id = submit(client, long_config(steps=300, checkpoint_every=50))["id"]
        assert wait_step(client, job_id, 10)["state"] == "running"
    children = served.descendants()
    assert "redis-server" in children.values() and len(children) >= 3, children
    os.kill(served.pid, signal.SIGKILL)
    assert served.process is not None
    served.process.wait(timeout=10)
    killed = time.monotonic()
    wait_until(lambda: not any(alive(pid) for pid in children), "its children to die", 10)
    print(f"{len(children)} children gone {time.monotonic() - killed:.2f}s after the kill")
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", served.redis_port)) != 0

    served.start()  # the same data directory
    with httpx.Client(base_url=served.url, headers=auth(), timeout=30) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] in ("running", "queued"), job  # it resumes once its lease expires
