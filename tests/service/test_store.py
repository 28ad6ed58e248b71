"""The job state machine (Lua scripts) against the real redis-server, without a worker.

These use their own key prefix, so the session's worker (and its reaper) never sees them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from service.async_store import AsyncJobStore, Cancelled, CancelOutcome, CreateOutcome, NewJob
from service.embedded import RedisServer
from service.keys import Keys
from service.records import Event, JobState
from service.store import BeginOutcome, Begun, JobStore, Lease, Renewal
from tests.service.conftest import long_config
from worker.progress import STOP_CANCELLED, STOP_STALE, LeaseKeeper, RedisProgress
from worker.reaper import find_lost_messages, reap_once

PREFIX = "unit"


@pytest.fixture
def sync_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    for key in client.scan_iter(f"{PREFIX}:*"):
        client.delete(key)
    client.close()


@pytest.fixture
def store(sync_client: redis.Redis) -> JobStore:
    return JobStore(sync_client, Keys(PREFIX), stream_maxlen=1000, stream_ttl_s=60)


def run(coro_fn: Any, url: str) -> Any:
    async def main() -> Any:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            return await coro_fn(AsyncJobStore(client, Keys(PREFIX), stream_maxlen=1000))
        finally:
            await client.aclose()

    return asyncio.run(main())


def create(url: str, max_attempts: int = 4, **kw: Any) -> tuple[str, str]:
    async def go(s: AsyncJobStore) -> tuple[str, str]:
        owner = kw.pop("owner", "alice")
        key = kw.pop("idempotency_key", None)
        created = await s.create(
            NewJob(
                owner=owner,
                name=None,
                config_json="{}",
                max_attempts=max_attempts,
                idempotency_key=s.keys.idempotency(owner, key) if key else None,
                **kw,
            )
        )
        assert created.job_id is not None
        if created.outcome is not CreateOutcome.CONFLICT:
            assert created.record is not None and created.record.id == created.job_id
        return created.outcome, created.job_id

    return run(go, url)


def states(client: redis.Redis, job_id: str) -> list[tuple[int, str]]:
    out = []
    for _, fields in client.xrange(Keys(PREFIX).events(job_id)):
        if fields["t"] == "state":
            out.append((int(fields["a"]), json.loads(fields["e"])["data"]["state"]))
    return out


def test_idempotent_create(redis_server: RedisServer, sync_client: redis.Redis) -> None:
    url = redis_server.url
    a = create(url, idempotency_key="k1", fingerprint="f1")
    b = create(url, idempotency_key="k1", fingerprint="f1")
    c = create(url, idempotency_key="k1", fingerprint="f2")
    d = create(url, idempotency_key="k1", fingerprint="f1", owner="bob")
    assert a[0] == "created" and b == ("existing", a[1]) and c == ("conflict", a[1])
    assert d[0] == "created" and d[1] != a[1]
    assert sync_client.zcard(Keys(PREFIX).queued) == 2


def test_begin_is_fenced_and_exclusive(redis_server: RedisServer, store: JobStore) -> None:
    _, job_id = create(redis_server.url)
    assert store.begin(Lease(job_id, 2, "w1"), 5000).outcome is BeginOutcome.STALE
    assert store.begin(Lease(job_id, 1, "w1"), 5000) == Begun(BeginOutcome.STARTED)
    assert store.begin(Lease(job_id, 1, "w2"), 5000) == Begun(BeginOutcome.NOT_QUEUED, "running")
    assert store.begin(Lease("job_missing", 1, "w2"), 5000).outcome is BeginOutcome.GONE
    record = store.get(job_id)
    assert record is not None and record.state is JobState.RUNNING and record.started_at


def test_lease_expiry_requeues_then_budget_fails(
    redis_server: RedisServer, store: JobStore, sync_client: redis.Redis
) -> None:
    _, job_id = create(redis_server.url, max_attempts=2)
    published: list[tuple[str, int]] = []
    first = Lease(job_id, 1, "w1")
    assert store.begin(first, 100).outcome is BeginOutcome.STARTED
    assert reap_once(store, lambda j, a: published.append((j, a))).requeued == []  # alive
    time.sleep(0.15)
    assert reap_once(store, lambda j, a: published.append((j, a))).requeued == [(job_id, 2)]
    assert published == [(job_id, 2)]
    record = store.get(job_id)
    assert record is not None
    assert (record.state, record.attempt, record.restarts) == ("queued", 2, 1)
    assert record.published == 2

    # the old attempt is fenced off everywhere
    assert store.renew(first, 1000, {"step": 9}) == Renewal(ours=False, cancel=False)
    assert store.append(first, Event.make("log", 1, 9, {})) is None
    assert store.finish(first, JobState.SUCCEEDED) is False
    assert store.begin(first, 1000).outcome is BeginOutcome.STALE

    second = Lease(job_id, 2, "w2")
    assert store.begin(second, 100).outcome is BeginOutcome.STARTED
    time.sleep(0.15)
    assert reap_once(store, lambda j, a: published.append((j, a))).failed == [job_id]
    record = store.get(job_id)
    assert record is not None and record.state is JobState.FAILED
    assert record.error and "restart budget of 1 restarts is spent" in record.error
    assert states(sync_client, job_id) == [
        (1, "queued"),
        (1, "running"),
        (2, "queued"),
        (2, "running"),
        (2, "failed"),
    ]
    assert 0 < sync_client.ttl(Keys(PREFIX).events(job_id)) <= 60  # the stream expires


def test_cancel_paths(redis_server: RedisServer, store: JobStore) -> None:
    url = redis_server.url
    _, queued = create(url)
    _, running = create(url)
    assert run(lambda s: s.cancel(queued), url) == Cancelled(CancelOutcome.CANCELLED, "queued")
    lease = Lease(running, 1, "w")
    never = store.begin(Lease(queued, 1, "w"), 1000)
    assert never.outcome is BeginOutcome.NOT_QUEUED  # never starts
    assert store.begin(lease, 1000).outcome is BeginOutcome.STARTED
    assert store.renew(lease, 1000, {}) == Renewal(ours=True, cancel=False)
    cancelling = Cancelled(CancelOutcome.CANCELLING, JobState.RUNNING)
    assert run(lambda s: s.cancel(running), url) == cancelling
    cancelling = Cancelled(CancelOutcome.CANCELLING, JobState.CANCELLING)
    assert run(lambda s: s.cancel(running), url) == cancelling
    assert store.renew(lease, 1000, {}) == Renewal(ours=True, cancel=True)
    assert store.finish(lease, JobState.CANCELLED, error="cancelled by request")
    cancelled = Cancelled(CancelOutcome.CANCELLED, JobState.CANCELLED)
    assert run(lambda s: s.cancel(running), url) == cancelled
    _, done = create(url)
    lease = Lease(done, 1, "w")
    store.begin(lease, 1000)
    store.finish(lease, JobState.SUCCEEDED)
    finished = Cancelled(CancelOutcome.FINISHED, JobState.SUCCEEDED)
    assert run(lambda s: s.cancel(done), url) == finished

    # lost while cancelling: cancelled, not re-queued
    _, lost = create(url)
    lease = Lease(lost, 1, "w")
    store.begin(lease, 50)
    run(lambda s: s.cancel(lost), url)
    time.sleep(0.1)
    assert reap_once(store, lambda j, a: None).cancelled == [lost]


def test_resume_drops_what_older_attempts_reported_after_the_checkpoint(
    redis_server: RedisServer, store: JobStore, sync_client: redis.Redis
) -> None:
    _, job_id = create(redis_server.url)
    first = Lease(job_id, 1, "w1")
    store.begin(first, 50)
    for step in (5, 10, 15, 20, 25):
        store.append(first, Event.make("log", 1, step, {"tasks": {}}), metric=True)
    store.append(first, Event.make("checkpoint", 1, 10, {}))
    time.sleep(0.1)
    reap_once(store, lambda j, a: None)
    second = Lease(job_id, 2, "w2")
    assert store.begin(second, 1000).outcome is BeginOutcome.STARTED
    result = store.resume(second, 10)
    assert result is not None
    assert (result.metrics_dropped, result.events_dropped) == (3, 3)
    assert [event.step for event in result.history] == [5, 10]
    for step in (15, 20):
        store.append(second, Event.make("log", 2, step, {"tasks": {}}), metric=True)
    entries = sync_client.xrange(Keys(PREFIX).events(job_id))
    logs = [(int(f["a"]), int(f["s"])) for _, f in entries if f["t"] == "log"]
    assert logs == [(1, 5), (1, 10), (2, 15), (2, 20)]
    # a stale attempt cannot prune
    assert store.resume(first, 0) is None


def test_progress_callback_and_lease_keeper(
    redis_server: RedisServer, store: JobStore, sync_client: redis.Redis
) -> None:
    from mtl.callbacks import TrainControl, TrainState

    _, job_id = create(redis_server.url)
    lease = Lease(job_id, 1, "w1")
    store.begin(lease, 1000)
    cb = RedisProgress(store, lease, lease_ms=1000, monitor="mean/macro_f1", monitor_mode="max")
    keeper = LeaseKeeper(store, cb, lease_ms=1000, interval=0.05)
    keeper.start()
    state, control = TrainState(total_steps=100), TrainControl()
    cb.on_train_begin(state, control)
    for step in range(1, 11):
        state.step, state.elapsed = step, step * 0.1
        cb.on_step_end(state, control)
    tasks = {"a": {"loss": 1.0, "accuracy": 0.5, "macro_f1": 0.4, "per_class": {}}}
    cb.on_log(state, {"tasks": {"a": {"loss": 1.0, "accuracy": 0.5}}}, control)
    best = {"name": "mean/macro_f1", "value": 0.4, "best": True}
    report = {"split": "validation", "tasks": tasks, "mean": {}, "monitor": best}
    cb.on_evaluate(state, report, control)
    # Better for the task, but the trainer did not call it best (e.g. within its min_delta):
    # the record follows the trainer, whose best checkpoint is the one exported.
    tasks2 = {"a": {"loss": 0.9, "accuracy": 0.4, "macro_f1": 0.405}}
    state.step = 20
    not_best = {"name": "mean/macro_f1", "value": 0.405, "best": False}
    report = {"split": "validation", "tasks": tasks2, "mean": {}, "monitor": not_best}
    cb.on_evaluate(state, report, control)
    deadline = time.monotonic() + 5
    while (record := store.get(job_id)) is None or record.step != 20:
        assert time.monotonic() < deadline, record
        time.sleep(0.02)
    assert record.step == 20 and record.total_steps == 100
    assert record.latest["a"]["validation"].macro_f1 == 0.405
    assert record.latest["a"]["train"].accuracy == 0.5
    best_a = record.best["a"]
    assert (best_a.metric, best_a.value, best_a.step, best_a.loss) == ("macro_f1", 0.4, 10, 1.0)
    raw_best = json.loads(sync_client.hget(Keys(PREFIX).job(job_id), "best") or "{}")
    assert "per_class" not in raw_best["a"]

    run(lambda s: s.cancel(job_id), redis_server.url)
    deadline = time.monotonic() + 2
    while cb.stop_reason is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cb.stop_reason == STOP_CANCELLED
    cb.on_step_end(state, control)
    assert control.should_stop and control.stop_reason == STOP_CANCELLED

    # fencing: once the job moved on, the keeper reports the attempt stale
    sync_client.hset(Keys(PREFIX).job(job_id), "attempt", 2)
    deadline = time.monotonic() + 2
    while not cb.stale and time.monotonic() < deadline:
        time.sleep(0.01)
    keeper.stop()
    assert cb.stale and cb.stop_reason == STOP_STALE


def test_a_superseded_attempt_writes_no_checkpoint(
    redis_server: RedisServer, store: JobStore, sync_client: redis.Redis, tmp_path: Path
) -> None:
    """The lease is checked just before every save, not only by the keeper thread: an attempt
    whose job moved on (here: at step 6, with no keeper running) writes nothing more into the
    job's directory and stops as stale."""
    from mtl.callbacks import Callback, TrainControl, TrainState
    from mtl.config import TrainConfig
    from mtl.trainer import train

    _, job_id = create(redis_server.url)
    lease = Lease(job_id, 1, "w1")
    store.begin(lease, 60_000)

    class SupersedeAt(Callback):
        def on_step_end(self, state: TrainState, control: TrainControl) -> None:
            if state.step == 6:  # the reaper re-queued the job; attempt 2 owns it now
                sync_client.hset(Keys(PREFIX).job(job_id), "attempt", 2)

    config = TrainConfig.model_validate(long_config(steps=12, checkpoint_every=4) | {"seed": 1})
    progress = RedisProgress(
        store, lease, lease_ms=60_000, monitor=config.monitor, monitor_mode=config.monitor_mode
    )
    result = train(config, tmp_path, callbacks=[progress, SupersedeAt()], resume=False)

    assert result.outcome == "stopped"
    assert result.state.stop_reason == STOP_STALE and progress.stale
    assert result.state.step == 8  # stopped at the save it was refused
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step-00000004" in saved and "step-00000008" not in saved, saved
    last = json.loads((tmp_path / "checkpoints" / "last.json").read_text())
    assert last["name"] == "step-00000004"
    assert not (tmp_path / "model").exists()


