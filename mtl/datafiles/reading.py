"""Reading CSV and JSONL files into records, and locating where a file goes wrong.

Streaming: `iter_records` reads a file in chunks, decodes them incrementally (strict UTF-8) and
yields one record at a time, so what it holds is a chunk and the row being parsed, not the
file; `read_records` is the same reader collecting a list. Invalid UTF-8 and NUL bytes are
noted as the decoder meets them and raised when the parser reaches their line, naming the row
and column; the first problem in the file is the one raised.

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
import contextlib
import csv
import io
import itertools
import json
import re
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, NoReturn

from mtl.errors import DataError

from .columns import Record, _json_type, check_text, require_columns

#: Largest CSV field accepted (characters).
CSV_FIELD_LIMIT = 64 * 1024 * 1024
#: Bytes read (and decoded) at a time by `iter_records`.
CHUNK_BYTES = 1024 * 1024

_SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json-lines": "jsonl", ".ndjson": "jsonl"}
_SURROGATE_RE = re.compile("[\udc80-\udcff]")
_NUL_RE = re.compile("\x00")

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
    after that many rows (the rest of the file is neither read nor checked). CSV values are
    strings; JSONL values are whatever JSON holds. Raises `DataError` naming the file, row and
    column of the first problem.

    A file is read with `iter_records` (see there for the caps `max_columns` and
    `max_field_chars`); this holds all its records in a list.
    """
    if isinstance(source, str | Path):
        fname = name if name is not None else str(source)
        records: list[Record] = []
        rows = iter_records(
            source,
            format=format,
            name=fname,
            max_columns=max_columns,
            max_field_chars=max_field_chars,
        )
        with contextlib.closing(rows):
            for record in rows:
                records.append(record)
                if max_rows is not None and len(records) >= max_rows:
                    break
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


def iter_records(
    path: str | Path,
    *,
    format: Format = "auto",
    name: str | None = None,
    max_columns: int | None = None,
    max_field_chars: int | None = None,
) -> Generator[Record, None, None]:
    """The records of a CSV or JSONL file, one at a time, as it is read.

    The file is read in chunks of `CHUNK_BYTES` and decoded as it goes (strict UTF-8): what is
    held at any time is a chunk and the row being parsed, never the whole file. Every problem
    is the same `DataError` `read_records` raises (it is this reader), raised when the reading
    reaches it: rows before it have been yielded by then, so a caller that stores or counts
    rows must finish the iteration before trusting them. When the iteration ends without an
    error, every byte of the file was valid UTF-8 without NUL bytes and every row parsed.

    Caps for untrusted files (the service's upload checks): a row (the CSV header included)
    with more than `max_columns` columns (JSON keys in JSONL), or a string value longer than
    `max_field_chars` characters (top-level JSON values in JSONL), is a `DataError` naming the
    row and column. Each row is checked as soon as it is parsed, before it becomes a record.

    The format is checked at once (a `DataError` for an unknown one); the file is opened on
    the first `next()`. Close the generator (`contextlib.closing`) when stopping early.
    """
    fname = name if name is not None else str(path)
    fmt = detect_format(path, format, name=fname)
    return _iter_file(Path(path), fname, fmt, _Limits(fname, max_columns, max_field_chars))


def _iter_file(path: Path, name: str, fmt: str, limits: _Limits) -> Generator[Record, None, None]:
    try:
        file = open(path, "rb")  # noqa: SIM115 (closed by the `with` below)
    except FileNotFoundError:
        raise DataError("file not found", file=name) from None
    except IsADirectoryError:
        raise DataError("is a directory, not a file", file=name) from None
    except OSError as exc:
        raise DataError(f"cannot read the file: {exc.strerror or exc}", file=name) from None
    with file:
        text = _TextStream(file)
        try:
            if fmt == "csv":
                yield from _parse_csv(text, name, limits)
            else:
                yield from _parse_jsonl(text, name, limits)
        except OSError as exc:
            raise DataError(f"cannot read the file: {exc.strerror or exc}", file=name) from None


