"""The in-process fan-out buffer of a job's events (no Redis needed), and how a stream ends
when the store is gone (a fake store; the last test: the API in this process on a
redis-server of its own that it kills)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from redis.exceptions import ConnectionError as RedisConnectionError

from app.core.events import (
    STORE_UNAVAILABLE,
    HubRegistry,
    JobHub,
    StoreUnavailable,
    follow,
    parse_id,
)
from service.embedded import RedisServer


def entry(ms: int, type_: str, attempt: int, step: int, data: Any = None) -> tuple[str, dict]:
    event = {"type": type_, "attempt": attempt, "step": step, "time": 0, "data": data or {}}
    return f"{ms}-0", {"t": type_, "a": str(attempt), "s": str(step), "e": json.dumps(event)}


def hub(buffer_size: int = 2000) -> JobHub:
    return JobHub(store=None, job_id="j", block_ms=1000, buffer_size=buffer_size)  # type: ignore[arg-type]


def test_after_and_coverage() -> None:
    h = hub()
    h.start = parse_id("100-0")
    h._add([entry(101, "log", 1, 5), entry(102, "log", 1, 10)])
    assert h.after(parse_id("99-5")) is None  # older than what the hub saw: read Redis
    assert [e[0] for e in h.after(parse_id("100-0"))] == ["101-0", "102-0"]
    assert [e[0] for e in h.after(parse_id("101-0"))] == ["102-0"]
    assert h.after(parse_id("102-0")) == []
    assert not h.done
    h._add([entry(103, "state", 1, 10, {"state": "succeeded"})])
    assert h.done


def test_trim_moves_the_start() -> None:
    h = hub(buffer_size=8)
    h._add([entry(i, "log", 1, i) for i in range(1, 12)])
    assert len(h.entries) == 8
    assert h.start == parse_id("3-0")
    assert h.after(parse_id("2-0")) is None
    assert h.after(parse_id("3-0"))[0][0] == "4-0"  # type: ignore[index]


def test_resume_prunes_like_redis() -> None:
    h = hub()
    h._add([entry(i, "log", 1, i * 5) for i in range(1, 7)])  # steps 5..30
    h._add([entry(10, "state", 2, 30, {"state": "queued"})])
    h._add([entry(11, "resume", 2, 20, {"from_step": 20})])
    steps = [(f["t"], int(f["a"]), int(f["s"])) for _, f in h.entries]
    assert steps == [
        ("log", 1, 5), ("log", 1, 10), ("log", 1, 15), ("log", 1, 20),
        ("state", 2, 30), ("resume", 2, 20),
    ]  # fmt: skip
    assert h.ids == sorted(h.ids)


# ------------------------------------------------------------------ the store goes away


class FlakyStore:
    """An event source whose reads fail while `down` is set (like a Redis that was killed)."""

    def __init__(self, entries: list[tuple[str, dict]] | None = None) -> None:
        self.entries = entries or []
        self.down = False
        self.state_down = False  # only the job's state cannot be read
        self.reads = 0

    def _check(self) -> None:
        if self.down:
            raise RedisConnectionError("Connection refused")

    async def read_events(
        self, id_: str, after: str, *, count: int = 500, block_ms: int | None = None
    ) -> list[tuple[str, dict]]:
        self.reads += 1
        self._check()
        newer = [e for e in self.entries if parse_id(e[0]) > parse_id(after)][:count]
        if not newer and block_ms:
            await asyncio.sleep(block_ms / 1000)
        return newer

    async def last_event_id(self, id_: str) -> str | None:
        self._check()
        return self.entries[-1][0] if self.entries else None

    async def state(self, id_: str) -> str:
        self._check()
        if self.state_down:
            raise RedisConnectionError("Connection refused")
        return "running"


def sse_events(text: str) -> list[dict[str, str]]:
    """The events of a whole SSE body (comments left out), each as {field: value}."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(
            line.split(": ", 1)
            for line in block.split("\n")
            if line and ": " in line and not line.startswith(":")
        )
        if fields:
            events.append(fields)
    return events


async def collect(
    hubs: HubRegistry, store: FlakyStore, cursor: str = "0-0", limit: float = 10
) -> tuple[list[Any], BaseException | None, float]:
    """What `follow` yields (keep-alives left out) until it ends or `limit` s pass."""
    got: list[Any] = []
    started = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            async for item in follow(hubs, store, "j", cursor, keepalive_s=30):
                if item is not None:
                    got.append(item[0])
    except (StoreUnavailable, TimeoutError) as exc:
        return got, exc, time.monotonic() - started
    return got, None, time.monotonic() - started


def test_follow_ends_with_store_unavailable_when_reads_fail_past_the_grace() -> None:
    """The hub's reads fail (Redis was killed): after the grace (0.3 s here) the subscriber
    gets what was read before, then `StoreUnavailable` (the route's `error` event), and the
    next subscriber gets a fresh reader rather than the hub that gave up."""

    async def scenario() -> None:
        store = FlakyStore([entry(1, "state", 1, 0, {"state": "running"})])
        hubs = HubRegistry(store, block_ms=50, grace_s=0.3, retry_s=0.05)

        async def kill_soon() -> None:
            await asyncio.sleep(0.2)
            store.entries.append(entry(2, "log", 1, 5))
            await asyncio.sleep(0.1)  # the hub reads entry 2, then the store dies
            store.down = True

        killer = asyncio.create_task(kill_soon())
        got, exc, elapsed = await collect(hubs, store)
        await killer
        assert got == ["1-0", "2-0"]
        assert isinstance(exc, StoreUnavailable), exc
        assert 0.3 + 0.3 <= elapsed < 3, elapsed  # the grace, not the 30 s keep-alive
        assert hubs.hubs == {}  # the last subscriber left: the reader is gone too
        store.down = False  # Redis is back: a reconnect with Last-Event-ID goes on after 2-0
        store.entries.append(entry(3, "state", 1, 5, {"state": "succeeded"}))
        assert (await collect(hubs, store, cursor="2-0"))[:2] == (["3-0"], None)

    asyncio.run(scenario())


