"""A real S3 endpoint for tests and benchmarks: moto's server mode on a free loopback port, spoken to over HTTP.

Tests reach it through the minio SDK exactly as services reach MinIO, so nothing is mocked in-process.
Note that moto keeps its state per Python process: two S3Server instances in one process share buckets.
A benchmark that must tell moto's CPU from its own runs it in a process of its own: ``start_s3_process``
(``python -m testkit.s3``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import TracebackType

from moto.server import ThreadedMotoServer

from testkit.processes import Child, Processes, answers_http, wait_until

ROOT = Path(__file__).resolve().parents[1]  # where `python -m testkit.s3` finds this package


class S3Server:
    """Start moto's S3 on 127.0.0.1 (an OS-assigned free port) and wait until it answers HTTP."""

    access_key = "testing"
    secret_key = "testing"  # noqa: S105 - moto accepts any key; this is a loopback test server
    region = "us-east-1"

    def __init__(self, *, start_timeout: float = 15.0) -> None:
        # moto's backends read these; setdefault keeps any values a developer exported on purpose.
        for name, value in (
            ("AWS_ACCESS_KEY_ID", self.access_key),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key),
            ("AWS_DEFAULT_REGION", self.region),
        ):
            os.environ.setdefault(name, value)
        # Port 0: the OS picks a free port at bind time, so there is no probe-then-bind race.
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.host = host
        self.port = port
        self.endpoint = f"{host}:{port}"
        self.url = f"http://{self.endpoint}"
        self._running = True
        try:
            self._wait_until_answering(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_until_answering(self, timeout: float) -> None:
        # Any HTTP answer means the server is serving.
        probe = f"{self.url}/moto-api/"
        wait_until(lambda: answers_http(probe), timeout=timeout, what=f"moto S3 at {self.url}", interval=0.05)

    def stop(self) -> None:
        """Shut the server down; safe to call twice."""
        if self._running:
            self._running = False
            self._server.stop()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_s3_process(processes: Processes, log_path: Path) -> tuple[str, Child]:
    """An S3Server in a child process (``python -m testkit.s3``); its endpoint once it answers, and the child."""
    child = processes.spawn(
        "moto", [sys.executable, "-m", "testkit.s3"], env=os.environ.copy(), log_path=log_path, cwd=ROOT
    )
    port: list[int] = []

    def announced() -> bool:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("PORT "):
                port.append(int(line.split()[1]))
                return True
        return False

    wait_until(announced, timeout=30, what="moto to listen", child=child)
    return f"127.0.0.1:{port[0]}", child


def main() -> None:
    """Serve S3 until the parent process is gone; say the port first (``PORT <n>``), once moto answers."""
    parent = os.getppid()
    with S3Server() as server:
        print("PORT", server.port, flush=True)
        while os.getppid() == parent:  # the parent is gone: do not outlive it
            time.sleep(0.5)


if __name__ == "__main__":
    main()
