"""The prediction log keeps inputs by reference; feedback emits `prediction.feedback` with that reference."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import numpy as np
import pytest
import redis
from sqlalchemy import select

from services.inference.models import Prediction
from tests.helpers import eventually
from tests.inference.support import serving_document, upload_version

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def reviews(store, registry, tenants, model_folders):
    folder = model_folders["text"]
    registry.serve(
        serving_document(tenants.alice.tenant, folder, {4: upload_version(store, tenants.alice.tenant, folder, 4)}, 4)
    )


def predict(replica, headers, texts: list[str], trace_id: str | None = None) -> list[dict]:
    extra = {"X-Request-ID": trace_id} if trace_id else {}
    response = replica.client.post("/v1/models/reviews:predict", json={"texts": texts}, headers={**headers, **extra})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["predictions"]


def queued_events(redis_url: str, queue: str) -> list[dict]:
    """The envelopes waiting on a consumer's Celery queue in Redis (what its worker would receive)."""
    client = redis.Redis.from_url(redis_url)
    envelopes = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        envelopes.append(body[0][0])
    return envelopes


def stored_input(store, reference: dict) -> bytes:
    data = store.get_bytes(reference["bucket"], reference["key"])
    return data[reference["offset"] : reference["offset"] + reference["length"]]


def test_feedback_emits_prediction_feedback_with_the_input_by_reference(
    inference, reviews, tenants, store, settings
) -> None:
    replica = inference()
    headers = tenants.alice.headers
    wonderful, terrible = predict(replica, headers, ["a wonderful film", "a terrible film"])
    response = replica.client.post(
        "/v1/feedback",
        json={"prediction_id": wonderful["prediction_id"], "label": "neg"},
        headers={**headers, "X-Request-ID": "trace-feedback-1"},
    )
    assert response.status_code == 200, response.get_json()
    result = response.get_json()
    assert result["predicted_label"] == "pos" and result["correct_label"] == "neg" and result["model_version"] == 4
    events = eventually(lambda: queued_events(settings.redis_url, "labeling"), what="the event on labeling's queue")
    (event,) = events
    assert event["type"] == "prediction.feedback" and event["event_id"] == result["event_id"]
    assert event["tenant"] == tenants.alice.tenant and event["trace_id"] == "trace-feedback-1"
    payload = event["payload"]
    assert payload["prediction_id"] == wonderful["prediction_id"]
    assert (payload["model_name"], payload["model_version"], payload["dataset_id"]) == ("reviews", 4, "ds_reviews")
    assert (payload["predicted_label"], payload["correct_label"]) == ("pos", "neg")
    assert payload["confidence"] == pytest.approx(wonderful["confidence"])
    reference = payload["input"]
    assert reference["bucket"] == "raw" and reference["key"].startswith(f"{tenants.alice.tenant}/predictions/")
    assert stored_input(store, reference) == b"a wonderful film"
    assert reference["sha256"] == hashlib.sha256(b"a wonderful film").hexdigest()

    with replica.runtime.db.session() as session:
        rows = {row.id: row for row in session.scalars(select(Prediction))}
    assert set(rows) == {wonderful["prediction_id"], terrible["prediction_id"]}
    other = rows[terrible["prediction_id"]]
    assert other.api == "predict" and other.input_kind == "text" and other.model_version == 4
    assert other.predicted_label == "neg" and other.latency_ms > 0 and other.outputs["probabilities"]["neg"] > 0.9
    assert rows[wonderful["prediction_id"]].feedback_label == "neg"


def test_feedback_is_tenant_scoped_validated_and_given_once(inference, reviews, tenants, settings) -> None:
    replica = inference(feedback_lookup_wait_s=0.3)
    headers = tenants.alice.headers
    (prediction,) = predict(replica, headers, ["wonderful"])
    prediction_id = prediction["prediction_id"]

    def give(label: str, as_headers=headers):
        return replica.client.post(
            "/v1/feedback", json={"prediction_id": prediction_id, "label": label}, headers=as_headers
        )

    assert give("neg", tenants.bob.headers).status_code == 404
    assert (
        replica.client.post(
            "/v1/feedback", json={"prediction_id": "prd_nothing", "label": "neg"}, headers=headers
        ).status_code
        == 404
    )
    unknown_label = give("meh")
    assert (
        unknown_label.status_code == 422
        and "not one of the model's labels" in unknown_label.get_json()["error"]["message"]
    )
    assert replica.client.post("/v1/feedback", json={"label": "neg"}, headers=headers).status_code == 422
    assert replica.client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": "neg"}).status_code == 401
    first = give("pos")
    assert first.status_code == 200 and first.get_json()["event_id"]
    again = give("pos")
    assert again.status_code == 200 and again.get_json()["event_id"] is None  # idempotent, no second event
    conflict = give("neg")
    assert conflict.status_code == 409 and conflict.get_json()["error"]["details"] == {"feedback_label": "pos"}
    assert len(queued_events(settings.redis_url, "labeling")) == 1


def test_v2_requests_are_sampled_into_the_log_and_take_no_feedback(inference, reviews, tenants, store) -> None:
    replica = inference(v2_log_sample_rate=1.0)
    headers = tenants.alice.headers
    ids = np.array([[101, 6919, 102]], dtype=np.int64)
    body = {
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": ids.tolist()},
            {"name": "attention_mask", "datatype": "INT64", "shape": [1, 3], "data": [[1, 1, 1]]},
        ]
    }
    assert replica.client.post("/v2/models/reviews/infer", json=body, headers=headers).status_code == 200

    def logged():
        with replica.runtime.db.session() as session:
            return session.scalars(select(Prediction).where(Prediction.api == "v2")).all()

    (row,) = eventually(logged, what="the sampled v2 request in the log")
    assert row.input_kind == "tensors" and row.outputs == {"labels": ["pos"]} and row.tenant == tenants.alice.tenant
    tensors = np.load(io.BytesIO(stored_input(store, row.input_ref())))
    assert tensors["input_ids"].tolist() == ids.tolist()
    refused = replica.client.post("/v1/feedback", json={"prediction_id": row.id, "label": "neg"}, headers=headers)
    assert refused.status_code == 409 and "raw tensor" in refused.get_json()["error"]["message"]
