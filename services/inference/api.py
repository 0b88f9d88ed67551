"""Inference's friendly API: predictions from raw texts or images, and feedback on them.

`POST /v1/models/{name}:predict` takes `{"texts": [...]}` or `{"images": ["<base64>", ...]}` as JSON, or image
files as multipart/form-data (any file fields, in order; `version` and `request_key` as form fields). It runs
the model's own preprocessing (its tokenizer; decode, resize, normalise), routes by the canary weights (sticky
per `request_key`), and answers each input's label, confidence and probabilities, the version that answered
and a `prediction_id`. A token-classification model answers each text's entities instead (`{start, end, label,
score, text}`, offsets in Unicode code points of the text sent, decoded by the package's rule in
`shared.entities`). Every prediction a partner makes here is logged with its input (a token model's with its
entities), so any of them can receive `POST /v1/feedback`: `{prediction_id, label}` for a classifier's,
`{prediction_id, spans: [{start, end, label}, ...]}` (offsets of the text sent; `[]`: no entity) for a token
model's, which emits `prediction.feedback` in the same transaction. Another service may call
predict for a tenant (the internal token and `X-Flywheel-Tenant`: labeling's pre-labels); those predictions are
neither logged nor given a `prediction_id`. Such a caller may name the tenant's stored items instead of sending
them, `{"references": [{bucket, key, sha256, offset, length}, ...]}`: inference reads them from object storage
(the tenant's own prefix only) and checks each sha256, so items travel as references, not as re-encoded bytes.
"""

from __future__ import annotations

import base64
import binascii
import random
import time
from collections.abc import Callable
from typing import Any

from flask import g, request
from flask_smorest import Blueprint
from marshmallow import ValidationError

from services.inference import fair_use
from services.inference.prediction_log import RequestRecord, new_prediction_ids
from services.inference.preprocess import as_model_inputs, classify, entities, read_stored_inputs
from services.inference.repository import LoadedVersion, ServedModel
from services.inference.request_log import annotate, install_request_annotations
from services.inference.schemas import (
    INPUT_KINDS,
    FeedbackResultSchema,
    FeedbackSchema,
    PredictRequestSchema,
    PredictResponseSchema,
)
from services.inference.server import UNAVAILABLE, Inference, InferenceServer, ModelInputs, RawInputs, current_server
from services.inference.traffic import ShadowJob
from shared.auth import Principal, current_principal, require_partner, require_partner_or_delegated, requires_scope
from shared.errors import BadRequest, DomainError, Forbidden, Unprocessable
from shared.http import request_line
from shared.ratelimit import TOO_MANY_REQUESTS

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
                    "subject_id": {"type": "string", "description": "the data subject of these inputs"},
                },
            }
        },
    },
}


def _read_request() -> dict[str, Any]:
    """The current Flask request's body: image files as multipart/form-data, or a JSON object."""
    if request.mimetype == "multipart/form-data":
        files = [file.read() for field in request.files for file in request.files.getlist(field)]
        if not files:
            raise Unprocessable(
                "a multipart request needs at least one image file", {"fields": {"images": ["missing"]}}
            )
        form = {k: v for k, v in request.form.items() if k in ("version", "request_key", "subject_id")}
        body = _predict_schema.load({"images": ["-"] * len(files), **form})
        body["images"] = files
        return body
    return json_body(request.get_json(silent=True))


def json_body(payload: Any) -> dict[str, Any]:
    """A JSON request's parsed body (None: none, or not JSON), validated, its base64 images decoded."""
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


