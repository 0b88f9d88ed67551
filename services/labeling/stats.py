"""Per-dataset agreement (percent agreement, Fleiss' kappa; pairwise entity F1 for span datasets), each annotator's
agreement with consensus, and an annotator's own figures.

An annotation agrees with consensus when it equals it: the same class label, or for token classification the very
same set of entity spans (offsets and labels). Only tasks that reached consensus (status `done`) count.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from sqlalchemy import func, select

from services.labeling.consensus import fleiss_kappa, pairwise_entity_f1
from services.labeling.models import Annotation, Annotator, LabelingDataset, Task
from services.labeling.spans import as_tuples, is_span_dataset
from shared.runtime import Runtime


def _answer(label: str | None, spans: list[dict[str, Any]] | None) -> Any:
    """What an annotation (or a consensus) says, in a form that compares equal when two say the same."""
    return label if spans is None else as_tuples(spans)


def _agrees(status: str, answer: Any, consensus: Any) -> bool | None:
    """Whether an answer equals its task's consensus; None when the task has none."""
    if status != "done" or consensus is None:
        return None
    return answer == consensus


def dataset_stats(runtime: Runtime, dataset: LabelingDataset) -> dict[str, Any]:
    with_spans = is_span_dataset(dataset.task_type)
    with runtime.db.read_session() as session:
        by_status = dict(
            session.execute(
                select(Task.status, func.count(Task.id)).where(Task.dataset_id == dataset.id).group_by(Task.status)
            ).all()
        )
        decided = session.execute(
            select(Task.consensus_label, Task.consensus_spans).where(
                Task.dataset_id == dataset.id, Task.status == "done"
            )
        ).all()
        rows = session.execute(
            select(
                Annotation.task_id,
                Annotation.annotator_id,
                Annotation.label,
                Annotation.spans,
                Task.consensus_label,
                Task.consensus_spans,
                Task.status,
            )
            .join(Task, Task.id == Annotation.task_id)
            .where(Task.dataset_id == dataset.id, Annotation.skipped.is_(False), Task.status != "withdrawn")
        ).all()
    label_counts: Counter[str] = Counter()
    for label, spans in decided:
        if with_spans:
            label_counts.update(span["label"] for span in spans or [])
        else:
            label_counts[label] += 1
    per_task: dict[int, Counter[str]] = defaultdict(Counter)
    per_task_spans: dict[int, list[Any]] = defaultdict(list)
    per_annotator: dict[str, list[bool]] = defaultdict(list)
    for task_id, annotator_id, label, spans, consensus_label, consensus_spans, status in rows:
        if with_spans:
            per_task_spans[task_id].append(as_tuples(spans or []))
        else:
            per_task[task_id][label] += 1
        hit = _agrees(status, _answer(label, spans), _answer(consensus_label, consensus_spans))
        if hit is not None:
            per_annotator[annotator_id].append(hit)
    kappa, agreement, used = fleiss_kappa(per_task.values())
    entity_f1, entity_items = pairwise_entity_f1(per_task_spans.values())
    return {
        "dataset_id": dataset.id,
        "tasks": by_status,
        "label_counts": dict(label_counts),
        "percent_agreement": agreement,
        "fleiss_kappa": kappa,
        "items_in_agreement_stats": used,
        "entity_f1": entity_f1,
        "items_in_entity_f1": entity_items,
        "annotators": [
            {"annotator_id": annotator, "labels": len(hits), "agreement_with_consensus": sum(hits) / len(hits)}
            for annotator, hits in sorted(per_annotator.items())
        ],
        "labels_since_snapshot": dataset.labels_since_snapshot,
    }


def annotator_figures(runtime: Runtime, annotator: Annotator) -> dict[str, Any]:
    """An annotator's own work, per dataset it may label: annotations made, skips, and agreement with consensus."""
    with runtime.db.read_session() as session:
        datasets = list(session.scalars(select(LabelingDataset).where(LabelingDataset.id.in_(annotator.datasets))))
        rows = session.execute(
            select(
                Task.dataset_id,
                Annotation.skipped,
                Annotation.label,
                Annotation.spans,
                Task.consensus_label,
                Task.consensus_spans,
                Task.status,
            )
            .join(Task, Task.id == Annotation.task_id)
            .where(Annotation.annotator_id == annotator.id, Task.dataset_id.in_(annotator.datasets))
        ).all()
    made: Counter[str] = Counter()
    skips: Counter[str] = Counter()
    hits: dict[str, list[bool]] = defaultdict(list)
    for dataset_id, skipped, label, spans, consensus_label, consensus_spans, status in rows:
        if skipped:
            skips[dataset_id] += 1
            continue
        made[dataset_id] += 1
        hit = _agrees(status, _answer(label, spans), _answer(consensus_label, consensus_spans))
        if hit is not None:
            hits[dataset_id].append(hit)
    return {
        "id": annotator.id,
        "name": annotator.name,
        "tenant": annotator.tenant,
        "datasets": [
            {
                "dataset_id": dataset.id,
                "name": dataset.name,
                "task_type": dataset.task_type,
                "labels": list(dataset.labels),
                "annotations": made[dataset.id],
                "skips": skips[dataset.id],
                "decided": len(hits[dataset.id]),
                "agreed": sum(hits[dataset.id]),
                "agreement_with_consensus": sum(hits[dataset.id]) / len(hits[dataset.id]) if hits[dataset.id] else None,
            }
            for dataset in sorted(datasets, key=lambda d: d.id)
        ],
    }
