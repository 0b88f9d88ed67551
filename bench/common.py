"""Helpers every benchmark shares: the machine, robust statistics, results files, child processes.

- ``machine()`` describes where the numbers came from (CPU model, cores, load, GPU if ``nvidia-smi`` answers).
- ``Stats.of(samples)`` gives median and IQR over repeats, and flags a measurement as noisy when its IQR is
  more than 10% of its median (the machines we bench on are shared: one run is never the whole truth).
- ``write_results`` writes ``bench/results/<name>.json`` atomically.
- ``Processes`` starts helper servers in their own process groups and stops every one of them on exit,
  error, Ctrl-C or SIGTERM (and the kernel sends them SIGTERM should this process die without cleaning up).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

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


# ------------------------------------------------------------------------------------------- processes

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: ask the kernel for SIGTERM when the bench dies (Linux; a no-op elsewhere)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Processes:
    """Child processes the bench started; ``stop_all`` ends every one of them (and their process groups)."""

    def __init__(self, grace_seconds: float = 10.0) -> None:
        self.children: list[Child] = []
        self.grace = grace_seconds
        self._lock = threading.Lock()

    def spawn(
        self, name: str, command: list[str], *, env: dict[str, str], log_path: Path, cwd: Path | None = None
    ) -> Child:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own group: Ctrl-C reaches only us, and we stop it as a whole
                preexec_fn=_die_with_parent,  # only a prctl call: safe before exec
                close_fds=True,
            )
        child = Child(name, process, log_path)
        with self._lock:
            self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        """SIGTERM the child's process group, wait for it, SIGKILL what is left."""
        if child.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(self.grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.process.pid, signal.SIGKILL)  # stragglers in the group (gunicorn's workers)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(5)
        with self._lock:
            if child in self.children:
                self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)


@contextlib.contextmanager
def managed_processes() -> Iterator[Processes]:
    """A ``Processes`` whose children are stopped however the block ends: normally, by an exception, by
    Ctrl-C (KeyboardInterrupt) or by SIGTERM/SIGHUP (turned into SystemExit so ``finally`` blocks run)."""
    processes = Processes()
    previous: dict[int, Any] = {}

    def _exit_on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
            previous[sig] = signal.signal(sig, _exit_on_signal)
    try:
        yield processes
    finally:
        # Ignore a second Ctrl-C while children are being stopped, so the cleanup itself is not cut short.
        with contextlib.suppress(ValueError):
            previous.setdefault(signal.SIGINT, signal.signal(signal.SIGINT, signal.SIG_IGN))
        try:
            processes.stop_all()
        finally:
            for sig, handler in previous.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, handler)


def answers_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether `url` answers a GET with 200 (a readiness probe); False while nothing listens there."""
    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def wait_until(
    check: Callable[[], bool], *, timeout: float, what: str, child: Child | None = None, interval: float = 0.1
) -> None:
    """Poll ``check`` until it is true; fail early (with the log tail) if ``child`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not check():
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited while waiting for {what}; last lines of its log:\n{child.tail()}")
        if time.monotonic() > deadline:
            tail = f"; last lines of its log:\n{child.tail()}" if child is not None else ""
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(interval)
