"""The prediction log under a PII policy naming a token model of the tenant's (`pii_entities`): the logged text has
that model's entities of the policy's labels replaced (`[PER]`) beside presidio's patterns. A token model's own
predictions are redacted with the entities it just found; another model's inputs are scanned by asking inference's
`:predict` for the policy's model over HTTP. When that model cannot answer, the text is withheld (`[WITHHELD]`),
never stored unscanned; the prediction is still logged.

The tagger is the untrained MiniLM one whose zero head favours `B-PER` (tests/inference/test_span_feedback.py):
every word the tokenizer sees is one PER entity."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import requests

import tests.inference.test_span_feedback as span_feedback
from services.inference.app import create_app
from shared.settings import Settings
from tests.helpers import eventually
from tests.inference.conftest import Replica
from tests.inference.support import serving_document, upload_version
from tests.inference.test_feedback import stored_input
from tests.inference.test_span_feedback import predict, serve

pytestmark = pytest.mark.timeout(240)

tagger_folder = span_feedback.tagger_folder  # the every-word tagger's package (a module fixture)

TEXT = "Zoë Ruiz wrote to jane.doe@example.com"
WITH_PER = "[PER] [PER] [PER] [PER] [EMAIL]"
REVIEW = "a wonderful film, mail jane.doe@example.com"
REVIEW_WITH_PER = "[PER] [PER] [PER][PER] [PER] [EMAIL]"  # the comma is a word too


def dataset(tenants, pii_entities: dict[str, Any] | None, task_type: str, labels: list[str]) -> str:
    response = requests.post(
        f"{tenants.ingestion_url}/v1/datasets",
        json={
            "name": f"d-{task_type}",
            "task_type": task_type,
            "labels": labels,
            "pii_policy": "redact",
            "pii_entities": pii_entities,
        },
        headers=tenants.alice.headers,
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def logged(replica, store, headers, prediction_id: str) -> tuple[str, dict[str, Any]]:
    """The stored text of a logged prediction and its row, as the partner reads them."""
    replica.server.prediction_log.flush()
    response = replica.client.get(f"/v1/predictions/{prediction_id}", headers=headers)
    assert response.status_code == 200, response.get_json()
    row = response.get_json()
    return stored_input(store, row["input"]).decode(), row


def test_a_token_models_logged_text_has_its_own_entities_redacted(
    inference, store, registry, tenants, tagger_folder
) -> None:
    dataset_id = dataset(tenants, {"model": "words", "labels": ["PER"]}, "token_classification", ["PER", "ORG", "LOC"])
    name = serve(store, registry, tenants, tagger_folder, dataset_id)
    replica = inference()
    (answer,) = predict(replica, tenants.alice.headers, name, [TEXT])
    assert [e["text"] for e in answer["entities"]][:2] == ["Zoë", "Ruiz"]  # the caller got the raw text's entities
    text, row = logged(replica, store, tenants.alice.headers, answer["prediction_id"])
    assert text == WITH_PER
    assert row["entities"] == []  # each one overlapped a replaced range: its characters are not stored


@pytest.fixture
def replicas(inference_settings: Settings) -> Iterator[Any]:
    """Build a replica whose `inference_url` (where the policy's model is asked) is given."""
    built: list[Replica] = []

    def build(inference_url: str) -> Replica:
        settings = Settings(**{**inference_settings.__dict__, "inference_url": inference_url})
        replica = Replica(create_app(settings, {"reconcile_interval_s": 300.0}))
        built.append(replica)
        eventually(lambda: replica.client.get("/v2/health/ready").status_code == 200, timeout=30, what="ready")
        return replica

    yield build
    for replica in built:
        replica.close()


def serve_reviews(store, registry, tenants, model_folders, dataset_id: str) -> None:
    folder = model_folders["text"]
    document = serving_document(
        tenants.alice.tenant, folder, {1: upload_version(store, tenants.alice.tenant, folder, 1)}, 1
    )
    registry.serve({**document, "dataset_id": dataset_id})


def test_a_classifiers_logged_text_is_scanned_by_the_policys_tagger(
    inference, replicas, store, registry, tenants, tagger_folder, model_folders
) -> None:
    dataset_id = dataset(tenants, {"model": "words", "labels": ["PER"]}, "text_classification", ["neg", "pos"])
    serve(store, registry, tenants, tagger_folder, "ds_words")
    serve_reviews(store, registry, tenants, model_folders, dataset_id)
    tagger_replica = inference()
    replica = replicas(tagger_replica.serve())
    (answer,) = predict(replica, tenants.alice.headers, "reviews", [REVIEW])
    assert answer["label"] == "pos"  # the model answered on the raw text
    text, _ = logged(replica, store, tenants.alice.headers, answer["prediction_id"])
    assert text == REVIEW_WITH_PER


def test_a_tagger_that_cannot_answer_withholds_the_logged_text(
    replicas, store, registry, tenants, model_folders
) -> None:
    dataset_id = dataset(tenants, {"model": "words", "labels": ["PER"]}, "text_classification", ["neg", "pos"])
    serve_reviews(store, registry, tenants, model_folders, dataset_id)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    replica = replicas(closed)
    (answer,) = predict(replica, tenants.alice.headers, "reviews", [REVIEW])
    assert answer["label"] == "pos"
    text, row = logged(replica, store, tenants.alice.headers, answer["prediction_id"])
    assert text == "[WITHHELD]"
    assert row["predicted_label"] == "pos"


def test_labeling_redacts_fed_back_text_with_the_policys_tagger(
    inference, store, registry, tenants, tagger_folder, platform, worker, settings
) -> None:
    """Logged while the policy was off; turned on with the tagger named: labeling's second line asks the tagger (on
    inference, over HTTP) and the task shows `[PER]` where the names were, the spans over them dropped."""
    dataset_id = span_feedback.token_dataset(tenants, pii_policy="off")
    labeling, annotator = span_feedback.labeling_knows(platform, worker, tenants, dataset_id)
    name = serve(store, registry, tenants, tagger_folder, dataset_id)
    replica = inference()
    headers = tenants.alice.headers
    (answer,) = predict(replica, headers, name, [span_feedback.PII_TEXT])
    replica.server.prediction_log.flush()
    turned_on = requests.patch(
        f"{tenants.ingestion_url}/v1/datasets/{dataset_id}",
        json={"pii_policy": "redact", "pii_entities": {"model": name, "labels": ["PER"]}},
        headers=headers,
        timeout=10,
    )
    assert turned_on.status_code == 200, turned_on.text
    given = span_feedback.feedback(
        replica, headers, {"prediction_id": answer["prediction_id"], "spans": [span_feedback.ZOE_RUIZ]}
    )
    assert given.status_code == 200, given.get_json()
    eventually(lambda: span_feedback.feedback_events(settings) or None, what="prediction.feedback")
    with worker("labeling", ingestion_url=tenants.ingestion_url, inference_url=replica.serve()):

        def handed():
            got = labeling.client.get(f"/v1/datasets/{dataset_id}/tasks/next", headers=annotator)
            return got.get_json() if got.status_code == 200 else None

        task = eventually(handed, timeout=90, what="the feedback task")
    assert task["text"] == "[PER] [PER] [PER] [PER] [EMAIL] [PER] [PER]"
    assert task["prelabel_spans"] == []  # "Zoë Ruiz" was redacted: its characters are not shown
