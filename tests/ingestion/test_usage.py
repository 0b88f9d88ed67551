"""Usage metering: pushes are metered in their own transaction, the other services' usage events are counted once
however often they arrive, each tenant sees only its own usage, and the export is valid CloudEvents."""

from __future__ import annotations

import csv
import io
import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator, FormatChecker

from services.ingestion import metering
from shared.events.envelope import make_envelope
from tests.helpers import INTERNAL, eventually
from tests.ingestion.conftest import make_tenant

pytestmark = pytest.mark.timeout(120)

SCHEMA = json.loads((Path(__file__).parent / "data" / "cloudevents-1.0.schema.json").read_text())
# RFC 3986's characters (unreserved, reserved, percent): jsonschema checks uri-reference only with an extra package.
URI_REFERENCE = re.compile(r"^[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+$")
FORMATS = FormatChecker()
FORMATS.checks("uri-reference")(lambda value: not isinstance(value, str) or bool(URI_REFERENCE.match(value)))


def this_month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def meters(report: dict[str, Any], **match: Any) -> dict[str, float]:
    """meter -> summed value over the report's rows that match."""
    totals: dict[str, float] = {}
    for row in report["meters"]:
        if all(row.get(key) == value for key, value in match.items()):
            totals[row["meter"]] = totals.get(row["meter"], 0) + row["value"]
    return totals


def prediction_records(tenant: str, model: str, version: str, rows: int, seconds: float) -> list[dict[str, Any]]:
    now = datetime.now(UTC).isoformat()
    dims = {"model": model, "version": version}
    return [
        {
            "id": f"u-{uuid.uuid4().hex}",
            "meter": meter,
            "subject": tenant,
            "time": now,
            "value": value,
            "dimensions": dims,
        }
        for meter, value in (
            ("prediction_requests", 1),
            ("prediction_rows", rows),
            ("prediction_compute_seconds", seconds),
        )
    ]


def test_pushes_are_metered_exactly_and_each_tenant_sees_only_its_own(ingestion, tenant) -> None:
    other = make_tenant(ingestion, "globex")
    texts = ["great product", "awful service", "great product"]  # the third is a duplicate: not billed
    first = tenant.push(tenant.text["id"], [{"text": t} for t in texts], **{"Idempotency-Key": "push-1"})
    assert first.status_code == 200, first.get_json()
    replayed = tenant.push(tenant.text["id"], [{"text": t} for t in texts], **{"Idempotency-Key": "push-1"})
    assert replayed.headers.get("Idempotent-Replayed") == "true"  # a retried push is not metered again
    assert tenant.push(tenant.text["id"], [{"text": "fine"}, {"text": "bad", "label": "nope"}]).status_code == 200
    assert other.push(other.text["id"], [{"text": "élan vital"}]).status_code == 200

    usage = ingestion.client.get("/v1/usage", headers=tenant.headers)
    assert usage.status_code == 200, usage.get_json()
    body = usage.get_json()
    [today] = body["days"]  # the endpoint's daily counts still answer as before
    assert today["items"] == 3
    report = body["report"]
    assert report["bucket"] == "day" and report["by"] == []
    assert {row["tenant"] for row in report["meters"]} == {tenant.partner_id}
    accepted = len(b"great product") + len(b"awful service") + len(b"fine")
    assert meters(report) == {"items_ingested": 3, "bytes_ingested": accepted}

    theirs = ingestion.client.get("/v1/usage", headers=other.headers).get_json()["report"]
    assert meters(theirs) == {"items_ingested": 1, "bytes_ingested": len("élan vital".encode())}

    monthly = ingestion.client.get(f"/v1/usage?period={this_month()}&bucket=month", headers=tenant.headers)
    [items_row] = [row for row in monthly.get_json()["report"]["meters"] if row["meter"] == "items_ingested"]
    assert items_row["bucket"] == this_month() and items_row["value"] == 3 and items_row["records"] == 2

    everyone = ingestion.client.get(f"/v1/billing/usage?period={this_month()}", headers=INTERNAL).get_json()
    assert meters(everyone, tenant=tenant.partner_id)["items_ingested"] == 3
    assert meters(everyone, tenant=other.partner_id)["items_ingested"] == 1
    one = ingestion.client.get(f"/v1/billing/usage?tenant={other.partner_id}", headers=INTERNAL).get_json()
    assert {row["tenant"] for row in one["meters"]} == {other.partner_id}


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_redelivered_and_replayed_usage_events_are_counted_once(
    database, platform, worker, postgres_database, logs
) -> None:
    overrides = {"database_url": postgres_database()} if database == "postgresql" else {}
    ingestion = platform("ingestion", **overrides)
    acme, globex = make_tenant(ingestion, "acme"), make_tenant(ingestion, "globex")
    v1 = prediction_records(acme.partner_id, "reviews", "1", rows=3, seconds=0.25)
    v2 = prediction_records(acme.partner_id, "reviews", "2", rows=5, seconds=0.5)
    theirs = prediction_records(globex.partner_id, "reviews", "1", rows=7, seconds=1.0)
    event = make_envelope("usage.recorded", {"source": "inference", "records": v1 + v2 + theirs}, tenant=None).to_dict()
    # the producer retried a flush whose commit it could not confirm: the same records, in a new event
    retried = make_envelope("usage.recorded", {"source": "inference", "records": v1}, tenant=None).to_dict()
    with worker("ingestion", **overrides) as runtime:
        for message in (event, event, retried, event):  # redelivered, re-published, replayed
            runtime.bus.send(message, "ingestion")

        def deliveries() -> int:
            consumer = "ingestion.usage.recorded"
            return len(logs.find(event="event_handled", consumer=consumer)) + len(
                logs.find(event="event_duplicate_skipped", consumer=consumer)
            )

        eventually(lambda: deliveries() == 4, timeout=30, what="all four deliveries handled")
        assert len(logs.find(event="usage_records_received")) == 2  # the inbox skipped the redelivered event

    report = ingestion.client.get("/v1/usage?by=model&by=version", headers=acme.headers).get_json()["report"]
    assert report["by"] == ["model", "version"]
    assert meters(report, model="reviews", version="1") == {
        "prediction_requests": 1,
        "prediction_rows": 3,
        "prediction_compute_seconds": 0.25,
    }
    assert meters(report, version="2") == {
        "prediction_requests": 1,
        "prediction_rows": 5,
        "prediction_compute_seconds": 0.5,
    }
    assert {row["tenant"] for row in report["meters"]} == {acme.partner_id}
    by_model = ingestion.client.get("/v1/usage?by=model", headers=acme.headers).get_json()["report"]
    assert meters(by_model, model="reviews")["prediction_rows"] == 8 and "version" not in by_model["meters"][0]
    theirs_report = ingestion.client.get("/v1/usage", headers=globex.headers).get_json()["report"]
    assert meters(theirs_report)["prediction_rows"] == 7
    hourly = ingestion.client.get("/v1/usage?bucket=hour", headers=acme.headers).get_json()["report"]
    hours = {datetime.fromisoformat(r["time"]).strftime("%Y-%m-%dT%H:00:00Z") for r in v1 + v2}
    assert {row["bucket"] for row in hourly["meters"]} == hours  # RFC 3339 hours, in UTC, on both databases
    assert meters(hourly)["prediction_rows"] == 8


