"""A handler that keeps failing is retried with backoff, then dead-lettered; a replay after the fix runs once."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Column, Integer, String, Table, func, select

from shared.db import declarative_base
from shared.events.celery_app import service_queues
from shared.events.consumer import EventContext, EventHandlers
from shared.runtime import ServiceSpec, create_http_app, create_worker
from tests.celery_workers import in_process_worker
from tests.helpers import INTERNAL, create_dataset, create_partner, eventually, figures

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]


class FlakyLabeling:
    """A labeling-shaped consumer of dataset.changed whose handler fails until it is 'fixed'."""

    def __init__(self) -> None:
        self.Base = declarative_base()
        self.configured = Table(
            "configured",
            self.Base.metadata,
            Column("id", Integer, primary_key=True),
            Column("dataset_id", String(40), nullable=False),
        )
        self.broken = True
        self.attempts = 0
        self.lock = threading.Lock()
        handlers = EventHandlers("labeling")

        @handlers.on("dataset.changed")
        def on_dataset_changed(ctx: EventContext) -> None:
            with self.lock:
                self.attempts += 1
            ctx.session.execute(self.configured.insert().values(dataset_id=ctx.payload["dataset"]["dataset_id"]))
            if self.broken:
                raise RuntimeError("labeling cannot reach its annotation store")

        self.spec = ServiceSpec(name="labeling", title="flaky", metadata=self.Base.metadata, handlers=handlers)

    def rows(self, runtime) -> int:
        with runtime.db.session() as session:
            return session.scalar(select(func.count()).select_from(self.configured))


def test_poison_event_is_retried_dead_lettered_and_replayed_once(platform, settings, logs) -> None:
    flaky = FlakyLabeling()
    admin = create_http_app(flaky.spec, settings).test_client()
    celery = create_worker(flaky.spec, settings)
    runtime = celery.flywheel_runtime
    ingestion = platform("ingestion")
    partner = create_partner(ingestion.client)

    with in_process_worker(celery, concurrency=2, queues=service_queues("labeling")):
        dataset = create_dataset(ingestion.client, partner["api_key"])
        listed = eventually(
            lambda: admin.get("/v1/admin/dead-letters", headers=INTERNAL).get_json()["dead_letters"],
            what="a dead letter",
        )
        assert flaky.attempts == settings.event_max_retries + 1
        assert flaky.rows(runtime) == 0, "a failed attempt must leave nothing half-written"
        [record] = listed
        assert record["consumer"] == "labeling.dataset.changed"
        assert record["attempts"] == settings.event_max_retries + 1
        assert "annotation store" in record["error"]
        assert record["message"]["payload"]["dataset"]["dataset_id"] == dataset["id"]
        retries = logs.find(event="event_retry_scheduled", consumer="labeling.dataset.changed")
        assert [line["attempt"] for line in retries] == [1, 2]
        assert retries[1]["delay_s"] >= retries[0]["delay_s"] * 0.5  # backoff grows (with jitter)

        flaky.broken = False
        replay = admin.post(f"/v1/admin/dead-letters/{record['id']}/replay", headers=INTERNAL)
        assert replay.status_code == 202, replay.get_json()
        eventually(lambda: flaky.rows(runtime) == 1, what="the replayed event to be handled")

        # A second replay of the same record is recognised as already handled.
        admin.post(f"/v1/admin/dead-letters/{record['id']}/replay", headers=INTERNAL)
        eventually(lambda: logs.find(event="event_duplicate_skipped", consumer="labeling.dataset.changed"))
        assert flaky.rows(runtime) == 1

    assert admin.get("/v1/admin/dead-letters", headers=INTERNAL).get_json()["dead_letters"] == []
    everything = admin.get("/v1/admin/dead-letters?include_replayed=true", headers=INTERNAL).get_json()
    assert everything["dead_letters"][0]["replay_count"] == 2
    figures(
        "poison_event",
        sent=1,
        accepted=flaky.rows(runtime),
        lost=0,
        duplicated=flaky.rows(runtime) - 1,
        errors=settings.event_max_retries + 1,
    )


def test_an_invalid_event_is_dead_lettered_without_retries(platform, worker) -> None:
    labeling = platform("labeling")
    with worker("labeling") as runtime:
        runtime.celery.send_task(
            "labeling.item.ingested", args=[{"type": "item.ingested", "payload": {}}], queue="labeling"
        )
        [record] = eventually(
            lambda: labeling.client.get("/v1/admin/dead-letters", headers=INTERNAL).get_json()["dead_letters"],
            what="the invalid event's dead letter",
        )
    assert record["attempts"] == 1
    assert "invalid event envelope" in record["error"]


def test_dead_letters_need_the_internal_token(platform) -> None:
    labeling = platform("labeling")
    assert labeling.client.get("/v1/admin/dead-letters").status_code == 401
    wrong = labeling.client.get("/v1/admin/dead-letters", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.get_json()["error"]["code"] == "unauthorized"
    missing = labeling.client.post("/v1/admin/dead-letters/999/replay", headers=INTERNAL)
    assert missing.status_code == 404
