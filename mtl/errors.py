"""Exceptions raised by mtl. None of them needs torch.

MTLError
├── ConfigError      a config that cannot be used (names the file and field)
├── DataError        data that does not fit the config (names the file, row and column)
├── ModelError       a model that cannot be loaded or built (bad path, refused id)
│   └── TorchRequired  a model only PyTorch can run, where torch is not installed
└── TrainingError    a run that cannot go on (non-finite loss, no usable batches)
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "MTLError",
    "ModelError",
    "TorchRequired",
    "TrainingError",
]


class MTLError(Exception):
    """Base of every error mtl raises on purpose."""


class ConfigError(MTLError, ValueError):
    """A config that cannot be used; the message names the file and field."""


class DataError(MTLError):
    """Data that does not fit the config. `str()` names the file, row and column."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.row = row
        self.column = column
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class ModelError(MTLError):
    """A model that cannot be loaded or built."""


class TorchRequired(ModelError):
    """A model that only PyTorch can run (it, or a member of the ensemble, has no ONNX export),
    in an install without torch (e.g. the lean API, `mtl-jobs[api]`). `reason` says what is
    missing without naming paths (a service words it for its clients)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class TrainingError(MTLError):
    """A run that cannot go on."""
