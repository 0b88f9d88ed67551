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
"""

from __future__ import annotations

from shared.artifacts import RAW_BUCKET
from shared.logging import get_logger
from shared.pii import Redaction
from shared.pii_policy import PiiPolicies
from shared.runtime import Runtime

log = get_logger(__name__)


def policies(runtime: Runtime) -> PiiPolicies:
    """The runtime's policy lookup, made on first use (one per worker process)."""
    lookup = getattr(runtime, "pii_policies", None)
    if lookup is None:
        lookup = runtime.pii_policies = PiiPolicies(runtime.settings)  # type: ignore[attr-defined]
    return lookup


def feedback_input(runtime: Runtime, tenant: str, dataset_id: str, prediction_id: str, reference: dict) -> dict:
    """The reference the feedback task should hold: the event's, or a redacted copy's."""
    lookup = policies(runtime)
    if lookup.policy(tenant, dataset_id) != "redact":
        return reference
    return _redacted(runtime, tenant, dataset_id, prediction_id, reference, read_text(runtime, reference))[0]


def span_feedback_input(
    runtime: Runtime, tenant: str, dataset_id: str, prediction_id: str, reference: dict, text: str
) -> tuple[dict, Redaction | None]:
    """For span feedback on `text` (the event's input, read by the caller to check the spans): the reference the
    task should hold and, when labeling redacted the text here, the redaction, whose `moved` puts the event's
    offsets on the redacted text."""
    if policies(runtime).policy(tenant, dataset_id) != "redact":
        return reference, None
    return _redacted(runtime, tenant, dataset_id, prediction_id, reference, text)


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
    runtime: Runtime, tenant: str, dataset_id: str, prediction_id: str, reference: dict, text: str
) -> tuple[dict, Redaction | None]:
    redaction = policies(runtime).apply(tenant, dataset_id, text)
    if not redaction.counts:
        return reference, None
    stored = runtime.storage.put(RAW_BUCKET, f"{tenant}/feedback/{prediction_id}.txt", redaction.text.encode("utf-8"))
    log.info("feedback_input_redacted", dataset_id=dataset_id, prediction_id=prediction_id, redactions=redaction.counts)
    moved = {"bucket": RAW_BUCKET, "key": stored.key, "sha256": stored.sha256, "offset": None, "length": None}
    return moved, redaction
