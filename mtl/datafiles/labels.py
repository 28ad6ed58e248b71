"""Labels: the canonical key of a label value, `LabelMap` (label values to class ids), and
`build_label_maps` (one map per task, from the config and the training rows).

A label value is missing when it is absent, ``null``/NaN, or an empty (whitespace-only)
string; a row with a missing label still trains the other tasks. See `LabelMap` for how label
values become class ids.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from mtl.config import TaskConfig, TrainConfig
from mtl.errors import DataError

from .columns import _json_type, _listing

#: The label id of a missing label (the default `ignore_index` of torch's cross-entropy).
IGNORE_INDEX = -100

_INT_RE = re.compile(r"[+-]?\d+")


def label_key(value: Any) -> str | None:
    """The canonical string of a label value, or None when the label is missing.

    Strings are stripped (empty means missing); ints print as ints, integral floats as ints
    (``2.0`` -> ``"2"``), NaN and None are missing, booleans become ``"true"``/``"false"``.
    Raises `TypeError` for arrays and objects.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    raise TypeError(f"a label must be a string or a number, got {_json_type(value)}")


def _as_int(key: str) -> int | None:
    return int(key) if _INT_RE.fullmatch(key) else None


def _sort_keys(keys: Iterable[str]) -> list[str]:
    """Numeric order when every key is an integer, else string order."""
    keys = list(keys)
    if keys and all(_as_int(k) is not None for k in keys):
        return sorted(keys, key=lambda k: (int(k), k))
    return sorted(keys)


class LabelMap:
    """Label names of one task and how raw label values map to class ids.

    mode ``"ids"``: values are integer ids in [0, n) (names are ``"0"`` .. ``"n-1"``).
    mode ``"names"``: values are class names (``names[i]`` is class i). When every name is an
    integer (e.g. ratings ``1..5``), values compare as integers (``"05"`` is ``"5"``). Names given
    in the config (`accept_ids`) also accept integer ids in [0, n) unless a name is an integer.
    """

    def __init__(
        self,
        task: str,
        names: Sequence[str],
        mode: Literal["ids", "names"] = "names",
        *,
        accept_ids: bool = False,
    ) -> None:
        self.task = task
        self.names: tuple[str, ...] = tuple(names)
        self.mode = mode
        self._index = {n: i for i, n in enumerate(self.names)}
        ints = [_as_int(n) for n in self.names]
        self._int_index: dict[int, int] | None = None
        if mode == "names" and all(v is not None for v in ints):
            self._int_index = {v: i for i, v in enumerate(ints) if v is not None}
        self.accept_ids = mode == "ids" or (accept_ids and self._int_index is None)

    @classmethod
    def from_ids(cls, task: str, num_classes: int) -> LabelMap:
        return cls(task, [str(i) for i in range(num_classes)], "ids")

    @classmethod
    def from_names(cls, task: str, names: Sequence[str], *, accept_ids: bool = False) -> LabelMap:
        return cls(task, names, "names", accept_ids=accept_ids)

    def __repr__(self) -> str:
        return f"LabelMap({self.task!r}, {list(self.names)!r}, {self.mode!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelMap):
            return NotImplemented
        return (self.task, self.names, self.mode, self.accept_ids) == (
            other.task,
            other.names,
            other.mode,
            other.accept_ids,
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def encode(
        self,
        value: Any,
        *,
        file: str | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> int:
        """The class id of `value`; `IGNORE_INDEX` when missing. Raises `DataError`."""
        try:
            key = label_key(value)
        except TypeError as exc:
            raise DataError(str(exc), file=file, row=row, column=column) from None
        if key is None:
            return IGNORE_INDEX
        idx = self._index.get(key)
        if idx is not None:
            return idx
        n = len(self.names)
        iv = _as_int(key)
        if iv is not None and self._int_index is not None:
            idx = self._int_index.get(iv)
            if idx is not None:
                return idx
        if iv is not None and self.accept_ids:
            if 0 <= iv < n:
                return iv
            raise DataError(
                f"task {self.task!r}: label {iv} is out of range; integer labels must lie in "
                f"[0, {n})",
                file=file,
                row=row,
                column=column,
            )
        if self.mode == "ids":
            raise DataError(
                f"task {self.task!r}: label {key!r} is not an integer; the training labels are "
                f"integers in [0, {n}) (give `labels` in the task config to use names)",
                file=file,
                row=row,
                column=column,
            )
        raise DataError(
            f"task {self.task!r}: unknown label {key!r}; allowed: {_listing(self.names)}",
            file=file,
            row=row,
            column=column,
        )

    def encode_all(self, records: Sequence[Mapping[str, Any]], column: str, file: str) -> list[int]:
        """Encode `column` of every record (row numbers in errors are 1-based indices)."""
        enc = self.encode
        index = self._index
        out: list[int] = []
        append = out.append
        for i, rec in enumerate(records, 1):
            value = rec.get(column)
            if isinstance(value, str):  # fast path: an exact name
                idx = index.get(value)
                if idx is not None:
                    append(idx)
                    continue
            append(enc(value, file=file, row=i, column=column))
        return out

    def decode(self, class_id: int) -> str:
        return self.names[class_id]


def _distinct_labels(records: Sequence[Mapping[str, Any]], column: str, file: str) -> set[str]:
    keys: set[str] = set()
    for i, rec in enumerate(records, 1):
        try:
            key = label_key(rec.get(column))
        except TypeError as exc:
            raise DataError(str(exc), file=file, row=i, column=column) from None
        if key is not None:
            keys.add(key)
    return keys


def build_label_maps(
    config: TrainConfig | Sequence[TaskConfig],
    train_records_by_task: Mapping[str, Sequence[Mapping[str, Any]]],
    files_by_task: Mapping[str, str] | None = None,
) -> dict[str, LabelMap]:
    """One `LabelMap` per task, from the config and the task's training rows.

    Names are, in order of preference: the task's configured `labels`; ``"0"``..``"n-1"`` when
    every training label is an integer in [0, num_classes); else the sorted distinct training
    values (numeric order if all are integers), whose count must equal num_classes.
    """
    tasks = config.tasks if isinstance(config, TrainConfig) else list(config)
    maps: dict[str, LabelMap] = {}
    for task in tasks:
        if task.labels is not None:
            maps[task.name] = LabelMap.from_names(task.name, task.labels, accept_ids=True)
            continue
        file = (files_by_task or {}).get(task.name, "train")
        records = train_records_by_task[task.name]
        n = task.n_classes
        keys = _distinct_labels(records, task.column, file)
        if not keys:
            raise DataError(
                f"task {task.name!r}: no row of the training data has a label",
                file=file,
                column=task.column,
            )
        ints = [_as_int(k) for k in keys]
        if all(v is not None and 0 <= v < n for v in ints):
            maps[task.name] = LabelMap.from_ids(task.name, n)
            continue
        names = _sort_keys(keys)
        if len(names) != n:
            hint = (
                f"integer labels must lie in [0, {n})"
                if all(v is not None for v in ints)
                else "give `labels` in the task config to list every class"
            )
            raise DataError(
                f"task {task.name!r}: num_classes is {n} but the training rows have "
                f"{len(names)} distinct labels: {_listing(names)}; {hint}",
                file=file,
                column=task.column,
            )
        maps[task.name] = LabelMap.from_names(task.name, names)
    return maps
