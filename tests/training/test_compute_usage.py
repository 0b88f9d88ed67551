"""A finished run's compute is metered once, as one `usage.recorded` event in its ending's transaction, on the
meter of the device it ran on; a run that never started used none."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from services.training import runs
from services.training.models import TrainingRun
from shared.events.tables import event_tables

pytestmark = pytest.mark.timeout(60)

MANIFEST = {"bucket": "datasets", "key": "t/ds/snap.json", "sha256": "0" * 64}


def request(tenant: str, snapshot: str) -> runs.RunRequest:
    return runs.RunRequest(
        tenant=tenant,
        dataset_id="ds_1",
        snapshot_id=snapshot,
        manifest=MANIFEST,
        task_type="text_classification",
        labels=["neg", "pos"],
        model_name="reviews",
        base_model="all-MiniLM-L6-v2",
        hyperparameters={"epochs": 1},
        reason="test",
        source="api",
    )


def usage_events(runtime: Any) -> list[dict[str, Any]]:
    outbox = event_tables(runtime.db.metadata).outbox
    with runtime.db.session() as session:
        rows = session.execute(select(outbox.c.envelope).where(outbox.c.event_type == "usage.recorded")).all()
    return [row[0] for row in rows]


def test_a_finished_run_is_metered_once_on_its_device(platform) -> None:
    runtime = platform("training").runtime
    with runtime.db.session() as session:
        ran = runs.create_run(session, request("ptn_a", "snap_1")).id
        never = runs.create_run(session, request("ptn_b", "snap_2")).id
    claimed = runs.claim(runtime, ran, "owner-1")
    assert claimed.outcome == "acquired"
    assert runs.record_start(runtime, ran, "owner-1", device="cuda:0", world_size=2)
    assert runs.fail(runtime, ran, "owner-1", "out of memory")
    assert not runs.fail(runtime, ran, "owner-1", "again")  # a run ends once: no second record
    assert runs.fail(runtime, never, None, "cancelled before it started")

    [event] = usage_events(runtime)
    assert event["tenant"] == "ptn_a" and event["payload"]["source"] == "training"
    [record] = event["payload"]["records"]
    with runtime.db.session() as session:
        run = session.scalar(select(TrainingRun).where(TrainingRun.id == ran))
        elapsed = (runs._aware(run.finished_at) - runs._aware(run.started_at)).total_seconds()
    assert record["id"] == f"{ran}.compute" and record["subject"] == "ptn_a"
    assert record["meter"] == "training_gpu_seconds"
    assert record["value"] == pytest.approx(2 * elapsed, abs=0.002)
    assert record["dimensions"] == {"model": "reviews", "device": "cuda:0", "run_id": ran, "dataset_id": "ds_1"}


def test_a_cpu_run_is_metered_in_cpu_seconds() -> None:
    run = TrainingRun(id="run_x", tenant="ptn_a", model_name="m", dataset_id="ds", device="cpu", world_size=1)
    assert runs.compute_usage(run) is None  # not started
    run.started_at = datetime(2026, 12, 1, 10, tzinfo=UTC)
    run.finished_at = run.started_at + timedelta(seconds=90.5)
    record = runs.compute_usage(run)
    assert record is not None and record["meter"] == "training_cpu_seconds" and record["value"] == 90.5
