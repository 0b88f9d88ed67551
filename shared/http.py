"""The Flask side every service shares: app factory, JSON errors, request ids, health, readiness, metrics.

- `X-Request-ID` (or a new id) becomes the request's `trace_id`, is bound to every log line, travels in the
  envelopes of the events the request causes, and is echoed back in the response.
- One `http_request` line per request (not for probes and `/metrics`); a view adds its own facts to that line
  with `add_to_request_line` (a model, its version, rows), without binding them to the thread's log context.
- Every error leaves as `{"error": {"code", "message", "details"}}` with the right status: domain errors,
  marshmallow validation (422 with field paths), malformed JSON (400, a body nested too deeply to parse
  included), unknown routes (404), and anything
  unexpected (500, logged with its traceback, never leaking it).
- `/healthz` says the process is up; `/readyz` says whether its Redis, database and object store answer.
- `/openapi.json` is the service's OpenAPI document; `/metrics` is Prometheus text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from types import FunctionType
from typing import TYPE_CHECKING, Any

import structlog
from flask import Blueprint, Flask, Response, g, jsonify, request
from flask_smorest import Api
from flask_smorest import Blueprint as DocumentedBlueprint
from flask_smorest.utils import prepare_response
from marshmallow import ValidationError
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

from shared.db import DatabaseUnavailable
from shared.errors import DomainError, error_body
from shared.json_input import JSONProvider, nests_too_deeply
from shared.logging import TRACE_HEADER, DirectLine, get_logger, new_trace_id
from shared.schemas import ErrorSchema
from shared.storage import StorageError

if TYPE_CHECKING:
    from shared.runtime import Runtime

log = get_logger(__name__)
request_lines = DirectLine(__name__)
"""The one `http_request` line per request: the same line, without the standard library's record machinery."""

READINESS_TIMEOUT_SECONDS = 3.0
# The same codes the domain errors use, for errors raised by Flask/werkzeug themselves.
HTTP_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    413: "payload_too_large",
    429: "rate_limited",
}


class FlywheelApi(Api):
    """flask-smorest's Api, answering its own errors (422 from argument parsing included) in our shape, and
    documenting that shape (`ErrorSchema`) as every operation's default and error responses."""

    ERROR_SCHEMA = ErrorSchema

    def handle_http_exception(self, error: HTTPException) -> tuple[Response, int]:
        data = getattr(error, "data", None) or {}
        details: dict[str, Any] = {}
        if "messages" in data:
            details["fields"] = data["messages"]
        code = HTTP_ERROR_CODES.get(error.code or 500) or (error.name or "error").lower().replace(" ", "_")
        message = error.description or error.name
        if error.code == 422:
            message = "the request does not validate; see details.fields for each bad field"
            code = "validation_failed"
        headers = data.get("headers") or {}
        response = jsonify(error_body(code, message, details))
        response.headers.update(headers)
        return response, error.code or 500


