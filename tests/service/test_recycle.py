"""The worker's prefork pool is maintained on a short timer (worker/recycle.py): a training
process whose exit the pool's sentinel missed is replaced within `POLL_S`, not 5 s later."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

from worker.recycle import POLL_S, PromptRecycle


class Hub:
    def __init__(self) -> None:
        self.timers: list[tuple[float, Any]] = []

    def call_repeatedly(self, interval: float, fun: Any) -> None:
        self.timers.append((interval, fun))


def test_the_worker_blueprint_maintains_the_pool_on_a_short_timer() -> None:
    probe = (
        "from worker.celery_app import celery_app as a; "
        "print(sorted(s.__name__ for s in a.steps['worker']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60,
        env={**os.environ, "MTL_REDIS_URL": "redis://127.0.0.1:1/0"},
    ).stdout  # fmt: skip
    assert "PromptRecycle" in out
    calls: list[int] = []
    worker = SimpleNamespace(pool=SimpleNamespace(_pool=None))
    hub = Hub()
    PromptRecycle(worker).register_with_event_loop(worker, hub)
    [(interval, tick)] = hub.timers
    assert interval == POLL_S <= 0.1
    tick()  # before the pool has started: nothing to maintain, no error
    worker.pool._pool = SimpleNamespace(maintain_pool=lambda: calls.append(1))
    tick()
    tick()
    assert calls == [1, 1]
