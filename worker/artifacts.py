"""One attempt's files in the artifact store (`service.storage`): where it trains, what it
uploads, and how a re-queued attempt on another host finds the checkpoint to resume from.

In place (no ``MTL_STORAGE_URL``) an attempt trains straight into ``<data_dir>/jobs/<id>``, as
the API reads it: nothing is copied, the checkpointer's atomic renames are the whole story.

With a remote store an attempt trains in a fresh local work folder and

* after every checkpoint uploads it as the unit ``jobs/<id>/a<attempt>/checkpoints/step-N``
  (files, then the manifest), then points the job record at it: ``checkpoint`` (the last) and
  ``checkpoint_best`` (the best so far), written by the fenced lease-renewal script, so a stale
  attempt can upload into its own prefix but never move the pointers; then removes its own
  checkpoints that neither pointer names. TensorBoard files are uploaded alongside
  (``jobs/<id>/tensorboard``: event files are named per writer and only grow);
* at the start of a re-queued attempt, downloads the two units the pointers name (checked
  against their manifests) and resumes from them exactly as it would from local checkpoints;
* at the end uploads the exported model (``jobs/<id>/a<attempt>/model``) and its archives
  (``.../model.tar.gz`` and, with an ONNX export, ``.../model.onnx.tar.gz``: what the API
  streams), and `finish` records the prefix as the job's ``artifacts``; older attempts'
  checkpoints are then removed.

A crash mid-upload leaves a unit without a manifest that no pointer names: never resumed from.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from mtl.callbacks import Callback, TrainControl, TrainState
from mtl.checkpoint import Checkpointer, atomic_write_text
from mtl.errors import TrainingError
from service.records import JobRecord
from service.storage import Storage, StorageError, job_key, write_archives
from service.store import JobStore, Lease

__all__ = ["JobArtifacts"]

log = logging.getLogger(__name__)

#: how long an upload is retried (the store restarting, a network blip) before the job fails
UPLOAD_RETRY_S = 60.0

_retry = retry(
    retry=retry_if_exception_type(StorageError),
    stop=stop_after_delay(UPLOAD_RETRY_S),
    wait=wait_exponential(multiplier=0.5, max=10),
    reraise=True,
)


class JobArtifacts:
    """The files of one attempt of one job; see the module docs."""

    def __init__(self, storage: Storage, store: JobStore, lease: Lease, lease_ms: int) -> None:
        self.storage = storage
        self.store = store
        self.lease = lease
        self.lease_ms = lease_ms
        self.job_key = job_key(lease.job_id)
        self.prefix = self.job_key if storage.in_place else f"{self.job_key}/a{lease.attempt}"
        self.work: Path | None = None
        #: local checkpoint folder name -> its unit in the store
        self.units: dict[str, str] = {}

    # ------------------------------------------------------------------ before training
    def prepare(self, record: JobRecord | None) -> Path:
        """The folder to train in (with the checkpoints to resume from, fetched if remote)."""
        if self.storage.in_place:
            self.work = self.storage.local(self.job_key)
            self.work.mkdir(parents=True, exist_ok=True)
            return self.work
        job_id = self.lease.job_id
        root = self.storage.cache_dir / "work"
        if root.is_dir():  # an earlier attempt of this job on this host, killed: its leftovers
            for old in root.glob(f"{job_id}-a*"):
                shutil.rmtree(old, ignore_errors=True)
        self.work = self.storage.work_dir(f"{job_id}-a{self.lease.attempt}")
        if record is not None and record.checkpoint:
            ckpt_dir = self.work / "checkpoints"
            last = self._fetch(record.checkpoint, ckpt_dir)
            best = last
            if record.checkpoint_best and record.checkpoint_best != record.checkpoint:
                best = self._fetch(record.checkpoint_best, ckpt_dir)
            atomic_write_text(ckpt_dir / "last.json", json.dumps({"name": last}))
            if record.checkpoint_best:
                atomic_write_text(ckpt_dir / "best.json", json.dumps({"name": best}))
            log.info("job %s: resuming from %s", job_id, record.checkpoint)
        return self.work

    def adopt(self, record: JobRecord | None, work: Path) -> Path:
        """Use a folder another process prepared (rank 0 of a job on several devices)."""
        self.work = work
        if record is not None:
            for unit in (record.checkpoint, record.checkpoint_best):
                if unit:
                    self.units[unit.rsplit("/", 1)[-1]] = unit
        return work

    def _fetch(self, unit: str, ckpt_dir: Path) -> str:
        name = unit.rsplit("/", 1)[-1]
        if not name.startswith("step-"):
            raise TrainingError(f"the job's checkpoint pointer {unit!r} is not a checkpoint")
        try:
            _retry(self.storage.fetch_dir)(unit, ckpt_dir / name)
        except StorageError as exc:
            raise TrainingError(f"cannot fetch the checkpoint to resume from: {exc}") from exc
        self.units[name] = unit
        return name

    def callback(self) -> Callback | None:
        """Uploads checkpoints and TensorBoard files (remote stores only)."""
        return None if self.storage.in_place else _Uploader(self)

    # ------------------------------------------------------------------ during training
    def upload_checkpoint(self, path: Path, control: TrainControl) -> None:
        unit = f"{self.prefix}/checkpoints/{path.name}"
        try:
            _retry(self.storage.put_dir)(path, unit)
        except StorageError as exc:
            raise TrainingError(f"cannot upload checkpoint {path.name}: {exc}") from exc
        self.units[path.name] = unit
        best = Checkpointer(path.parent).best()
        fields = {"checkpoint": unit}
        if best is not None and best.name in self.units:
            fields["checkpoint_best"] = self.units[best.name]
        renewal = self.store.renew(self.lease, self.lease_ms, fields)
        if not renewal.ours:
            control.stop("superseded: another attempt owns the job")
            return
        keep = set(fields.values())
        for name in self.storage.children(f"{self.prefix}/checkpoints"):
            unit_name = f"{self.prefix}/checkpoints/{name}"
            if unit_name not in keep:
                self._quietly(self.storage.delete, unit_name)
        self.sync_tensorboard()

    def sync_tensorboard(self) -> None:
        if self.work is not None:
            self._quietly(
                self.storage.sync_tree, self.work / "tensorboard", f"{self.job_key}/tensorboard"
            )

    # ------------------------------------------------------------------ after training
    def publish(self, model_dir: Path) -> dict[str, Any]:
        """Archive and upload the exported model; the record fields that point at it."""
        archives = write_archives(model_dir)
        if not self.storage.in_place:
            try:
                for path in archives.values():
                    _retry(self.storage.put_file)(path, f"{self.prefix}/{path.name}")
                _retry(self.storage.put_dir)(model_dir, f"{self.prefix}/model")
            except StorageError as exc:
                raise TrainingError(f"cannot upload the model: {exc}") from exc
            self.sync_tensorboard()
        return {"artifacts": self.prefix}

    def cleanup(self, succeeded: bool) -> None:
        """Remove the local work folder; after a success, older attempts' checkpoints too."""
        if self.storage.in_place:
            return
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
        if succeeded:
            for name in self.storage.children(self.job_key):
                if name.startswith("a") and name != f"a{self.lease.attempt}":
                    self._quietly(self.storage.delete, f"{self.job_key}/{name}/checkpoints")

    @staticmethod
    def _quietly(call: Any, *args: Any) -> None:
        try:
            call(*args)
        except StorageError as exc:
            log.warning("%s", exc)


class _Uploader(Callback):
    def __init__(self, artifacts: JobArtifacts) -> None:
        self.artifacts = artifacts

    def on_checkpoint(self, state: TrainState, path: Path, control: TrainControl) -> None:
        self.artifacts.upload_checkpoint(path, control)
