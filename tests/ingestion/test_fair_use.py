"""Fair use at ingestion: rate limits per API key and per tenant (a token bucket in Redis) trip at the configured
rate and recover; a monthly quota answers 429 naming its meter and stores nothing of the refused push."""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers import INTERNAL, bearer
from tests.ingestion.conftest import make_tenant
from tests.ingestion.test_imports import wait_finished

pytestmark = pytest.mark.timeout(120)


def set_limits(ingestion, tenant, **fields) -> dict:
    response = ingestion.client.patch(f"/v1/partners/{tenant.partner_id}", json=fields, headers=INTERNAL)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def push_one(tenant, text: str, key: str | None = None):
    headers = bearer(key) if key else tenant.headers
    return tenant.service.client.post(
        f"/v1/datasets/{tenant.text['id']}/items", json={"items": [{"text": text}]}, headers=headers
    )


def test_a_key_rate_limit_trips_at_its_rate_and_recovers(ingestion, tenant) -> None:
    other = make_tenant(ingestion, "globex")
    body = set_limits(ingestion, tenant, rate_limits={"ingestion_per_key": 0.5, "ingestion_per_tenant": 0})
    assert body["rate_limits"]["ingestion_per_key"] == 0.5
    # one push per 2 s (a burst of one): the first passes, the next one within 2 s is refused whole. The slow rate
    # keeps the test true on a loaded machine, where one push can take over a second.
    assert push_one(tenant, "first").status_code == 200
    refused = push_one(tenant, "one too many")
    assert refused.status_code == 429, refused.get_json()
    error = refused.get_json()["error"]
    assert error["code"] == "rate_limited" and error["details"]["limit"] == "key"
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 2
    assert push_one(other, "another tenant is not limited by acme's bucket").status_code == 200

    time.sleep(retry_after)
    assert push_one(tenant, "after the wait").status_code == 200  # recovered
    listed = ingestion.client.get(f"/v1/datasets/{tenant.text['id']}/items", headers=tenant.headers).get_json()
    assert "one too many" not in {item.get("text") for item in listed["items"]}
    assert len(listed["items"]) == 2


def test_a_tenant_rate_limit_counts_all_its_keys(ingestion, tenant) -> None:
    second_key = ingestion.client.post(f"/v1/partners/{tenant.partner_id}/keys", headers=INTERNAL).get_json()
    set_limits(ingestion, tenant, rate_limits={"ingestion_per_key": 0, "ingestion_per_tenant": 0.5})
    assert push_one(tenant, "first").status_code == 200
    refused = push_one(tenant, "second", key=second_key["api_key"])  # another key, the same tenant's bucket
    assert refused.status_code == 429 and refused.get_json()["error"]["details"]["limit"] == "tenant"


def test_a_monthly_quota_refuses_a_push_whole_and_names_the_meter(ingestion, tenant) -> None:
    set_limits(ingestion, tenant, monthly_quotas={"items_ingested": 5})
    first = tenant.push(tenant.text["id"], [{"text": f"item {n}"} for n in range(3)])
    assert first.status_code == 200
    over = tenant.push(tenant.text["id"], [{"text": f"more {n}"} for n in range(3)])
    assert over.status_code == 429, over.get_json()
    error = over.get_json()["error"]
    assert error["code"] == "quota_exhausted" and error["details"]["meter"] == "items_ingested"
    assert "items_ingested" in error["message"] and int(over.headers["Retry-After"]) > 0
    assert {k: error["details"][k] for k in ("limit", "used", "requested")} == {"limit": 5, "used": 3, "requested": 3}
    listed = ingestion.client.get(f"/v1/datasets/{tenant.text['id']}/items", headers=tenant.headers).get_json()
    assert len(listed["items"]) == 3  # nothing of the refused push was stored
    usage = ingestion.client.get("/v1/usage", headers=tenant.headers).get_json()
    assert sum(r["value"] for r in usage["report"]["meters"] if r["meter"] == "items_ingested") == 3
    assert tenant.push(tenant.text["id"], [{"text": "four"}, {"text": "five"}]).status_code == 200  # fits exactly
    assert tenant.push(tenant.text["id"], [{"text": "six"}]).status_code == 429

    set_limits(ingestion, tenant, monthly_quotas={"bytes_ingested": 10})
    bytes_over = tenant.push(tenant.text["id"], [{"text": "x" * 11}])
    assert bytes_over.status_code == 429 and bytes_over.get_json()["error"]["details"]["meter"] == "bytes_ingested"
    set_limits(ingestion, tenant, monthly_quotas=None)
    assert tenant.push(tenant.text["id"], [{"text": "x" * 11}]).status_code == 200


@pytest.mark.parametrize(
    "fields",
    [
        {"monthly_quotas": {"bytes_stored": 5}},
        {"monthly_quotas": {"items_ingested": -1}},
        {"rate_limits": {"ingestion_per_key": -1}},
        {"rate_limits": {"per_lunch": 1}},
    ],
)
def test_bad_limits_get_a_clear_422(ingestion, tenant, fields) -> None:
    response = ingestion.client.patch(f"/v1/partners/{tenant.partner_id}", json=fields, headers=INTERNAL)
    assert response.status_code == 422, response.get_json()


def test_the_push_routes_document_their_429(ingestion) -> None:
    document = ingestion.client.get("/openapi.json").get_json()
    for path in ("/v1/datasets/{dataset_id}/items", "/v1/datasets/{dataset_id}/imports"):
        answer = document["paths"][path]["post"]["responses"]["429"]
        assert "Retry-After" in answer["headers"] and "quota_exhausted" in answer["description"]


def test_an_import_past_a_monthly_quota_fails_with_the_quota_named(ingestion, tenant, worker) -> None:
    set_limits(ingestion, tenant, monthly_quotas={"items_ingested": 2})
    body = "".join(json.dumps({"text": f"imported {n}"}) + "\n" for n in range(3)).encode()
    response = ingestion.client.post(
        f"/v1/datasets/{tenant.text['id']}/imports",
        data=body,
        headers=tenant.headers,
        content_type="application/x-ndjson",
    )
    assert response.status_code == 202, response.get_json()
    with worker("ingestion"):
        done = wait_finished(tenant, response.get_json()["id"])
    assert done["status"] == "failed" and "items_ingested" in done["failure"], done
    listed = ingestion.client.get(f"/v1/datasets/{tenant.text['id']}/items", headers=tenant.headers).get_json()
    assert listed["items"] == []  # its one batch was refused whole
