"""A dataset's PII policy naming a token model of the tenant's (`pii_entities`): a push's texts are scanned by that
model's production version, served by a real inference replica and asked over HTTP with the internal token, and
the entities of the policy's labels are stored as `[LABEL]` placeholders beside presidio's; when the model cannot
answer (inference down, the model not served, no production version) the push is refused with 503 and
Retry-After and nothing is stored. A policy of the wrong shape is a 422 naming the field.

The tagger is the untrained MiniLM one whose zero head favours `B-PER` (tests/inference/test_span_feedback.py): every
word the tokenizer sees is one PER entity, which pins what is replaced."""

from __future__ import annotations

import socket
from typing import Any

import pytest

import tests.inference.conftest as inference_fixtures
import tests.inference.test_span_feedback as span_feedback
from tests.helpers import bearer
from tests.inference.support import serving_document, upload_version
from tests.inference.test_span_feedback import serve

pytestmark = pytest.mark.timeout(240)

# Inference's fixtures: a registry stand-in, replicas built by inference's own `create_app`, the every-word tagger.
store = inference_fixtures.store
registry = inference_fixtures.registry
tenants = inference_fixtures.tenants
inference_settings = inference_fixtures.inference_settings
inference = inference_fixtures.inference
tagger_folder = span_feedback.tagger_folder

TEXT = "Zoë Ruiz wrote to jane.doe@example.com"
WITH_PER = "[PER] [PER] [PER] [PER] [EMAIL]"
"""Every word is a PER entity; the e-mail's words overlap presidio's e-mail, which covers them all and wins."""
PATTERNS_ONLY = "Zoë Ruiz wrote to [EMAIL]"


def dataset_with(ingestion, key: str, pii_entities: Any, name: str = "notes") -> Any:
    return ingestion.client.post(
        "/v1/datasets",
        json={
            "name": name,
            "task_type": "text_classification",
            "labels": ["neg", "pos"],
            "pii_policy": "redact",
            "pii_entities": pii_entities,
        },
        headers=bearer(key),
    )


def push(ingestion, key: str, dataset_id: str, texts: list[str]) -> Any:
    return ingestion.client.post(
        f"/v1/datasets/{dataset_id}/items", json={"items": [{"text": t} for t in texts]}, headers=bearer(key)
    )


def stored(ingestion, key: str, item_id: str) -> tuple[str, dict[str, int]]:
    """The item's downloaded content and its redaction counts, as the partner reads them."""
    url = ingestion.client.get(f"/v1/items/{item_id}/download", headers=bearer(key)).get_json()["url"]
    content = ingestion.client.get(url.split("localhost", 1)[-1])
    assert content.status_code == 200, content.get_json()
    item = ingestion.client.get(f"/v1/items/{item_id}", headers=bearer(key)).get_json()
    return content.data.decode(), item["redactions"]


def items_of(ingestion, key: str, dataset_id: str) -> list[dict[str, Any]]:
    return ingestion.client.get(f"/v1/datasets/{dataset_id}/items", headers=bearer(key)).get_json()["items"]


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_a_push_stores_the_production_taggers_entities_as_placeholders(
    platform, inference, store, registry, tenants, tagger_folder
) -> None:
    serve(store, registry, tenants, tagger_folder, "ds_words")
    replica = inference()
    ingestion = platform("ingestion", inference_url=replica.serve())
    key = tenants.alice.key
    per = dataset_with(ingestion, key, {"model": "words", "labels": ["PER"]})
    assert per.status_code == 201, per.get_json()
    assert per.get_json()["pii_entities"] == {"model": "words", "labels": ["PER"]}
    pushed = push(ingestion, key, per.get_json()["id"], [TEXT, "plain words here"])
    assert pushed.status_code == 200, pushed.get_json()
    first, second = (item["item_id"] for item in pushed.get_json()["items"])
    assert stored(ingestion, key, first) == (WITH_PER, {"PER": 4, "email": 1})
    assert stored(ingestion, key, second) == ("[PER] [PER] [PER]", {"PER": 3})
    # Entities of labels the policy does not name are kept: only presidio's patterns apply.
    loc = dataset_with(ingestion, key, {"model": "words", "labels": ["LOC"]}, name="places")
    (item,) = push(ingestion, key, loc.get_json()["id"], [TEXT]).get_json()["items"]
    assert stored(ingestion, key, item["item_id"]) == (PATTERNS_ONLY, {"email": 1})


