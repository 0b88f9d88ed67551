"""The KServe / Triton v2 HTTP/REST inference protocol, complete enough for the standard clients unchanged.

- `GET /v2`, `/v2/health/live`, `/v2/health/ready` (no credentials: probes use them). Ready means the
  registry has answered once and every model it serves has had its first load attempt; a 4xx answers false.
- `GET /v2/models/{name}[/versions/{v}]`: metadata (versions, platform, inputs, outputs as the graph declares
  them, or as registered while no version is loaded under a memory budget), plus a `flywheel` block: which
  routing serves, which the registry wants, and every version's state (ready, loading, or failed with its
  reason; under a memory budget also unloaded, evicted or not requested yet, and why a ready one is loaded:
  pinned or recent).
- `GET /v2/models/{name}[/versions/{v}]/ready`, `GET /v2/models/{name}/config` (Triton's model configuration
  extension: batching, inputs, outputs).
- `POST /v2/models/{name}[/versions/{v}]/infer`: JSON tensors or the binary tensor data extension, gzip or
  deflate request bodies; without a version the request follows the canary routing (sticky with a request key
  in `parameters.request_key` or the `X-Request-Key` header).

Model routes need a partner key; the name is the caller's own model, and another tenant's model answers 404.
Errors answer `{"error": "<message>"}`, the protocol's shape, which the standard clients read.
"""

from __future__ import annotations

import gzip
import io
import random
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from flask import Blueprint as FlaskBlueprint
from flask import Response, g, jsonify, request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from services.inference import fair_use
from services.inference.batcher import Feeds
from services.inference.prediction_log import LoggedPrediction, new_prediction_id
from services.inference.preprocess import classify
from services.inference.repository import LoadedVersion, ServedModel
from services.inference.request_log import annotate, install_request_annotations
from services.inference.schemas import (
    V2ErrorSchema,
    V2InferRequestSchema,
    V2InferResponseSchema,
    V2LiveSchema,
    V2ModelConfigSchema,
    V2ModelMetadataSchema,
    V2ModelReadySchema,
    V2ReadySchema,
    V2ServerMetadataSchema,
)
from services.inference.server import UNAVAILABLE, InferenceServer, current_server
from services.inference.tensors import (
    HEADER_LENGTH,
    InferRequest,
    encode_infer_response,
    parse_infer_request,
    v2_datatype,
)
from shared.auth import Headers, Principal, current_principal, require_partner, requires_scope
from shared.errors import BadRequest, DomainError, NotFound, PayloadTooLarge
from shared.http import REQUEST_LINE_FIELDS, ProtocolBlueprint
from shared.logging import get_logger
from shared.ratelimit import TOO_MANY_REQUESTS

log = get_logger(__name__)

blp = ProtocolBlueprint(
    "v2",
    __name__,
    url_prefix="/v2",
    description="KServe / Triton v2 inference protocol",
    error_schema=V2ErrorSchema,
    error_description='An error, in the protocol\'s shape `{"error": "<message>"}`',
)
fallback = FlaskBlueprint("v2_fallback", __name__, url_prefix="/v2")
"""Answers unknown /v2 paths in the protocol's error shape (registered beside `blp`, outside the OpenAPI doc)."""

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]


def error_parts(error: Exception) -> tuple[int, str, dict[str, str]]:
    """An error's status, message and headers in the protocol's terms (an unexpected one is logged: a 500)."""
    if isinstance(error, DomainError):
        return error.status, error.message, error.headers()
    if isinstance(error, HTTPException):
        return error.code or 500, error.description or error.name, {}
    if isinstance(error, ValidationError):
        return 400, f"the request does not validate: {error.normalized_messages()}", {}
    log.exception("unhandled_error", error=repr(error))
    return 500, "an unexpected error occurred; it has been logged", {}


def v2_error(error: Exception) -> tuple[Response, int]:
    status, message, headers = error_parts(error)
    response = jsonify(error=message)
    response.headers.update(headers)
    return response, status


for _blueprint in (blp, fallback):
    _blueprint.register_error_handler(Exception, v2_error)