def test_the_keeper_gives_up_a_hung_attempt(
    redis_server: RedisServer, store: JobStore, sync_client: redis.Redis
) -> None:
    """No hook for longer than the stall timeout: the keeper stops renewing, expires the
    lease at once and calls `on_stall`; the reaper's next pass re-queues the job. A run that
    keeps calling hooks is left alone."""
    from mtl.callbacks import TrainControl, TrainState

    _, job_id = create(redis_server.url)
    lease = Lease(job_id, 1, "w1")
    assert store.begin(lease, 60_000).outcome is BeginOutcome.STARTED
    cb = RedisProgress(store, lease, lease_ms=60_000, monitor="mean/macro_f1", monitor_mode="max")
    stalls: list[float] = []
    keeper = LeaseKeeper(store, cb, lease_ms=60_000, interval=0.05, stall_timeout=0.5,
                         on_stall=lambda: stalls.append(time.monotonic()))  # fmt: skip
    state, control = TrainState(total_steps=100), TrainControl()
    cb.on_train_begin(state, control)
    keeper.start()
    started = time.monotonic()
    while time.monotonic() - started < 1.0:  # 1 s of steady steps: alive
        state.step += 1
        cb.on_step_end(state, control)
        time.sleep(0.02)
    assert stalls == [] and keeper.is_alive() and not keeper.stalled
    assert sync_client.pttl(Keys(PREFIX).lease(job_id)) > 50_000

    hung_at = time.monotonic()  # the training thread stops calling hooks
    keeper.join(timeout=5)
    assert keeper.stalled and len(stalls) == 1
    assert 0.45 <= stalls[0] - hung_at < 1.5  # (the last hook came up to 20 ms earlier)
    # given up (expiring within a millisecond), not left to run out its 60 s
    assert sync_client.pttl(Keys(PREFIX).lease(job_id)) in (-2, 0, 1)
    time.sleep(0.01)
    assert cb.stale
    published: list[tuple[str, int]] = []
    assert reap_once(store, lambda j, a: published.append((j, a))).requeued == [(job_id, 2)]


