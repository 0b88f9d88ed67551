"""The annotation queue: handing out tasks under leases, recording labels, and forming consensus.

`next_task` hands an annotator the highest-priority open task it has not labeled or skipped, whose labels
plus live leases held by others are still below what the task requires, so no task is handed out more
often than its overlap needs. Order: priority (feedback first), then uncertainty (least-confident model
prediction first: human effort goes where the model is weakest), then age. A lease that expires returns
its task to the queue by itself: only live leases count.

A label (or an owner's resolution) locks the dataset row, then reads its task again under the task's own
row lock, so the retrain policy's counter moves one consensus at a time, a threshold crossing queues exactly
one snapshot, and a label that waited behind the one deciding its task sees the task as decided.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, delete, func, select
from sqlalchemy.orm import Session

from services.labeling import quotas as annotation_quota
from services.labeling.consensus import decide, decide_spans
from services.labeling.content import task_content
from services.labeling.models import Annotation, LabelingDataset, Lease, Snapshot, Task
from services.labeling.spans import as_dicts, as_tuples, canonical, is_span_dataset, span_errors
from shared.errors import Conflict, NotFound, Unprocessable
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

LEASE_SECONDS = 300
BUILD_SNAPSHOT_TASK = "labeling.build_snapshot"
MAX_LEASE_ATTEMPTS = 20  # candidates a request may pass over after losing a race for them


def now() -> datetime:
    return datetime.now(UTC)


def next_task(runtime: Runtime, annotator_id: str, dataset_id: str, lease_seconds: int = LEASE_SECONDS) -> Task | None:
    with runtime.db.session() as session:
        current = session.scalar(
            select(Task)
            .join(Lease, Lease.task_id == Task.id)
            .where(
                Lease.annotator_id == annotator_id,
                Lease.expires_at > now(),
                Task.dataset_id == dataset_id,
                Task.status == "open",
            )
            .limit(1)
        )
        if current is not None:  # the task it already holds, its lease renewed
            _lease(session, current.id, annotator_id, lease_seconds)
            return current
        answered = select(Annotation.task_id).where(Annotation.annotator_id == annotator_id)

        def first_open(passed_over: list[int]) -> Select[tuple[Task]]:
            return (
                select(Task)
                .where(
                    Task.dataset_id == dataset_id,
                    Task.status == "open",
                    Task.id.not_in(answered),
                    Task.id.not_in(passed_over),
                    _demand(Task.id, annotator_id) < Task.required,
                )
                .order_by(Task.priority.desc(), Task.uncertainty.desc().nulls_last(), Task.id)
                .limit(1)
            )

        if runtime.db.is_sqlite:  # SQLite's BEGIN IMMEDIATE already serialises this transaction
            task = session.scalar(first_open([]))
        else:
            task = _locked_open_task(session, first_open, annotator_id)
        if task is None:
            return None
        _lease(session, task.id, annotator_id, lease_seconds)
        log.info("task_leased", task_id=task.id, annotator_id=annotator_id, dataset_id=dataset_id)
        return task


def _locked_open_task(
    session: Session, first_open: Callable[[list[int]], Select[tuple[Task]]], annotator_id: str
) -> Task | None:
    """The first open task whose row lock is free and that still needs a label once locked. The lock may come
    free just after its holder committed a lease that this statement's snapshot predates: a fresh statement
    sees that lease, and a task it fills is passed over."""
    passed_over: list[int] = []
    for _ in range(MAX_LEASE_ATTEMPTS):
        task = session.scalar(first_open(passed_over).with_for_update(skip_locked=True))
        if task is None or session.scalar(select(_demand(task.id, annotator_id))) < task.required:
            return task
        passed_over.append(task.id)
    return None


def _demand(task_id: Any, annotator_id: str) -> Any:
    """Labels a task has plus live leases others hold on it: what counts against its `required`."""
    labels = select(func.count(Annotation.id)).where(Annotation.task_id == task_id, Annotation.skipped.is_(False))
    leased = select(func.count(Lease.id)).where(
        Lease.task_id == task_id, Lease.expires_at > now(), Lease.annotator_id != annotator_id
    )
    return labels.scalar_subquery() + leased.scalar_subquery()


def _lease(session: Session, task_id: int, annotator_id: str, seconds: int) -> None:
    lease = session.scalar(select(Lease).where(Lease.task_id == task_id, Lease.annotator_id == annotator_id))
    expires = now() + timedelta(seconds=seconds)
    if lease is None:
        session.add(Lease(task_id=task_id, annotator_id=annotator_id, expires_at=expires))
    else:
        lease.expires_at = expires


def annotate(
    runtime: Runtime,
    annotator_id: str,
    task_id: int,
    label: str | None,
    *,
    allowed_datasets: list[str],
    spans: list[dict[str, Any]] | None = None,
) -> tuple[Task, Annotation, bool]:
    """Record (or, before consensus, change) an annotator's answer: a class `label`, or the entity `spans` of a
    token-classification task (`[]`: no entity); neither skips. Returns the task, the annotation and whether it was
    created (False: an edit)."""
    skipped = label is None and spans is None
    quota, limit, tenant = annotation_quota.of(runtime), None, ""
    if not skipped:
        visible = _visible_task(runtime, task_id, allowed_datasets)
        spans = check_answer(runtime, visible, label, spans)
        tenant, limit = visible.tenant, quota.limit(visible.tenant)  # asked before any lock is taken
    with quota.reservation(tenant, limit) as reservation, runtime.db.session() as session:
        task = session.get(Task, task_id)
        if task is None or task.dataset_id not in allowed_datasets:
            raise NotFound(f"task {task_id} does not exist")
        dataset = _locked_dataset(runtime, session, task.dataset_id)
        task = _locked_task(runtime, session, task)
        existing = session.scalar(
            select(Annotation).where(Annotation.task_id == task_id, Annotation.annotator_id == annotator_id)
        )
        if task.status != "open":
            raise Conflict(f"task {task_id} is {task.status}; its label can no longer change")
        if existing is None:
            lease = session.scalar(
                select(Lease).where(
                    Lease.task_id == task_id, Lease.annotator_id == annotator_id, Lease.expires_at > now()
                )
            )
            if lease is None:
                raise Conflict("you hold no live lease on this task; ask for /tasks/next")
            existing = Annotation(task_id=task_id, annotator_id=annotator_id, source="human")
            session.add(existing)
            created = True
        else:
            created = False
        if not skipped and (created or existing.skipped):  # billed: a new label, or a skip now labelled
            reservation.take()
        existing.label = label
        existing.spans = spans
        existing.skipped = skipped
        session.execute(delete(Lease).where(Lease.task_id == task_id, Lease.annotator_id == annotator_id))
        session.flush()
        if not skipped:
            _meter_annotation(runtime, session, dataset, existing)
        apply_consensus(runtime, session, task, dataset)
    log.info(
        "task_skipped" if skipped else "task_annotated",
        task_id=task_id,
        annotator_id=annotator_id,
        label=label,
        entities=None if spans is None else len(spans),
        edit=not created,
        status=task.status,
    )
    return task, existing, created


def _visible_task(runtime: Runtime, task_id: int, allowed_datasets: list[str] | None) -> Task:
    """The task, if the caller may see it (`allowed_datasets=None`: any); else 404."""
    with runtime.db.read_session() as session:
        task = session.get(Task, task_id)
    if task is None or (allowed_datasets is not None and task.dataset_id not in allowed_datasets):
        raise NotFound(f"task {task_id} does not exist")
    return task


def check_answer(
    runtime: Runtime, task: Task, label: str | None, spans: list[dict[str, Any]] | None
) -> list[dict[str, Any]] | None:
    """Refuse (422, naming the field) an answer that does not fit the task's dataset: a class label from its label
    set for classification, entity spans that fit the item's text for token classification (read from object
    storage before any lock is taken). Returns the spans in text order (None for a class label)."""
    with runtime.db.read_session() as session:
        dataset = session.get(LabelingDataset, task.dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {task.dataset_id} does not exist")
    if is_span_dataset(dataset.task_type):
        if label is not None or spans is None:
            raise Unprocessable(
                "this is a token_classification dataset: send `spans`, not `label`",
                {
                    "fields": {
                        "label": ["not accepted here: send `spans` ({start, end, label} per entity; [] for none)"]
                    }
                },
            )
        text = task_content(runtime.storage, task).decode("utf-8")
        errors = span_errors(text, spans, dataset.labels)
        if errors:
            raise Unprocessable(
                "the spans do not fit the task's text; see details.fields for each bad span",
                {"fields": {"spans": errors}},
                code="validation_failed",
            )
        return canonical(spans)
    if spans is not None or label is None:
        raise Unprocessable(
            f"this is a {dataset.task_type} dataset: send a class `label`, not `spans`",
            {"fields": {"spans": ["spans are for token_classification datasets only"]}},
        )
    if label not in dataset.labels:
        raise Unprocessable(
            f"label {label!r} is not in the dataset's label set",
            {"fields": {"label": [f"must be one of {sorted(dataset.labels)}"]}},
        )
    return None


def _meter_annotation(runtime: Runtime, session: Session, dataset: LabelingDataset, annotation: Annotation) -> None:
    """A labelled annotation is billable work, metered once: the record's id is the annotation's, so an edit (or
    a skip later labelled) sends the same id again and the meter store keeps the first."""
    record = {
        "id": f"annotation.{annotation.id}",
        "meter": "annotations",
        "subject": dataset.tenant,
        "time": datetime.now(UTC).isoformat(),
        "value": 1,
        "dimensions": {"dataset_id": dataset.id, "source": annotation.source},
    }
    runtime.bus.publish(session, "usage.recorded", {"source": "labeling", "records": [record]}, tenant=dataset.tenant)


def _locked_dataset(runtime: Runtime, session: Session, dataset_id: str) -> LabelingDataset:
    dataset = session.get(LabelingDataset, dataset_id, with_for_update=not runtime.db.is_sqlite)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} does not exist")
    return dataset


def _locked_task(runtime: Runtime, session: Session, task: Task) -> Task:
    """The task read again under a row lock, after its dataset's: what was read before the wait may be stale
    (another label decided it, or its item was withdrawn), and decisions must rest on what is now true."""
    if runtime.db.is_sqlite:  # BEGIN IMMEDIATE: the first read was already made under the write lock
        return task
    fresh = session.get(Task, task.id, with_for_update=True, populate_existing=True)
    if fresh is None:
        raise NotFound(f"task {task.id} does not exist")
    return fresh


def apply_consensus(runtime: Runtime, session: Session, task: Task, dataset: LabelingDataset) -> None:
    """Decide the task if it has its labels (entity spans: `decide_spans`, the same rules per entity); count a
    consensus towards the retrain policy."""
    answers = session.execute(
        select(Annotation.label, Annotation.spans).where(Annotation.task_id == task.id, Annotation.skipped.is_(False))
    ).all()
    rules = {
        "required": task.required,
        "ceiling": dataset.overlap + dataset.max_extra_annotations,
        "min_agreement": dataset.min_agreement,
    }
    label, spans = None, None
    if is_span_dataset(dataset.task_type):
        span_decision = decide_spans([as_tuples(s) for _, s in answers if s is not None], **rules)
        outcome, agreement = span_decision.outcome, span_decision.agreement
        if span_decision.spans is not None:
            spans = as_dicts(span_decision.spans)
    else:
        decision = decide([lb for lb, _ in answers if lb is not None], **rules)
        outcome, agreement, label = decision.outcome, decision.agreement, decision.label
    if outcome == "pending":
        return
    if outcome == "escalate":
        task.required += 1
        log.info("task_escalated", task_id=task.id, required=task.required, agreement=agreement)
        return
    if outcome == "review":
        task.status = "review"
        log.info("task_needs_review", task_id=task.id, agreement=agreement)
        return
    settle(runtime, session, task, dataset, label, "vote", agreement, spans=spans)


def settle(
    runtime: Runtime,
    session: Session,
    task: Task,
    dataset: LabelingDataset,
    label: str | None,
    source: str,
    agreement: float | None,
    *,
    spans: list[dict[str, Any]] | None = None,
) -> None:
    """Record the task's consensus: a class `label`, or for token classification its entity `spans`."""
    task.status = "done"
    task.consensus_label = label
    if spans is not None:
        task.consensus_spans = spans
    task.consensus_source = source
    task.agreement = agreement
    task.consensus_at = now()
    session.execute(delete(Lease).where(Lease.task_id == task.id))
    dataset.labels_since_snapshot += 1
    log.info(
        "consensus_reached",
        task_id=task.id,
        label=label,
        entities=None if spans is None else len(spans),
        source=source,
        agreement=agreement,
    )
    # The model agreeing with itself is no ground truth; token predictions are not logged (docs/ner.md).
    if task.prediction_id and source != "model_auto" and label is not None:
        runtime.bus.publish(
            session,
            "prediction.labeled",
            {
                "prediction_id": task.prediction_id,
                "model_name": task.prelabel_model,
                "model_version": task.prelabel_version,
                "dataset_id": dataset.id,
                "label": label,
                "source": "feedback" if task.source == "feedback" else "sample",
            },
            tenant=task.tenant,
        )
    threshold = dataset.retrain_threshold
    if threshold is not None and dataset.labels_since_snapshot >= threshold:
        queue_snapshot(runtime, session, dataset, reason="retrain_policy", trigger_training=True)


