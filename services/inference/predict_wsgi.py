"""The friendly API's JSON predictions as a plain WSGI route in front of Flask: the same request, at less CPU.

A text model's request is one short JSON body, and on a 2-core machine Flask's request and app contexts, its URL
matching, its hooks and flask-smorest's wrappers cost about half of the request thread's CPU: time the model's
batcher waits for the interpreter lock (docs/performance.md, "Text at its ceiling"). `PredictRoute` answers
`POST /v1/models/{name}:predict` with a JSON body (`Content-Type: application/json`) before Flask's dispatch;
every other request, a multipart upload of images included, goes to the app behind it untouched. The answer is
the one Flask would give, because what decides it is shared, not copied:

- the request path, `api.predict_for` (fair use, validation, routing, batching, the prediction log, metering,
  metrics), which Flask's view calls too, and `PredictResponseSchema`, which dumps the answer for both;
- credentials and scope: `shared.auth.authenticate` and `scoped`, with the guard and scope the Flask view declares
  (`v2_wsgi.PlainRoute` reads and checks them: a view whose guard changes makes this route refuse to start);
- the body: `v2_wsgi.read_body` (werkzeug's limit and errors), parsed by the app's JSON provider as
  `request.get_json(silent=True)` parses it, and only when fair use first asks for it;
- errors: the app's own error handlers, run in a Flask request context made for the refused request only;
- the trace id, the request metrics (under the Flask rule's name) and the one `http_request` line:
  `shared.http.RequestRecorder`, the object Flask's hooks use.

tests/inference/test_predict_wsgi_route.py sends the same requests through both and compares statuses, headers,
bodies, metrics and log lines.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable
from typing import Any

from flask import Flask
from werkzeug.datastructures import EnvironHeaders
from werkzeug.http import parse_options_header

from services.inference import api, fair_use
from services.inference.request_log import add_tenant
from services.inference.schemas import PredictResponseSchema
from services.inference.server import InferenceServer
from services.inference.v2_wsgi import PlainRoute, StartResponse, read_body
from shared.auth import Principal, authenticate, scoped
from shared.logging import TRACE_HEADER

ROUTE = re.compile(r"/v1/models/([^/]+):predict\Z")
"""The route's path, as werkzeug matches the rule `/v1/models/<name>:predict` (a name: one or more non-slashes)."""
ENDPOINT = "inference_models.predict"
GUARD = {"partner": True, "internal": False, "delegated": True}
"""What the Flask view's guard is (`require_partner_or_delegated`): a partner key, or the internal token acting for
the tenant named in `X-Flywheel-Tenant`."""


class PredictRoute(PlainRoute):
    def __init__(self, app: Flask, server: InferenceServer) -> None:
        super().__init__(app, server, (ENDPOINT,), GUARD)
        self.endpoint = next(rule.rule for rule in app.url_map.iter_rules() if rule.endpoint == ENDPOINT)
        self.schema = PredictResponseSchema()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") == "POST":
            path = environ.get("PATH_INFO") or ""
            if path.startswith("/v1/models/") and path.endswith(":predict"):
                path = self.matched_path(path)
                match = ROUTE.match(path)
                content_type = environ.get("CONTENT_TYPE", "")
                if match is not None and parse_options_header(content_type)[0].lower() == "application/json":
                    return self.predict(environ, start_response, path, match[1])
        return self.flask(environ, start_response)

    def predict(self, environ: dict[str, Any], start_response: StartResponse, path: str, name: str) -> Iterable[bytes]:
        started = time.perf_counter()
        headers = EnvironHeaders(environ)
        trace_id, tokens = self.recorder.begin(headers.get(TRACE_HEADER))
        line: dict[str, Any] = {}
        principal: Principal | None = None

        @functools.cache
        def payload() -> Any:
            """The body as `request.get_json(silent=True)` gives it, read and parsed once, when first asked for."""
            try:
                return self.app.json.loads(read_body(environ, self.max_bytes))
            except ValueError:
                return None

        try:
            try:
                principal = authenticate(**GUARD, headers=headers, runtime=self.runtime)
                with scoped(principal, self.scope):
                    answer = api.predict_for(
                        self.server,
                        principal,
                        name,
                        lambda: fair_use.rows_in(payload()),
                        lambda: api.json_body(payload()),
                        line,
                        trace_id,
                    )
                    response = self.app.json.response(self.schema.dump(answer))
            except Exception as error:  # answered by the app's own handlers, as Flask would answer it
                with self.app.request_context(environ):
                    response = self.app.make_response(self.app.handle_user_exception(error))
            add_tenant(line, principal)
            response.headers[TRACE_HEADER] = trace_id
            elapsed = time.perf_counter() - started
            self.recorder.record("POST", self.endpoint, path, response.status_code, elapsed, line)
            return response(environ, start_response)
        finally:
            self.recorder.end(tokens)


def install(app: Flask, server: InferenceServer) -> PredictRoute:
    """Put the route in front of what answers the app's requests now (`.flask` is what stands behind it)."""
    route = PredictRoute(app, server)
    app.wsgi_app = route  # type: ignore[method-assign]
    return route
