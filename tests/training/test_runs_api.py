"""The run API: validated requests, idempotency, tenant isolation, internal-token actions, cancelling a queued run."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from tests.helpers import INTERNAL, bearer, create_partner
from tests.training.support import published, text_items, write_snapshot

pytestmark = pytest.mark.timeout(90)


def queued_run_ids(redis_url: str) -> list[str]:
    """Run ids of the `training.run` messages waiting on the training queue in Redis."""
    client = redis.Redis.from_url(redis_url)
    ids = []
    for raw in client.lrange("training", 0, -1):
        message = json.loads(raw)
        if message["headers"]["task"] == "training.run":
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            ids.append(args[0])
    return ids


@pytest.fixture
def services(platform):
    ingestion = platform("ingestion")
    acme, globex = create_partner(ingestion.client, "acme"), create_partner(ingestion.client, "globex")
    training = platform("training")
    return training, acme, globex


def snapshot_for(training, tenant: str, **overrides):
    items = overrides.pop("items", None)
    if items is None:
        items = text_items(per_label=4)
    return write_snapshot(
        training.runtime.storage,
        tenant=tenant,
        dataset_id=overrides.pop("dataset_id", "ds_docs"),
        task_type="text_classification",
        labels=["databases", "numerics", "web"],
        items=items,
    )


def test_runs_need_the_internal_token_and_partners_see_only_their_own(services, redis_url) -> None:
    training, acme, globex = services
    client = training.client
    acme_tenant, globex_tenant = acme["partner"]["id"], globex["partner"]["id"]
    acme_snapshot = snapshot_for(training, acme_tenant)
    body = {"tenant": acme_tenant, "dataset_id": "ds_docs", "snapshot_id": acme_snapshot["snapshot_id"]}

    assert client.post("/v1/runs", json=body).status_code == 401
    assert client.post("/v1/runs", json=body, headers=bearer("not-the-token")).status_code == 401
    refused = client.post("/v1/runs", json=body, headers=bearer(acme["api_key"]))
    assert refused.status_code == 401
    assert refused.get_json()["error"]["code"] == "unauthorized"

    created = client.post("/v1/runs", json=body, headers=INTERNAL)
    assert created.status_code == 202, created.get_json()
    run = created.get_json()
    assert run["status"] == "queued" and run["tenant"] == acme_tenant and run["source"] == "api"
    assert run["model_name"] == "ds_docs" and run["base_model"] == "all-minilm-l6-v2"
    assert run["hyperparameters"]["max_length"] is None and run["hyperparameters"]["epochs"] == 4
    assert run["manifest"] == {**acme_snapshot["manifest"], "offset": None, "length": None}
    assert run["progress"] == {
        "epoch": 0,
        "epochs": 4,
        "step": 0,
        "steps": 0,
        "loss": None,
        "samples_per_second": None,
        "eta_seconds": None,
    }

    # The same request again is the same run; `force` trains again.
    again = client.post("/v1/runs", json=body, headers=INTERNAL)
    assert again.status_code == 200 and again.get_json()["id"] == run["id"]
    forced = client.post("/v1/runs", json=body | {"force": True}, headers=INTERNAL)
    assert forced.status_code == 202 and forced.get_json()["id"] != run["id"]
    external = client.post("/v1/runs", json=body | {"force": True, "launch": "external"}, headers=INTERNAL).get_json()
    # Queued runs went to the training queue once each, after their transaction; the external one did not.
    assert sorted(queued_run_ids(redis_url)) == sorted([run["id"], forced.get_json()["id"]])
    assert external["launch"] == "external"

    globex_snapshot = snapshot_for(training, globex_tenant, dataset_id="ds_other")
    globex_run = client.post(
        "/v1/runs",
        json={"tenant": globex_tenant, "dataset_id": "ds_other", "snapshot_id": globex_snapshot["snapshot_id"]},
        headers=INTERNAL,
    ).get_json()

    # A partner reads its own runs; another tenant's run is a 404, exactly like an unknown one.
    assert client.get(f"/v1/runs/{run['id']}", headers=bearer(acme["api_key"])).get_json()["id"] == run["id"]
    hidden = client.get(f"/v1/runs/{globex_run['id']}", headers=bearer(acme["api_key"]))
    assert hidden.status_code == 404 and hidden.get_json()["error"]["code"] == "not_found"
    assert client.get("/v1/runs/run_unknown", headers=bearer(acme["api_key"])).status_code == 404
    assert client.get(f"/v1/runs/{run['id']}").status_code == 401
    mine = client.get("/v1/runs", headers=bearer(acme["api_key"])).get_json()["runs"]
    assert {r["tenant"] for r in mine} == {acme_tenant} and len(mine) == 3
    spoofed = client.get(f"/v1/runs?tenant={globex_tenant}", headers=bearer(acme["api_key"])).get_json()
    assert spoofed["runs"] == []
    everything = client.get("/v1/runs", headers=INTERNAL).get_json()["runs"]
    assert len(everything) == 4
    page = client.get("/v1/runs?limit=2", headers=INTERNAL).get_json()
    rest = client.get(f"/v1/runs?after={page['next_after']}", headers=INTERNAL).get_json()
    assert [r["id"] for r in page["runs"] + rest["runs"]] == [r["id"] for r in everything]
    filtered = client.get(f"/v1/runs?tenant={globex_tenant}&status=queued", headers=INTERNAL).get_json()
    assert [r["id"] for r in filtered["runs"]] == [globex_run["id"]]

    # Cancelling is an internal action; a queued run is cancelled at once and says so on the bus.
    assert client.post(f"/v1/runs/{run['id']}/cancel", headers=bearer(acme["api_key"])).status_code == 401
    assert client.post(f"/v1/runs/{globex_run['id']}/cancel").status_code == 401
    cancelled = client.post(f"/v1/runs/{run['id']}/cancel", headers=INTERNAL)
    assert cancelled.status_code == 202 and cancelled.get_json()["status"] == "cancelled"
    [failed] = published(training.runtime, "training.failed", run["id"])
    assert "cancelled" in failed["payload"]["reason"] and failed["tenant"] == acme_tenant
    assert failed["payload"]["outcome"] == "cancelled"
    twice = client.post(f"/v1/runs/{run['id']}/cancel", headers=INTERNAL)
    assert twice.status_code == 409 and twice.get_json()["error"]["code"] == "conflict"
    # A cancelled request may be made again.
    assert client.post("/v1/runs", json=body, headers=INTERNAL).status_code == 202


def test_invalid_requests_answer_422_with_each_bad_field(services) -> None:
    training, acme, _ = services
    client = training.client
    tenant = acme["partner"]["id"]
    snapshot = snapshot_for(training, tenant)
    body = {"tenant": tenant, "dataset_id": "ds_docs", "snapshot_id": snapshot["snapshot_id"]}

    def post(**changes):
        return client.post("/v1/runs", json=body | changes, headers=INTERNAL)

    bad = post(hyperparameters={"epochs": 0, "learning_rate": 2, "warmup_ratio": 0.9, "bogus": 1})
    assert bad.status_code == 422
    error = bad.get_json()["error"]
    assert error["code"] == "validation_failed"
    fields = error["details"]["fields"]["hyperparameters"]
    assert set(fields) == {"epochs", "learning_rate", "warmup_ratio", "bogus"}
    misplaced = post(hyperparameters={"image_size": 64, "horizontal_flip": False})
    assert misplaced.status_code == 422
    assert misplaced.get_json()["error"]["details"]["fields"]["hyperparameters"] == {
        "image_size": ["applies to image models only"],
        "horizontal_flip": ["applies to image models only"],
    }
    unknown_base = post(base_model="gpt-17")
    assert unknown_base.status_code == 422
    assert "all-minilm-l6-v2" in unknown_base.get_json()["error"]["details"]["fields"]["base_model"][0]
    assert post(model_name="../escape").status_code == 422
    assert post(launch="ssh").status_code == 422
    assert client.post("/v1/runs", json={"tenant": tenant}, headers=INTERNAL).status_code == 422

    missing = post(snapshot_id="snap_missing")
    assert missing.status_code == 422
    assert "does not exist" in missing.get_json()["error"]["details"]["fields"]["snapshot_id"][0]
    empty = snapshot_for(training, tenant, items=[])
    answer = post(snapshot_id=empty["snapshot_id"])
    assert answer.status_code == 422
    assert "is empty" in answer.get_json()["error"]["message"]

    # Nothing was recorded by any of them.
    assert client.get("/v1/runs", headers=INTERNAL).get_json()["runs"] == []
    assert "/v1/runs/{run_id}/cancel" in client.get("/openapi.json").get_json()["paths"]
    document = client.get("/openapi.json").get_json()["components"]["schemas"]
    assert {"baseline", "baseline_lift"} <= set(document["Run"]["properties"])
    classification = {"name", "method", "items", "accuracy", "macro_f1"}
    entities = {"entity_f1", "entity_precision", "entity_recall", "per_type"}  # a token run's dictionary baseline
    assert set(document["Baseline"]["properties"]) == classification | entities


def test_a_nul_character_that_no_validator_checks_is_a_422_on_postgresql(platform, postgres_database) -> None:
    """PostgreSQL text cannot hold NUL; a run's free-text reason is not an identifier, so only the database
    refuses it: the answer is a 422 saying so, and no run is recorded."""
    training = platform("training", database_url=postgres_database())
    snapshot = snapshot_for(training, "acme")
    body = {"tenant": "acme", "dataset_id": "ds_docs", "snapshot_id": snapshot["snapshot_id"], "reason": "a\x00b"}
    answer = training.client.post("/v1/runs", json=body, headers=INTERNAL)
    assert answer.status_code == 422, answer.get_json()
    assert answer.get_json()["error"]["code"] == "validation_failed"
    assert "NUL" in answer.get_json()["error"]["message"]
    assert training.client.get("/v1/runs", headers=INTERNAL).get_json()["runs"] == []
