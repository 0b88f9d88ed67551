"""Labeling's part of an erasure: the tasks of erased items (or of erased predictions) leave the queue, what people
said of them goes, and every snapshot that held them is marked.

- A task is withdrawn (no annotator gets it again, no future snapshot takes it: snapshots take `done` tasks) and
  anonymised: its consensus, pre-labels and feedback are cleared, its leases and annotations deleted. The row
  stays, holding only the erased item's id and its (erased) content reference, so a redelivered `item.ingested`
  does not bring the task back.
- A feedback task whose text labeling redacted itself (`raw/<tenant>/feedback/<prediction_id>.txt`,
  `redaction.py`) has that copy deleted.
- Snapshots are immutable: one that contained an erased item keeps its manifest, and its `erased_items` counts
  the items erased since (a training run on it then fails on the missing content). Which snapshots held an item is
  read from the manifests of the dataset's ready snapshots taken after the item's task existed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from services.labeling.models import Annotation, Lease, Snapshot, Task
from services.labeling.snapshots import read_manifest
from shared.artifacts import RAW_BUCKET
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)


def erase_items(runtime: Runtime, session: Session, tenant: str | None, item_ids: list[str]) -> dict[str, int]:
    tasks = list(session.scalars(select(Task).where(Task.item_id.in_(item_ids), Task.tenant == tenant)))
    return erase_tasks(runtime, session, tasks)


def erase_predictions(
    runtime: Runtime, session: Session, tenant: str | None, prediction_ids: list[str]
) -> dict[str, int]:
    """The tasks made from these logged predictions (feedback, sampled production traffic)."""
    tasks = list(session.scalars(select(Task).where(Task.prediction_id.in_(prediction_ids), Task.tenant == tenant)))
    return erase_tasks(runtime, session, tasks)


def erase_tasks(runtime: Runtime, session: Session, tasks: list[Task]) -> dict[str, int]:
    counts = {"tasks_withdrawn": 0, "annotations_deleted": 0, "snapshots_marked": 0, "objects": 0}
    fresh = [task for task in tasks if task.status != "withdrawn"]  # one withdrawn before was erased before
    if not fresh:
        return counts
    task_ids = [task.id for task in fresh]
    session.execute(delete(Lease).where(Lease.task_id.in_(task_ids)))
    counts["annotations_deleted"] = session.execute(delete(Annotation).where(Annotation.task_id.in_(task_ids))).rowcount
    for task in fresh:
        _anonymise(task)
        if task.bucket == RAW_BUCKET and task.object_key.startswith(f"{task.tenant}/feedback/"):
            runtime.storage.delete(task.bucket, task.object_key)  # labeling's own redacted copy
            counts["objects"] += 1
    counts["tasks_withdrawn"] = len(fresh)
    session.flush()
    counts["snapshots_marked"] = _mark_snapshots(runtime, session, fresh)
    return counts


def _anonymise(task: Task) -> None:
    task.status = "withdrawn"
    task.consensus_label = None
    task.consensus_spans = None
    task.consensus_source = None
    task.consensus_at = None
    task.agreement = None
    task.prelabel = None
    task.prelabel_confidence = None
    task.prelabel_spans = None
    task.uncertainty = None
    task.feedback = None


def _mark_snapshots(runtime: Runtime, session: Session, tasks: list[Task]) -> int:
    """Add each ready snapshot's count of these items to its `erased_items`; returns how many were marked."""
    by_dataset: dict[str, list[Task]] = defaultdict(list)
    for task in tasks:
        by_dataset[task.dataset_id].append(task)
    marked = 0
    for dataset_id, erased in by_dataset.items():
        item_ids = {task.item_id for task in erased}
        earliest = min(task.created_at for task in erased)
        candidates = session.scalars(
            select(Snapshot).where(
                Snapshot.dataset_id == dataset_id, Snapshot.status == "ready", Snapshot.created_at >= earliest
            )
        ).all()
        for snapshot in candidates:
            held = sum(1 for line in read_manifest(runtime, snapshot) if line["item_id"] in item_ids)
            if not held:
                continue
            session.execute(  # an increment in SQL: two erasures of one snapshot's items at once both count
                update(Snapshot)
                .where(Snapshot.id == snapshot.id)
                .values(erased_items=func.coalesce(Snapshot.erased_items, 0) + held)
            )
            marked += 1
            log.info("snapshot_marked_erased", snapshot_id=snapshot.id, dataset_id=dataset_id, erased_items=held)
    return marked


def step_report(erasure_id: str, step: str, counts: dict[str, Any]) -> dict[str, Any]:
    """The `erasure.step_completed` payload of one labeling step."""
    return {"erasure_id": erasure_id, "service": "labeling", "step": step, "counts": counts, "expects": []}
