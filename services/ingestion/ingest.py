"""Accepting items: validate, redact, dedupe by content hash, store content, record rows, emit one event.

Used by the push API and by bulk imports alike, one batch at a time:

1. each candidate's label (or, in a token_classification dataset, each entity span's label) is checked against
   the dataset's label set (else `rejected`, with the reason);
2. content is hashed (after redaction, since redacted text is what we keep) and deduplicated within the
   batch and against the dataset (`duplicate`, with the existing id);
3. content goes to object storage first: the small text items of a batch packed into one object (each item
   keeps its offset and length — millions of tiny objects are an object-store anti-pattern), each image as
   one content-addressed object;
4. then one transaction inserts the rows, counts usage against the quota and writes `item.ingested` to the
   outbox. If it fails, the objects written in step 3 are removed: no row or event names missing content.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.ingestion import metering, quotas, spans
from services.ingestion.models import Dataset, Item, Partner
from services.ingestion.pii import Redaction, redact, redact_with_entities
from shared.artifacts import RAW_BUCKET
from shared.errors import Conflict
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

IMAGE_UPLOAD_THREADS = 4


@dataclass
class Candidate:
    """One item that passed schema validation, ready to be judged against the dataset and stored."""

    index: int
    kind: str  # "text" | "image"
    data: bytes
    content_type: str
    label: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    redactions: dict[str, int] = field(default_factory=dict)
    sha256: str = ""
    spans: list[dict[str, Any]] | None = None
    """token_classification: entity spans (code point offsets into the stored text), None when unlabeled."""
    problem: str | None = None
    """Why the candidate must be rejected before it is judged further (spans moved by PII redaction)."""
    subject_id: str | None = None
    """The partner-given data subject the item is about (erasable by it: services/ingestion/erasure.py)."""
    unscanned: str | None = None
    """The raw text while it awaits the tenant's PII model (the dataset's `pii_entities`): the batch's texts are
    scanned together (`pii.redact_with_entities`) before anything is judged or stored."""


@dataclass
class BatchOutcome:
    results: list[dict[str, Any]] = field(default_factory=list)
    accepted_bytes: int = 0

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r["status"] == status)

    def as_response(self) -> dict[str, Any]:
        return {
            "accepted": self.count("accepted"),
            "duplicates": self.count("duplicate"),
            "rejected": self.count("rejected"),
            "items": sorted(self.results, key=lambda r: r["index"]),
        }


def text_candidate(
    index: int,
    text: str,
    *,
    pii_policy: str,
    label: str | None,
    metadata: dict,
    entity_spans: list[dict[str, Any]] | None = None,
    subject_id: str | None = None,
    pii_entities: dict[str, Any] | None = None,
) -> Candidate:
    """A text item; with `pii_policy: redact`, redacted now by the patterns, or (the policy naming a model of the
    tenant's, `pii_entities`) left `unscanned` for the batch's one call to that model."""
    candidate = Candidate(
        index=index,
        kind="text",
        data=text.encode("utf-8"),
        content_type="text/plain; charset=utf-8",
        label=label,
        metadata=metadata,
        spans=spans.canonical(entity_spans),
        subject_id=subject_id,
    )
    if pii_policy == "redact":
        if pii_entities:
            candidate.unscanned = text
        else:
            redacted(candidate, text, redact(text))
    return candidate


def redacted(candidate: Candidate, text: str, redaction: Redaction) -> None:
    """The candidate's content made the redacted text."""
    if candidate.spans and redaction.text != text:
        # Placeholders change the text's length: the partner's offsets would name other characters.
        candidate.problem = "spans: PII redaction changed the text, which would move the entity offsets"
    candidate.data, candidate.redactions, candidate.unscanned = redaction.text.encode("utf-8"), redaction.counts, None


def _rejection(candidate: Candidate, dataset: Dataset, labels: set[str]) -> str | None:
    """Why the dataset cannot take the candidate (its labels or spans do not fit it), or None."""
    if candidate.problem is not None:
        return candidate.problem
    if dataset.task_type == "token_classification":
        if candidate.label is not None:
            return "label: a token_classification item carries entity spans, not a label"
        return spans.unknown_label(candidate.spans, labels)
    if candidate.spans is not None:
        return "spans: only token_classification datasets take entity spans"
    if candidate.label is not None and candidate.label not in labels:
        return f"label {candidate.label!r} is not in the dataset's label set"
    return None


def ingest_batch(
    runtime: Runtime,
    dataset: Dataset,
    candidates: list[Candidate],
    *,
    in_transaction: Callable[[Session, BatchOutcome], None] | None = None,
    importing: str | None = None,
) -> BatchOutcome:
    """Judge, store and record one batch. `in_transaction` runs inside the final transaction (imports use it
    to move their progress forward atomically with the items); `importing` names the import the batch is of,
    whose own quota hold is the room the batch takes. Texts awaiting the tenant's PII model are scanned first
    (`ServiceUnavailable` when it cannot answer: nothing of the batch is stored)."""
    _redact_unscanned(runtime, dataset, candidates)
    try:
        return _ingest(runtime, dataset, candidates, in_transaction, importing)
    except IntegrityError:
        # The same content was pushed concurrently and committed first: judged again, it is a duplicate now.
        try:
            return _ingest(runtime, dataset, candidates, in_transaction, importing)
        except IntegrityError as exc:
            raise Conflict("the same content is being pushed concurrently; retry the request") from exc


def _redact_unscanned(runtime: Runtime, dataset: Dataset, candidates: list[Candidate]) -> None:
    waiting = [candidate for candidate in candidates if candidate.unscanned is not None]
    if not waiting:
        return
    texts = [candidate.unscanned or "" for candidate in waiting]
    for candidate, text, redaction in zip(
        waiting, texts, redact_with_entities(runtime, dataset.tenant, dataset.pii_entities, texts), strict=True
    ):
        redacted(candidate, text, redaction)


def _ingest(
    runtime: Runtime,
    dataset: Dataset,
    candidates: list[Candidate],
    in_transaction: Callable[[Session, BatchOutcome], None] | None,
    importing: str | None,
) -> BatchOutcome:
    outcome = BatchOutcome()
    labels = set(dataset.labels)
    for candidate in candidates:
        candidate.sha256 = hashlib.sha256(candidate.data).hexdigest()
    with runtime.db.read_session() as session:
        partner = session.get(Partner, dataset.tenant)
        known = dict(
            session.execute(
                select(Item.sha256, Item.id).where(
                    Item.dataset_id == dataset.id, Item.sha256.in_({c.sha256 for c in candidates})
                )
            ).all()
        )
    accepted: list[tuple[Candidate, str]] = []
    for candidate in candidates:
        reason = _rejection(candidate, dataset, labels)
        if reason is not None:
            outcome.results.append({"index": candidate.index, "status": "rejected", "item_id": None, "reason": reason})
        elif candidate.sha256 in known:
            outcome.results.append(
                {"index": candidate.index, "status": "duplicate", "item_id": known[candidate.sha256], "reason": None}
            )
        else:
            item_id = f"itm_{uuid.uuid4().hex[:20]}"
            known[candidate.sha256] = item_id
            accepted.append((candidate, item_id))
            outcome.results.append({"index": candidate.index, "status": "accepted", "item_id": item_id, "reason": None})
    outcome.accepted_bytes = sum(len(c.data) for c, _ in accepted)
    if accepted:
        with runtime.db.read_session() as session:
            quotas.check(session, partner, len(accepted), outcome.accepted_bytes, importing=importing)

    push_id = f"push_{uuid.uuid4().hex[:20]}"
    rows, written = _store_content(runtime, dataset, push_id, accepted)
    try:
        event = None
        if rows:  # built and validated before the write transaction, which then stays short
            payload = {"dataset": dataset.config(), "items": [_event_item(row) for row in rows]}
            event = runtime.bus.envelope("item.ingested", payload, tenant=dataset.tenant)
        with runtime.db.session() as session:
            if rows:
                session.execute(insert(Item), rows)
                runtime.bus.publish_envelope(session, event)
            quotas.record(
                session,
                partner,
                items=len(rows),
                size=outcome.accepted_bytes,
                duplicates=outcome.count("duplicate"),
                rejected=outcome.count("rejected"),
                importing=importing,
            )
            if rows:
                metering.record(session, _push_usage(dataset, push_id, len(rows), outcome.accepted_bytes), "ingestion")
            if in_transaction is not None:
                in_transaction(session, outcome)
    except BaseException:
        for key in written:
            _delete_quietly(runtime, key)
        raise
    if rows:
        log.info(
            "items_ingested",
            dataset_id=dataset.id,
            push_id=push_id,
            accepted=len(rows),
            duplicates=outcome.count("duplicate"),
            rejected=outcome.count("rejected"),
            bytes=outcome.accepted_bytes,
        )
    return outcome


def _push_usage(dataset: Dataset, push_id: str, items: int, size: int) -> list[dict[str, Any]]:
    """The push's usage records; their ids derive from the push's, so the push is metered once."""
    tenant, dimensions = dataset.tenant, {"dataset_id": dataset.id}
    return [
        metering.usage_record(f"{push_id}.items", "items_ingested", tenant, items, **dimensions),
        metering.usage_record(f"{push_id}.bytes", "bytes_ingested", tenant, size, **dimensions),
    ]


def _store_content(
    runtime: Runtime, dataset: Dataset, push_id: str, accepted: list[tuple[Candidate, str]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Write the accepted content; returns the item rows to insert and the keys written (for clean-up)."""
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    written: list[str] = []
    texts = [(c, item_id) for c, item_id in accepted if c.kind == "text"]
    images = [(c, item_id) for c, item_id in accepted if c.kind == "image"]
    try:
        if texts:
            key = f"{dataset.tenant}/{dataset.id}/text/{push_id}.txt"
            pack = b"".join(c.data for c, _ in texts)
            stored = runtime.storage.put(RAW_BUCKET, key, pack, content_type="application/octet-stream")
            written.append(key)
            offset = 0
            for candidate, item_id in texts:
                rows.append(_row(dataset, push_id, now, candidate, item_id, key, stored.sha256, offset))
                offset += len(candidate.data)
        if images:

            def put_image(entry: tuple[Candidate, str]) -> dict[str, Any]:
                candidate, item_id = entry
                key = f"{dataset.tenant}/{dataset.id}/images/{push_id}/{candidate.sha256}"
                stored = runtime.storage.put(RAW_BUCKET, key, candidate.data, content_type=candidate.content_type)
                written.append(key)
                return _row(dataset, push_id, now, candidate, item_id, key, stored.sha256, None)

            if len(images) == 1:
                rows.append(put_image(images[0]))
            else:
                with ThreadPoolExecutor(max_workers=IMAGE_UPLOAD_THREADS) as pool:
                    rows.extend(pool.map(put_image, images))
    except BaseException:
        for key in written:
            _delete_quietly(runtime, key)
        raise
    return rows, written


def _row(
    dataset: Dataset,
    push_id: str,
    now: datetime,
    candidate: Candidate,
    item_id: str,
    key: str,
    object_sha256: str,
    offset: int | None,
) -> dict[str, Any]:
    return {
        "id": item_id,
        "tenant": dataset.tenant,
        "dataset_id": dataset.id,
        "kind": candidate.kind,
        "sha256": candidate.sha256,
        "content_type": candidate.content_type,
        "bucket": RAW_BUCKET,
        "object_key": key,
        "object_sha256": object_sha256,
        "offset": offset,
        "length": len(candidate.data),
        "label": candidate.label,
        "spans": candidate.spans,
        "item_metadata": candidate.metadata,
        "redactions": candidate.redactions,
        "push_id": push_id,
        "created_at": now,
        "subject_id": candidate.subject_id,
    }


def _event_item(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "item_id": row["id"],
        "kind": row["kind"],
        "content": {
            "bucket": row["bucket"],
            "key": row["object_key"],
            "sha256": row["sha256"],
            "offset": row["offset"],
            "length": row["length"],
        },
        "label": row["label"],
        "metadata": row["item_metadata"],
        **({"spans": row["spans"]} if row["spans"] is not None else {}),
    }


def _delete_quietly(runtime: Runtime, key: str) -> None:
    try:
        runtime.storage.delete(RAW_BUCKET, key)
    except Exception as exc:  # an orphaned object is harmless; a masked original error is not
        log.warning("orphan_object_left", key=key, error=str(exc)[:200])
