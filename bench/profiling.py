"""Sampling profiles of benchmark servers with py-spy: where a server's CPU goes, measured inside the process.

A throughput comparison on a small shared machine has a noise floor (the load generator shares the cores, and
two identical servers differ by several percent between rounds); a profile does not compare two processes: it
says what share of one server's on-CPU samples fell in the code under test. For a CPU-bound server that share
bounds what the code costs in throughput.

py-spy is a tool of the benchmark, not of the project: it is installed on first use into a virtualenv of its own
under `~/.cache/flywheel/bench-tools` (from the configured package index, `bench/tools.py`), never into the
project's.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.tools import tool_venv

PY_SPY = "py-spy==0.4.3"
WAITS = ("Condition.wait", "Event.wait", "_epoll.poll", "select", "sleep", "_wait_for_tstate_lock")


def py_spy() -> str:
    """The py-spy executable: on PATH, or installed into the benchmark's own virtualenv."""
    found = shutil.which("py-spy")
    if found:
        return found
    return str(tool_venv("py-spy", [PY_SPY]) / "bin" / "py-spy")


class Recording:
    """py-spy recording one process and its children (granian's workers) until `stop`: on-CPU samples only.

    Blocking mode (py-spy pauses the process for each sample) is what tells idle threads from running ones
    reliably; it costs every profiled server alike. Samples whose innermost frame is a wait are dropped on
    reading all the same (`WAITS`): a thread parked on a condition is not spending CPU."""

    def __init__(self, pid: int, out: Path, *, rate: int = 100) -> None:
        self.out = out
        command = [py_spy(), "record", "--pid", str(pid), "--subprocesses", "--rate", str(rate)]
        self.process = subprocess.Popen(
            [*command, "--format", "raw", "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> Profile:
        self.process.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
        try:
            _, errors = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, errors = self.process.communicate()
        if not self.out.exists():
            print(f"py-spy wrote no profile: {errors[-500:]}", file=sys.stderr)
            return Profile(Counter())
        return Profile.read(self.out)


@dataclass
class Profile:
    stacks: Counter[tuple[str, ...]]

    @classmethod
    def read(cls, path: Path) -> Profile:
        """py-spy's raw (collapsed) format: `frame;frame;... count` per line, root first."""
        stacks: Counter[tuple[str, ...]] = Counter()
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = tuple(stack.split(";"))
            if stack and count.isdigit() and not frames[-1].startswith(WAITS):
                stacks[frames] += int(count)
        return cls(stacks)

    @property
    def samples(self) -> int:
        return sum(self.stacks.values())

    def share(self, *files: str) -> float:
        """The share of samples with a frame in any of `files` (paths as py-spy prints them, e.g.
        `services/inference/metering.py`): what that code and everything it calls cost, of the whole."""
        total = self.samples
        if not total:
            return 0.0
        inside = sum(count for stack, count in self.stacks.items() if any(f in frame for frame in stack for f in files))
        return inside / total
