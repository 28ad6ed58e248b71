"""The one Celery task: a thin adapter from a `(job_id, attempt)` message to `run_attempt`."""

from __future__ import annotations

from service.queue import TASK_NAME
from service.settings import get_settings
from worker.celery_app import celery_app
from worker.runner import run_attempt

__all__ = ["run_job"]


@celery_app.task(name=TASK_NAME, ignore_result=True, acks_late=False)
def run_job(job_id: str, attempt: int) -> str:
    return run_attempt(job_id, attempt, get_settings())
