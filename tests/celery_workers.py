"""Celery workers in the test process, several services' side by side, as the suite runs them.

Celery assumes one worker per process, and `celery.contrib.testing.worker.start_worker` crosses workers that share
one through three process-wide settings:
- the Hub step reuses the process's kombu event loop when one is set, so a second worker shares the first's
  loop: they read each other's sockets, and the first to stop closes the loop under the other;
- the thread pool traces a task with `current_app`, which in a pool thread is the process's default app, the
  one the newest worker set: an older worker's task is looked up among the newest one's tasks and never runs;
- `start_worker` stops its worker by setting `celery.worker.state.should_terminate`, which every worker in the
  process obeys: the first to stop takes the others with it.

`in_process_worker` gives each worker a loop of its own, binds its pool threads to its own app and stops only its
own worker, from inside its loop. Production runs one worker per process, where none of this can happen.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.concurrency.thread import TaskPool
from celery.contrib.testing.worker import TestWorkController, setup_app_for_worker
from celery.exceptions import WorkerTerminate
from celery.utils.nodenames import anon_nodename
from celery.worker import WorkController
from kombu.asynchronous import set_event_loop


class AppBoundThreadPool(TaskPool):
    """Celery's thread pool whose threads trace tasks with the worker's own app."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.executor.shutdown()  # started no thread yet: threads start with the first task
        self.executor = ThreadPoolExecutor(max_workers=self.limit, initializer=self.app.set_current)


def _terminate() -> None:
    raise WorkerTerminate(0)  # what `start_worker` asks of every worker, asked of one


@contextmanager
def in_process_worker(
    celery: Celery, *, concurrency: int, queues: list[str], shutdown_timeout: float = 10.0
) -> Iterator[WorkController]:
    """Run `celery`'s worker in a thread until the block ends, consuming `queues` from its broker."""
    setup_app_for_worker(celery, "INFO", None)
    set_event_loop(None)  # the Hub step makes a new loop only when none is set
    worker = TestWorkController(
        app=celery,
        concurrency=concurrency,
        hostname=anon_nodename(),
        pool=AppBoundThreadPool,
        loglevel="INFO",
        logfile=None,
        ready_callback=None,
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        queues=queues,
    )
    thread = threading.Thread(target=worker.start, name=f"worker-{celery.main}", daemon=True)
    thread.start()
    worker.ensure_started()
    try:
        yield worker
    finally:
        worker.hub.call_soon(_terminate)
        thread.join(shutdown_timeout)
        if thread.is_alive():
            raise RuntimeError(f"{celery.main}'s worker did not stop within {shutdown_timeout:.0f} s")
