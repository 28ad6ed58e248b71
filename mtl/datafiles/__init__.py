"""Reading and checking labelled text files. Torch-free: the REST API imports it.

The package, by job (import from `mtl.datafiles`; the modules are its layout, not its API):

- `reading`: detecting the format (CSV or JSONL), reading and decoding a file into records
  (`iter_records` streams them one at a time in bounded memory, `read_records` lists them;
  both with optional caps on columns per row and characters per value), and locating parse
  errors by row, line and column. Its docstring says how rows are numbered.
- `columns`: the columns of records (`record_columns`, `require_columns`) and checking a
  text value (`check_text`); small helpers for error messages shared by the other modules.
- `labels`: label values (`label_key`, missing labels), `LabelMap` (label values to class
  ids, `IGNORE_INDEX` for a missing label) and `build_label_maps`.
- `inspection`: `DatasetInfo` and `inspect_records`, the summary of an uploaded file (one
  pass over any iterable of records, bounded state per column).
- `prepare`: `check_data`, which reads every file a config names and encodes it as
  `PreparedData` (a `Source` per split and group of tasks, with the validation holdout).

Every problem is a `mtl.errors.DataError` naming the file, row and column.
"""

from .columns import check_text, record_columns, require_columns
from .inspection import DatasetInfo, inspect_records
from .labels import IGNORE_INDEX, LabelMap, build_label_maps, label_key
from .prepare import SPLITS, PreparedData, Source, check_data
from .reading import detect_format, iter_records, read_records

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
    "iter_records",
    "label_key",
    "read_records",
    "record_columns",
    "require_columns",
]
