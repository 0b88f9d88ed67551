"""A JSON body nested deeper than Python's parser can follow (`[[[[...]]]]`: a few kilobytes, about a thousand
levels and more) is malformed JSON: every operation of every service that takes a JSON body answers it with a 4xx
in the error shape, never a 500, whether the operation reads its body through Flask's `request.get_json`, through
flask-smorest's argument parsing, or through a plain WSGI route in front of Flask.
"""

from __future__ import annotations

import re

import pytest

from shared.settings import SERVICES
from tests.conftest import INTERNAL_TOKEN
from tests.helpers import bearer, create_dataset, create_partner

pytestmark = pytest.mark.timeout(300)

DEEP = b"[" * 20_000 + b"]" * 20_000
DEEP_OBJECT = b'{"texts": ' + DEEP + b"}"


def json_operations(app) -> list[tuple[str, str]]:
    """(method, concrete path) of every documented operation that takes a JSON body."""
    spec = app.test_client().get("/openapi.json").get_json()
    found = []
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            if method not in {"post", "put", "patch", "delete"}:
                continue  # path-level `parameters`, and methods without a body
            content = (operation.get("requestBody") or {}).get("content", {})
            if "application/json" in content:
                found.append((method.upper(), re.sub(r"\{[^}]+\}", "x", path)))
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_a_body_nested_too_deeply_is_a_4xx_on_every_json_operation(platform, service: str) -> None:
    ingestion = platform("ingestion")
    issued = create_partner(ingestion.client, "deep")
    create_dataset(ingestion.client, issued["api_key"])
    app = (ingestion if service == "ingestion" else platform(service)).app
    client = app.test_client()
    operations = json_operations(app)
    assert operations, f"{service} documents no operation with a JSON body"
    answered = []
    for token in (issued["api_key"], INTERNAL_TOKEN):
        for method, path in operations:
            for body in (DEEP, DEEP_OBJECT):
                response = client.open(
                    path, method=method, data=body, headers={**bearer(token), "Content-Type": "application/json"}
                )
                seen = (method, path, response.status_code, response.get_data()[:300])
                assert 400 <= response.status_code < 500, seen
                assert "error" in (response.get_json(silent=True) or {}), seen
                answered.append(response.status_code)
    assert 400 in answered, f"{service}: no operation read the body far enough to refuse it as malformed"


def test_the_body_parsers_each_refuse_it_with_400(platform) -> None:
    """Where the partner reaches the parser: ingestion's push (`request.get_json`) and inference's feedback
    (flask-smorest's argument parsing), with the partner's own key. `:predict`'s plain WSGI route is checked
    against Flask's view in tests/inference/test_predict_wsgi_route.py."""
    ingestion = platform("ingestion")
    issued = create_partner(ingestion.client, "deep")
    dataset = create_dataset(ingestion.client, issued["api_key"])
    inference = platform("inference")
    headers = {**bearer(issued["api_key"]), "Content-Type": "application/json"}
    pushed = ingestion.client.post(f"/v1/datasets/{dataset['id']}/items", data=DEEP, headers=headers)
    assert pushed.status_code == 400 and pushed.get_json()["error"]["code"] == "bad_request", pushed.get_json()
    feedback = inference.client.post("/v1/feedback", data=DEEP, headers=headers)
    assert feedback.status_code == 400, feedback.get_json()
    assert "nested too deeply" in feedback.get_json()["error"]["message"]
