"""Building an ensemble's folder for `POST /v1/ensembles` (in a worker thread: it copies every
member's model). torch is not imported until the first build."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import Invalid

__all__ = ["Member", "build_ensemble"]


@dataclass(frozen=True)
class Member:
    """A member job's model and how a 422 about it names it."""

    job_id: str
    folder: Path
    label: str  # e.g. "jobs[1] (job job_ab12)"
    loc: list[str | int]  # e.g. ["body", "jobs", 1]


def build_ensemble(target: Path, members: Sequence[Member]) -> dict[str, list[str]]:
    """Write the ensemble of `members` to `target` (`mtl.ensemble.export_ensemble`) and return
    its tasks (task -> labels). A member that does not fit (other tasks or labels, not a
    model) is an `Invalid` naming it; `target`'s parent folder is removed on any failure."""
    from mtl.ensemble import MemberError, export_ensemble, task_labels

    try:
        export_ensemble(target, [m.folder for m in members])
        meta = json.loads((target / "mtl.json").read_text(encoding="utf-8"))
        return task_labels(meta)
    except MemberError as exc:
        shutil.rmtree(target.parent, ignore_errors=True)
        member = members[exc.member]
        if exc.tasks_differ:
            message = f"{member.label} has other tasks than {members[0].label}: {exc.reason}"
        else:
            message = f"{member.label}: {exc.reason}"
        raise Invalid(message, member.loc) from None
    except BaseException:
        shutil.rmtree(target.parent, ignore_errors=True)
        raise
