"""Every service answers /healthz, says on /readyz whether its dependencies answer, and serves its docs."""

from __future__ import annotations

import socket

import pytest

from shared.settings import SERVICES


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("service", SERVICES)
def test_ready_with_everything_up(platform, service: str) -> None:
    client = platform(service).client
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.get_json() == {"status": "ok", "service": service}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json()["checks"] == {"redis": "ok", "database": "ok", "storage": "ok"}


@pytest.mark.parametrize("service", SERVICES)
def test_not_ready_when_redis_is_unreachable(platform, service: str) -> None:
    client = platform(service, redis_url=f"redis://127.0.0.1:{closed_port()}/0").client
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503
    error = ready.get_json()["error"]
    assert error["code"] == "not_ready"
    assert "redis" in error["message"]
    assert error["details"]["checks"]["redis"].startswith("error:")
    assert error["details"]["checks"]["database"] == "ok"


def test_not_ready_names_object_storage_when_it_is_unreachable(platform) -> None:
    client = platform("labeling", s3_endpoint=f"127.0.0.1:{closed_port()}").client
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["error"]["details"]["checks"]["storage"].startswith("error:")


@pytest.mark.parametrize("service", SERVICES)
def test_openapi_metrics_and_request_ids(platform, service: str) -> None:
    client = platform(service).client
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    assert spec.get_json()["openapi"].startswith("3.")
    assert "/v1/admin/dead-letters" in spec.get_json()["paths"]
    client.get("/healthz")
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert b"flywheel_http_requests_total" in metrics.data
    echoed = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["X-Request-ID"] == "abc-123"
    assert len(client.get("/healthz").headers["X-Request-ID"]) == 32


def test_errors_are_json_never_html(platform) -> None:
    client = platform("ingestion").client
    unknown = client.get("/v1/nothing-here")
    assert unknown.status_code == 404
    assert unknown.get_json()["error"]["code"] == "not_found"
    malformed = client.post(
        "/v1/partners",
        data="{not json",
        headers={"Authorization": "Bearer test-internal-token", "Content-Type": "application/json"},
    )
    assert 400 <= malformed.status_code < 500
    assert "error" in malformed.get_json()
    wrong_type = client.post("/v1/partners", json={"name": 42}, headers={"Authorization": "Bearer test-internal-token"})
    assert wrong_type.status_code == 422
    assert wrong_type.get_json()["error"]["details"]["fields"]["json"]["name"]