install_request_annotations(blp)


@fallback.route("/<path:rest>", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
def unknown(rest: str) -> Response:
    raise NotFound(f"no v2 endpoint at /v2/{rest}")


# -- server ---------------------------------------------------------------------------------------------------


@blp.get("")
@blp.alt_response(200, success=True, schema=V2ServerMetadataSchema, description="The server's metadata.")
def server_metadata() -> Response:
    from importlib.metadata import version

    return jsonify(name="flywheel-inference", version=version("onnxruntime-gpu"), extensions=EXTENSIONS)


@blp.get("/health/live")
@blp.alt_response(200, success=True, schema=V2LiveSchema, description="The process answers.")
def live() -> Response:
    return jsonify(live=True)


@blp.get("/health/ready")
@blp.alt_response(200, success=True, schema=V2ReadySchema, description="Every served model had its first load.")
@blp.alt_response(400, schema=V2ReadySchema, description="Not ready yet; `error` says why.")
def ready() -> tuple[Response, int]:
    repository = current_server().repository
    if repository.ready:
        return jsonify(ready=True), 200
    loading = [m.name for m in repository.models() if not m.first_attempt_done]
    reason = "the registry has not answered yet" if not repository.reconciled.is_set() else f"loading {loading}"
    return jsonify(ready=False, error=f"not ready: {reason}"), 400


# -- models ---------------------------------------------------------------------------------------------------


def _model(name: str) -> ServedModel:
    model = current_server().model(current_principal().tenant, name)
    annotate(model=name)
    return model


def _number(model: ServedModel, version: str) -> int:
    try:
        return int(version)
    except ValueError as exc:
        raise NotFound(f"version {version!r} of model {model.name!r} does not exist") from exc


def _pinned(model: ServedModel, version: str) -> int:
    """The version a request names: a loaded one, or (under a memory budget) one the model loads on demand."""
    number = _number(model, version)
    if not model.loads_on_demand(number):
        _version(model, version)
    return number


def _version(model: ServedModel, version: str) -> LoadedVersion:
    number = _number(model, version)
    loaded = model.state.versions.get(number)
    if loaded is None:
        failure = model.failures.get(number)
        detail = f": {failure.reason}: {failure.message}" if failure else ""
        raise NotFound(f"version {number} of model {model.name!r} is not loaded{detail}")
    return loaded


def _tensors(specs: list[Any]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": v2_datatype(s.dtype), "shape": list(s.shape)} for s in specs]


def _metadata(model: ServedModel, loaded: LoadedVersion | None) -> dict[str, Any]:
    state = model.state
    if loaded is None and state.routing is not None:
        loaded = state.versions.get(state.routing.version)
    if loaded is None and state.versions:
        loaded = next(iter(state.versions.values()))
    declared = model.declared() if loaded is None else {}  # not loaded (a memory budget): as registered
    body: dict[str, Any] = {
        "name": model.name,
        "versions": [str(v) for v in sorted({*state.versions, *(model.version_docs if model.on_demand else ())})],
        "platform": PLATFORM,
        "inputs": _tensors(loaded.inputs) if loaded else list(declared.get("inputs") or []),
        "outputs": _tensors(loaded.outputs) if loaded else list(declared.get("outputs") or []),
        "flywheel": {**model.describe(), "labels": loaded.labels if loaded else list(declared.get("labels") or [])},
    }
    if loaded is not None and loaded.tags is not None:  # a token model: the logits' last axis, in order
        body["flywheel"]["tags"] = loaded.tags
    return body


@blp.get("/models/<name>")
@blp.alt_response(200, success=True, schema=V2ModelMetadataSchema, description="The model's metadata.")
@require_partner
@requires_scope("predict")
def model_metadata(name: str) -> Response:
    return jsonify(_metadata(_model(name), None))


@blp.get("/models/<name>/versions/<version>")
@blp.alt_response(200, success=True, schema=V2ModelMetadataSchema, description="The version's metadata.")
@require_partner
@requires_scope("predict")
def version_metadata(name: str, version: str) -> Response:
    model = _model(name)
    loaded = _version(model, version)
    body = _metadata(model, loaded)
    body["versions"] = [str(loaded.version)]
    return jsonify(body)


@blp.get("/models/<name>/ready")
@blp.alt_response(200, success=True, schema=V2ModelReadySchema, description="A version serves the model.")
@blp.alt_response(400, schema=V2ModelReadySchema, description="No version is ready; `error` says why.")
@require_partner
@requires_scope("predict")
def model_ready(name: str) -> tuple[Response, int]:
    model = _model(name)
    if model.ready:
        return jsonify(name=name, ready=True), 200
    return jsonify(name=name, ready=False, error=f"model {name!r} has no version ready to serve"), 400


@blp.get("/models/<name>/versions/<version>/ready")
@blp.alt_response(200, success=True, schema=V2ModelReadySchema, description="The version is loaded.")
@blp.alt_response(400, schema=V2ModelReadySchema, description="The version is not loaded; `error` says why.")
@require_partner
@requires_scope("predict")
def version_ready(name: str, version: str) -> tuple[Response, int]:
    model = _model(name)
    try:
        _version(model, version)
    except NotFound as exc:
        return jsonify(name=name, version=version, ready=False, error=exc.message), 400
    return jsonify(name=name, version=version, ready=True), 200


@blp.get("/models/<name>/config")
@blp.alt_response(200, success=True, schema=V2ModelConfigSchema, description="Triton's model configuration.")
@require_partner
@requires_scope("predict")
def model_config(name: str) -> Response:
    model = _model(name)
    loaded = _metadata_version(model)
    if loaded is None:
        raise NotFound(f"model {name!r} has no version loaded")
    batching = loaded.batching

    def dims(specs: list[Any]) -> list[dict[str, Any]]:
        return [{"name": s.name, "data_type": f"TYPE_{v2_datatype(s.dtype)}", "dims": list(s.shape[1:])} for s in specs]

    return jsonify(
        name=name,
        platform=PLATFORM,
        backend="onnxruntime",
        version_policy={"specific": {"versions": sorted(model.state.versions)}},
        max_batch_size=batching.max_batch_size,
        input=dims(loaded.inputs),
        output=dims(loaded.outputs),
        dynamic_batching={
            "max_queue_delay_microseconds": batching.max_queue_delay_us,
            "default_queue_policy": {"max_queue_size": batching.max_queue_size},
        },
        instance_group=[{"count": 1, "kind": "KIND_GPU" if "CUDA" in loaded.provider else "KIND_CPU"}],
    )


def _metadata_version(model: ServedModel) -> LoadedVersion | None:
    state = model.state
    if state.routing is not None and state.routing.version in state.versions:
        return state.versions[state.routing.version]
    return next(iter(state.versions.values()), None)


# -- inference ------------------------------------------------------------------------------------------------


def decode_body(server: InferenceServer, data: bytes, headers: Headers) -> bytes:
    """The request's body as sent, or decompressed (gzip, deflate) within the request size limit."""
    encoding = (headers.get("Content-Encoding") or "").lower()
    if encoding in ("", "identity"):
        return data
    limit = server.runtime.settings.max_request_bytes
    try:
        if encoding == "gzip":
            stream = gzip.GzipFile(fileobj=io.BytesIO(data))
        elif encoding == "deflate":
            return _bounded(zlib.decompressobj().decompress(data, limit + 1), limit)
        else:
            raise BadRequest(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
        return _bounded(stream.read(limit + 1), limit)
    except (OSError, zlib.error, EOFError) as exc:
        raise BadRequest(f"the {encoding} body does not decompress: {exc}") from exc


def _bounded(data: bytes, limit: int) -> bytes:
    if len(data) > limit:
        raise PayloadTooLarge(f"the decompressed request is larger than {limit} bytes")
    return data


def check_inputs(loaded: LoadedVersion, inferred: InferRequest, max_rows: int) -> Feeds:
    """The request's tensors, checked against the graph: names, datatypes, ranks, fixed dims, one batch size."""
    expected = {spec.name: spec for spec in loaded.inputs}
    missing = sorted(set(expected) - set(inferred.inputs))
    unknown = sorted(set(inferred.inputs) - set(expected))
    if missing or unknown:
        raise BadRequest(
            f"model {loaded.model_name!r} takes inputs {sorted(expected)}; missing {missing}, unknown {unknown}"
        )
    batch_sizes = set()
    feeds: Feeds = {}
    for name, spec in expected.items():
        array = inferred.inputs[name]
        datatype = v2_datatype(spec.dtype)
        if inferred.datatypes[name] != datatype:
            raise BadRequest(f"input {name!r} must be {datatype}, got {inferred.datatypes[name]}")
        if array.ndim != len(spec.shape):
            raise BadRequest(f"input {name!r} must have shape {list(spec.shape)} (-1 = any), got {list(array.shape)}")
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if want >= 0 and want != got:
                raise BadRequest(
                    f"input {name!r} must have shape {list(spec.shape)} (-1 = any), got {list(array.shape)} "
                    f"(axis {axis})"
                )
        if 0 in array.shape:
            raise BadRequest(f"input {name!r} is empty: shape {list(array.shape)}")
        batch_sizes.add(array.shape[0])
        feeds[name] = np.ascontiguousarray(array, dtype=spec.dtype)
    if len(batch_sizes) != 1:
        raise BadRequest(f"all inputs must share the batch size (axis 0); got {sorted(batch_sizes)}")
    if next(iter(batch_sizes)) > max_rows:
        raise BadRequest(f"a request may carry at most {max_rows} rows")
    return feeds


def _infer(name: str, version: str | None) -> Response:
    body, headers = infer_tensors(
        current_server(),
        current_principal(),
        name,
        version,
        request.headers,
        lambda: request.get_data(cache=False),
        g.setdefault(REQUEST_LINE_FIELDS, {}),
        g.get("trace_id", ""),
    )
    return Response(body, status=200, headers=headers)


def infer_tensors(
    server: InferenceServer,
    principal: Principal,
    name: str,
    version: str | None,
    headers: Headers,
    read_body: Callable[[], bytes],
    line: dict[str, Any],
    trace_id: str,
) -> tuple[bytes, dict[str, str]]:
    """One inference request of an authorised principal: the answer's body and headers, or a raised error. The one
    request path of both v2 inference routes, Flask's and the plain WSGI one in front of it (`v2_wsgi`); `line`
    receives the request's facts for its `http_request` line."""
    started = time.perf_counter()
    tenant = principal.tenant
    model = server.model(tenant, name)
    line["model"] = name
    pinned = _pinned(model, version) if version is not None else None
    try:
        inferred = parse_infer_request(decode_body(server, read_body(), headers), headers.get(HEADER_LENGTH))
        rows = next(iter(inferred.inputs.values())).shape[0] if inferred.inputs else 1
        reservation = fair_use.of(server).admit(principal, int(rows))
        key = inferred.parameters.get("request_key") or headers.get("X-Request-Key")

        def feeds(loaded: LoadedVersion) -> Feeds:
            known = {spec.name for spec in loaded.outputs}
            for wanted in inferred.outputs or []:
                if wanted.name not in known:
                    raise BadRequest(f"model {name!r} has no output {wanted.name!r}; it has {sorted(known)}")
                if wanted.classification and loaded.tags is not None:
                    raise BadRequest(f"model {name!r} tags tokens: the classification extension needs a classifier")
            return check_inputs(loaded, inferred, server.config.max_instances_per_request)

        try:
            result = server.infer(model, version=pinned, request_key=str(key) if key else None, make_feeds=feeds)
        except DomainError:
            reservation.release()
            raise
    except DomainError as exc:
        server.metrics.failures.labels(tenant, name, "v2", exc.code).inc()
        raise
    loaded = result.version
    rows = next(iter(inferred.inputs.values())).shape[0]
    line.update(model_version=loaded.version, rows=rows)
    body, answer_headers = encode_infer_response(
        model_name=name, model_version=loaded.version, request=inferred, outputs=result.outputs, labels=loaded.labels
    )
    elapsed = time.perf_counter() - started
    server.metrics.answered(tenant, name, loaded.version, "v2", elapsed)
    if not principal.internal and server.config.metering:  # billable: counted in process, sent in batches
        server.usage.count(tenant, name, loaded.version, int(rows), elapsed)
    if random.random() < server.config.v2_log_sample_rate:  # noqa: S311 - sampling, not security
        _log_sample(server, model, loaded, inferred, result.outputs, elapsed, trace_id)
    return body, answer_headers


def _log_sample(
    server: InferenceServer,
    model: ServedModel,
    loaded: LoadedVersion,
    inferred: InferRequest,
    outputs: Feeds,
    elapsed: float,
    trace_id: str,
) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(array) for name, array in inferred.inputs.items()})
    summary: dict[str, Any] = {}
    logits = outputs.get("logits")
    if logits is not None and logits.ndim == 2 and logits.shape[1] == len(loaded.labels):
        summary = {"labels": [c.label for c in classify(logits, loaded.labels)]}
    server.prediction_log.record(
        [
            LoggedPrediction(
                id=new_prediction_id(),
                tenant=model.tenant,
                model_name=model.name,
                model_version=loaded.version,
                dataset_id=model.dataset_id,
                api="v2",
                input_kind="tensors",
                input_bytes=buffer.getvalue(),
                predicted_label=None,
                confidence=None,
                outputs=summary,
                latency_ms=round(elapsed * 1000, 3),
                trace_id=trace_id,
            )
        ]
    )


BINARY_BODY = {"type": "string", "format": "binary"}
INFER_DOC = {
    "requestBody": {
        "required": True,
        "description": "JSON tensors; with the binary tensor data extension, the JSON header is followed by the "
        "tensors' bytes and `Inference-Header-Content-Length` gives the header's length. gzip or deflate bodies "
        "are accepted (`Content-Encoding`).",
        "content": {
            "application/json": {"schema": V2InferRequestSchema},
            "application/octet-stream": {"schema": BINARY_BODY},
        },
    }
}
TOO_MANY_V2 = TOO_MANY_REQUESTS | {"schema": V2ErrorSchema}
UNAVAILABLE_V2 = UNAVAILABLE | {"schema": V2ErrorSchema}
"""The model cannot answer now (cold start, memory budget, full queue...), in the protocol's shape."""
"""A rate limit or a monthly quota (the message names the meter) refused the request, in the protocol's shape."""
INFERRED = "The outputs: JSON, or (binary outputs asked for) the JSON header followed by the outputs' bytes."
BINARY_HEADER = {
    "Inference-Header-Content-Length": {
        "description": "the length of the JSON header before the binary outputs (binary answers only)",
        "schema": {"type": "integer"},
    }
}


@blp.post("/models/<name>/infer")
@blp.doc(**INFER_DOC)
@blp.alt_response(200, success=True, schema=V2InferResponseSchema, description=INFERRED, headers=BINARY_HEADER)
@blp.alt_response(200, success=True, schema=BINARY_BODY, content_type="application/octet-stream", description=INFERRED)
@blp.alt_response(429, **TOO_MANY_V2)
@blp.alt_response(503, **UNAVAILABLE_V2)
@require_partner
@requires_scope("predict")
def infer(name: str) -> Response:
    return _infer(name, None)


@blp.post("/models/<name>/versions/<version>/infer")
@blp.doc(**INFER_DOC)
@blp.alt_response(200, success=True, schema=V2InferResponseSchema, description=INFERRED, headers=BINARY_HEADER)
@blp.alt_response(200, success=True, schema=BINARY_BODY, content_type="application/octet-stream", description=INFERRED)
@blp.alt_response(429, **TOO_MANY_V2)
@blp.alt_response(503, **UNAVAILABLE_V2)
@require_partner
@requires_scope("predict")
def infer_version(name: str, version: str) -> Response:
    return _infer(name, version)
