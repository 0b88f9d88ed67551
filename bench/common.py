"""Helpers every benchmark shares: the machine, robust statistics, results files, CPU accounting.

- ``machine()`` describes where the numbers came from (CPU model, cores, load, GPU if ``nvidia-smi`` answers).
- ``Stats.of(samples)`` gives median and IQR over repeats, and flags a measurement as noisy when its IQR is
  more than 10% of its median (the machines we bench on are shared: one run is never the whole truth).
- ``write_results`` writes ``bench/results/<name>.json`` atomically.
- ``process_tree_cpu_seconds`` and ``self_cpu_seconds``: the CPU a child's process tree, or this process, used.

Child processes, free ports and readiness probes are the fixtures package's (``testkit.processes``), shared
with the tests; tables are printed by ``shared.tables``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NOISY_IQR_FRACTION = 0.10


# ------------------------------------------------------------------------------------------------ machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpus() -> list[str]:
    """GPU names and memory from nvidia-smi; empty when there is no nvidia-smi or it does not answer."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        out = subprocess.run(
            [binary, "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine() -> dict[str, Any]:
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 0
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "cores_available": available,
        "memory_gib": _memory_gib(),
        "load_average_at_start": load,
        "gpus": _gpus(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def describe_machine(info: dict[str, Any]) -> str:
    gpu = ", ".join(info["gpus"]) if info["gpus"] else "none"
    load = "/".join(str(x) for x in info.get("load_average_at_start") or []) or "n/a"
    return (
        f"{info['cpu_model']}, {info['cores_available']} of {info['cores']} cores, {info['memory_gib']} GiB RAM, "
        f"GPU: {gpu}, load avg {load} (1/5/15 min) at start, Python {info['python']}"
    )


# --------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stats:
    """Median and inter-quartile range over repeats; ``noisy`` when IQR > 10% of the median."""

    samples: tuple[float, ...]
    median: float
    q1: float
    q3: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def noisy(self) -> bool:
        return self.median > 0 and self.iqr > NOISY_IQR_FRACTION * self.median

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        values = tuple(float(x) for x in samples)
        if not values:
            raise ValueError("no samples")
        if len(values) == 1:
            return cls(values, values[0], values[0], values[0])
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(values, statistics.median(values), q1, q3)

    def as_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "q1": self.q1,
            "q3": self.q3,
            "iqr": self.iqr,
            "noisy": self.noisy,
            "samples": list(self.samples),
        }

    def show(self, digits: int = 0) -> str:
        """``1234 ±5%`` (the IQR as a share of the median), with ``~`` appended when noisy."""
        spread = 100 * self.iqr / self.median if self.median else 0.0
        return f"{self.median:,.{digits}f} ±{spread:.0f}%{' ~' if self.noisy else ''}"


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


# ------------------------------------------------------------------------------------------------ output


class Progress:
    """One line per phase, stamped with the seconds since the bench began."""

    def __init__(self, out: Any = None) -> None:
        self.started = time.monotonic()
        self.out = out or sys.stdout

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed:6.1f}s] {message}", file=self.out, flush=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Stats):
        return value.as_dict()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (via a temp file and a rename, so a reader never sees half)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    target = RESULTS_DIR / f"{name}.json"
    body = {"bench": name, "finished_at": datetime.now(UTC).isoformat(timespec="seconds"), **payload}
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, target)
    return target


# ---------------------------------------------------------------------------------------------------- CPU

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 0 here


def process_tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and all its live descendants (Linux /proc; 0.0 elsewhere)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        parents[int(entry.name)] = int(fields[1])
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime, stime
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(ticks.get(pid, 0) for pid in tree) / _CLOCK_TICKS


def self_cpu_seconds() -> float:
    """CPU seconds this process has used so far, all threads."""
    times = os.times()
    return times.user + times.system
