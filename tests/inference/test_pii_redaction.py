"""A dataset's PII policy reaches the prediction path: a `:predict` input is stored redacted in the prediction log,
so feedback on it (the `prediction.feedback` reference, then the labeling task labeling makes of it) holds the
redacted text; the model itself answered on the raw text."""

from __future__ import annotations

import pytest
import requests

from tests.helpers import INTERNAL, bearer, eventually
from tests.inference.support import serving_document, upload_version
from tests.inference.test_feedback import queued_events, stored_input

pytestmark = pytest.mark.timeout(180)

TEXT = "a wonderful film, write to jane.doe@example.com or call +1 212-555-0123 about it"
REDACTED = "a wonderful film, write to [EMAIL] or call [PHONE] about it"


def serve_reviews(store, registry, tenants, model_folders, pii_policy: str) -> str:
    """Alice's `reviews` model, trained (as the registry says) on an ingestion dataset with this PII policy."""
    response = requests.post(
        f"{tenants.ingestion_url}/v1/datasets",
        json={
            "name": "reviews",
            "task_type": "text_classification",
            "labels": ["neg", "pos"],
            "pii_policy": pii_policy,
        },
        headers=tenants.alice.headers,
        timeout=10,
    )
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    folder = model_folders["text"]
    document = serving_document(
        tenants.alice.tenant, folder, {4: upload_version(store, tenants.alice.tenant, folder, 4)}, 4
    )
    registry.serve({**document, "dataset_id": dataset_id})
    return dataset_id


def predict_and_log(replica, headers, texts: list[str]) -> list[dict]:
    response = replica.client.post("/v1/models/reviews:predict", json={"texts": texts}, headers=headers)
    assert response.status_code == 200, response.get_json()
    predictions = response.get_json()["predictions"]
    replica.server.prediction_log.flush()
    return predictions


def logged_input(replica, store, headers, prediction_id: str) -> bytes:
    response = replica.client.get(f"/v1/predictions/{prediction_id}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return stored_input(store, response.get_json()["input"])


def test_a_redacting_dataset_logs_predictions_without_email_or_phone(
    inference, store, registry, tenants, model_folders
) -> None:
    serve_reviews(store, registry, tenants, model_folders, "redact")
    replica = inference()
    headers = tenants.alice.headers
    raw_answer, clean_answer = predict_and_log(replica, headers, [TEXT, "a wonderful film"])
    # The model answered on what was sent: the stand-in scores "wonderful", and the redaction removed none of it.
    assert raw_answer["label"] == clean_answer["label"] == "pos"
    stored = logged_input(replica, store, headers, raw_answer["prediction_id"])
    assert stored.decode() == REDACTED
    assert b"jane.doe" not in stored and b"555-0123" not in stored
    assert logged_input(replica, store, headers, clean_answer["prediction_id"]) == b"a wonderful film"


def test_a_dataset_without_a_policy_logs_the_text_as_sent(inference, store, registry, tenants, model_folders) -> None:
    serve_reviews(store, registry, tenants, model_folders, "off")
    replica = inference()
    (answer,) = predict_and_log(replica, tenants.alice.headers, [TEXT])
    assert logged_input(replica, store, tenants.alice.headers, answer["prediction_id"]).decode() == TEXT


def give_feedback(replica, headers, prediction_id: str, settings) -> dict:
    """Feedback on a prediction; the `prediction.feedback` event it put on labeling's queue."""
    response = replica.client.post(
        "/v1/feedback", json={"prediction_id": prediction_id, "label": "neg"}, headers=headers
    )
    assert response.status_code == 200, response.get_json()
    (event,) = eventually(
        lambda: [e for e in queued_events(settings.redis_url, "labeling") if e["type"] == "prediction.feedback"],
        what="prediction.feedback on labeling's queue",
    )
    return event


def feedback_task(platform, worker, tenants, dataset_id: str) -> dict:
    """What an annotator of the dataset gets next from labeling, once its worker has consumed the queue
    (`dataset.changed` from ingestion, then `prediction.feedback`)."""
    labeling = platform("labeling")
    with worker("labeling", ingestion_url=tenants.ingestion_url):

        def annotator_token():
            created = labeling.client.post(
                "/v1/annotators",
                json={"tenant": tenants.alice.tenant, "name": "ann", "datasets": [dataset_id]},
                headers=INTERNAL,
            )
            return bearer(created.get_json()["token"]) if created.status_code == 201 else None

        annotator = eventually(annotator_token, timeout=60, what="labeling knows the dataset")

        def next_task():
            got = labeling.client.get(f"/v1/datasets/{dataset_id}/tasks/next", headers=annotator)
            return got.get_json() if got.status_code == 200 else None

        task = eventually(next_task, timeout=60, what="the feedback task")
    assert task["source"] == "feedback" and task["feedback"]["correct_label"] == "neg"
    return task


def test_feedback_hands_labeling_the_redacted_text(
    inference, store, registry, tenants, model_folders, platform, worker, settings
) -> None:
    dataset_id = serve_reviews(store, registry, tenants, model_folders, "redact")
    replica = inference()
    (answer,) = predict_and_log(replica, tenants.alice.headers, [TEXT])
    event = give_feedback(replica, tenants.alice.headers, answer["prediction_id"], settings)
    assert stored_input(store, event["payload"]["input"]).decode() == REDACTED
    assert feedback_task(platform, worker, tenants, dataset_id)["text"] == REDACTED


def test_labeling_redacts_feedback_on_a_prediction_logged_before_the_policy(
    inference, store, registry, tenants, model_folders, platform, worker, settings
) -> None:
    dataset_id = serve_reviews(store, registry, tenants, model_folders, "off")
    replica = inference()
    (answer,) = predict_and_log(replica, tenants.alice.headers, [TEXT])
    turned_on = requests.patch(
        f"{tenants.ingestion_url}/v1/datasets/{dataset_id}",
        json={"pii_policy": "redact"},
        headers=tenants.alice.headers,
        timeout=10,
    )
    assert turned_on.status_code == 200, turned_on.text
    event = give_feedback(replica, tenants.alice.headers, answer["prediction_id"], settings)
    assert stored_input(store, event["payload"]["input"]).decode() == TEXT  # logged while the policy was off
    assert feedback_task(platform, worker, tenants, dataset_id)["text"] == REDACTED
