"""The memory budget of one process's loaded model versions: what each costs, what is in use, what to evict.

A version's cost is *accounted*, not measured: `model_memory_overhead_mb + model_memory_factor x` the bytes of
its artifacts (graph, tokenizer files), read from the registry's serving document before anything is fetched.
The decision to evict must be taken before the load allocates, and what a load adds to the process's RSS
cannot be read reliably: allocators keep and reuse freed pages (a tiny model's session shows no RSS growth at
all), concurrent requests and loads allocate at the same time, and ONNX Runtime's arena grows later with the
first large batch. The measured RSS growth while a version loaded is still reported beside it
(`flywheel_inference_session_memory_bytes`) so an operator can check the factor against the real models.

`admit(size)` reserves room for a load: while the reserved and loaded bytes plus `size` exceed the budget, it
picks victims among the loaded versions, least recently used first, skipping pinned ones and ones with
requests in flight, and has the repository evict them (retire: the same drain as a hot swap). Their bytes are
given back only once they are released, so the accounted total never exceeds the budget. When even evicting
every candidate would not make room, the load is refused (`OverBudget`: the request gets 503 + Retry-After).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from services.inference.metrics import InferenceMetrics

MIB = 1024 * 1024


class OverBudget(Exception):
    """No room for a version under the memory budget, even after evicting every idle, unpinned version."""


class Resident(Protocol):
    """What the budget needs of a loaded version (`repository.LoadedVersion`)."""

    tenant: str
    model_name: str
    version: int
    memory_accounted: int
    last_used: float

    @property
    def inflight(self) -> int: ...

    @property
    def retiring(self) -> bool: ...


def accounted_bytes(version_doc: dict[str, Any], *, factor: float, overhead_mb: float) -> int:
    """What a version is accounted in the budget: a fixed overhead plus `factor` times its artifacts' bytes."""
    artifacts = version_doc.get("artifacts") or {}
    size = sum(int(ref.get("size") or 0) for ref in artifacts.values())
    return int(overhead_mb * MIB + factor * size)


class MemoryBudget:
    def __init__(self, budget_bytes: int, metrics: InferenceMetrics, *, pinned: Callable[[Resident], bool]) -> None:
        self.budget_bytes = budget_bytes
        self.metrics = metrics
        self._pinned = pinned
        self._cond = threading.Condition()
        self._resident: dict[int, Resident] = {}  # id(version) -> version: loaded and accounted
        self._evicting: set[int] = set()  # chosen as victims, bytes given back once released
        self._used = 0  # accounted bytes of resident versions (evicting ones included, until released)
        self._reserved = 0  # accounted bytes of loads in progress
        self.peak_bytes = 0
        metrics.memory_budget.set(budget_bytes)
        metrics.memory_used.set(0)

    @property
    def in_use(self) -> int:
        """Accounted bytes now: loaded versions (until released) plus loads in progress."""
        with self._cond:
            return self._used + self._reserved

    def admit(self, size: int, evict: Callable[[list[Resident]], None], timeout: float) -> None:
        """Reserve `size` bytes for a load, evicting LRU versions if needed; OverBudget when it cannot fit."""
        if size > self.budget_bytes:
            raise OverBudget(f"the version needs {size} bytes, more than the whole budget of {self.budget_bytes}")
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if self._used + self._reserved + size <= self.budget_bytes:
                    self._reserved += size
                    self._changed()
                    return
                victims = self._victims(self._used + self._reserved + size - self.budget_bytes)
                if victims is None:
                    raise OverBudget(
                        f"the memory budget ({self.budget_bytes} bytes) is held by pinned versions, versions "
                        "serving requests and loads in progress"
                    )
                if not victims:  # enough is being released already: wait for it
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._cond.wait(remaining):
                        raise OverBudget("versions being evicted did not drain in time")
                    continue
                self._evicting.update(id(victim) for victim in victims)
            evict(victims)  # outside the lock: the repository takes model locks and retires them

    def _victims(self, needed: int) -> list[Resident] | None:
        """The least recently used idle, unpinned versions that free `needed` bytes (beyond those already being
        released: evicted, or retired by a swap); [] when those suffice, None when no choice would."""
        going = [version for key, version in self._resident.items() if key in self._evicting or version.retiring]
        needed -= sum(version.memory_accounted for version in going)
        if needed <= 0:
            return []
        candidates = sorted(
            (
                version
                for key, version in self._resident.items()
                if key not in self._evicting
                and not version.retiring
                and version.inflight == 0
                and not self._pinned(version)
            ),
            key=lambda version: version.last_used,
        )
        chosen, freed = [], 0
        for version in candidates:
            if freed >= needed:
                break
            chosen.append(version)
            freed += version.memory_accounted
        return chosen if freed >= needed else None

    def cancel(self, size: int) -> None:
        """A reserved load did not happen (it failed)."""
        with self._cond:
            self._reserved -= size
            self._changed()

    def loaded(self, version: Resident, size: int) -> None:
        """A reserved load is done: the version is resident with `size` accounted bytes."""
        with self._cond:
            self._reserved -= size
            self._resident[id(version)] = version
            self._used += size
            self._changed()

    def released(self, version: Resident) -> None:
        """A version was retired and has drained: its bytes are free again."""
        with self._cond:
            if self._resident.pop(id(version), None) is not None:
                self._used -= version.memory_accounted
            self._evicting.discard(id(version))
            self._changed()

    def resident(self) -> Iterable[Resident]:
        with self._cond:
            return list(self._resident.values())

    def _changed(self) -> None:
        total = self._used + self._reserved
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.metrics.memory_peak.set(total)
        self.metrics.memory_used.set(total)
        self._cond.notify_all()

    def describe(self) -> dict[str, Any]:
        with self._cond:
            return {
                "budget_bytes": self.budget_bytes,
                "used_bytes": self._used,
                "reserved_bytes": self._reserved,
                "peak_bytes": self.peak_bytes,
                "resident_versions": len(self._resident),
            }
