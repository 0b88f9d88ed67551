"""An import's quota hold lives on its own row, in PostgreSQL: written in the transaction that admits it, spent by
each batch's transaction, released by the one that finishes it, and counted by every push and import decided
after it under the partner's row lock. Two imports that fit only one at a time get one admitted; a hold lapses
when its import stops moving; daily quotas admit or refuse an import whole, as monthly ones do."""

from __future__ import annotations

import json
from threading import Thread

import psycopg
import pytest

from services.ingestion import quotas
from services.ingestion.imports import BATCH_SIZE
from services.ingestion.models import Import
from shared.errors import RateLimited
from shared.ratelimit import QuotaExhausted
from tests.helpers import _libpq_url, _lock_waiters, eventually
from tests.ingestion.conftest import make_tenant
from tests.ingestion.test_fair_use import set_limits
from tests.ingestion.test_import_quota import item_count, jsonl, metered
from tests.ingestion.test_imports import upload, wait_finished

pytestmark = pytest.mark.timeout(180)

PARTNER_LOCK = "SELECT id FROM partners WHERE id = %s FOR UPDATE"


@pytest.fixture
def database_url(postgres_database) -> str:
    return postgres_database()


@pytest.fixture
def ingestion(database_url, platform):
    return platform("ingestion", database_url=database_url)


def held(runtime, import_id: str) -> tuple[int | None, int | None]:
    with runtime.db.read_session() as session:
        record = session.get(Import, import_id)
        return record.held_items, record.held_bytes


def queued_import(tenant, texts: list[str]) -> str:
    response = upload(tenant, tenant.text["id"], jsonl(texts), "application/x-ndjson")
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def test_of_two_imports_racing_for_room_for_one_exactly_one_is_admitted(ingestion, tenant, worker, database_url):
    set_limits(ingestion, tenant, monthly_quotas={"items_ingested": BATCH_SIZE + 100})
    first = queued_import(tenant, [f"first {n}" for n in range(BATCH_SIZE)])
    second = queued_import(tenant, [f"second {n}" for n in range(BATCH_SIZE)])
    with psycopg.connect(_libpq_url(database_url)) as holder:
        holder.execute(PARTNER_LOCK, (tenant.partner_id,))  # both imports count, then queue on the tenant's lock
        with worker("ingestion", database_url=database_url):
            eventually(lambda: _lock_waiters(database_url) == 2, timeout=60, what="both imports waiting to be admitted")
            holder.rollback()
            answers = [wait_finished(tenant, first), wait_finished(tenant, second)]
    assert sorted(answer["status"] for answer in answers) == ["failed", "succeeded"], answers
    [refused] = [answer for answer in answers if answer["status"] == "failed"]
    error = refused["error"]
    assert error["code"] == "quota_exhausted" and error["details"]["meter"] == "items_ingested", refused
    assert (error["details"]["held"], error["details"]["requested"]) == (BATCH_SIZE, BATCH_SIZE)
    assert "items_ingested" in error["message"] and refused["failure"] == error["message"]
    assert (refused["processed"], refused["accepted"]) == (0, 0)
    assert item_count(tenant) == BATCH_SIZE and metered(tenant, "items_ingested") == BATCH_SIZE
    assert held(ingestion.runtime, first) == held(ingestion.runtime, second) == (None, None)


def test_admissions_queued_on_the_tenant_lock_see_each_others_holds(ingestion, tenant, database_url) -> None:
    set_limits(ingestion, tenant, monthly_quotas={"bytes_ingested": 1500})
    imports = [queued_import(tenant, [f"import {n}"]) for n in range(2)]

    def admit(import_id: str):
        def call() -> str:
            try:
                quotas.admit_import(ingestion.runtime, import_id, 1, 1000)
            except QuotaExhausted as exc:
                return exc.details["meter"]
            return "admitted"

        return call

    with psycopg.connect(_libpq_url(database_url)) as holder:
        holder.execute(PARTNER_LOCK, (tenant.partner_id,))
        answers: dict[str, str] = {}
        threads = [Thread(target=lambda i=i: answers.update({i: admit(i)()})) for i in imports]
        for thread in threads:
            thread.start()
        eventually(lambda: _lock_waiters(database_url) == 2, what="both admissions waiting on the tenant's lock")
        holder.rollback()
        for thread in threads:
            thread.join(30)
    assert sorted(answers.values()) == ["admitted", "bytes_ingested"], answers
    [admitted] = [i for i in imports if answers[i] == "admitted"]
    assert held(ingestion.runtime, admitted) == (1, 1000)
    over = tenant.push(tenant.text["id"], [{"text": "x" * 501}])  # 1,000 held + 501 > 1,500
    assert over.status_code == 429 and over.get_json()["error"]["details"]["held"] == 1000, over.get_json()


def test_a_hold_is_spent_by_its_batches_and_the_rest_released_when_the_import_succeeds(
    ingestion, tenant, worker, database_url
) -> None:
    set_limits(ingestion, tenant, monthly_quotas={"items_ingested": 12})
    # ten counted, seven billed: three carry a label outside the dataset's set and are rejected by the batch
    lines = [json.dumps({"text": f"line {n}", "label": "meh" if n < 3 else "pos"}) + "\n" for n in range(10)]
    response = upload(tenant, tenant.text["id"], "".join(lines).encode(), "application/x-ndjson")
    with worker("ingestion", database_url=database_url):
        done = wait_finished(tenant, response.get_json()["id"])
    assert done["status"] == "succeeded" and (done["accepted"], done["rejected"]) == (7, 3), done
    assert done["error"] is None and held(ingestion.runtime, done["id"]) == (None, None)
    # 7 used; the three counted but not billed were released: 5 left, exactly
    assert tenant.push(tenant.text["id"], [{"text": f"after {n}"} for n in range(5)]).status_code == 200
    assert tenant.push(tenant.text["id"], [{"text": "one too many"}]).status_code == 429


