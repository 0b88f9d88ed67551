"""The dataset's PII policy on the text a feedback task shows annotators and hands snapshots.

Inference already stores `:predict` inputs redacted when the model's dataset redacts, so the input a
`prediction.feedback` event references is normally redacted. This is the second line: a prediction logged while
the policy was off (or by a replica that could not yet know it) is redacted here, when feedback turns it into a
task. When the policy is on and the referenced text holds PII, the redacted text is written as its own object
(`raw/<tenant>/feedback/<prediction_id>.txt`, the same key on a redelivery) and the task points at it; otherwise
the task keeps the event's reference. Only text is redacted (images carry no text; their metadata is stripped at
ingestion). Span feedback's offsets name the event's text: when the text is redacted here, they are moved onto the
redacted text, and an entity overlapping a redacted range is dropped (`Redaction.moved`).

A policy naming a token model of the tenant's (`pii_entities`) has its entities redacted too, asked of inference's
`:predict` for the tenant (`shared.pii_policy.EntityFinder`). When that model cannot answer, `EntitiesUnavailable`
leaves the consumer: the event is retried with backoff, then dead-lettered (listable, replayable), so no task ever
shows the text unscanned.

A policy turned on later (or naming other entities) reaches the queue too: `dataset.changed` carries the policy,
and `redact_queue` redacts the text of the dataset's production tasks (sampled predictions and feedback) that have
no consensus yet, each into its own copy `raw/<tenant>/feedback/<item_id>.<digest>.txt` (named by its content, so a
redelivery writes the same object and never overwrites one a task points at), its pre-labels, feedback spans and
annotations' spans moved onto the redacted text. The rule applied is kept on the dataset
(`LabelingDataset.pii_redacted_with`), so a redelivered or unrelated change does not scan again; sampled
predictions that arrive after it are redacted as they become tasks. Tasks with consensus keep their text: their
split is a function of their content hash, and snapshots that hold them are immutable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.labeling.content import task_content
from services.labeling.models import Annotation, LabelingDataset, Task
from services.labeling.spans import canonical, is_span_dataset
from shared.artifacts import RAW_BUCKET
from shared.errors import ServiceUnavailable
from shared.logging import get_logger
from shared.pii import Redaction
from shared.pii_policy import PiiPolicies, PiiRule
from shared.runtime import Runtime

log = get_logger(__name__)


def policies(runtime: Runtime) -> PiiPolicies:
    """The runtime's policy lookup, made on first use (one per worker process)."""
    lookup = getattr(runtime, "pii_policies", None)
    if lookup is None:
        lookup = runtime.pii_policies = PiiPolicies(runtime.settings)  # type: ignore[attr-defined]
    return lookup


def dataset_rule(runtime: Runtime, dataset: LabelingDataset) -> PiiRule:
    """The rule for the dataset's text: the policy the newest `dataset.changed` carried, kept on the row (so every
    worker process agrees at once); ingestion's answer while no event has carried one."""
    if dataset.pii_policy is not None:
        return PiiRule.of(dataset.pii_policy, dataset.pii_entities)
    return policies(runtime).rule(dataset.tenant, dataset.id)


def feedback_input(runtime: Runtime, dataset: LabelingDataset, prediction_id: str, reference: dict) -> dict:
    """The reference the feedback task should hold: the event's, or a redacted copy's."""
    rule = dataset_rule(runtime, dataset)
    if not rule.redact:
        return reference
    return _redacted(runtime, dataset, rule, prediction_id, reference, read_text(runtime, reference))[0]


def span_feedback_input(
    runtime: Runtime, dataset: LabelingDataset, prediction_id: str, reference: dict, text: str
) -> tuple[dict, Redaction | None]:
    """For span feedback on `text` (the event's input, read by the caller to check the spans): the reference the
    task should hold and, when labeling redacted the text here, the redaction, whose `moved` puts the event's
    offsets on the redacted text."""
    rule = dataset_rule(runtime, dataset)
    if not rule.redact:
        return reference, None
    return _redacted(runtime, dataset, rule, prediction_id, reference, text)


def read_bytes(runtime: Runtime, reference: dict) -> bytes:
    """The bytes an event's input reference names (a byte range of a packed object, or a whole object)."""
    if reference.get("offset") is not None:
        return runtime.storage.get_range(
            reference["bucket"], reference["key"], reference["offset"], reference["length"]
        )
    return runtime.storage.get_bytes(reference["bucket"], reference["key"], verify=False)


def read_text(runtime: Runtime, reference: dict) -> str:
    return read_bytes(runtime, reference).decode("utf-8", errors="replace")


def _redacted(
    runtime: Runtime, dataset: LabelingDataset, rule: PiiRule, prediction_id: str, reference: dict, text: str
) -> tuple[dict, Redaction | None]:
    tenant = dataset.tenant
    (redaction,) = policies(runtime).apply_many(tenant, dataset.id, [text], rule=rule)
    if not redaction.counts:
        return reference, None
    stored = runtime.storage.put(RAW_BUCKET, f"{tenant}/feedback/{prediction_id}.txt", redaction.text.encode("utf-8"))
    log.info("feedback_input_redacted", dataset_id=dataset.id, prediction_id=prediction_id, redactions=redaction.counts)
    moved = {"bucket": RAW_BUCKET, "key": stored.key, "sha256": stored.sha256, "offset": None, "length": None}
    return moved, redaction


PRODUCTION_SOURCES = ("sample", "feedback")
QUEUED = ("open", "review")
"""A task without consensus yet: its text may still change."""
SCAN_BATCH = 256


