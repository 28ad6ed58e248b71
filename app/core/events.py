"""Fan-out of a job's event stream to its SSE subscribers, in one API process.

Each job that has subscribers gets one `JobHub`: a task that reads the job's Redis Stream with
a blocking XREAD and keeps the recent entries in memory. Subscribers read from the hub, so 100
clients of one job cost one Redis read per batch of events, not 100.

No gap, no duplicate: the hub covers every entry after `start` (the stream's last id when it
started). A subscriber whose cursor (its Last-Event-ID) is older reads the missing entries
from Redis first (non-blocking), then joins the hub. Entries are delivered in id order and a
subscriber only ever takes entries with ids greater than its cursor.

When a resumed attempt prunes what older attempts reported after its checkpoint (see
`service.store`), the hub drops the same entries from its buffer, so a late subscriber sees the
same history as one reading Redis.

When the store is gone (the hub's reads have failed for `grace_s`, or a subscriber's own read
fails) `follow` raises `StoreUnavailable`: the routes end the stream with an `error` event,
and the client reconnects with its Last-Event-ID (getting a 503 until Redis is back) instead of
waiting on a stream that will never move again.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Protocol

from fastapi.sse import ServerSentEvent
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.records import TERMINAL_STATES, Event

__all__ = [
    "STORE_ERRORS",
    "STORE_UNAVAILABLE",
    "EventSource",
    "HubRegistry",
    "JobHub",
    "StoreUnavailable",
    "parse_id",
]

log = logging.getLogger(__name__)

Entry = tuple[str, dict[str, str]]

# the `data` of the `error` event that ends a stream when the store is gone
STORE_UNAVAILABLE = "the job store (Redis) is unavailable; reconnect with Last-Event-ID"


class StoreUnavailable(Exception):
    """The event store did not answer (for the hub: for `grace_s`): the stream ends here."""


# what ends a stream with the `error` event
STORE_ERRORS = (StoreUnavailable, RedisConnectionError, RedisTimeoutError)


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class EventSource(Protocol):
    """A stream of entries by id: a job's events (`AsyncJobStore`) or a study's
    (`AsyncStudyStore`)."""

    async def read_events(
        self, id_: str, after: str, *, count: int = ..., block_ms: int | None = ...
    ) -> list[Entry]: ...

    async def last_event_id(self, id_: str) -> str | None: ...

    async def state(self, id_: str) -> Any: ...


class _StateChange(BaseModel):
    """What the hub reads of a `state` entry: a job's (`service.records.Event`) or a study's
    (`service.studies.store.StudyEvent`); both end in the same terminal states."""

    data: dict[str, Any]


def is_terminal(fields: dict[str, str]) -> bool:
    if fields.get("t") != "state":
        return False
    return _StateChange.model_validate_json(fields["e"]).data.get("state") in TERMINAL_STATES


class JobHub:
    def __init__(
        self,
        store: EventSource,
        job_id: str,
        *,
        block_ms: int,
        buffer_size: int = 2000,
        grace_s: float = 2.0,
        retry_s: float = 1.0,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.block_ms = block_ms
        self.buffer_size = buffer_size
        self.grace_s = grace_s  # reads failing this long: the store is unavailable
        self.retry_s = retry_s  # between failed reads
        self.unavailable = False  # reads have failed for `grace_s` (until one succeeds)
        self.start: tuple[int, int] = (0, 0)
        self.ids: list[tuple[int, int]] = []
        self.entries: list[Entry] = []
        self.done = False  # the terminal state event has been read
        self.version = 0
        self.users = 0
        self._event = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ reader
    def start_reader(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"hub-{self.job_id}")

    def stop_reader(self) -> None:
        """Cancel the reader (not awaited: this runs in cancelled subscribers' clean-up)."""
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        last: str | None = None  # until the first read: where the hub starts
        failing_since: float | None = None
        try:
            while not self.done:
                try:
                    if last is None:
                        last = await self.store.last_event_id(self.job_id) or "0-0"
                        self.start = parse_id(last)
                        self._ready.set()
                        batch: list[Entry] = []
                    else:
                        batch = await self.store.read_events(
                            self.job_id, last, count=500, block_ms=self.block_ms
                        )
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.warning("event hub of %s: read failed", self.job_id, exc_info=True)
                    now = time.monotonic()
                    failing_since = now if failing_since is None else failing_since
                    if not self.unavailable and now - failing_since >= self.grace_s:
                        self.unavailable = True  # the subscribers end their streams
                        self._ready.set()
                        self._notify()
                    await asyncio.sleep(self.retry_s)
                    continue
                failing_since, self.unavailable = None, False
                if batch:
                    last = batch[-1][0]
                    self._add(batch)
                    self._notify()
        finally:
            self._ready.set()
            self._notify()

    def _add(self, batch: list[Entry]) -> None:
        for entry_id, fields in batch:
            self.ids.append(parse_id(entry_id))
            self.entries.append((entry_id, fields))
            if fields.get("t") == "resume":
                self._prune(fields)
            if is_terminal(fields):
                self.done = True
        overflow = len(self.entries) - self.buffer_size
        if overflow > self.buffer_size // 4:  # trim in chunks
            self.start = self.ids[overflow - 1]
            del self.ids[:overflow]
            del self.entries[:overflow]

    def _prune(self, resume: dict[str, str]) -> None:
        """Mirror `service/lua/resume.lua`: drop older attempts' entries past the checkpoint."""
        attempt = int(resume["a"])
        step = Event.model_validate_json(resume["e"]).data["from_step"]
        keep = [
            i
            for i, (_, f) in enumerate(self.entries)
            if f.get("t") in ("state", "resume") or int(f["a"]) >= attempt or int(f["s"]) <= step
        ]
        if len(keep) != len(self.entries):
            self.ids = [self.ids[i] for i in keep]
            self.entries = [self.entries[i] for i in keep]

    def _notify(self) -> None:
        self.version += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    # ------------------------------------------------------------------ subscribers
    async def ready(self) -> None:
        await self._ready.wait()

    def after(self, cursor: tuple[int, int]) -> list[Entry] | None:
        """Buffered entries after `cursor`, or None when the buffer does not reach back to it."""
        if cursor < self.start:
            return None
        return self.entries[bisect.bisect_right(self.ids, cursor) :]

    async def wait_newer(self, version: int, timeout: float) -> bool:
        """Wait until the hub moved past `version`; False on timeout."""
        if self.version != version:
            return True
        event = self._event
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()


class HubRegistry:
    """The hubs of one API process, by job id, shared while anyone subscribes."""

    def __init__(
        self, store: EventSource, *, block_ms: int, grace_s: float = 2.0, retry_s: float = 1.0
    ) -> None:
        self.store = store
        self.block_ms = block_ms
        self.grace_s = grace_s
        self.retry_s = retry_s
        self.hubs: dict[str, JobHub] = {}

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: str) -> AsyncIterator[JobHub]:
        hub = self.hubs.get(job_id)
        if hub is None or (not hub.alive and not hub.done) or hub.unavailable:
            # (a hub that gave up on the store is left to its leaving subscribers: this
            # subscriber got through to Redis, so a fresh reader starts)
            hub = JobHub(
                self.store,
                job_id,
                block_ms=self.block_ms,
                grace_s=self.grace_s,
                retry_s=self.retry_s,
            )
            self.hubs[job_id] = hub
            hub.start_reader()
        hub.users += 1
        try:
            await hub.ready()
            yield hub
        finally:
            hub.users -= 1
            if hub.users == 0:
                if self.hubs.get(job_id) is hub:
                    del self.hubs[job_id]
                hub.stop_reader()

    async def close(self) -> None:
        tasks = [h._task for h in self.hubs.values() if h._task is not None]
        for hub in self.hubs.values():
            hub.stop_reader()
        self.hubs.clear()
        await asyncio.gather(*tasks, return_exceptions=True)


