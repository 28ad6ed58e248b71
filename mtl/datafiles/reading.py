"""Reading CSV and JSONL files into records, and locating where a file goes wrong.

Formats: CSV (UTF-8, header row, RFC-4180 quoting, read with the `csv` module) and JSONL (one
JSON object per line). A UTF-8 byte-order mark is ignored.

Row numbers: every `DataError` names the *data row*, counted from 1: the first record after the
CSV header is row 1, and in JSONL the first non-blank line is row 1. Blank lines are skipped in
both formats and are not counted. Errors found while parsing also give the physical line number
in the message (``line N``), which differs from the row when there are blank lines or (in CSV)
quoted fields with newlines.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from mtl.errors import DataError

from .columns import Record, _json_type, check_text, require_columns

#: Largest CSV field accepted (characters).
CSV_FIELD_LIMIT = 64 * 1024 * 1024

_SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json-lines": "jsonl", ".ndjson": "jsonl"}
_SURROGATE_RE = re.compile("[\udc80-\udcff]")

Format = Literal["auto", "csv", "jsonl"]


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
    max_columns: int | None = None,
    max_field_chars: int | None = None,
) -> list[Record]:
    """Read a CSV or JSONL file (or take a list of dicts) into a list of row dicts.

    `name` is how errors name the file (default: the path); the service passes the
    ``dataset:<id>`` reference so that errors do not show its storage paths. With `text_column`,
    that column must exist and hold a non-empty string in every row. `max_rows` stops reading
    after that many rows. CSV values are strings; JSONL values are whatever JSON holds.
    Raises `DataError` naming the file, row and column of the first problem.

    Caps for untrusted files (files only; the service's upload checks): a row (the CSV header
    included) with more than `max_columns` columns (JSON keys in JSONL), or a string value
    longer than `max_field_chars` characters (top-level JSON values in JSONL), is a
    `DataError` naming the row and column. Each row is checked as soon as it is parsed, before
    it becomes a record.
    """
    if isinstance(source, str | Path):
        path = Path(source)
        fname = name if name is not None else str(source)
        fmt = detect_format(path, format, name=fname)
        data = _read_bytes(path, fname)
        text = _decode(data, fname, fmt)
        limits = _Limits(fname, max_columns, max_field_chars)
        records = (
            _parse_csv(text, fname, max_rows, limits)
            if fmt == "csv"
            else _parse_jsonl(text, fname, max_rows, limits)
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


@dataclass(frozen=True)
class _Limits:
    """The caps `read_records` applies to each row as it is parsed (None: no cap)."""

    file: str
    max_columns: int | None = None
    max_field_chars: int | None = None

    def check_fields(self, fields: list[str], *, row: int | None, header: list[str] | None) -> None:
        """A CSV row (`row` None: the header): too many columns or too long a value."""
        self._check_count(len(fields), "columns", row)
        cap = self.max_field_chars
        if cap is None or not fields or max(map(len, fields)) <= cap:
            return
        for j, value in enumerate(fields):
            if len(value) > cap:
                column = header[j] if header is not None and j < len(header) else None
                self._too_long(len(value), row, column)

    def check_object(self, obj: Mapping[str, Any], *, row: int) -> None:
        """A JSONL row: too many keys or too long a (top-level) string value."""
        self._check_count(len(obj), "keys", row)
        cap = self.max_field_chars
        if cap is None:
            return
        for key, value in obj.items():
            if isinstance(value, str) and len(value) > cap:
                self._too_long(len(value), row, key)

    def _check_count(self, count: int, what: str, row: int | None) -> None:
        if self.max_columns is not None and count > self.max_columns:
            raise DataError(
                f"{count} {what}; at most {self.max_columns} are accepted", file=self.file, row=row
            )

    def _too_long(self, length: int, row: int | None, column: str | None) -> NoReturn:
        raise DataError(
            f"a value of {length} characters; at most {self.max_field_chars} are accepted",
            file=self.file,
            row=row,
            column=column,
        )


def _parse_csv(text: str, name: str, max_rows: int | None, limits: _Limits) -> list[Record]:
    field_limit = CSV_FIELD_LIMIT
    if limits.max_field_chars is not None:
        field_limit = max(field_limit, limits.max_field_chars + 1)
    if csv.field_size_limit() < field_limit:
        csv.field_size_limit(field_limit)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    records: list[Record] = []
    row = 0
    try:
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            if header is None:
                limits.check_fields(fields, row=None, header=None)
                header = [h.strip() for h in fields]
                dupes = _duplicates(header)
                if dupes:
                    raise DataError(
                        f"duplicate column names in the header: {', '.join(map(repr, dupes))}",
                        file=name,
                    )
                continue
            row += 1
            limits.check_fields(fields, row=row, header=header)
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
        if limits.max_field_chars is not None and "field larger than field limit" in str(exc):
            cap = limits.max_field_chars
            raise DataError(
                f"a value longer than {cap} characters; at most {cap} are accepted",
                file=name,
                row=row + 1 if header is not None else None,
            ) from None
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


def _check_unicode(obj: Mapping[str, Any], name: str, row: int) -> None:
    """JSON escapes can spell a lone surrogate (`"\\ud800"`), which no UTF-8 text holds: refuse
    it here, naming the row and column, before anything stores or sends it."""
    for column, value in obj.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if not (is_valid_unicode(column) and is_valid_unicode(text)):
            raise DataError(
                "not valid Unicode (a lone surrogate escape such as \\ud800)",
                file=name,
                row=row,
                column=column if is_valid_unicode(column) else None,
            )


def is_valid_unicode(text: str) -> bool:
    """False when `text` holds a lone surrogate (it cannot be encoded as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_jsonl(text: str, name: str, max_rows: int | None, limits: _Limits) -> list[Record]:
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
        except RecursionError:
            raise DataError(f"line {line_no}: nested too deeply", file=name, row=row) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"line {line_no}: expected a JSON object ({{...}}), got {_json_type(obj)}",
                file=name,
                row=row,
            )
        limits.check_object(obj, row=row)
        _check_unicode(obj, name, row)
        records.append(obj)
        if max_rows is not None and len(records) >= max_rows:
            break
    if not records:
        raise DataError("no rows: the file is empty", file=name)
    return records
