"""The Celery app the worker runs: ``celery -A worker.celery_app worker -c 1 --pool prefork``.

Settings come from the environment (`MTL_REDIS_URL`, `MTL_DATA_DIR`, ...). The main process
runs the reaper/heartbeat thread (`worker.reaper.Maintenance`); each job runs in a fresh
child process (`worker_max_tasks_per_child=1`).
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import socket
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown
from kombu import Queue

from service.queue import make_celery, worker_queues
from service.settings import get_settings
from worker.recycle import PromptRecycle

__all__ = ["celery_app"]

log = logging.getLogger(__name__)

settings = get_settings()
celery_app = make_celery(settings)
celery_app.conf.include = ["worker.tasks"]
#: the devices this worker declares: it reads the queues of jobs that need at most this many,
#: high priority first (service/queue.py); no `-Q` on the command line overrides it
DEVICES = settings.local_devices()
celery_app.conf.task_queues = [Queue(name) for name in worker_queues(settings.queue_name, DEVICES)]
celery_app.steps["worker"].add(PromptRecycle)

_maintenance: Any = None
_studies: Any = None


@worker_init.connect
def _private_files(**_: object) -> None:
    """Before the pool forks: every training process inherits the umask."""
    settings.private_files()


PRELOAD = (
    "transformers.models.bert.modeling_bert",
    "onnx",
    "onnxruntime",
    "onnxruntime.quantization",
    "mtl.onnx",
)


@worker_init.connect
def _preload(**_: object) -> None:
    """Import torch and the trainer once in the parent: forked children start fast.
    Nothing here touches CUDA (that happens in the child)."""
    if not settings.preload_torch:
        return
    try:
        importlib.import_module("mtl.trainer")
    except Exception:  # the child will report the real error on its job
        log.warning("could not preload mtl.trainer", exc_info=True)
    # transformers imports a model's code on first use (BERT's pulls in torch._dynamo and
    # torch.distributed.tensor: seconds), and every job ends with the ONNX export: without
    # these each fresh child would import them again
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            log.info("not preloaded: %s", name)
    _freeze_heap()


def _freeze_heap() -> None:
    """Move every object the parent holds so far into the collector's permanent generation.

    Celery's prefork pool runs a full `gc.collect()` before it forks each replacement child
    (celery/concurrency/asynpool.py, `_create_worker_process`); with torch and transformers
    imported that walk takes ~0.2 s on an idle core and over 1 s on a loaded one, and with
    `max_tasks_per_child=1` it sits between one job's end and the next job's start. Frozen
    objects are skipped by the collector (and their pages stay shared with the children), so
    the walk only covers what was made since. See docs/studies.md, "scheduling overhead"."""
    gc.freeze()


@worker_process_init.connect
def _forget_previous_attempt(**_: object) -> None:
    """A new pool process may reuse the pid of one that died without clearing its attempt
    record (see `worker.reaper.end_stale_processes`): clear it before anyone reads it."""
    from worker.runner import make_store, sync_redis

    try:
        make_store(settings, sync_redis(settings)).clear_process_attempt(
            socket.gethostname(), os.getpid()
        )
    except Exception:
        log.warning("could not clear this process's attempt record", exc_info=True)


@worker_ready.connect
def _start_maintenance(**_: object) -> None:
    """The reaper/heartbeat thread and the study driver, in the worker's main process."""
    global _maintenance, _studies
    from service.keys import Keys
    from service.queue import enqueue
    from service.studies.store import StudyStore
    from worker.reaper import Maintenance
    from worker.runner import make_store, sync_redis
    from worker.studies import StudyDriver

    name = f"{socket.gethostname()}:{os.getpid()}"
    store = make_store(settings, sync_redis(settings))
    _maintenance = Maintenance(settings, store, celery_app, name, DEVICES)
    _maintenance.start()
    client = sync_redis(settings)
    _studies = StudyDriver(
        settings,
        make_store(settings, client),
        StudyStore(client, Keys(settings.key_prefix), maxlen=settings.stream_maxlen,
                   ttl_s=settings.stream_ttl_s),
        lambda job_id, attempt, queue: enqueue(celery_app, settings, job_id, attempt, queue),
        poll_s=settings.study_poll_s,
    )  # fmt: skip
    _studies.start()
    _freeze_heap()


@worker_shutdown.connect
def _stop_maintenance(**_: object) -> None:
    for thread in (_maintenance, _studies):
        if thread is not None:
            thread.stop()
