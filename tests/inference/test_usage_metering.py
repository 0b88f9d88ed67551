"""Predictions are metered in process and published in batches: no write per request, and the meters that
ingestion keeps match the predictions served exactly, per tenant, model and version."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from shared.events.tables import event_tables
from tests.helpers import eventually
from tests.inference.support import serving_document, upload_version

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def two_tenants_served(store, registry, tenants, model_folders) -> str:
    folder = model_folders["text"]
    for partner in (tenants.alice, tenants.bob):
        version = upload_version(store, partner.tenant, folder, 1)
        registry.serve(serving_document(partner.tenant, folder, {1: version}, production=1))
    return "reviews"


def usage_events(replica: Any) -> list[dict[str, Any]]:
    outbox = event_tables(replica.runtime.db.metadata).outbox
    with replica.runtime.db.session() as session:
        rows = session.execute(select(outbox.c.envelope).where(outbox.c.event_type == "usage.recorded")).all()
    return [row[0] for row in rows]


def prediction_meters(client: Any, headers: dict[str, str]) -> dict[str, float]:
    report = client.get("/v1/usage?by=model&by=version", headers=headers).get_json()["report"]
    totals: dict[str, float] = {}
    for row in report["meters"]:
        if not row["meter"].startswith("prediction_"):  # the worker's daily bytes-stored measurement
            continue
        assert (row["model"], row["version"]) == ("reviews", "1"), row
        totals[row["meter"]] = totals.get(row["meter"], 0) + row["value"]
    return totals


def test_predictions_are_counted_in_process_and_match_the_meters_exactly(
    inference, tenants, two_tenants_served, platform, worker
) -> None:
    replica = inference(log_flush_interval_s=300.0, usage_flush_interval_s=300.0)  # the test flushes by hand
    alice_batches = [["a wonderful film"], ["terrible", "ordinary", "wonderful"], ["fine"] * 5]
    for texts in alice_batches:
        response = replica.client.post(
            "/v1/models/reviews:predict", json={"texts": texts}, headers=tenants.alice.headers
        )
        assert response.status_code == 200, response.get_json()
    ids = {"name": "input_ids", "datatype": "INT64", "shape": [2, 4], "data": [1, 2, 3, 0, 1, 2, 0, 0]}
    mask = {"name": "attention_mask", "datatype": "INT64", "shape": [2, 4], "data": [1, 1, 1, 0, 1, 1, 0, 0]}
    v2_response = replica.client.post(
        "/v2/models/reviews/infer", json={"inputs": [ids, mask]}, headers=tenants.bob.headers
    )
    assert v2_response.status_code == 200, v2_response.get_json()
    assert (
        replica.client.post(
            "/v1/models/reviews:predict", json={"texts": ["bob's"]}, headers=tenants.bob.headers
        ).status_code
        == 200
    )
    failed = replica.client.post("/v1/models/reviews:predict", json={"texts": []}, headers=tenants.alice.headers)
    assert failed.status_code in {400, 422}  # refused work is not billed

    assert usage_events(replica) == []  # nothing was written per request
    assert replica.server.usage.flush() == 2 * 3  # two (tenant, model, version) counters, three meters each
    [event] = usage_events(replica)  # one event for the whole flush
    assert {record["subject"] for record in event["payload"]["records"]} == {tenants.alice.tenant, tenants.bob.tenant}
    assert replica.server.usage.flush() == 0

    ingestion = platform("ingestion")
    alice = tenants.alice.headers
    with worker("ingestion"):
        expected = {"prediction_requests": 3, "prediction_rows": 9}
        eventually(
            lambda: {k: v for k, v in prediction_meters(ingestion.client, alice).items() if k in expected} == expected,
            timeout=30,
            what="alice's predictions metered",
        )
        bob = prediction_meters(ingestion.client, tenants.bob.headers)
    alice_meters = prediction_meters(ingestion.client, alice)
    assert alice_meters["prediction_compute_seconds"] > 0
    assert bob["prediction_requests"] == 2 and bob["prediction_rows"] == 1 + 2  # the v2 tensor request's two rows


def test_a_failed_flush_keeps_its_records_and_their_ids(inference, tenants, two_tenants_served, monkeypatch) -> None:
    """A flush whose transaction fails is retried with the very same record ids: if it had in fact reached the
    bus, ingestion's (tenant, id) constraint still counts it once."""
    replica = inference(log_flush_interval_s=300.0, usage_flush_interval_s=300.0)
    meter, bus = replica.server.usage, replica.runtime.bus
    meter.count(tenants.alice.tenant, "reviews", 1, rows=4, seconds=0.5)
    attempted: list[str] = []
    real_publish = bus.publish_envelope

    def database_down(session: Any, envelope: Any) -> Any:
        attempted.extend(record["id"] for record in envelope.payload["records"])
        raise ConnectionError("database down")

    monkeypatch.setattr(bus, "publish_envelope", database_down)
    with pytest.raises(ConnectionError):
        meter.flush()
    assert usage_events(replica) == []
    monkeypatch.setattr(bus, "publish_envelope", real_publish)
    meter.count(tenants.alice.tenant, "reviews", 1, rows=1, seconds=0.25)  # counted after the failure
    assert meter.flush() == 6
    records = [record for event in usage_events(replica) for record in event["payload"]["records"]]
    retried = {record["id"] for record in records if record["id"] in attempted}
    assert len(attempted) == 3 and retried == set(attempted), "the retry carries the first attempt's ids"
    assert sorted(record["value"] for record in records if record["meter"] == "prediction_rows") == [1, 4]
