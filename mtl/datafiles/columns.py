"""The columns and values of records: which columns they have, and checking a text value.

A record is one data row as a dict (column -> value). Shared by the other modules: `_json_type`
names a JSON value's type and `_listing` shortens a list of names for error messages.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mtl.errors import DataError

#: One data row: column -> value (strings from CSV; any JSON value from JSONL).
Record = dict[str, Any]

_MAX_LISTED = 20


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


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a number")
