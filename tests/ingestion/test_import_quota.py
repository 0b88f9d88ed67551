"""Imports against monthly quotas are all or nothing: an import that would pass items_ingested or bytes_ingested
stores none of its items, one that fits exactly stores all of them, and while an import runs the room it needs is
held against every other push and import of its tenant."""

from __future__ import annotations

import json

import pytest

from services.ingestion import quotas
from services.ingestion.imports import BATCH_SIZE
from shared.ratelimit import QuotaExhausted
from tests.ingestion.conftest import make_tenant
from tests.ingestion.test_fair_use import set_limits
from tests.ingestion.test_imports import upload, wait_finished

pytestmark = pytest.mark.timeout(180)


def jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()


def item_count(tenant) -> int:
    listed = tenant.service.client.get(
        f"/v1/datasets/{tenant.text['id']}/items?limit=1000", headers=tenant.headers
    ).get_json()
    return len(listed["items"])


def metered(tenant, meter: str) -> float:
    report = tenant.service.client.get("/v1/usage", headers=tenant.headers).get_json()["report"]
    return sum(row["value"] for row in report["meters"] if row["meter"] == meter)


def test_an_import_past_the_items_quota_stores_none_of_its_items(ingestion, tenant, worker) -> None:
    other = make_tenant(ingestion, "globex")
    limit = BATCH_SIZE + 100
    set_limits(ingestion, tenant, monthly_quotas={"items_ingested": limit})
    earlier = [f"pushed before {n}" for n in range(10)]
    assert tenant.push(tenant.text["id"], [{"text": text} for text in earlier]).status_code == 200
    # 10 + 600 > 600: its first batch of 500 would fit, the import as a whole does not
    over = upload(tenant, tenant.text["id"], jsonl([f"too many {n}" for n in range(limit)]), "application/x-ndjson")
    # 590 new lines and the 10 already stored (duplicates, not billed): exactly the quota
    exact = earlier + [f"fits exactly {n}" for n in range(limit - len(earlier))]
    fits = upload(tenant, tenant.text["id"], jsonl(exact), "application/x-ndjson")
    elsewhere = upload(other, other.text["id"], jsonl([f"globex {n}" for n in range(limit)]), "application/x-ndjson")
    with worker("ingestion"):
        refused = wait_finished(tenant, over.get_json()["id"])
        done = wait_finished(tenant, fits.get_json()["id"])
        unaffected = wait_finished(other, elsewhere.get_json()["id"])
    assert refused["status"] == "failed" and "items_ingested" in refused["failure"], refused
    assert refused["accepted"] == 0 and refused["processed"] == 0
    assert done["status"] == "succeeded" and (done["accepted"], done["duplicates"]) == (limit - 10, 10), done
    assert unaffected["status"] == "succeeded" and unaffected["accepted"] == limit, unaffected
    assert item_count(tenant) == limit  # the pushed 10 and the 590 that fit; nothing of the refused import
    assert metered(tenant, "items_ingested") == limit
    assert tenant.push(tenant.text["id"], [{"text": "one more"}]).status_code == 429


def test_an_import_past_the_bytes_quota_is_refused_whole(ingestion, tenant, worker) -> None:
    texts = [f"{n:04d}" + "x" * 96 for n in range(BATCH_SIZE + 1)]  # 100 bytes each
    set_limits(ingestion, tenant, monthly_quotas={"bytes_ingested": 100 * BATCH_SIZE})
    response = upload(tenant, tenant.text["id"], jsonl(texts), "application/x-ndjson")
    with worker("ingestion"):
        refused = wait_finished(tenant, response.get_json()["id"])
    assert refused["status"] == "failed" and "bytes_ingested" in refused["failure"], refused
    assert item_count(tenant) == 0 and metered(tenant, "bytes_ingested") == 0


def test_a_running_import_holds_its_room_against_pushes_and_imports(ingestion, tenant, worker) -> None:
    set_limits(ingestion, tenant, monthly_quotas={"items_ingested": 10})
    assert tenant.push(tenant.text["id"], [{"text": "first"}, {"text": "second"}]).status_code == 200
    running = upload(tenant, tenant.text["id"], jsonl([f"imported {n}" for n in range(7)]), "application/x-ndjson")
    second = upload(tenant, tenant.text["id"], jsonl(["a second import"]), "application/x-ndjson")
    running_id, second_id = running.get_json()["id"], second.get_json()["id"]
    quotas.admit_import(ingestion.runtime, running_id, 7, 700)  # as the worker admits it before its first batch
    # 2 used + 7 held: room for one more item
    assert tenant.push(tenant.text["id"], [{"text": "fits beside the hold"}]).status_code == 200
    squeezed = tenant.push(tenant.text["id"], [{"text": "would take the import's room"}])
    assert squeezed.status_code == 429, squeezed.get_json()
    error = squeezed.get_json()["error"]
    assert error["code"] == "quota_exhausted" and error["details"]["meter"] == "items_ingested"
    assert (error["details"]["used"], error["details"]["held"]) == (3, 7)
    with pytest.raises(QuotaExhausted):
        quotas.admit_import(ingestion.runtime, second_id, 1, 10)  # another import cannot take it either
    with worker("ingestion"):
        done = wait_finished(tenant, running_id)  # its batches take the room it holds, and fit
        refused = wait_finished(tenant, second_id)
    assert done["status"] == "succeeded" and done["accepted"] == 7, done
    assert refused["status"] == "failed" and refused["error"]["details"]["meter"] == "items_ingested", refused
    assert item_count(tenant) == 10 and metered(tenant, "items_ingested") == 10
    assert tenant.push(tenant.text["id"], [{"text": "the month is full"}]).status_code == 429
