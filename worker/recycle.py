"""The prefork pool replaces a finished training process at once, not up to 5 s later.

Every job runs in a fresh pool process (`worker_max_tasks_per_child=1`), so between one job's
end and the next job's start the pool must reap the old process and fork a new one. Celery's
pool notices the exit from the process's sentinel pipe, but the pipe closes while the kernel
is still tearing the process down: the pool's non-blocking `waitpid` can find it not yet a
zombie, consider it alive, and only its 5 s maintenance timer replaces it (measured here:
1 to 3.7 s handovers, at random). This step adds the same maintenance call on a short timer
in the worker's event loop, so a missed exit is caught within `POLL_S`. With nothing to
replace the call is one `waitpid(WNOHANG)` per pool process.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

__all__ = ["POLL_S", "PromptRecycle"]

POLL_S = 0.05


class PromptRecycle(bootsteps.StartStopStep):
    """A worker bootstep: `hub.call_repeatedly(POLL_S, pool.maintain_pool)`."""

    requires = ("celery.worker.components:Pool",)

    def register_with_event_loop(self, worker: Any, hub: Any) -> None:
        def maintain() -> None:
            pool = getattr(worker.pool, "_pool", None)  # billiard's AsynPool once started
            if pool is not None and hasattr(pool, "maintain_pool"):
                pool.maintain_pool()

        hub.call_repeatedly(POLL_S, maintain)
