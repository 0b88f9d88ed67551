"""Canary: traffic split by the production alias's weights, sticky per caller when a request key is given."""

from __future__ import annotations

import base64
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.inference.support import png, serving_document, upload_version

pytestmark = pytest.mark.timeout(120)

IMAGE = base64.b64encode(png((200, 10, 10))).decode()


@pytest.fixture
def canary(store, registry, tenants, model_folders, inference):
    folder = model_folders["image"]
    versions = {v: upload_version(store, tenants.alice.tenant, folder, v) for v in (1, 2)}
    registry.serve(serving_document(tenants.alice.tenant, folder, versions, 1, weights={1: 80, 2: 20}))
    return inference(max_queue_delay_us=0)


def version_of(replica, headers, **body) -> int:
    response = replica.client.post("/v1/models/colours:predict", json={"images": [IMAGE], **body}, headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["model_version"]


def test_traffic_splits_by_the_weights_over_2000_requests(canary, tenants) -> None:
    with ThreadPoolExecutor(4) as pool:
        counts = Counter(pool.map(lambda _: version_of(canary, tenants.alice.headers), range(2000)))
    assert set(counts) == {1, 2}
    # 20 % of 2,000 is 400; the binomial standard deviation is 17.9, so +-72 is four of them.
    assert abs(counts[2] - 400) <= 72, counts
    metadata = canary.client.get("/v2/models/colours", headers=tenants.alice.headers).get_json()
    assert metadata["flywheel"]["serving"] == {"version": 1, "weights": {"1": 80, "2": 20}}
    assert metadata["versions"] == ["1", "2"]


def test_a_request_key_keeps_a_caller_on_one_version(canary, tenants) -> None:
    headers = tenants.alice.headers
    chosen = {}
    for caller in range(300):
        seen = {version_of(canary, headers, request_key=f"caller-{caller}") for _ in range(3)}
        assert len(seen) == 1, f"caller-{caller} saw versions {seen}"
        chosen[caller] = seen.pop()
    assert abs(sum(1 for v in chosen.values() if v == 2) - 60) <= 28  # 20 % of callers, 4 sigma
    # The v2 protocol routes the same way with the header, and a pinned version ignores the weights.
    pixels = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.0] * 768}]}
    for caller in (0, 1, 2, 3):
        response = canary.client.post(
            "/v2/models/colours/infer", json=pixels, headers={**headers, "X-Request-Key": f"caller-{caller}"}
        )
        assert int(response.get_json()["model_version"]) == chosen[caller]
    pinned = canary.client.post("/v2/models/colours/versions/2/infer", json=pixels, headers=headers)
    assert pinned.get_json()["model_version"] == "2"