def moved_spans(redaction: Redaction | None, spans: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entity spans of a text moved onto its redacted text (None: not redacted), one over a redacted range dropped."""
    if redaction is None:
        return canonical(spans)
    moved = [(redaction.moved(span["start"], span["end"]), span["label"]) for span in spans]
    return canonical({"start": at[0], "end": at[1], "label": label} for at, label in moved if at is not None)


def applied_rule(rule: PiiRule) -> dict[str, Any] | None:
    """How `LabelingDataset.pii_redacted_with` records a rule (None: nothing is redacted)."""
    if not rule.redact:
        return None
    entities = rule.entities
    return {"entities": None if entities is None else {"model": entities.model, "labels": list(entities.labels)}}


def on_policy_changed(runtime: Runtime, session: Session, dataset: LabelingDataset) -> dict[str, int] | None:
    """`dataset.changed` put the dataset's policy on its row: when it turned on, or names other entities, redact the
    queue's production tasks with it. Returns the counts, None when the queue was already redacted so."""
    applied = applied_rule(dataset_rule(runtime, dataset))
    if applied == dataset.pii_redacted_with:
        return None
    counts = {"tasks_scanned": 0, "tasks_redacted": 0}
    if applied is not None:
        counts = redact_queue(runtime, session, dataset)
    dataset.pii_redacted_with = applied
    log.info("queue_pii_policy_applied", dataset_id=dataset.id, rule=applied, **counts)
    return counts


def redact_queue(runtime: Runtime, session: Session, dataset: LabelingDataset) -> dict[str, int]:
    """Redact the text of the dataset's production tasks without consensus, with the dataset's policy."""
    counts = {"tasks_scanned": 0, "tasks_redacted": 0}
    if dataset.task_type == "image_classification":
        return counts
    statement = (
        select(Task)
        .where(
            Task.dataset_id == dataset.id,
            Task.kind == "text",
            Task.source.in_(PRODUCTION_SOURCES),
            Task.status.in_(QUEUED),
        )
        .order_by(Task.id)
    )
    tasks = list(session.scalars(statement))
    for start in range(0, len(tasks), SCAN_BATCH):
        batch = redact_tasks(runtime, session, dataset, tasks[start : start + SCAN_BATCH])
        counts["tasks_scanned"] += batch["tasks_scanned"]
        counts["tasks_redacted"] += batch["tasks_redacted"]
    return counts


def redact_tasks(runtime: Runtime, session: Session, dataset: LabelingDataset, tasks: list[Task]) -> dict[str, int]:
    """Point each text task holding PII (by the dataset's policy) at a redacted copy of its text; tasks whose
    content cannot be read (erased meanwhile) are left as they are."""
    readable: list[tuple[Task, str]] = []
    for task in tasks:
        try:
            readable.append((task, task_content(runtime.storage, task).decode("utf-8")))
        except (ServiceUnavailable, UnicodeDecodeError) as exc:
            log.warning("task_text_unreadable", task_id=task.id, error=str(exc)[:200])
    texts = [text for _, text in readable]
    rule = dataset_rule(runtime, dataset)
    redactions = policies(runtime).apply_many(dataset.tenant, dataset.id, texts, rule=rule) if texts else []
    redacted = 0
    for (task, _), redaction in zip(readable, redactions, strict=True):
        if redaction.counts:
            _repoint(runtime, session, dataset, task, redaction)
            redacted += 1
    return {"tasks_scanned": len(readable), "tasks_redacted": redacted}


def _repoint(runtime: Runtime, session: Session, dataset: LabelingDataset, task: Task, redaction: Redaction) -> None:
    data = redaction.text.encode("utf-8")
    key = f"{task.tenant}/feedback/{task.item_id}.{hashlib.sha256(data).hexdigest()[:16]}.txt"
    stored = runtime.storage.put(RAW_BUCKET, key, data)
    previous = (task.bucket, task.object_key)
    task.bucket, task.object_key, task.sha256 = RAW_BUCKET, stored.key, stored.sha256
    task.offset = task.length = None
    if is_span_dataset(dataset.task_type):
        _move_spans(session, task, redaction)
    session.flush()
    if previous != (RAW_BUCKET, stored.key) and _own_copy(session, task.tenant, *previous):
        runtime.storage.delete(*previous)  # labeling's earlier copy, redacted with less
    log.info("task_text_redacted", dataset_id=dataset.id, task_id=task.id, redactions=redaction.counts)


def _move_spans(session: Session, task: Task, redaction: Redaction) -> None:
    if task.prelabel_spans is not None:
        task.prelabel_spans = moved_spans(redaction, task.prelabel_spans)
    if task.feedback and "correct_spans" in task.feedback:
        task.feedback = {
            **task.feedback,
            "correct_spans": moved_spans(redaction, task.feedback["correct_spans"]),
            "predicted_spans": moved_spans(redaction, task.feedback.get("predicted_spans") or []),
        }
    for annotation in session.scalars(select(Annotation).where(Annotation.task_id == task.id)):
        if annotation.spans is not None:
            annotation.spans = moved_spans(redaction, annotation.spans)


def _own_copy(session: Session, tenant: str, bucket: str, key: str) -> bool:
    """A redacted copy labeling wrote that no task points at any more."""
    if bucket != RAW_BUCKET or not key.startswith(f"{tenant}/feedback/"):
        return False
    return not session.scalar(
        select(func.count()).select_from(Task).where(Task.bucket == bucket, Task.object_key == key)
    )
