"""Requeueing runs whose execution died: only once the lease has lapsed, and once however many workers sweep.

A worker on another machine is trusted until its lease expires (its process cannot be looked up from here);
the tests give a run such a holder by writing its lease the way that worker's claim would have, then sweep
as every live training worker does. (A holder on this host that exits is noticed at once: see
tests/faults/test_orphaned_runs.py, which SIGKILLs a real worker process.)
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from services.training import runs
from services.training.models import TrainingRun, utcnow
from services.training.worker import OrphanSweeper
from shared.events.tables import event_tables
from tests.helpers import INTERNAL, eventually, in_lock_order
from tests.training.support import digits_run_body

pytestmark = pytest.mark.timeout(120)

ELSEWHERE = "training-7f9c-elsewhere:4242:0badc0de"
"""The lease owner a worker on another host would write."""


def queued_tasks(runtime: Any, run_id: str) -> int:
    """How many `training.run` tasks for the run the service has queued (through its outbox)."""
    outbox = event_tables(runtime.db.metadata).outbox
    with runtime.db.session() as session:
        envelopes = session.scalars(select(outbox.c.envelope).where(outbox.c.event_type == "task:training.run")).all()
    return sum(1 for envelope in envelopes if envelope["args"] == [run_id])


def held_elsewhere(service: Any, *, lease_left: float) -> str:
    """A run that a worker on another host claimed (one attempt) and whose lease ends in `lease_left` s."""
    body = digits_run_body(
        service.runtime.storage,
        digits=(0, 1),
        count=30,
        hyperparameters={"epochs": 1, "batch_size": 16},
    )
    answer = service.client.post("/v1/runs", json=body, headers=INTERNAL)
    assert answer.status_code == 202, answer.get_json()
    run_id = answer.get_json()["id"]
    now = utcnow()
    with service.runtime.db.session() as session:
        session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id)
            .values(
                status="running",
                lease_owner=ELSEWHERE,
                lease_expires_at=now + timedelta(seconds=lease_left),
                attempts=1,
                started_at=now,
            )
        )
    return run_id


def run_row(runtime: Any, run_id: str) -> TrainingRun:
    with runtime.db.session() as session:
        return session.scalar(select(TrainingRun).where(TrainingRun.id == run_id))


def test_a_run_held_on_another_host_is_requeued_once_when_its_lease_lapses(platform, logs) -> None:
    service = platform("training")
    runtime = service.runtime
    run_id = held_elsewhere(service, lease_left=3.0)
    assert queued_tasks(runtime, run_id) == 1, "sent once when it was requested"

    sweeper = OrphanSweeper(runtime)  # what every training worker runs beside its pool
    sweeper.sweep()
    held = run_row(runtime, run_id)
    assert held.lease_owner == ELSEWHERE and queued_tasks(runtime, run_id) == 1, "a live lease is left alone"

    sweeper.start()
    try:
        eventually(
            lambda: queued_tasks(runtime, run_id) == 2,
            timeout=3.0 + sweeper.interval + 5,
            what="the run to be queued again once its lease lapsed",
        )
        requeued = run_row(runtime, run_id)
        assert requeued.lease_owner is None and requeued.status == "running" and requeued.attempts == 1
        # Later sweeps leave it to the execution that takes it (no worker runs here, so none does).
        for _ in range(3):
            sweeper.sweep()
    finally:
        sweeper.stop()
    assert queued_tasks(runtime, run_id) == 2
    [line] = logs.find(event="run_requeued", run_id=run_id)
    assert line["reason"] == "lease_expired" and line["previous_owner"] == ELSEWHERE


def test_two_workers_sweeping_at_once_requeue_a_run_once_on_postgres(platform, postgres_database, logs) -> None:
    url = postgres_database()
    service = platform("training", database_url=url)
    runtime = service.runtime
    run_id = held_elsewhere(service, lease_left=-1.0)

    # Both sweeps see the lapsed lease, then queue on the run's row lock while a third party holds it.
    sweeps = [lambda: runs.requeue_orphans(runtime, released_for=0)] * 2
    first, second = in_lock_order(url, "SELECT id FROM training_runs WHERE id = %s FOR UPDATE", (run_id,), sweeps)

    assert (first, second) == ([run_id], [])
    assert queued_tasks(runtime, run_id) == 2, "the request's task, and one requeue"
    assert len(logs.find(event="run_requeued", run_id=run_id)) == 1
