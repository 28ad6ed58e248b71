"""Summarising an uploaded file: its rows, columns and the distinct values of each column."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .labels import _as_int, label_key


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
    records: Iterable[Mapping[str, Any]], source_name: str, *, max_values: int = 1000
) -> DatasetInfo:
    """Summarise records for the dataset upload endpoint (see `DatasetInfo`).

    One pass over `records` (a list, or the stream of `iter_records`), holding per column at
    most ``2 * max_values`` distinct values and two counts: the memory does not grow with the
    number of rows. Columns are listed in order of first appearance; a column that first
    appears in a later row counts as missing in the rows before.
    """
    columns: dict[str, _Column] = {}
    rows = 0
    for rec in records:
        if not columns.keys() >= rec.keys():
            for name in rec:
                if name not in columns:
                    columns[name] = _Column(max_values, missing=rows)
        rows += 1
        for column, state in columns.items():
            value = rec.get(column)
            if type(value) is str:  # every CSV value: label_key's first case, inlined
                key: str | None = value.strip() or None
            else:
                try:
                    key = label_key(value)
                except TypeError:
                    key = json.dumps(value, sort_keys=True)[:200]
            if key is None:
                state.missing += 1
            elif key not in state.text.kept:
                state.add(key)
    label_values: dict[str, list[str]] = {}
    capped: dict[str, bool] = {}
    for column, state in columns.items():
        label_values[column], capped[column] = state.smallest()
    missing = {column: state.missing for column, state in columns.items()}
    return DatasetInfo(source_name, rows, list(columns), label_values, capped, missing)


class _Smallest:
    """The `limit` smallest distinct values offered (by `order`), and whether there were
    more, holding at most ``2 * limit`` values: when that many are held, the smallest `limit`
    are kept and `bound` (the order of the smallest value let go) rejects any value not below
    it from then on (at least `limit` distinct values come before it)."""

    def __init__(self, limit: int, order: Callable[[str], Any] | None = None) -> None:
        self.limit = limit
        self.order = order
        self.kept: set[str] = set()
        self.bound: Any = None
        self.more = False

    def add(self, value: str) -> None:
        if value in self.kept:
            return
        if self.bound is not None:
            rank = self.order(value) if self.order is not None else value
            if not rank < self.bound:
                self.more = True
                return
        self.kept.add(value)
        if len(self.kept) > 2 * self.limit:
            ordered = sorted(self.kept, key=self.order)
            self.kept = set(ordered[: self.limit])
            let_go = ordered[self.limit]
            self.bound = self.order(let_go) if self.order is not None else let_go
            self.more = True

    def result(self) -> tuple[list[str], bool]:
        ordered = sorted(self.kept, key=self.order)
        return ordered[: self.limit], self.more or len(ordered) > self.limit


def _int_order(key: str) -> tuple[int, str]:
    return int(key), key


class _Column:
    """One column's missing count and smallest distinct values in `_sort_keys` order: numeric
    while every value is an integer (`ints`, dropped at the first that is not), else string
    order (`text`, kept throughout since a later value may end the numeric order)."""

    def __init__(self, limit: int, *, missing: int) -> None:
        self.missing = missing
        self.text = _Smallest(limit)
        self.ints: _Smallest | None = _Smallest(limit, _int_order)

    def add(self, key: str) -> None:
        self.text.add(key)
        if self.ints is not None:
            if _as_int(key) is None:
                self.ints = None
            else:
                self.ints.add(key)

    def smallest(self) -> tuple[list[str], bool]:
        return (self.ints if self.ints is not None else self.text).result()
