"""Every non-health endpoint of every service requires a credential, proven by walking the OpenAPI
documents; operator actions require the internal token, not a partner key; every partner route needs the scope
it declares (and docs/security.md lists), and refuses a key without it with a 403 naming that scope."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.auth import SCOPES
from shared.settings import SERVICES
from tests.helpers import INTERNAL, bearer, create_partner

# Answer without a credential: health and metrics for probes and scrapers, the API's own description, the
# KServe v2 server metadata (protocol discovery: name, version, extensions; no tenant data), and the content of
# a signed download URL (its signature is the credential).
PUBLIC = {
    "/v2",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/v2/health/live",
    "/v2/health/ready",
    "/v1/items/{item_id}/content",
}


def operations(client) -> list[tuple[str, str]]:
    spec = client.get("/openapi.json").get_json()
    found = []
    for path, methods in spec["paths"].items():
        for method in methods:
            if method in {"get", "post", "put", "patch", "delete"}:
                found.append((method, path))
    return found


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


@pytest.mark.parametrize("service", SERVICES)
def test_every_documented_endpoint_refuses_a_request_without_credentials(platform, service: str) -> None:
    client = platform(service).client
    documented = operations(client)
    assert len(documented) >= 3, f"{service} documents too little: {documented}"
    open_endpoints = []
    for method, path in documented:
        if path in PUBLIC:
            continue
        response = client.open(concrete(path), method=method.upper(), json={})
        if response.status_code != 401:
            open_endpoints.append(f"{method.upper()} {path} -> {response.status_code}")
        else:
            error = response.get_json()["error"]
            # The KServe v2 protocol's errors are a plain string; everything else speaks our error object.
            assert error["code"] == "unauthorized" if isinstance(error, dict) else error
    assert not open_endpoints, "answered without credentials:\n" + "\n".join(open_endpoints)


@pytest.mark.parametrize("service", SERVICES)
def test_operator_endpoints_refuse_a_partner_key(platform, service: str) -> None:
    ingestion = platform("ingestion")
    key = create_partner(ingestion.client)["api_key"]
    app = ingestion.app if service == "ingestion" else platform(service).app
    client = app.test_client()
    operator_only = []
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        auth = getattr(view, "_flywheel_auth", None)
        if auth and auth.get("internal") and not auth.get("partner"):
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                operator_only.append((method, re.sub(r"<(?:[^:>]+:)?([^>]+)>", "1", rule.rule)))
    if service in {"ingestion", "labeling", "registry", "training"}:
        assert operator_only, f"{service} should have operator-only endpoints"
    refused = [
        (method, path)
        for method, path in operator_only
        if client.open(path, method=method, json={}, headers=bearer(key)).status_code == 401
    ]
    assert refused == operator_only


def partner_routes(app) -> list[tuple[str, str, str]]:
    """(method, concrete path, scope) of every route a partner key may call."""
    found = []
    for rule in app.url_map.iter_rules():
        auth = getattr(app.view_functions[rule.endpoint], "_flywheel_auth", None)
        if auth and auth.get("partner"):
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                found.append((method, re.sub(r"<(?:[^:>]+:)?([^>]+)>", "1", rule.rule), auth["scope"]))
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_every_partner_route_refuses_a_key_without_its_scope(platform, service: str) -> None:
    """A key holding every scope but the one a route needs gets 403 naming that scope, on every route."""
    ingestion = platform("ingestion")
    partner = create_partner(ingestion.client)
    app = ingestion.app if service == "ingestion" else platform(service).app
    client = app.test_client()
    routes = partner_routes(app)
    assert routes, f"{service} has no partner routes"
    keys = {}
    for scope in SCOPES:
        others = [other for other in SCOPES if other != scope]
        response = ingestion.client.post(
            f"/v1/partners/{partner['partner']['id']}/keys", json={"scopes": others}, headers=INTERNAL
        )
        keys[scope] = response.get_json()["api_key"]
    wrong = []
    for method, path, scope in routes:
        response = client.open(path, method=method, json={}, headers=bearer(keys[scope]))
        body = response.get_json() or {}
        error = body.get("error")
        named = error.get("details", {}).get("missing_scope") if isinstance(error, dict) else error
        if response.status_code != 403 or scope not in str(named):
            wrong.append(f"{method} {path} (needs {scope}) -> {response.status_code} {body}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("service", SERVICES)
def test_every_partner_route_declares_its_scope_and_documents_the_403(platform, service: str) -> None:
    app = platform(service).app
    undeclared = []
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        auth = getattr(view, "_flywheel_auth", None)
        if auth and auth.get("partner") and not hasattr(view, "_flywheel_scope"):
            undeclared.append(rule.rule)
    assert not undeclared, f"partner routes without requires_scope (they default to admin): {undeclared}"
    spec = app.test_client().get("/openapi.json").get_json()
    routes = {(method.lower(), path) for method, path, _ in partner_routes(app)}
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            if (method, concrete(path)) in routes:
                assert "403" in operation["responses"], f"{method.upper()} {path} does not document its 403"


def documented_scopes() -> dict[tuple[str, str, str], str]:
    """The table in docs/security.md: | service | method | path | scope |."""
    table = {}
    for line in (Path(__file__).parents[2] / "docs" / "security.md").read_text().splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in SERVICES:
            table[(cells[0], cells[1], cells[2])] = cells[3]
    return table


def test_the_scope_of_every_route_is_the_one_docs_security_md_says(platform) -> None:
    documented = documented_scopes()
    actual = {}
    for service in SERVICES:
        app = platform(service).app
        for rule in app.url_map.iter_rules():
            auth = getattr(app.view_functions[rule.endpoint], "_flywheel_auth", None)
            if auth and auth.get("partner"):
                path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
                for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                    actual[(service, method, path)] = auth["scope"]
    assert actual == documented
