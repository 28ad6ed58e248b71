"""The Celery app factory and how a job attempt is put on the queue.

Celery is only the transport: a message is `(job_id, attempt)` as JSON; the job record in
Redis decides what happens (see `service.store`). The API imports this module to publish
messages without importing the task code.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from celery import Celery

from service.keys import Keys
from service.settings import Settings

__all__ = ["TASK_NAME", "enqueue", "make_celery", "message_attempt"]

TASK_NAME = "mtl.run_job"


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
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
        task_always_eager=False,
    )
    return app


def enqueue(celery: Celery, settings: Settings, job_id: str, attempt: int) -> Any:
    """Publish one attempt of a job (sync; the API calls it in a worker thread)."""
    return celery.send_task(
        TASK_NAME,
        args=[job_id, attempt],
        queue=settings.queue_name,
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