def test_a_blip_shorter_than_the_grace_is_ridden_out() -> None:
    async def scenario() -> None:
        store = FlakyStore([entry(1, "state", 1, 0, {"state": "running"})])
        hubs = HubRegistry(store, block_ms=50, grace_s=1.0, retry_s=0.05)

        async def blip() -> None:
            await asyncio.sleep(0.1)
            store.down = True
            await asyncio.sleep(0.4)
            store.down = False
            store.entries.append(entry(2, "state", 1, 5, {"state": "succeeded"}))

        task = asyncio.create_task(blip())
        got, exc, _ = await collect(hubs, store)
        await task
        assert (got, exc) == (["1-0", "2-0"], None)

    asyncio.run(scenario())


def test_the_subscribers_own_failed_read_is_store_unavailable() -> None:
    """A subscriber's own call (here: the job's state, right after it joins) fails: the
    stream ends the same way at once, not with a bare connection error."""

    async def scenario() -> None:
        store = FlakyStore()
        store.state_down = True
        hubs = HubRegistry(store, block_ms=50, grace_s=5.0, retry_s=0.05)
        got, exc, elapsed = await collect(hubs, store)
        assert got == [] and isinstance(exc, StoreUnavailable) and elapsed < 1, (exc, elapsed)
        assert isinstance(exc.__cause__, RedisConnectionError)

    asyncio.run(scenario())


def test_an_open_stream_ends_with_an_error_event_when_redis_is_killed(tmp_path: Path) -> None:
    """The API (in this process) on a redis-server of its own; a client follows a queued job's
    stream; Redis is SIGKILLed: the stream ends with `event: error` and the detail, promptly.
    Redis comes back (same port and files): reconnecting with Last-Event-ID goes on exactly
    after the last event (here: the cancel, then `end`)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from service.settings import Settings
    from tests.service.conftest import DUMMY

    server = RedisServer(tmp_path / "redis", password="hub-test-pass").start()
    try:
        settings = Settings(
            redis_url=server.url,
            data_dir=tmp_path / "data",
            key_prefix="hubtest",
            queue_name="hubtest",  # no worker: the job stays queued
            sse_keepalive_s=1,
            redis_timeout_s=1,
        )
        with TestClient(create_app(settings)) as client:
            job_id = client.post("/v1/jobs", json=DUMMY).json()["id"]
            assert server.process is not None
            pid = server.process.pid
            timer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
            timer.start()
            started = time.monotonic()
            r = client.get(f"/v1/jobs/{job_id}/events")  # (the test client reads to the end)
            elapsed = time.monotonic() - started
            timer.join()
            server.process.wait(timeout=10)
            events = sse_events(r.text)
            assert [e.get("event") for e in events] == ["state", "error"], r.text
            assert json.loads(events[0]["data"])["data"] == {"state": "queued"}
            assert "id" not in events[1] and json.loads(events[1]["data"]) == {
                "detail": STORE_UNAVAILABLE
            }
            assert elapsed < 5, elapsed
            last_id = events[0]["id"]

            server = RedisServer(
                tmp_path / "redis", port=server.port, password=server.password
            ).start()  # the AOF brings the job back
            assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
            r = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": last_id})
            events = sse_events(r.text)
            assert [e.get("event") for e in events] == ["state", "end"], r.text
            assert json.loads(events[0]["data"])["data"]["state"] == "cancelled"
            assert parse_id(events[0]["id"]) > parse_id(last_id)
    finally:
        server.stop()


def test_the_client_reconnects_after_an_error_event_and_through_503s() -> None:
    """`JobClient.events()`: the stream ends with `error`; the reconnect gets a 503 (Redis not
    back yet), then the stream again, asked with the last id it saw: no gap, no duplicate."""
    from service.client import JobClient

    error = f"event: error\ndata: {json.dumps({'detail': STORE_UNAVAILABLE})}\n\n"
    running = json.dumps({"type": "state", "attempt": 1, "step": 0, "time": 0, "data": {}})
    done = json.dumps({"type": "state", "attempt": 1, "step": 9, "time": 1, "data": {}})
    answers = [
        (200, f"id: 1-0\nevent: state\ndata: {running}\n\n: keep-alive\n\n{error}"),
        (503, json.dumps({"detail": "the job store (Redis) is unavailable"})),
        (200, f'id: 2-0\nevent: state\ndata: {done}\n\nevent: end\ndata: {{"state": "x"}}\n\n'),
    ]
    asked: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("Last-Event-ID"))
        status, body = answers[len(asked) - 1]
        kind = "text/event-stream" if status == 200 else "application/json"
        return httpx.Response(status, text=body, headers={"content-type": kind})

    client = JobClient("http://mtl.test")
    client.http = httpx.Client(base_url="http://mtl.test", transport=httpx.MockTransport(handler))
    with client:
        got = [(e.id, e.type) for e in client.events("j")]
    assert got[:2] == [("1-0", "state"), ("2-0", "state")] and got[2][1] == "end", got
    assert asked == [None, "1-0", "1-0"]
