"""Building an ensemble for `POST /v1/ensembles` (in a worker thread: it copies every member's
model). torch is not imported until the first build.

The ensemble lies in the artifact store like a job's model: ``ensembles/<id>/model/`` and
``ensembles/<id>/model.tar.gz`` (in place: under the data directory, built there; with a remote
store: built in a local work folder from the members' staged copies, then uploaded).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from app.core.errors import Invalid
from service.storage import Storage, StorageError, ensemble_key, write_archives

__all__ = ["Member", "build_ensemble"]


@dataclass(frozen=True)
class Member:
    """A member job's model (its store prefix) and how a 422 about it names it."""

    job_id: str
    prefix: str
    label: str  # e.g. "jobs[1] (job job_ab12)"
    loc: list[str | int]  # e.g. ["body", "jobs", 1]


def build_ensemble(
    storage: Storage, ensemble_id: str, members: Sequence[Member]
) -> dict[str, list[str]]:
    """Write the ensemble of `members` (`mtl.ensemble.export_ensemble`) with its archive to the
    store and return its tasks (task -> labels). A member that does not fit (other tasks or
    labels, not a model) is an `Invalid` naming it; nothing is left behind on any failure."""
    from mtl.ensemble import MemberError, export_ensemble, task_labels

    key = ensemble_key(ensemble_id)
    root = storage.local(key) if storage.in_place else storage.work_dir(f"ensemble-{ensemble_id}")
    target = root / "model"
    try:
        folders = []
        for member in members:
            try:
                folders.append(storage.stage_dir(f"{member.prefix}/model"))
            except StorageError:
                if not storage.in_place:
                    raise
                raise Invalid(f"{member.label} has no exported model", member.loc) from None
        export_ensemble(target, folders)
        meta = json.loads((target / "mtl.json").read_text(encoding="utf-8"))
        archives = write_archives(target)
        if not storage.in_place:
            for path in archives.values():
                storage.put_file(path, f"{key}/{path.name}")
            storage.put_dir(target, f"{key}/model")
        return task_labels(meta)
    except MemberError as exc:
        _remove(storage, key)
        member = members[exc.member]
        if exc.tasks_differ:
            message = f"{member.label} has other tasks than {members[0].label}: {exc.reason}"
        else:
            message = f"{member.label}: {exc.reason}"
        raise Invalid(message, member.loc) from None
    except BaseException:
        _remove(storage, key)
        raise
    finally:
        if not storage.in_place:
            shutil.rmtree(root, ignore_errors=True)


def _remove(storage: Storage, key: str) -> None:
    with contextlib.suppress(StorageError):
        storage.delete(key)