class ProtocolBlueprint(DocumentedBlueprint):
    """A documented blueprint whose routes answer errors in another protocol's shape (KServe v2's
    `{"error": "..."}`): its operations document `error_schema` as their default response, not the envelope."""

    def __init__(self, *args: Any, error_schema: type, error_description: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._error_schema = error_schema
        self._error_description = error_description
        after = self._prepare_doc_cbks.index(self._prepare_response_doc) + 1
        self._prepare_doc_cbks.insert(after, self._document_protocol_errors)

    def _document_protocol_errors(self, doc: dict[str, Any], _info: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        api, spec = kwargs["api"], kwargs["spec"]
        response = {"description": self._error_description, "schema": self._error_schema}
        prepare_response(response, spec, api.DEFAULT_RESPONSE_CONTENT_TYPE)
        doc.setdefault("responses", {})["default"] = response
        for status in (403, "403"):  # the key-scope refusal (shared.auth) speaks this protocol here too
            if status in doc["responses"]:
                forbidden = {
                    "description": "The API key lacks the scope this endpoint needs.",
                    "schema": self._error_schema,
                }
                prepare_response(forbidden, spec, api.DEFAULT_RESPONSE_CONTENT_TYPE)
                doc["responses"][status] = forbidden
        return doc


class FlywheelFlask(Flask):
    """Flask with `shared.json_input`'s JSON provider (a too-deep body is malformed JSON, not a RecursionError),
    remembering `ensure_sync` per function. Flask (and flask-smorest's response decorators) ask it for
    every hook and view of every request, and each answer costs an `inspect.iscoroutinefunction`; whether a
    plain function is a coroutine function never changes. Bound methods (a class-based view's, made anew per
    request) are not remembered, so the table holds the app's own functions only."""

    json_provider_class = JSONProvider

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync: dict[Callable[..., Any], Callable[..., Any]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        found = self._sync.get(func)
        if found is None:
            found = super().ensure_sync(func)
            if type(func) is FunctionType:
                self._sync[func] = found
        return found


class BoundedIntConverter(IntegerConverter):
    """`<int:...>` path segments beyond a 64-bit integer match no route (404) instead of overflowing the DB."""

    def __init__(self, url_map: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max", 2**63 - 1)
        super().__init__(url_map, *args, **kwargs)


def create_flask_app(runtime: Runtime, title: str, blueprints: list[Any]) -> Flask:
    settings = runtime.settings
    app = FlywheelFlask(runtime.service)
    app.url_map.converters["int"] = BoundedIntConverter
    app.config.update(
        API_TITLE=title,
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        JSON_SORT_KEYS=False,
    )
    app.extensions["flywheel"] = runtime
    api = FlywheelApi(
        app,
        spec_kwargs={
            "components": {
                "securitySchemes": {
                    "bearer": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "A partner API key, or the internal token for operator actions.",
                    }
                }
            },
            "security": [{"bearer": []}],
        },
    )
    app.extensions["flywheel_api"] = api
    for blueprint in blueprints:
        api.register_blueprint(blueprint)
    app.register_blueprint(_operations_blueprint(runtime))
    _install_request_hooks(app, runtime)
    _install_error_handlers(app)
    return app


UNLOGGED_ENDPOINTS = frozenset({"/healthz", "/readyz", "/metrics"})
REQUEST_LINE_FIELDS = "request_line_fields"


def add_to_request_line(**fields: Any) -> None:
    """Facts of this request for its one `http_request` line (a model, its version, rows). They go on that line
    only: lines logged during the request carry the bound context (trace_id, tenant), not these."""
    request_line().update(fields)


def request_line() -> dict[str, Any]:
    """The current Flask request's fields for its `http_request` line, to add to in place."""
    return g.setdefault(REQUEST_LINE_FIELDS, {})


class RequestRecorder:
    """What every request leaves behind, the same whichever path served it (Flask's hooks, or inference's plain
    WSGI route for v2 inference): its trace id bound to the log context, its series in the request metrics, and
    its one `http_request` line. One per app, in `app.extensions["flywheel_requests"]`."""

    def __init__(self, runtime: Runtime) -> None:
        self.service = runtime.service
        self.requests_total = Counter(
            "flywheel_http_requests_total",
            "HTTP requests by endpoint and status",
            ["service", "method", "endpoint", "status"],
            registry=runtime.metrics,
        )
        self.latency = Histogram(
            "flywheel_http_request_seconds",
            "HTTP request latency by endpoint",
            ["service", "method", "endpoint"],
            registry=runtime.metrics,
        )
        # The series of each (method, endpoint, status), looked up once: `.labels()` validates and locks per
        # call. Endpoints are the app's routes (or "unmatched"), so the dict stays as small as the metric's own.
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def begin(self, presented: str | None) -> tuple[str, dict[str, Any]]:
        """The request's trace id (the caller's `X-Request-ID` when it is printable, else a new one), bound to the
        log context; the tokens `end` restores it with."""
        presented = (presented or "").strip()
        trace_id = presented[:128] if presented and presented.isprintable() else new_trace_id()
        return trace_id, structlog.contextvars.bind_contextvars(trace_id=trace_id, service=self.service)

    def end(self, tokens: dict[str, Any]) -> None:
        structlog.contextvars.reset_contextvars(**tokens)

    def record(
        self, method: str, endpoint: str, path: str, status: int, elapsed: float, fields: dict[str, Any] | None
    ) -> None:
        """The request's metrics and (unless a probe or `/metrics`) its `http_request` line."""
        key = (method, endpoint, status)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = (
                self.requests_total.labels(self.service, method, endpoint, status),
                self.latency.labels(self.service, method, endpoint),
            )
        found[0].inc()
        found[1].observe(elapsed)
        if endpoint not in UNLOGGED_ENDPOINTS:
            line = {**fields} if fields else {}
            line.update(method=method, path=path, status=status, duration_ms=round(elapsed * 1000, 2))
            request_lines.info("http_request", **line)


def _install_request_hooks(app: Flask, runtime: Runtime) -> None:
    recorder = app.extensions["flywheel_requests"] = RequestRecorder(runtime)

    @app.before_request
    def _start() -> None:
        state = g._get_current_object()  # one context lookup per hook, not one per attribute
        state.trace_id, state.log_tokens = recorder.begin(request.headers.get(TRACE_HEADER))
        state.started = time.perf_counter()

    @app.after_request
    def _finish(response: Response) -> Response:
        state, current = g._get_current_object(), request._get_current_object()
        response.headers[TRACE_HEADER] = state.get("trace_id", "")
        elapsed = time.perf_counter() - state.get("started", time.perf_counter())
        rule = current.url_rule
        endpoint = rule.rule if rule is not None else "unmatched"
        recorder.record(
            current.method, endpoint, current.path, response.status_code, elapsed, state.get(REQUEST_LINE_FIELDS)
        )
        return response

    @app.teardown_request
    def _unbind(_exc: BaseException | None) -> None:
        tokens = g.pop("log_tokens", None)
        if tokens is not None:
            recorder.end(tokens)


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(DomainError)
    def _domain(error: DomainError) -> tuple[Response, int]:
        response = jsonify(error_body(error.code, error.message, error.details))
        response.headers.update(error.headers())
        return response, error.status

    @app.errorhandler(ValidationError)
    def _validation(error: ValidationError) -> tuple[Response, int]:
        message = "the request does not validate; see details.fields for each bad field"
        return jsonify(error_body("validation_failed", message, {"fields": error.normalized_messages()})), 422

    @app.errorhandler(OverflowError)
    def _overflow(_error: OverflowError) -> tuple[Response, int]:
        return jsonify(error_body("validation_failed", "a number in the request is out of range")), 422

    @app.errorhandler(DatabaseUnavailable)
    @app.errorhandler(OperationalError)
    @app.errorhandler(PoolTimeout)
    def _database(error: Exception) -> tuple[Response, int]:
        log.error("database_unavailable", error=str(error)[:500])
        response = jsonify(error_body("database_unavailable", "the database is unavailable; retry shortly"))
        response.headers["Retry-After"] = "5"
        return response, 503

    @app.errorhandler(StorageError)
    def _storage(error: StorageError) -> tuple[Response, int]:
        log.error("storage_unavailable", error=str(error)[:500])
        response = jsonify(error_body("storage_unavailable", "object storage is unavailable; retry shortly"))
        response.headers["Retry-After"] = "5"
        return response, 503

    @app.errorhandler(DataError)
    def _unstorable(error: DataError) -> tuple[Response, int]:
        # PostgreSQL text cannot hold NUL: a request's string that no validator looked at reaches the insert.
        # The transaction rolled back, so nothing was written; the client sent what no column can store.
        if "NUL" in str(error.orig):
            message = "a text in the request contains a NUL character (\\u0000), which cannot be stored"
            return jsonify(error_body("validation_failed", message, {"fields": {}})), 422
        return _unexpected(error)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> tuple[Response, int]:
        if isinstance(error, HTTPException):
            return app.extensions["flywheel_api"].handle_http_exception(error)
        log.exception("unhandled_error", error=repr(error))
        return jsonify(error_body("internal", "an unexpected error occurred; it has been logged")), 500

    @app.errorhandler(RecursionError)
    def _too_deep(error: RecursionError) -> tuple[Response, int]:
        # Request arguments parsed by flask-smorest (webargs) go through the standard library's json, not the
        # app's provider: a body nested deeper than the parser can follow surfaces here. Only that is the client's
        # error; any other RecursionError is a bug.
        if request.is_json and nests_too_deeply(request.get_data(cache=True)):
            message = "the request is not valid JSON: nested too deeply to parse"
            return jsonify(error_body("bad_request", message)), 400
        return _unexpected(error)


def _operations_blueprint(runtime: Runtime) -> Blueprint:
    ops = Blueprint("operations", __name__)
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix=f"{runtime.service}-readyz")

    @ops.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok", service=runtime.service)

    @ops.get("/readyz")
    def readyz() -> tuple[Response, int]:
        checks = run_checks(pool, runtime.readiness_checks())
        failing = {name: result for name, result in checks.items() if result != "ok"}
        if failing:
            names = ", ".join(sorted(failing))
            body = error_body("not_ready", f"{runtime.service} is not ready: {names} unavailable", {"checks": checks})
            return jsonify(body), 503
        return jsonify(status="ready", service=runtime.service, checks=checks), 200

    @ops.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(runtime.metrics), mimetype=CONTENT_TYPE_LATEST)

    return ops


def run_checks(pool: ThreadPoolExecutor, checks: dict[str, Callable[[], None]]) -> dict[str, str]:
    """Run dependency checks concurrently, each bounded in time, as {name: "ok" | "error: ..."}."""
    futures = {name: pool.submit(check) for name, check in checks.items()}
    results: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=READINESS_TIMEOUT_SECONDS)
            results[name] = "ok"
        except FutureTimeout:
            results[name] = f"error: no answer within {READINESS_TIMEOUT_SECONDS:.0f}s"
        except Exception as exc:
            results[name] = f"error: {exc.__class__.__name__}: {str(exc)[:200]}"
    return results
