"""Loaded models for `POST /v1/jobs/{id}/predict`: a small LRU cache, used from threads, and
the micro-batcher in front of it.

Prediction runs in the API process (in worker threads, never on the event loop), so it never
waits behind a training job in the queue. A model folder with an ONNX export (`mtl.onnx`; every
member's, for an ensemble) runs on ONNX Runtime, one without on PyTorch
(`mtl.ort_predict.load_predictor`); torch is imported only for the latter, on first use.

Batching (`PredictBatcher`, `PredictorCache.predict_batched`): predict calls on the same model
that arrive together run as one call of the model, their texts concatenated in arrival order
and the rows handed back to each caller. One batch per model runs at a time; the calls that
arrive meanwhile queue up and form the next batch, and the first call of a batch waits at most
`wait_s` for companions (none once `max_batch` texts are queued). A call of more than
`max_batch` texts runs alone. A batch runs its texts sorted by length (`CHUNK` at a time), so
short texts are not padded to the longest of the batch. Everything but the model run happens
on the event loop (a queue of futures per model and one task draining it), so waiting for a
batch blocks nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from mtl.errors import ModelError
from mtl.ort_predict import Prefer

__all__ = ["PredictBatcher", "PredictorCache"]

Rows = list[dict[str, Any]]

#: Texts per model call within one prediction, sorted by length. On 2 CPU cores (MiniLM-L6,
#: int8 ONNX, 64 review sentences): one at a time 30 texts/s, one padded chunk of 64 27/s,
#: sorted chunks of 8 or 16 45-65/s; whole reviews (~76 tokens) ran 10-14/s every way.
CHUNK = 16


class _Entry:
    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        # tokenizers are not safe to share across threads (ONNX Runtime's run is, PyTorch's
        # model is in practice; one prediction per model at a time keeps it simple)
        self.lock = threading.Lock()


class PredictorCache:
    """`prefer`: "auto" (ONNX Runtime where the folder has an ONNX export), "onnx" or "torch"
    (see `load_predictor`); `intra_op_threads`: ONNX Runtime's threads per prediction (None:
    its default, one per physical core)."""

    def __init__(
        self,
        size: int = 2,
        *,
        prefer: Prefer = "auto",
        intra_op_threads: int | None = None,
        batch_wait_s: float = 0.005,
        max_batch: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.size = size
        self.prefer: Prefer = prefer
        self.intra_op_threads = intra_op_threads
        self._entries: OrderedDict[tuple[str, float], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, float], threading.Lock] = {}
        self.batcher = PredictBatcher(
            self.predict, wait_s=batch_wait_s, max_batch=max_batch, on_batch=on_batch
        )

    def _entry(self, model_dir: Path) -> _Entry:
        try:
            mtime = (model_dir / "mtl.json").stat().st_mtime
        except FileNotFoundError:  # deleted since it was staged (e.g. its job was deleted)
            raise ModelError(f"{model_dir.name}: the model was removed") from None
        key = (str(model_dir), mtime)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per model, however many requests arrive at once
            with self._lock:
                entry = self._entries.get(key)
            if entry is None:
                from mtl.ort_predict import load_predictor

                entry = _Entry(
                    load_predictor(
                        model_dir,
                        self.prefer,
                        device="cpu",
                        intra_op_threads=self.intra_op_threads,
                    )
                )
                gc.freeze()  # the libraries and the model: long-lived, out of full GC passes
                with self._lock:
                    self._entries[key] = entry
                    self._entries.move_to_end(key)
                    while len(self._entries) > self.size:
                        self._entries.popitem(last=False)
                    self._loading.pop(key, None)
        return entry

    def predict(self, model_dir: Path, texts: list[str]) -> Rows:
        """Every task's prediction for `texts`, in their order (blocking: call it from a
        thread). The texts run shortest first in chunks of `CHUNK`, so a chunk pads its texts
        to a similar length rather than to the longest of them all."""
        entry = self._entry(model_dir)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with entry.lock:
            rows = entry.predictor.predict([texts[i] for i in order], batch_size=CHUNK)
        out: Rows = [{}] * len(texts)
        for row, i in zip(rows, order, strict=True):
            out[i] = row
        return out

    async def predict_batched(
        self, model_dir: Path, texts: list[str], limiter: anyio.CapacityLimiter
    ) -> Rows:
        """`predict` from the event loop, batched with the other calls on the same model (see
        `PredictBatcher`); the model runs in a thread of `limiter`."""
        return await self.batcher.predict(model_dir, texts, limiter)

    def evict(self, model_dir: Path) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[0] == str(model_dir)]:
                del self._entries[key]


@dataclass(eq=False)
class _Call:
    texts: list[str]
    future: asyncio.Future[Rows]
    arrived: float


@dataclass(eq=False)
class _Lane:
    """The calls waiting for one model, and the task that runs them."""

    model_dir: Path
    limiter: anyio.CapacityLimiter
    pending: deque[_Call] = field(default_factory=deque)
    queued: int = 0  # texts in `pending`
    full: asyncio.Event = field(default_factory=asyncio.Event)
    running: list[_Call] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


class PredictBatcher:
    """Runs concurrent predict calls on the same model as one call of `run` (blocking, in a
    thread of the caller's limiter): `await batcher.predict(model_dir, texts, limiter)`.

    Per model (by folder) a queue of calls and one task that drains it: it waits until
    `max_batch` texts are queued or the oldest queued call has waited `wait_s`, takes whole
    calls in arrival order up to `max_batch` texts (at least one call: a larger one runs
    alone), runs them and hands each call its own rows, in order. An exception of the run
    reaches every call of that batch. The wait is skipped while the model's previous batch was
    a single call (a lone, sequential caller pays no wait; the calls that arrive during its
    run still make the next batch together, and waiting resumes after such a batch).
    `max_batch` 1 turns batching off: each call runs on its own, as `run` in a thread.
    `wait_s` 0 never waits for companions, but the calls that queue while the model is busy
    still run together. `on_batch(texts)` is told the size of every run (a metric)."""

    def __init__(
        self,
        run: Callable[[Path, list[str]], Rows],
        *,
        wait_s: float = 0.005,
        max_batch: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if wait_s < 0 or max_batch < 1:
            raise ValueError("wait_s must be at least 0 and max_batch at least 1")
        self.run = run
        self.wait_s = wait_s
        self.max_batch = max_batch
        self.on_batch = on_batch
        self._lanes: dict[str, _Lane] = {}
        # per model: did its last batch hold more than one call? (a model never seen: yes)
        self._company: OrderedDict[str, bool] = OrderedDict()

    async def predict(
        self, model_dir: Path, texts: list[str], limiter: anyio.CapacityLimiter
    ) -> Rows:
        if self.max_batch == 1 or not texts:
            return await self._run_in_thread(model_dir, texts, limiter)
        loop = asyncio.get_running_loop()
        key = str(model_dir)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(model_dir, limiter)
        call = _Call(list(texts), loop.create_future(), loop.time())
        lane.pending.append(call)
        lane.queued += len(texts)
        if lane.queued >= self.max_batch:
            lane.full.set()
        if lane.task is None:
            lane.task = asyncio.create_task(self._drain(key, lane), name=f"predict {key}")
        # a cancelled caller cancels its future: the lane skips it
        return await call.future

    async def _run_in_thread(
        self, model_dir: Path, texts: list[str], limiter: anyio.CapacityLimiter
    ) -> Rows:
        if self.on_batch is not None:
            self.on_batch(len(texts))
        rows: Rows = await anyio.to_thread.run_sync(self.run, model_dir, texts, limiter=limiter)
        return rows

    async def _drain(self, key: str, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        try:
            while lane.pending:
                wait_s = self.wait_s if self._company.get(key, True) else 0.0
                deadline = lane.pending[0].arrived + wait_s
                while lane.queued < self.max_batch:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    lane.full.clear()
                    try:
                        await asyncio.wait_for(lane.full.wait(), remaining)
                    except TimeoutError:
                        break
                batch = lane.running = self._take(lane)
                if not batch:
                    continue
                self._company[key] = len(batch) > 1
                self._company.move_to_end(key)
                if len(self._company) > 1024:
                    self._company.popitem(last=False)
                texts = [text for call in batch for text in call.texts]
                try:
                    rows = await self._run_in_thread(lane.model_dir, texts, lane.limiter)
                    if len(rows) != len(texts):
                        raise RuntimeError(f"the model returned {len(rows)} rows for {len(texts)}")
                except Exception as exc:
                    for call in batch:
                        if not call.future.done():
                            call.future.set_exception(exc)
                else:
                    start = 0
                    for call in batch:
                        end = start + len(call.texts)
                        if not call.future.done():
                            call.future.set_result(rows[start:end])
                        start = end
                lane.running = []
        finally:
            # cancelled (the API is stopping): nobody is left waiting forever
            for call in [*lane.running, *lane.pending]:
                if not call.future.done():
                    call.future.set_exception(RuntimeError("prediction stopped: shutting down"))
            lane.pending.clear()
            lane.running = []
            lane.queued = 0
            lane.task = None
            if self._lanes.get(key) is lane:
                del self._lanes[key]

    def _take(self, lane: _Lane) -> list[_Call]:
        """Whole calls from the front, up to `max_batch` texts (at least one call)."""
        batch: list[_Call] = []
        size = 0
        while lane.pending:
            call = lane.pending[0]
            if call.future.done():  # its caller gave up
                lane.pending.popleft()
                lane.queued -= len(call.texts)
                continue
            if batch and size + len(call.texts) > self.max_batch:
                break
            lane.pending.popleft()
            lane.queued -= len(call.texts)
            batch.append(call)
            size += len(call.texts)
        return batch

    async def aclose(self) -> None:
        """Stop every lane's task; calls still queued fail (at shutdown: none, normally)."""
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
