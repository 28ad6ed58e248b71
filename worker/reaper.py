"""The reaper and the worker heartbeat: a thread in every worker's main process.

Where it runs: the Celery worker's main (parent) process starts one `Maintenance` thread on
`worker_ready` and stops it on shutdown. Every worker runs one; the Lua scripts make that
safe (a job whose lease expired is moved exactly once). It does three things:

* heartbeat: ``ZADD {p}:workers <now> <worker>`` every `heartbeat_s` (what `/readyz` reads),
  with the devices the worker declared (what the API checks a job's `devices` against);
* reap: every `reaper_interval_s`, each running/cancelling job whose lease key has expired is
  moved to its next attempt and re-published as `(job_id, attempt + 1)`; the new attempt
  resumes from the last complete checkpoint. When the restart budget (`max_restarts`) is spent
  the job fails with the reason; a job lost while cancelling becomes `cancelled`;
* republish: a queued attempt whose message was never confirmed sent (the API or the reaper
  died between the two writes) is published again. Duplicates are harmless: a message whose
  attempt is not the job's current queued attempt does nothing;
* find lost messages: every `republish_after_s / 2`, the queued attempts whose message was
  sent but is nowhere in the broker (waiting in no queue, not taken and unacknowledged) are
  noted; one still missing on a check at least `republish_after_s` later is published again.
  That is the message a worker took (early acknowledgement) whose process then died before
  the attempt began, or one a broker restart lost. The wait covers the moment between a
  worker taking a message and `begin` (milliseconds; a false alarm would only add a
  harmless duplicate). A lost message is published again to its job's queue;
* release held jobs: a job whose key was at its device limit (`max_devices_per_key`) when it
  was queued is held (queued, not published); each reaper pass publishes those that fit now,
  in queue order;
* end stale training processes: each training process records which attempt it runs
  (`{p}:proc:{host}:{pid}`); a child of this worker whose attempt is no longer its job's
  current one (the lease lapsed and the job moved on) normally notices and exits within a
  step; one still alive `3 * lease_ttl_s` later is frozen or stuck while holding the GIL
  (so its own watchdog cannot run) and is killed, freeing the worker's process slot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery

from service.queue import enqueue
from service.settings import Settings
from service.store import JobStore, ReapOutcome

__all__ = ["Maintenance", "ReapPass", "end_stale_processes", "find_lost_messages", "reap_once"]

log = logging.getLogger(__name__)


@dataclass
class ReapPass:
    """What one pass of `reap_once` did."""

    requeued: list[tuple[str, int]] = field(default_factory=list)  # (job, its next attempt)
    failed: list[str] = field(default_factory=list)  # restart budget spent
    cancelled: list[str] = field(default_factory=list)  # lost while cancelling
    republished: list[tuple[str, int]] = field(default_factory=list)  # message never sent


def reap_once(
    store: JobStore, publish: Callable[[str, int], Any], *, republish_after_s: float = 30.0
) -> ReapPass:
    """One pass. `publish(job_id, attempt)` sends the message."""
    done = ReapPass()
    for job_id in store.active_jobs():
        reaped = store.reap(job_id)
        if reaped.outcome is ReapOutcome.REQUEUED and reaped.attempt is not None:
            log.warning("job %s: lease expired; re-queued as attempt %s", job_id, reaped.attempt)
            publish(job_id, reaped.attempt)
            store.mark_published(job_id, reaped.attempt)
            done.requeued.append((job_id, reaped.attempt))
        elif reaped.outcome is ReapOutcome.FAILED:
            log.warning("job %s: lease expired; restart budget spent, failed", job_id)
            done.failed.append(job_id)
        elif reaped.outcome is ReapOutcome.CANCELLED:
            log.warning("job %s: lease expired while cancelling; cancelled", job_id)
            done.cancelled.append(job_id)
    for job_id, attempt in store.unpublished(republish_after_s):
        log.warning("job %s attempt %s: publishing its message again", job_id, attempt)
        publish(job_id, attempt)
        store.mark_published(job_id, attempt)
        done.republished.append((job_id, attempt))
    return done


def release_held(
    store: JobStore, publish: Callable[[str, int], Any], max_devices: int
) -> list[tuple[str, int]]:
    """Publish the held jobs (their key was at its device limit) that fit now; returns them."""
    released = []
    for job_id, attempt, _queue in store.release_held(max_devices):
        log.info("job %s attempt %s: its key has devices free; sent to the workers",
                 job_id, attempt)  # fmt: skip
        publish(job_id, attempt)
        store.mark_published(job_id, attempt)
        released.append((job_id, attempt))
    return released


def find_lost_messages(
    store: JobStore,
    publish: Any,
    queue: str,
    lost: dict[tuple[str, int], float],
    grace_s: float,
) -> list[tuple[str, int]]:
    """Publish again the queued attempts whose message has been missing from the broker for
    `grace_s` (see the module docstring); returns them. `lost` (attempt -> when first seen
    missing) is kept between calls."""
    present = store.broker_attempts(queue)  # before the jobs: a message taken meanwhile
    missing = [a for a in store.published_queued() if a not in present]  # is now running
    now = time.monotonic()
    for key in set(lost) - set(missing):
        del lost[key]  # found, started or gone
    republished = []
    for job_id, attempt in missing:
        first = lost.setdefault((job_id, attempt), now)
        if now - first >= grace_s:
            log.warning("job %s attempt %s: its message is lost; publishing it again",
                        job_id, attempt)  # fmt: skip
            publish(job_id, attempt)
            store.mark_published(job_id, attempt)
            del lost[(job_id, attempt)]
            republished.append((job_id, attempt))
    return republished


def child_pids(pid: int) -> set[int]:
    """The processes whose parent is `pid` (Linux /proc; empty elsewhere)."""
    found: set[int] = set()
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.update(int(c) for c in (task / "children").read_text().split())
    except (OSError, ValueError):
        pass
    return found


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)  # works on a stopped process too


def end_stale_processes(
    store: JobStore,
    host: str,
    children: set[int],
    known: set[int],
    stale_since: dict[int, float],
    grace_s: float,
    kill: Callable[[int], None] = _kill,
) -> list[int]:
    """Kill the `children` whose recorded attempt has been stale for `grace_s` (see the module
    docstring). Returns the pids killed. Kept between passes: `known`, the children of the
    last pass (the records of those that have gone since are removed: a process killed hard
    cannot remove its own), and `stale_since`, pid -> when first seen stale."""
    for pid in known - children:
        store.clear_process_attempt(host, pid)
    known.clear()
    known.update(children)
    now = time.monotonic()
    killed: list[int] = []
    still_stale: set[int] = set()
    for pid, lease in store.process_attempts(host, children).items():
        if store.attempt_is_current(lease):
            continue
        first = stale_since.setdefault(pid, now)
        if now - first < grace_s:
            still_stale.add(pid)
            continue
        log.error("job %s attempt %s: its process %s is stale and still alive %.0f s later "
                  "(frozen or stuck); killing it", lease.job_id, lease.attempt, pid,
                  now - first)  # fmt: skip
        kill(pid)
        store.clear_process_attempt(host, pid)
        killed.append(pid)
    for pid in set(stale_since) - still_stale:
        del stale_since[pid]
    return killed


class Maintenance(threading.Thread):
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        celery: Celery,
        worker_name: str,
        devices: int = 1,
    ) -> None:
        super().__init__(name="mtl-maintenance", daemon=True)
        self.settings = settings
        self.store = store
        self.celery = celery
        self.worker_name = worker_name
        self.devices = devices
        self._halt = threading.Event()
        self._lost: dict[tuple[str, int], float] = {}
        self._children: set[int] = set()
        self._stale: dict[int, float] = {}

    def _publish(self, job_id: str, attempt: int) -> None:
        enqueue(self.celery, self.settings, job_id, attempt, self.store.job_queue(job_id))

    def run(self) -> None:
        s = self.settings
        tick = min(s.heartbeat_s, s.reaper_interval_s)
        grace = max(s.republish_after_s, s.lease_ttl_s)
        since_beat = since_reap = since_lost = float("inf")
        while True:
            try:
                if since_beat >= s.heartbeat_s:
                    self.store.heartbeat(self.worker_name, self.devices)
                    since_beat = 0.0
                if since_reap >= s.reaper_interval_s:
                    reap_once(self.store, self._publish, republish_after_s=grace)
                    release_held(self.store, self._publish, s.max_devices_per_key)
                    end_stale_processes(
                        self.store,
                        socket.gethostname(),
                        child_pids(os.getpid()),
                        self._children,
                        self._stale,
                        grace_s=3 * s.lease_ttl_s,
                    )
                    since_reap = 0.0
                if since_lost >= grace / 2:
                    find_lost_messages(self.store, self._publish, s.queue_name, self._lost, grace)
                    since_lost = 0.0
            except Exception:
                log.warning("maintenance pass failed", exc_info=True)
            if self._halt.wait(tick):
                break
            since_beat += tick
            since_reap += tick
            since_lost += tick
        try:
            self.store.worker_gone(self.worker_name)
        except Exception:
            log.debug("could not remove the heartbeat", exc_info=True)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)
