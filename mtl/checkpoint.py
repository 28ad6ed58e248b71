"""Atomic checkpoints: a crash mid-save never leaves a checkpoint that resume would pick.

Layout of `<output_dir>/checkpoints/`::

    step-00000120/            one complete checkpoint (appears only by an atomic rename)
        model.safetensors     model weights
        strategy.safetensors  the weighting strategy's state (learned weights, loss history)
        optimizer.pt          optimizer state_dict   } plain tensors and numbers,
        scheduler.pt          scheduler state_dict   } loaded with weights_only=True
        extra.pt              RNG states, running training statistics
        <name>.safetensors    further tensors the run keeps (`average`: the weight average,
                              `mlm_head`: the auxiliary MLM head), when it has them
        trainer_state.json    TrainState (step, epoch, sampler position, best metric, ...)
        config.json           the TrainConfig of the run
    last.json                 {"name": "step-00000120"}, replaced atomically after each save
    best.json                 the checkpoint with the best monitored metric

Older checkpoints that neither pointer names are removed after each save.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mtl.callbacks import TrainState
from mtl.errors import TrainingError

__all__ = ["Checkpointer", "LoadedCheckpoint", "atomic_write_text", "rng_state", "set_rng_state"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if torch.is_tensor(v)}


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np_state[1].tolist(),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
        "python_version": int(random.getstate()[0]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", np.asarray(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0)
    )
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class LoadedCheckpoint:
    path: Path
    state: TrainState
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    extra: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]


def _disk_full(folder: Path) -> bool:
    """Less than a MiB left where `folder` lives (a write that failed there ran out of room)."""
    try:
        return shutil.disk_usage(folder).free < 1024 * 1024
    except OSError:
        return False


class Checkpointer:
    """Saves and finds checkpoints under one directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def _pointer(self, which: str) -> Path | None:
        try:
            name = json.loads((self.dir / f"{which}.json").read_text())["name"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        path = self.dir / str(name)
        return path if (path / "trainer_state.json").is_file() else None

    def latest(self) -> Path | None:
        """The last complete checkpoint (the pointer, else the highest complete step dir)."""
        pointed = self._pointer("last")
        if pointed is not None:
            return pointed
        if not self.dir.is_dir():
            return None
        complete = sorted(
            p for p in self.dir.glob("step-*") if (p / "trainer_state.json").is_file()
        )
        return complete[-1] if complete else None

    def best(self) -> Path | None:
        return self._pointer("best")

    def save(
        self,
        *,
        state: TrainState,
        model: nn.Module,
        strategy: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        extra: dict[str, Any],
        config_json: str,
        is_best: bool,
        tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{state.step:08d}"
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        try:
            self._write(
                tmp, state, model, strategy, optimizer, scheduler, extra, config_json, tensors or {}
            )
            final = self.dir / name
            if final.exists():  # the same step saved twice (eval and periodic save coincide)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            pointer = json.dumps({"name": name, "step": state.step})
            atomic_write_text(self.dir / "last.json", pointer)
            if is_best:
                atomic_write_text(self.dir / "best.json", pointer)
        except (OSError, RuntimeError, SafetensorError) as exc:
            # Disk full, quota, I/O error (safetensors and torch.save wrap ENOSPC in their own
            # errors): the previous checkpoint and the pointers stay as they were.
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if not isinstance(exc, OSError) and _disk_full(self.dir):
                # torch's zip writer may report a full disk as "unexpected pos 64 vs 0"
                reason = f"{os.strerror(errno.ENOSPC)} ({reason})"
            shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingError(f"cannot write checkpoint {name} in {self.dir}: {reason}") from exc
        self._prune()
        return final

    def _write(
        self,
        tmp: Path,
        state: TrainState,
        model: nn.Module,
        strategy: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        extra: dict[str, Any],
        config_json: str,
        tensors: dict[str, dict[str, torch.Tensor]],
    ) -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(_tensors(model.state_dict()), str(tmp / "model.safetensors"))
        save_file(_tensors(strategy.state_dict()), str(tmp / "strategy.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(extra, tmp / "extra.pt")
        for name, group in tensors.items():
            save_file(_tensors(group), str(tmp / f"{name}.safetensors"))
        (tmp / "config.json").write_text(config_json, encoding="utf-8")
        # trainer_state.json is written last: its presence marks a complete checkpoint.
        (tmp / "trainer_state.json").write_text(json.dumps(state.to_dict(), indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())

    def _prune(self) -> None:
        keep = {p.name for p in (self._pointer("last"), self._pointer("best")) if p is not None}
        for path in self.dir.iterdir():
            stale_tmp = path.name.startswith(".tmp-step-")
            if (path.name.startswith("step-") and path.name not in keep) or stale_tmp:
                shutil.rmtree(path, ignore_errors=True)

    def load(
        self,
        path: Path,
        *,
        model: nn.Module,
        strategy: nn.Module,
        map_location: torch.device,
    ) -> LoadedCheckpoint:
        model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(map_location)))
        strategy.load_state_dict(
            load_file(str(path / "strategy.safetensors"), device=str(map_location))
        )
        return LoadedCheckpoint(
            path=path,
            state=TrainState.from_dict(json.loads((path / "trainer_state.json").read_text())),
            optimizer=torch.load(
                path / "optimizer.pt", map_location=map_location, weights_only=True
            ),
            scheduler=torch.load(
                path / "scheduler.pt", map_location=map_location, weights_only=True
            ),
            extra=torch.load(path / "extra.pt", map_location="cpu", weights_only=True),
            tensors=self.load_tensors(path, map_location),
        )

    @staticmethod
    def load_tensors(path: Path, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
        """The further tensors a checkpoint keeps, by name (see the module docs)."""
        fixed = {"model", "strategy"}
        return {
            f.name.removesuffix(".safetensors"): load_file(str(f), device=str(device))
            for f in sorted(path.glob("*.safetensors"))
            if f.name.removesuffix(".safetensors") not in fixed
        }

    @staticmethod
    def load_weights(path: Path, model: nn.Module, device: torch.device) -> None:
        model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
