"""The entry of each process of a job on several devices (`python -m worker.ranks`, started by
torchrun from `worker.runner._run_ranks`; see `mtl.distributed`).

Rank 0 runs the attempt exactly as a one-device job does (`worker.runner._run_started`): it
reports progress and reads the cancel flag through its lease, uploads checkpoints and the
model, and calls the fenced `finish`. The other ranks train only (the trainer gives them no
callbacks; the stop flag reaches them through the per-step all-reduce). Every rank dies with
torchrun (PR_SET_PDEATHSIG), which dies with the worker's child process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings
    from service.store import JobStore, Lease

log = logging.getLogger("worker.ranks")


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # torchrun is already gone
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank %(process)d %(message)s")
    from service.settings import Settings
    from service.store import Lease
    from worker.runner import ENV_ATTEMPT, ENV_JOB, ENV_TOKEN, ENV_WORK, make_store, sync_redis

    settings = Settings()
    settings.private_files()
    store = make_store(settings, sync_redis(settings))
    lease = Lease(os.environ[ENV_JOB], int(os.environ[ENV_ATTEMPT]), os.environ[ENV_TOKEN])
    work = Path(os.environ[ENV_WORK])
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        from worker.runner import _run_started

        outcome = _run_started(store, lease, int(settings.lease_ttl_s * 1000), settings, work=work)
        log.info("job %s attempt %s: %s", lease.job_id, lease.attempt, outcome)
        return 0
    return _follow(store, lease, settings, work)


def _follow(store: JobStore, lease: Lease, settings: Settings, work: Path) -> int:
    """A rank other than 0: train, report nothing. Its errors are rank 0's too (same config,
    same data), which fails the job with the reason: exit 0 then, so torchrun does not tear
    rank 0 down before it can say why."""
    from mtl.callbacks import TrainControl
    from mtl.config import TrainConfig
    from mtl.errors import MTLError
    from mtl.trainer import train
    from service.datasets import resolver
    from service.storage import Storage

    raw = store.load_config(lease.job_id)
    config = TrainConfig.model_validate_json(raw or "")
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    try:
        train(
            config,
            work,
            callbacks=[],
            control=TrainControl(),
            resolve=resolver(Storage.from_settings(settings)),
            resume=True,
        )
    except MTLError as exc:
        log.warning("rank %s: %s (rank 0 reports it)", os.environ.get("RANK"), exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
