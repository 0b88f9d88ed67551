"""Erasure at ingestion: an item's or a data subject's erasure answers its record (202, `ers_…`), erases the
content at once, announces it to labeling and inference with the erasure's id, and keeps a report that the other
services' `erasure.step_completed` fill once per step; a tenant's retention period erases old items the same way."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from services.ingestion.models import Item
from shared.events.envelope import make_envelope
from shared.events.tables import event_tables
from tests.helpers import eventually
from tests.ingestion.conftest import make_tenant, png
from tests.ingestion.test_imports import upload, wait_finished
from tests.ingestion.test_push import b64, download, outbox_events

pytestmark = pytest.mark.timeout(180)


def push_ids(tenant, dataset_id: str, items: list[dict]) -> list[str]:
    response = tenant.push(dataset_id, items)
    assert response.status_code == 200, response.get_json()
    return [item["item_id"] for item in response.get_json()["items"]]


def report(tenant, erasure_id: str) -> dict:
    response = tenant.service.client.get(f"/v1/erasures/{erasure_id}", headers=tenant.headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_erasing_an_item_answers_its_erasure_and_announces_it_with_the_id(ingestion, tenant) -> None:
    dataset = tenant.text["id"]
    ids = push_ids(tenant, dataset, [{"text": "keep one"}, {"text": "erase me", "subject_id": "cust-7"}])
    response = tenant.service.client.delete(f"/v1/items/{ids[1]}", headers=tenant.headers)
    assert response.status_code == 202, response.get_json()
    record = response.get_json()
    assert record["id"].startswith("ers_") and record["kind"] == "item" and record["item_id"] == ids[1]
    assert record["services"]["ingestion"]["counts"] == {"items": 1, "objects": 1, "bytes": len(b"erase me")}
    assert record["services"]["ingestion"]["status"] == "completed"
    assert record["services"]["labeling"] == {
        "status": "running",
        "steps": 1,
        "steps_completed": 0,
        "counts": {},
        "completed_at": None,
    }
    assert record["status"] == "running", "labeling has not reported yet"
    assert report(tenant, record["id"]) == record
    assert tenant.service.client.get(f"/v1/items/{ids[1]}", headers=tenant.headers).status_code == 404
    assert download(tenant, ids[0]) == b"keep one"
    [event] = outbox_events(tenant.service, "item.deleted")
    assert event["payload"] == {
        "dataset_id": dataset,
        "item_ids": [ids[1]],
        "erasure_id": record["id"],
        "subject_id": None,
    }

    other = make_tenant(ingestion, "globex")
    assert other.service.client.get(f"/v1/erasures/{record['id']}", headers=other.headers).status_code == 404
    assert other.service.client.delete(f"/v1/items/{ids[0]}", headers=other.headers).status_code == 404
    assert tenant.service.client.get("/v1/erasures/ers_unknown", headers=tenant.headers).status_code == 404


def test_a_subject_erasure_takes_every_item_of_the_subject_and_nothing_of_another_tenant(ingestion, tenant) -> None:
    texts = push_ids(
        tenant,
        tenant.text["id"],
        [
            {"text": "mine one", "subject_id": "cust-1"},
            {"text": "someone else", "subject_id": "cust-2"},
            {"text": "mine two", "subject_id": "cust-1"},
            {"text": "nobody's"},
        ],
    )
    [photo] = push_ids(tenant, tenant.images["id"], [{"image": b64(png()), "subject_id": "cust-1"}])
    with tenant.service.runtime.db.session() as session:
        photo_key, photo_size = session.execute(select(Item.object_key, Item.length).where(Item.id == photo)).one()
    other = make_tenant(ingestion, "globex")
    [theirs] = push_ids(other, other.text["id"], [{"text": "mine one", "subject_id": "cust-1"}])

    response = tenant.service.client.delete("/v1/subjects/cust-1", headers=tenant.headers)
    assert response.status_code == 202, response.get_json()
    record = response.get_json()
    assert record["kind"] == "subject" and record["subject_id"] == "cust-1"
    # Two texts zeroed in their pack (one object rewritten) and the photo deleted.
    assert record["services"]["ingestion"]["counts"] == {"items": 3, "objects": 2, "bytes": 16 + photo_size}
    assert record["services"]["labeling"]["steps"] == 2, "one item.deleted per dataset"
    assert record["services"]["inference"]["steps"] == 1, "inference erases the subject's predictions"

    for gone in (texts[0], texts[2], photo):
        assert tenant.service.client.get(f"/v1/items/{gone}", headers=tenant.headers).status_code == 404
    assert not tenant.service.runtime.storage.exists("raw", photo_key)
    assert download(tenant, texts[1]) == b"someone else"
    assert download(tenant, texts[3]) == b"nobody's"
    assert download(other, theirs) == b"mine one", "another tenant's subject of the same id is untouched"

    deleted = outbox_events(tenant.service, "item.deleted")
    assert sorted(tuple(event["payload"]["item_ids"]) for event in deleted) == sorted(
        [tuple(sorted([texts[0], texts[2]])), (photo,)]
    )
    assert {(e["payload"]["erasure_id"], e["payload"]["subject_id"], e["tenant"]) for e in deleted} == {
        (record["id"], "cust-1", tenant.partner_id)
    }
    [requested] = outbox_events(tenant.service, "erasure.requested")
    assert requested["payload"] == {"erasure_id": record["id"], "subject_id": "cust-1"}
    assert other.service.client.get(f"/v1/erasures/{record['id']}", headers=other.headers).status_code == 404

    listed = tenant.service.client.get("/v1/erasures?kind=subject", headers=tenant.headers).get_json()
    assert [e["id"] for e in listed["erasures"]] == [record["id"]]
    assert tenant.service.client.delete("/v1/subjects/" + "x" * 201, headers=tenant.headers).status_code == 422


def step_event(tenant, payload: dict) -> dict:
    return make_envelope("erasure.step_completed", payload, tenant=tenant.partner_id).to_dict()


def handled(runtime, event_id: str) -> bool:
    inbox = event_tables(runtime.db.metadata).inbox
    with runtime.db.session() as session:
        return session.execute(select(inbox.c.id).where(inbox.c.event_id == event_id)).first() is not None


def test_each_step_counts_once_in_the_report_however_often_it_arrives(tenant, worker) -> None:
    [item] = push_ids(tenant, tenant.text["id"], [{"text": "erase me", "subject_id": "cust-1"}])
    record = tenant.service.client.delete("/v1/subjects/cust-1", headers=tenant.headers).get_json()
    [deleted] = outbox_events(tenant.service, "item.deleted")
    [requested] = outbox_events(tenant.service, "erasure.requested")
    labeling = {
        "erasure_id": record["id"],
        "service": "labeling",
        "step": deleted["event_id"],
        "counts": {"tasks_withdrawn": 1, "annotations_deleted": 0, "snapshots_marked": 0, "objects": 0},
    }
    inference = {
        "erasure_id": record["id"],
        "service": "inference",
        "step": requested["event_id"],
        "counts": {"predictions_deleted": 2, "feedback_records": 1},
        "expects": [{"service": "labeling", "step": "evt-predictions"}],
    }
    predictions = {**labeling, "step": "evt-predictions", "counts": {"tasks_withdrawn": 1, "objects": 1}}
    with worker("ingestion") as runtime:

        def send(message: dict) -> dict:
            runtime.celery.send_task("ingestion.erasure.step_completed", args=[message], queue="ingestion")
            return message

        first = send(step_event(tenant, labeling))
        send(first)  # the same event again (a redelivery)
        replayed = send(step_event(tenant, labeling))  # the same report in a new event (a producer's retry)
        inference_report = send(step_event(tenant, inference))
        for message in (replayed, inference_report):
            eventually(lambda m=message: handled(runtime, m["event_id"]), what="the reports handled")
        partial = report(tenant, record["id"])
        assert partial["services"]["labeling"]["counts"] == {**labeling["counts"]}
        assert partial["services"]["labeling"]["steps"] == 2, "inference's step set off a labeling step"
        assert partial["status"] == "running"
        send(step_event(tenant, predictions))
        done = eventually(
            lambda: (r := report(tenant, record["id"]))["status"] == "completed" and r, what="the erasure completed"
        )
    assert done["services"]["labeling"]["counts"] == {
        "tasks_withdrawn": 2,
        "annotations_deleted": 0,
        "snapshots_marked": 0,
        "objects": 1,
    }
    assert done["services"]["inference"]["counts"] == {"predictions_deleted": 2, "feedback_records": 1}
    assert done["services"]["ingestion"]["counts"]["items"] == 1 and done["completed_at"] is not None
    assert tenant.service.client.get(f"/v1/items/{item}", headers=tenant.headers).status_code == 404


def test_the_retention_sweep_erases_old_items_only_and_reports_it(ingestion, tenant, worker) -> None:
    client = tenant.service.client
    assert client.get("/v1/retention", headers=tenant.headers).get_json() == {"item_retention_days": None}
    refused = client.put("/v1/retention", json={"item_retention_days": 0}, headers=tenant.headers)
    assert refused.status_code == 422 and "item_retention_days" in str(refused.get_json()["error"]["details"])
    set_to = client.put("/v1/retention", json={"item_retention_days": 30}, headers=tenant.headers)
    assert set_to.status_code == 200 and set_to.get_json() == {"item_retention_days": 30}
    old, fresh = push_ids(tenant, tenant.text["id"], [{"text": "pushed long ago"}, {"text": "pushed today"}])
    other = make_tenant(ingestion, "globex")  # keeps its items: no retention set
    [kept] = push_ids(other, other.text["id"], [{"text": "old but kept"}])
    long_ago = datetime.now(UTC) - timedelta(days=31)
    with tenant.service.runtime.db.session() as session:
        session.execute(update(Item).where(Item.id.in_([old, kept])).values(created_at=long_ago))

    with worker("ingestion"):  # the worker's sweep runs when it starts
        eventually(
            lambda: client.get(f"/v1/items/{old}", headers=tenant.headers).status_code == 404,
            what="the old item swept",
        )
    assert download(tenant, fresh) == b"pushed today"
    assert download(other, kept) == b"old but kept"
    [swept] = client.get("/v1/erasures?kind=retention", headers=tenant.headers).get_json()["erasures"]
    assert swept["services"]["ingestion"]["counts"] == {"items": 1, "objects": 1, "bytes": len(b"pushed long ago")}
    assert swept["cutoff"] is not None and swept["services"]["labeling"]["steps"] == 1
    [event] = outbox_events(tenant.service, "item.deleted")
    assert event["payload"]["item_ids"] == [old] and event["payload"]["erasure_id"] == swept["id"]
    assert other.service.client.get("/v1/erasures", headers=other.headers).get_json() == {"erasures": []}


def test_imported_and_multipart_items_carry_their_subject(tenant, worker) -> None:
    lines = [
        json.dumps({"text": "imported for the subject", "subject_id": "cust-9"}),
        json.dumps({"text": "imported for nobody"}),
    ]
    started = upload(tenant, tenant.text["id"], ("\n".join(lines) + "\n").encode(), "application/x-ndjson")
    assert started.status_code == 202, started.get_json()
    uploaded = tenant.service.client.post(
        f"/v1/datasets/{tenant.images['id']}/items",
        data={"subject_id": "cust-9", "files": (io.BytesIO(png()), "photo.png")},
        headers=tenant.headers,
        content_type="multipart/form-data",
    )
    assert uploaded.status_code == 200, uploaded.get_json()
    [photo] = [item["item_id"] for item in uploaded.get_json()["items"]]
    with worker("ingestion"):
        assert wait_finished(tenant, started.get_json()["id"])["status"] == "succeeded"
    listed = tenant.service.client.get(f"/v1/datasets/{tenant.text['id']}/items", headers=tenant.headers).get_json()
    subjects = {item["subject_id"]: item["id"] for item in listed["items"]}
    assert set(subjects) == {"cust-9", None}
    assert tenant.service.client.get(f"/v1/items/{photo}", headers=tenant.headers).get_json()["subject_id"] == "cust-9"

    record = tenant.service.client.delete("/v1/subjects/cust-9", headers=tenant.headers).get_json()
    assert record["services"]["ingestion"]["counts"]["items"] == 2
    assert tenant.service.client.get(f"/v1/items/{subjects['cust-9']}", headers=tenant.headers).status_code == 404
    assert tenant.service.client.get(f"/v1/items/{photo}", headers=tenant.headers).status_code == 404
    assert tenant.service.client.get(f"/v1/items/{subjects[None]}", headers=tenant.headers).status_code == 200