def _infer(
    server: InferenceServer,
    principal: Principal,
    model: ServedModel,
    read_body: Callable[[], dict[str, Any]],
    built: dict[str, Any],
) -> tuple[str, list[Any], Inference]:
    """Read the texts, images or stored inputs, run them through the model's own preprocessing, and infer
    (`built` receives the feeds, for the input statistics, and the request's data subject)."""
    body = read_body()
    built["subject_id"] = body["subject_id"]  # kept on the logged predictions, for erasure
    field = next(kind for kind in INPUT_KINDS if kind in body)
    if len(body[field]) > server.config.max_instances_per_request:
        raise Unprocessable(
            f"at most {server.config.max_instances_per_request} inputs per request", {"fields": {field: ["too many"]}}
        )
    if field == "references":
        return _infer_stored(server, principal, model, body, built)
    kind = field.removesuffix("s")
    inputs: list[Any] = body[field]

    def feeds(loaded: LoadedVersion) -> ModelInputs:
        if loaded.preprocessor.kind != kind:
            raise Unprocessable(
                f"model {model.name!r} takes {loaded.preprocessor.kind}s, not {kind}s",
                {"fields": {field: ["wrong kind"]}},
            )
        return _model_inputs(loaded, inputs, built)

    result = server.infer(model, version=body["version"], request_key=body["request_key"], make_feeds=feeds)
    return kind, inputs, _kept(result, built)


def _model_inputs(loaded: LoadedVersion, inputs: list[Any], built: dict[str, Any]) -> ModelInputs:
    """A text model's texts go to its batcher as sent, to be tokenized with the other texts of their batch in one
    call; images are decoded and normalised here, on the request's own thread. `built` keeps the texts (a token
    model decodes its entities from them) or the image feeds (for the input statistics)."""
    if loaded.preprocessor.kind == "text":
        built["texts"] = inputs
        return RawInputs(inputs, loaded.preprocessor.prepare)
    built["feeds"] = loaded.preprocessor(inputs)
    return built["feeds"]


def _kept(result: Inference, built: dict[str, Any]) -> Inference:
    """Keep what the batcher prepared for this request in `built`: its feeds, and each text's words (a token model)."""
    if result.feeds is not None:
        built["feeds"], built["words"] = result.feeds, result.extras
    return result


def _infer_stored(
    server: InferenceServer, principal: Principal, model: ServedModel, body: dict[str, Any], built: dict[str, Any]
) -> tuple[str, list[Any], Inference]:
    """Inputs named by reference, for a service acting for the tenant: read, checked, taken as the model's kind."""
    if not principal.internal:
        raise Forbidden("references to stored inputs are for services acting for a tenant; send texts or images")
    contents = read_stored_inputs(
        server.runtime.storage, principal.tenant, body["references"], server.runtime.settings.max_request_bytes
    )

    def feeds(loaded: LoadedVersion) -> ModelInputs:
        return _model_inputs(loaded, as_model_inputs(contents, loaded.preprocessor.kind), built)

    result = server.infer(model, version=body["version"], request_key=body["request_key"], make_feeds=feeds)
    return result.version.preprocessor.kind, contents, _kept(result, built)


@models.post("/<name>:predict")
@require_partner_or_delegated
@requires_scope("predict")
@models.doc(requestBody=PREDICT_BODY)
@models.response(200, PredictResponseSchema)
@models.alt_response(429, **TOO_MANY_REQUESTS)
@models.alt_response(503, **UNAVAILABLE)
def predict(name: str) -> dict[str, Any]:
    """Labels and probabilities for raw texts or images, with the model's own preprocessing."""
    return predict_for(
        current_server(),
        current_principal(),
        name,
        fair_use.requested_rows,
        _read_request,
        request_line(),
        g.get("trace_id", ""),
    )


