"""Inference's part of a data subject's erasure: `erasure.requested`, consumed like ground truth by every inference
HTTP process (`ground_truth.EventListener`, one process handles each event, idempotent by event id).

The subject's logged predictions (the `:predict` requests that named the `subject_id`) are deleted with their
feedback, ground truth and shadow answers, and their inputs are erased from the packed log objects: an object
whose every input is the subject's is deleted; otherwise the subject's byte ranges are overwritten with zero bytes
in place (the other predictions' offsets and sha256 stay valid). Every row sharing a pack is locked first, so two
erasures of one pack cannot undo each other's zeros.

Labeling made tasks from some of these predictions (feedback, sampled traffic): `prediction.erased` (in batches)
tells it which, and the report expects one labeling step per batch.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import delete, select

from services.inference.ground_truth import handlers
from services.inference.models import Prediction, ShadowPrediction
from shared.events.consumer import EventContext
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

IDS_PER_EVENT = 1000


@handlers.on("erasure.requested")
def on_erasure_requested(ctx: EventContext) -> None:
    payload = ctx.payload
    erasure_id = payload["erasure_id"]
    rows = list(
        ctx.session.scalars(
            select(Prediction).where(
                Prediction.tenant == ctx.envelope.tenant, Prediction.subject_id == payload["subject_id"]
            )
        )
    )
    counts = erase_predictions(ctx.runtime, ctx.session, rows)
    erased_ids = sorted(row.id for row in rows)
    expects = []
    for start in range(0, len(erased_ids), IDS_PER_EVENT):
        batch = {"erasure_id": erasure_id, "prediction_ids": erased_ids[start : start + IDS_PER_EVENT]}
        envelope = ctx.publish("prediction.erased", batch)
        expects.append({"service": "labeling", "step": envelope.event_id})
    ctx.publish(
        "erasure.step_completed",
        {
            "erasure_id": erasure_id,
            "service": "inference",
            "step": ctx.envelope.event_id,
            "counts": counts,
            "expects": expects,
        },
    )
    log.info("subject_predictions_erased", erasure_id=erasure_id, **counts)


def erase_predictions(runtime: Runtime, session: Any, rows: list[Prediction]) -> dict[str, int]:
    """Delete these logged predictions (and what hangs on them) and erase their inputs; returns the counts."""
    counts = {
        "predictions_deleted": 0,
        "feedback_records": 0,
        "ground_truth_records": 0,
        "shadow_answers": 0,
        "input_bytes": 0,
        "input_objects": 0,
    }
    if not rows:
        return counts
    wanted = {row.id for row in rows}
    for bucket, key in sorted({(row.input_bucket, row.input_key) for row in rows}):
        sharing = session.scalars(
            select(Prediction)
            .where(Prediction.input_bucket == bucket, Prediction.input_key == key)
            .order_by(Prediction.id)
            .with_for_update()
        ).all()
        erased = [row for row in sharing if row.id in wanted]
        if not erased:  # another erasure took them while we waited for the lock
            continue
        _erase_inputs(runtime, bucket, key, erased, kept=len(sharing) > len(erased))
        counts["input_objects"] += 1
        for row in erased:
            counts["predictions_deleted"] += 1
            counts["feedback_records"] += row.feedback_label is not None or row.feedback_spans is not None
            counts["ground_truth_records"] += row.true_label is not None
            counts["input_bytes"] += row.input_length
    erased_ids = sorted(wanted)
    shadows = session.execute(delete(ShadowPrediction).where(ShadowPrediction.prediction_id.in_(erased_ids)))
    counts["shadow_answers"] = shadows.rowcount or 0
    session.execute(delete(Prediction).where(Prediction.id.in_(erased_ids)))
    return counts


def _erase_inputs(runtime: Runtime, bucket: str, key: str, erased: list[Prediction], *, kept: bool) -> None:
    if not kept:
        runtime.storage.delete(bucket, key)
        return
    if not runtime.storage.exists(bucket, key):  # pruned by the log's retention already
        return
    pack = bytearray(runtime.storage.get_bytes(bucket, key, verify=False))
    ranges: dict[int, int] = defaultdict(int)
    for row in erased:
        ranges[row.input_offset] = max(ranges[row.input_offset], row.input_length)
    for offset, length in ranges.items():
        pack[offset : offset + length] = bytes(length)
    runtime.storage.put(bucket, key, bytes(pack))
