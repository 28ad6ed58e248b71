"""The reaper and the worker heartbeat: a thread in every worker's main process.

Where it runs: the Celery worker's main (parent) process starts one `Maintenance` thread on
`worker_ready` and stops it on shutdown. Every worker runs one; the Lua scripts make that
safe (a job whose lease expired is moved exactly once). It does three things:

* heartbeat: ``ZADD {p}:workers <now> <worker>`` every `heartbeat_s` (what `/readyz` reads);
* reap: every `reaper_interval_s`, each running/cancelling job whose lease key has expired is
  moved to its next attempt and re-published as `(job_id, attempt + 1)`; the new attempt
  resumes from the last complete checkpoint. When the restart budget (`max_restarts`) is spent
  the job fails with the reason; a job lost while cancelling becomes `cancelled`;
* republish: a queued attempt whose message was never confirmed sent (the API or the reaper
  died between the two writes) is published again. Duplicates are harmless: a message whose
  attempt is not the job's current queued attempt does nothing.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

from app.core.config import Settings
from worker.queue import enqueue
from worker.store import JobStore

__all__ = ["Maintenance", "reap_once"]

log = logging.getLogger(__name__)


def reap_once(store: JobStore, publish: Any, *, republish_after_s: float = 30.0) -> dict[str, Any]:
    """One pass. `publish(job_id, attempt)` sends the message. Returns what it did."""
    done: dict[str, Any] = {"requeued": [], "failed": [], "cancelled": [], "republished": []}
    for job_id in store.active_jobs():
        status, attempt = store.reap(job_id)
        if status == "requeued" and attempt is not None:
            log.warning("job %s: lease expired; re-queued as attempt %s", job_id, attempt)
            publish(job_id, attempt)
            store.mark_published(job_id, attempt)
            done["requeued"].append((job_id, attempt))
        elif status in ("failed", "cancelled"):
            log.warning("job %s: lease expired; now %s", job_id, status)
            done[status].append(job_id)
    for job_id, attempt in store.unpublished(republish_after_s):
        log.warning("job %s attempt %s: publishing its message again", job_id, attempt)
        publish(job_id, attempt)
        store.mark_published(job_id, attempt)
        done["republished"].append((job_id, attempt))
    return done


class Maintenance(threading.Thread):
    def __init__(
        self, settings: Settings, store: JobStore, celery: Celery, worker_name: str
    ) -> None:
        super().__init__(name="mtl-maintenance", daemon=True)
        self.settings = settings
        self.store = store
        self.celery = celery
        self.worker_name = worker_name
        self._halt = threading.Event()

    def _publish(self, job_id: str, attempt: int) -> None:
        enqueue(self.celery, self.settings, job_id, attempt)

    def run(self) -> None:
        s = self.settings
        tick = min(s.heartbeat_s, s.reaper_interval_s)
        since_beat = since_reap = float("inf")
        while True:
            try:
                if since_beat >= s.heartbeat_s:
                    self.store.heartbeat(self.worker_name)
                    since_beat = 0.0
                if since_reap >= s.reaper_interval_s:
                    reap_once(self.store, self._publish, republish_after_s=max(30.0, s.lease_ttl_s))
                    since_reap = 0.0
            except Exception:
                log.warning("maintenance pass failed", exc_info=True)
            if self._halt.wait(tick):
                break
            since_beat += tick
            since_reap += tick
        try:
            self.store.worker_gone(self.worker_name)
        except Exception:
            log.debug("could not remove the heartbeat", exc_info=True)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)
