"""The training worker's own tasks: `training.run`, which executes one run, `training.trial`, which runs one
trial of a run's recipe search (`search.py`), and the sweep that recovers runs.

Whoever requests a run (the run API, the `training.requested` consumer) queues `training.run` by name through
the outbox: it is sent when the run's row commits, or by the outbox relay once Redis is back, and no Celery
task ever holds a database transaction for a whole training. Delivery is at least once, and the run's lease
lets exactly one execution train. After a transient error the task retries with Celery's exponential
backoff and jitter.

A worker that dies takes its task's message with it until Redis redelivers it (after VISIBILITY_TIMEOUT,
hours). Its run does not wait for that: every live training worker sweeps every few seconds (a thread beside
the pool, `OrphanSweeper`) and queues again each run whose lease was not renewed in time, or whose holder on
this host has exited, and each run whose tenant has a running slot free; a worker that starts does the same
at once, and also resends the runs that were queued but not started.
"""

from __future__ import annotations

import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown
from sqlalchemy.exc import OperationalError

from services.training import runs
from services.training.config import TrainingConfig
from services.training.search_space import TRIAL_TASK
from shared.db import DatabaseUnavailable
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

RETRY_BACKOFF_SECONDS = 15
"""First delay before a run whose attempt hit a transient error is tried again; it doubles up to the cap."""
RETRY_BACKOFF_MAX_SECONDS = 300


class RunReleased(Exception):
    """The attempt gave the run back after a transient error (its lease released): a later attempt resumes."""


def register_run_task(runtime: Runtime) -> None:
    @runtime.celery.task(
        name=runs.RUN_TASK,
        bind=True,
        acks_late=True,
        ignore_result=True,
        shared=False,
        max_retries=None,
        autoretry_for=(OperationalError, DatabaseUnavailable, RunReleased),
        retry_backoff=RETRY_BACKOFF_SECONDS,
        retry_backoff_max=RETRY_BACKOFF_MAX_SECONDS,
        retry_jitter=True,
    )
    def run_training(task: Any, run_id: str) -> str:
        from services.training.pipeline import Outcome, execute_run  # torch loads in the worker only

        try:
            outcome = execute_run(runtime, run_id)
        except (OperationalError, DatabaseUnavailable) as exc:  # the run's record is unreachable: later
            log.warning("run_database_unavailable", run_id=run_id, error=str(exc)[:300])
            raise
        if outcome is Outcome.HELD:
            # Another execution is alive (this is a redelivery): look again once its lease could have lapsed.
            raise task.retry(countdown=TrainingConfig.of(runtime.settings).lease_seconds)
        if outcome is Outcome.RETRY:
            raise RunReleased(run_id)
        return outcome.value

    @runtime.celery.task(name=TRIAL_TASK, acks_late=True, ignore_result=True, shared=False)
    def run_trial(run_id: str, number: int) -> str:
        """One trial of a run's recipe search (`search.py`); a slot someone already took is left alone."""
        from services.training.search import execute_trial  # torch loads in the worker only

        return execute_trial(runtime, run_id, number)


class OrphanSweeper:
    """A daemon thread that queues again the runs whose execution died, and fills free running slots."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        config = TrainingConfig.of(runtime.settings)
        self.interval = config.sweep_seconds
        self.lease_seconds = config.lease_seconds
        # A released attempt is retried within RETRY_BACKOFF_MAX_SECONDS; untouched for longer, its retry is lost.
        self.released_for = RETRY_BACKOFF_MAX_SECONDS + self.lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="training-orphan-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("run_sweeper_started", interval_s=self.interval, lease_s=self.lease_seconds)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def sweep(self) -> None:
        runs.requeue_orphans(self.runtime, released_for=self.released_for)
        runs.dispatch_all_waiting(self.runtime)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception as exc:  # the database may be away; the next sweep tries again
                log.warning("run_sweep_failed", error=str(exc)[:300])


def recover_on_start(runtime: Runtime) -> None:
    """When this app's worker is ready, send again the runs that nobody alive is executing, then keep
    sweeping for them until the worker shuts down."""
    sweeper = OrphanSweeper(runtime)

    def on_ready(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not runtime.celery:
            return
        try:
            runs.recover(runtime)
        except Exception as exc:  # recovery is a safety net; the worker must start regardless
            log.warning("runs_recovery_failed", error=str(exc)[:300])
        sweeper.start()

    def on_shutdown(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is runtime.celery:
            sweeper.stop()

    # Weak connections, held by the Celery app: they go away with the app (tests build many).
    runtime.celery.flywheel_recover_on_ready = on_ready  # type: ignore[attr-defined]
    runtime.celery.flywheel_stop_sweeper = on_shutdown  # type: ignore[attr-defined]
    worker_ready.connect(on_ready)
    worker_shutdown.connect(on_shutdown)
    runtime.on_close(sweeper.stop)
