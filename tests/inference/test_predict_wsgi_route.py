"""The friendly API's plain WSGI `:predict` route answers exactly as Flask's view behind it: the same status,
headers and body (prediction ids aside: each prediction gets a new one) for answers and for every kind of refusal,
the same `http_request` line and the same request metrics; every other request passes through to Flask untouched.

Each request is sent twice with the same headers: once to the app (the routes in front) and once straight to
Flask's own `wsgi_app`, behind them."""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import pytest

from services.inference import predict_wsgi
from tests.conftest import INTERNAL_TOKEN
from tests.helpers import INTERNAL, bearer
from tests.inference.support import BothWays, assert_refused, png, read_only_key, serving_document, upload_version
from tests.inference.test_fair_use import set_limits

pytestmark = pytest.mark.timeout(180)

PREDICT = "/v1/models/reviews:predict"
PREDICTION_ID = re.compile(rb'"prd_[^"]+"')


@pytest.fixture
def served(store, registry, tenants, model_folders) -> None:
    alice = tenants.alice.tenant
    for kind, version in (("text", 1), ("image", 3)):
        folder = model_folders[kind]
        registry.serve(
            serving_document(alice, folder, {version: upload_version(store, alice, folder, version)}, version)
        )


def route_of(app: Any) -> predict_wsgi.PredictRoute:
    """The `:predict` route in the chain of plain routes in front of Flask."""
    found = app.wsgi_app
    while not isinstance(found, predict_wsgi.PredictRoute):
        found = found.flask
    return found


def both_ways(replica: Any, logs: Any) -> tuple[BothWays, predict_wsgi.PredictRoute]:
    route = route_of(replica.app)
    assert not hasattr(route.flask, "flask"), "Flask's own wsgi_app stands right behind the route"
    return BothWays(replica, route.flask, logs, same_body=lambda body: PREDICTION_ID.sub(b"ID", body)), route


def requests_counted(replica: Any, status: str) -> float:
    value = replica.runtime.metrics.get_sample_value(
        "flywheel_http_requests_total",
        {"service": "inference", "method": "POST", "endpoint": "/v1/models/<name>:predict", "status": status},
    )
    return value or 0.0


