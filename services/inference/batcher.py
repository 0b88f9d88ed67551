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

`max_batch_size=1` turns batching off: requests still queue (bounded) and run one at a time.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from services.inference.config import BatchingConfig
from shared.logging import get_logger

log = get_logger(__name__)

Feeds = dict[str, np.ndarray]
RunFn = Callable[[Feeds], Feeds]


class QueueFull(Exception):
    """The version's queue is at its bound; retry shortly."""


class BatcherClosed(Exception):
    """The version was retired between choosing it and submitting to it; choose again."""


class BatchObserver(Protocol):
    def batch_ran(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None: ...

    def queue_depth(self, depth: int) -> None: ...


@dataclass
class _Pending:
    feeds: Feeds
    rows: int
    signature: tuple
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
        rows = next(iter(feeds.values())).shape[0]
        pending = _Pending(feeds=feeds, rows=rows, signature=self._signature(feeds))
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
            outputs = self.run(self._concatenate(batch))
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
            item.future.set_result({name: self._own(item, name, array, start) for name, array in outputs.items()})
            start += item.rows

    def _own(self, item: _Pending, name: str, array: np.ndarray, start: int) -> np.ndarray:
        """The request's rows of a batch output, cut back to its own sequence length where the batch padded it."""
        rows = array[start : start + item.rows]
        if name in self.padded_outputs and self.padded_inputs:
            width = next(
                item.feeds[input_name].shape[1] for input_name in self.padded_inputs if input_name in item.feeds
            )
            rows = rows[:, :width]
        return rows

    def _execute_alone(self, item: _Pending) -> None:
        started = time.monotonic()
        try:
            outputs = self.run(item.feeds)
        except Exception as exc:
            item.future.set_exception(exc)
            return
        self.observer.batch_ran(item.rows, [started - item.enqueued], time.monotonic() - started)
        item.future.set_result(outputs)

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