def test_unconfirmed_messages_are_published_again(
    redis_server: RedisServer, store: JobStore, sync_client: redis.Redis
) -> None:
    _, job_id = create(redis_server.url)  # written, never marked published (a crash)
    sent: list[tuple[str, int]] = []
    assert (
        reap_once(store, lambda j, a: sent.append((j, a)), republish_after_s=60).republished == []
    )  # too young: the API may still be publishing it
    sync_client.hset(Keys(PREFIX).job(job_id), "queued_at", time.time() - 120)
    done = reap_once(store, lambda j, a: sent.append((j, a)), republish_after_s=60)
    assert done.republished == sent == [(job_id, 1)]
    assert (
        reap_once(store, lambda j, a: sent.append((j, a)), republish_after_s=60).republished == []
    )  # marked published now


def test_a_lost_message_is_published_again(
    redis_server: RedisServer, store: JobStore, sync_client: redis.Redis
) -> None:
    """A queued, published attempt whose message is nowhere in the broker (a worker took it
    and died before `begin`) is published again once it has been missing for the grace
    period; a message waiting in the queue or taken and unacknowledged is not lost."""
    from service.queue import enqueue, make_celery, message_attempt
    from service.settings import Settings

    settings = Settings(redis_url=redis_server.url, key_prefix=PREFIX, queue_name="lost-test")
    celery = make_celery(settings)
    keys = Keys(PREFIX)
    queue_key = keys.broker_queue("lost-test")
    sent: list[tuple[str, int]] = []

    def publish(job_id: str, attempt: int) -> None:
        sent.append((job_id, attempt))
        enqueue(celery, settings, job_id, attempt)

    def check(lost: dict[tuple[str, int], float]) -> list[tuple[str, int]]:
        done = find_lost_messages(store, publish, "lost-test", lost, grace_s=0.3)
        return [x for x in done if x[0] in (job_id, running)]

    try:
        _, job_id = create(redis_server.url)
        _, running = create(redis_server.url)
        for j in (job_id, running):
            publish(j, 1)
            store.mark_published(j, 1)
        assert store.begin(Lease(running, 1, "w1"), 60_000).outcome is BeginOutcome.STARTED
        raw = sync_client.lrange(queue_key, 0, -1)
        assert sorted(message_attempt(m) for m in raw) == sorted([(job_id, 1), (running, 1)])

        lost: dict[tuple[str, int], float] = {}
        assert check(lost) == [] and lost == {}  # waiting in the queue: fine

        # a worker takes the message (kombu: off the list, into the unacked hash): not lost
        envelope = sync_client.lpop(queue_key, 2)
        assert envelope is not None
        mine = next(m for m in envelope if message_attempt(m) == (job_id, 1))
        sync_client.hset(keys.broker_unacked, "tag-1", json.dumps([json.loads(mine), "", "q"]))
        assert check(lost) == [] and lost == {}

        # ... then dies before `begin`: the message is gone, the job still queued
        sync_client.delete(keys.broker_unacked)
        assert check(lost) == [] and list(lost) == [(job_id, 1)]  # noted, not yet resent
        time.sleep(0.35)
        assert check(lost) == [(job_id, 1)] and (job_id, 1) not in lost
        assert sent.count((job_id, 1)) == 2 and sent.count((running, 1)) == 1
        raw = sync_client.lrange(queue_key, 0, -1)
        assert [message_attempt(m) for m in raw] == [(job_id, 1)]  # the new copy waits
        assert check(lost) == []  # and is found

        # a message waiting in another queue (workers may read different queues) is not lost
        other = Settings(redis_url=redis_server.url, key_prefix=PREFIX, queue_name="other-q")
        sync_client.delete(queue_key)
        enqueue(celery, other, job_id, 1)
        assert sync_client.llen(keys.broker_queue("other-q")) == 1
        assert (job_id, 1) in store.broker_attempts("lost-test")
        assert check(lost) == [] and lost == {}
    finally:
        sync_client.delete(queue_key, keys.broker_unacked, keys.broker_queue("other-q"))
        celery.close()


