"""Periodic work of a service's worker: a daemon thread that runs a job at once and then every `interval_s`,
started and stopped as a step of the Celery worker's own start and stop (an HTTP process starts no worker), and
stopped when the runtime closes. A failing round is logged and the next round tries again."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import bootsteps

from shared.logging import get_logger

if TYPE_CHECKING:
    from shared.runtime import Runtime

log = get_logger(__name__)


class PeriodicWork:
    def __init__(self, name: str, job: Callable[[], Any], interval_s: float) -> None:
        self.name = name
        self.job = job
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("periodic_work_started", work=self.name, interval_s=self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            try:
                self.job()
            except Exception as exc:  # storage or the database may be away; the next round tries again
                log.warning("periodic_work_failed", work=self.name, error=str(exc)[:300])
            if self._stop.wait(self.interval_s):
                return


def run_in_worker(runtime: Runtime, name: str, job: Callable[[], Any], interval_s: float) -> PeriodicWork:
    """Run `job` every `interval_s` in the service's worker; returns the (not yet started) work."""
    work = PeriodicWork(name, job, interval_s)

    class PeriodicStep(bootsteps.StartStopStep):
        def start(self, parent: Any) -> None:
            work.start()

        def stop(self, parent: Any) -> None:
            work.stop()

    PeriodicStep.name = name  # Celery keys its steps by name: each periodic work is a step of its own
    runtime.celery.steps["worker"].add(PeriodicStep)
    runtime.on_close(work.stop)
    return work
