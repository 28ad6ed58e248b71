"""The one Celery task: a thin adapter from a `(job_id, attempt)` message to `run_attempt`."""

from __future__ import annotations

from app.core.config import get_settings
from worker.celery_app import celery_app
from worker.queue import TASK_NAME
from worker.runner import run_attempt

__all__ = ["run_job"]


@celery_app.task(name=TASK_NAME, ignore_result=True, acks_late=False)
def run_job(job_id: str, attempt: int) -> str:
    return run_attempt(job_id, attempt, get_settings())
