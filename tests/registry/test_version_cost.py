"""Cost per model: a version's view says what it cost to train (its run's metered compute), what it costs to serve
at current traffic (compute per 1k predictions over the last 24 hours) and what it gained (its gate's metric
difference): the return on a retrain, in the API and in `flywheel models show`."""

from __future__ import annotations

import argparse
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from cli import models as cli
from services.ingestion import metering
from testkit.wsgi import serve
from tests.conftest import INTERNAL_TOKEN
from tests.helpers import INTERNAL, bearer, create_partner
from tests.registry.evaluations import EvaluatedRuns
from tests.registry.support import RunFactory, deliver

pytestmark = pytest.mark.timeout(120)

PRICES = {"per_gpu_hour": "2.50", "per_cpu_hour": "0.10", "per_1k_predictions": "0.40"}


def usage(tenant: str, meter: str, value: float, when: datetime, record_id: str | None = None, **dims: str) -> dict:
    return {
        "id": record_id or f"t-{uuid.uuid4().hex}",
        "meter": meter,
        "subject": tenant,
        "time": when.isoformat(),
        "value": value,
        "dimensions": dims,
    }


@pytest.fixture
def versions(platform):
    ingestion = platform("ingestion", price_list=json.dumps(PRICES))
    registry = platform("registry")  # reaches the served ingestion for key checks and meters
    acme, globex = create_partner(ingestion.client, "acme"), create_partner(ingestion.client, "globex")
    tenant, other = acme["partner"]["id"], globex["partner"]["id"]
    evaluated = EvaluatedRuns(registry, RunFactory(registry.runtime.storage))
    first = evaluated(tenant, "reviews", quality=0.70)
    deliver(registry.runtime, tenant, first)
    second = evaluated(tenant, "reviews", quality=0.90)
    deliver(registry.runtime, tenant, second)
    now = datetime.now(UTC)
    records = [
        usage(tenant, "training_gpu_seconds", 5400, now, f"{second['run_id']}.compute", device="cuda:0"),
        usage(tenant, "prediction_rows", 1500, now - timedelta(hours=2), model="reviews", version="2"),
        usage(tenant, "prediction_rows", 500, now - timedelta(minutes=5), model="reviews", version="2"),
        usage(tenant, "prediction_compute_seconds", 3.0, now - timedelta(hours=2), model="reviews", version="2"),
        # yesterday's traffic is not today's, v1's is not v2's, another tenant's is not acme's
        usage(tenant, "prediction_rows", 9000, now - timedelta(hours=30), model="reviews", version="2"),
        usage(tenant, "prediction_rows", 700, now - timedelta(hours=1), model="reviews", version="1"),
        usage(other, "prediction_rows", 800, now - timedelta(hours=1), model="reviews", version="2"),
    ]
    with ingestion.runtime.db.session() as session:
        metering.record(session, records, "inference")
    return registry, tenant, acme["api_key"]


def test_a_version_view_shows_its_training_and_serving_cost_and_its_gain(versions) -> None:
    registry, tenant, key = versions
    response = registry.client.get(f"/v1/models/reviews/versions/2?tenant={tenant}", headers=INTERNAL)
    assert response.status_code == 200, response.get_json()
    view = response.get_json()
    cost = view["cost"]
    assert cost["currency"] == "USD"
    training = cost["training"]
    assert (training["run_id"], training["meter"], training["device"]) == (
        view["run_id"],
        "training_gpu_seconds",
        "cuda:0",
    )
    assert (training["seconds"], training["unit"], training["cost"]) == ("5400", "GPU-hour", "3.750000")
    serving = cost["serving"]
    assert serving["window_hours"] == 24 and serving["predictions"] == "2000"
    assert serving["compute_seconds_per_1k"] == "1.500"  # 3 s over 2,000 predictions
    assert serving["compute_cost_per_1k"] == "0.000042" and serving["price_per_1k"] == "0.40"
    decision = view["decision"]
    gain = cost["gain"]
    assert gain["metric"] == decision["difference"]["metric"] and gain["difference"] == decision["difference"]["value"]
    assert gain["difference"] > 0 and gain["outcome"] == decision["outcome"]
    per_point = Decimal("3.750000") / (Decimal(repr(gain["difference"])) * 100)
    assert cost["training_cost_per_point"] == str(per_point.quantize(Decimal("0.000001")))

    older = registry.client.get(f"/v1/models/reviews/versions/1?tenant={tenant}", headers=INTERNAL).get_json()
    assert older["cost"]["training"] is None  # its run was never metered
    assert older["cost"]["serving"]["predictions"] == "700"
    mine = registry.client.get("/v1/models/reviews/versions/2", headers=bearer(key)).get_json()
    assert mine["cost"] == cost  # the partner sees its own version's cost


def test_flywheel_models_show_prints_the_cost(versions, capsys) -> None:
    registry, tenant, _key = versions
    url, stop = serve(registry.app)
    try:
        parser = argparse.ArgumentParser(prog="flywheel")
        cli.add_models_parser(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(["models", "show", "reviews", "--tenant", tenant, "--version", "2"])
        assert cli.run_models_command(args, url, INTERNAL_TOKEN) == 0
    finally:
        stop()
    out = capsys.readouterr().out
    assert "training   5400 cuda:0 device-seconds: 3.750000 USD at 2.50 per GPU-hour" in out
    assert "serving    1.500 compute-seconds per 1k predictions (0.000042 USD; billed 0.40) over 2000" in out
    [gained] = [line for line in out.splitlines() if line.startswith("gained")]
    assert "over production" in gained and "USD of training per point" in gained


def test_without_ingestion_the_view_still_answers(platform) -> None:
    registry = platform("registry", ingestion_url="http://127.0.0.1:9")  # nothing listens there
    tenant = "ptn_cost_alone"
    deliver(registry.runtime, tenant, RunFactory(registry.runtime.storage)(tenant, "reviews"))
    response = registry.client.get(f"/v1/models/reviews/versions/1?tenant={tenant}", headers=INTERNAL)
    assert response.status_code == 200 and response.get_json()["cost"] is None
