"""Inference's facts on the one log line per request.

The shared HTTP layer writes one `http_request` line per request with its `trace_id`. Inference's views add the
model, the version that answered, the tenant and the row count to that same line: a view records them with
`annotate` (the shared layer's `add_to_request_line`), and the blueprint adds the caller's tenant just before the
line is written (blueprint `after_request` hooks run before the app's). They are passed to that line only, never
bound to the thread's log context, so nothing is left to unbind and nothing leaks into the thread's next request.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g

from shared.auth import Principal
from shared.http import REQUEST_LINE_FIELDS, add_to_request_line


def annotate(**fields: Any) -> None:
    add_to_request_line(**fields)


def add_tenant(line: dict[str, Any], principal: Principal | None) -> None:
    """The caller's tenant on its request's line (not the internal token's "*")."""
    if principal is not None and principal.tenant != "*":
        line.setdefault("tenant", principal.tenant)


def install_request_annotations(blueprint: Blueprint) -> None:
    @blueprint.after_request
    def _tenant(response: Response) -> Response:
        add_tenant(g.setdefault(REQUEST_LINE_FIELDS, {}), g.get("principal"))
        return response
