"""The console's server (shared/console): its pages, and a pass-through to the public APIs that adds nothing."""

from __future__ import annotations

from testkit.processes import free_port
from tests.helpers import INTERNAL


def test_the_console_is_served_offline_and_stays_out_of_the_openapi_document(platform) -> None:
    platform("ingestion")
    client = platform("labeling").client
    page = client.get("/console/")
    assert page.status_code == 200 and "<title>Flywheel console</title>" in page.get_data(as_text=True)
    assert "http://" not in page.get_data(as_text=True) and "https://" not in page.get_data(as_text=True)
    assert client.get("/console").status_code == 308
    chart = client.get("/console/static/vendor/uPlot.iife.min.js")
    assert chart.status_code == 200 and b"uPlot" in chart.data
    assert client.get("/console/config.json").get_json()["services"] == [
        "ingestion",
        "labeling",
        "training",
        "registry",
        "inference",
    ]
    assert not [path for path in client.get("/openapi.json").get_json()["paths"] if path.startswith("/console")]


def test_the_pass_through_answers_what_the_service_answers_and_only_for_public_apis(platform) -> None:
    platform("ingestion")
    client = platform("labeling", training_url=f"http://127.0.0.1:{free_port()}").client

    created = client.post("/console/api/ingestion/v1/partners", json={"name": "acme"}, headers=INTERNAL)
    assert created.status_code == 201 and created.get_json()["api_key"].startswith("fwk_")
    listed = client.get("/console/api/ingestion/v1/partners", headers=INTERNAL)
    assert [p["name"] for p in listed.get_json()["partners"]] == ["acme"]
    refused = client.get("/console/api/ingestion/v1/partners")  # no credential of its own is added
    assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "unauthorized"
    invalid = client.post("/console/api/ingestion/v1/partners", json={"name": ""}, headers=INTERNAL)
    assert invalid.status_code == 422 and "name" in invalid.get_json()["error"]["details"]["fields"]["json"]

    for path in ("/console/api/ingestion/healthz", "/console/api/ingestion/metrics", "/console/api/nowhere/v1/x"):
        answer = client.get(path, headers=INTERNAL)
        assert answer.status_code == 404 and answer.get_json()["error"]["code"] == "not_found", path
    down = client.get("/console/api/training/v1/runs", headers=INTERNAL)
    assert down.status_code == 503 and "training service does not answer" in down.get_json()["error"]["message"]
