"""The friendly API: raw texts and images in, the model's own preprocessing, labels and probabilities out."""

from __future__ import annotations

import base64
import hashlib
import io

import pytest
from sqlalchemy import select

from services.inference.models import Prediction
from tests.conftest import INTERNAL_TOKEN
from tests.inference.support import metric_samples, png, serving_document, upload_version

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def text_model(store, registry, tenants, model_folders):
    folder = model_folders["text"]
    version = upload_version(store, tenants.alice.tenant, folder, 1)
    registry.serve(serving_document(tenants.alice.tenant, folder, {1: version}, production=1))
    return "reviews"


@pytest.fixture
def image_model(store, registry, tenants, model_folders):
    folder = model_folders["image"]
    version = upload_version(store, tenants.alice.tenant, folder, 3)
    registry.serve(serving_document(tenants.alice.tenant, folder, {3: version}, production=3))
    return "colours"


def test_texts_go_through_the_models_own_tokenizer(inference, tenants, text_model) -> None:
    replica = inference()
    response = replica.client.post(
        "/v1/models/reviews:predict",
        json={"texts": ["A WONDERFUL film", "a terrible, terrible film", "an ordinary film"]},
        headers=tenants.alice.headers,
    )
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["model_name"] == "reviews" and body["model_version"] == 1
    wonderful, terrible, ordinary = body["predictions"]
    assert wonderful["label"] == "pos" and wonderful["confidence"] > 0.95  # lower-cased, then tokenized
    assert terrible["label"] == "neg" and terrible["probabilities"]["neg"] > 0.99
    assert ordinary["probabilities"] == {"neg": 0.5, "pos": 0.5}  # no known token: logits (0, 0)
    assert len({p["prediction_id"] for p in body["predictions"]}) == 3
    assert all(p["prediction_id"].startswith("prd_") for p in body["predictions"])


def test_images_as_base64_and_as_multipart_are_decoded_resized_and_normalised(
    inference, tenants, image_model, store
) -> None:
    replica = inference()
    red, blue = png((255, 0, 0)), png((0, 0, 255), size=64)
    as_json = replica.client.post(
        "/v1/models/colours:predict",
        json={"images": [base64.b64encode(red).decode(), "data:image/png;base64," + base64.b64encode(blue).decode()]},
        headers=tenants.alice.headers,
    )
    assert as_json.status_code == 200, as_json.get_json()
    assert [p["label"] for p in as_json.get_json()["predictions"]] == ["red", "blue"]
    # red normalises to (1, -1, -1): logits (1, -1)
    assert as_json.get_json()["predictions"][0]["probabilities"]["red"] == pytest.approx(0.8808, abs=1e-3)

    multipart = replica.client.post(
        "/v1/models/colours:predict",
        data={"images": [(io.BytesIO(blue), "blue.png"), (io.BytesIO(red), "red.png")], "request_key": "k1"},
        headers=tenants.alice.headers,
        content_type="multipart/form-data",
    )
    assert multipart.status_code == 200, multipart.get_json()
    assert [p["label"] for p in multipart.get_json()["predictions"]] == ["blue", "red"]
    assert multipart.get_json()["model_version"] == 3

    # Every prediction of this API is logged with its input, the image's bytes as they were sent.
    replica.server.prediction_log.flush()
    blue_id = multipart.get_json()["predictions"][0]["prediction_id"]
    with replica.runtime.db.session() as session:
        row = session.get(Prediction, blue_id)
    assert row.input_kind == "image" and row.predicted_label == "blue" and row.tenant == tenants.alice.tenant
    stored = store.get_bytes(row.input_bucket, row.input_key)[row.input_offset : row.input_offset + row.input_length]
    assert stored == blue and row.input_sha256 == hashlib.sha256(blue).hexdigest()


def test_bad_inputs_get_clear_4xx(inference, tenants, image_model) -> None:
    replica = inference()
    headers = tenants.alice.headers
    not_image = replica.client.post(
        "/v1/models/colours:predict", json={"images": [base64.b64encode(b"not an image").decode()]}, headers=headers
    )
    assert not_image.status_code == 422
    assert "could not be decoded" in not_image.get_json()["error"]["message"]
    not_base64 = replica.client.post("/v1/models/colours:predict", json={"images": ["%%%"]}, headers=headers)
    assert not_base64.status_code == 422
    wrong_kind = replica.client.post("/v1/models/colours:predict", json={"texts": ["hello"]}, headers=headers)
    assert wrong_kind.status_code == 422 and "takes images" in wrong_kind.get_json()["error"]["message"]
    both = replica.client.post("/v1/models/colours:predict", json={"texts": ["a"], "images": ["b"]}, headers=headers)
    assert both.status_code == 422 and both.get_json()["error"]["code"] == "validation_failed"
    too_many = replica.client.post(
        "/v1/models/colours:predict", json={"images": [base64.b64encode(png((1, 2, 3))).decode()] * 65}, headers=headers
    )
    assert too_many.status_code == 422
    not_json = replica.client.post("/v1/models/colours:predict", data="x", headers=headers)
    assert not_json.status_code == 400
    pinned_missing = replica.client.post(
        "/v1/models/colours:predict",
        json={"images": [base64.b64encode(png((0, 0, 0))).decode()], "version": 9},
        headers=headers,
    )
    assert pinned_missing.status_code == 404


