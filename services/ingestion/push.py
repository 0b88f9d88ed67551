"""Accepting a push: dedupe by content hash, validate labels, store content, record rows, emit one event.

Small text items of one push are packed into one object (each item keeps its offset and length), since
millions of tiny objects are an object-store anti-pattern. The object is written before the rows, and the
rows and the `item.ingested` event commit together, so no row or event ever names content that is missing.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from services.ingestion.models import Dataset, Item
from shared.errors import Conflict
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

RAW_BUCKET = "raw"


@dataclass
class PushOutcome:
    results: list[dict[str, Any]] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r["status"] == status)

    def as_response(self) -> dict[str, Any]:
        return {
            "accepted": self.count("accepted"),
            "duplicates": self.count("duplicate"),
            "rejected": self.count("rejected"),
            "items": self.results,
        }


def push_text_items(runtime: Runtime, dataset: Dataset, items: list[dict[str, Any]]) -> PushOutcome:
    outcome = PushOutcome()
    labels = set(dataset.labels)
    encoded = [item["text"].encode("utf-8") for item in items]
    digests = [hashlib.sha256(data).hexdigest() for data in encoded]
    with runtime.db.session() as session:
        existing = dict(
            session.execute(
                select(Item.sha256, Item.id).where(Item.dataset_id == dataset.id, Item.sha256.in_(set(digests)))
            ).all()
        )
    accepted: list[tuple[int, str]] = []
    seen: dict[str, str] = dict(existing)
    for index, (item, digest) in enumerate(zip(items, digests, strict=True)):
        if item.get("label") is not None and item["label"] not in labels:
            reason = f"label {item['label']!r} is not in the dataset's label set"
            outcome.results.append({"index": index, "status": "rejected", "item_id": None, "reason": reason})
        elif digest in seen:
            outcome.results.append({"index": index, "status": "duplicate", "item_id": seen[digest], "reason": None})
        else:
            item_id = f"itm_{uuid.uuid4().hex[:20]}"
            seen[digest] = item_id
            accepted.append((index, item_id))
            outcome.results.append({"index": index, "status": "accepted", "item_id": item_id, "reason": None})
    if not accepted:
        return outcome

    blob = bytearray()
    offsets: dict[int, tuple[int, int]] = {}
    for index, _ in accepted:
        offsets[index] = (len(blob), len(encoded[index]))
        blob += encoded[index]
    key = f"{dataset.tenant}/{dataset.id}/text/{uuid.uuid4().hex}.bin"
    stored = runtime.storage.put(RAW_BUCKET, key, bytes(blob), content_type="application/octet-stream")

    rows: list[Item] = []
    event_items: list[dict[str, Any]] = []
    for index, item_id in accepted:
        offset, length = offsets[index]
        item = items[index]
        rows.append(
            Item(
                id=item_id,
                tenant=dataset.tenant,
                dataset_id=dataset.id,
                kind="text",
                sha256=digests[index],
                bucket=RAW_BUCKET,
                object_key=key,
                object_sha256=stored.sha256,
                offset=offset,
                length=length,
                label=item.get("label"),
                item_metadata=item.get("metadata") or {},
            )
        )
        event_items.append(
            {
                "item_id": item_id,
                "kind": "text",
                "content": {
                    "bucket": RAW_BUCKET,
                    "key": key,
                    "sha256": digests[index],
                    "offset": offset,
                    "length": length,
                },
                "label": item.get("label"),
                "metadata": item.get("metadata") or {},
            }
        )
    try:
        with runtime.db.session() as session:
            session.add_all(rows)
            session.flush()
            runtime.bus.publish(
                session,
                "item.ingested",
                {"dataset": dataset.config(), "items": event_items},
                tenant=dataset.tenant,
            )
    except IntegrityError as exc:
        runtime.storage.delete(RAW_BUCKET, key)
        raise Conflict("the same content is being pushed concurrently; retry the request") from exc
    log.info("items_ingested", dataset_id=dataset.id, accepted=len(accepted), object_key=key)
    return outcome