def test_a_hold_is_released_when_its_import_fails(ingestion, tenant, worker, database_url) -> None:
    set_limits(ingestion, tenant, monthly_quotas={"items_ingested": 2 * BATCH_SIZE})
    texts = [f"resumed {n}" for n in range(2 * BATCH_SIZE)]
    import_id = queued_import(tenant, texts)
    # a worker admitted it and stored its first line, then died: the hold outlives it
    quotas.admit_import(ingestion.runtime, import_id, len(texts), sum(len(t) for t in texts))
    with ingestion.runtime.db.session() as session:
        session.get(Import, import_id).processed = 1
    assert tenant.push(tenant.text["id"], [{"text": "no room beside the hold"}]).status_code == 429
    # the operator lowers the quota meanwhile: the import's next batch no longer fits, and the import fails
    set_limits(ingestion, tenant, monthly_quotas={"items_ingested": BATCH_SIZE})
    with worker("ingestion", database_url=database_url):
        done = wait_finished(tenant, import_id)
    assert done["status"] == "failed" and done["error"]["code"] == "quota_exhausted", done
    assert held(ingestion.runtime, import_id) == (None, None)
    assert (done["accepted"], item_count(tenant)) == (BATCH_SIZE, BATCH_SIZE)  # its first batch fitted, not more
    set_limits(ingestion, tenant, monthly_quotas={"items_ingested": 2 * BATCH_SIZE})
    room = [{"text": f"push {n}"} for n in range(BATCH_SIZE)]  # nothing held any more: all the room is free
    assert tenant.push(tenant.text["id"], room).status_code == 200
    assert tenant.push(tenant.text["id"], [{"text": "one too many"}]).status_code == 429


def test_an_abandoned_hold_lapses_and_its_import_is_counted_again(
    ingestion, tenant, worker, database_url, monkeypatch
) -> None:
    monkeypatch.setattr(quotas, "HOLD_SECONDS", 1)  # a day, in production
    set_limits(ingestion, tenant, monthly_quotas={"items_ingested": 10})
    import_id = queued_import(tenant, [f"abandoned {n}" for n in range(8)])
    quotas.admit_import(ingestion.runtime, import_id, 8, 800)  # its worker then died and never came back
    refused = tenant.push(tenant.text["id"], [{"text": f"push {n}"} for n in range(5)])
    assert refused.status_code == 429 and refused.get_json()["error"]["details"]["held"] == 8
    eventually(
        lambda: tenant.push(tenant.text["id"], [{"text": f"push {n}"} for n in range(5)]).status_code == 200,
        timeout=10,
        what="the abandoned hold to lapse",
    )
    with worker("ingestion", database_url=database_url):  # it comes back: counted again, and no longer fits
        done = wait_finished(tenant, import_id)
    assert done["status"] == "failed" and done["error"]["details"]["meter"] == "items_ingested", done
    assert done["accepted"] == 0 and item_count(tenant) == 5


def test_a_daily_quota_refuses_an_import_whole(ingestion, tenant, worker, database_url) -> None:
    set_limits(ingestion, tenant, daily_item_quota=BATCH_SIZE + 100)
    earlier = [f"pushed today {n}" for n in range(10)]
    assert tenant.push(tenant.text["id"], [{"text": text} for text in earlier]).status_code == 200
    # its first batch of 500 fits the day; the import as a whole does not
    over = queued_import(tenant, [f"too many today {n}" for n in range(BATCH_SIZE + 91)])
    with worker("ingestion", database_url=database_url):
        refused = wait_finished(tenant, over)
    assert refused["status"] == "failed" and (refused["processed"], refused["accepted"]) == (0, 0), refused
    error = refused["error"]
    assert error["code"] == "rate_limited" and error["details"] == {"quota": "items", "limit": BATCH_SIZE + 100}
    assert "daily item quota" in error["message"]
    assert item_count(tenant) == 10

    exact = queued_import(tenant, earlier + [f"fits today {n}" for n in range(BATCH_SIZE + 90)])
    with worker("ingestion", database_url=database_url):
        done = wait_finished(tenant, exact)
    assert done["status"] == "succeeded" and (done["accepted"], done["duplicates"]) == (BATCH_SIZE + 90, 10), done
    assert item_count(tenant) == BATCH_SIZE + 100
    usage = ingestion.client.get("/v1/usage", headers=tenant.headers).get_json()
    assert usage["days"][0]["items"] == BATCH_SIZE + 100
    assert tenant.push(tenant.text["id"], [{"text": "one more today"}]).status_code == 429


def test_a_running_imports_hold_counts_against_the_daily_byte_quota(ingestion, tenant) -> None:
    set_limits(ingestion, tenant, daily_byte_quota=100)
    import_id = queued_import(tenant, ["x" * 60])
    quotas.admit_import(ingestion.runtime, import_id, 1, 60)
    over = tenant.push(tenant.text["id"], [{"text": "y" * 41}])
    assert over.status_code == 429 and "60 held by running imports" in over.get_json()["error"]["message"]
    assert tenant.push(tenant.text["id"], [{"text": "y" * 40}]).status_code == 200
    with pytest.raises(RateLimited, match="daily byte quota"):  # 40 used + 60 held: another import waits
        quotas.admit_import(ingestion.runtime, queued_import(tenant, ["z"]), 1, 1)
    other = make_tenant(ingestion, "globex")  # another tenant's imports hold nothing of acme's room
    assert other.push(other.text["id"], [{"text": "z" * 100}]).status_code == 200