def test_message_attempt_reads_only_our_messages() -> None:
    from service.queue import message_attempt

    assert message_attempt("not json") is None
    assert message_attempt(json.dumps({"headers": {"task": "other"}, "body": ""})) is None
    body = base64.b64encode(json.dumps([["j1", 3], {}, {}]).encode()).decode()
    ours = {
        "headers": {"task": "mtl.run_job"},
        "body": body,
        "properties": {"body_encoding": "base64"},
    }
    assert message_attempt(json.dumps(ours)) == ("j1", 3)
    assert message_attempt(json.dumps([ours, "", "q"])) == ("j1", 3)
    assert message_attempt(json.dumps(ours | {"body": "%%%"})) is None


def test_stale_training_processes_are_killed_after_the_grace(
    redis_server: RedisServer, store: JobStore, sync_client: redis.Redis
) -> None:
    """A child whose recorded attempt is current is left alone; one whose job moved on is
    killed once it has been stale for the grace period (it would have exited by itself by
    then if it could); another worker's process is never touched; the record of a child that
    has gone since the last pass is removed."""
    from worker.reaper import child_pids, end_stale_processes

    host = "host-under-test"
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
             for _ in range(3)]  # fmt: skip
    current, stale, foreign = procs
    try:
        assert {p.pid for p in procs} <= child_pids(os.getpid())
        jobs = {p.pid: create(redis_server.url)[1] for p in procs}
        for p in procs:
            lease = Lease(jobs[p.pid], 1, f"{host}:{p.pid}:x")
            assert store.begin(lease, 60_000).outcome is BeginOutcome.STARTED
            store.set_process_attempt(host, p.pid, lease)
        gone = subprocess.Popen([sys.executable, "-c", "pass"])  # killed hard, say
        gone.wait()
        store.set_process_attempt(host, gone.pid, Lease("job_gone", 1, "t"))
        children = {current.pid, stale.pid}  # `foreign` belongs to another worker
        known = {current.pid, stale.pid, gone.pid}  # the children of the last pass
        sync_client.hset(Keys(PREFIX).job(jobs[stale.pid]), "attempt", 2)  # moved on
        sync_client.hset(Keys(PREFIX).job(jobs[foreign.pid]), "attempt", 2)

        since: dict[int, float] = {}
        assert end_stale_processes(store, host, children, known, since, grace_s=0.3) == []
        assert list(since) == [stale.pid] and known == children
        assert store.process_attempts(host, [gone.pid]) == {}  # its record is cleaned up
        time.sleep(0.35)
        killed = end_stale_processes(store, host, children, known, since, grace_s=0.3)
        assert killed == [stale.pid]
        assert stale.wait(timeout=5) == -signal.SIGKILL
        assert current.poll() is None and foreign.poll() is None
        left = store.process_attempts(host, [p.pid for p in procs])
        assert sorted(left) == sorted([current.pid, foreign.pid])
        assert since == {}
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_priority_bands_order_the_queue_and_survive_a_requeue(
    redis_server: RedisServer, store: JobStore, sync_client: redis.Redis
) -> None:
    """High before normal before low, first come first served within a band; a job re-queued
    after a lost worker keeps its band (it goes behind the jobs of its band)."""
    url = redis_server.url
    ids = {p: create(url, priority=p)[1] for p in ("low", "normal", "high")}
    later_normal = create(url)[1]
    order = sync_client.zrange(Keys(PREFIX).queued, 0, -1)
    assert order == [ids["high"], ids["normal"], later_normal, ids["low"]]
    assert store.begin(Lease(ids["high"], 1, "w1"), 50).outcome is BeginOutcome.STARTED
    time.sleep(0.1)
    assert reap_once(store, lambda j, a: None).requeued == [(ids["high"], 2)]
    order = sync_client.zrange(Keys(PREFIX).queued, 0, -1)
    assert order == [ids["high"], ids["normal"], later_normal, ids["low"]]