def queue_snapshot(
    runtime: Runtime,
    session: Session,
    dataset: LabelingDataset,
    *,
    reason: str,
    trigger_training: bool,
    training_reason: str | None = None,
) -> Snapshot:
    """Reset the policy counter and queue the snapshot's build, in the caller's transaction."""
    from services.labeling.snapshots import new_snapshot_id
    from shared.logging import current_trace_id

    crossed = dataset.labels_since_snapshot
    dataset.labels_since_snapshot = 0
    snapshot = Snapshot(
        id=new_snapshot_id(),
        tenant=dataset.tenant,
        dataset_id=dataset.id,
        reason=reason,
        trigger_training=trigger_training,
        training_reason=training_reason,
        trace_id=current_trace_id(),
    )
    session.add(snapshot)
    session.flush()
    runtime.bus.enqueue(session, BUILD_SNAPSHOT_TASK, [snapshot.id])
    log.info("retrain_policy_fired", dataset_id=dataset.id, snapshot_id=snapshot.id, new_labels=crossed)
    return snapshot


def resolve(
    runtime: Runtime, task_id: int, tenant: str | None, label: str | None, spans: list[dict[str, Any]] | None = None
) -> Task:
    """An owner (or an operator: `tenant=None`) decides a task that went to review: its class label, or for token
    classification its entity spans."""
    task = _visible_task(runtime, task_id, None)
    if tenant is not None and task.tenant != tenant:
        raise NotFound(f"task {task_id} does not exist")
    spans = check_answer(runtime, task, label, spans)
    with runtime.db.session() as session:
        task = session.get(Task, task_id)
        if task is None:
            raise NotFound(f"task {task_id} does not exist")
        dataset = _locked_dataset(runtime, session, task.dataset_id)
        task = _locked_task(runtime, session, task)
        if task.status not in {"review", "open"}:
            raise Conflict(f"task {task_id} is {task.status}")
        settle(runtime, session, task, dataset, label, "review", None, spans=spans)
    return task
