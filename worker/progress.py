"""Progress out to Redis, and cancel / fencing in: an `mtl` callback plus a lease thread.

The training step never waits on Redis: `on_step_end` only reads a flag. A background
`LeaseKeeper` thread renews the attempt's lease every `cancel_poll_s`, writes the progress
fields (step, total, epoch, elapsed, ETA) to the job record and reads the cancel flag, all in
one Lua call; when the job was cancelled, or this attempt is no longer the job's current one
(fencing), it sets the flag and the loop stops after the current step. Logs, evaluations and
checkpoints are appended to the job's event stream (and metric history) as they happen, each
tagged with (attempt, step); the append is fenced too.

Redis unavailable (restarted, failing over, a network blip): the training thread waits for it
at its next event (`wait_for_redis`) instead of failing the job, then goes on; the fencing
decides whether this attempt still owns the job (if the outage outlived the lease and the
reaper moved the job on, the attempt stops without writing).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mtl.callbacks import Callback, TrainControl, TrainState
from mtl.summary import summarise
from service.records import BestScores, Event, EventType, LatestScores
from service.store import JobStore, Lease

__all__ = ["STOP_CANCELLED", "STOP_STALE", "LeaseKeeper", "RedisProgress", "wait_for_redis"]

log = logging.getLogger(__name__)

STOP_CANCELLED = "cancelled by request"
STOP_STALE = "stale attempt: the job moved on without this worker"

T = TypeVar("T")
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)  # BusyLoadingError is a ConnectionError


def wait_for_redis(call: Callable[[], T], what: str, *, max_delay: float = 2.0) -> T:
    """`call()`, repeated with backoff while Redis cannot be reached, until it answers.

    For the calls one attempt makes (begin, events, finish): an outage must not fail the
    job (an error would) nor leave it running with nobody to finish it (a crash would). The
    scripts are fenced by the attempt, and an event append recognises its own retry.
    """
    delay, since = 0.1, None
    while True:
        try:
            result = call()
        except REDIS_DOWN as exc:
            if since is None:
                since = time.monotonic()
                log.warning("Redis unavailable while %s (%s); waiting for it", what, exc)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
            continue
        if since is not None:
            log.warning("Redis is back after %.1fs (%s)", time.monotonic() - since, what)
        return result


class RedisProgress(Callback):
    """The job's record and event stream, kept by the training loop's hooks.

    `latest` holds every task's latest numbers per split; `best` the numbers of the evaluation
    the trainer marked best (its monitor with `min_delta`: the checkpoint that is exported).
    Both are rebuilt from the metric history when an attempt resumes."""

    def __init__(
        self, store: JobStore, lease: Lease, *, lease_ms: int, monitor: str, monitor_mode: str
    ) -> None:
        self.store = store
        self.lease = lease
        self.lease_ms = lease_ms
        self.metric = monitor.partition("/")[2]
        self.mode = monitor_mode
        self.state: TrainState | None = None
        self.stop_reason: str | None = None
        self.latest: dict[str, dict[str, LatestScores]] = {}
        self.best: dict[str, BestScores] = {}
        # when the training thread last showed signs of life (any hook); read by the keeper
        self.last_progress = time.monotonic()

    # ------------------------------------------------------------------ called by other threads
    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None or reason == STOP_STALE:
            self.stop_reason = reason

    @property
    def stale(self) -> bool:
        return self.stop_reason == STOP_STALE

    @property
    def cancelled(self) -> bool:
        return self.stop_reason == STOP_CANCELLED

    def progress(self) -> dict[str, Any]:
        state = self.state
        if state is None:
            return {}
        eta = state.eta
        return {
            "step": state.step,
            "total_steps": state.total_steps,
            "epoch": state.epoch,
            "elapsed": round(state.elapsed, 3),
            "eta": "" if eta is None else round(eta, 3),
            "progress_at": round(time.time(), 3),
        }

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, state: TrainState, control: TrainControl) -> None:
        self.state = state
        self.last_progress = time.monotonic()
        resumed = wait_for_redis(
            lambda: self.store.resume(self.lease, state.step), "resuming the history"
        )
        if resumed is None:
            self.request_stop(STOP_STALE)
            control.stop(STOP_STALE)
            return
        for event in resumed.history:
            self._track(event)
        fields: dict[str, Any] = {**self.progress(), **self.scores()}
        if state.step > 0 or self.lease.attempt > 1:
            data = {
                "from_step": state.step,
                "metrics_dropped": resumed.metrics_dropped,
                "events_dropped": resumed.events_dropped,
            }
            self._emit(EventType.RESUME, state, data, fields=fields)
        else:
            self._emit(None, state, None, fields=fields)
        self._check(control)

    def on_step_end(self, state: TrainState, control: TrainControl) -> None:
        self.state = state
        self.last_progress = time.monotonic()
        if self.stop_reason is not None:
            control.stop(self.stop_reason)

    def on_log(self, state: TrainState, metrics: dict[str, Any], control: TrainControl) -> None:
        data = {"epoch": state.epoch, "elapsed": state.elapsed, "eta": state.eta, **metrics}
        event = Event.make(EventType.LOG, self.lease.attempt, state.step, data)
        self._track(event)
        fields = {**self.progress_of(state), "latest": self.scores()["latest"]}
        self._append(event, metric=True, fields=fields)
        self._check(control)

    def on_evaluate(
        self, state: TrainState, metrics: dict[str, Any], control: TrainControl
    ) -> None:
        data = {"epoch": state.epoch, "elapsed": state.elapsed, **metrics}
        event = Event.make(EventType.EVALUATE, self.lease.attempt, state.step, data)
        self._track(event)
        fields = {**self.progress_of(state), **self.scores()}
        self._append(event, metric=True, fields=fields)
        self._check(control)

    def on_save(self, state: TrainState, control: TrainControl) -> None:
        """Fence the write: renew the lease now and write nothing if it is no longer ours (the
        reaper re-queued the job and another attempt owns the directory). With Redis away the
        write goes ahead: it is atomic, and the attempt's end is fenced anyway."""
        try:
            renewal = self.store.renew(self.lease, self.lease_ms, self.progress_of(state))
        except Exception:
            log.warning("could not check the lease before a save", exc_info=True)
            return
        if not renewal.ours:
            log.warning(
                "job %s attempt %s is stale; not saving", self.lease.job_id, self.lease.attempt
            )
            self.request_stop(STOP_STALE)
            control.allow_save = False
            control.stop(STOP_STALE)

    def on_checkpoint(self, state: TrainState, path: Path, control: TrainControl) -> None:
        data = {"name": Path(path).name, "epoch": state.epoch}
        self._emit(EventType.CHECKPOINT, state, data, fields={"checkpoint_step": state.step})
        self._check(control)

    # ------------------------------------------------------------------ helpers
    def progress_of(self, state: TrainState) -> dict[str, Any]:
        """The progress fields of `state` (every hook but `on_step_end` comes through here,
        which also counts as a sign of life)."""
        self.state = state
        self.last_progress = time.monotonic()
        return self.progress()

    def _check(self, control: TrainControl) -> None:
        if self.stop_reason is not None:
            control.stop(self.stop_reason)

    def scores(self) -> dict[str, Any]:
        """`latest` and `best` as the record's JSON fields hold them."""
        return {
            "latest": {
                task: {split: v.model_dump(exclude_none=True) for split, v in splits.items()}
                for task, splits in self.latest.items()
            },
            "best": {task: v.model_dump(exclude_none=True) for task, v in self.best.items()},
        }

    def _emit(
        self,
        type_: EventType | None,
        state: TrainState,
        data: Any,
        *,
        fields: dict[str, Any] | None = None,
    ) -> None:
        if type_ is None:  # fields only
            renewal = wait_for_redis(
                lambda: self.store.renew(self.lease, self.lease_ms, fields or {}), "renewing"
            )
            if renewal.cancel:
                self.request_stop(STOP_CANCELLED)
            if not renewal.ours:
                self.request_stop(STOP_STALE)
            return
        self._append(Event.make(type_, self.lease.attempt, state.step, data), fields=fields)

    def _append(
        self, event: Event, *, metric: bool = False, fields: dict[str, Any] | None = None
    ) -> None:
        appended = wait_for_redis(
            lambda: self.store.append(self.lease, event, metric=metric, fields=fields),
            f"writing a {event.type} event",
        )
        if appended is None:
            self.request_stop(STOP_STALE)

    def _track(self, event: Event) -> None:
        """Keep the latest numbers per task and split, and those of the best evaluation."""
        if event.type is EventType.LOG:
            for task, scores in summarise(event.data).tasks.items():
                self.latest.setdefault(task, {})["train"] = LatestScores(
                    step=event.step, **scores.scores()
                )
            return
        if event.type is not EventType.EVALUATE:
            return
        split = event.data.get("split", "validation")
        summary = summarise(event.data)
        for task, scores in summary.tasks.items():
            self.latest.setdefault(task, {})[split] = LatestScores(
                step=event.step, **scores.scores()
            )
        monitor = event.data.get("monitor") or {}
        if split == "validation" and monitor.get("best"):  # the trainer's decision
            self.best = {
                task: BestScores(
                    metric=self.metric,
                    mode=self.mode,
                    value=scores.scores().get(self.metric),
                    step=event.step,
                    **scores.scores(),
                )
                for task, scores in summary.tasks.items()
            }


