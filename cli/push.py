"""`flywheel push DATASET PATH`: a directory of images, a JSONL or a CSV file, in batches, resumable.

Each batch is pushed with an Idempotency-Key derived from the file and the batch's position, and the last
batch that succeeded is remembered under FLYWHEEL_HOME/push-state. Run the same command again after an
interruption and it continues where it stopped; a batch that may have reached the server before the
interruption is replayed by the server, not stored twice.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cli.context import CliContext, progress

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}
TEXT_BATCH = 500
IMAGE_BATCH = 100


def read_items(path: Path) -> list[dict[str, Any]]:
    """Items from a folder of images (sub-folder = label), a JSONL file, or a CSV with `text[,label]`."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [
            {
                "image": file.read_bytes(),
                "label": file.parent.name if file.parent != path else None,
                "metadata": {"filename": str(file.relative_to(path))},
            }
            for file in files
        ]
    if path.suffix.lower() in {".jsonl", ".ndjson"}:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            return [{"text": row["text"], "label": row.get("label") or None} for row in csv.DictReader(handle)]
    raise SystemExit(f"{path}: push a folder of images, a .jsonl or a .csv file")


def _batches(items: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    size = IMAGE_BATCH if items and "image" in items[0] else TEXT_BATCH
    for start in range(0, len(items), size):
        yield items[start : start + size]


def push(context: CliContext, dataset_id: str, path: Path) -> int:
    client = context.partner().ingestion
    items = read_items(path)
    fingerprint = hashlib.sha256(f"{dataset_id}|{path.resolve()}|{path.stat().st_size}".encode()).hexdigest()[:24]
    state_file = context.settings.home / "push-state" / f"{fingerprint}.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"next_batch": 0, "totals": {}}
    totals: dict[str, int] = {"accepted": 0, "duplicates": 0, "rejected": 0, **state["totals"]}
    batches = list(_batches(items))
    if state["next_batch"]:
        print(f"resuming at batch {state['next_batch'] + 1} of {len(batches)}", file=sys.stderr)
    for index in range(state["next_batch"], len(batches)):
        result = client.push(dataset_id, batches[index], idempotency_key=f"push-{fingerprint}-{index}")
        for key in totals:
            totals[key] += result[key]
        state = {"next_batch": index + 1, "totals": totals}
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state))
        progress(sum(len(b) for b in batches[: index + 1]), len(items), "pushing")
    print(file=sys.stderr)
    state_file.unlink(missing_ok=True)
    print(
        f"{len(items)} items: {totals['accepted']} accepted, {totals['duplicates']} duplicates, "
        f"{totals['rejected']} rejected"
    )
    return 0
