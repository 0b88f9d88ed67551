"""Every non-health endpoint of every service requires a credential, proven by walking the OpenAPI
documents; operator actions require the internal token, not a partner key."""

from __future__ import annotations

import re

import pytest

from shared.settings import SERVICES
from tests.helpers import bearer, create_partner

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
