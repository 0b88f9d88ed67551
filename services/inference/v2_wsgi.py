"""v2 inference as a plain WSGI route in front of Flask: the same request, answered at a fraction of the cost.

`POST /v2/models/{name}/infer` and `POST /v2/models/{name}/versions/{v}/infer` carry nearly all of a serving
replica's traffic, and a small tensor's request spent most of its CPU in the web framework around the model:
Flask's request and app contexts, URL matching, its hooks, the response object, and flask-smorest's wrappers.
On a 2-core machine that capped the image model at about a fifth of what ONNX Runtime does in-process.

`V2InferRoute` wraps the app's `wsgi_app`. A POST whose path is one of those two routes is answered here; every
other request (any method, any path, a trailing slash, a doubled one) goes to Flask untouched. The answer is the
one Flask would give, because everything that decides it is shared, not copied:

- the request path itself, `v2.infer_tensors` (parsing, fair use, routing, batching, metrics, metering, the
  sampled prediction log), which Flask's view calls too;
- credentials and scope: `shared.auth.authenticate` and `scoped`, with the scope and guard the Flask view
  declares (read from it; a view whose guard changes makes this route refuse to start);
- the body: what werkzeug's `get_input_stream` reads under the app's `MAX_CONTENT_LENGTH` (413 beyond it; a
  body shorter than declared: werkzeug's 400), then `v2.decode_body` (gzip, deflate);
- errors: `v2.error_parts` and the app's JSON provider, so every error leaves in the protocol's shape
  `{"error": "..."}` with its status and headers (`Retry-After`), byte for byte as the blueprint writes it;
- the trace id, the request metrics (under the Flask rule's name, `/v2/models/<name>/infer`) and the one
  `http_request` line: `shared.http.RequestRecorder`, the object Flask's hooks use.

tests/inference/test_v2_wsgi_route.py sends the same requests (answers, every kind of error) through both and
compares statuses, headers, bodies, metrics and log lines.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import ClientDisconnected
from werkzeug.wsgi import get_input_stream

from services.inference import v2
from services.inference.request_log import add_tenant
from services.inference.server import InferenceServer
from shared.auth import Principal, authenticate, scoped
from shared.http import RequestRecorder
from shared.logging import TRACE_HEADER

ROUTE = re.compile(r"/v2/models/([^/]+)/(?:versions/([^/]+)/)?infer\Z")
"""The two routes' paths, as werkzeug's default converter matches them (a segment: one or more non-slashes)."""
GUARD = {"partner": True, "internal": False, "delegated": False}
"""What the Flask views' guard is (`require_partner`): the credentials this route accepts."""

StartResponse = Callable[..., Any]


class PlainRoute:
    """What a plain WSGI route in front of Flask keeps: the app and what answers behind the route (`flask`: Flask's
    own dispatch, or another plain route in front of it), the app's request recorder and body limit, and the one
    scope the route's Flask views declare, checked against the guard the route authenticates with (`guard`, as
    `shared.auth.authenticate` takes it): a view whose guard changes makes the route refuse to start."""

    def __init__(self, app: Flask, server: InferenceServer, endpoints: Iterable[str], guard: dict[str, bool]) -> None:
        self.app = app
        self.server = server
        self.flask = app.wsgi_app
        self.runtime = app.extensions["flywheel"]
        self.recorder: RequestRecorder = app.extensions["flywheel_requests"]
        self.max_bytes = app.config["MAX_CONTENT_LENGTH"]
        recorded = {**guard, "internal": guard["internal"] or guard["delegated"]}  # as `shared.auth._guard` records
        scopes = set()
        for endpoint in endpoints:
            auth = dict(getattr(app.view_functions[endpoint], "_flywheel_auth", None) or {})
            scopes.add(auth.pop("scope", None))
            if auth != recorded:
                raise RuntimeError(f"{endpoint} is guarded by {auth}, not {recorded}: update {type(self).__module__}")
        if len(scopes) != 1 or None in scopes:
            raise RuntimeError(f"{', '.join(endpoints)} declare scopes {scopes}: update {type(self).__module__}")
        self.scope: str = scopes.pop()

    @staticmethod
    def matched_path(path: str) -> str:
        """PATH_INFO as werkzeug matches it (WSGI's latin-1 str, decoded as UTF-8)."""
        return path if path.isascii() else path.encode("latin-1").decode("utf-8", "replace")


class V2InferRoute(PlainRoute):
    def __init__(self, app: Flask, server: InferenceServer) -> None:
        super().__init__(app, server, ("v2.infer", "v2.infer_version"), GUARD)
        rules = {rule.endpoint: rule.rule for rule in app.url_map.iter_rules()}
        self.endpoints = {False: rules["v2.infer"], True: rules["v2.infer_version"]}

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") == "POST":
            path = environ.get("PATH_INFO") or ""
            if path.startswith("/v2/models/"):
                path = self.matched_path(path)
                match = ROUTE.match(path)
                if match is not None:
                    return self.infer(environ, start_response, path, match[1], match[2])
        return self.flask(environ, start_response)

    def infer(
        self, environ: dict[str, Any], start_response: StartResponse, path: str, name: str, version: str | None
    ) -> Iterable[bytes]:
        started = time.perf_counter()
        headers = EnvironHeaders(environ)
        trace_id, tokens = self.recorder.begin(headers.get(TRACE_HEADER))
        line: dict[str, Any] = {}
        principal: Principal | None = None
        refused = None
        try:
            try:
                principal = authenticate(**GUARD, headers=headers, runtime=self.runtime)
                with scoped(principal, self.scope):
                    body, answer = v2.infer_tensors(
                        self.server,
                        principal,
                        name,
                        version,
                        headers,
                        lambda: read_body(environ, self.max_bytes),
                        line,
                        trace_id,
                    )
            except Exception as error:
                status, message, extra = v2.error_parts(error)
                refused = self.app.json.response(error=message)
                refused.status_code = status
                refused.headers.update(extra)
                refused.headers[TRACE_HEADER] = trace_id
            add_tenant(line, principal)
            elapsed = time.perf_counter() - started
            status = 200 if refused is None else refused.status_code
            self.recorder.record("POST", self.endpoints[version is not None], path, status, elapsed, line)
            if refused is not None:
                return refused(environ, start_response)
            start_response("200 OK", [*answer.items(), ("Content-Length", str(len(body))), (TRACE_HEADER, trace_id)])
            return [body]
        finally:
            self.recorder.end(tokens)


def read_body(environ: dict[str, Any], max_bytes: int) -> bytes:
    """The body, as werkzeug's request reads it: a declared length within `max_bytes` is read in one call (its
    `LimitedStream` reads 64 KiB at a time, through Python); anything else goes through werkzeug itself (413
    beyond the limit, 400 for a body shorter than declared)."""
    declared = environ.get("CONTENT_LENGTH") or ""
    chunked = environ.get("HTTP_TRANSFER_ENCODING", "") == "chunked"
    if declared.isdigit() and int(declared) <= max_bytes and not chunked:
        length = int(declared)
        try:
            data = environ["wsgi.input"].read(length) if length else b""
        except (OSError, ValueError) as exc:
            raise ClientDisconnected() from exc
        if len(data) != length:
            raise ClientDisconnected()
        return data
    return get_input_stream(environ, max_content_length=max_bytes).read()


def install(app: Flask, server: InferenceServer) -> V2InferRoute:
    """Put the route in front of what answers the app's requests now (`.flask` is what stands behind it: Flask's
    own dispatch, or the `:predict` route in front of that)."""
    route = V2InferRoute(app, server)
    app.wsgi_app = route  # type: ignore[method-assign]
    return route
