"""The Celery app factory and how a job attempt is put on the queue.

Celery is only the transport: a message is `(job_id, attempt)` as JSON; the job record in
Redis decides what happens (see `service.store`). The API imports this module to publish
messages without importing the task code.

Routing: a job goes to the queue of its priority and device count (`job_queue`); a worker
with D devices reads the queues of every count up to D, high priority first, then normal,
then low, and within a priority the largest jobs first (`worker_queues`; kombu's Redis
transport with ``queue_order_strategy="priority"`` BRPOPs its lists in that order). So a job
that needs N devices only reaches workers that have N, and a waiting high-priority job
starts before any normal one.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from celery import Celery

from service.keys import Keys
from service.records import PRIORITIES, Priority
from service.settings import Settings

__all__ = [
    "PRIORITIES",
    "TASK_NAME",
    "Priority",
    "device_refusal",
    "enqueue",
    "job_queue",
    "make_celery",
    "message_attempt",
    "queued_reason",
    "routing",
    "worker_queues",
]

TASK_NAME = "mtl.run_job"


def job_queue(base: str, devices: int = 1, priority: str = "normal") -> str:
    """The Celery queue of a job: `base` itself for one device at normal priority (what
    every job used before routing existed), else `base.d{N}` and/or `base.{priority}`."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, not {priority!r}")
    name = base if devices == 1 else f"{base}.d{devices}"
    return name if priority == "normal" else f"{name}.{priority}"


def routing(settings: Settings, devices: int, priority: str = "normal") -> dict[str, Any]:
    """The routing fields of a new job (`service.store.NewJob`): its devices, priority,
    queue and the owner's device limit."""
    return {
        "devices": devices,
        "priority": priority,
        "queue": job_queue(settings.queue_name, devices, priority),
        "max_devices": settings.max_devices_per_key,
    }


def device_refusal(devices: int, workers: dict[str, int], max_per_key: int) -> str | None:
    """Why a job needing `devices` can never run here (None: it can). `workers`: the live
    workers' declared devices. With no live worker nothing is known, so nothing is refused
    (the job waits, its `queued_reason` says why)."""
    if max_per_key and devices > max_per_key:
        return (
            f"the job needs {devices} devices, over this service's limit of {max_per_key} "
            "devices per API key (MTL_MAX_DEVICES_PER_KEY)"
        )
    largest = max(workers.values(), default=0)
    if workers and devices > largest:
        return (
            f"the job needs {devices} devices but no worker has that many: the largest of the "
            f"{len(workers)} live workers has {largest}; lower `devices` or add a worker with "
            f"{devices} (MTL_WORKER_DEVICES)"
        )
    return None


def queued_reason(
    devices: int, held: bool, position: int | None, workers: dict[str, int], max_per_key: int
) -> str:
    """Why a queued job has not started yet, for people (the job's `queued_reason`)."""
    if held:
        return (
            f"held: this API key's other jobs hold its limit of {max_per_key} devices "
            "(MTL_MAX_DEVICES_PER_KEY); it is sent to the workers when enough of them end"
        )
    unit = "device" if devices == 1 else "devices"
    if not workers:
        return f"no worker is running: it starts when one with at least {devices} {unit} does"
    fit = sum(1 for n in workers.values() if n >= devices)
    if not fit:
        return (
            f"no live worker has {devices} {unit} (the largest has {max(workers.values())}): "
            "it starts when one that has joins"
        )
    ahead = f"; {position - 1} queued before it" if position and position > 1 else ""
    return f"waiting for a free worker with at least {devices} {unit} ({fit} live){ahead}"


def worker_queues(base: str, devices: int) -> list[str]:
    """The queues a worker with `devices` devices reads, in the order it takes from them."""
    return [job_queue(base, n, p) for p in PRIORITIES for n in range(devices, 0, -1)]


def make_celery(settings: Settings) -> Celery:
    app = Celery("mtl", broker=settings.require_redis_url(), set_as_current=False)
    app.conf.update(
        # JSON only: a message is (job_id, attempt), nothing that needs pickle.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Early acknowledgement: the message is gone once the task starts. A lost worker is
        # detected through the job's lease instead (redelivery after visibility_timeout
        # would run a long job twice).
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        # No prefetch at all (Celery >= 5.6, Redis broker): with early acks and a multiplier
        # of 1 a busy worker still reserves the *next* message while its job trains; if that
        # worker is then killed, the reserved message sits in kombu's `unacked` hash until
        # `visibility_timeout` and the job behind it stays queued for an hour. Now a worker
        # takes a message only when its process slot is free.
        worker_disable_prefetch=True,
        worker_max_tasks_per_child=1,  # a fresh child process (and GPU memory) per job
        worker_concurrency=1,
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=settings.queue_name,
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "global_keyprefix": Keys(settings.key_prefix).broker_prefix,
            # Only a reserved-but-not-started message can be unacknowledged; redelivering it
            # is harmless (the attempt is fenced), so recover it reasonably soon.
            "visibility_timeout": 3600,
            # read a worker's queues in the order given (`worker_queues`), not round-robin
            "queue_order_strategy": "priority",
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
        task_always_eager=False,
    )
    return app


def enqueue(
    celery: Celery, settings: Settings, job_id: str, attempt: int, queue: str | None = None
) -> Any:
    """Publish one attempt of a job (sync; the API calls it in a worker thread) on `queue`
    (the job record's `queue`; default: the base queue)."""
    return celery.send_task(
        TASK_NAME,
        args=[job_id, attempt],
        queue=queue or settings.queue_name,
        ignore_result=True,
    )


def message_attempt(raw: str) -> tuple[str, int] | None:
    """`(job_id, attempt)` of one message as kombu's Redis transport stores it: a JSON
    envelope in the queue list, or `[envelope, exchange, routing_key]` in the unacked hash.
    None for anything else (another task, a message this version cannot read)."""
    try:
        item = json.loads(raw)
        envelope = item[0] if isinstance(item, list) else item
        if envelope.get("headers", {}).get("task") != TASK_NAME:
            return None
        body: Any = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]  # task protocol 2: [args, kwargs, embed]
        job_id, attempt = args
        return str(job_id), int(attempt)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
