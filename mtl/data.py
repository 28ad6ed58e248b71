"""Torch-side data: dummy data, tokenised examples, padding, length-grouped batches, schedules.

Every dataset here yields items ``{"input_ids": list[int], "labels": {task: int}}`` (no
padding) and has a `lengths` array; `collate` pads a list of items to the longest one, and
`batch(indices, pad_id)` does the same straight from the stored arrays (faster). A missing label
is `IGNORE_INDEX` (-100). Randomness comes only from generators seeded by the arguments, never
from global RNG state.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import chain
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from mtl.config import DummyData, TrainConfig
from mtl.datafiles import IGNORE_INDEX, Source

__all__ = [
    "IGNORE_INDEX",
    "DummyMTLDataset",
    "LengthGroupedBatchSampler",
    "MTLExamples",
    "assign_batches",
    "collate",
    "dummy_datasets",
    "encode_texts",
    "pad_batch",
    "schedule_sources",
]

Item = dict[str, Any]
Batch = dict[str, Any]

#: BERT's special token ids in the usual uncased vocab ([PAD]=0, [UNK]..[MASK]=100..103).
_BERT_SPECIAL = frozenset({0, 100, 101, 102, 103})


# ------------------------------------------------------------------------------------ padding


def pad_batch(
    sequences: Sequence[Sequence[int]], labels: Mapping[str, torch.Tensor], pad_id: int = 0
) -> Batch:
    """Pad id lists to the longest one: ``input_ids``/``attention_mask`` [B, L] long."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = int(lengths.max()) if len(sequences) else 0
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    flat = torch.tensor(list(chain.from_iterable(sequences)), dtype=torch.long)
    input_ids[mask] = flat  # row-major order of the mask matches the concatenation order
    return {"input_ids": input_ids, "attention_mask": mask.long(), "labels": dict(labels)}


def collate(batch: Sequence[Item], pad_id: int = 0) -> Batch:
    """Pad items to the longest in the batch.

    Returns ``input_ids`` [B, L] long, ``attention_mask`` [B, L] long (1 on real tokens) and
    ``labels``: {task: LongTensor [B]}. Items may hold lists or 1-d tensors of ids.
    """
    seqs = [
        it["input_ids"].tolist() if isinstance(it["input_ids"], torch.Tensor) else it["input_ids"]
        for it in batch
    ]
    tasks = list(batch[0]["labels"]) if batch else []
    labels = {
        t: torch.tensor([int(it["labels"][t]) for it in batch], dtype=torch.long) for t in tasks
    }
    return pad_batch(seqs, labels, pad_id)


# ---------------------------------------------------------------------------------- tokenising