def test_the_export_is_valid_cloudevents_and_csv_with_each_record_once(ingestion, tenant) -> None:
    other = make_tenant(ingestion, "globex")
    tenant.push(tenant.text["id"], [{"text": "great product"}, {"text": "awful service"}])
    other.push(other.text["id"], [{"text": "fine"}])
    with ingestion.runtime.db.session() as session:  # a record of another service's, as its event stores it
        records = prediction_records(tenant.partner_id, "reviews", "1", rows=2, seconds=0.125)
        metering.record(session, records, "inference")
        metering.record(session, records, "inference")  # twice: stored once

    exported = ingestion.client.get(f"/v1/billing/export?period={this_month()}", headers=INTERNAL)
    assert exported.status_code == 200, exported.get_data(as_text=True)
    assert exported.mimetype == "application/x-ndjson"
    events = [json.loads(line) for line in exported.get_data(as_text=True).splitlines()]
    validator = Draft7Validator(SCHEMA, format_checker=FORMATS)
    for event in events:
        errors = [error.message for error in validator.iter_errors(event)]
        assert not errors, (event, errors)
    assert len(events) == 2 * 2 + 3 and len({(e["source"], e["id"]) for e in events}) == len(events)
    mine = [e for e in events if e["subject"] == tenant.partner_id]
    assert sum(e["data"]["value"] for e in mine if e["type"].endswith(".items_ingested")) == 2
    assert {e["source"] for e in mine} == {"/flywheel/ingestion", "/flywheel/inference"}
    [rows] = [e["data"]["value"] for e in mine if e["type"].endswith(".prediction_rows")]
    assert rows == 2

    # a broken event is caught by the schema: the test can fail
    assert list(validator.iter_errors({**events[0], "specversion": "0.3", "time": "yesterday"}))

    scoped = ingestion.client.get(
        f"/v1/billing/export?period={this_month()}&tenant={other.partner_id}&format=csv", headers=INTERNAL
    )
    assert scoped.status_code == 200 and scoped.mimetype == "text/csv"
    table = list(csv.DictReader(io.StringIO(scoped.get_data(as_text=True))))
    assert {row["tenant"] for row in table} == {other.partner_id}
    assert sorted((row["meter"], row["value"]) for row in table) == [("bytes_ingested", "4"), ("items_ingested", "1")]

    empty = ingestion.client.get("/v1/billing/export?period=2001-01", headers=INTERNAL)
    assert empty.status_code == 200 and empty.get_data() == b""


@pytest.mark.parametrize(
    "query",
    ["period=2026-13", "period=0000-01", "period=december", "bucket=week", "by=dataset", "days=0"],
)
def test_bad_usage_queries_get_a_clear_422(ingestion, tenant, query) -> None:
    response = ingestion.client.get(f"/v1/usage?{query}", headers=tenant.headers)
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"]["code"] == "validation_failed"


def test_operator_usage_needs_the_internal_token(ingestion, tenant) -> None:
    assert ingestion.client.get("/v1/billing/usage", headers=tenant.headers).status_code in {401, 403}
    assert ingestion.client.get(f"/v1/billing/export?period={this_month()}").status_code == 401
    for url in ("/v1/billing/usage?tenant=../ptn_1", f"/v1/billing/export?period={this_month()}&tenant=a%20b"):
        bad = ingestion.client.get(url, headers=INTERNAL)
        assert bad.status_code == 422 and "tenant" in json.dumps(bad.get_json())
    missing = ingestion.client.get("/v1/billing/export", headers=INTERNAL)
    assert missing.status_code == 422 and "period" in json.dumps(missing.get_json())
