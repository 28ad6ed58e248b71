"""Training on several devices: the torchrun launcher and the helpers each process uses.

A job with `devices: N > 1` runs as N processes started by torchrun (`launch`), one device
each (`cuda:LOCAL_RANK` with NCCL, or the CPU with gloo). Every process runs the same training
entry; `mtl.trainer.Trainer` sees WORLD_SIZE in its environment and trains as one rank:

- **batches**: the epoch's batches are planned exactly as in one process, with a batch of
  `batch_size * N` (length grouping included, a function of `(seed, epoch)` only); rank `r`
  takes the `r`-th contiguous slice of each of these global batches (`shard`). The resume
  position (`TrainState.batch_in_epoch`) counts global batches.
- **gradients**: the model is wrapped in `DistributedDataParallel`; each rank scales its task
  losses so that the averaged gradient equals the gradient of the whole global batch's loss.
- **reporting**: rank 0 alone runs the callbacks, evaluates, writes checkpoints and exports; the
  per-step losses and accuracies it reports are the global ones (`gather_rows`).
- **stopping**: `sync_stop` all-reduces the stop flag once per optimizer step (and after each
  evaluation), so a cancel, a lost lease, early stopping or a non-finite loss stops every rank
  at the same step.

`launch(entry_module, args, nproc)` starts `python -m torch.distributed.run --standalone
--nproc-per-node N -m ENTRY_MODULE ARGS...` as a subprocess and touches no accelerator in the
calling process; the CLI's `mtl train --devices N` uses it with `mtl.cli`, and any other
process can use it with its own entry module.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mtl.callbacks import TrainControl
from mtl.errors import TrainingError

__all__ = [
    "COLLECTIVE_TIMEOUT",
    "RESULT_FILE_ENV",
    "Distributed",
    "all_reduce_cosines",
    "average_grads",
    "gather_rows",
    "interrupt",
    "launch",
    "reseed",
    "setup",
    "shard",
    "shard_width",
    "sync_stop",
    "teardown",
    "torchrun_command",
    "world_size_from_env",
    "wrap",
]

#: How long a rank waits in a collective: rank 0 evaluates and checkpoints while the others
#: wait at the next step's stop-flag all-reduce. A rank that dies is noticed by torchrun,
#: which ends the others, long before this.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)

#: The launcher asks rank 0 to write a JSON summary of the run (outcome, step, stop reason,
#: model folder) to the file this variable names; see `mtl.cli`.
RESULT_FILE_ENV = "MTL_RESULT_FILE"


# ----------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class Distributed:
    """This process's place in the group."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool  # initialised here, so `teardown` destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it; 1 outside torchrun."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def setup(devices: int, requested_device: str = "auto") -> Distributed | None:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK and the
    rendezvous variables) when this is one rank of several; None in a single process.

    `devices` is the config's: it must equal WORLD_SIZE. The device is `cuda:LOCAL_RANK`
    (NCCL) when CUDA is requested or available (`auto`), else the CPU (gloo). A group the
    caller already initialised is used as it is (and not destroyed by `teardown`).
    """
    world = world_size_from_env()
    if world == 1 and devices == 1:
        return None
    if world == 1:
        raise TrainingError(
            f"devices: {devices} trains in {devices} processes started by torchrun: run "
            f"`mtl train CONFIG` (it launches them), or start this entry with "
            f"mtl.distributed.launch(..., nproc={devices})"
        )
    if world != devices:
        raise TrainingError(
            f"devices is {devices} in the config but this process is one of {world} "
            "(WORLD_SIZE): they must agree"
        )
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    use_cuda = requested_device == "cuda" or (
        requested_device == "auto" and torch.cuda.is_available()
    )
    if use_cuda:
        if not torch.cuda.is_available():
            raise TrainingError("device 'cuda' was requested but CUDA is not available")
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(
                f"devices: {devices} needs {devices} GPUs on this machine; "
                f"{torch.cuda.device_count()} are visible"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise TrainingError(
            f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not "
            f"match the environment (RANK {rank}, WORLD_SIZE {world})"
        )
    return Distributed(rank, world, local_rank, device, owns)


def teardown(ctx: Distributed | None) -> None:
    """Leave the group `setup` joined (a caller-owned group stays)."""
    if ctx is not None and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(
    module: nn.Module, ctx: Distributed, *, find_unused_parameters: bool
) -> DistributedDataParallel:
    """`module` in DistributedDataParallel. Buffers are not synced at each forward (the
    encoders here have only constant ones: position and token-type ids)."""
    return DistributedDataParallel(
        module,
        device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        forward_sync_buffers=False,
        find_unused_parameters=find_unused_parameters,
    )


# ----------------------------------------------------------------------------------- batches


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank `rank`'s share of one global batch: the `rank`-th of `world` contiguous slices,
    sizes differing by at most one (the first ranks take the extra rows). Empty when the batch
    has fewer rows than there are ranks. Contiguous slices of a length-sorted batch keep each
    rank's padding as small as it can be; the slowest rank pads no more than one process would.
    """
    n = len(indices)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    size = base + (1 if rank < extra else 0)
    return list(indices[start : start + size])


