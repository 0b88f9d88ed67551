"""Child processes for tests and benchmarks: free ports, start and stop, wait until ready.

- ``free_port()`` a free loopback TCP port;
- ``Processes`` starts helper servers in their own process groups and stops every one of them (and the group);
  ``managed_processes()`` does so on exit, error, Ctrl-C or SIGTERM (and the kernel sends them SIGTERM should
  this process die without cleaning up);
- ``answers_ok`` / ``answers_http`` are readiness probes; ``wait_until`` polls one, failing early (with the log
  tail) when the child it waits for exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from shared.client import wait_for


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may still take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: ask the kernel for SIGTERM when its parent dies (Linux; a no-op elsewhere)."""
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
    """Child processes started here; ``stop_all`` ends every one of them (and their process groups)."""

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


def answers_http(url: str, timeout: float = 2.0) -> bool:
    """Whether anything answers HTTP at `url`, whatever the status; False while nothing listens there."""
    try:
        requests.get(url, timeout=timeout)
        return True
    except requests.RequestException:
        return False


def wait_until(
    check: Callable[[], bool], *, timeout: float, what: str, child: Child | None = None, interval: float = 0.1
) -> None:
    """Poll ``check`` until it is true; fail early (with the log tail) if ``child`` exits meanwhile."""

    def ready() -> bool:
        if check():
            return True
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited while waiting for {what}; last lines of its log:\n{child.tail()}")
        return False

    try:
        wait_for(ready, timeout=timeout, what=what, interval=interval)
    except TimeoutError:
        tail = f"; last lines of its log:\n{child.tail()}" if child is not None else ""
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}{tail}") from None
