"""The training worker's own task: `training.run`, which executes one run, and its start-up recovery.

Whoever requests a run (the run API, the `training.requested` consumer) queues `training.run` by name through
the outbox: it is sent when the run's row commits, or by the outbox relay once Redis is back, and no Celery
task ever holds a database transaction for a whole training. Delivery is at least once: Redis redelivers a
task whose worker died (after VISIBILITY_TIMEOUT), and a worker that starts queues every orphaned run again
at once. The run's lease lets exactly one execution train. After a transient error the task retries with
Celery's exponential backoff and jitter.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_ready
from sqlalchemy.exc import OperationalError

from services.training import runs
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
            raise task.retry(countdown=runs.LEASE_SECONDS)
        if outcome is Outcome.RETRY:
            raise RunReleased(run_id)
        return outcome.value


def recover_on_start(runtime: Runtime) -> None:
    """When this app's worker is ready, send again the runs that nobody alive is executing."""

    def on_ready(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not runtime.celery:
            return
        try:
            runs.recover(runtime)
        except Exception as exc:  # recovery is a safety net; the worker must start regardless
            log.warning("runs_recovery_failed", error=str(exc)[:300])

    # A weak connection, held by the Celery app: it goes away with the app (tests build many).
    runtime.celery.flywheel_recover_on_ready = on_ready  # type: ignore[attr-defined]
    worker_ready.connect(on_ready)
