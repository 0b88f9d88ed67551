"""Dataset snapshots: the current consensus frozen into an immutable, verifiable dataset version.

A snapshot is a `manifest.jsonl` (one `shared.artifacts.ManifestLine` per labeled item, sorted by item id; a
token-classification item's line carries its consensus entities as `spans` beside a null `label`)
and a `snapshot.json` in the `datasets` bucket, under a prefix named by the snapshot's id; it is never
written twice.

Each item falls in one of three splits (`shared.artifacts.SPLITS`): train, validation (model selection, early
stopping) and test (the promotion gate's). The split is a function of the dataset and the item's content hash
alone, so an item keeps its split across snapshots, and a candidate and the production version are scored on
the same frozen items. The snapshot records each split's count and the digest of its item ids
(`shared.artifacts.item_ids_sha256`). docs/evaluation.md says how datasets from before the test split migrate.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from services.labeling.models import LabelingDataset, Snapshot, Task
from services.labeling.spans import is_span_dataset
from shared.artifacts import DATASETS_BUCKET, SPLITS, SnapshotInfo, item_ids_sha256, snapshot_prefix
from shared.errors import Conflict, NotFound, Unprocessable
from shared.logging import get_logger, log_context
from shared.runtime import Runtime

log = get_logger(__name__)

BUCKETS = 100
TEST_BUCKETS = range(0, 10)
VALIDATION_BUCKETS = range(10, 20)
"""Of an item's 100 hash buckets, 0-9 are test and 10-19 validation; the rest train. Before the test split,
buckets 0-19 were validation: the test split is carved out of them, never out of train, so no version trained
before it ever fitted a test item (it may have been selected on one; see docs/evaluation.md)."""


def new_snapshot_id() -> str:
    return f"snap_{uuid.uuid4().hex[:20]}"


def split_bucket(dataset_id: str, content_sha256: str) -> int:
    return int(hashlib.sha256(f"{dataset_id}:{content_sha256}".encode()).hexdigest()[:8], 16) % BUCKETS


def split_for(dataset_id: str, content_sha256: str) -> str:
    bucket = split_bucket(dataset_id, content_sha256)
    if bucket in TEST_BUCKETS:
        return "test"
    return "validation" if bucket in VALIDATION_BUCKETS else "train"


@dataclass
class Manifest:
    data: bytes
    label_counts: dict[str, int]
    split_counts: dict[str, int]
    split_sha256: dict[str, str]
    """Every split's `item_ids_sha256`, the empty ones included: a split with no items says so."""


def _manifest(dataset: LabelingDataset, tasks: list[Task]) -> Manifest:
    labels: Counter[str] = Counter()
    split_ids: dict[str, list[str]] = defaultdict(list)
    lines = []
    with_spans = is_span_dataset(dataset.task_type)
    for task in sorted(tasks, key=lambda t: t.item_id):
        split = split_for(dataset.id, task.sha256)
        split_ids[split].append(task.item_id)
        content = {"bucket": task.bucket, "key": task.object_key, "sha256": task.sha256}
        if task.offset is not None:
            content |= {"offset": task.offset, "length": task.length}
        line = {"item_id": task.item_id, "kind": task.kind, "content": content, "label": task.consensus_label}
        if with_spans:  # a token item's consensus is its entities; label_counts counts them by entity label
            line["spans"] = task.consensus_spans or []
            labels.update(span["label"] for span in line["spans"])
        else:
            labels[task.consensus_label] += 1
        lines.append(json.dumps(line | {"split": split}, sort_keys=True, separators=(",", ":")))
    return Manifest(
        data=("\n".join(lines) + "\n").encode(),
        label_counts=dict(labels),
        split_counts={split: len(split_ids[split]) for split in SPLITS},
        split_sha256={split: item_ids_sha256(split_ids[split]) for split in SPLITS},
    )


def build_snapshot(runtime: Runtime, snapshot_id: str) -> Snapshot:
    """Write the snapshot's manifest and mark it ready, emitting its events in the same transaction. Its log
    lines carry the trace of whatever crossed the retrain threshold (or asked for the snapshot)."""
    with runtime.db.read_session() as session:
        snapshot = session.get(Snapshot, snapshot_id)
        trace_id = snapshot.trace_id if snapshot else None
    with log_context(trace_id=trace_id, snapshot_id=snapshot_id):
        return _build(runtime, snapshot_id)