def encode_texts(
    tokenizer: Any, texts: Sequence[str], max_length: int, *, chunk_size: int = 4096
) -> list[list[int]]:
    """Token ids of every text: special tokens added, truncated to `max_length`, not padded.

    Calls the (fast) tokenizer on chunks of `chunk_size` texts.
    """
    out: list[list[int]] = []
    for start in range(0, len(texts), chunk_size):
        enc = tokenizer(
            list(texts[start : start + chunk_size]),
            add_special_tokens=True,
            truncation=True,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        out.extend(list(ids) for ids in enc["input_ids"])
    return out


# ------------------------------------------------------------------------------------ datasets


class MTLExamples(Dataset[Item]):
    """Pre-tokenised examples with one label array per task (`IGNORE_INDEX` when missing)."""

    def __init__(
        self,
        input_ids: Sequence[Sequence[int]],
        labels: Mapping[str, Sequence[int]],
        name: str = "",
    ) -> None:
        self.input_ids: list[list[int]] = [list(ids) for ids in input_ids]
        n = len(self.input_ids)
        self.labels: dict[str, torch.Tensor] = {}
        for task, values in labels.items():
            tensor = torch.as_tensor(values, dtype=torch.long).reshape(-1)
            if len(tensor) != n:
                raise ValueError(f"task {task!r}: {len(tensor)} labels for {n} examples")
            self.labels[task] = tensor
        self.name = name
        self.lengths = np.fromiter((len(s) for s in self.input_ids), dtype=np.int64, count=n)

    @classmethod
    def from_source(cls, source: Source, tokenizer: Any, max_length: int) -> MTLExamples:
        """Tokenise a `mtl.datafiles.Source`."""
        return cls(encode_texts(tokenizer, source.texts, max_length), source.labels, source.name)

    @property
    def tasks(self) -> list[str]:
        return list(self.labels)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> Item:
        return {
            "input_ids": self.input_ids[index],
            "labels": {t: int(v[index]) for t, v in self.labels.items()},
        }

    def batch(self, indices: Sequence[int], pad_id: int = 0) -> Batch:
        """The padded batch of `indices` (same as `collate` of the items, faster)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        labels = {t: v[idx] for t, v in self.labels.items()}
        return pad_batch([self.input_ids[i] for i in indices], labels, pad_id)


class DummyMTLDataset(Dataset[Item]):
    """Random token ids with one label per task.

    Filler ids are uniform in [1000, vocab_size) when vocab_size > 2000 (above BERT's special
    and unused ids), else in [4 + #signal tokens, vocab_size). Lengths are uniform in
    [seq_len // 2, seq_len]; `input_ids`/`attention_mask` [N, seq_len] hold pad id 0 beyond.

    `learnable=True`: every (task, class) has its own signal token id (`signal_tokens`, low ids,
    all distinct) and each example holds the signal token of its class for every task at
    ~20% of its real positions (at least one), so the label is the task's signal token that is
    present. Otherwise the labels are independent noise.
    """

    SIGNAL_SHARE = 0.2

    def __init__(
        self,
        num_samples: int,
        seq_len: int,
        vocab_size: int = 30522,
        tasks: Mapping[str, int] | None = None,
        learnable: bool = False,
        seed: int = 0,
    ) -> None:
        if not tasks:
            raise ValueError("tasks must name at least one task: {name: num_classes}")
        tasks = dict(tasks)
        if num_samples < 1 or seq_len < 1:
            raise ValueError("num_samples and seq_len must be >= 1")
        self.tasks = list(tasks)
        self.num_classes = tasks
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.learnable = learnable
        self.seed = seed
        self.signal_tokens, filler_low = self._signal_ids(tasks, vocab_size, learnable)
        if filler_low >= vocab_size:
            raise ValueError(f"vocab_size {vocab_size} too small for the filler ids")
        min_len = max(1, seq_len // 2)
        if learnable:
            if seq_len < len(tasks):
                raise ValueError(
                    f"learnable dummy data needs seq_len >= number of tasks ({len(tasks)})"
                )
            min_len = max(min_len, len(tasks))

        g = torch.Generator().manual_seed(seed)
        n, s = num_samples, seq_len
        ids = torch.randint(filler_low, vocab_size, (n, s), generator=g)
        lengths = torch.randint(min_len, s + 1, (n,), generator=g)
        self.labels = {
            t: torch.randint(0, c, (n,), generator=g, dtype=torch.long) for t, c in tasks.items()
        }
        positions = torch.arange(s).unsqueeze(0)
        real = positions < lengths.unsqueeze(1)
        if learnable:
            # a random rank for every real position; task t owns ranks [t*k, (t+1)*k)
            keys = torch.rand((n, s), generator=g).masked_fill(~real, 2.0)
            order = keys.argsort(dim=1)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, positions.expand(n, s).contiguous())
            k = (lengths.double() * self.SIGNAL_SHARE).round().long().clamp(min=1)
            k = torch.minimum(k, lengths // len(tasks)).unsqueeze(1)
            for t_i, task in enumerate(self.tasks):
                table = torch.tensor(self.signal_tokens[task], dtype=torch.long)
                sig = table[self.labels[task]].unsqueeze(1)
                owned = (rank >= t_i * k) & (rank < (t_i + 1) * k)
                ids = torch.where(owned, sig, ids)
        self.input_ids = ids.masked_fill(~real, 0)
        self.attention_mask = real.long()
        self.lengths = lengths.numpy().astype(np.int64)

    @staticmethod
    def _signal_ids(
        tasks: Mapping[str, int], vocab_size: int, learnable: bool
    ) -> tuple[dict[str, list[int]], int]:
        """Signal token ids per task and the lowest filler id."""
        needed = sum(tasks.values()) if learnable else 0
        if vocab_size > 2000:
            pool = [i for i in range(1, 1000) if i not in _BERT_SPECIAL]
            filler_low = 1000
        else:
            pool = list(range(4, 4 + needed))
            filler_low = 4 + needed
        if needed > len(pool):
            raise ValueError(f"learnable dummy data needs {needed} signal ids: too many classes")
        signals: dict[str, list[int]] = {}
        if learnable:
            it = iter(pool)
            signals = {t: [next(it) for _ in range(c)] for t, c in tasks.items()}
        return signals, filler_low

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> Item:
        length = int(self.lengths[index])
        return {
            "input_ids": self.input_ids[index, :length].tolist(),
            "labels": {t: int(v[index]) for t, v in self.labels.items()},
        }

    def batch(self, indices: Sequence[int], pad_id: int = 0) -> Batch:
        """The padded batch of `indices`, trimmed to its longest example."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        width = int(self.lengths[np.asarray(indices, dtype=np.int64)].max())
        ids = self.input_ids[idx, :width]
        mask = self.attention_mask[idx, :width]
        if pad_id != 0:
            ids = ids.masked_fill(mask == 0, pad_id)
        return {
            "input_ids": ids.clone(),
            "attention_mask": mask.clone(),
            "labels": {t: v[idx] for t, v in self.labels.items()},
        }


def dummy_datasets(config: TrainConfig) -> tuple[DummyMTLDataset, DummyMTLDataset | None]:
    """Train and eval sets of a `DummyData` config (eval: seed + 1, same signal tokens)."""
    data = config.data
    if not isinstance(data, DummyData):
        raise TypeError("dummy_datasets needs data.kind='dummy'")
    tasks = {t.name: t.n_classes for t in config.tasks}

    def make(n: int, seed: int) -> DummyMTLDataset:
        return DummyMTLDataset(n, data.seq_len, data.vocab_size, tasks, data.learnable, seed)

    train = make(data.num_samples, data.seed)
    return train, (make(data.eval_samples, data.seed + 1) if data.eval_samples > 0 else None)


# ------------------------------------------------------------------------------------ sampling


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of indices of texts with similar lengths, deterministic given (seed, epoch).

    shuffle + group_by_length: shuffle, cut into megabatches of `megabatch_mult * batch_size`,
    sort each by length (longest first), cut into batches, shuffle the batch order (with
    `longest_first`, the batch holding the longest text goes first to surface OOM early).
    shuffle only: plain shuffled batches. No shuffle (eval): in order, or sorted by length
    (longest first) with `group_by_length`. Every index appears exactly once per epoch unless
    `drop_last` drops the one short batch.

    `batches(epoch)` returns the epoch's batches, so a resumed run can skip the first k; as a
    DataLoader `batch_sampler`, `set_epoch(epoch, skip)` picks what `__iter__` yields.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        group_by_length: bool = True,
        megabatch_mult: int = 50,
        drop_last: bool = False,
        longest_first: bool = False,
    ) -> None:
        if batch_size < 1 or megabatch_mult < 1:
            raise ValueError("batch_size and megabatch_mult must be >= 1")
        super().__init__()
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.skip = 0
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.megabatch_mult = megabatch_mult
        self.drop_last = drop_last
        self.longest_first = longest_first

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Make `__iter__` yield the batches of `epoch`, less the first `skip`."""
        self.epoch = epoch
        self.skip = skip

    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        bs = self.batch_size
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        if self.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        return batches

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of `epoch` (default: the current one), as lists of indices."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.lengths)
        if n == 0:
            return []
        lengths = self.lengths
        if not self.shuffle:
            grouped = self.group_by_length
            order = np.argsort(-lengths, kind="stable") if grouped else np.arange(n)
            return [b.tolist() for b in self._cut(order)]
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(n)
        if not self.group_by_length:
            return [b.tolist() for b in self._cut(perm)]
        mega = self.megabatch_mult * self.batch_size
        parts = []
        for start in range(0, n, mega):
            chunk = perm[start : start + mega]
            parts.append(chunk[np.argsort(-lengths[chunk], kind="stable")])
        # only the last megabatch can be short, so only the final batch can be short
        batches = self._cut(np.concatenate(parts))
        order = rng.permutation(len(batches))
        if self.longest_first and len(batches) > 1:
            top = int(np.argmax([lengths[batches[i]].max() for i in order]))
            order[[0, top]] = order[[top, 0]]
        return [batches[i].tolist() for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.skip :]

    def __len__(self) -> int:
        n, bs = len(self.lengths), self.batch_size
        return n // bs if self.drop_last else -(-n // bs)


SamplingMode = Literal["proportional", "round_robin", "temperature"]


def schedule_sources(
    num_batches_per_source: Sequence[int],
    mode: SamplingMode = "proportional",
    temperature: float = 1.0,
    seed: int = 0,
    epoch: int = 0,
) -> list[int]:
    """The source index of each batch of an epoch, deterministic given (seed, epoch).

    proportional: every batch of every source once, randomly interleaved.
    round_robin: sources in turn (0, 1, 2, 0, 1, 2, ...), as many rounds as the largest
    source has batches; smaller sources cycle through their batches again.
    temperature: sum(n_i) picks, each drawn with p_i proportional to n_i ** (1 / temperature)
    (T=1: proportional to size; large T: near uniform); sources cycle when they run out.
    Sources with no batches never appear. Use `assign_batches` to get which batch each is.
    """
    counts = [int(c) for c in num_batches_per_source]
    if any(c < 0 for c in counts):
        raise ValueError("batch counts must be >= 0")
    active = [i for i, c in enumerate(counts) if c > 0]
    if not active:
        return []
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    if mode == "proportional":
        order = np.repeat(np.arange(len(counts)), counts)
        return rng.permutation(order).tolist()
    if mode == "round_robin":
        return active * max(counts)
    if mode == "temperature":
        if not temperature > 0:
            raise ValueError("temperature must be > 0")
        weights = np.zeros(len(counts))
        c = np.asarray(counts, dtype=np.float64)
        weights[active] = np.exp(np.log(c[active]) / temperature)
        return rng.choice(len(counts), size=sum(counts), p=weights / weights.sum()).tolist()
    raise ValueError(f"unknown sampling mode {mode!r}")


def assign_batches(
    schedule: Sequence[int], num_batches_per_source: Sequence[int]
) -> list[tuple[int, int]]:
    """(source, batch index) per step: the k-th pick of source i uses its batch k % n_i."""
    seen = [0] * len(num_batches_per_source)
    out: list[tuple[int, int]] = []
    for src in schedule:
        out.append((src, seen[src] % num_batches_per_source[src]))
        seen[src] += 1
    return out