async def follow(
    hubs: HubRegistry, store: EventSource, job_id: str, cursor: str, keepalive_s: float
) -> AsyncGenerator[Entry | None, None]:
    """The job's entries after `cursor`, live, until its terminal state event. Yields None
    when nothing happened for `keepalive_s` (time for a keep-alive comment) and ends after
    the terminal entry, or when the job is gone or already finished. Raises
    `StoreUnavailable` when the store is gone (after the entries read before)."""
    try:
        async with contextlib.aclosing(_follow(hubs, store, job_id, cursor, keepalive_s)) as items:
            async for item in items:
                yield item
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise StoreUnavailable(str(exc)) from exc


async def _follow(
    hubs: HubRegistry, store: EventSource, job_id: str, cursor: str, keepalive_s: float
) -> AsyncGenerator[Entry | None, None]:
    position = parse_id(cursor)
    async with hubs.subscribe(job_id) as hub:
        checked_state = False
        while True:
            version = hub.version
            entries = hub.after(position)
            if entries is None:  # older than the hub's memory: catch up from Redis
                entries = await store.read_events(job_id, cursor, count=500)
                if not entries:  # nothing in Redis after the cursor either
                    position = max(position, hub.start)
                    continue
            if entries:
                for entry_id, fields in entries:
                    cursor, position = entry_id, parse_id(entry_id)
                    yield entry_id, fields
                    if is_terminal(fields):
                        return
                continue
            if hub.unavailable:
                raise StoreUnavailable(f"the event reader of {job_id} cannot read the store")
            if not checked_state or not hub.alive:
                # a finished job whose history the client already has: end now
                checked_state = True
                state = await store.state(job_id)
                if state is None or state in TERMINAL_STATES:
                    return
                if not hub.alive:
                    raise RuntimeError(f"the event reader of {job_id} stopped")
            if not await hub.wait_newer(version, keepalive_s):
                state = await store.state(job_id)
                if state is None or state in TERMINAL_STATES:
                    # the stream expired or the job was deleted: nothing more will come
                    if hub.after(position):
                        continue
                    return
                yield None


async def server_sent_events(
    hubs: HubRegistry,
    store: EventSource,
    id_: str,
    cursor: str,
    keepalive_s: float,
    on_event: Callable[[], object] | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """A job's or a study's stream as server-sent events: each entry with its stream id as
    `id` (reconnect with `Last-Event-ID`), keep-alive comments while idle, then `end` with the
    final state; `error` (`{"detail"}`, no `id`) when the store goes away. `on_event` counts."""
    stream = follow(hubs, store, id_, cursor, keepalive_s)
    try:
        async with contextlib.aclosing(stream) as entries:
            async for entry in entries:
                if entry is None:
                    yield ServerSentEvent(comment="keep-alive")
                    continue
                entry_id, fields = entry
                yield ServerSentEvent(id=entry_id, event=fields.get("t"), raw_data=fields.get("e"))
                if on_event is not None:
                    on_event()
        state = await store.state(id_)
    except STORE_ERRORS:
        yield ServerSentEvent(event="error", data={"detail": STORE_UNAVAILABLE})
        return
    yield ServerSentEvent(event="end", data={"state": state})
