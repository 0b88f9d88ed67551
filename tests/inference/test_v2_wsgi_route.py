"""v2 inference's plain WSGI route answers exactly as Flask's route behind it: the same status, headers and body for
answers and for every kind of refusal, the same `http_request` line and the same request metrics; every other
request passes through to Flask untouched.

Each request is sent twice with the same `X-Request-ID`: once to the app (the route in front) and once to what
stands behind the route (the `:predict` route, which hands every v2 request on to Flask's own `wsgi_app`)."""

from __future__ import annotations

import gzip
import json
from typing import Any

import numpy as np
import pytest

from services.inference import v2_wsgi
from tests.helpers import INTERNAL, bearer
from tests.inference.support import BothWays, assert_refused, read_only_key, serving_document, upload_version
from tests.inference.test_fair_use import set_limits

pytestmark = pytest.mark.timeout(180)

RED = np.stack([np.ones((16, 16)), -np.ones((16, 16)), -np.ones((16, 16))]).astype(np.float32)
INFER = "/v2/models/colours/infer"


@pytest.fixture
def served(store, registry, tenants, model_folders) -> None:
    image = model_folders["image"]
    alice = tenants.alice.tenant
    registry.serve(serving_document(alice, image, {3: upload_version(store, alice, image, 3)}, 3))


def json_request(pixels: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "pixels", "datatype": "FP32", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}
        ],
        **extra,
    }


def binary_request(pixels: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "datatype": "FP32",
                    "shape": list(pixels.shape),
                    "parameters": {"binary_data_size": pixels.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + pixels.tobytes(), {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def both_ways(replica: Any, logs: Any) -> BothWays:
    assert isinstance(replica.app.wsgi_app, v2_wsgi.V2InferRoute)
    return BothWays(replica, replica.app.wsgi_app.flask, logs)


def requests_counted(replica: Any, endpoint: str, status: str) -> float:
    value = replica.runtime.metrics.get_sample_value(
        "flywheel_http_requests_total",
        {"service": "inference", "method": "POST", "endpoint": endpoint, "status": status},
    )
    return value or 0.0


@pytest.mark.usefixtures("served")
def test_answers_and_refusals_are_the_same_through_the_route_and_through_flask(
    inference, tenants, platform, logs, monkeypatch
) -> None:
    replica = inference()
    both = both_ways(replica, logs)
    alice = tenants.alice.headers
    pixels = np.stack([RED, RED[::-1].copy()])
    counted = requests_counted(replica, "/v2/models/<name>/infer", "200")

    # answers: JSON, binary, gzip, a named version, the classification extension, an id echoed
    answer = both.send(INFER, json=json_request(pixels, id="r-1"), headers=alice)
    assert answer.status_code == 200 and answer.get_json()["id"] == "r-1"
    line = both.line(answer.headers["X-Request-ID"])
    assert line is not None and (line["model"], line["model_version"], line["rows"]) == ("colours", 3, 2)
    assert line["tenant"] == tenants.alice.tenant and line["path"] == INFER
    body, binary = binary_request(pixels)
    assert both.send(INFER, data=body, headers={**alice, **binary}).status_code == 200
    zipped = gzip.compress(json.dumps(json_request(pixels)).encode())
    gzipped = {**alice, "Content-Encoding": "gzip", "Content-Type": "application/json"}
    assert both.send(INFER, data=zipped, headers=gzipped).status_code == 200
    assert both.send("/v2/models/colours/versions/3/infer", json=json_request(pixels), headers=alice).status_code == 200
    classified = json_request(pixels, outputs=[{"name": "logits", "parameters": {"classification": 1}}])
    assert both.send(INFER, json=classified, headers=alice).status_code == 200
    assert requests_counted(replica, "/v2/models/<name>/infer", "200") - counted == 2 * 4
    assert requests_counted(replica, "/v2/models/<name>/versions/<version>/infer", "200") >= 2

    # refusals, each in the protocol's shape
    refusals = {
        "no credentials": both.send(INFER, json=json_request(pixels)),
        "an unknown key": both.send(INFER, json=json_request(pixels), headers=bearer("fwk_" + "x" * 43)),
        "the internal token": both.send(INFER, json=json_request(pixels), headers=INTERNAL),
        "another tenant's model": both.send(
            INFER,
            json=json_request(pixels),
            headers=tenants.bob.headers,  # alice's model: not bob's to see
        ),
        "an unknown model": both.send("/v2/models/nothing/infer", json=json_request(pixels), headers=alice),
        "an unknown version": both.send(
            "/v2/models/colours/versions/9/infer", json=json_request(pixels), headers=alice
        ),
        "a version that is no number": both.send(
            "/v2/models/colours/versions/x/infer", json=json_request(pixels), headers=alice
        ),
        "malformed JSON": both.send(INFER, data=b"{not json", headers={**alice, "Content-Type": "application/json"}),
        "an unknown input": both.send(
            INFER,
            json={"inputs": [{"name": "other", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
            headers=alice,
        ),
        "a wrong shape": both.send(
            INFER,
            json={"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2], "data": [1, 2]}]},
            headers=alice,
        ),
        "an unsupported encoding": both.send(
            INFER, data=b"x", headers={**alice, "Content-Encoding": "br", "Content-Type": "application/json"}
        ),
        "a corrupt gzip body": both.send(INFER, data=b"not gzip", headers=gzipped),
        "a body over the limit": both.send(
            INFER,
            data=b" " * (replica.runtime.settings.max_request_bytes + 1),
            headers={**alice, "Content-Type": "application/json"},
        ),
    }
    assert_refused(refusals)
    assert refusals["no credentials"].status_code == 401
    assert refusals["another tenant's model"].status_code == 404
    assert refusals["a body over the limit"].status_code == 413

    # a key without the predict scope: 403, naming it
    partner = tenants.alice.tenant
    readonly = read_only_key(platform, partner)
    assert both.send(INFER, json=json_request(pixels), headers=readonly).status_code == 403

    # an unexpected failure: 500 in the protocol's shape, logged, nothing leaked
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(replica.server, "infer", broken)
    failed = both.send(INFER, json=json_request(pixels), headers=alice)
    assert failed.status_code == 500 and "a bug" not in failed.get_data(as_text=True)
    monkeypatch.undo()

    # everything else is Flask's: other methods, a trailing slash, a doubled slash, other routes
    assert both.send(INFER, method="GET", headers=alice).status_code in (404, 405)
    assert both.send(INFER + "/", json=json_request(pixels), headers=alice).status_code == 404
    assert both.send("/v2/models//colours/infer", json=json_request(pixels), headers=alice).status_code >= 300
    assert both.send("/v2/models/colours/ready", method="GET", headers=alice).status_code == 200

    # a rate limit: 429 with Retry-After from both (the bucket is shared, so each takes its turn)
    set_limits(platform, partner, rate_limits={"inference_per_key": 0, "inference_per_tenant": 0.5})
    replica.server.fair_use._cache.clear()
    for client in (both.routed, both.flask):
        while client.post(INFER, json=json_request(pixels), headers=alice).status_code != 429:
            pass
    limited = both.send(INFER, json=json_request(pixels), headers=alice)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