def test_an_import_is_scanned_by_the_tagger_too(platform, inference, store, registry, tenants, tagger_folder) -> None:
    serve(store, registry, tenants, tagger_folder, "ds_words")
    ingestion = platform("ingestion", inference_url=inference().serve())
    key = tenants.alice.key
    dataset_id = dataset_with(ingestion, key, {"model": "words", "labels": ["PER"]}).get_json()["id"]
    created = ingestion.client.post(
        f"/v1/datasets/{dataset_id}/imports",
        data=f'{{"text": "{TEXT}"}}\n'.encode(),
        headers={**bearer(key), "Content-Type": "application/x-ndjson"},
    )
    assert created.status_code == 202, created.get_json()
    from services.ingestion.imports import run_import

    assert run_import(ingestion.runtime, created.get_json()["id"]) == "succeeded"
    (item,) = items_of(ingestion, key, dataset_id)
    assert stored(ingestion, key, item["id"]) == (WITH_PER, {"PER": 4, "email": 1})


def refused(ingestion, key: str, dataset_id: str) -> dict[str, Any]:
    """A push the policy's model cannot scan: 503 with Retry-After, and nothing stored."""
    response = push(ingestion, key, dataset_id, [TEXT])
    assert response.status_code == 503, response.get_json()
    assert int(response.headers["Retry-After"]) > 0
    assert items_of(ingestion, key, dataset_id) == []
    return response.get_json()["error"]


def test_inference_down_refuses_the_push_and_stores_nothing(platform, tenants) -> None:
    ingestion = platform("ingestion", inference_url=closed_port_url())
    key = tenants.alice.key
    dataset_id = dataset_with(ingestion, key, {"model": "words", "labels": ["PER"]}).get_json()["id"]
    error = refused(ingestion, key, dataset_id)
    assert error["code"] == "unavailable"
    assert error["details"] == {"pii_entities": {"model": "words", "reason": "unreachable"}}
    assert "nothing was stored" in error["message"]


def test_a_model_without_a_production_version_refuses_the_push(
    platform, inference, store, registry, tenants, tagger_folder
) -> None:
    version = upload_version(store, tenants.alice.tenant, tagger_folder, 1)
    document = serving_document(tenants.alice.tenant, tagger_folder, {1: version}, 1, staging=1)
    del document["aliases"]["production"]
    registry.serve(document)
    ingestion = platform("ingestion", inference_url=inference().serve())
    key = tenants.alice.key
    unserved = dataset_with(ingestion, key, {"model": "words", "labels": ["PER"]}).get_json()["id"]
    assert refused(ingestion, key, unserved)["details"]["pii_entities"]["reason"] == "not_served"
    unknown = dataset_with(ingestion, key, {"model": "nobody", "labels": ["PER"]}, name="other").get_json()["id"]
    assert refused(ingestion, key, unknown)["details"]["pii_entities"] == {"model": "nobody", "reason": "not_served"}


@pytest.mark.parametrize(
    ("pii_entities", "field"),
    [
        ({"labels": ["PER"]}, "model"),
        ({"model": "words"}, "labels"),
        ({"model": "words", "labels": []}, "labels"),
        ({"model": "words", "labels": "PER"}, "labels"),
        ({"model": "words", "labels": ["PER", "PER"]}, "labels"),
        ({"model": "words", "labels": ["PER"], "threshold": 0.5}, "threshold"),
        ("words", "_schema"),
    ],
)
def test_a_policy_of_the_wrong_shape_is_a_422_naming_the_field(platform, tenants, pii_entities, field) -> None:
    ingestion = platform("ingestion")
    response = dataset_with(ingestion, tenants.alice.key, pii_entities)
    assert response.status_code == 422, response.get_json()
    assert field in response.get_json()["error"]["details"]["fields"]["json"]["pii_entities"]
    created = dataset_with(ingestion, tenants.alice.key, None).get_json()
    assert created["pii_entities"] is None
    patched = ingestion.client.patch(
        f"/v1/datasets/{created['id']}", json={"pii_entities": pii_entities}, headers=bearer(tenants.alice.key)
    )
    assert patched.status_code == 422, patched.get_json()
    turned_on = ingestion.client.patch(
        f"/v1/datasets/{created['id']}",
        json={"pii_entities": {"model": "words", "labels": ["PER"]}},
        headers=bearer(tenants.alice.key),
    )
    assert turned_on.status_code == 200 and turned_on.get_json()["pii_entities"]["labels"] == ["PER"]
