"""Per-dataset agreement (percent agreement, Fleiss' kappa) and each annotator's agreement with consensus."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from sqlalchemy import func, select

from services.labeling.consensus import fleiss_kappa
from services.labeling.models import Annotation, LabelingDataset, Task
from shared.runtime import Runtime


def dataset_stats(runtime: Runtime, dataset: LabelingDataset) -> dict[str, Any]:
    with runtime.db.session() as session:
        by_status = dict(
            session.execute(
                select(Task.status, func.count(Task.id)).where(Task.dataset_id == dataset.id).group_by(Task.status)
            ).all()
        )
        label_counts = dict(
            session.execute(
                select(Task.consensus_label, func.count(Task.id))
                .where(Task.dataset_id == dataset.id, Task.status == "done")
                .group_by(Task.consensus_label)
            ).all()
        )
        rows = session.execute(
            select(Annotation.task_id, Annotation.annotator_id, Annotation.label, Task.consensus_label, Task.status)
            .join(Task, Task.id == Annotation.task_id)
            .where(Task.dataset_id == dataset.id, Annotation.skipped.is_(False), Task.status != "withdrawn")
        ).all()
    per_task: dict[int, Counter[str]] = defaultdict(Counter)
    per_annotator: dict[str, list[bool]] = defaultdict(list)
    for task_id, annotator_id, label, consensus, status in rows:
        per_task[task_id][label] += 1
        if status == "done" and consensus is not None:
            per_annotator[annotator_id].append(label == consensus)
    kappa, agreement, used = fleiss_kappa(per_task.values())
    return {
        "dataset_id": dataset.id,
        "tasks": by_status,
        "label_counts": label_counts,
        "percent_agreement": agreement,
        "fleiss_kappa": kappa,
        "items_in_agreement_stats": used,
        "annotators": [
            {"annotator_id": annotator, "labels": len(hits), "agreement_with_consensus": sum(hits) / len(hits)}
            for annotator, hits in sorted(per_annotator.items())
        ],
        "labels_since_snapshot": dataset.labels_since_snapshot,
    }
