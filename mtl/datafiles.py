"""Reading and checking labelled text files. Torch-free: the REST API imports it.

Formats: CSV (UTF-8, header row, RFC-4180 quoting, read with the `csv` module) and JSONL (one
JSON object per line). A UTF-8 byte-order mark is ignored.

Row numbers: every `DataError` names the *data row*, counted from 1: the first record after the
CSV header is row 1, and in JSONL the first non-blank line is row 1. Blank lines are skipped in
both formats and are not counted. Errors found while parsing also give the physical line number
in the message (``line N``), which differs from the row when there are blank lines or (in CSV)
quoted fields with newlines.

Labels: a label value is missing when it is absent, ``null``/NaN, or an empty (whitespace-only)
string; a row with a missing label still trains the other tasks. See `LabelMap` for how label
values become class ids.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mtl.config import FileData, TaskConfig, TrainConfig
from mtl.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "SPLITS",
    "DatasetInfo",
    "LabelMap",
    "PreparedData",
    "Source",
    "build_label_maps",
    "check_data",
    "check_text",
    "detect_format",
    "inspect_records",
    "label_key",
    "read_records",
    "record_columns",
    "require_columns",
]

#: The label id of a missing label (the default `ignore_index` of torch's cross-entropy).
IGNORE_INDEX = -100
SPLITS = ("train", "validation", "test")

#: Largest CSV field accepted (characters).
CSV_FIELD_LIMIT = 64 * 1024 * 1024

_SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json-lines": "jsonl", ".ndjson": "jsonl"}
_INT_RE = re.compile(r"[+-]?\d+")
_SURROGATE_RE = re.compile("[\udc80-\udcff]")
_MAX_LISTED = 20

Format = Literal["auto", "csv", "jsonl"]
Record = dict[str, Any]


# ------------------------------------------------------------------------------------- reading


def detect_format(path: str | Path, format: Format = "auto", *, name: str | None = None) -> str:
    """Return ``"csv"`` or ``"jsonl"``: `format` itself, or from the file suffix when ``auto``."""
    if format in ("csv", "jsonl"):
        return format
    if format != "auto":
        raise DataError(f"unknown format {format!r}: use 'auto', 'csv' or 'jsonl'", file=name)
    suffix = Path(path).suffix.lower()
    found = _SUFFIX_FORMATS.get(suffix)
    if found is None:
        raise DataError(
            f"cannot tell the format from the suffix {suffix or '(none)'!r}: use a .csv or "
            f".jsonl file, or set data.format to 'csv' or 'jsonl'",
            file=name if name is not None else str(path),
        )
    return found


def read_records(
    source: str | Path | Sequence[Mapping[str, Any]],
    *,
    format: Format = "auto",
    text_column: str | None = None,
    max_rows: int | None = None,
    name: str | None = None,
) -> list[Record]:
    """Read a CSV or JSONL file (or take a list of dicts) into a list of row dicts.

    `name` is how errors name the file (default: the path); the service passes the
    ``dataset:<id>`` reference so that errors do not show its storage paths. With `text_column`,
    that column must exist and hold a non-empty string in every row. `max_rows` stops reading
    after that many rows. CSV values are strings; JSONL values are whatever JSON holds.
    Raises `DataError` naming the file, row and column of the first problem.
    """
    if isinstance(source, str | Path):
        path = Path(source)
        fname = name if name is not None else str(source)
        fmt = detect_format(path, format, name=fname)
        data = _read_bytes(path, fname)
        text = _decode(data, fname, fmt)
        records = (
            _parse_csv(text, fname, max_rows)
            if fmt == "csv"
            else _parse_jsonl(text, fname, max_rows)
        )
    else:
        fname = name if name is not None else "<records>"
        records = []
        for i, rec in enumerate(source, 1):
            if max_rows is not None and len(records) >= max_rows:
                break
            if not isinstance(rec, Mapping):
                raise DataError(f"expected a mapping, got {type(rec).__name__}", file=fname, row=i)
            records.append(dict(rec))
        if not records:
            raise DataError("no rows", file=fname)
    if text_column is not None:
        require_columns(records, [text_column], fname)
        for i, rec in enumerate(records, 1):
            check_text(rec.get(text_column), file=fname, row=i, column=text_column)
    return records


def _read_bytes(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", file=name) from None
    except IsADirectoryError:
        raise DataError("is a directory, not a file", file=name) from None
    except OSError as exc:
        raise DataError(f"cannot read the file: {exc.strerror or exc}", file=name) from None


def _decode(data: bytes, name: str, fmt: str) -> str:
    """UTF-8 decode (BOM dropped); invalid bytes and NUL bytes are errors naming the row."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start : exc.end].hex(" ")
        loose = data.decode("utf-8", errors="surrogateescape")
        row, column = _locate_line(loose, fmt, line, _SURROGATE_RE)
        raise DataError(
            f"not valid UTF-8: bytes {bad} at byte offset {exc.start} (line {line}); save the "
            f"file as UTF-8",
            file=name,
            row=row,
            column=column,
        ) from None
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        row, column = _locate_line(text, fmt, line, re.compile("\x00"))
        raise DataError(
            f"contains a NUL byte (line {line}); is this a binary or UTF-16 file?",
            file=name,
            row=row,
            column=column,
        )
    return text


def _locate_line(
    text: str, fmt: str, line: int, pattern: re.Pattern[str]
) -> tuple[int | None, str | None]:
    """The data row (and, when found, the column) that holds physical line `line`."""
    if fmt == "jsonl":
        lines = text.split("\n")[:line]
        row = sum(1 for ln in lines if ln.strip())
        return (row or None), None
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header: list[str] | None = None
        row = 0
        for fields in reader:
            if not fields:
                continue
            if header is None:
                header = [h.strip() for h in fields]
                if reader.line_num >= line:
                    return None, None  # in the header
                continue
            row += 1
            if reader.line_num >= line:
                column = next(
                    (
                        header[j] if j < len(header) else f"#{j + 1}"
                        for j, value in enumerate(fields)
                        if pattern.search(value)
                    ),
                    None,
                )
                return row, column
    except csv.Error:
        pass
    return None, None


