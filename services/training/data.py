"""Reading a dataset snapshot: the manifest, then every item's bytes, each checked against its sha256.

A snapshot is `manifest.jsonl` (one `shared.artifacts.ManifestLine` per labeled item) in the `datasets` bucket.
Items point at their content by ObjectRef; small text items are byte ranges of one packed object, so the
objects are fetched once each (in parallel) and sliced. Anything unusable raises `DataError` with a reason
that says what to fix.

The three splits stay apart from here on: `train` fits the model, `validation` selects its epoch (early
stopping) and is what export verifies on, and `test` is only ever scored once the model is exported
(`comparison.py`), never by the trainer. A run needs train and validation items; its test split may be empty
(snapshots from before it existed) or small, and the evaluation report says how many items it had.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from marshmallow import ValidationError

from services.training.failures import DataError
from shared.artifacts import DATASETS_BUCKET, SPLITS, ManifestLine, SnapshotInfo, snapshot_prefix
from shared.storage import ChecksumMismatch, ObjectNotFound, ObjectStore

KIND_OF_TASK = {"text_classification": "text", "image_classification": "image", "token_classification": "text"}
SPAN_TASK = "token_classification"
FETCH_THREADS = 8
MANIFEST_FILE = "manifest.jsonl"
SNAPSHOT_FILE = "snapshot.json"


@dataclass(frozen=True)
class Example:
    item_id: str
    label: int
    content: bytes


@dataclass
class SnapshotData:
    labels: list[str]
    train: list[Example]
    validation: list[Example]
    manifest_sha256: str
    test: list[Example] = field(default_factory=list)
    """Sorted by item id: the order of the evaluation set (`shared.artifacts.EvaluationSet`)."""
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def train_label_counts(self) -> list[int]:
        counts = Counter(example.label for example in self.train)
        return [counts.get(index, 0) for index in range(len(self.labels))]


def load_snapshot(
    store: ObjectStore, manifest: dict[str, Any], labels: list[str], task_type: str, *, snapshot_id: str
) -> SnapshotData:
    lines = read_manifest(store, manifest, snapshot_id=snapshot_id)
    if not lines:
        raise DataError(
            f"snapshot {snapshot_id} is empty: its manifest lists no labeled items. "
            "Label some items, create a new snapshot, then request training again."
        )
    kind = KIND_OF_TASK[task_type]
    index = {label: i for i, label in enumerate(labels)}
    for line in lines:
        if line["kind"] != kind:
            raise DataError(
                f"item {line['item_id']} of snapshot {snapshot_id} is {line['kind']!r} content, "
                f"but a {task_type} run trains on {kind!r} items only"
            )
        if line["label"] not in index:
            raise DataError(
                f"item {line['item_id']} of snapshot {snapshot_id} has label {line['label']!r}, "
                f"which is not among the run's labels {labels}: request training with the dataset's current labels"
            )
    contents = fetch_contents(store, [line["content"] for line in lines], [line["item_id"] for line in lines])
    splits: dict[str, list[Example]] = {split: [] for split in SPLITS}
    for line, content in zip(lines, contents, strict=True):
        splits[line["split"]].append(Example(line["item_id"], index[line["label"]], content))
    splits["test"].sort(key=lambda example: example.item_id)
    counts = {split: dict(Counter(labels[example.label] for example in examples)) for split, examples in splits.items()}
    for split in ("train", "validation"):
        if not splits[split]:
            raise DataError(
                f"snapshot {snapshot_id} has no items in its {split} split ({len(lines)} items in all): "
                "a run needs both a train and a validation split; snapshot again once both have labeled items"
            )
    return SnapshotData(
        labels=list(labels),
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        manifest_sha256=manifest["sha256"],
        label_counts=counts,
    )


def read_manifest(store: ObjectStore, manifest: dict[str, Any], *, snapshot_id: str) -> list[dict[str, Any]]:
    where = f"{manifest['bucket']}/{manifest['key']}"
    try:
        raw = store.get_bytes(manifest["bucket"], manifest["key"])
    except ObjectNotFound as exc:
        raise DataError(
            f"the manifest of snapshot {snapshot_id} ({where}) does not exist: the snapshot was never written or "
            "has been deleted. Create a new snapshot and request training again."
        ) from exc
    except ChecksumMismatch as exc:
        raise DataError(f"the manifest of snapshot {snapshot_id} ({where}) is corrupt in storage: {exc}") from exc
    actual = hashlib.sha256(raw).hexdigest()
    if actual != manifest["sha256"]:
        raise DataError(
            f"the manifest of snapshot {snapshot_id} ({where}) hashes to {actual}, not the {manifest['sha256']} "
            "the request named: snapshots are immutable, so this one was overwritten. Create a new snapshot."
        )
    schema = ManifestLine()
    lines = []
    for number, text in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            lines.append(schema.load(json.loads(text)))
        except (json.JSONDecodeError, ValidationError) as exc:
            detail = exc.normalized_messages() if isinstance(exc, ValidationError) else str(exc)
            raise DataError(f"line {number} of the manifest of snapshot {snapshot_id} is invalid: {detail}") from exc
    return lines


def fetch_contents(store: ObjectStore, refs: list[dict[str, Any]], item_ids: list[str]) -> list[bytes]:
    """Each item's bytes, in order: every distinct object read once (in parallel), ranges sliced, sha256 checked."""
    objects = sorted({(ref["bucket"], ref["key"]) for ref in refs})

    def fetch(location: tuple[str, str]) -> bytes:
        try:
            return store.get_bytes(*location)
        except ObjectNotFound as exc:
            raise DataError(
                f"content object {location[0]}/{location[1]} named by the snapshot is missing: its items were "
                "erased after the snapshot was taken. Create a new snapshot."
            ) from exc
        except ChecksumMismatch as exc:
            raise DataError(f"content object {location[0]}/{location[1]} is corrupt in storage: {exc}") from exc

    with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(objects)) or 1) as pool:
        blobs = dict(zip(objects, pool.map(fetch, objects), strict=True))
    contents = []
    for ref, item_id in zip(refs, item_ids, strict=True):
        blob = blobs[(ref["bucket"], ref["key"])]
        offset, length = ref.get("offset"), ref.get("length")
        if offset is not None or length is not None:
            start = offset or 0
            end = start + length if length is not None else len(blob)
            if end > len(blob):
                raise DataError(
                    f"item {item_id} names bytes {start}..{end} of {ref['bucket']}/{ref['key']}, "
                    f"which holds only {len(blob)} bytes"
                )
            blob = blob[start:end]
        if hashlib.sha256(blob).hexdigest() != ref["sha256"]:
            raise DataError(
                f"the content of item {item_id} does not match its sha256 {ref['sha256']}: the stored bytes "
                "changed after the snapshot was taken. Create a new snapshot."
            )
        contents.append(blob)
    return contents


