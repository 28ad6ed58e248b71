"""Preparing a config's data: read every file it names, check it, encode the labels.

`check_data` groups the tasks by the files they read (`_Group`), reads each file once, builds
the label maps, encodes each split of each group as a `Source`, holds out a validation share of
train when there is no validation file, and returns it all as `PreparedData`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtl.config import FileData, Folds, TaskConfig, TrainConfig
from mtl.errors import DataError

from .columns import Record, check_text, require_columns
from .labels import IGNORE_INDEX, LabelMap, build_label_maps
from .reading import read_records

SPLITS = ("train", "validation", "test")


@dataclass
class Source:
    """One split of one dataset: texts and a class id per task (`IGNORE_INDEX` when absent).

    `labels` has every task of the config; tasks this source does not label are all
    `IGNORE_INDEX`. `rows` are the 1-based data rows of `file` the examples came from.
    """

    name: str
    split: str
    file: str
    tasks: list[str]
    texts: list[str]
    labels: dict[str, list[int]]
    rows: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def concat(self, other: Source) -> Source:
        """This source followed by `other` (the same tasks; `file` names both)."""
        return Source(
            self.name,
            self.split,
            f"{self.file} + {other.file}",
            list(self.tasks),
            self.texts + other.texts,
            {t: ids + other.labels[t] for t, ids in self.labels.items()},
            self.rows + other.rows,
        )

    def subset(self, indices: Sequence[int], split: str) -> Source:
        return Source(
            self.name,
            split,
            self.file,
            list(self.tasks),
            [self.texts[i] for i in indices],
            {t: [ids[i] for i in indices] for t, ids in self.labels.items()},
            [self.rows[i] for i in indices],
        )


@dataclass
class PreparedData:
    """Every split as a list of `Source` objects, plus the label names of every task."""

    train: list[Source]
    validation: list[Source]
    test: list[Source]
    label_names: dict[str, list[str]]
    label_maps: dict[str, LabelMap]

    def split(self, name: str) -> list[Source]:
        if name not in SPLITS:
            raise KeyError(name)
        return getattr(self, name)

    def class_counts(self, task: str, split: str = "train") -> list[int]:
        """Examples per class of `task` in `split` (missing labels not counted)."""
        counts = [0] * len(self.label_names[task])
        for src in self.split(split):
            for y in src.labels[task]:
                if y >= 0:
                    counts[y] += 1
        return counts

    def summary(self) -> dict[str, Any]:
        """Rows per split and source, labelled rows per task: JSON-ready."""
        out: dict[str, Any] = {"label_names": {t: list(n) for t, n in self.label_names.items()}}
        for split in SPLITS:
            out[split] = [
                {
                    "name": s.name,
                    "file": s.file,
                    "rows": len(s),
                    "labelled": {t: sum(1 for y in s.labels[t] if y >= 0) for t in s.tasks},
                }
                for s in self.split(split)
            ]
        return out


@dataclass
class _Group:
    name: str
    files: dict[str, str | None]  # split -> source string
    text_column: str
    tasks: list[TaskConfig]


def _groups(config: TrainConfig, data: FileData) -> list[_Group]:
    main = [t for t in config.tasks if t.data is None]
    groups: list[_Group] = []
    if main:
        files = {"train": data.train, "validation": data.validation, "test": data.test}
        groups.append(_Group("data", files, data.text_column, main))
    by_spec: dict[tuple[Any, ...], _Group] = {}
    for task in config.tasks:
        if task.data is None:
            continue
        td = task.data
        text_column = td.text_column or data.text_column
        spec = (td.train, td.validation, td.test, text_column)
        if spec in by_spec:
            by_spec[spec].tasks.append(task)
            by_spec[spec].name += f"+{task.name}"
        else:
            files = {"train": td.train, "validation": td.validation, "test": td.test}
            by_spec[spec] = _Group(task.name, files, text_column, [task])
            groups.append(by_spec[spec])
    return groups


def _default_resolve(source: str) -> Path:
    return Path(source)


def check_data(
    config: TrainConfig, resolve: Callable[[str], Path] | None = None
) -> PreparedData | None:
    """Read and check every file the config names; encode the labels.

    Tasks without their own `data` share the main `data` files (one source per split); tasks
    with the same `data` block share one source; every other task's `data` is its own source.
    When the main block serves no task, its files are not read. Without a validation file and
    with `validation_fraction > 0`, that share of train is held out (seeded by `config.seed`).
    Returns None for dummy data. Raises `DataError` naming file, row and column.
    """
    data = config.data
    if not isinstance(data, FileData):
        return None
    resolver = resolve or _default_resolve
    cache: dict[str, list[Record]] = {}

    def load(source: str) -> list[Record]:
        if source not in cache:
            try:
                path = resolver(source)
            except DataError:
                raise
            except (ValueError, LookupError, OSError) as exc:
                raise DataError(f"cannot use this source: {exc}", file=source) from None
            cache[source] = read_records(path, format=data.format, name=source)
        return cache[source]

    groups = _groups(config, data)
    train_by_task: dict[str, list[Record]] = {}
    file_by_task: dict[str, str] = {}
    for group in groups:
        for split in SPLITS:
            source = group.files[split]
            if source is None:
                continue
            records = load(source)
            columns = [group.text_column] + [t.column for t in group.tasks]
            require_columns(records, columns, source)
            if split == "train":
                for task in group.tasks:
                    train_by_task[task.name] = records
                    file_by_task[task.name] = source
    label_maps = build_label_maps(config, train_by_task, file_by_task)

    all_tasks = config.task_names
    out: dict[str, list[Source]] = {s: [] for s in SPLITS}
    for group in groups:
        for split in SPLITS:
            source = group.files[split]
            if source is None:
                continue
            out[split].append(
                _encode_source(group, split, source, load(source), label_maps, all_tasks)
            )
        if data.folds is not None:
            _fold(out, data.folds, bool(group.files["validation"]))
        elif group.files["validation"] is None and data.validation_fraction > 0:
            train = out["train"][-1]
            keep, held = _holdout(len(train), data.validation_fraction, config.seed)
            if held:
                out["train"][-1] = train.subset(keep, "train")
                out["validation"].append(train.subset(held, "validation"))
    return PreparedData(
        train=out["train"],
        validation=out["validation"],
        test=out["test"],
        label_names={t: list(m.names) for t, m in label_maps.items()},
        label_maps=label_maps,
    )


def _encode_source(
    group: _Group,
    split: str,
    file: str,
    records: list[Record],
    label_maps: Mapping[str, LabelMap],
    all_tasks: list[str],
) -> Source:
    text_column = group.text_column
    texts = [
        check_text(rec.get(text_column), file=file, row=i, column=text_column)
        for i, rec in enumerate(records, 1)
    ]
    n = len(records)
    labels: dict[str, list[int]] = {t: [IGNORE_INDEX] * n for t in all_tasks}
    for task in group.tasks:
        labels[task.name] = label_maps[task.name].encode_all(records, task.column, file)
    own = [labels[t.name] for t in group.tasks]
    for i in range(n):
        if all(ids[i] == IGNORE_INDEX for ids in own):
            cols = [t.column for t in group.tasks]
            raise DataError(
                f"the row has no label in {' or '.join(map(repr, cols))}; every row must label "
                "at least one of the tasks its file serves",
                file=file,
                row=i + 1,
                column=cols[0] if len(cols) == 1 else None,
            )
    return Source(
        name=group.name,
        split=split,
        file=file,
        tasks=[t.name for t in group.tasks],
        texts=texts,
        labels=labels,
        rows=list(range(1, n + 1)),
    )


def _fold(out: dict[str, list[Source]], folds: Folds, has_validation: bool) -> None:
    """Pool the group's train and validation sources (the last of each in `out`) and cut the
    pool into folds: `folds.index` becomes the validation split, the rest the train split."""
    train = out["train"].pop()
    pool = train.concat(out["validation"].pop()) if has_validation else train
    order = list(range(len(pool)))
    random.Random(folds.seed).shuffle(order)
    held = set(order[folds.index :: folds.k])
    out["train"].append(pool.subset([i for i in range(len(pool)) if i not in held], "train"))
    out["validation"].append(pool.subset(sorted(held), "validation"))


def _holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split range(n) into (keep, held) with round(n * fraction) held, both in order."""
    k = min(max(round(n * fraction), 1), n - 1) if fraction > 0 and n >= 2 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = sorted(order[:k])
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held
