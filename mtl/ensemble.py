"""Seed ensembles: several exported models of the same tasks as one model whose prediction is the
(weighted) mean of their probabilities.

ensemble/
    members/<i>/    a copy of each member's exported model folder (see `mtl.export`)
    mtl.json        "kind": "ensemble"; `members` ([{"path": "members/<i>", "weight": w}], the
                    weights sum to 1); `tasks` and `task_order` (member 0's entries: names,
                    labels and dependencies, in config order), `max_length` (member 0's),
                    `has_tokenizer` (every member has one)

`Predictor.load` on such a folder returns an `EnsemblePredictor`, whose `predict` has the same
output as `Predictor.predict`. Members must have the same task names and, per task, the same
label names in the same order; an ensemble is never a member of another one.

ONNX: each member folder keeps its own ONNX export (`mtl.onnx`; `mtl export ENSEMBLE --onnx`
adds one to every member), and `mtl.ort_predict.load_predictor` runs the ensemble on ONNX
Runtime when every member has one (`EnsemblePredictor.load(..., load_member=...)`), on PyTorch
otherwise. This module imports torch only when a member is loaded with `Predictor`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from mtl.errors import ModelError
from mtl.layout import MTL_FILE

__all__ = [
    "ENSEMBLE_KIND",
    "EnsemblePredictor",
    "MemberError",
    "MemberPredictor",
    "differences",
    "export_ensemble",
    "task_labels",
]

ENSEMBLE_KIND = "ensemble"
FORMAT_VERSION = 1
MIN_MEMBERS = 2


class MemberPredictor(Protocol):
    """What an ensemble needs of a member: `mtl.predict.Predictor` or
    `mtl.ort_predict.OrtPredictor`."""

    labels: dict[str, list[str]]

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]: ...


class MemberError(ModelError):
    """A member that cannot join the ensemble: `member` is its index, `reason` says why without
    naming paths (the service words it with job ids), `tasks_differ` whether it is that its
    tasks or labels differ from member 0's (then `reason` says which task differs and how)."""

    def __init__(self, member: int, path: Path, reason: str, *, tasks_differ: bool = False):
        self.member = member
        self.path = path
        self.reason = reason
        self.tasks_differ = tasks_differ
        what = f"its tasks differ from member 0's: {reason}" if tasks_differ else reason
        super().__init__(f"member {member} ({path}): {what}")


