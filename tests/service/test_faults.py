"""Fault injection against the real stack: the session's redis-server, a real Celery worker
process (and a second one where a test needs it) and the API under uvicorn.

Every test breaks something for real (SIGKILL, SIGSTOP, SIGTERM, a duplicate message on the
broker, a file changed on disk, a loss that overflows) and then checks the promise of
`docs/reliability.md`: states, attempts, reasons, and that the metric history and the event
stream show every step once, from one attempt at a time.

The training process of an attempt is found through the job record: `worker` is the lease
token `<host>:<pid>:<hex>` written by `begin` in the Celery child that runs the attempt.
The session settings (tests/service/conftest.py) give a 3 s lease, a 0.5 s reaper and
`MTL_MAX_RESTARTS` 3 (four attempts).

Redis kills and stalls, API restarts and a full disk need processes of their own:
tests/service/test_faults_stack.py.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import pytest
import redis

from service.keys import Keys
from service.queue import message_attempt
from tests.service.conftest import (
    DUMMY,
    PREFIX,
    WorkerHandle,
    long_config,
    read_sse,
    submit,
    wait_for,
    wait_step,
)

pytestmark = pytest.mark.slow

T = TypeVar("T")
TERMINAL = {"succeeded", "failed", "cancelled"}
REDIS_KEYS = Keys(PREFIX)


# ------------------------------------------------------------------------------ helpers


def wait_until(fn: Callable[[], T], what: str, timeout: float = 60, interval: float = 0.02) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def record(db: redis.Redis, job_id: str) -> dict[str, str]:
    return db.hgetall(REDIS_KEYS.job(job_id))  # type: ignore[return-value]


def token_pid(token: str | None) -> int | None:
    """The pid in a lease token `<host>:<pid>:<hex>` (the process that runs the attempt)."""
    return int(token.rsplit(":", 2)[1]) if token else None


def running_attempt(db: redis.Redis, job_id: str, attempt: int, timeout: float = 60) -> int:
    """Wait until `attempt` of the job is running; returns the pid of its training process."""

    def check() -> int | None:
        rec = record(db, job_id)
        assert rec.get("state") not in TERMINAL, rec
        if rec.get("state") == "running" and int(rec["attempt"]) == attempt:
            return token_pid(rec.get("worker"))
        return None

    return wait_until(check, f"attempt {attempt} of {job_id} to run", timeout)


def broker_messages(db: redis.Redis, queue_key: str) -> list[tuple[str, int] | None]:
    """The `(job_id, attempt)` of each message waiting on a broker queue, oldest first."""
    return [message_attempt(raw) for raw in reversed(db.lrange(queue_key, 0, -1))]


def maintenance_passes(
    db: redis.Redis,
    pid: int,
    log_text: Callable[[], str],
    passes: int = 2,
    timeout: float = 30,
) -> None:
    """Wait until the maintenance thread (heartbeat, reaper, lost-message check) of the worker
    whose main process is `pid` has run `passes` whole passes that began after this call.
    Each pass writes the heartbeat first, then reaps: `passes + 1` new heartbeats enclose
    `passes` complete reaper passes. None of them may have failed (`log_text`: its log).
    `db` decodes responses."""
    suffix = f":{pid}"
    beats = [time.time() * 1000]
    log_before = len(log_text())

    def advanced() -> bool:
        for member, score in db.zrange(REDIS_KEYS.workers, 0, -1, withscores=True):
            if member.endswith(suffix) and score > beats[-1]:
                beats.append(score)
        return len(beats) > passes + 1

    wait_until(advanced, f"{passes} maintenance passes of worker {pid}", timeout, 0.05)
    assert "maintenance pass failed" not in log_text()[log_before:]


def worker_passes(db: redis.Redis, worker: WorkerHandle, passes: int = 2) -> None:
    """`maintenance_passes` of a running `WorkerHandle`."""
    assert worker.process is not None and worker.process.poll() is None
    maintenance_passes(db, worker.process.pid, worker.log_text, passes)


RESUMED_ONCE = [(1, "queued"), (1, "running"), (2, "queued"), (2, "running"), (2, "succeeded")]


def finished_as_attempt_2(
    client: httpx.Client, job_id: str, total: int, worker: WorkerHandle
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Wait for the job; it must have succeeded as attempt 2 after one restart, with all
    `total` steps and the state events of exactly one re-queue. Returns (job, events)."""
    final = wait_for(client, job_id, TERMINAL, timeout=120)
    assert final["state"] == "succeeded", (final, worker.log_text()[-3000:])
    assert (final["attempt"], final["restarts"], final["progress"]["step"]) == (2, 1, total)
    events, _ = read_sse(client, job_id)
    assert state_events(events) == RESUMED_ONCE
    return final, events


def wait_checkpoint(
    client: httpx.Client, job_id: str, at_least: int, past: int = 0, timeout: float = 90
) -> dict[str, Any]:
    """Wait until a checkpoint at step >= `at_least` exists and training went `past` steps
    beyond it (steps a resumed attempt must redo)."""

    def check() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] in ("queued", "running"), job
        ckpt = job["checkpoint_step"] or 0
        return job if ckpt >= at_least and job["progress"]["step"] >= ckpt + past else None

    return wait_until(check, f"a checkpoint of {job_id}", timeout, interval=0.01)


