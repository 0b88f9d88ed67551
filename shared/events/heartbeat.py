"""A Celery worker's heartbeat, as two files a probe reads by their age (`flywheel-healthcheck --heartbeat`).

- `<dir>/<service>.alive` is touched every `HEARTBEAT_SECONDS` by a thread of the worker process, from the moment
  the worker starts until it stops: its age says the process is alive and its interpreter still runs. It does not
  depend on the task in flight, so a training epoch that holds the solo pool for an hour keeps it fresh.
- `<dir>/<service>.ready` is touched alongside only while the worker's consumer runs (it is connected to the
  broker and consuming its queues); it is removed when the consumer stops, as it does when the broker connection
  is lost, and comes back when the consumer restarts on reconnection.

Both are removed when the worker shuts down. Nothing here talks to the broker: the Celery configuration turns
remote control off, and a probe must stay cheap.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps

from shared.logging import get_logger

log = get_logger(__name__)

HEARTBEAT_SECONDS = 10.0


class Heartbeat:
    def __init__(self, directory: Path, service: str, interval: float = HEARTBEAT_SECONDS) -> None:
        self.alive_path = directory / f"{service}.alive"
        self.ready_path = directory / f"{service}.ready"
        self.interval = interval
        self.consuming = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self.alive_path.parent.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self.beat()
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)
        self._thread.start()
        log.info("worker_heartbeat_started", alive=str(self.alive_path), interval_s=self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 1)
            self._thread = None
        self.consuming = False
        for path in (self.ready_path, self.alive_path):
            path.unlink(missing_ok=True)

    def consumer_started(self) -> None:
        self.consuming = True
        self.beat()

    def consumer_stopped(self) -> None:
        self.consuming = False
        self.ready_path.unlink(missing_ok=True)

    def beat(self) -> None:
        try:
            _touch(self.alive_path)
            if self.consuming:
                _touch(self.ready_path)
        except OSError as exc:  # a full or read-only volume: the probe will say so by the file's age
            log.warning("worker_heartbeat_failed", error=str(exc))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()


def _touch(path: Path) -> None:
    now = time.time()
    with contextlib.suppress(FileExistsError):
        path.touch(exist_ok=True)
    os.utime(path, (now, now))


def install_heartbeat(app: Celery, directory: Path, service: str, interval: float = HEARTBEAT_SECONDS) -> Heartbeat:
    """Make every worker of `app` keep a heartbeat under `directory` (see the module's docstring)."""
    heartbeat = Heartbeat(directory, service, interval)

    class WorkerHeartbeat(bootsteps.StartStopStep):
        name = "flywheel.heartbeat.worker"

        def start(self, worker: Any) -> None:
            heartbeat.start()

        def stop(self, worker: Any) -> None:
            heartbeat.stop()

        def shutdown(self, worker: Any) -> None:
            heartbeat.stop()

        def terminate(self, worker: Any) -> None:  # a cold shutdown calls this instead of stop
            heartbeat.stop()

    class ConsumerHeartbeat(bootsteps.StartStopStep):
        name = "flywheel.heartbeat.consumer"
        # Started once the consumer consumes its queues: the connection is up and the task consumer exists.
        requires = {"celery.worker.consumer.tasks:Tasks"}

        def start(self, consumer: Any) -> None:
            heartbeat.consumer_started()

        def stop(self, consumer: Any) -> None:
            heartbeat.consumer_stopped()

        def shutdown(self, consumer: Any) -> None:
            heartbeat.consumer_stopped()

        def terminate(self, consumer: Any) -> None:
            heartbeat.consumer_stopped()

    app.steps["worker"].add(WorkerHeartbeat)
    app.steps["consumer"].add(ConsumerHeartbeat)
    return heartbeat
