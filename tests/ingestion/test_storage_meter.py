"""The daily bytes-stored meter: the ingestion worker measures what each tenant keeps in object storage (its
raw items and the other services' objects under its prefix), once per tenant and UTC day, whoever measures
again; invoices price it per GB-month."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from services.ingestion.storage_meter import measure_storage
from tests.helpers import INTERNAL, eventually
from tests.ingestion.conftest import make_tenant, png

pytestmark = pytest.mark.timeout(120)


def stored(client, headers, **match) -> dict[str, float]:
    """bucket day -> bytes_stored, from the tenant's own usage report."""
    report = client.get("/v1/usage", headers=headers).get_json()["report"]
    return {
        row["bucket"]: row["value"]
        for row in report["meters"]
        if row["meter"] == "bytes_stored" and all(row.get(k) == v for k, v in match.items())
    }


def test_bytes_stored_are_measured_once_a_day_per_tenant(platform, worker) -> None:
    ingestion = platform("ingestion")
    acme, globex = make_tenant(ingestion, "acme"), make_tenant(ingestion, "globex")
    images = [png((10 * n, 20, 30), size=(8 + n, 8)) for n in range(3)]
    pushed = acme.push(acme.images["id"], [{"image": base64.b64encode(image).decode()} for image in images])
    assert pushed.status_code == 200 and all(r["status"] == "accepted" for r in pushed.get_json()["items"])
    their_image = png((1, 2, 3), size=(16, 16))
    assert globex.push(globex.images["id"], [{"image": base64.b64encode(their_image).decode()}]).status_code == 200
    # another service's objects under the tenant's prefix (a dataset snapshot, a model) are the tenant's too
    storage = ingestion.runtime.storage
    storage.put("datasets", f"{acme.partner_id}/{acme.images['id']}/snapshots/s1/manifest.jsonl", b"x" * 1000)
    storage.put("models", f"{acme.partner_id}/photos/runs/run_1/model.onnx", b"m" * 4096)
    expected = sum(len(image) for image in images) + 1000 + 4096
    today = datetime.now(UTC).date().isoformat()

    with worker("ingestion"):  # the worker measures when it is ready
        eventually(lambda: stored(ingestion.client, acme.headers) == {today: expected}, what="acme measured")
    assert stored(ingestion.client, globex.headers) == {today: len(their_image)}  # only its own
    report = ingestion.client.get("/v1/usage", headers=acme.headers).get_json()["report"]
    assert {row["tenant"] for row in report["meters"]} == {acme.partner_id}
    [raw] = [r for r in report["meters"] if r["meter"] == "bytes_stored" and r["records"]]
    assert raw["records"] == 4  # one record per bucket (raw, datasets, checkpoints, models)

    # more data the same day: the day's first measurement stands, whoever measures again (another replica)
    storage.put("checkpoints", f"{acme.partner_id}/run_1/checkpoint.pt", b"c" * 500)
    assert measure_storage(ingestion.runtime) == 0  # every tenant already measured today
    with worker("ingestion"):  # a restarted worker measures nobody again
        pass
    assert stored(ingestion.client, acme.headers) == {today: expected}

    yesterday = (datetime.now(UTC) - timedelta(days=1)).date()  # a day nobody measured yet
    assert measure_storage(ingestion.runtime, yesterday) == 2
    assert measure_storage(ingestion.runtime, yesterday) == 0
    assert stored(ingestion.client, acme.headers) == {today: expected, yesterday.isoformat(): expected + 500}

    period = datetime.now(UTC).strftime("%Y-%m")
    body = ingestion.client.get(f"/v1/billing/invoices?period={period}", headers=INTERNAL).get_json()
    [mine] = [invoice for invoice in body["invoices"] if invoice["tenant"] == acme.partner_id]
    [line] = [line for line in mine["lines"] if line["meter"] == "bytes_stored"]
    same_month = yesterday.strftime("%Y-%m") == period  # on the 1st, yesterday is last month's invoice
    assert line["unit"] == "GB-month" and line["usage"] == str(expected + (expected + 500 if same_month else 0))