def _read_meta(folder: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((folder / MTL_FILE).read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or not isinstance(meta.get("tasks"), list):
        raise ValueError(f"{MTL_FILE} has no task list")
    return meta


def task_labels(meta: dict[str, Any]) -> dict[str, list[str]]:
    """Task name -> label names, in config order, from an mtl.json."""
    return {t["name"]: list(t["labels"]) for t in meta["tasks"]}


def differences(first: dict[str, list[str]], other: dict[str, list[str]]) -> str | None:
    """How `other`'s tasks and labels differ from `first`'s (None: they do not). The same task
    names (in any order) and, per task, the same label names in the same order."""
    for name in first:
        if name not in other:
            return f"it has no task {name!r}"
    for name in other:
        if name not in first:
            return f"it has a task {name!r} more (the tasks are {', '.join(first)})"
    for name, labels in first.items():
        if other[name] != labels:
            return f"task {name!r} has the labels {other[name]}, not {labels}"
    return None


def _weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ModelError(f"{len(weights)} weights for {count} members: give one per member")
    for i, w in enumerate(weights):
        if not math.isfinite(w) or w <= 0:
            raise ModelError(f"weight {i} is {w}: weights must be finite and positive")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def export_ensemble(
    directory: Path, member_dirs: Sequence[Path], weights: Sequence[float] | None = None
) -> Path:
    """Write the ensemble of the exported models in `member_dirs` to `directory`, atomically
    (temp dir, then rename), and return it. `weights` (one per member, positive) default to
    equal; they are stored normalised to sum 1. Raises `MemberError` for a member that is not
    an exported model, is an ensemble itself, or whose tasks or labels differ from member 0's,
    and `ModelError` for fewer than 2 members, bad weights or an output folder that must not be
    replaced (a member, or a folder that is not an exported model)."""
    directory = Path(directory)
    members = [Path(m) for m in member_dirs]
    if len(members) < MIN_MEMBERS:
        raise ModelError(f"an ensemble needs at least {MIN_MEMBERS} members, got {len(members)}")
    normalised = _weights(weights, len(members))
    metas = []
    for i, folder in enumerate(members):
        try:
            meta = _read_meta(folder)
        except (OSError, ValueError) as exc:
            raise MemberError(i, folder, f"not an exported mtl model ({exc})") from None
        if meta.get("kind") == ENSEMBLE_KIND:
            raise MemberError(i, folder, "it is an ensemble itself (ensembles do not nest)")
        metas.append(meta)
    try:
        first = task_labels(metas[0])
    except (KeyError, TypeError) as exc:
        raise MemberError(0, members[0], f"not an exported mtl model ({exc!r})") from None
    for i, meta in enumerate(metas[1:], start=1):
        try:
            labels = task_labels(meta)
        except (KeyError, TypeError) as exc:
            raise MemberError(i, members[i], f"not an exported mtl model ({exc!r})") from None
        why = differences(first, labels)
        if why is not None:
            raise MemberError(i, members[i], why, tasks_differ=True)
    target = directory.resolve()
    for i, folder in enumerate(members):
        source = folder.resolve()
        if target == source or target in source.parents or source in target.parents:
            raise ModelError(f"the output folder {directory} overlaps member {i} ({folder})")
    if directory.exists() and (
        not directory.is_dir()
        or (any(directory.iterdir()) and not (directory / MTL_FILE).is_file())
    ):
        raise ModelError(f"{directory} exists and is not an exported mtl model: not replaced")

    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        entries = []
        for i, (folder, weight) in enumerate(zip(members, normalised, strict=True)):
            rel = f"members/{i}"
            shutil.copytree(folder, tmp / rel)
            entries.append({"path": rel, "weight": weight})
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": ENSEMBLE_KIND,
            "members": entries,
            "max_length": metas[0]["max_length"],
            "has_tokenizer": all(bool(m.get("has_tokenizer")) for m in metas),
            **({"task_order": metas[0]["task_order"]} if "task_order" in metas[0] else {}),
            "tasks": metas[0]["tasks"],
        }
        (tmp / MTL_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


class EnsemblePredictor:
    """The predictor of an ensemble folder: `predict` has `Predictor.predict`'s output, each
    probability the weighted mean of the members' (the label: the most probable one)."""

    def __init__(
        self, members: Sequence[MemberPredictor], weights: list[float], meta: dict[str, Any]
    ) -> None:
        self.members = list(members)
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.meta = meta
        self.labels = task_labels(meta)
        self.max_length = int(meta["max_length"])

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        device: str = "cpu",
        load_member: Callable[[Path], MemberPredictor] | None = None,
    ) -> EnsemblePredictor:
        """`load_member(folder)` loads each member (default: `Predictor.load` on `device`)."""
        model_dir = Path(model_dir)
        try:
            meta = _read_meta(model_dir)
            entries = meta["members"]
            paths = [str(e["path"]) for e in entries]
            weights = _weights([float(e["weight"]) for e in entries], len(entries))
            expected = task_labels(meta)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ModelError(f"{model_dir}: not an exported mtl ensemble ({exc!r})") from None
        if meta.get("kind") != ENSEMBLE_KIND:
            raise ModelError(f"{model_dir}: not an ensemble (see Predictor.load)")
        if len(paths) < MIN_MEMBERS:
            raise ModelError(f"{model_dir}: an ensemble needs at least {MIN_MEMBERS} members")
        root = model_dir.resolve()
        members = []
        for i, rel in enumerate(paths):
            folder = (model_dir / rel).resolve()
            if Path(rel).is_absolute() or root not in folder.parents:
                raise ModelError(f"{model_dir}: member {i} ({rel}) is outside the ensemble")
            try:
                kind = _read_meta(folder).get("kind")
            except (OSError, ValueError, TypeError) as exc:
                raise MemberError(i, folder, f"not an exported mtl model ({exc})") from None
            if kind == ENSEMBLE_KIND:
                raise MemberError(i, folder, "it is an ensemble itself (ensembles do not nest)")
            predictor = (load_member or _torch_loader(device))(folder)
            why = differences(expected, predictor.labels)
            if why is not None:
                raise ModelError(
                    f"{model_dir}: member {i}'s tasks differ from the ensemble's: {why}"
                )
            members.append(predictor)
        return cls(members, weights, meta)

    @property
    def task_names(self) -> list[str]:
        return list(self.labels)

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
        outputs = [m.predict(texts, batch_size=batch_size) for m in self.members]
        results: list[dict[str, Any]] = []
        for k in range(len(texts)):
            row = {}
            for task, names in self.labels.items():
                probs = [
                    sum(
                        w * out[k][task]["probabilities"][n]
                        for w, out in zip(self.weights, outputs, strict=True)
                    )
                    for n in names
                ]
                best = max(range(len(names)), key=probs.__getitem__)  # the first of equals
                row[task] = {
                    "label": names[best],
                    "probabilities": dict(zip(names, probs, strict=True)),
                }
            results.append(row)
        return results


def _torch_loader(device: str) -> Callable[[Path], MemberPredictor]:
    def load(folder: Path) -> MemberPredictor:
        from mtl.predict import Predictor

        predictor = Predictor.load(folder, device=device)
        assert isinstance(predictor, Predictor)
        return predictor

    return load
