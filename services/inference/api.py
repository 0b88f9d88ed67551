"""Inference's friendly API: predictions from raw texts or images, and feedback on them.

`POST /v1/models/{name}:predict` takes `{"texts": [...]}` or `{"images": ["<base64>", ...]}` as JSON, or image
files as multipart/form-data (any file fields, in order; `version` and `request_key` as form fields). It runs
the model's own preprocessing (its tokenizer; decode, resize, normalise), routes by the canary weights (sticky
per `request_key`), and answers each input's label, confidence and probabilities, the version that answered
and a `prediction_id`. Every prediction a partner makes here is logged with its input, so any of them can
receive `POST /v1/feedback` `{prediction_id, label}`, which emits `prediction.feedback` in the same
transaction. Another service may call predict for a tenant (the internal token and `X-Flywheel-Tenant`:
labeling's pre-labels); those predictions are neither logged nor given a `prediction_id`.
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Any

from flask import g, request
from flask_smorest import Blueprint
from marshmallow import ValidationError

from services.inference.batcher import Feeds
from services.inference.prediction_log import LoggedPrediction, new_prediction_id
from services.inference.preprocess import classify
from services.inference.repository import LoadedVersion, ServedModel
from services.inference.request_log import annotate, install_request_annotations
from services.inference.schemas import (
    FeedbackResultSchema,
    FeedbackSchema,
    PredictRequestSchema,
    PredictResponseSchema,
)
from services.inference.server import Inference, InferenceServer, current_server
from shared.auth import current_principal, require_partner, require_partner_or_delegated
from shared.errors import BadRequest, DomainError, Unprocessable

models = Blueprint("inference_models", __name__, url_prefix="/v1/models", description="Predictions")
feedback = Blueprint("inference_feedback", __name__, url_prefix="/v1/feedback", description="Feedback on predictions")
for _blueprint in (models, feedback):
    install_request_annotations(_blueprint)

_predict_schema = PredictRequestSchema()

PREDICT_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": PredictRequestSchema},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "version": {"type": "integer"},
                    "request_key": {"type": "string"},
                },
            }
        },
    },
}


def _read_request() -> dict[str, Any]:
    if request.mimetype == "multipart/form-data":
        files = [file.read() for field in request.files for file in request.files.getlist(field)]
        if not files:
            raise Unprocessable(
                "a multipart request needs at least one image file", {"fields": {"images": ["missing"]}}
            )
        form = {k: v for k, v in request.form.items() if k in ("version", "request_key")}
        body = _predict_schema.load({"images": ["-"] * len(files), **form})
        body["images"] = files
        return body
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise BadRequest("send a JSON object with 'texts' or 'images', or image files as multipart/form-data")
    body = _predict_schema.load(payload)
    if "images" in body:
        body["images"] = [_decode_base64(data, index) for index, data in enumerate(body["images"])]
    return body


def _decode_base64(data: str, index: int) -> bytes:
    if data.startswith("data:") and "," in data:  # a data URL: keep what follows the comma
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Unprocessable(
            f"image {index} is not valid base64", {"fields": {"images": {str(index): ["not base64"]}}}
        ) from exc


def _infer(server: InferenceServer, model: ServedModel) -> tuple[str, list[Any], Inference]:
    """Read the texts or images, run them through the model's own preprocessing, and infer."""
    body = _read_request()
    kind = "text" if "texts" in body else "image"
    inputs: list[Any] = body["texts"] if kind == "text" else body["images"]
    if len(inputs) > server.config.max_instances_per_request:
        raise Unprocessable(
            f"at most {server.config.max_instances_per_request} inputs per request",
            {"fields": {f"{kind}s": ["too many"]}},
        )

    def feeds(loaded: LoadedVersion) -> Feeds:
        if loaded.preprocessor.kind != kind:
            raise Unprocessable(
                f"model {model.name!r} takes {loaded.preprocessor.kind}s, not {kind}s",
                {"fields": {f"{kind}s": ["wrong kind"]}},
            )
        return loaded.preprocessor(inputs)

    result = server.infer(model, version=body["version"], request_key=body["request_key"], make_feeds=feeds)
    return kind, inputs, result


@models.post("/<name>:predict")
@require_partner_or_delegated
@models.doc(requestBody=PREDICT_BODY)
@models.response(200, PredictResponseSchema)
def predict(name: str) -> dict[str, Any]:
    """Labels and probabilities for raw texts or images, with the model's own preprocessing."""
    started = time.perf_counter()
    server = current_server()
    tenant = current_principal().tenant
    model = server.model(tenant, name)
    annotate(model=name)
    try:
        kind, inputs, result = _infer(server, model)
    except (DomainError, ValidationError) as exc:
        code = exc.code if isinstance(exc, DomainError) else "validation_failed"
        server.metrics.failures.labels(tenant, name, "predict", code).inc()
        raise
    loaded = result.version
    classifications = classify(result.outputs["logits"], loaded.labels)
    elapsed = time.perf_counter() - started
    # Another service acting for the tenant (labeling's pre-labels) predicts on inputs already in storage:
    # those predictions are not partner traffic, are not logged and take no feedback.
    delegated = current_principal().internal
    ids: list[str | None] = [None] * len(inputs)
    if not delegated:
        ids = [new_prediction_id() for _ in inputs]
        server.prediction_log.record(
            [
                LoggedPrediction(
                    id=prediction_id,
                    tenant=tenant,
                    model_name=name,
                    model_version=loaded.version,
                    dataset_id=model.dataset_id,
                    api="predict",
                    input_kind=kind,
                    input_bytes=item.encode("utf-8") if kind == "text" else item,
                    predicted_label=classification.label,
                    confidence=classification.confidence,
                    outputs={"probabilities": classification.probabilities},
                    latency_ms=round(elapsed * 1000, 3),
                    trace_id=g.get("trace_id", ""),
                )
                for prediction_id, item, classification in zip(ids, inputs, classifications, strict=True)
            ]
        )
    api = "delegated" if delegated else "predict"
    server.metrics.requests.labels(tenant, name, str(loaded.version), api, "ok").inc()
    server.metrics.latency.labels(tenant, name, api).observe(elapsed)
    annotate(model_version=loaded.version, rows=len(inputs))
    return {
        "model_name": name,
        "model_version": loaded.version,
        "predictions": [
            {
                "prediction_id": prediction_id,
                "label": classification.label,
                "confidence": classification.confidence,
                "probabilities": classification.probabilities,
            }
            for prediction_id, classification in zip(ids, classifications, strict=True)
        ],
    }


@feedback.post("")
@require_partner
@feedback.arguments(FeedbackSchema)
@feedback.response(200, FeedbackResultSchema)
def give_feedback(body: dict[str, Any]) -> dict[str, Any]:
    """The correct label for one of your predictions; emits `prediction.feedback` for labeling."""
    server = current_server()
    tenant = current_principal().tenant
    annotate(prediction_id=body["prediction_id"])
    return server.prediction_log.give_feedback(
        tenant,
        body["prediction_id"],
        body["label"],
        lambda model_name, version: server.known_labels(tenant, model_name, version),
    )
