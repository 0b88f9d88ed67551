"""Three splits frozen by content hash: train, validation and test. An item keeps its split across snapshots, the
test split is carved out of what used to be validation (never out of train), and every snapshot records each
split's count and the digest of its item ids: in snapshot.json, on its record and in the API's answer."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter

import pytest

from services.labeling.snapshots import split_for

pytestmark = pytest.mark.timeout(120)


def old_split(dataset_id: str, content_sha256: str) -> str:
    """The two-way rule every snapshot followed before the test split: bucket < 20 of 100 validates."""
    bucket = int(hashlib.sha256(f"{dataset_id}:{content_sha256}".encode()).hexdigest()[:8], 16) % 100
    return "validation" if bucket < 20 else "train"


def ids_digest(item_ids: list[str]) -> str:
    """sha256 of the ids sorted, one per line (each followed by a newline), UTF-8: docs/evaluation.md."""
    return hashlib.sha256("".join(f"{item_id}\n" for item_id in sorted(item_ids)).encode("utf-8")).hexdigest()


def test_the_test_split_is_carved_from_old_validation_and_train_is_unchanged() -> None:
    dataset_id = "ds_migrating"
    hashes = [hashlib.sha256(f"item {i}".encode()).hexdigest() for i in range(20_000)]
    new = [split_for(dataset_id, h) for h in hashes]
    old = [old_split(dataset_id, h) for h in hashes]
    assert new == [split_for(dataset_id, h) for h in hashes], "a function of dataset and content alone"

    moved = Counter(zip(old, new, strict=True))
    # Train is exactly what it was: no version trained before the change ever fitted a test item.
    assert moved[("train", "test")] == moved[("train", "validation")] == moved[("validation", "train")] == 0
    assert moved[("train", "train")] == old.count("train")
    # The old validation buckets are now halved between test and validation.
    shares = {split: count / len(hashes) for split, count in Counter(new).items()}
    assert shares["test"] == pytest.approx(0.10, abs=0.01)
    assert shares["validation"] == pytest.approx(0.10, abs=0.01)
    assert shares["train"] == pytest.approx(0.80, abs=0.01)
    # Each dataset draws its own split: the same content may be test in one dataset and train in another.
    other = [split_for("ds_other", h) for h in hashes]
    assert other != new and Counter(other)["test"] == pytest.approx(len(hashes) * 0.10, rel=0.1)


def test_snapshots_record_each_splits_count_and_digest_and_items_keep_their_split(harness) -> None:
    dataset = harness.dataset()
    # Splits depend on the dataset's id, new each run: enough items that every split is non-empty but by a
    # chance of about 1e-5 (0.9 ** 100), and the second push adds test items but by 0.9 ** 150.
    texts = [f"review {uuid.uuid4().hex} number {i}" for i in range(250)]
    harness.push(dataset, texts[:100], ["pos" if i % 3 else "neg" for i in range(100)])
    harness.wait_tasks(dataset, 100)
    client = harness.labeling.client
    storage = harness.worker.storage

    def snapshot() -> tuple[dict, dict, dict[str, str]]:
        response = client.post(f"/v1/datasets/{dataset}/snapshots", headers=harness.partner)
        assert response.status_code == 201, response.get_json()
        answer = response.get_json()
        info = json.loads(
            storage.get_bytes("datasets", answer["manifest_key"].replace("manifest.jsonl", "snapshot.json"))
        )
        manifest = storage.get_bytes("datasets", answer["manifest_key"]).decode().splitlines()
        splits = {line["item_id"]: line["split"] for line in map(json.loads, manifest)}
        return answer, info, splits

    first, first_info, first_splits = snapshot()
    harness.push(dataset, texts[100:], ["pos"] * 150)
    harness.wait_tasks(dataset, 250)
    second, second_info, second_splits = snapshot()

    for answer, info, splits in ((first, first_info, first_splits), (second, second_info, second_splits)):
        ids = {split: [i for i, s in splits.items() if s == split] for split in ("train", "validation", "test")}
        counts = {split: len(members) for split, members in ids.items()}
        digests = {split: ids_digest(members) for split, members in ids.items()}
        assert counts["test"] > 0 and counts["validation"] > 0 and counts["train"] > 0, counts
        # snapshot.json, the snapshot's record (as the API answers it) and a fresh read of it agree.
        assert info["split_counts"] == answer["split_counts"] == counts
        assert info["split_sha256"] == answer["split_sha256"] == digests
        again = client.get(f"/v1/snapshots/{answer['id']}", headers=harness.partner).get_json()
        assert again["split_counts"] == counts and again["split_sha256"] == digests

    # An item keeps its split; the second snapshot's test split holds the first's and more.
    assert all(second_splits[item] == split for item, split in first_splits.items())
    first_test = {i for i, s in first_splits.items() if s == "test"}
    second_test = {i for i, s in second_splits.items() if s == "test"}
    assert first_test < second_test
    assert second["split_sha256"]["test"] != first["split_sha256"]["test"]
