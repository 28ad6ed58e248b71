"""From a config to the batches the loop consumes: tokenise once, plan each epoch's batches.

`TrainData.epoch_plan(epoch)` is a sequence of batches that is the same for the same
(seed, epoch), so a resumed run skips exactly the batches it already trained on. Batches are
padded lazily, when the loop asks for them. On several devices the plan holds the global
batches (`batch_size * devices` rows) and each rank trains on `plan.shard(i, rank, world)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, overload

import torch
from torch import Tensor

from mtl.config import FileData, TrainConfig
from mtl.data import (
    LengthGroupedBatchSampler,
    MTLExamples,
    assign_batches,
    dummy_datasets,
    schedule_sources,
)
from mtl.datafiles import IGNORE_INDEX, check_data
from mtl.distributed import shard
from mtl.errors import DataError

__all__ = ["Batch", "Shard", "TrainData", "build_train_data"]


@dataclass
class Batch:
    input_ids: Tensor  # [B, L] long
    attention_mask: Tensor  # [B, L] long
    labels: dict[str, Tensor]  # task -> [B] long, IGNORE_INDEX where missing
    present: list[str]  # tasks with at least one label in this batch
    counts: dict[str, int]  # labelled rows per present task


@dataclass
class Shard:
    """One rank's share of a global batch (several devices, see `mtl.distributed`)."""

    batch: Batch  # this rank's rows; one row with no labels when it has none
    labels: dict[str, Tensor]  # task -> [rows] the whole global batch's labels
    present: list[str]  # tasks with at least one label in the global batch
    rows: int  # rows of the global batch
    local_rows: int  # this rank's real rows (0: `batch` is the unlabelled stand-in)


class _Examples(Protocol):
    labels: dict[str, Tensor]
    lengths: Any

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int], pad_id: int = 0) -> dict[str, Any]: ...


def _make_batch(examples: _Examples, indices: Sequence[int], pad_id: int) -> Batch:
    raw = examples.batch(indices, pad_id)
    labels: dict[str, Tensor] = raw["labels"]
    counts = {t: int((y != IGNORE_INDEX).sum()) for t, y in labels.items()}
    present = [t for t, c in counts.items() if c > 0]
    return Batch(raw["input_ids"], raw["attention_mask"], labels, present, counts)


class _Plan(Sequence[Batch]):
    """Batches of one epoch (or one evaluation split), padded on access."""

    def __init__(self, items: list[tuple[int, list[int]]], sources: list[_Examples], pad_id: int):
        self.items = items
        self.sources = sources
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> Batch: ...
    @overload
    def __getitem__(self, index: slice) -> list[Batch]: ...
    def __getitem__(self, index: int | slice) -> Batch | list[Batch]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        source, indices = self.items[index]
        return _make_batch(self.sources[source], indices, self.pad_id)

    def shard(self, index: int, rank: int, world: int) -> Shard:
        """Rank `rank`'s contiguous share of global batch `index` (`mtl.distributed.shard`),
        with the global batch's labels (which scale the rank's losses to the global ones)."""
        source, indices = self.items[index]
        examples = self.sources[source]
        part = shard(indices, rank, world)
        idx = torch.as_tensor(indices, dtype=torch.long)
        labels = {t: y[idx] for t, y in examples.labels.items()}
        present = [t for t, y in labels.items() if bool((y != IGNORE_INDEX).any())]
        if part:
            batch = _make_batch(examples, part, self.pad_id)
        else:  # fewer rows than ranks: one stand-in row that no task learns from
            batch = _make_batch(examples, indices[-1:], self.pad_id)
            batch.labels = {t: torch.full_like(y, IGNORE_INDEX) for t, y in batch.labels.items()}
            batch.present, batch.counts = [], {}
        return Shard(batch, labels, present, len(indices), len(part))


class TrainData:
    def __init__(
        self,
        config: TrainConfig,
        train: list[_Examples],
        evals: dict[str, list[_Examples]],
        label_names: dict[str, list[str]],
        pad_id: int,
    ) -> None:
        if not train or sum(len(s) for s in train) == 0:
            raise DataError("the training split has no examples")
        self.config = config
        self.train = train
        self.evals = {k: v for k, v in evals.items() if v and sum(len(s) for s in v) > 0}
        self.label_names = label_names
        self.pad_id = pad_id
        self.samplers = [
            LengthGroupedBatchSampler(
                s.lengths,
                config.batch_size * config.devices,  # the global batch (see `_Plan.shard`)
                seed=config.seed + i,  # decorrelate sources of the same size
                shuffle=True,
                group_by_length=config.length_grouping,
            )
            for i, s in enumerate(train)
        ]

    def _batches_per_source(self) -> list[int]:
        return [len(s) for s in self.samplers]

    def batches_per_epoch(self) -> int:
        counts = self._batches_per_source()
        if len(counts) == 1:
            return counts[0]
        data = self.config.data
        assert isinstance(data, FileData)
        return len(schedule_sources(counts, data.sampling, data.temperature, 0, 0))

    def steps_per_epoch(self, accum: int) -> int:
        return math.ceil(self.batches_per_epoch() / accum)

    def epoch_plan(self, epoch: int) -> _Plan:
        per_source = [s.batches(epoch) for s in self.samplers]
        if len(per_source) == 1:
            items = [(0, b) for b in per_source[0]]
        else:
            data = self.config.data
            assert isinstance(data, FileData)
            counts = [len(b) for b in per_source]
            schedule = schedule_sources(
                counts, data.sampling, data.temperature, self.config.seed, epoch
            )
            items = [(src, per_source[src][k]) for src, k in assign_batches(schedule, counts)]
        return _Plan(items, self.train, self.pad_id)

    def eval_plan(self, split: str) -> _Plan | None:
        sources = self.evals.get(split)
        if not sources:
            return None
        size = self.config.eval_batch_size or 2 * self.config.batch_size * self.config.devices
        items = []
        for i, s in enumerate(sources):
            sampler = LengthGroupedBatchSampler(s.lengths, size, seed=0, shuffle=False)
            items += [(i, b) for b in sampler.batches(0)]
        return _Plan(items, sources, self.pad_id)

    def class_counts(self, task: str, num_classes: int) -> Tensor:
        counts = torch.zeros(num_classes, dtype=torch.long)
        for s in self.train:
            y = s.labels.get(task)
            if y is not None:
                y = y[y != IGNORE_INDEX]
                counts += torch.bincount(y, minlength=num_classes)[:num_classes]
        return counts


def build_train_data(
    config: TrainConfig, tokenizer: Any | None, resolve: Callable[[str], Path] | None = None
) -> TrainData:
    """Dummy data, or the config's files read, checked and tokenised once."""
    if config.data.kind == "dummy":
        train, evals = dummy_datasets(config)
        names = {t.name: t.labels or [str(i) for i in range(t.n_classes)] for t in config.tasks}
        return TrainData(config, [train], {"validation": [evals] if evals else []}, names, 0)
    prepared = check_data(config, resolve)
    assert prepared is not None and tokenizer is not None
    max_length = config.encoder.max_length

    def tokenise(split: str) -> list[_Examples]:
        return [
            MTLExamples.from_source(s, tokenizer, max_length)
            for s in prepared.split(split)
            if len(s) > 0
        ]

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TrainData(
        config,
        tokenise("train"),
        {"validation": tokenise("validation"), "test": tokenise("test")},
        prepared.label_names,
        pad_id,
    )