def test_jobs_over_a_keys_device_limit_are_held_then_released_in_order(
    redis_server: RedisServer, store: JobStore
) -> None:
    """With 3 devices per key: alice's 2-device job is sent; her next 2-device job is held and
    so is her 1-device job behind it (her jobs keep their order); bob is not held back. When
    alice's first job ends, one release pass sends both."""
    url = redis_server.url

    def new(owner: str, devices: int) -> str:
        job_id = create(url, owner=owner, devices=devices, max_devices=3, queue=f"q.d{devices}")[1]
        return job_id

    first, second, third = new("alice", 2), new("alice", 2), new("alice", 1)
    other = new("bob", 2)
    held = {j: store.get(j).held for j in (first, second, third, other)}  # type: ignore[union-attr]
    assert held == {first: False, second: True, third: True, other: False}
    assert store.unpublished(older_than_s=-1) == [(first, 1), (other, 1)]  # never the held ones
    assert store.release_held(3) == []  # alice still holds 2 of 3
    assert store.begin(Lease(first, 1, "w1"), 5000).outcome is BeginOutcome.STARTED
    assert store.release_held(3) == []
    assert store.finish(Lease(first, 1, "w1"), JobState.SUCCEEDED)
    assert store.release_held(3) == [(second, 1, "q.d2"), (third, 1, "q.d1")]
    assert store.get(second).held is False  # type: ignore[union-attr]
    assert store.release_held(3) == []
    # a held job that is cancelled leaves the index
    fourth, fifth = new("bob", 2), new("bob", 1)
    assert store.cancel(fourth) is JobState.CANCELLED
    assert store.release_held(0) == [(fifth, 1, "q.d1")]  # no limit any more: all go
    assert store.redis.zcard(Keys(PREFIX).held) == 0
