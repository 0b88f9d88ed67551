"""Annotations are billable work: each labelled annotation is metered once for its dataset's tenant, however
often it is edited, and a skip is not billed."""

from __future__ import annotations

import pytest

from tests.helpers import eventually

pytestmark = pytest.mark.timeout(120)


def annotation_meter(harness) -> float:
    report = harness.ingestion.client.get("/v1/usage", headers=harness.partner).get_json()["report"]
    return sum(row["value"] for row in report["meters"] if row["meter"] == "annotations")


def test_each_labelled_annotation_is_metered_once(harness, worker) -> None:
    dataset = harness.dataset(overlap=2)
    harness.push(dataset, ["edit me", "skip me"])
    harness.wait_tasks(dataset, 2)
    alice, bob = harness.annotator("alice", dataset), harness.annotator("bob", dataset)
    first = harness.next(alice, dataset)
    assert harness.label(alice, first["id"], "pos").status_code == 201
    assert harness.label(alice, first["id"], "neg").status_code == 200  # an edit: the same annotation
    second = harness.next(alice, dataset)
    skipped = harness.labeling.client.post(f"/v1/tasks/{second['id']}/skip", headers=alice)
    assert skipped.status_code == 200, skipped.get_json()
    task = harness.next(bob, dataset)
    assert harness.label(bob, task["id"], "neg").status_code == 201

    with worker("ingestion"):
        eventually(lambda: annotation_meter(harness) == 2, timeout=30, what="two annotations metered")
    report = harness.ingestion.client.get("/v1/usage", headers=harness.partner).get_json()["report"]
    [row] = [row for row in report["meters"] if row["meter"] == "annotations"]
    assert row["tenant"] == harness.tenant and row["records"] == 2
