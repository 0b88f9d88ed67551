"""Invoices: the price list in configuration turns a billing period's usage into lines per tenant, in exact
decimals; one tenant's usage never appears on another's invoice; `flywheel invoice` prints them."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from cli.main import main
from services.ingestion import metering
from services.ingestion.invoices import PriceList, PriceListError
from tests.helpers import INTERNAL
from tests.ingestion.conftest import make_tenant

pytestmark = pytest.mark.timeout(120)

PRICES = {
    "currency": "EUR",
    "per_1k_predictions": "0.40",
    "per_gpu_hour": "2.50",
    "per_cpu_hour": "0.10",
    "per_gb_month": "0.10",
    "per_1k_items": "10",
}


def record(tenant: str, meter: str, value: float, when: str, **dimensions: str) -> dict[str, Any]:
    return {
        "id": f"t-{uuid.uuid4().hex}",
        "meter": meter,
        "subject": tenant,
        "time": when,
        "value": value,
        "dimensions": dimensions,
    }


@pytest.fixture
def billed(platform):
    ingestion = platform("ingestion", price_list=json.dumps(PRICES))
    acme, globex = make_tenant(ingestion, "acme"), make_tenant(ingestion, "globex")
    november = [
        record(acme.partner_id, "prediction_rows", 1000, "2026-11-03T10:00:00+00:00", model="reviews", version="1"),
        record(acme.partner_id, "prediction_rows", 1500, "2026-11-30T23:59:59+00:00", model="reviews", version="2"),
        record(acme.partner_id, "prediction_compute_seconds", 12.5, "2026-11-03T10:00:00+00:00"),  # not priced
        record(acme.partner_id, "training_gpu_seconds", 5400, "2026-11-10T08:00:00+00:00", device="cuda:0"),
        # floats that do not add up in binary: 0.1 + 0.2 + 1799.7 is 1800 exactly here
        record(acme.partner_id, "training_cpu_seconds", 0.1, "2026-11-11T08:00:00+00:00", device="cpu"),
        record(acme.partner_id, "training_cpu_seconds", 0.2, "2026-11-12T08:00:00+00:00", device="cpu"),
        record(acme.partner_id, "training_cpu_seconds", 1799.7, "2026-11-13T08:00:00+00:00", device="cpu"),
        # 2 GB kept for 15 of November's 30 days: 1 GB-month
        *[
            record(acme.partner_id, "bytes_stored", 2 * 10**9, f"2026-11-{day:02d}T00:30:00+00:00", bucket="raw")
            for day in range(1, 16)
        ],
        record(acme.partner_id, "prediction_rows", 999, "2026-12-01T00:00:00+00:00"),  # the next period
        record(globex.partner_id, "prediction_rows", 7000, "2026-11-20T12:00:00+00:00"),
    ]
    with ingestion.runtime.db.session() as session:
        metering.record(session, november, "inference")
    return ingestion, acme, globex


def test_invoice_lines_are_exact_and_per_tenant(billed) -> None:
    ingestion, acme, globex = billed
    response = ingestion.client.get("/v1/billing/invoices?period=2026-11", headers=INTERNAL)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["period"] == "2026-11" and body["price_list"]["currency"] == "EUR"
    by_tenant = {invoice["tenant"]: invoice for invoice in body["invoices"]}
    assert set(by_tenant) == {acme.partner_id, globex.partner_id}
    mine = by_tenant[acme.partner_id]
    assert mine["currency"] == "EUR" and mine["from"].startswith("2026-11-01T00:00:00")
    lines = {line["meter"]: line for line in mine["lines"]}
    assert set(lines) == {"prediction_rows", "training_cpu_seconds", "training_gpu_seconds", "bytes_stored"}
    assert lines["prediction_rows"] == {
        "meter": "prediction_rows",
        "price": "per_1k_predictions",
        "usage": "2500",
        "quantity": "2.500000",
        "unit": "1k predictions",
        "unit_price": "0.40",
        "amount": "1.00",
    }
    assert (lines["training_gpu_seconds"]["quantity"], lines["training_gpu_seconds"]["amount"]) == ("1.500000", "3.75")
    assert lines["training_cpu_seconds"]["usage"] == "1800"
    assert (lines["training_cpu_seconds"]["quantity"], lines["training_cpu_seconds"]["amount"]) == ("0.500000", "0.05")
    assert lines["bytes_stored"]["unit"] == "GB-month"
    assert (lines["bytes_stored"]["quantity"], lines["bytes_stored"]["amount"]) == ("1.000000", "0.10")
    assert mine["total"] == "4.90"  # 1.00 + 3.75 + 0.05 + 0.10, the lines' own amounts

    theirs = by_tenant[globex.partner_id]
    assert [(line["meter"], line["usage"], line["amount"]) for line in theirs["lines"]] == [
        ("prediction_rows", "7000", "2.80")
    ]
    assert theirs["total"] == "2.80"

    one = ingestion.client.get(f"/v1/billing/invoices?period=2026-11&tenant={globex.partner_id}", headers=INTERNAL)
    assert [invoice["tenant"] for invoice in one.get_json()["invoices"]] == [globex.partner_id]
    december = ingestion.client.get(f"/v1/billing/invoices?period=2026-12&tenant={acme.partner_id}", headers=INTERNAL)
    [lines_december] = december.get_json()["invoices"]
    assert [(line["meter"], line["usage"]) for line in lines_december["lines"]] == [("prediction_rows", "999")]


def test_pushed_items_are_invoiced_as_pushed(platform) -> None:
    ingestion = platform("ingestion", price_list=json.dumps(PRICES))
    acme = make_tenant(ingestion, "acme")
    assert acme.push(acme.text["id"], [{"text": f"item {n}"} for n in range(3)]).status_code == 200
    period = datetime.now(UTC).strftime("%Y-%m")
    body = ingestion.client.get(f"/v1/billing/invoices?period={period}", headers=INTERNAL).get_json()
    [invoice] = body["invoices"]
    [line] = invoice["lines"]
    assert (line["meter"], line["usage"], line["quantity"]) == ("items_ingested", "3", "0.003000")
    assert line["amount"] == "0.03"


def test_the_default_price_list_and_bad_ones(platform) -> None:
    ingestion = platform("ingestion")
    body = ingestion.client.get("/v1/billing/invoices?period=2026-11", headers=INTERNAL).get_json()
    assert body["invoices"] == []
    prices = {price["name"]: price["unit_price"] for price in body["price_list"]["prices"]}
    assert body["price_list"]["currency"] == "USD"
    assert prices["per_1k_predictions"] == "0.50" and prices["per_gpu_hour"] == "2.50"
    assert prices["per_gb_month"] == "0.023"
    for bad in ('{"per_gpu_hour": -1}', '{"per_lunch": 3}', '{"currency": "dollars"}', "[1]", "{", "/nonexistent"):
        with pytest.raises(PriceListError):
            PriceList.parse(bad)


def test_invoices_need_the_internal_token_and_a_period(ingestion, tenant) -> None:
    assert ingestion.client.get("/v1/billing/invoices?period=2026-11", headers=tenant.headers).status_code == 401
    for query in ("", "?period=2026-13", "?period=2026-11&tenant=a%20b"):
        response = ingestion.client.get(f"/v1/billing/invoices{query}", headers=INTERNAL)
        assert response.status_code == 422, response.get_json()


def test_flywheel_invoice_prints_the_lines_and_total(billed, settings, monkeypatch, capsys) -> None:
    ingestion, acme, globex = billed
    monkeypatch.setenv("FLYWHEEL_HOME", str(settings.home))
    monkeypatch.setenv("INGESTION_URL", ingestion.url)
    monkeypatch.setenv("FLYWHEEL_INTERNAL_TOKEN", settings.internal_token)
    monkeypatch.delenv("FLYWHEEL_API_KEY", raising=False)
    assert main(["invoice", "--period", "2026-11", "--tenant", acme.partner_id]) == 0
    out = capsys.readouterr().out
    assert f"invoice {acme.partner_id} 2026-11 (EUR)" in out and globex.partner_id not in out
    [gpu] = [line for line in out.splitlines() if "training_gpu_seconds" in line]
    assert gpu.split()[1:] == ["1.500000", "GPU-hour", "2.50", "3.75"]
    assert "total 4.90 EUR" in out
    assert main(["invoice", "--period", "2026-11", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert {invoice["tenant"] for invoice in answer["invoices"]} == {acme.partner_id, globex.partner_id}
    assert main(["invoice", "--period", "2026-13"]) == 1


def test_a_bad_price_list_stops_the_service_at_start(platform) -> None:
    with pytest.raises(PriceListError, match="per_gpu_hour"):
        platform("ingestion", price_list='{"per_gpu_hour": "free"}')