def _parse_csv(text: str, name: str, max_rows: int | None) -> list[Record]:
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    records: list[Record] = []
    row = 0
    try:
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            if header is None:
                header = [h.strip() for h in fields]
                dupes = _duplicates(header)
                if dupes:
                    raise DataError(
                        f"duplicate column names in the header: {', '.join(map(repr, dupes))}",
                        file=name,
                    )
                continue
            row += 1
            if len(fields) != len(header):
                raise DataError(
                    f"has {len(fields)} fields but the header has {len(header)} "
                    f"(line {reader.line_num}); quote fields that contain commas",
                    file=name,
                    row=row,
                )
            records.append(dict(zip(header, fields, strict=True)))
            if max_rows is not None and len(records) >= max_rows:
                break
    except csv.Error as exc:
        raise DataError(
            f"malformed CSV near line {reader.line_num}: {exc}", file=name, row=row + 1
        ) from None
    if header is None:
        raise DataError("no rows: the file is empty", file=name)
    if not records:
        raise DataError("no rows: the file has a header but no data rows", file=name)
    return records


def _duplicates(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    dupes: set[str] = set()
    for name in names:
        if name in seen:
            dupes.add(name)
        seen.add(name)
    return sorted(dupes)


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        dupes = _duplicates([k for k, _ in pairs])
        raise ValueError(f"duplicate keys {', '.join(map(repr, dupes))}")
    return obj


def _parse_jsonl(text: str, name: str, max_rows: int | None) -> list[Record]:
    records: list[Record] = []
    row = 0
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        row += 1
        try:
            obj = json.loads(line, object_pairs_hook=_unique_object)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"line {line_no}: not valid JSON: {exc.msg} (column {exc.colno})",
                file=name,
                row=row,
            ) from None
        except ValueError as exc:
            raise DataError(f"line {line_no}: {exc}", file=name, row=row) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"line {line_no}: expected a JSON object ({{...}}), got {_json_type(obj)}",
                file=name,
                row=row,
            )
        records.append(obj)
        if max_rows is not None and len(records) >= max_rows:
            break
    if not records:
        raise DataError("no rows: the file is empty", file=name)
    return records


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a number")


# ------------------------------------------------------------------------------------- columns


def record_columns(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every key of the records, in order of first appearance."""
    seen: dict[str, None] = {}
    for rec in records:
        for key in rec:
            if key not in seen:
                seen[key] = None
    return list(seen)


def require_columns(
    records: Sequence[Mapping[str, Any]], columns: Iterable[str], file: str
) -> None:
    """Raise `DataError` for the first of `columns` that no record has."""
    available = record_columns(records) if records else []
    have = set(available)
    for column in columns:
        if column not in have:
            raise DataError(
                f"missing column; the file has: {_listing(available)}", file=file, column=column
            )


def check_text(value: Any, *, file: str, row: int, column: str) -> str:
    """Return `value` if it is a non-empty string, else raise `DataError`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError("missing text", file=file, row=row, column=column)
    if not isinstance(value, str):
        raise DataError(
            f"text must be a string, got {_json_type(value)}", file=file, row=row, column=column
        )
    if not value.strip():
        raise DataError("empty text", file=file, row=row, column=column)
    return value


def _listing(values: Sequence[Any], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    if len(values) > limit:
        shown += f", ... ({len(values) - limit} more)"
    return shown or "(none)"


# -------------------------------------------------------------------------------------- labels


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


# ------------------------------------------------------------------------------------- inspect


@dataclass
class DatasetInfo:
    """What an uploaded file holds: rows, columns and the distinct values of each column."""

    source: str
    rows: int
    columns: list[str]
    #: column -> sorted distinct values (as `label_key` strings), at most `max_values` of them
    label_values: dict[str, list[str]]
    #: column -> True when the column has more distinct values than were listed
    capped: dict[str, bool]
    #: column -> rows where the value is missing (absent, null or empty)
    missing: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "columns": list(self.columns),
            "label_values": {k: list(v) for k, v in self.label_values.items()},
            "capped": dict(self.capped),
            "missing": dict(self.missing),
        }


def inspect_records(
    records: Sequence[Mapping[str, Any]], source_name: str, *, max_values: int = 1000
) -> DatasetInfo:
    """Summarise records for the dataset upload endpoint (see `DatasetInfo`)."""
    columns = record_columns(records)
    values: dict[str, set[str]] = {c: set() for c in columns}
    missing = dict.fromkeys(columns, 0)
    for rec in records:
        for column in columns:
            try:
                key = label_key(rec.get(column))
            except TypeError:
                key = json.dumps(rec.get(column), sort_keys=True)[:200]
            if key is None:
                missing[column] += 1
            else:
                values[column].add(key)
    label_values: dict[str, list[str]] = {}
    capped: dict[str, bool] = {}
    for column in columns:
        ordered = _sort_keys(values[column])
        capped[column] = len(ordered) > max_values
        label_values[column] = ordered[:max_values]
    return DatasetInfo(source_name, len(records), columns, label_values, capped, missing)


# ------------------------------------------------------------------------------------- prepare


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
        if group.files["validation"] is None and data.validation_fraction > 0:
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


def _holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split range(n) into (keep, held) with round(n * fraction) held, both in order."""
    k = min(max(round(n * fraction), 1), n - 1) if fraction > 0 and n >= 2 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = sorted(order[:k])
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held
