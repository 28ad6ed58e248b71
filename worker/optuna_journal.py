"""Optuna's study state in the service's own Redis, without pickle.

Optuna's `JournalStorage` keeps a study as a journal of JSON operations (`JournalRedisBackend`:
``<prefix>:log_number`` and ``<prefix>:log:<n>``) and, every so often, a *pickled* snapshot of
its replayed state to load faster. The service promises that it unpickles nothing it stores
(docs/reliability.md), so the snapshot methods do nothing here: a process that opens a study
replays its journal, which for a study of a few hundred trials takes milliseconds.
"""

from __future__ import annotations

import warnings

import optuna
from optuna.storages.journal import JournalRedisBackend, JournalStorage

__all__ = ["NoSnapshotRedisJournal", "journal_storage"]


class NoSnapshotRedisJournal(JournalRedisBackend):
    """`JournalRedisBackend` whose (pickled) snapshots are never written nor read."""

    def save_snapshot(self, snapshot: bytes) -> None:
        return None

    def load_snapshot(self) -> bytes | None:
        return None


def journal_storage(redis_url: str, prefix: str) -> optuna.storages.BaseStorage:
    with warnings.catch_warnings():  # "JournalRedisBackend is experimental": known, pinned
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return JournalStorage(NoSnapshotRedisJournal(redis_url, prefix=prefix))
