"""Labeling's part of an erasure, through the real workers: a data subject's items leave the queue with their
annotations, the snapshot that held them is marked, the next one leaves them out, and the erasure's report (at
ingestion) lists labeling's counts once even when `item.deleted` is delivered again."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from services.ingestion.models import ErasureStep
from services.labeling.models import Annotation, Task
from shared.events.envelope import make_envelope
from shared.events.tables import event_tables
from tests.helpers import create_partner, eventually
from tests.ingestion.test_push import outbox_events
from tests.labeling.conftest import Harness

pytestmark = pytest.mark.timeout(180)


def handled(runtime, event_id: str) -> bool:
    inbox = event_tables(runtime.db.metadata).inbox
    with runtime.db.session() as session:
        return session.execute(select(inbox.c.id).where(inbox.c.event_id == event_id)).first() is not None


def manifest_ids(harness, snapshot: dict) -> list[str]:
    data = harness.worker.storage.get_bytes("datasets", snapshot["manifest_key"]).decode()
    return [json.loads(line)["item_id"] for line in data.splitlines()]


def step_reports(labeling) -> list[dict]:
    """The `erasure.step_completed` events labeling has published (its outbox)."""
    outbox = event_tables(labeling.runtime.db.metadata).outbox
    with labeling.runtime.db.session() as session:
        query = select(outbox.c.envelope).where(outbox.c.event_type == "erasure.step_completed")
        return list(session.scalars(query))


def test_a_subject_erasure_withdraws_marks_the_snapshot_and_the_next_one_leaves_it_out(platform, worker) -> None:
    # Celery runs one app's workers per process: labeling's worker does its part, then ingestion's takes the reports.
    ingestion, labeling = platform("ingestion"), platform("labeling")
    issued = create_partner(ingestion.client, "acme")
    harness = Harness(ingestion, labeling, labeling.runtime, issued["api_key"], issued["partner"]["id"])
    client = labeling.client
    with worker("labeling"):
        dataset = harness.dataset(overlap=1)
        pushed = ingestion.client.post(
            f"/v1/datasets/{dataset}/items",
            json={
                "items": [
                    {"text": "erase me one", "label": "pos", "subject_id": "cust-1"},
                    {"text": "erase me two", "label": "neg", "subject_id": "cust-1"},
                    {"text": "unlabeled, erased", "subject_id": "cust-1"},
                    {"text": "keep me", "label": "pos", "subject_id": "cust-2"},
                ]
            },
            headers=harness.partner,
        )
        assert pushed.status_code == 200, pushed.get_json()
        erased_ids = [item["item_id"] for item in pushed.get_json()["items"][:3]]
        keep_id = pushed.get_json()["items"][3]["item_id"]
        harness.wait_tasks(dataset, 4)
        first = client.post(f"/v1/datasets/{dataset}/snapshots", headers=harness.partner).get_json()
        assert first["item_count"] == 3 and first["erased_items"] == 0

        response = ingestion.client.delete("/v1/subjects/cust-1", headers=harness.partner)
        assert response.status_code == 202, response.get_json()
        erasure_id = response.get_json()["id"]
        [report] = eventually(lambda: step_reports(labeling), what="labeling's report of its part")
        counts = {"tasks_withdrawn": 3, "annotations_deleted": 2, "snapshots_marked": 1, "objects": 0}
        assert report["payload"]["counts"] == counts and report["payload"]["erasure_id"] == erasure_id
        marked = client.get(f"/v1/snapshots/{first['id']}", headers=harness.partner).get_json()
        assert marked["erased_items"] == 2 and marked["item_count"] == 3, "the snapshot is marked, never rewritten"

        # `item.deleted` again: the same event (a redelivery), then the same payload in a new event.
        [deleted] = outbox_events(ingestion, "item.deleted")
        again = make_envelope("item.deleted", deleted["payload"], tenant=harness.tenant).to_dict()
        for message in (deleted, again):
            labeling.runtime.celery.send_task("labeling.item.deleted", args=[message], queue="labeling")
        eventually(lambda: len(step_reports(labeling)) == 2, what="the repeated deletion handled")
        assert handled(labeling.runtime, deleted["event_id"]) and handled(labeling.runtime, again["event_id"])
        assert client.get(f"/v1/snapshots/{first['id']}", headers=harness.partner).get_json()["erased_items"] == 2
        assert harness.next(harness.annotator("ann", dataset), dataset) is None, "nothing of the subject is handed out"

    with worker("ingestion") as ingestion_worker:

        def recorded(step: str) -> bool:
            with ingestion_worker.db.session() as session:
                return session.scalar(select(ErasureStep.id).where(ErasureStep.step == step)) is not None

        eventually(lambda: recorded(deleted["event_id"]) and recorded(again["event_id"]), what="the reports kept")
    erasure = ingestion.client.get(f"/v1/erasures/{erasure_id}", headers=harness.partner).get_json()
    assert erasure["services"]["labeling"]["status"] == "completed"
    assert erasure["services"]["labeling"]["counts"] == counts, "labeling's counts are listed once"
    assert erasure["services"]["labeling"]["steps"] == 1
    assert erasure["services"]["inference"]["status"] == "running", "no inference replica ran in this test"

    with labeling.runtime.db.session() as session:
        tasks = session.scalars(select(Task).where(Task.item_id.in_(erased_ids))).all()
        assert {task.status for task in tasks} == {"withdrawn"}
        assert {task.consensus_label for task in tasks} == {None}, "what people said of the item goes"
        task_ids = [task.id for task in tasks]
        assert session.scalars(select(Annotation).where(Annotation.task_id.in_(task_ids))).all() == []
    second = client.post(f"/v1/datasets/{dataset}/snapshots", headers=harness.partner).get_json()
    assert second["item_count"] == 1 and manifest_ids(harness, second) == [keep_id]
    assert second["erased_items"] == 0
