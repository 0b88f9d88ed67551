"""The promotion gate across the running platform: a candidate and production scored on the same frozen test
items, a better model promoted on that evidence, a worse one staged while production keeps serving.

Three versions of one digits model, through the public APIs only:
- v1, trained on labels of which half are wrong: the first version, promoted (nothing to beat but the floor);
- v2, trained on the same items plus more, correctly labeled ones: promoted, its decision scoring v1 again on
  the second snapshot's test split, where v1's answers are the ones inference served;
- v3, retrained through the training API on v2's snapshot with hyper-parameters that cripple it (one epoch at
  a learning rate too small to move the weights): staged, the failed conditions named, v2 still serving.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pytest

from cli.demo_data import DIGIT_LABELS, digit_images, shuffled
from shared.artifacts import item_ids_sha256
from shared.client import Flywheel
from tests.e2e.support import MODEL, digits_partner, finished, only, predict, push_labeled, versions
from tests.helpers import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

FIRST = 550
"""Items of the first snapshot: its test split (10%) must reach the gate's default min_test_items (30) for v1 to
be decided on at all; fewer than 30 of 550 happens about once in 25,000 datasets."""
SECOND = 2 * FIRST
"""Correctly labeled items of the second push, the retrain threshold for it: the second snapshot holds both."""
MISLABELED = 0.6
"""Share of the first items pushed with a wrong label. v2 must beat v1 in every class, not only on average:
the per-class guard allows a drop of 0.10 in any class's F1, and with 10 to 20 test items per class one item
moves a class's F1 by about that much. Measured: with 40% to 55% wrong, v2 beat v1 by 0.13 to 0.33 overall,
yet in some class by less than 0.05 (and once lost a class by 0.13). With 60% wrong, v1 is weak in every
class (macro-F1 about 0.1, still well above the floor, the majority baseline's 0.02)."""
HYPERPARAMETERS = {"epochs": 4, "image_size": 32, "batch_size": 32}
CRIPPLED = {"epochs": 1, "image_size": 32, "batch_size": 32, "learning_rate": 1e-6, "head_learning_rate": 1e-6}
CONDITIONS = ["min_test_items", "margin", "credible_improvement", "class_regression", "min_score"]
SERVED_TOLERANCE_ITEMS = 2
"""Inference batches requests its own way; an item whose top two scores tie within float rounding may flip."""


def test_gate_promotes_a_better_model_and_stages_a_worse_one(running_platform) -> None:
    urls, _ = running_platform
    operator, partner, tenant, dataset = digits_partner(
        urls, "e2e-gate", retrain_threshold=FIRST, hyperparameters=HYPERPARAMETERS
    )
    digits = shuffled(digit_images(), seed=11)
    first, second = _mislabeled(digits[:FIRST], MISLABELED), digits[FIRST : FIRST + SECOND]
    probe = [png for png, _ in digits[FIRST + SECOND : FIRST + SECOND + 8]]

    # v1: the first version faces only the test split's size and the floor.
    first_ids = push_labeled(partner, dataset, first)
    run1 = _finished_run(partner, dataset, exclude=set())
    v1 = eventually(lambda: only(versions(partner)), timeout=60, what="v1 registered")
    decision1 = v1["decision"]
    assert decision1["outcome"] == "production", decision1["reason"]
    assert [c["name"] for c in decision1["conditions"]] == ["min_test_items", "min_score"]
    assert all(c["passed"] for c in decision1["conditions"]), decision1["conditions"]
    assert decision1["evaluation_set"]["snapshot_id"] == run1["snapshot_id"] and decision1["production"] is None
    eventually(lambda: _serves(partner, probe, 1), timeout=120, interval=1, what="inference to serve v1")

    # What v1 answers, as inference serves it, for every item the second snapshot can hold: asked before the
    # second items are pushed, so these are production's answers whatever the gate later reads.
    served_first, served_second = _served_labels(partner, first, 1), _served_labels(partner, second, 1)

    # v2: more items, correctly labeled; the retrain policy fires again once they are all in.
    partner.ingestion.update_dataset(dataset, retrain_threshold=SECOND)
    eventually(lambda: partner.labeling.dataset(dataset)["retrain_threshold"] == SECOND, what="labeling to learn it")
    second_ids = push_labeled(partner, dataset, second)
    served_v1 = dict(zip(first_ids, served_first, strict=True)) | dict(zip(second_ids, served_second, strict=True))
    run2 = _finished_run(partner, dataset, exclude={run1["id"]})
    v2 = eventually(lambda: _version_of(partner, run2["id"]), timeout=60, what="v2 registered")
    decision2 = v2["decision"]
    assert v2["version"] == 2
    assert decision2["outcome"] == "production", decision2["reason"]
    assert [c["name"] for c in decision2["conditions"]] == CONDITIONS
    assert all(c["passed"] for c in decision2["conditions"]), decision2["conditions"]

    # Both versions were scored on one evaluation set: the second snapshot's test split, as labeling froze it.
    evaluation_set = decision2["evaluation_set"]
    snapshot2 = _snapshot(partner, dataset, run2["snapshot_id"])
    test2 = [row for row in _export(partner, run2["snapshot_id"]) if row["split"] == "test"]
    test1 = [row for row in _export(partner, run1["snapshot_id"]) if row["split"] == "test"]
    assert evaluation_set["snapshot_id"] == run2["snapshot_id"] and evaluation_set["split"] == "test"
    assert evaluation_set["items"] == len(test2) == snapshot2["split_counts"]["test"]
    assert evaluation_set["sha256"] == item_ids_sha256([row["item_id"] for row in test2])
    assert evaluation_set["sha256"] == snapshot2["split_sha256"]["test"]
    assert {row["item_id"] for row in test1} < {row["item_id"] for row in test2}, "an item keeps its split"

    # Production's score there is recomputed on those items, not v1's own record: its per-class supports are
    # this set's labels, while v1's stored test record counts the first snapshot's smaller set.
    production = decision2["production"]
    assert production["version"] == 1 and production["run_id"] == run1["id"]
    supports = {label: scores["support"] for label, scores in production["metrics"]["per_class"].items()}
    assert supports == {label: Counter(row["label"] for row in test2)[label] for label in DIGIT_LABELS}
    stored_v1 = partner.registry.version(MODEL, 1)["metrics"]["test"]
    assert stored_v1["items"] == len(test1) < evaluation_set["items"]
    # ... and it is what v1, as served, scores on them.
    served_accuracy = sum(served_v1[row["item_id"]] == row["label"] for row in test2) / len(test2)
    assert production["metrics"]["accuracy"] == pytest.approx(
        served_accuracy, abs=SERVED_TOLERANCE_ITEMS / len(test2) + 1e-9
    )
    candidate = decision2["candidate"]
    assert candidate["version"] == 2 and candidate["metrics"]["macro_f1"] > production["metrics"]["macro_f1"]
    difference = decision2["difference"]
    assert difference["metric"] == decision2["policy"]["primary_metric"] == "macro_f1"
    assert difference["value"] == pytest.approx(candidate["metrics"]["macro_f1"] - production["metrics"]["macro_f1"])
    assert 0 < difference["ci_low"] <= difference["value"] <= difference["ci_high"]
    eventually(lambda: _serves(partner, probe, 2), timeout=120, interval=1, what="inference to serve v2")

    # v3: crippled on purpose, retrained through the training API on v2's very snapshot.
    run3 = operator.training.create_run(
        tenant,
        dataset,
        run2["snapshot_id"],
        model_name=MODEL,
        hyperparameters=CRIPPLED,
        reason="e2e: a deliberately crippled candidate",
    )
    run3 = eventually(
        lambda: finished(partner.training.get_run(run3["id"])), timeout=600, interval=2, what="v3's training"
    )
    assert run3["status"] == "succeeded", run3.get("failure_reason")
    v3 = eventually(lambda: _version_of(partner, run3["id"]), timeout=60, what="v3 registered")
    decision3 = v3["decision"]
    failed = [c["name"] for c in decision3["conditions"] if not c["passed"]]
    assert decision3["outcome"] == "staging", decision3["reason"]
    assert "margin" in failed and "credible_improvement" in failed, decision3["conditions"]
    assert all(f"{name}:" in decision3["reason"] for name in failed), decision3["reason"]
    assert decision3["evaluation_set"] == evaluation_set, "the same snapshot, the same test items"
    # v2 scored as production now gives what it gave as the candidate: one artifact, run as it is served.
    assert decision3["production"]["version"] == 2
    for metric in ("accuracy", "macro_f1"):
        assert decision3["production"]["metrics"][metric] == pytest.approx(
            candidate["metrics"][metric], abs=1 / len(test2) + 1e-9
        )

    # Production keeps serving v2; v3 waits in staging for a person.
    model = partner.registry.get_model(MODEL)
    assert model["aliases"]["production"]["version"] == 2 and model["aliases"]["staging"]["version"] == 3
    for _ in range(6):
        assert _serves(partner, probe, 2), "inference must keep answering with production v2"
        time.sleep(0.5)
    staged = partner.registry.audit(MODEL)[0]
    assert staged["alias"] == "staging" and staged["to_version"] == 3 and "FAILED" in staged["reason"]


def _mislabeled(items: list[tuple[bytes, str]], share: float) -> list[tuple[bytes, str]]:
    """The items with `share` of them given another, random label."""
    rng = random.Random(5)
    wrong = set(rng.sample(range(len(items)), int(len(items) * share)))
    return [
        (png, rng.choice([name for name in DIGIT_LABELS if name != label]) if index in wrong else label)
        for index, (png, label) in enumerate(items)
    ]


def _finished_run(client: Flywheel, dataset: str, *, exclude: set[str]) -> dict:
    def new_run() -> dict | None:
        return only([run for run in client.training.list_runs(dataset_id=dataset) if run["id"] not in exclude])

    run = eventually(new_run, timeout=60, what="the retrain policy to start a run")
    assert run["reason"].startswith("retrain policy")
    run = eventually(
        lambda: finished(client.training.get_run(run["id"])), timeout=600, interval=2, what="training to finish"
    )
    assert run["status"] == "succeeded", run.get("failure_reason")
    return run


def _version_of(client: Flywheel, run_id: str) -> dict | None:
    return next((version for version in versions(client) if version["run_id"] == run_id), None)


def _serves(client: Flywheel, images: list[bytes], version: int) -> bool:
    answer = predict(client, images)
    return answer is not None and answer["model_version"] == version


def _served_labels(client: Flywheel, items: list[tuple[bytes, str]], version: int) -> list[str]:
    """The label inference answers for each item's image, in order; every answer must come from `version`."""
    labels = []
    for start in range(0, len(items), 32):
        answer = client.inference.predict(MODEL, images=[png for png, _ in items[start : start + 32]])
        assert answer["model_version"] == version
        labels += [prediction["label"] for prediction in answer["predictions"]]
    return labels


def _snapshot(client: Flywheel, dataset: str, snapshot_id: str) -> dict:
    return next(snapshot for snapshot in client.labeling.snapshots(dataset) if snapshot["id"] == snapshot_id)


def _export(client: Flywheel, snapshot_id: str) -> list[dict]:
    data = b"".join(client.labeling.export(snapshot_id)).decode()
    return [json.loads(line) for line in data.splitlines() if line]