class LeaseKeeper(threading.Thread):
    """Renews the lease, writes progress and reads the cancel flag every `interval` seconds.

    It is also the hang watchdog: when the training thread has shown no sign of life (a
    callback hook) for `stall_timeout` seconds (0: never), it gives the lease up (lets it
    expire now) and calls `on_stall`, which by default ends the process: the reaper then
    re-queues the job as after a lost worker, and the Celery parent starts a fresh child. It
    keeps watching after the attempt went stale, until the run stops, so that a stuck stale
    process does not hold its worker's slot for ever either.
    """

    def __init__(
        self,
        store: JobStore,
        progress: RedisProgress,
        *,
        lease_ms: int,
        interval: float,
        stall_timeout: float = 0.0,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name=f"lease-{progress.lease.job_id}", daemon=True)
        self.store = store
        self.progress = progress
        self.lease_ms = lease_ms
        self.interval = interval
        self.stall_timeout = stall_timeout
        self.on_stall = on_stall or _exit_process
        self.stalled = False
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            idle = time.monotonic() - self.progress.last_progress
            if self.stall_timeout and idle > self.stall_timeout:
                self._give_up(idle)
                return
            if self.progress.stale:
                continue  # nothing to renew; still watching until the run stops
            try:
                renewal = self.store.renew(
                    self.progress.lease, self.lease_ms, self.progress.progress()
                )
            except Exception:  # Redis away: keep trying; the lease may lapse (then: stale)
                log.warning("lease renewal failed", exc_info=True)
                continue
            if not renewal.ours:
                log.warning("job %s attempt %s is stale; stopping", *self._ids())
                self.progress.request_stop(STOP_STALE)
                continue
            if renewal.cancel:
                self.progress.request_stop(STOP_CANCELLED)

    def _give_up(self, idle: float) -> None:
        self.stalled = True
        log.error(
            "job %s attempt %s: no progress for %.1f s (more than the stall timeout of %g s); "
            "presumed hung: giving up the lease and ending this process",
            *self._ids(),
            idle,
            self.stall_timeout,
        )
        try:  # expire the lease now (if it is still ours): the reaper re-queues at its next pass
            self.store.renew(self.progress.lease, 1, self.progress.progress())
        except Exception:
            log.warning("could not release the lease; it expires by itself", exc_info=True)
        self.progress.request_stop(STOP_STALE)
        self.on_stall()

    def _ids(self) -> tuple[str, int]:
        return self.progress.lease.job_id, self.progress.lease.attempt

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)


def _exit_process() -> None:
    """End the training process at once: its main thread is stuck and cannot be asked."""
    logging.shutdown()
    os._exit(70)  # EX_SOFTWARE