def state_events(events: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [
        (e["data"]["attempt"], e["data"]["data"]["state"])
        for e in events
        if e.get("event") == "state"
    ]


def check_one_attempt_at_a_time(events: list[dict[str, Any]]) -> None:
    """In stream order, attempt numbers never go back: once attempt N+1 is queued, nothing
    of attempt N is written any more (the fencing of every append and of `finish`)."""
    attempts = [e["data"]["attempt"] for e in events if "id" in e]
    assert attempts == sorted(attempts), attempts
    running = [a for a, s in state_events(events) if s == "running"]
    assert running == sorted(set(running)), f"an attempt started twice: {running}"


def check_each_step_once(
    client: httpx.Client,
    job_id: str,
    events: list[dict[str, Any]],
    total: int,
    log_every: int,
    eval_every: int,
) -> list[dict[str, Any]]:
    """The metric history and the event stream show every log and evaluation step once."""
    history = client.get(f"/v1/jobs/{job_id}/metrics").json()["items"]
    logs = [m["step"] for m in history if m["type"] == "log"]
    assert logs == list(range(log_every, total + 1, log_every)), logs
    evals = [m["step"] for m in history if m["type"] == "evaluate"]
    assert evals == list(range(eval_every, total + 1, eval_every)), evals
    stream_logs = [e["data"]["step"] for e in events if e.get("event") == "log"]
    assert stream_logs == logs
    stream_evals = [e["data"]["step"] for e in events if e.get("event") == "evaluate"]
    assert stream_evals == evals
    return history


def resume_of(events: list[dict[str, Any]], attempt: int) -> dict[str, Any]:
    found = [
        e["data"]["data"]
        for e in events
        if e.get("event") == "resume" and e["data"]["attempt"] == attempt
    ]
    assert len(found) == 1, found
    return found[0]


def send_message(env: dict[str, str], job_id: str, attempt: int, queue: str) -> None:
    """Publish `(job_id, attempt)` the way the API and the reaper do, to `queue`."""
    from service.queue import enqueue, make_celery
    from service.settings import Settings

    settings = Settings(**{"redis_url": env["MTL_REDIS_URL"], "key_prefix": env["MTL_KEY_PREFIX"],
                           "queue_name": queue})  # fmt: skip
    celery = make_celery(settings)
    try:
        enqueue(celery, settings, job_id, attempt)
    finally:
        celery.close()


@pytest.fixture
def db(service_env: dict[str, str]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(service_env["MTL_REDIS_URL"], decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def spare_worker(
    service_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., WorkerHandle]]:
    """Start a second worker process (`queue` defaults to the service queue); stopped after
    the test."""
    started: list[WorkerHandle] = []

    def start(queue: str | None = None, **extra_env: str) -> WorkerHandle:
        env = {**service_env, "MTL_QUEUE_NAME": queue or service_env["MTL_QUEUE_NAME"]}
        env |= extra_env
        handle = WorkerHandle(env, tmp_path)
        handle.count = 100 + len(started)  # its own log file names
        started.append(handle)
        handle.start()
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture
def healthy_worker(worker: WorkerHandle) -> Iterator[WorkerHandle]:
    """The session worker, restarted after the test if the test left it dead."""
    yield worker
    if worker.process is None or worker.process.poll() is not None:
        worker.start()


# ------------------------------------------------------------------- worker loss: SIGKILL


def test_training_child_sigkill_resumes_on_the_same_worker(
    client: httpx.Client, db: redis.Redis, healthy_worker: WorkerHandle
) -> None:
    """The Celery child that trains is killed (OOM killer, segfault): the worker's main
    process survives, its reaper sees the lease expire and re-queues the job; a fresh child
    resumes from the last complete checkpoint."""
    worker = healthy_worker
    total, every = 400, 50
    job_id = submit(client, long_config(steps=total, checkpoint_every=every))["id"]
    pid = running_attempt(db, job_id, 1)
    assert pid != worker.process.pid  # type: ignore[union-attr]
    before = wait_checkpoint(client, job_id, at_least=every, past=10)
    os.kill(pid, signal.SIGKILL)
    at_kill = client.get(f"/v1/jobs/{job_id}").json()
    assert at_kill["state"] == "running" and at_kill["attempt"] == 1

    new_pid = running_attempt(db, job_id, 2, timeout=30)
    assert new_pid != pid and not alive(pid)
    _, events = finished_as_attempt_2(client, job_id, total, worker)
    assert worker.process.poll() is None  # type: ignore[union-attr]  # the same main process
    requeue = [e for e in events if e.get("event") == "state"][2]["data"]["data"]
    assert requeue["reason"] == (
        "the worker running attempt 1 was lost (its lease expired); re-queued as attempt 2"
    )
    resume = resume_of(events, 2)
    # the last complete checkpoint when the child died (one may have completed in between)
    assert before["checkpoint_step"] <= resume["from_step"] <= at_kill["progress"]["step"]
    assert resume["from_step"] % every == 0 and requeue["resume_from_step"] == resume["from_step"]
    check_one_attempt_at_a_time(events)
    history = check_each_step_once(client, job_id, events, total, 5, every)
    assert {m["attempt"] for m in history if m["step"] <= resume["from_step"]} == {1}
    assert {m["attempt"] for m in history if m["step"] > resume["from_step"]} == {2}


def test_worker_main_sigkill_resumes_and_strands_no_queued_job(
    client: httpx.Client, db: redis.Redis, service_env: dict[str, str], healthy_worker: WorkerHandle
) -> None:
    """SIGKILL to the worker's main process only: its training child dies with it
    (PR_SET_PDEATHSIG), nobody renews the lease, and the next worker's reaper re-queues the
    job, which resumes from its checkpoint. A job that was queued behind it is not stranded
    in the dead worker's prefetch (it starts right after, not after `visibility_timeout`)."""
    worker = healthy_worker
    total, every = 300, 50
    running_id = submit(client, long_config(steps=total, checkpoint_every=every))["id"]
    child = running_attempt(db, running_id, 1)
    queued_id = submit(client, DUMMY)["id"]
    wait_checkpoint(client, running_id, at_least=every, past=5)
    # the queued job's message waits on the broker while the busy worker's main process (the
    # one that would reserve it) goes on: it has had every chance to reserve the message
    queue_key = REDIS_KEYS.broker_queue(service_env["MTL_QUEUE_NAME"])
    waiting = [(queued_id, 1)]
    wait_until(lambda: broker_messages(db, queue_key) == waiting, "the message on the broker", 10)
    worker_passes(db, worker)
    main = worker.process
    assert main is not None
    os.kill(main.pid, signal.SIGKILL)
    main.wait(timeout=10)
    wait_until(lambda: not alive(child), "the training child to die with its parent", 10)
    # nobody has noticed: no worker, no reaper; the message was never reserved, so it is
    # still waiting on the queue (not in kombu's `unacked` hash, where it would sit for
    # `visibility_timeout`)
    assert client.get(f"/v1/jobs/{running_id}").json()["state"] == "running"
    assert client.get(f"/v1/jobs/{queued_id}").json()["state"] == "queued"
    assert broker_messages(db, queue_key) == waiting
    unacked = db.hvals(REDIS_KEYS.broker_unacked)
    assert (queued_id, 1) not in [message_attempt(raw) for raw in unacked], unacked

    worker.start()
    _, events = finished_as_attempt_2(client, running_id, total, worker)
    second = wait_for(client, queued_id, TERMINAL, timeout=60)
    assert second["state"] == "succeeded" and second["attempt"] == 1, second

    assert resume_of(events, 2)["from_step"] >= every
    check_one_attempt_at_a_time(events)
    check_each_step_once(client, running_id, events, total, 5, every)


def test_a_lost_message_is_found_and_its_job_runs(
    client: httpx.Client, db: redis.Redis, service_env: dict[str, str], healthy_worker: WorkerHandle
) -> None:
    """A queued job whose message vanished from the broker (what a worker that took it and
    died before `begin` leaves behind, or a broker that lost its queue) is not stranded: the
    reaper sees it missing on two checks a grace period apart, publishes it again, and the
    job runs as its first attempt."""
    blocker = submit(client, long_config(steps=5000))["id"]
    running_attempt(db, blocker, 1)
    queued_id = submit(client, DUMMY)["id"]
    queue_key = REDIS_KEYS.broker_queue(service_env["MTL_QUEUE_NAME"])
    wait_until(lambda: db.llen(queue_key) == 1, "the message to wait in the queue", 10)
    db.delete(queue_key)  # lost
    client.post(f"/v1/jobs/{blocker}/cancel")
    assert wait_for(client, blocker, TERMINAL, timeout=30)["state"] == "cancelled"
    # the worker is free, and a job submitted after the lost one runs and ends: had the lost
    # job's message been on the (FIFO) queue, the worker would have taken it first
    probe = copy.deepcopy(DUMMY)
    probe["epochs"], probe["data"]["num_samples"] = 1, 64
    probe_id = submit(client, probe)["id"]
    assert wait_for(client, probe_id, TERMINAL, timeout=60)["state"] == "succeeded"
    lost = client.get(f"/v1/jobs/{queued_id}").json()
    assert lost["state"] == "queued" and lost["started_at"] is None, lost
    assert "its message is lost" not in healthy_worker.log_text()  # not yet: 15 s grace

    final = wait_for(client, queued_id, TERMINAL, timeout=120)
    assert final["state"] == "succeeded", final
    assert (final["attempt"], final["restarts"]) == (1, 0)
    log = healthy_worker.log_text()
    assert f"job {queued_id} attempt 1: its message is lost; publishing it again" in log
    events, _ = read_sse(client, queued_id)
    assert state_events(events) == [(1, "queued"), (1, "running"), (1, "succeeded")]


def test_sigterm_is_a_warm_shutdown_and_a_grace_overrun_resumes(
    client: httpx.Client, db: redis.Redis, healthy_worker: WorkerHandle
) -> None:
    """SIGTERM to the worker (`docker stop`): Celery's warm shutdown. The running job goes
    on training under the same attempt and the worker takes no new job. (1) A job that ends
    within the grace period finishes normally and the worker exits 0. (2) When the grace
    period runs out, the whole process group is killed (what Docker does after
    `stop_grace_period`): the job resumes from its checkpoint on the next worker."""
    worker = healthy_worker
    # (1) the job ends within the grace period
    short_id = submit(client, long_config(steps=150, checkpoint_every=50))["id"]
    waiting_id = submit(client, DUMMY)["id"]
    running_attempt(db, short_id, 1)
    wait_step(client, short_id, 20)
    main = worker.process
    assert main is not None
    os.kill(main.pid, signal.SIGTERM)
    done = wait_for(client, short_id, TERMINAL, timeout=60)
    assert done["state"] == "succeeded" and (done["attempt"], done["restarts"]) == (1, 0), done
    assert main.wait(timeout=30) == 0
    waiting = client.get(f"/v1/jobs/{waiting_id}").json()
    assert waiting["state"] == "queued" and waiting["started_at"] is None  # not taken

    # (2) the grace period runs out
    worker.start()
    assert wait_for(client, waiting_id, TERMINAL)["state"] == "succeeded"
    total, every = 300, 50
    long_id = submit(client, long_config(steps=total, checkpoint_every=every))["id"]
    pid = running_attempt(db, long_id, 1)
    wait_checkpoint(client, long_id, at_least=every, past=5)
    main = worker.process
    assert main is not None
    os.kill(main.pid, signal.SIGTERM)
    step_at_term = client.get(f"/v1/jobs/{long_id}").json()["progress"]["step"]
    time.sleep(1.0)  # the grace period: training goes on, under the same attempt
    during = client.get(f"/v1/jobs/{long_id}").json()
    assert during["state"] == "running" and during["attempt"] == 1
    assert during["progress"]["step"] > step_at_term and alive(pid)
    worker.kill()  # grace over: SIGKILL to the process group
    wait_until(lambda: not alive(pid), "the training child to die", 10)

    worker.start()
    final = wait_for(client, long_id, TERMINAL, timeout=120)
    assert final["state"] == "succeeded", (final, worker.log_text()[-3000:])
    assert (final["attempt"], final["restarts"], final["progress"]["step"]) == (2, 1, total)
    events, _ = read_sse(client, long_id)
    assert resume_of(events, 2)["from_step"] >= every
    check_one_attempt_at_a_time(events)
    check_each_step_once(client, long_id, events, total, 5, every)


# ------------------------------------------------------------- crash in a checkpoint write


def test_crash_mid_checkpoint_write_resumes_from_the_previous_checkpoint(
    client: httpx.Client, db: redis.Redis, service_env: dict[str, str], healthy_worker: WorkerHandle
) -> None:
    """The training child is SIGKILLed while it writes a checkpoint (its `.tmp-step-*`
    directory exists, the final `step-*` does not): the next attempt resumes from the
    previous complete checkpoint, and the half-written directory is never used."""
    total, every = 600, 20
    job_id = submit(client, long_config(steps=total, checkpoint_every=every))["id"]
    ckpt_dir = Path(service_env["MTL_DATA_DIR"]) / "jobs" / job_id / "checkpoints"
    crashed: list[tuple[int, int, str]] = []  # (attempt, previous complete step, tmp name)
    for attempt in (1, 2, 3):  # the kill may land just after the rename: try again
        pid = running_attempt(db, job_id, attempt)
        tmp = _kill_inside_a_checkpoint_write(pid, ckpt_dir, client, job_id)
        if tmp is None:
            break  # the job ended first
        name = tmp.name.split("-", 1)[1].rsplit("-", 1)[0]  # ".tmp-step-00000040-123"
        partial = tmp.exists() and not (ckpt_dir / name).exists()
        if partial:
            previous = int(json.loads((ckpt_dir / "last.json").read_text())["step"])
            assert previous == int(name.split("-")[1]) - every
            assert not (tmp / "trainer_state.json").exists()  # written last: not complete
            crashed.append((attempt, previous, tmp.name))
            break
    assert crashed, "never killed the child inside a checkpoint write"
    attempt, previous, tmp_name = crashed[0]

    final = wait_for(client, job_id, TERMINAL, timeout=180)
    assert final["state"] == "succeeded", final
    assert final["attempt"] == attempt + 1 and final["progress"]["step"] == total
    events, _ = read_sse(client, job_id)
    assert resume_of(events, attempt + 1)["from_step"] == previous
    check_one_attempt_at_a_time(events)
    check_each_step_once(client, job_id, events, total, 5, every)
    assert not (ckpt_dir / tmp_name).exists()  # cleaned up by a later save
    assert json.loads((ckpt_dir / "last.json").read_text())["step"] == total


def _kill_inside_a_checkpoint_write(
    pid: int, ckpt_dir: Path, client: httpx.Client, job_id: str
) -> Path | None:
    """SIGKILL `pid` as soon as a `.tmp-step-*` directory appears (after a first complete
    checkpoint); returns that directory, or None when the job finished first."""
    deadline = time.monotonic() + 120
    last_check = 0.0
    while time.monotonic() < deadline:
        try:
            names = os.listdir(ckpt_dir)
        except FileNotFoundError:
            names = []
        if "last.json" in names:
            tmp = [n for n in names if n.startswith(".tmp-step-")]
            if tmp:
                os.kill(pid, signal.SIGKILL)
                return ckpt_dir / tmp[0]
        if time.monotonic() - last_check > 1:
            last_check = time.monotonic()
            if client.get(f"/v1/jobs/{job_id}").json()["state"] in TERMINAL:
                return None
        time.sleep(0.0005)
    raise AssertionError("no checkpoint write seen")


# ------------------------------------------------------------------------- fencing


def _runs_under(pid: int, worker: WorkerHandle) -> bool:
    """The process `pid` is a descendant of the worker's main process."""
    assert worker.process is not None
    try:
        return any(p.pid == worker.process.pid for p in psutil.Process(pid).parents())
    except psutil.NoSuchProcess:
        return False


def test_a_frozen_attempt_is_fenced_off_while_the_next_one_trains(
    client: httpx.Client,
    db: redis.Redis,
    healthy_worker: WorkerHandle,
    spare_worker: Callable[..., WorkerHandle],
) -> None:
    """The training child freezes (SIGSTOP: a VM pause, a stuck NFS write) past its lease.
    The reaper re-queues the job and a second worker runs attempt 2. When the frozen child
    wakes up it must stop at once and write nothing: never two attempts training at once."""
    total, every = 400, 50
    # Both workers read the queue before the job exists (starting one takes seconds: the
    # job could end meanwhile); whichever takes attempt 1 is frozen, the other runs attempt 2.
    spare = spare_worker()
    job_id = submit(client, long_config(steps=total, checkpoint_every=every))["id"]
    frozen = running_attempt(db, job_id, 1)
    owner, other = (
        (healthy_worker, spare) if _runs_under(frozen, healthy_worker) else (spare, healthy_worker)
    )
    assert _runs_under(frozen, owner)
    wait_checkpoint(client, job_id, at_least=every, past=5)
    os.kill(frozen, signal.SIGSTOP)
    try:
        second = running_attempt(db, job_id, 2, timeout=30)  # on the other worker
        lease_2 = db.get(REDIS_KEYS.lease(job_id))
        wait_step(client, job_id, client.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] + 10)
    finally:
        os.kill(frozen, signal.SIGCONT)
    wait_until(lambda: not alive(frozen), "the stale attempt to exit", 15)
    rec = record(db, job_id)
    assert rec["attempt"] == "2" and rec["worker"].split(":")[1] == str(second)
    assert lease_2 is not None and lease_2.startswith("2:")
    assert db.get(REDIS_KEYS.lease(job_id)) in (lease_2, None)  # attempt 2's, or released
    final = wait_for(client, job_id, TERMINAL, timeout=120)
    assert final["state"] == "succeeded" and final["attempt"] == 2, final
    events, _ = read_sse(client, job_id)
    assert state_events(events) == RESUMED_ONCE
    check_one_attempt_at_a_time(events)  # nothing from attempt 1 after attempt 2 was queued
    check_each_step_once(client, job_id, events, total, 5, every)
    assert "stale" in owner.log_text()  # it noticed and left the job alone
    assert other.process is not None and other.process.poll() is None


def test_a_frozen_attempt_on_the_only_worker_is_killed_and_the_job_resumes_there(
    client: httpx.Client, db: redis.Redis, healthy_worker: WorkerHandle
) -> None:
    """The training child freezes as a whole (SIGSTOP), so neither it nor its watchdog can run,
    and there is no other worker. Its lease lapses, the reaper re-queues the job, and once the
    frozen process has been stale for 3 leases its parent kills it: the worker's slot is free
    again and attempt 2 runs on the same worker and succeeds."""
    total, every = 200, 40
    job_id = submit(client, long_config(steps=total, checkpoint_every=every))["id"]
    frozen = running_attempt(db, job_id, 1)
    wait_checkpoint(client, job_id, at_least=every, past=3)
    os.kill(frozen, signal.SIGSTOP)
    try:
        second = running_attempt(db, job_id, 2, timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
    assert second != frozen and not alive(frozen)
    log = healthy_worker.log_text()
    assert f"job {job_id} attempt 1: its process {frozen} is stale" in log
    _, events = finished_as_attempt_2(client, job_id, total, healthy_worker)
    assert token_pid(record(db, job_id)["worker"]) == second
    check_one_attempt_at_a_time(events)


# ------------------------------------------------------------------- duplicate delivery


def test_duplicate_delivery_leaves_the_job_alone(
    client: httpx.Client,
    db: redis.Redis,
    service_env: dict[str, str],
    healthy_worker: WorkerHandle,
    spare_worker: Callable[..., WorkerHandle],
) -> None:
    """A second copy of a job's message `(job_id, attempt)` reaches another worker while the
    first copy trains, and again after the job ended (plus a copy for an attempt that does
    not exist): each copy exits without writing anything."""
    dup_queue = "mtl-test-dup"
    other = spare_worker(dup_queue)  # only this worker reads the duplicates' queue
    job_id = submit(client, long_config(steps=250, checkpoint_every=50))["id"]
    pid = running_attempt(db, job_id, 1)
    wait_step(client, job_id, 10)
    lease = db.get(REDIS_KEYS.lease(job_id))
    assert lease is not None and lease.startswith("1:")

    send_message(service_env, job_id, 1, dup_queue)
    wait_until(lambda: "not started: not-queued running" in other.log_text(),
               "the duplicate to be refused", 30)  # fmt: skip
    assert db.get(REDIS_KEYS.lease(job_id)) == lease  # still the first copy's lease
    rec = record(db, job_id)
    assert (rec["attempt"], rec["state"], token_pid(rec["worker"])) == ("1", "running", pid)

    final = wait_for(client, job_id, TERMINAL, timeout=90)
    assert final["state"] == "succeeded" and (final["attempt"], final["restarts"]) == (1, 0)
    snapshot = _snapshot(db, job_id)
    send_message(service_env, job_id, 1, dup_queue)  # the same message once more
    send_message(service_env, job_id, 2, dup_queue)  # an attempt that was never queued
    wait_until(lambda: other.log_text().count("not started:") >= 3, "the copies to run", 30)
    log = other.log_text()
    assert "not started: not-queued succeeded" in log and "not started: stale 1" in log
    assert _snapshot(db, job_id) == snapshot  # not a field, event or metric changed
    events, _ = read_sse(client, job_id)
    assert state_events(events) == [(1, "queued"), (1, "running"), (1, "succeeded")]


def _snapshot(db: redis.Redis, job_id: str) -> tuple[Any, ...]:
    return (
        record(db, job_id),
        db.xrange(REDIS_KEYS.events(job_id)),
        db.zrange(REDIS_KEYS.metrics(job_id), 0, -1),
        db.get(REDIS_KEYS.lease(job_id)),
        db.sismember(REDIS_KEYS.active, job_id),
        db.zscore(REDIS_KEYS.queued, job_id),
    )


def test_repeated_begin_and_append_act_once(redis_server: Any) -> None:
    """`wait_for_redis` repeats a call whose reply was lost (a timeout, or Redis died after
    running it): `begin` finds its own token in the lease and answers `started` again (a
    duplicate message still does not start); an append finds its own event as the stream's
    last entry and adds nothing."""
    from service.records import Event
    from service.store import BeginOutcome, Begun, JobStore, Lease

    keys = Keys("faultunit")
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        store = JobStore(client, keys)
        client.hset(keys.job("j1"), mapping={"state": "queued", "attempt": "2", "owner": "a"})
        lease = Lease("j1", 2, "host:1:abc")
        assert store.begin(lease, 10_000) == Begun(BeginOutcome.STARTED)
        assert store.begin(lease, 10_000) == Begun(BeginOutcome.STARTED)  # the repeat
        other = Lease("j1", 2, "host:2:def")
        assert store.begin(other, 10_000) == Begun(BeginOutcome.NOT_QUEUED, "running")
        assert client.get(keys.lease("j1")) == "2:host:1:abc"
        entries = client.xrange(keys.events("j1"))
        assert [json.loads(f["e"])["data"]["state"] for _, f in entries] == ["running"]
        event = Event.make("log", 2, 10, {"tasks": {}})
        first = store.append(lease, event, metric=True)
        again = store.append(lease, event, metric=True)
        assert first is not None and again == first
        assert client.xlen(keys.events("j1")) == 2 and client.zcard(keys.metrics("j1")) == 1
        later = Event.make("log", 2, 15, {"tasks": {}})
        assert store.append(lease, later, metric=True) not in (None, first)
        assert client.xlen(keys.events("j1")) == 3
        stale = Lease("j1", 1, "host:1:old")  # and the fencing still comes first
        assert store.append(stale, later, metric=True) is None
    finally:
        for key in client.scan_iter("faultunit:*"):
            client.delete(key)
        client.close()


def test_a_busy_worker_reserves_no_message() -> None:
    """What keeps a killed worker from taking a queued job's message down with it."""
    import celery

    from service.queue import make_celery
    from service.settings import Settings

    assert tuple(int(x) for x in celery.__version__.split(".")[:2]) >= (5, 6)
    app = make_celery(Settings(redis_url="redis://127.0.0.1:1/0"))
    assert app.conf.worker_disable_prefetch is True
    assert (app.conf.task_acks_late, app.conf.worker_prefetch_multiplier) == (False, 1)


# ------------------------------------------------- deterministic failures, restart budget


def _csv(rows: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = ["text,sentiment"]
    for _ in range(rows):
        s = rng.choice(["neg", "pos"])
        word = rng.choice({"pos": ["great", "love"], "neg": ["awful", "hate"]}[s])
        lines.append(f"{word} soup {word},{s}")
    return "\n".join(lines) + "\n"


def test_deterministic_failures_fail_once_with_their_reason(
    client: httpx.Client, db: redis.Redis, service_env: dict[str, str], healthy_worker: WorkerHandle
) -> None:
    """Bad data found late (the file changed after the job was accepted) and an unexpected
    error in the worker fail the job at the first attempt, with the reason, and never again."""
    blocker = submit(client, long_config(steps=5000))["id"]
    running_attempt(db, blocker, 1)

    # the dataset is checked at submit; then its file goes bad while the job waits
    up = client.post("/v1/datasets", files={"file": ("train.csv", _csv(64, 1).encode())})
    assert up.status_code == 201, up.text
    dataset = up.json()
    cfg = copy.deepcopy(DUMMY)
    cfg["tasks"] = [{"name": "sentiment", "labels": ["neg", "pos"]}]
    cfg["data"] = {"kind": "files", "train": dataset["source"]}
    cfg["epochs"] = 1
    bad_data_id = submit(client, cfg)["id"]
    path = Path(service_env["MTL_DATA_DIR"]) / "datasets" / dataset["id"] / "data.csv"
    lines = path.read_text().splitlines()
    lines[40] = "great soup great,maybe"  # data row 40: a label the task does not have
    path.write_text("\n".join(lines) + "\n")

    # a valid job that its worker cannot run: a file sits where its directory goes (the
    # worker's disk is not what it should be), so an unexpected exception ends the attempt
    crash_id = submit(client, DUMMY)["id"]
    blocked = Path(service_env["MTL_DATA_DIR"]) / "jobs" / crash_id
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("not a directory")

    client.post(f"/v1/jobs/{blocker}/cancel")
    bad = wait_for(client, bad_data_id, TERMINAL, timeout=60)
    crashed = wait_for(client, crash_id, TERMINAL, timeout=60)
    assert bad["state"] == "failed", bad
    assert bad["error"].startswith(f"{dataset['source']}, row 40, column 'sentiment'"), bad["error"]
    assert "maybe" in bad["error"]
    assert crashed["state"] == "failed", crashed
    assert crashed["error"].startswith("internal error: FileExistsError: "), crashed["error"]
    assert str(blocked) in crashed["error"]

    # their leases are gone and the reaper has made passes since: nothing comes back
    leases = [REDIS_KEYS.lease(j) for j in (bad_data_id, crash_id)]
    wait_until(lambda: not db.exists(*leases), "the leases to go", 10)
    worker_passes(db, healthy_worker)
    for job_id, job in ((bad_data_id, bad), (crash_id, crashed)):
        now = client.get(f"/v1/jobs/{job_id}").json()
        assert (now["state"], now["attempt"], now["restarts"]) == ("failed", 1, 0)
        assert now["error"] == job["error"]
        events, _ = read_sse(client, job_id)
        assert state_events(events) == [(1, "queued"), (1, "running"), (1, "failed")]
        assert events[-2]["data"]["data"]["reason"] == job["error"]
        assert not db.sismember(REDIS_KEYS.active, job_id)
    blocked.unlink()


def _ptrace(request: int, tid: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(request, tid, None, None) == 0:
        return 0
    return ctypes.get_errno()


def _freeze_outside_the_gil(db: redis.Redis, job_id: str, tid: int) -> None:
    """Stop one thread (not its process) with ptrace: PTRACE_SEIZE, then PTRACE_INTERRUPT.

    Stopped while it holds the GIL, the thread would freeze the whole interpreter (that case
    is a frozen process: the lease expires, see the SIGSTOP test); stopped inside a native
    call (a torch op), the other threads run on, which is the hang this test is about. So: stop
    it, and if the lease thread stops renewing within a second, let it go and try again.
    Skips the test where ptrace is not allowed."""
    lease = REDIS_KEYS.lease(job_id)
    for _ in range(30):
        err = _ptrace(0x4206, tid) or _ptrace(0x4207, tid)  # PTRACE_SEIZE, PTRACE_INTERRUPT
        if err:
            pytest.skip(f"ptrace not allowed here: {os.strerror(err)}")
        time.sleep(1.0)  # five renewal periods
        if db.pttl(lease) > 2500:  # renewed within the last 0.5 s: the lease thread runs
            return
        os.waitpid(tid, 0x40000000)  # __WALL: collect the stop, then let the thread go
        _ptrace(17, tid)  # PTRACE_DETACH
        time.sleep(0.3)
    pytest.fail("could not stop the training thread outside the GIL in 30 tries")


def _release(tid: int) -> None:
    """As the thread's tracer, collect its reports until its process has ended (only then does
    its parent learn of the exit); if it has not ended within 15 s, let the thread go."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            got, status = os.waitpid(tid, os.WNOHANG | 0x40000000)  # __WALL
        except ChildProcessError:
            return  # nothing (more) to collect
        if got == tid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
            return
        time.sleep(0.02)
    _ptrace(17, tid)  # PTRACE_DETACH


def test_a_hung_attempt_is_given_up_and_the_job_resumes(
    client: httpx.Client,
    db: redis.Redis,
    healthy_worker: WorkerHandle,
    spare_worker: Callable[..., WorkerHandle],
) -> None:
    """The training thread hangs while the rest of its process lives on (a deadlock in native
    code, a stuck collective; here the thread is stopped with ptrace), so its lease thread
    would renew the lease forever. After `MTL_STALL_TIMEOUT_S` without a hook the lease
    thread gives the lease up and ends the process; the job resumes from its checkpoint as
    attempt 2 and succeeds."""
    healthy_worker.stop()  # only the worker with a short stall timeout may take the job
    worker = spare_worker(MTL_STALL_TIMEOUT_S="4")
    total, every = 120, 20
    job_id = submit(client, long_config(steps=total, checkpoint_every=every))["id"]
    pid = running_attempt(db, job_id, 1)
    wait_checkpoint(client, job_id, at_least=every, past=3)
    _freeze_outside_the_gil(db, job_id, pid)  # the attempt's training (main) thread
    try:
        hung_at = time.monotonic() - 1.0
        wait_until(lambda: f"job {job_id} attempt 1: no progress for " in worker.log_text(),
                   "the attempt to be given up", 30)  # fmt: skip
        assert 3 <= time.monotonic() - hung_at < 15
    finally:
        _release(pid)
    _, events = finished_as_attempt_2(client, job_id, total, worker)
    assert not alive(pid)
    assert resume_of(events, 2)["from_step"] >= every


def test_killed_every_time_stops_after_the_restart_budget(
    client: httpx.Client, db: redis.Redis, healthy_worker: WorkerHandle
) -> None:
    """A job whose training process dies every time (an OOM kill at the same place) is
    re-queued `MTL_MAX_RESTARTS` (3) times and then fails with the reason: no endless loop."""
    job_id = submit(client, long_config(steps=5000, checkpoint_every=50))["id"]
    pids = []
    for attempt in (1, 2, 3, 4):
        pid = running_attempt(db, job_id, attempt, timeout=30)
        wait_step(client, job_id, 1)
        os.kill(pid, signal.SIGKILL)
        pids.append(pid)
    failed = wait_for(client, job_id, TERMINAL, timeout=30)
    assert failed["state"] == "failed", failed
    assert (failed["attempt"], failed["restarts"], failed["max_attempts"]) == (4, 3, 4)
    assert failed["error"] == (
        "the worker running attempt 4 was lost (its lease expired) and the restart budget "
        "of 3 restarts is spent"
    )
    # its lease is gone and the reaper has made passes since: still failed, nothing running
    assert not db.exists(REDIS_KEYS.lease(job_id))
    worker_passes(db, healthy_worker)
    again = client.get(f"/v1/jobs/{job_id}").json()
    assert (again["state"], again["attempt"]) == ("failed", 4)
    assert not db.sismember(REDIS_KEYS.active, job_id)
    assert db.zscore(REDIS_KEYS.queued, job_id) is None
    events, _ = read_sse(client, job_id)
    states = state_events(events)
    assert states == [(1, "queued"), (1, "running"), (2, "queued"), (2, "running"),
                      (3, "queued"), (3, "running"), (4, "queued"), (4, "running"),
                      (4, "failed")]  # fmt: skip
    assert not any(alive(p) for p in pids)
    assert healthy_worker.process is not None and healthy_worker.process.poll() is None


# ------------------------------------------------------------------------------- cancel


def test_cancel_queued_running_finished_and_twice(
    client: httpx.Client, db: redis.Redis, healthy_worker: WorkerHandle
) -> None:
    """Cancel in every state, each twice: queued -> cancelled at once (never starts);
    running -> cancelling -> cancelled (the checkpoint stays); succeeded / failed -> 409;
    cancelling with a lost worker -> cancelled by the reaper."""
    running_id = submit(client, long_config(steps=5000, checkpoint_every=20))["id"]
    running_attempt(db, running_id, 1)
    queued_id = submit(client, DUMMY)["id"]
    for _ in range(2):
        r = client.post(f"/v1/jobs/{queued_id}/cancel")
        assert (r.status_code, r.json()) == (202, {"id": queued_id, "state": "cancelled"})

    wait_checkpoint(client, running_id, at_least=20)
    first = client.post(f"/v1/jobs/{running_id}/cancel")
    second = client.post(f"/v1/jobs/{running_id}/cancel")
    assert (first.status_code, first.json()["state"]) == (202, "cancelling")
    assert second.status_code == 202 and second.json()["state"] in ("cancelling", "cancelled")
    cancelled = wait_for(client, running_id, TERMINAL, timeout=30)
    assert cancelled["state"] == "cancelled" and cancelled["error"] == "cancelled by request"
    assert (cancelled["checkpoint_step"] or 0) >= 20
    r = client.post(f"/v1/jobs/{running_id}/cancel")
    assert (r.status_code, r.json()["state"]) == (202, "cancelled")

    # finished jobs: 409 with the state, every time
    ok_id = submit(client, DUMMY)["id"]
    assert wait_for(client, ok_id, TERMINAL)["state"] == "succeeded"
    # the cancelled job's message was ahead of this one's on the queue: the worker has taken
    # it by now, and refused it
    refused = f"job {queued_id} attempt 1 not started: not-queued cancelled"
    assert refused in healthy_worker.log_text()
    queued = client.get(f"/v1/jobs/{queued_id}").json()
    assert queued["state"] == "cancelled" and queued["started_at"] is None
    assert queued["error"] == "cancelled before it started"
    bad_id = submit(client, _overflowing("stop"))["id"]  # fails: its loss overflows
    assert wait_for(client, bad_id, TERMINAL)["state"] == "failed"
    for job_id, state in ((ok_id, "succeeded"), (bad_id, "failed")):
        for _ in range(2):
            r = client.post(f"/v1/jobs/{job_id}/cancel")
            assert r.status_code == 409
            assert r.json() == {"detail": f"job {job_id} already {state}", "state": state}
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == state

    # cancelling, and the worker is lost before it stops: the reaper ends it as cancelled
    lost_id = submit(client, long_config(steps=5000, checkpoint_every=50))["id"]
    pid = running_attempt(db, lost_id, 1)
    wait_step(client, lost_id, 5)
    os.kill(pid, signal.SIGSTOP)  # it cannot see the cancel flag any more
    try:
        assert client.post(f"/v1/jobs/{lost_id}/cancel").json()["state"] == "cancelling"
        assert client.post(f"/v1/jobs/{lost_id}/cancel").json()["state"] == "cancelling"
        os.kill(pid, signal.SIGKILL)
    finally:
        os.kill(pid, signal.SIGCONT)
    lost = wait_for(client, lost_id, TERMINAL, timeout=30)
    assert lost["state"] == "cancelled" and lost["attempt"] == 1, lost
    assert lost["error"] == "cancelled; the worker was lost while stopping"
    assert client.post(f"/v1/jobs/{lost_id}/cancel").json()["state"] == "cancelled"
    events, _ = read_sse(client, lost_id)
    assert state_events(events) == [(1, "queued"), (1, "running"), (1, "cancelling"),
                                    (1, "cancelled")]  # fmt: skip


# ------------------------------------------------------------------------ non-finite loss


def _overflowing(mode: str) -> dict[str, Any]:
    """A run whose loss overflows to inf on some batches: class 0 of task_a weighs 5e37, so
    a batch with a few class-0 examples sums past float32's 3.4e38 (checked on this dummy
    data: the first at step 7, then about 1 step in 25)."""
    cfg = long_config(steps=120, checkpoint_every=40)
    cfg["tasks"][0]["class_weights"] = [5e37, 1.0, 1.0, 1.0, 1.0]
    cfg["nonfinite_loss"] = mode
    return cfg


def test_nonfinite_loss_stops_the_job_or_is_skipped(
    client: httpx.Client, healthy_worker: WorkerHandle
) -> None:
    stop_id = submit(client, _overflowing("stop"))["id"]
    skip_id = submit(client, _overflowing("skip"))["id"]
    stopped = wait_for(client, stop_id, TERMINAL, timeout=60)
    assert stopped["state"] == "failed", stopped
    prefix = "the training loss became non-finite (NaN or inf) at step "
    assert stopped["error"].startswith(prefix), stopped["error"]
    bad_step = int(stopped["error"][len(prefix) :])
    assert (stopped["attempt"], stopped["restarts"]) == (1, 0)
    assert stopped["progress"]["step"] == bad_step - 1  # no step after the bad one

    skipped = wait_for(client, skip_id, TERMINAL, timeout=90)
    # the same data and seed: the same step overflows, is skipped, and training goes on
    assert skipped["state"] == "succeeded", skipped
    assert skipped["progress"]["step"] == 120 > bad_step and skipped["attempt"] == 1
    for task in ("task_a", "task_b"):
        assert skipped["final_metrics"]["validation"]["tasks"][task]["loss"] < 1e30

    # Every train log reports how many steps were skipped so far (`data.skipped_steps`). The
    # count agrees with the logged learning rate: the linear schedule (1e-4 down to 0 over 120
    # steps, no warm-up) moves only on steps that updated the weights, so the lr logged at step
    # s says how many of the s steps were skipped. And the logged train loss leaves them out.
    history = client.get(f"/v1/jobs/{skip_id}/metrics", params={"split": "train"}).json()
    logs = history["items"]
    assert [m["step"] for m in logs] == list(range(5, 121, 5))
    skipped_by = {m["step"]: m["step"] - round(120 * (1 - m["data"]["lr"] / 1e-4)) for m in logs}
    assert {m["step"]: m["data"]["skipped_steps"] for m in logs} == skipped_by
    assert all(n == 0 for step, n in skipped_by.items() if step < bad_step), skipped_by
    first_after = min(step for step in skipped_by if step >= bad_step)
    assert skipped_by[first_after] >= 1, skipped_by  # the step that stopped the other job
    counts = list(skipped_by.values())
    assert counts == sorted(counts), skipped_by  # a count: it never goes back
    assert 1 <= counts[-1] <= 12, skipped_by  # about one step in 25 overflows
    assert all(m["data"]["loss"] < 1e30 for m in logs), [m["data"]["loss"] for m in logs]
