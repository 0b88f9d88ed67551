"""Events travel through real Redis to running Celery workers: delivered, deduplicated, traced."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from services.labeling.models import Task
from shared.events.tables import event_tables
from tests.helpers import bearer, create_dataset, create_partner, eventually

pytestmark = pytest.mark.timeout(120)


def push(ingestion, key: str, dataset_id: str, texts: list[str], trace_id: str | None = None):
    headers = bearer(key) | ({"X-Request-ID": trace_id} if trace_id else {})
    response = ingestion.client.post(
        f"/v1/datasets/{dataset_id}/items", json={"items": [{"text": t} for t in texts]}, headers=headers
    )
    assert response.status_code == 200, response.get_json()
    return response


def task_count(runtime, dataset_id: str) -> int:
    with runtime.db.session() as session:
        return session.scalar(select(func.count()).select_from(Task).where(Task.dataset_id == dataset_id))


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_an_ingested_item_becomes_a_labeling_task_with_its_trace_id(
    platform, worker, logs, database, postgres_database
) -> None:
    urls = {}
    if database == "postgresql":
        urls = {"ingestion": postgres_database(), "labeling": postgres_database()}
    ingestion = platform("ingestion", database_url=urls.get("ingestion", ""))
    partner = create_partner(ingestion.client)
    dataset = create_dataset(ingestion.client, partner["api_key"])

    with worker("labeling", database_url=urls.get("labeling", "")) as labeling:
        response = push(ingestion, partner["api_key"], dataset["id"], ["great film", "dull film"], "trace-abc-123")
        assert response.headers["X-Request-ID"] == "trace-abc-123"
        eventually(lambda: task_count(labeling, dataset["id"]) == 2, what="two labeling tasks")

    handled = logs.find(event="event_handled", consumer="labeling.item.ingested")
    assert handled, "the labeling consumer logged nothing"
    assert handled[0]["trace_id"] == "trace-abc-123"
    assert handled[0]["service"] == "labeling"
    assert handled[0]["tenant"] == partner["partner"]["id"]
    created = logs.find(event="tasks_created", trace_id="trace-abc-123")
    assert created and created[0]["created"] == 2


def test_the_same_event_delivered_twice_is_handled_once(platform, worker, logs) -> None:
    ingestion = platform("ingestion")
    partner = create_partner(ingestion.client)
    dataset = create_dataset(ingestion.client, partner["api_key"])
    push(ingestion, partner["api_key"], dataset["id"], ["one", "two", "three"])
    outbox = event_tables(ingestion.runtime.db.metadata).outbox
    with ingestion.runtime.db.session() as session:
        message = session.scalar(select(outbox.c.envelope).where(outbox.c.event_type == "item.ingested"))

    with worker("labeling") as labeling:
        eventually(lambda: task_count(labeling, dataset["id"]) == 3, what="three tasks")
        ingestion.runtime.bus.send(message, "labeling")  # at-least-once delivery: the same event again
        ingestion.runtime.bus.send(message, "labeling")
        eventually(
            lambda: len(logs.find(event="event_duplicate_skipped", event_id=message["event_id"])) == 2,
            what="both redeliveries to be recognised",
        )
        assert task_count(labeling, dataset["id"]) == 3
    assert len(logs.find(event="event_handled", event_id=message["event_id"])) == 1


def test_a_push_commits_rows_and_event_together(platform) -> None:
    """No event names an item that was not stored: the outbox row exists exactly when the items do."""
    ingestion = platform("ingestion")
    partner = create_partner(ingestion.client)
    dataset = create_dataset(ingestion.client, partner["api_key"])
    body = push(ingestion, partner["api_key"], dataset["id"], ["alpha", "beta", "alpha"]).get_json()
    assert [item["status"] for item in body["items"]] == ["accepted", "accepted", "duplicate"]
    outbox = event_tables(ingestion.runtime.db.metadata).outbox
    with ingestion.runtime.db.session() as session:
        rows = session.execute(select(outbox.c.envelope, outbox.c.sent_at)).all()
    ingested = [envelope for envelope, _ in rows if envelope["type"] == "item.ingested"]
    assert len(ingested) == 1
    assert {i["item_id"] for i in ingested[0]["payload"]["items"]} == {item["item_id"] for item in body["items"][:2]}
    assert all(sent_at is not None for _, sent_at in rows), "the fast path should have sent every event"


def test_a_worker_keeps_consuming_after_another_worker_in_its_process_stops(platform, worker) -> None:
    """The suite runs several services' workers in one process (tests/celery_workers.py): a worker started beside
    another neither takes its loop nor its app, and one that stops stops alone."""
    ingestion = platform("ingestion")
    partner = create_partner(ingestion.client)
    dataset = create_dataset(ingestion.client, partner["api_key"])

    with worker("labeling") as labeling:
        with worker("training"):
            push(ingestion, partner["api_key"], dataset["id"], ["before"])
            eventually(lambda: task_count(labeling, dataset["id"]) == 1, what="the first task")
        push(ingestion, partner["api_key"], dataset["id"], ["after"])  # the training worker has stopped
        eventually(lambda: task_count(labeling, dataset["id"]) == 2, what="the task pushed after the stop")
