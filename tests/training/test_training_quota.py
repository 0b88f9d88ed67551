"""Monthly quotas on training compute: compute is known only after a run, so a run is refused once the month's
compute has reached the quota: through the API with 429 naming the meter (nothing recorded or queued), through
`training.requested` as a failed run whose reason names the quota (never trained). Another tenant trains on."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from services.ingestion import metering
from tests.helpers import INTERNAL, bearer, create_partner
from tests.training.support import published, request_training, text_items, wait_for_run, write_snapshot

pytestmark = pytest.mark.timeout(120)

LABELS = ["databases", "numerics", "web"]


def spend(ingestion, tenant: str, meter: str, seconds: float) -> None:
    """A finished run's compute, as the meter store has it once ingestion consumed its usage event."""
    record = {
        "id": f"run_{uuid.uuid4().hex[:12]}.compute",
        "meter": meter,
        "subject": tenant,
        "time": datetime.now(UTC).isoformat(),
        "value": seconds,
        "dimensions": {"model": "ds_docs", "device": "cpu", "run_id": "run_earlier", "dataset_id": "ds_docs"},
    }
    with ingestion.runtime.db.session() as session:
        metering.record(session, [record], "training")


def set_quota(ingestion, tenant: str, **limits: int) -> None:
    response = ingestion.client.patch(f"/v1/partners/{tenant}", json={"monthly_quotas": limits}, headers=INTERNAL)
    assert response.status_code == 200, response.get_json()


def snapshot(store, tenant: str, seed: int) -> dict:
    items = text_items(per_label=4, seed=seed)
    return write_snapshot(
        store, tenant=tenant, dataset_id="ds_docs", task_type="text_classification", labels=LABELS, items=items
    )


@pytest.fixture
def services(platform):
    ingestion = platform("ingestion")
    acme, globex = create_partner(ingestion.client, "acme"), create_partner(ingestion.client, "globex")
    return ingestion, platform("training"), acme, globex["partner"]["id"]


def test_a_run_is_refused_once_the_months_compute_reaches_the_quota(services) -> None:
    ingestion, training, issued, globex = services
    acme = issued["partner"]["id"]
    set_quota(ingestion, acme, training_cpu_seconds=100)
    spend(ingestion, acme, "training_cpu_seconds", 99.0)

    def create(tenant: str, seed: int):
        taken = snapshot(training.runtime.storage, tenant, seed)
        body = {"tenant": tenant, "dataset_id": "ds_docs", "snapshot_id": taken["snapshot_id"]}
        return training.client.post("/v1/runs", json=body, headers=INTERNAL)

    below = create(acme, 1)
    assert below.status_code == 202, below.get_json()  # 99 of 100 used: a run may still start
    spend(ingestion, acme, "training_cpu_seconds", 1.0)
    refused = create(acme, 2)
    assert refused.status_code == 429, refused.get_json()
    error = refused.get_json()["error"]
    assert error["code"] == "quota_exhausted" and error["details"]["meter"] == "training_cpu_seconds"
    assert (error["details"]["limit"], error["details"]["used"]) == (100, 100)
    assert "training_cpu_seconds" in error["message"] and int(refused.headers["Retry-After"]) > 0
    documented = training.client.get("/openapi.json").get_json()["components"]["schemas"]["RunLimitErrorBody"]
    assert "quota_exhausted" in documented["properties"]["code"]["enum"]  # the answer is the one the document gives
    runs = training.client.get(f"/v1/runs?tenant={acme}", headers=INTERNAL).get_json()["runs"]
    assert [run["id"] for run in runs] == [below.get_json()["id"]]  # nothing of the refused one was recorded

    assert create(globex, 3).status_code == 202  # acme's quota is acme's
    # the device is chosen later, by a worker: a spent GPU quota refuses a run whatever CPU room is left
    set_quota(ingestion, globex, training_cpu_seconds=100, training_gpu_seconds=10)
    spend(ingestion, globex, "training_gpu_seconds", 10.0)
    gpu = create(globex, 4)
    assert gpu.status_code == 429 and gpu.get_json()["error"]["details"]["meter"] == "training_gpu_seconds"


def test_a_retrain_request_over_the_quota_is_recorded_failed_and_never_trained(services, worker) -> None:
    ingestion, training, issued, _globex = services
    acme = issued["partner"]["id"]
    set_quota(ingestion, acme, training_gpu_seconds=60)
    spend(ingestion, acme, "training_gpu_seconds", 75.5)
    taken = snapshot(training.runtime.storage, acme, 5)
    with worker("training", ingestion_url=ingestion.url) as runtime:
        request_training(
            runtime, tenant=acme, dataset_id="ds_docs", snapshot=taken, task_type="text_classification", labels=LABELS
        )
        run = wait_for_run(runtime, status="failed", timeout=60)
        [event] = published(runtime, "training.failed", run.id)
    assert run.started_at is None and run.dispatched_at is None  # never sent to a worker, never trained
    assert "training_gpu_seconds" in run.failure_reason and "quota" in run.failure_reason
    assert event["payload"]["reason"] == run.failure_reason
    seen = training.client.get(f"/v1/runs/{run.id}", headers=bearer(issued["api_key"])).get_json()
    assert seen["status"] == "failed" and "training_gpu_seconds" in seen["failure_reason"]
