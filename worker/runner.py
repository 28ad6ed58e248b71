"""One attempt of one job: job id in, config from Redis, `mtl.trainer.train`, result out.

This is the whole task body; the Celery task in `worker.tasks` only calls `run_attempt`.

1. `begin` (Lua): only if the job's current attempt is this message's attempt and the job is
   still queued; takes the lease (SET NX PX). Anything else (cancelled while queued, a stale
   or duplicate message) returns at once.
2. Train with a `RedisProgress` callback and a `LeaseKeeper` thread; `resume=True` continues
   from the last complete checkpoint in the job's directory (that is how a re-queued attempt
   resumes).
3. `finish` (Lua, fenced): succeeded / cancelled / failed with the reason. `mtl` errors
   (bad data, config, model, a non-finite loss) fail the job at once, without retry; only a
   lost worker (lease expiry, see `worker.reaper`) earns another attempt.

Redis being unreachable is neither: every call here and in `RedisProgress` waits for it
(`worker.progress.wait_for_redis`), and the fencing decides afterwards.
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
import uuid
from typing import Any

from mtl.callbacks import Outcome
from mtl.summary import summarise
from service.datasets import resolver
from service.keys import Keys
from service.records import FinalScores, JobState
from service.settings import Settings
from service.storage import Storage
from service.store import BeginOutcome, JobStore, Lease
from worker.artifacts import JobArtifacts
from worker.progress import STOP_CANCELLED, LeaseKeeper, RedisProgress, wait_for_redis

__all__ = ["make_token", "run_attempt", "sync_redis"]

log = logging.getLogger(__name__)


def make_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def sync_redis(settings: Settings) -> Any:
    import redis

    return redis.Redis.from_url(
        settings.require_redis_url(),
        decode_responses=True,
        health_check_interval=30,
        socket_keepalive=True,
    )


def make_store(settings: Settings, client: Any) -> JobStore:
    return JobStore(
        client,
        Keys(settings.key_prefix),
        stream_maxlen=settings.stream_maxlen,
        stream_ttl_s=settings.stream_ttl_s,
    )


def run_attempt(job_id: str, attempt: int, settings: Settings, client: Any = None) -> str:
    """Run one attempt; returns what happened (for the log): the final state or why not."""
    client = client if client is not None else sync_redis(settings)
    store = make_store(settings, client)
    lease = Lease(job_id, int(attempt), make_token())
    lease_ms = int(settings.lease_ttl_s * 1000)
    begun = wait_for_redis(lambda: store.begin(lease, lease_ms), "starting the job")
    if begun.outcome is not BeginOutcome.STARTED:
        log.info("job %s attempt %s not started: %s %s", job_id, attempt, begun.outcome,
                 begun.detail)  # fmt: skip
        return str(begun.outcome)
    # tell this worker's parent which attempt this process runs (see worker.reaper)
    host, pid = socket.gethostname(), os.getpid()
    _best_effort(lambda: store.set_process_attempt(host, pid, lease), "recording the attempt")
    try:
        return _run_started(store, lease, lease_ms, settings)
    finally:
        _best_effort(lambda: store.clear_process_attempt(host, pid), "clearing the attempt")


def _best_effort(call: Any, what: str) -> None:
    try:
        call()
    except Exception:
        log.warning("%s failed", what, exc_info=True)


def _run_started(store: JobStore, lease: Lease, lease_ms: int, settings: Settings) -> str:
    """The attempt after `begin`: train, then `finish` (fenced)."""
    job_id, attempt = lease.job_id, lease.attempt
    from mtl.callbacks import TrainControl
    from mtl.config import TrainConfig
    from mtl.errors import MTLError
    from mtl.tensorboard import TensorBoardCallback

    progress: RedisProgress | None = None
    keeper: LeaseKeeper | None = None
    artifacts: JobArtifacts | None = None
    published: dict[str, Any] = {}
    error: str | None = None
    result = None
    try:
        raw = wait_for_redis(lambda: store.load_config(job_id), "reading the config")
        config = TrainConfig.model_validate_json(raw or "")
        progress = RedisProgress(
            store,
            lease,
            lease_ms=lease_ms,
            monitor=config.monitor,
            monitor_mode=config.monitor_mode,
        )
        keeper = LeaseKeeper(
            store,
            progress,
            lease_ms=lease_ms,
            interval=settings.cancel_poll_s,
            stall_timeout=settings.stall_timeout_s,
        )
        keeper.start()
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        from mtl.trainer import train

        storage = Storage.from_settings(settings)
        artifacts = JobArtifacts(storage, store, lease, lease_ms)
        record = wait_for_redis(lambda: store.get(job_id), "reading the job")
        output_dir = artifacts.prepare(record)
        callbacks: list[Any] = [progress, TensorBoardCallback(output_dir / "tensorboard")]
        uploader = artifacts.callback()
        if uploader is not None:
            callbacks.append(uploader)
        result = train(
            config,
            output_dir,
            callbacks=callbacks,
            control=TrainControl(),
            resolve=resolver(storage),
            resume=True,
        )
        if result.outcome is Outcome.COMPLETED and result.model_dir is not None:
            published = artifacts.publish(result.model_dir)
    except MTLError as exc:
        error = str(exc)
    except Exception as exc:  # a bug or the environment (e.g. CUDA OOM): fail, do not loop
        log.error("job %s attempt %s crashed:\n%s", job_id, attempt, traceback.format_exc())
        error = f"internal error: {type(exc).__name__}: {exc}"
    finally:
        if keeper is not None:
            keeper.stop()

    outcome = "failed"
    try:
        outcome = _finish(store, lease, progress, result, error, published)
        return outcome
    finally:
        if artifacts is not None:  # older attempts' checkpoints go only once this one has won
            artifacts.cleanup(succeeded=outcome == JobState.SUCCEEDED)


def _finish(
    store: JobStore,
    lease: Lease,
    progress: RedisProgress | None,
    result: Any,
    error: str | None,
    published: dict[str, Any],
) -> str:
    job_id, attempt = lease.job_id, lease.attempt
    if progress is not None and progress.stale:
        log.warning("job %s attempt %s was superseded; leaving it alone", job_id, attempt)
        return "stale"
    fields: dict[str, Any] = {}
    if progress is not None:
        fields.update(progress.progress())
        fields.update(progress.scores())
    if error is not None:
        state = JobState.FAILED
    elif result is not None and result.outcome is Outcome.COMPLETED:
        state = JobState.SUCCEEDED
        fields["model"] = "1" if result.model_dir is not None else "0"
        fields.update(published)
        final: FinalScores = {s: summarise(r) for s, r in result.metrics.items() if r}
        fields["final_metrics"] = {s: v.model_dump(exclude_none=True) for s, v in final.items()}
        if result.state.stop_reason:
            fields["stop_reason"] = result.state.stop_reason
    elif progress is not None and progress.stop_reason == STOP_CANCELLED:
        state = JobState.CANCELLED
        error = "cancelled by request"
    else:
        state = JobState.FAILED
        error = f"training stopped unexpectedly: {getattr(result, 'outcome', None)}"
    finished = wait_for_redis(
        lambda: store.finish(lease, state, error=error, fields=fields), "finishing the job"
    )
    if not finished:
        log.warning("job %s attempt %s: finish was fenced off (stale)", job_id, attempt)
        return "stale"
    log.info("job %s attempt %s: %s%s", job_id, attempt, state, f" ({error})" if error else "")
    return state