def predict_for(
    server: InferenceServer,
    principal: Principal,
    name: str,
    rows: Callable[[], int],
    read_body: Callable[[], dict[str, Any]],
    line: dict[str, Any],
    trace_id: str,
) -> dict[str, Any]:
    """One `:predict` request of an authorised principal: the answer (before `PredictResponseSchema` dumps it), or a
    raised error. The one request path of Flask's view and of the plain WSGI route in front of it (`predict_wsgi`):
    `rows` counts the inputs asked for (fair use takes them before the body is validated), `read_body` gives the
    validated body, and `line` receives the request's facts for its `http_request` line."""
    started = time.perf_counter()
    tenant = principal.tenant
    model = server.model(tenant, name)
    line["model"] = name
    built: dict[str, Any] = {}
    reservation = fair_use.of(server).admit(principal, rows())
    try:
        kind, inputs, result = _infer(server, principal, model, read_body, built)
    except (DomainError, ValidationError) as exc:
        reservation.release()
        code = exc.code if isinstance(exc, DomainError) else "validation_failed"
        server.metrics.failures.labels(tenant, name, "predict", code).inc()
        raise
    loaded = result.version
    token = loaded.tags is not None
    if token:
        answers: list[Any] = entities(built["texts"], built["words"], result.outputs["logits"], loaded.tags or [])
    else:
        answers = classify(result.outputs["logits"], loaded.labels)
    elapsed = time.perf_counter() - started
    # Another service acting for the tenant (labeling's pre-labels) predicts on inputs already in storage:
    # those predictions are not partner traffic, are not logged and take no feedback.
    delegated = principal.internal
    ids: list[str | None] = [None] * len(inputs)
    if not delegated and server.config.log_predictions:
        # The request's share of logging and sampling: ids, a cached policy and one append of references
        # (`RequestRecord`); rows, input statistics, redaction and the sampling draw are made on the log's writer
        # thread. A token model's entities are logged the same way (never sampled, never shadowed).
        ids = new_prediction_ids(len(inputs))
        policy = server.monitor.policy(tenant, name)
        server.prediction_log.record_request(
            RequestRecord(
                ids,
                tenant,
                name,
                loaded.version,
                model.dataset_id,
                kind,
                inputs,
                answers,
                round(elapsed * 1000, 3),
                trace_id,
                time.time(),
                loaded.preprocessor,
                built.get("feeds"),
                policy["sample_rate"],
                len(loaded.labels),
                built.get("subject_id"),
                token,
            )
        )
        if not token:
            _mirror(server, model, loaded.version, policy, inputs, ids)
    if not delegated and server.config.metering:  # billable partner traffic: counted in process, sent in batches
        server.usage.count(tenant, name, loaded.version, len(inputs), elapsed)
    api = "delegated" if delegated else "predict"
    server.metrics.requests.labels(tenant, name, str(loaded.version), api, "ok").inc()
    server.metrics.latency.labels(tenant, name, api).observe(elapsed)
    line.update(model_version=loaded.version, rows=len(inputs))
    if token:
        predictions = [
            {"prediction_id": prediction_id, "entities": text_entities}
            for prediction_id, text_entities in zip(ids, answers, strict=True)
        ]
    else:
        predictions = [
            {
                "prediction_id": prediction_id,
                "label": classification.label,
                "confidence": classification.confidence,
                "probabilities": classification.probabilities,
            }
            for prediction_id, classification in zip(ids, answers, strict=True)
        ]
    return {"model_name": name, "model_version": loaded.version, "predictions": predictions}


def _mirror(
    server: InferenceServer, model: ServedModel, served: int, policy: dict[str, Any], inputs: list[Any], ids: list
) -> None:
    """Hand a sampled share of requests to the shadow version, if the policy names one other than the answer's."""
    version = policy.get("shadow_version")
    if version is None or version == served or random.random() >= policy["shadow_rate"]:  # noqa: S311
        return
    server.shadow.offer(ShadowJob(model=model, version=version, inputs=list(inputs), prediction_ids=list(ids)))


@feedback.post("")
@require_partner
@requires_scope("predict")
@feedback.arguments(FeedbackSchema)
@feedback.response(200, FeedbackResultSchema)
def give_feedback(body: dict[str, Any]) -> dict[str, Any]:
    """The correct answer for one of your predictions: a classifier's `label`, or a token model's entity `spans`;
    emits `prediction.feedback` for labeling."""
    server = current_server()
    tenant = current_principal().tenant
    annotate(prediction_id=body["prediction_id"])
    return server.prediction_log.give_feedback(
        tenant,
        body["prediction_id"],
        lambda model_name, version: server.known_labels(tenant, model_name, version),
        label=body.get("label"),
        spans=body.get("spans"),
    )