@pytest.mark.usefixtures("served")
def test_answers_and_refusals_are_the_same_through_the_route_and_through_flask(
    inference, tenants, platform, logs, monkeypatch
) -> None:
    replica = inference()
    both, route = both_ways(replica, logs)
    taken: list[str] = []
    answer_here = route.predict

    def counted_here(environ: dict[str, Any], start_response: Any, path: str, name: str) -> Any:
        taken.append(name)
        return answer_here(environ, start_response, path, name)

    monkeypatch.setattr(route, "predict", counted_here)
    alice = tenants.alice.headers
    counted = requests_counted(replica, "200")

    # answers: texts, a charset in the content type, a pinned version with a request key, base64 images,
    # a service acting for the tenant
    answer = both.send(PREDICT, json={"texts": ["a wonderful film", "a terrible film"]}, headers=alice)
    assert [p["label"] for p in answer.get_json()["predictions"]] == ["pos", "neg"]
    line = both.line(answer.headers["X-Request-ID"])
    assert line is not None and (line["model"], line["model_version"], line["rows"]) == ("reviews", 1, 2)
    assert line["tenant"] == tenants.alice.tenant and line["path"] == PREDICT and line["status"] == 200
    utf8 = {**alice, "Content-Type": "application/json; charset=utf-8"}
    assert both.send(PREDICT, data=b'{"texts": ["wonderful"]}', headers=utf8).status_code == 200
    pinned = {"texts": ["wonderful"], "version": 1, "request_key": "k-1", "subject_id": "subject-7"}
    assert both.send(PREDICT, json=pinned, headers=alice).status_code == 200
    red = base64.b64encode(png((255, 0, 0))).decode()
    assert both.send("/v1/models/colours:predict", json={"images": [red]}, headers=alice).status_code == 200
    acting = {"Authorization": f"Bearer {INTERNAL_TOKEN}", "X-Flywheel-Tenant": tenants.alice.tenant}
    delegated = both.send(PREDICT, json={"texts": ["wonderful"]}, headers=acting)
    assert delegated.get_json()["predictions"][0]["prediction_id"] is None
    assert requests_counted(replica, "200") - counted == 2 * 5
    assert len(taken) == 5

    # refusals, each in the friendly API's shape
    json_headers = {**alice, "Content-Type": "application/json"}
    refusals = {
        "no credentials": both.send(PREDICT, json={"texts": ["x"]}),
        "an unknown key": both.send(PREDICT, json={"texts": ["x"]}, headers=bearer("fwk_" + "x" * 43)),
        "the internal token without a tenant": both.send(PREDICT, json={"texts": ["x"]}, headers=INTERNAL),
        "another tenant's model": both.send(PREDICT, json={"texts": ["x"]}, headers=tenants.bob.headers),
        "an unknown model": both.send("/v1/models/nothing:predict", json={"texts": ["x"]}, headers=alice),
        "an unknown version": both.send(PREDICT, json={"texts": ["x"], "version": 9}, headers=alice),
        "malformed JSON": both.send(PREDICT, data=b"{not json", headers=json_headers),
        "a JSON list": both.send(PREDICT, json=[1, 2], headers=alice),
        "a body nested too deeply to parse": both.send(
            PREDICT, data=b'{"texts": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", headers=json_headers
        ),
        "no inputs": both.send(PREDICT, json={}, headers=alice),
        "texts that are no strings": both.send(PREDICT, json={"texts": [1, {"a": 2}]}, headers=alice),
        "too many inputs": both.send(PREDICT, json={"texts": ["x"] * 65}, headers=alice),
        "images to a text model": both.send(PREDICT, json={"images": [red]}, headers=alice),
        "images that are no base64": both.send("/v1/models/colours:predict", json={"images": ["%%"]}, headers=alice),
        "references from a partner": both.send(
            PREDICT,
            json={"references": [{"bucket": "raw", "key": "x", "sha256": "0" * 64, "offset": 0, "length": 1}]},
            headers=alice,
        ),
        "a body over the limit": both.send(
            PREDICT,
            data=b" " * (replica.runtime.settings.max_request_bytes + 1),
            headers={**alice, "Content-Type": "application/json"},
        ),
    }
    assert_refused(refusals)
    assert refusals["no credentials"].status_code == 401
    assert refusals["another tenant's model"].status_code == 404
    assert refusals["malformed JSON"].status_code == 400
    assert refusals["a body nested too deeply to parse"].status_code == 400
    assert refusals["too many inputs"].status_code == 422
    assert refusals["a body over the limit"].status_code == 413
    assert len(taken) == 5 + len(refusals)

    # a key without the predict scope: 403, naming it
    readonly = read_only_key(platform, tenants.alice.tenant)
    assert both.send(PREDICT, json={"texts": ["x"]}, headers=readonly).status_code == 403

    # an unexpected failure: 500 in the friendly API's shape, logged, nothing leaked
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    with monkeypatch.context() as patched:
        patched.setattr(replica.server, "infer", broken)
        failed = both.send(PREDICT, json={"texts": ["x"]}, headers=alice)
    assert failed.status_code == 500 and "a bug" not in failed.get_data(as_text=True)

    # everything else is Flask's: multipart images, other content types, other methods, a trailing slash
    before = len(taken)
    multipart = both.send(
        "/v1/models/colours:predict",
        data=lambda: {"images": [(io.BytesIO(png((0, 0, 255))), "blue.png")]},
        headers=alice,
        content_type="multipart/form-data",
    )
    assert multipart.status_code == 200
    assert both.send(PREDICT, data=b"x", headers={**alice, "Content-Type": "text/plain"}).status_code == 400
    assert both.send(PREDICT, method="GET", headers=alice).status_code in (404, 405)
    assert both.send(PREDICT + "/", json={"texts": ["x"]}, headers=alice).status_code == 404
    assert len(taken) == before

    # a rate limit: 429 with Retry-After from both (the bucket is shared, so each takes its turn)
    set_limits(platform, tenants.alice.tenant, rate_limits={"inference_per_key": 0, "inference_per_tenant": 0.5})
    replica.server.fair_use._cache.clear()
    for client in (both.routed, both.flask):
        while client.post(PREDICT, json={"texts": ["x"]}, headers=alice).status_code != 429:
            pass
    limited = both.send(PREDICT, json={"texts": ["x"]}, headers=alice)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1


def test_the_route_can_be_turned_off(inference) -> None:
    replica = inference(predict_wsgi_route=False)
    chain, found = replica.app.wsgi_app, []
    while hasattr(chain, "flask"):
        found.append(type(chain).__name__)
        chain = chain.flask
    assert "PredictRoute" not in found
