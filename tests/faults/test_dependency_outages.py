"""Redis, object storage and the database fail under a live service: nothing accepted is lost, nothing is
half-written, clients get clear 503s, and readiness goes red and back to green."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select

from services.ingestion.models import Item
from services.labeling.models import Task
from tests.helpers import eventually, figures
from tests.ingestion.conftest import make_tenant

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

OUTAGE_SECONDS = 20


def count_items(service, dataset_id: str) -> int:
    with service.runtime.db.session() as session:
        return session.scalar(select(func.count()).select_from(Item).where(Item.dataset_id == dataset_id))


def test_redis_down_for_20_seconds_during_a_stream_of_pushes(platform, worker, redis_process) -> None:
    ingestion = platform("ingestion", redis_url=redis_process.url)
    tenant = make_tenant(ingestion, "acme")
    dataset = tenant.text["id"]
    sent = accepted = errors = 0
    stop = threading.Event()

    def stream() -> None:
        nonlocal sent, accepted, errors
        number = 0
        while not stop.is_set():
            items = [{"text": f"stream {number} item {i}"} for i in range(5)]
            number += 1
            response = tenant.push(dataset, items)
            sent += len(items)
            if response.status_code == 200:
                accepted += response.get_json()["accepted"]
            else:
                errors += 1
            time.sleep(0.1)

    pusher = threading.Thread(target=stream)
    pusher.start()
    time.sleep(2)
    redis_process.stop()
    during_outage = sent
    time.sleep(OUTAGE_SECONDS)
    redis_process.start()
    time.sleep(2)
    stop.set()
    pusher.join(30)
    assert sent - during_outage > 50, "pushes kept flowing while Redis was down"
    eventually(lambda: ingestion.runtime.bus.pending_count() == 0, timeout=30, what="the outbox to drain")
    with worker("labeling", redis_url=redis_process.url) as labeling:

        def delivered() -> tuple[int, int]:
            with labeling.db.session() as session:
                rows = session.scalar(select(func.count()).select_from(Task).where(Task.dataset_id == dataset))
                distinct = session.scalar(
                    select(func.count(func.distinct(Task.item_id))).where(Task.dataset_id == dataset)
                )
            return rows, distinct

        eventually(lambda: delivered()[0] >= accepted, timeout=60, what=f"{accepted} tasks downstream")
        rows, distinct = delivered()
    figures(
        "redis_outage_20s",
        sent=sent,
        accepted=accepted,
        lost=accepted - distinct,
        duplicated=rows - distinct,
        errors=errors,
    )
    assert errors == 0 and sent == accepted
    assert rows == distinct == accepted == count_items(ingestion, dataset)


def test_object_storage_unreachable(platform, proxy, s3_server) -> None:
    host, port = s3_server.endpoint.split(":")
    s3 = proxy(host, int(port))
    ingestion = platform("ingestion", s3_endpoint=s3.address)
    tenant = make_tenant(ingestion, "acme")
    dataset = tenant.text["id"]
    assert tenant.push(dataset, [{"text": "before"}]).status_code == 200

    s3.cut()
    sent = errors = 0
    for number in range(5):
        response = tenant.push(dataset, [{"text": f"during {number}"}, {"text": f"during {number} b"}])
        sent += 2
        assert response.status_code == 503, response.get_json()
        assert response.get_json()["error"]["code"] == "storage_unavailable"
        assert response.headers["Retry-After"]
        errors += 1
    ready = ingestion.client.get("/readyz")
    assert ready.status_code == 503 and "storage" in ready.get_json()["error"]["message"]
    assert count_items(ingestion, dataset) == 1, "no row without its object"
    assert ingestion.runtime.bus.pending_count() == 0, "no event names an item that was not stored"

    s3.restore()
    eventually(lambda: ingestion.client.get("/readyz").status_code == 200, timeout=20, what="readiness green again")
    after = tenant.push(dataset, [{"text": "after"}])
    assert after.status_code == 200
    figures("storage_unreachable", sent=sent, accepted=0, lost=0, duplicated=0, errors=errors)
    assert count_items(ingestion, dataset) == 2


def test_database_unreachable(platform, proxy, postgres_database) -> None:
    url = postgres_database()
    db_proxy = proxy("127.0.0.1", 5432)
    ingestion = platform("ingestion", database_url=url.replace("127.0.0.1:5432", db_proxy.address))
    tenant = make_tenant(ingestion, "acme")
    dataset = tenant.text["id"]
    assert tenant.push(dataset, [{"text": "before"}]).status_code == 200
    objects_before = len(list(ingestion.runtime.storage.list("raw", f"{tenant.partner_id}/")))

    db_proxy.cut()
    errors = 0
    for number in range(3):
        response = tenant.push(dataset, [{"text": f"during {number}"}])
        assert response.status_code == 503, response.get_json()
        assert response.get_json()["error"]["code"] in {"database_unavailable", "unavailable"}
        errors += 1
    ready = ingestion.client.get("/readyz")
    assert ready.status_code == 503 and "database" in ready.get_json()["error"]["message"]

    db_proxy.restore()
    eventually(lambda: ingestion.client.get("/readyz").status_code == 200, timeout=20, what="readiness green again")
    assert count_items(ingestion, dataset) == 1, "no partial writes"
    objects_after = len(list(ingestion.runtime.storage.list("raw", f"{tenant.partner_id}/")))
    assert objects_after == objects_before, "no orphaned objects from refused pushes"
    assert tenant.push(dataset, [{"text": "after"}]).status_code == 200
    figures("database_unreachable", sent=3, accepted=0, lost=0, duplicated=0, errors=errors)
