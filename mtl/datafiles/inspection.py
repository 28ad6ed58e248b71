"""Summarising an uploaded file: its rows, columns and the distinct values of each column."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .columns import record_columns
from .labels import _sort_keys, label_key


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
