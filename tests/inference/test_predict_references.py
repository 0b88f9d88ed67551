"""Predictions on inputs named by reference: a service acting for a tenant (labeling's pre-labels) sends the
tenant's stored items as bucket/key + sha256, and inference reads and checks them itself."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from sqlalchemy import select

from services.inference.models import Prediction
from shared.client import ServiceClient
from shared.logging import log_context
from tests.conftest import INTERNAL_TOKEN
from tests.inference.support import png, serving_document, upload_version

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def models(store, registry, tenants, model_folders) -> None:
    """alice's text model `reviews` and image model `colours`."""
    for name, version in (("text", 1), ("image", 3)):
        folder = model_folders[name]
        uploaded = upload_version(store, tenants.alice.tenant, folder, version)
        registry.serve(serving_document(tenants.alice.tenant, folder, {version: uploaded}, production=version))


def acting_for(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {INTERNAL_TOKEN}", "X-Flywheel-Tenant": tenant}


def stored(store, key: str, pack: list[bytes]) -> list[dict[str, Any]]:
    """Write the items as one packed object, as ingestion does for texts; their references, in order."""
    store.put("raw", key, b"".join(pack))
    references, offset = [], 0
    for data in pack:
        references.append(
            {
                "bucket": "raw",
                "key": key,
                "sha256": hashlib.sha256(data).hexdigest(),
                "offset": offset,
                "length": len(data),
            }
        )
        offset += len(data)
    return references


def test_a_service_acting_for_a_tenant_predicts_on_its_stored_items(inference, tenants, models, store, logs) -> None:
    replica = inference()
    alice = tenants.alice.tenant
    texts = stored(store, f"{alice}/ds_1/text/push_1.txt", [b"a wonderful film", b"a terrible film"])
    response = replica.client.post("/v1/models/reviews:predict", json={"references": texts}, headers=acting_for(alice))
    assert response.status_code == 200, response.get_json()
    assert [p["label"] for p in response.get_json()["predictions"]] == ["pos", "neg"]
    assert all(p["prediction_id"] is None for p in response.get_json()["predictions"])

    blue = png((0, 0, 255))
    image = {"bucket": "raw", "key": f"{alice}/ds_2/images/push_1/blue", "sha256": hashlib.sha256(blue).hexdigest()}
    store.put("raw", image["key"], blue)
    response = replica.client.post(
        "/v1/models/colours:predict", json={"references": [image]}, headers=acting_for(alice)
    )
    assert response.status_code == 200, response.get_json()
    assert [p["label"] for p in response.get_json()["predictions"]] == ["blue"]

    # Through the one service-to-service client, the caller's trace id is the one inference logs.
    client = ServiceClient(replica.serve(), INTERNAL_TOKEN)
    with log_context(trace_id="trace-of-the-prelabel"):
        answer = client.post(
            "/v1/models/reviews:predict", json={"references": texts[:1]}, headers={"X-Flywheel-Tenant": alice}
        )
    assert answer["predictions"][0]["label"] == "pos"
    (line,) = logs.find(event="http_request", path="/v1/models/reviews:predict", trace_id="trace-of-the-prelabel")
    assert line["status"] == 200

    replica.server.prediction_log.flush()
    with replica.runtime.db.session() as session:
        assert session.scalars(select(Prediction)).all() == [], "a service's predictions are not partner traffic"


def test_stored_inputs_stay_within_the_tenant_and_must_match_their_sha256(inference, tenants, models, store) -> None:
    replica = inference()
    alice, bob = tenants.alice.tenant, tenants.bob.tenant
    (own,) = stored(store, f"{alice}/ds_1/text/push_1.txt", [b"a wonderful film"])
    (bobs,) = stored(store, f"{bob}/ds_9/text/push_1.txt", [b"a wonderful film"])

    def predict(references: list[dict[str, Any]], headers: dict[str, str] | None = None) -> Any:
        return replica.client.post(
            "/v1/models/reviews:predict", json={"references": references}, headers=headers or acting_for(alice)
        )

    assert predict([own]).status_code == 200
    another_tenants = predict([own, bobs])
    assert another_tenants.status_code == 404 and another_tenants.get_json()["error"]["code"] == "not_found"
    assert predict([own | {"key": f"{alice}/ds_1/text/missing.txt"}]).status_code == 404
    tampered = predict([own | {"sha256": hashlib.sha256(b"something else").hexdigest()}])
    assert tampered.status_code == 422
    assert tampered.get_json()["error"]["details"]["fields"] == {
        "references": {"0": {"sha256": ["does not match the stored bytes"]}}
    }
    assert predict([own | {"bucket": "models"}]).status_code == 422
    assert predict([own | {"key": f"{alice}/../{bob}/ds_9/text/push_1.txt"}]).status_code == 422
    as_partner = predict([own], tenants.alice.headers)
    assert as_partner.status_code == 403 and as_partner.get_json()["error"]["code"] == "forbidden"
    both = replica.client.post(
        "/v1/models/reviews:predict", json={"texts": ["x"], "references": [own]}, headers=acting_for(alice)
    )
    assert both.status_code == 422

    document = replica.client.get("/openapi.json").get_json()
    assert "references" in document["components"]["schemas"]["PredictRequest"]["properties"]