@dataclass(frozen=True)
class _Problem:
    """Invalid UTF-8 or a NUL byte, found while decoding and reported once the parser reaches
    it (to name the row and column). `line` counts ``\\n`` (the message's line, and JSONL's);
    `csv_line` counts lines as `csv.reader` does (``\\r`` alone also ends one)."""

    line: int
    csv_line: int
    message: str
    pattern: re.Pattern[str]

    def error(
        self, name: str, row: int | None, fields: Sequence[str] = (), header: Sequence[str] = ()
    ) -> DataError:
        """The error for data row `row` (None: the header or unknown), naming the first of its
        `fields` that holds the bad character (by `header` name, or ``#n`` past the header)."""
        column = None
        if row is not None:
            column = next(
                (
                    header[j] if j < len(header) else f"#{j + 1}"
                    for j, value in enumerate(fields)
                    if self.pattern.search(value)
                ),
                None,
            )
        return DataError(self.message, file=name, row=row, column=column)


def _breaks(text: str) -> int:
    """Line ends in `text` as `csv.reader` counts them: ``\\n``, ``\\r\\n`` or a lone ``\\r``."""
    return text.count("\n") + text.count("\r") - text.count("\r\n")


class _TextStream:
    """A binary file as UTF-8 text, chunk by chunk (a leading BOM dropped).

    The first invalid byte sequence and the first NUL byte are noted (`bad_utf8`, `nul`), not
    raised: the parser raises them when it reaches them, naming the row and column (CSV: the
    first row whose fields hold the character, `within`; JSONL: by line, `due`). After invalid
    UTF-8 the rest is decoded with ``surrogateescape`` (the bad bytes become U+DC80..U+DCFF)
    so the parser can get there. A parser only ever sees whole lines, so a problem in a line
    it has read has been noted; one the parser has not reached when the file ends
    (`pending`) is raised then.
    """

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.chunk_bytes = CHUNK_BYTES
        self.bad_utf8: _Problem | None = None
        self.nul: _Problem | None = None

    def due(self, line: int, *, csv_lines: bool = False) -> _Problem | None:
        """The problem at or before line `line` (`_Problem.csv_line` with `csv_lines`, else
        `_Problem.line`), if any; invalid UTF-8 first."""
        for problem in (self.bad_utf8, self.nul):
            if problem is not None and (problem.csv_line if csv_lines else problem.line) <= line:
                return problem
        return None

    def within(self, fields: Sequence[str]) -> _Problem | None:
        """The problem whose character one of `fields` holds, if any (invalid UTF-8 first).
        Only the bad bytes and NULs met so far escape into the text, so the first CSV row that
        holds one is the row of the first."""
        for problem in (self.bad_utf8, self.nul):
            if problem is not None and any(map(problem.pattern.search, fields)):
                return problem
        return None

    def pending(self) -> _Problem | None:
        return self.bad_utf8 or self.nul

    def chunks(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        offset = 0  # bytes decoded so far, after the BOM
        newlines = 0  # "\n" in the text so far
        breaks = 0  # csv line ends in the text so far (a final "\r" counted as one)
        after_cr = False  # the text so far ends with "\r"
        first = True
        while True:
            data = self.file.read(max(self.chunk_bytes, 3) if first else self.chunk_bytes)
            final = not data
            if first:
                first = False
                if data.startswith(codecs.BOM_UTF8):
                    data = data[len(codecs.BOM_UTF8) :]
            text, bad = self._decode(decoder, data, final, offset)
            offset += len(data)
            joined = int(after_cr and text.startswith("\n"))  # "\r" | "\n": one line end
            if bad is not None:
                match = _SURROGATE_RE.search(text)
                at = match.start() if match else 0
                line = newlines + text.count("\n", 0, at) + 1
                csv_line = breaks - (joined if at else 0) + _breaks(text[:at]) + 1
                self.bad_utf8 = _Problem(
                    line,
                    csv_line,
                    f"not valid UTF-8: bytes {bad[1]} at byte offset {bad[0]} (line {line}); "
                    f"save the file as UTF-8",
                    _SURROGATE_RE,
                )
            if self.nul is None:
                at = text.find("\x00")
                if at >= 0:
                    line = newlines + text.count("\n", 0, at) + 1
                    csv_line = breaks - (joined if at else 0) + _breaks(text[:at]) + 1
                    self.nul = _Problem(
                        line,
                        csv_line,
                        f"contains a NUL byte (line {line}); is this a binary or UTF-16 file?",
                        _NUL_RE,
                    )
            if text:
                newlines += text.count("\n")
                breaks += _breaks(text) - joined
                after_cr = text.endswith("\r")
                yield text
            if final:
                return

    @staticmethod
    def _decode(
        decoder: codecs.IncrementalDecoder, data: bytes, final: bool, offset: int
    ) -> tuple[str, tuple[int, str] | None]:
        """The text of `data`, and at the first invalid UTF-8 its byte offset in the file and
        its bytes (hex); the decoder then goes on with ``surrogateescape``."""
        held = decoder.getstate()[0]  # the start of a sequence cut by the last chunk
        try:
            return decoder.decode(data, final), None
        except UnicodeDecodeError as exc:
            bad = exc.object[exc.start : exc.end].hex(" ")  # exc.object: held + data
            decoder.errors = "surrogateescape"
            return decoder.decode(data, final), (offset - len(held) + exc.start, bad)


_LINE_BREAK = re.compile(r"\r\n?|\n")


def _csv_lines(chunks: Iterable[str]) -> Iterator[str]:
    """The lines of text that arrives in chunks, split as `io.StringIO(text, newline="")`
    splits them (at ``\\n``, ``\\r\\n`` or ``\\r``, the ending kept), for `csv.reader`."""
    return itertools.chain.from_iterable(_csv_line_batches(chunks))


def _csv_line_batches(chunks: Iterable[str]) -> Iterator[Iterable[str]]:
    partial: list[str] = []  # the start of a line whose end has not come yet
    held = ""  # a chunk's final "\r": the next chunk may begin with its "\n"
    for chunk in chunks:
        text = held + chunk if held else chunk
        held = ""
        if text.endswith("\r"):
            text, held = text[:-1], "\r"
        last = max(text.rfind("\n"), text.rfind("\r"))  # a "\r" here is not before a "\n"
        if last < 0:
            partial.append(text)
            continue
        start = 0
        if partial:
            match = _LINE_BREAK.search(text)
            assert match is not None
            start = match.end()
            partial.append(text[:start])
            yield ("".join(partial),)
            partial = []
        if start <= last:
            yield io.StringIO(text[start : last + 1], newline="")
        if last + 1 < len(text):
            partial.append(text[last + 1 :])
    rest = "".join(partial) + held
    if rest:
        yield (rest,)


def _jsonl_lines(chunks: Iterable[str]) -> Iterator[str]:
    """The lines of text that arrives in chunks, split at ``\\n`` (the ``\\n`` dropped),
    as `text.split("\\n")` splits it."""
    return itertools.chain.from_iterable(_jsonl_line_batches(chunks))


def _jsonl_line_batches(chunks: Iterable[str]) -> Iterator[list[str]]:
    partial: list[str] = []
    for text in chunks:
        last = text.rfind("\n")
        if last < 0:
            partial.append(text)
            continue
        partial.append(text[:last])
        yield "".join(partial).split("\n")
        partial = [text[last + 1 :]]
    yield ["".join(partial)]


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


def _parse_csv(text: _TextStream, name: str, limits: _Limits) -> Iterator[Record]:
    field_limit = CSV_FIELD_LIMIT
    if limits.max_field_chars is not None:
        field_limit = max(field_limit, limits.max_field_chars + 1)
    if csv.field_size_limit() < field_limit:
        csv.field_size_limit(field_limit)
    reader = csv.reader(_csv_lines(text.chunks()), strict=True)
    header: list[str] | None = None
    row = 0
    try:
        for fields in reader:
            if not fields:
                continue  # blank line
            if text.bad_utf8 is not None or text.nul is not None:
                problem = text.within(fields)
                if problem is not None:
                    if header is None:
                        raise problem.error(name, None)
                    raise problem.error(name, row + 1, fields, header)
            if len(fields) == 1 and not fields[0].strip():
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
            yield dict(zip(header, fields, strict=True))
    except csv.Error as exc:
        problem = text.due(reader.line_num, csv_lines=True)
        if problem is not None:
            raise problem.error(name, row + 1 if header is not None else None) from None
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
    problem = text.pending()
    if problem is not None:
        raise problem.error(name, None)
    if header is None:
        raise DataError("no rows: the file is empty", file=name)
    if row == 0:
        raise DataError("no rows: the file has a header but no data rows", file=name)


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


def _parse_jsonl(text: _TextStream, name: str, limits: _Limits) -> Iterator[Record]:
    row = 0
    for line_no, line in enumerate(_jsonl_lines(text.chunks()), 1):
        if not line.strip():
            continue
        row += 1
        problem = text.due(line_no)
        if problem is not None:
            raise problem.error(name, row)
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
        yield obj
    problem = text.pending()
    if problem is not None:
        raise problem.error(name, None)
    if row == 0:
        raise DataError("no rows: the file is empty", file=name)