def _build(runtime: Runtime, snapshot_id: str) -> Snapshot:
    with runtime.db.session() as session:
        snapshot = session.get(Snapshot, snapshot_id)
        if snapshot is None:
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        if snapshot.status != "pending":
            return snapshot
        dataset = session.get(LabelingDataset, snapshot.dataset_id)
        tasks = list(
            session.scalars(
                select(Task).where(
                    Task.dataset_id == dataset.id, Task.status == "done", Task.consensus_at <= snapshot.created_at
                )
            )
        )
    if not tasks:
        return _fail(runtime, snapshot_id, "the dataset has no consensus labels yet")
    manifest = _manifest(dataset, tasks)
    prefix = snapshot_prefix(dataset.tenant, dataset.id, snapshot_id)
    if runtime.storage.exists(DATASETS_BUCKET, f"{prefix}/manifest.jsonl"):
        # Written by an earlier attempt that died before marking it ready: reuse it, never overwrite it.
        stored = runtime.storage.stat(DATASETS_BUCKET, f"{prefix}/manifest.jsonl")
    else:
        stored = runtime.storage.put(
            DATASETS_BUCKET, f"{prefix}/manifest.jsonl", manifest.data, content_type="application/x-ndjson"
        )
    info = SnapshotInfo().dump(
        {
            "snapshot_id": snapshot_id,
            "dataset_id": dataset.id,
            "tenant": dataset.tenant,
            "task_type": dataset.task_type,
            "labels": dataset.labels,
            "label_counts": manifest.label_counts,
            "split_counts": manifest.split_counts,
            "split_sha256": manifest.split_sha256,
            "item_count": len(tasks),
            "manifest_sha256": stored.sha256,
            "created_at": datetime.now(UTC).isoformat(),
        }
    )
    if not runtime.storage.exists(DATASETS_BUCKET, f"{prefix}/snapshot.json"):
        runtime.storage.put(DATASETS_BUCKET, f"{prefix}/snapshot.json", json.dumps(info, indent=2).encode())
    manifest_ref = {"bucket": DATASETS_BUCKET, "key": f"{prefix}/manifest.jsonl", "sha256": stored.sha256}
    with runtime.db.session() as session:
        snapshot = session.get(Snapshot, snapshot_id)
        snapshot.status = "ready"
        snapshot.manifest_key = manifest_ref["key"]
        snapshot.manifest_sha256 = stored.sha256
        snapshot.item_count = len(tasks)
        snapshot.label_counts = manifest.label_counts
        snapshot.split_counts = manifest.split_counts
        snapshot.split_sha256 = manifest.split_sha256
        runtime.bus.publish(
            session,
            "dataset.snapshot_created",
            {
                "dataset_id": dataset.id,
                "snapshot_id": snapshot_id,
                "manifest": manifest_ref,
                "label_counts": manifest.label_counts,
                "item_count": len(tasks),
            },
            tenant=dataset.tenant,
            trace_id=snapshot.trace_id,
        )
        if snapshot.trigger_training:
            runtime.bus.publish(
                session,
                "training.requested",
                {
                    "dataset_id": dataset.id,
                    "snapshot_id": snapshot_id,
                    "manifest": manifest_ref,
                    "task_type": dataset.task_type,
                    "labels": list(dataset.labels),
                    "reason": snapshot.training_reason
                    or f"retrain policy: {dataset.retrain_threshold} new consensus labels",
                    "model_name": model_name_for(dataset),
                    "base_model": dataset.training_base_model,
                    "hyperparameters": dataset.training_hyperparameters or {},
                },
                tenant=dataset.tenant,
                trace_id=snapshot.trace_id,
            )
    log.info(
        "snapshot_created",
        snapshot_id=snapshot_id,
        dataset_id=dataset.id,
        items=len(tasks),
        split_counts=manifest.split_counts,
        manifest_sha256=stored.sha256,
        training_requested=snapshot.trigger_training,
    )
    return snapshot


def model_name_for(dataset: LabelingDataset) -> str:
    """The registry model a dataset trains: its name, made URL-safe."""
    return "-".join(dataset.name.lower().split()).replace("/", "-")


def _fail(runtime: Runtime, snapshot_id: str, reason: str) -> Snapshot:
    with runtime.db.session() as session:
        snapshot = session.get(Snapshot, snapshot_id)
        snapshot.status = "failed"
        snapshot.failure = reason
    log.warning("snapshot_failed", snapshot_id=snapshot_id, reason=reason)
    return snapshot


def read_manifest(runtime: Runtime, snapshot: Snapshot) -> list[dict[str, Any]]:
    if snapshot.status != "ready":
        raise Conflict(f"snapshot {snapshot.id} is {snapshot.status}")
    data = runtime.storage.get_bytes(DATASETS_BUCKET, snapshot.manifest_key)
    if hashlib.sha256(data).hexdigest() != snapshot.manifest_sha256:
        raise Conflict(f"snapshot {snapshot.id}'s manifest does not match its sha256")
    return [json.loads(line) for line in data.decode().splitlines() if line]


def export_rows(runtime: Runtime, snapshot: Snapshot) -> Iterator[dict[str, Any]]:
    """Each labeled item with its text inline (text datasets) or its object reference (images)."""
    for line in read_manifest(runtime, snapshot):
        content = line["content"]
        row = {"item_id": line["item_id"], "label": line["label"], "split": line["split"], "sha256": content["sha256"]}
        if "spans" in line:
            row["spans"] = line["spans"]
        if line["kind"] == "text":  # a byte range of a packed object, or a whole one (labeling's redacted copy)
            bucket, key = content["bucket"], content["key"]
            if content.get("offset") is not None:
                data = runtime.storage.get_range(bucket, key, content["offset"], content["length"])
            else:
                data = runtime.storage.get_bytes(bucket, key, verify=False)
            row["text"] = data.decode("utf-8") if hashlib.sha256(data).hexdigest() == content["sha256"] else None
        else:
            row["object"] = f"{content['bucket']}/{content['key']}"
        yield row


def export(runtime: Runtime, snapshot: Snapshot, fmt: str) -> Iterator[str]:
    rows = export_rows(runtime, snapshot)
    if fmt == "jsonl":
        for row in rows:
            yield json.dumps(row, ensure_ascii=False) + "\n"
        return
    if fmt != "csv":
        raise Unprocessable("format must be jsonl or csv")
    task_type = snapshot_task_type(runtime, snapshot)
    answer = "spans" if is_span_dataset(task_type) else "label"
    content = "object" if task_type == "image_classification" else "text"
    columns = ["item_id", "split", answer, "sha256", content]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        if "spans" in row:  # one CSV cell: the entities as JSON, offsets in Unicode code points
            row = row | {"spans": json.dumps(row["spans"], ensure_ascii=False)}
        writer.writerow(row)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


def snapshot_task_type(runtime: Runtime, snapshot: Snapshot) -> str:
    with runtime.db.read_session() as session:
        return session.get(LabelingDataset, snapshot.dataset_id).task_type
