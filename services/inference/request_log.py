"""Inference's facts on the one log line per request.

The shared HTTP layer writes one `http_request` line per request with its `trace_id`. Inference's views add the
model, the version that answered, the tenant and the row count to that same line: a view records them with
`annotate`, the blueprint binds them just before the shared line is written (blueprint `after_request` hooks
run before the app's), and unbinds them when the request is torn down, so nothing leaks into the thread's
next request.
"""

from __future__ import annotations

from typing import Any

import structlog
from flask import Blueprint, Response, g

from shared.auth import current_principal


def annotate(**fields: Any) -> None:
    g.setdefault("inference_fields", {}).update(fields)


def install_request_annotations(blueprint: Blueprint) -> None:
    @blueprint.after_request
    def _bind(response: Response) -> Response:
        fields = dict(g.get("inference_fields") or {})
        principal = g.get("principal")
        if principal is not None and principal.tenant != "*":
            fields.setdefault("tenant", current_principal().tenant)
        if fields:
            structlog.contextvars.bind_contextvars(**fields)
            g.inference_bound = list(fields)
        return response

    @blueprint.teardown_request
    def _unbind(_exc: BaseException | None) -> None:
        bound = g.pop("inference_bound", None)
        if bound:
            structlog.contextvars.unbind_contextvars(*bound)
