"""Dynamic batching: concurrent requests to one model version coalesced into one ONNX Runtime call.

Like Triton's dynamic batcher: a request waits at most `max_queue_delay_us` (counted from the arrival of the
oldest waiting request) for others to join it, and a batch never exceeds `max_batch_size` rows, except that a
single request larger than that runs alone. While a batch runs, new arrivals queue, and the next batch takes
all of them at once, so under load batches fill without waiting. One refinement: the wait also ends as soon
as no other request is on its way to this batcher (requests `announce` themselves when they pick this version,
before their preprocessing, and `submit` when ready), so a lone request never pays the delay for company that
cannot come. The queue is bounded: when
`max_queue_size` requests already wait, `submit` raises QueueFull at once (the API answers 503 with
Retry-After) instead of letting latency grow without bound.

Requests are joined when their tensors agree beyond the batch axis. For text models the sequence axis of the
token inputs is padded (ids 0, attention mask 0, which the mask makes inert), so texts of any length share a
batch; a token model's per-token logits (`padded_outputs`) come back cut to each request's own length. If a
batch fails, its requests are retried one by one, so one bad request fails alone.

A request may also send its raw inputs with the version's `prepare` step (`submit_inputs`: a text model's texts and
its tokenizer). Then the batch's inputs are prepared together right before the run, in one call (the fast
tokenizer's `encode_batch`, padded to the batch's longest text), instead of each request tokenizing alone on its
own thread; each request gets back its own rows of the feeds (cut to its own length) and of whatever else the
step made per input (a token model's words), beside its outputs (`Answer`). A preparation that fails is one more
way for a batch to fail: its requests are prepared and run one by one, and only the bad one fails.

`max_batch_size=1` turns batching off: requests still queue (bounded) and run one at a time.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from services.inference.config import BatchingConfig
from shared.logging import get_logger

log = get_logger(__name__)

Feeds = dict[str, np.ndarray]
RunFn = Callable[[Feeds], Feeds]


@dataclass(frozen=True)
class Prepared:
    """Raw inputs prepared as the graph takes them: the feeds (padded to the longest input), each input's own
    length along the padded axis, and what the step made per input besides (a token model's words, else None)."""

    feeds: Feeds
    lengths: list[int]
    extras: list[Any]


PrepareFn = Callable[[list[Any]], Prepared]


@dataclass(frozen=True)
class Answer:
    """A request's share of a batch that prepared its raw inputs: its outputs, its own rows of the feeds and its
    inputs' extras."""

    outputs: Feeds
    feeds: Feeds
    extras: list[Any]


class QueueFull(Exception):
    """The version's queue is at its bound; retry shortly."""


class BatcherClosed(Exception):
    """The version was retired between choosing it and submitting to it; choose again."""


class BatchObserver(Protocol):
    def batch_ran(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None: ...

    def queue_depth(self, depth: int) -> None: ...


@dataclass
class _Pending:
    feeds: Feeds | None  # None: raw inputs, prepared with the rest of the batch
    rows: int
    signature: tuple
    inputs: list[Any] | None = None
    prepare: PrepareFn | None = None
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class DynamicBatcher:
    def __init__(
        self,
        run: RunFn,
        config: BatchingConfig,
        *,
        name: str,
        observer: BatchObserver,
        padded_inputs: frozenset[str] = frozenset(),
        padded_outputs: frozenset[str] = frozenset(),
    ) -> None:
        self.run = run
        self.config = config
        self.name = name
        self.observer = observer
        self.padded_inputs = padded_inputs
        self.padded_outputs = padded_outputs
        """Outputs whose axis 1 is the padded sequence axis (a token model's logits): each request gets back
        its own sequence length."""
        self._queue: deque[_Pending] = deque()
        self._arriving = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # -- the request side ------------------------------------------------------------------------------

    def announce(self) -> None:
        """A request has chosen this batcher and is preparing its inputs: a batch may wait for it."""
        with self._cond:
            self._arriving += 1

    def withdraw(self) -> None:
        """An announced request will not submit after all (its preprocessing failed)."""
        with self._cond:
            self._arriving -= 1
            self._cond.notify_all()

    def submit(self, feeds: Feeds, *, announced: bool = False) -> Future:
        """Queue a request's feeds; its future answers its rows of the outputs."""
        rows = next(iter(feeds.values())).shape[0]
        return self._enqueue(_Pending(feeds=feeds, rows=rows, signature=self._signature(feeds)), announced)

    def submit_inputs(self, inputs: list[Any], prepare: PrepareFn, *, announced: bool = False) -> Future:
        """Queue a request's raw inputs, to be prepared with the other raw inputs of its batch by `prepare`; its
        future answers an `Answer`."""
        pending = _Pending(feeds=None, rows=len(inputs), signature=("prepare", prepare), inputs=inputs, prepare=prepare)
        return self._enqueue(pending, announced)

    def _enqueue(self, pending: _Pending, announced: bool) -> Future:
        with self._cond:
            if announced:
                self._arriving -= 1
            if self._closed:
                raise BatcherClosed(self.name)
            if len(self._queue) >= self.config.max_queue_size:
                raise QueueFull(f"{self.name} has {len(self._queue)} requests waiting")
            self._queue.append(pending)
            depth = len(self._queue)
            self._cond.notify()
        self.observer.queue_depth(depth)
        return pending.future

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, finish the queued ones, and stop the execution thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def _signature(self, feeds: Feeds) -> tuple:
        return tuple(
            (name, array.dtype.str, array.shape[2:] if name in self.padded_inputs else array.shape[1:])
            for name, array in sorted(feeds.items())
        )

    # -- the execution side ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._execute(batch)

    def _next_batch(self) -> list[_Pending] | None:
        limit = self.config.max_batch_size
        delay = self.config.max_queue_delay_us / 1_000_000
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0].enqueued + delay
            while not self._closed and self._arriving > 0 and sum(item.rows for item in self._queue) < limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [self._queue.popleft()]
            rows = batch[0].rows
            kept: deque[_Pending] = deque()
            while self._queue and rows < limit:
                item = self._queue.popleft()
                if item.signature == batch[0].signature and rows + item.rows <= limit:
                    batch.append(item)
                    rows += item.rows
                else:
                    kept.append(item)
            kept.extend(self._queue)
            self._queue = kept
            depth = len(self._queue)
        self.observer.queue_depth(depth)
        return [item for item in batch if item.future.set_running_or_notify_cancel()]

    def _execute(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        try:
            prepared = self._prepare(batch)
            outputs = self.run(prepared.feeds if prepared is not None else self._concatenate(batch))
        except Exception as exc:
            if len(batch) > 1:
                log.warning("batch_failed_retrying_alone", batcher=self.name, requests=len(batch), error=str(exc)[:300])
                for item in batch:
                    self._execute_alone(item)
                return
            batch[0].future.set_exception(exc)
            return
        compute = time.monotonic() - started
        rows = sum(item.rows for item in batch)
        self.observer.batch_ran(rows, [started - item.enqueued for item in batch], compute)
        start = 0
        for item in batch:
            item.future.set_result(self._answer(item, outputs, prepared, start))
            start += item.rows

    def _prepare(self, batch: list[_Pending]) -> Prepared | None:
        """The batch's raw inputs prepared in one call (None: its requests sent feeds)."""
        prepare = batch[0].prepare
        if prepare is None:
            return None
        return prepare([value for item in batch for value in item.inputs or []])

    def _answer(self, item: _Pending, outputs: Feeds, prepared: Prepared | None, start: int) -> Feeds | Answer:
        """The request's share of the batch: its rows of the outputs, cut back to its own sequence length where
        the batch padded them; with its rows of the feeds and extras where the batch prepared its inputs."""
        stop = start + item.rows
        if prepared is None:
            feeds = item.feeds or {}
            width = next((feeds[n].shape[1] for n in self.padded_inputs if n in feeds), None)
            return {name: self._cut(name, array[start:stop], width) for name, array in outputs.items()}
        width = max(prepared.lengths[start:stop])
        return Answer(
            outputs={name: self._cut(name, array[start:stop], width) for name, array in outputs.items()},
            feeds={
                name: array[start:stop, :width] if name in self.padded_inputs else array[start:stop]
                for name, array in prepared.feeds.items()
            },
            extras=prepared.extras[start:stop],
        )

    def _cut(self, name: str, rows: np.ndarray, width: int | None) -> np.ndarray:
        return rows[:, :width] if width is not None and name in self.padded_outputs else rows

    def _execute_alone(self, item: _Pending) -> None:
        started = time.monotonic()
        try:
            prepared = self._prepare([item])
            outputs = self.run(prepared.feeds if prepared is not None else item.feeds or {})
        except Exception as exc:
            item.future.set_exception(exc)
            return
        self.observer.batch_ran(item.rows, [started - item.enqueued], time.monotonic() - started)
        item.future.set_result(outputs if prepared is None else self._answer(item, outputs, prepared, 0))

    def _concatenate(self, batch: list[_Pending]) -> Feeds:
        if len(batch) == 1:
            return batch[0].feeds
        feeds: Feeds = {}
        for name in batch[0].feeds:
            arrays = [item.feeds[name] for item in batch]
            if name in self.padded_inputs:
                width = max(array.shape[1] for array in arrays)
                arrays = [
                    np.pad(array, [(0, 0), (0, width - array.shape[1])] + [(0, 0)] * (array.ndim - 2))
                    if array.shape[1] < width
                    else array
                    for array in arrays
                ]
            feeds[name] = np.concatenate(arrays, axis=0)
        return feeds
