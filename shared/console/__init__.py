"""The web console: a static app for annotators and operators, served by the labeling service at `/console/`.

The pages are plain HTML, CSS and small ES modules (`static/`), with uPlot (vendored, `static/vendor/`) for the
charts; nothing is built and nothing is loaded from a CDN, so the console works offline. They call the same
public APIs as the `flywheel` command, with the same credentials (an annotator token, a partner key or the
internal token, kept in the browser tab's session storage).

One address serves it all: `/console/api/<service>/<path>` passes a request through to that service's public API
unchanged (method, body, `Authorization`, `Content-Type`, `X-Request-ID`, `X-Flywheel-Tenant` in; status, body
and `Content-Type` out). The browser needs no cross-origin access to five ports, and an operator reaches the
whole console through one `kubectl port-forward`. The pass-through adds no credential of its own and forwards
only `/v1/` and `/v2/` paths, so it can do nothing the caller could not do against the service directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests
from flask import Blueprint, Response, current_app, jsonify, redirect, request, send_from_directory

from shared.auth import TENANT_HEADER
from shared.client.http import IDEMPOTENT, retrying_session
from shared.errors import error_body
from shared.logging import TRACE_HEADER, get_logger
from shared.settings import SERVICES

log = get_logger(__name__)

STATIC = Path(__file__).parent / "static"
FORWARDED_REQUEST_HEADERS = ("Authorization", "Content-Type", "Accept", TRACE_HEADER, "Idempotency-Key", TENANT_HEADER)
FORWARDED_RESPONSE_HEADERS = ("Content-Type", "Retry-After", TRACE_HEADER, "Content-Disposition")
PUBLIC_PREFIXES = ("v1/", "v2/")
UPSTREAM_TIMEOUT_SECONDS = 30.0

console = Blueprint("console", __name__, url_prefix="/console")
_session = retrying_session(IDEMPOTENT)


@console.get("")
def console_root() -> Response:
    return redirect(request.path + "/", code=308)


@console.get("/")
def console_index() -> Response:
    response = send_from_directory(STATIC, "index.html")
    response.headers["Cache-Control"] = "no-cache"
    return response


@console.get("/static/<path:filename>")
def console_static(filename: str) -> Response:
    return send_from_directory(STATIC, filename)


@console.get("/config.json")
def console_config() -> Response:
    """What the pages need to know about the platform: its services (for the pass-through) and its version."""
    from importlib.metadata import version

    return jsonify({"services": list(SERVICES), "version": version("flywheel"), "api": "/console/api"})


@console.route("/api/<service>/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def console_api(service: str, rest: str) -> Any:
    """Pass the request through to `service`'s public API, answering exactly what it answered."""
    if service not in SERVICES or not rest.startswith(PUBLIC_PREFIXES):
        return jsonify(error_body("not_found", f"no public API at /{rest} of {service!r}")), 404
    settings = current_app.extensions["flywheel"].settings
    url = f"{settings.service_url(service)}/{rest}"
    headers = {name: request.headers[name] for name in FORWARDED_REQUEST_HEADERS if name in request.headers}
    try:
        upstream = _session.request(
            request.method,
            url,
            params=request.args,
            data=request.get_data(),
            headers=headers,
            timeout=UPSTREAM_TIMEOUT_SECONDS,
            allow_redirects=False,
        )
    except requests.RequestException as exc:
        log.warning("console_upstream_unreachable", upstream=service, error=type(exc).__name__)
        body = error_body("service_unavailable", f"the {service} service does not answer; try again shortly")
        return jsonify(body), 503
    answer = Response(upstream.content, status=upstream.status_code)
    for name in FORWARDED_RESPONSE_HEADERS:
        if name in upstream.headers:
            answer.headers[name] = upstream.headers[name]
    return answer