def read_snapshot_info(store: ObjectStore, tenant: str, dataset_id: str, snapshot_id: str) -> dict[str, Any]:
    """`snapshot.json` of a snapshot, checked to be trainable: it exists, belongs to the tenant and has items."""
    key = f"{snapshot_prefix(tenant, dataset_id, snapshot_id)}/{SNAPSHOT_FILE}"
    try:
        info = SnapshotInfo().load(json.loads(store.get_bytes(DATASETS_BUCKET, key)))
    except ObjectNotFound as exc:
        raise DataError(
            f"snapshot {snapshot_id} of dataset {dataset_id} does not exist for tenant {tenant} "
            f"(no {DATASETS_BUCKET}/{key})"
        ) from exc
    except (json.JSONDecodeError, ValidationError, ChecksumMismatch) as exc:
        raise DataError(f"{DATASETS_BUCKET}/{key} is not a valid snapshot description: {exc}") from exc
    if info["tenant"] != tenant or info["dataset_id"] != dataset_id:
        raise DataError(f"{DATASETS_BUCKET}/{key} describes another dataset's snapshot")
    if info["item_count"] == 0:
        raise DataError(
            f"snapshot {snapshot_id} is empty: it lists no labeled items. "
            "Label some items, create a new snapshot, then request training again."
        )
    if info["task_type"] == SPAN_TASK and not info["labels"]:
        raise DataError(f"snapshot {snapshot_id} declares no entity labels; a tagger needs at least one")
    if info["task_type"] != SPAN_TASK and len(set(info["labels"])) < 2:
        raise DataError(f"snapshot {snapshot_id} has labels {info['labels']}; a classifier needs at least two")
    return info


def manifest_ref(tenant: str, dataset_id: str, snapshot_id: str, manifest_sha256: str) -> dict[str, Any]:
    key = f"{snapshot_prefix(tenant, dataset_id, snapshot_id)}/{MANIFEST_FILE}"
    return {"bucket": DATASETS_BUCKET, "key": key, "sha256": manifest_sha256, "offset": None, "length": None}
