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

import contextlib
import json
import logging
import os
import socket
import subprocess
import traceback
import uuid
from pathlib import Path
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
        devices = _devices(store, job_id)
        if devices > 1:
            return _run_ranks(store, lease, lease_ms, settings, devices)
        return _run_started(store, lease, lease_ms, settings)
    finally:
        _best_effort(lambda: store.clear_process_attempt(host, pid), "clearing the attempt")


def _devices(store: JobStore, job_id: str) -> int:
    """The job's `devices` (1 when its config cannot be read: `_run_started` fails it)."""
    raw = wait_for_redis(lambda: store.load_config(job_id), "reading the config")
    try:
        return max(1, int(json.loads(raw or "{}").get("devices", 1)))
    except (ValueError, TypeError, AttributeError):
        return 1


# environment of the rank processes (see worker.ranks)
ENV_JOB, ENV_ATTEMPT, ENV_TOKEN, ENV_WORK = (
    "MTL_RANK_JOB", "MTL_RANK_ATTEMPT", "MTL_RANK_TOKEN", "MTL_RANK_WORK_DIR",
)  # fmt: skip


def _run_ranks(
    store: JobStore, lease: Lease, lease_ms: int, settings: Settings, devices: int
) -> str:
    """A job on several devices: `devices` processes under torchrun (`worker.ranks`), started
    as a subprocess of this one (no CUDA touched here; they die with it). Rank 0 runs the
    attempt as `_run_started` does (progress, lease, uploads, `finish`); the others only train.
    This process prepares the work folder first (checkpoints to resume from) and waits.

    A rank that dies ends the whole group (torchrun); rank 0's lease then expires and the
    reaper re-queues the job, which resumes from its last checkpoint, as after a lost worker."""
    from mtl.distributed import launch
    from service.embedded import preexec_die_with_parent

    job_id, attempt = lease.job_id, lease.attempt
    artifacts = JobArtifacts(Storage.from_settings(settings), store, lease, lease_ms)
    record = wait_for_redis(lambda: store.get(job_id), "reading the job")
    try:
        work = artifacts.prepare(record)
    except Exception as exc:  # a checkpoint that cannot be fetched: fail like a training error
        return _finish(store, lease, None, None, f"{exc}", {})
    env = {ENV_JOB: job_id, ENV_ATTEMPT: str(attempt), ENV_TOKEN: lease.token, ENV_WORK: str(work)}
    if settings.torch_threads:
        env["OMP_NUM_THREADS"] = str(settings.torch_threads)
    ranks = launch(
        "worker.ranks", [], devices, env=env, new_session=True,
        preexec_fn=preexec_die_with_parent(), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    code = _wait_holding_lease(ranks, store, lease, lease_ms, settings.cancel_poll_s)
    final = wait_for_redis(lambda: store.get(job_id), "reading the job")
    if final is not None and final.attempt == attempt and final.terminal:
        return str(final.state)
    if code == 0:
        log.warning("job %s attempt %s: the ranks exited without finishing", job_id, attempt)
    else:
        log.warning("job %s attempt %s: torchrun exited with %s; the job is re-queued once its "
                    "lease expires", job_id, attempt, code)  # fmt: skip
    return "lost"


def _best_effort(call: Any, what: str) -> None:
    try:
        call()
    except Exception:
        log.warning("%s failed", what, exc_info=True)


def _peer_lost(exc: BaseException) -> bool:
    """Whether a collective failed because another rank went away."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    signs = ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer")
    return isinstance(exc, RuntimeError) and any(sign in text for sign in signs)


def _wait_holding_lease(
    ranks: subprocess.Popen[Any], store: JobStore, lease: Lease, lease_ms: int, every: float
) -> int:
    """Wait for torchrun while renewing the lease (rank 0 renews it too once it runs; before
    that, torchrun and the ranks' imports take longer than a lease). A lease found lost (a
    stale attempt) ends every rank at once."""
    import signal as signals

    while True:
        try:
            return ranks.wait(timeout=every)
        except subprocess.TimeoutExpired:
            pass
        try:
            ours = store.renew(lease, lease_ms, {}).ours
        except Exception:  # Redis away: keep the ranks; the fencing decides later
            log.warning("renewing the lease of job %s failed", lease.job_id, exc_info=True)
            continue
        if not ours:
            record = store.get(lease.job_id)
            if record is not None and record.attempt == lease.attempt and record.terminal:
                try:  # rank 0 finished the job: the ranks are on their way out
                    return ranks.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
            log.warning("job %s attempt %s lost its lease: stopping its ranks", lease.job_id,
                        lease.attempt)  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                os.killpg(ranks.pid, signals.SIGKILL)
            return ranks.wait()


def _run_started(
    store: JobStore, lease: Lease, lease_ms: int, settings: Settings, work: Path | None = None
) -> str:
    """The attempt after `begin`: train, then `finish` (fenced). `work`: the folder
    `_run_ranks` prepared (this is rank 0 of several)."""
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
        output_dir = artifacts.prepare(record) if work is None else artifacts.adopt(record, work)
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
        if work is not None and _peer_lost(exc):
            # another rank died (killed, its host gone): not this job's fault. Give the lease
            # up to expiry; the reaper re-queues the job, which resumes from its checkpoint.
            log.warning("job %s attempt %s: a rank was lost (%s)", job_id, attempt, exc)
            return "lost"
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
