"""Pushes succeed while Redis is down; every event arrives once it is back, exactly once downstream."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from services.labeling.models import Task
from tests.helpers import eventually
from tests.ingestion.conftest import make_tenant

pytestmark = pytest.mark.timeout(120)


def test_pushes_during_a_redis_outage_are_delivered_when_it_returns(platform, worker, redis_process) -> None:
    ingestion = platform("ingestion", redis_url=redis_process.url)
    tenant = make_tenant(ingestion, "acme")
    dataset = tenant.text["id"]

    redis_process.stop()
    accepted = 0
    for push in range(4):
        items = [{"text": f"push {push} item {i}"} for i in range(25)] + [{"text": "shared duplicate"}]
        response = tenant.push(dataset, items)
        assert response.status_code == 200, response.get_json()
        accepted += response.get_json()["accepted"]
    assert accepted == 4 * 25 + 1
    assert ingestion.runtime.bus.pending_count() >= 4, "the events wait in the outbox"
    assert ingestion.client.get("/readyz").status_code == 503

    redis_process.start()
    eventually(lambda: ingestion.runtime.bus.pending_count() == 0, timeout=30, what="the relay to drain the outbox")
    with worker("labeling", redis_url=redis_process.url) as labeling:

        def tasks() -> int:
            with labeling.db.session() as session:
                return session.scalar(select(func.count()).select_from(Task).where(Task.dataset_id == dataset))

        eventually(lambda: tasks() == accepted, timeout=30, what=f"{accepted} labeling tasks")
        with labeling.db.session() as session:
            distinct = session.scalar(select(func.count(func.distinct(Task.item_id))).where(Task.dataset_id == dataset))
    assert distinct == accepted
    print(f"\nredis outage: sent={4 * 26} accepted={accepted} delivered={distinct} lost={accepted - distinct}")
