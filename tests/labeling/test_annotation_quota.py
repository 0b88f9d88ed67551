"""A monthly `annotations` quota: the label that would pass it answers 429 naming the meter and is recorded
nowhere (no annotation, no usage); an edit is never refused; another tenant labels on."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from services.ingestion import metering
from services.labeling.models import Annotation
from tests.helpers import INTERNAL, create_partner, eventually
from tests.labeling.conftest import Harness
from tests.labeling.test_annotation_usage import annotation_meter

pytestmark = pytest.mark.timeout(120)


def annotations_of(harness, task_id: int) -> int:
    with harness.worker.db.session() as session:
        return session.scalar(select(func.count(Annotation.id)).where(Annotation.task_id == task_id))


def test_the_annotation_that_would_pass_the_quota_is_refused_and_recorded_nowhere(harness, worker) -> None:
    patched = harness.ingestion.client.patch(
        f"/v1/partners/{harness.tenant}", json={"monthly_quotas": {"annotations": 3}}, headers=INTERNAL
    )
    assert patched.status_code == 200, patched.get_json()
    with harness.ingestion.runtime.db.session() as session:  # one annotation already billed this month
        earlier = {
            "id": f"annotation.earlier-{uuid.uuid4().hex}",
            "meter": "annotations",
            "subject": harness.tenant,
            "time": datetime.now(UTC).isoformat(),
            "value": 1,
            "dimensions": {"dataset_id": "ds_earlier", "source": "human"},
        }
        metering.record(session, [earlier], "labeling")
    dataset = harness.dataset(overlap=2)
    harness.push(dataset, ["one", "two", "three"])
    harness.wait_tasks(dataset, 3)
    alice = harness.annotator("alice", dataset)
    first = harness.next(alice, dataset)
    assert harness.label(alice, first["id"], "pos").status_code == 201
    second = harness.next(alice, dataset)
    assert harness.label(alice, second["id"], "pos").status_code == 201  # 1 + 2 = 3: the quota, exactly
    assert harness.label(alice, second["id"], "neg").status_code == 200  # an edit bills nothing: never refused

    third = harness.next(alice, dataset)
    refused = harness.label(alice, third["id"], "neg")
    assert refused.status_code == 429, refused.get_json()
    error = refused.get_json()["error"]
    assert error["code"] == "quota_exhausted" and error["details"]["meter"] == "annotations"
    assert "annotations" in error["message"] and int(refused.headers["Retry-After"]) > 0
    assert (error["details"]["limit"], error["details"]["used"], error["details"]["requested"]) == (3, 3, 1)
    assert annotations_of(harness, third["id"]) == 0
    skipped = harness.labeling.client.post(f"/v1/tasks/{third['id']}/skip", headers=alice)
    assert skipped.status_code == 200, skipped.get_json()  # a skip is not billed: it passes

    issued = create_partner(harness.ingestion.client, "globex")
    globex = Harness(harness.ingestion, harness.labeling, harness.worker, issued["api_key"], issued["partner"]["id"])
    other = globex.dataset()
    globex.push(other, ["globex has no quota"])
    globex.wait_tasks(other, 1)
    bob = globex.annotator("bob", other)
    assert globex.label(bob, globex.next(bob, other)["id"], "pos").status_code == 201

    with worker("ingestion"):  # the meter store: the earlier one and alice's two, nothing of the refused label
        eventually(lambda: annotation_meter(harness) == 3, timeout=30, what="alice's annotations metered")
        eventually(lambda: annotation_meter(globex) == 1, timeout=30, what="globex's annotation metered")
    assert annotation_meter(harness) == 3


def test_the_annotation_route_documents_its_429(harness) -> None:
    document = harness.labeling.client.get("/openapi.json").get_json()
    answer = document["paths"]["/v1/tasks/{task_id}/annotations"]["post"]["responses"]["429"]
    assert "Retry-After" in answer["headers"] and "quota_exhausted" in answer["description"]