def shard_width(rows: int, world: int) -> int:
    """The largest share of a global batch of `rows` (what `gather_rows` pads to)."""
    return math.ceil(rows / world)


def reseed(seed: int, rank: int, step: int) -> None:
    """Seed the global RNG (dropout) from `(seed, rank, step)` before each optimizer step: every
    rank draws its own masks, and a resumed run draws the same ones as an uninterrupted run
    without keeping every rank's RNG state in the checkpoint."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{step}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


# ------------------------------------------------------------------------------- collectives


def gather_rows(vector: Tensor) -> Tensor:
    """Every rank's `vector` (1-d, the same length everywhere), as `[world, len]`."""
    world = dist.get_world_size()
    out = vector.new_empty(world * vector.numel())
    dist.all_gather_single(out, vector.contiguous())
    return out.view(world, -1)


def average_grads(params: Sequence[nn.Parameter]) -> None:
    """Average the gradients of parameters that DistributedDataParallel does not hold (the
    weighting strategy's, e.g. uncertainty's log-variances) over the ranks, in one all-reduce.
    A parameter without a gradient on this rank counts as a zero gradient."""
    if not params:
        return
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
    )
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def all_reduce_cosines(grads: Mapping[str, Tensor]) -> dict[str, float]:
    """The cosine between each pair of task gradients on the whole global batch, from each
    rank's rows of them: dot products and squared norms summed over the ranks."""
    names = list(grads)
    flat = {t: g.flatten().float() for t, g in grads.items()}
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    parts = [torch.dot(flat[a], flat[b]) for a, b in pairs]
    parts += [torch.dot(flat[t], flat[t]) for t in names]
    if not parts:
        return {}
    sums = torch.stack(parts).double()
    dist.all_reduce(sums)
    values = sums.tolist()
    norms = dict(zip(names, values[len(pairs) :], strict=True))
    eps = 1e-12
    return {
        f"{a}|{b}": dot / max(math.sqrt(norms[a]) * math.sqrt(norms[b]), eps)
        for (a, b), dot in zip(pairs, values, strict=False)
    }


def sync_stop(control: TrainControl, device: torch.device) -> None:
    """Make a stop request on any rank a stop request on every rank (one all-reduce of a
    flag; the reason is gathered only when some rank stops, rank 0's first)."""
    flag = torch.tensor([1.0 if control.should_stop else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if float(flag) == 0.0:
        return
    reasons: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, control.stop_reason if control.should_stop else None)
    reason = next((r for r in reasons if r), "stopped on another rank")
    control.should_stop = True
    control.stop_reason = reason


# ---------------------------------------------------------------------------------- launcher


def torchrun_command(entry_module: str, args: Sequence[str], nproc: int) -> list[str]:
    """The command line that runs `python -m ENTRY_MODULE ARGS...` in `nproc` processes on
    this machine (torchrun's standalone rendezvous: a free local port, no other set-up)."""
    if nproc < 1:
        raise ValueError("nproc must be >= 1")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        entry_module,
        *args,
    ]


def launch(
    entry_module: str,
    args: Sequence[str],
    nproc: int,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    new_session: bool = True,
    **popen_kwargs: Any,
) -> subprocess.Popen[Any]:
    """Start `entry_module` with `args` in `nproc` processes under torchrun; returns torchrun's
    process (its exit status is 0 when every rank exited 0).

    `env` is added to this process's environment. OMP_NUM_THREADS defaults to this machine's
    cores divided among the processes. With `new_session` torchrun leads its own process group,
    so a terminal's Ctrl-C reaches only the caller, which forwards it once (`interrupt`):
    torchrun passes SIGINT on to every rank, and each stops at the same step. Nothing here
    touches CUDA.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.Popen(
        torchrun_command(entry_module, args, nproc),
        env=full_env,
        cwd=None if cwd is None else str(cwd),
        start_new_session=new_session,
        **popen_kwargs,
    )


def interrupt(proc: subprocess.Popen[Any]) -> None:
    """Ask a launched run to stop after its current step (SIGINT to torchrun, which forwards it
    to every rank and waits up to 30 s for them before killing them)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