def test_another_tenants_model_answers_404_and_keys_are_required(inference, tenants, text_model) -> None:
    replica = inference()
    body = {"texts": ["wonderful"]}
    assert replica.client.post("/v1/models/reviews:predict", json=body).status_code == 401
    assert (
        replica.client.post(
            "/v1/models/reviews:predict", json=body, headers={"Authorization": "Bearer fwk_nope"}
        ).status_code
        == 401
    )
    as_bob = replica.client.post("/v1/models/reviews:predict", json=body, headers=tenants.bob.headers)
    assert as_bob.status_code == 404
    assert as_bob.get_json()["error"]["code"] == "not_found"
    assert replica.client.get("/v2/models/reviews", headers=tenants.bob.headers).status_code == 404
    unknown = replica.client.post("/v1/models/nothing:predict", json=body, headers=tenants.alice.headers)
    assert unknown.status_code == 404
    assert (
        replica.client.post("/v1/models/reviews:predict", json=body, headers=tenants.alice.headers).status_code == 200
    )


def test_metrics_and_one_log_line_per_request_with_trace_id(inference, tenants, text_model, logs) -> None:
    replica = inference()
    response = replica.client.post(
        "/v1/models/reviews:predict",
        json={"texts": ["wonderful", "terrible"]},
        headers={**tenants.alice.headers, "X-Request-ID": "trace-inference-1"},
    )
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "trace-inference-1"
    lines = logs.find(event="http_request", trace_id="trace-inference-1", service="inference")
    assert len(lines) == 1
    assert lines[0]["model"] == "reviews" and lines[0]["model_version"] == 1 and lines[0]["rows"] == 2
    assert lines[0]["tenant"] == tenants.alice.tenant and lines[0]["status"] == 200
    later = replica.client.get("/v2/health/live", headers={"X-Request-ID": "trace-inference-2"})
    assert later.status_code == 200
    assert "model" not in logs.find(event="http_request", trace_id="trace-inference-2")[0]  # nothing leaks

    metrics = replica.client.get("/metrics").get_data(as_text=True)
    requests = metric_samples(metrics, "flywheel_inference_requests_total")
    assert (
        {"tenant": tenants.alice.tenant, "model": "reviews", "version": "1", "api": "predict", "outcome": "ok"},
        1.0,
    ) in requests
    loaded = metric_samples(metrics, "flywheel_inference_loaded_versions")
    assert ({"tenant": tenants.alice.tenant, "model": "reviews", "version": "1", "role": "serving"}, 1.0) in loaded
    for name in (
        "flywheel_inference_request_seconds_count",
        "flywheel_inference_queue_seconds_count",
        "flywheel_inference_compute_seconds_count",
        "flywheel_inference_batch_size_count",
    ):
        assert sum(value for _, value in metric_samples(metrics, name)) >= 1, name


def test_a_service_acting_for_a_tenant_gets_predictions_that_are_not_logged(inference, tenants, text_model) -> None:
    """Labeling asks for pre-labels with the internal token and X-Flywheel-Tenant, as in services/labeling."""
    replica = inference()
    as_labeling = {"Authorization": f"Bearer {INTERNAL_TOKEN}", "X-Flywheel-Tenant": tenants.alice.tenant}
    response = replica.client.post("/v1/models/reviews:predict", json={"texts": ["wonderful"]}, headers=as_labeling)
    assert response.status_code == 200, response.get_json()
    (prediction,) = response.get_json()["predictions"]
    assert prediction["label"] == "pos" and prediction["prediction_id"] is None
    for_bob = {**as_labeling, "X-Flywheel-Tenant": tenants.bob.tenant}
    assert replica.client.post("/v1/models/reviews:predict", json={"texts": ["x"]}, headers=for_bob).status_code == 404
    without_tenant = {"Authorization": f"Bearer {INTERNAL_TOKEN}"}
    assert (
        replica.client.post("/v1/models/reviews:predict", json={"texts": ["x"]}, headers=without_tenant).status_code
        == 401
    )
    assert replica.client.get("/v2/models/reviews", headers=as_labeling).status_code == 401  # v2: partner keys only
    replica.server.prediction_log.flush()
    with replica.runtime.db.session() as session:
        assert session.scalars(select(Prediction)).all() == []
