"""Fair use on the prediction path: the tenant's rate limits (kept by ingestion) trip at their rate on every
replica together and recover; a monthly quota on predictions answers 429 naming the meter, before any work."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest

from services.ingestion import metering
from tests.helpers import INTERNAL
from tests.inference.test_usage_metering import two_tenants_served, usage_events  # noqa: F401 - a fixture

pytestmark = pytest.mark.timeout(120)
served = pytest.mark.usefixtures("two_tenants_served")

PREDICT = "/v1/models/reviews:predict"


def set_limits(platform, tenant: str, **fields):
    ingestion = platform("ingestion")
    response = ingestion.client.patch(f"/v1/partners/{tenant}", json=fields, headers=INTERNAL)
    assert response.status_code == 200, response.get_json()
    return ingestion


def predict(replica, partner, texts):
    return replica.client.post(PREDICT, json={"texts": texts}, headers=partner.headers)


@served
def test_rate_limits_trip_at_their_rate_on_every_replica_and_recover(
    inference,
    tenants,
    platform,
) -> None:
    set_limits(platform, tenants.alice.tenant, rate_limits={"inference_per_key": 0, "inference_per_tenant": 0.5})
    first, second = inference(), inference()
    # one request per 2 s (a burst of one) for all of alice's replicas together: what the first replica took, the
    # second cannot. The slow rate keeps the test true on a loaded machine.
    assert predict(first, tenants.alice, ["one"]).status_code == 200
    refused = predict(second, tenants.alice, ["two"])
    assert refused.status_code == 429, refused.get_json()
    error = refused.get_json()["error"]
    assert error["code"] == "rate_limited" and error["details"]["limit"] == "tenant"
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 2
    assert predict(second, tenants.bob, ["bob is not alice"]).status_code == 200  # another tenant's bucket
    assert (
        second.client.post(
            "/v2/models/reviews/infer",
            json={"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]},
            headers=tenants.alice.headers,
        ).status_code
        == 429
    )  # the tensor API counts against the same bucket
    time.sleep(retry_after)
    assert predict(second, tenants.alice, ["after the wait"]).status_code == 200


@served
def test_a_monthly_prediction_quota_refuses_before_any_work(
    inference,
    tenants,
    platform,
) -> None:
    ingestion = set_limits(platform, tenants.alice.tenant, monthly_quotas={"prediction_rows": 5})
    with ingestion.runtime.db.session() as session:  # two rows already served this month (another replica's)
        earlier = {
            "id": f"earlier-{uuid.uuid4().hex}",
            "meter": "prediction_rows",
            "subject": tenants.alice.tenant,
            "time": datetime.now(UTC).isoformat(),
            "value": 2,
            "dimensions": {"model": "reviews", "version": "1"},
        }
        metering.record(session, [earlier], "inference")
    replica = inference(log_flush_interval_s=300.0, usage_flush_interval_s=300.0)
    assert predict(replica, tenants.alice, ["a", "b", "c"]).status_code == 200  # 2 + 3 = 5: the quota, exactly
    refused = predict(replica, tenants.alice, ["one more"])
    assert refused.status_code == 429, refused.get_json()
    error = refused.get_json()["error"]
    assert error["code"] == "quota_exhausted" and error["details"]["meter"] == "prediction_rows"
    assert "prediction_rows" in error["message"] and int(refused.headers["Retry-After"]) > 0
    v2 = replica.client.post(
        "/v2/models/reviews/infer",
        json={"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]},
        headers=tenants.alice.headers,
    )
    assert v2.status_code == 429 and "prediction_rows" in v2.get_json()["error"]
    assert predict(replica, tenants.bob, ["bob has no quota"]).status_code == 200
    # nothing of the refused requests was served or metered: alice's three rows, in one request
    replica.server.usage.flush()
    records = [r for event in usage_events(replica) for r in event["payload"]["records"]]
    alice = {r["meter"]: r["value"] for r in records if r["subject"] == tenants.alice.tenant}
    assert alice == {
        "prediction_requests": 1,
        "prediction_rows": 3,
        "prediction_compute_seconds": alice.get("prediction_compute_seconds"),
    }


def test_the_prediction_routes_document_their_429(inference, tenants) -> None:
    document = inference().client.get("/openapi.json").get_json()
    for path in ("/v1/models/{name}:predict", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        answer = document["paths"][path]["post"]["responses"]["429"]
        assert "Retry-After" in answer["headers"] and "quota_exhausted" in answer["description"]
