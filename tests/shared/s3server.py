"""A real S3 endpoint for tests: moto's server mode on a free loopback port, spoken to over HTTP.

Tests reach it through the minio SDK exactly as services reach MinIO, so nothing is mocked in-process.
Note that moto keeps its state per Python process: two S3Server instances in one process share buckets.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from types import TracebackType

from moto.server import ThreadedMotoServer


class S3Server:
    """Start moto's S3 on 127.0.0.1 (an OS-assigned free port) and wait until it answers HTTP."""

    access_key = "testing"
    secret_key = "testing"
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
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2):  # noqa: S310 - our own http URL
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer means the server is serving
            except OSError as exc:
                last_error = exc
                time.sleep(0.05)
        raise RuntimeError(f"moto S3 server at {self.url} did not answer within {timeout}s: {last_error}")

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
