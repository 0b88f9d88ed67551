"""Many tenants' models per replica: with a memory budget, versions load on first request, the least recently
used idle ones are evicted to stay under it, a pinned tenant's production versions stay loaded, a cold start
waits or answers 503 + Retry-After by policy, and a hot swap under load still fails nothing."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import pytest
import requests

from tests.helpers import eventually, figures
from tests.inference.support import build_image_model, metric_samples, png, serving_document, upload_version

pytestmark = pytest.mark.timeout(120)

RED = base64.b64encode(png((255, 0, 0))).decode()
NAMES = ("alpha", "beta", "gamma")
BUDGET_MB = 9.0
"""Each tiny image model is accounted about 4 MiB (the 4 MiB per-version overhead plus twice its ~1 KiB of
artifacts): two fit in 9 MiB, three do not."""
SWAP_BUDGET_MB = 13.0
"""Three versions: another model, the version serving and the one a hot swap loads beside it."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("memory-models")
    return {name: build_image_model(root / name, name) for name in (*NAMES, "delta")}


def serve(store, registry, tenant: str, folder: Path, versions: tuple[int, ...] = (1,)) -> dict:
    """Upload and serve; each version's document carries its metadata.json, as the registry's does."""
    metadata = json.loads((folder / "metadata.json").read_text())
    uploaded = {version: upload_version(store, tenant, folder, version) for version in versions}
    for document in uploaded.values():
        document["metadata"] = {**metadata, **document["metadata"]}
    registry.serve(serving_document(tenant, folder, uploaded, versions[-1]))
    return uploaded


def predict(replica, headers, name: str):
    return replica.client.post(f"/v1/models/{name}:predict", json={"images": [RED]}, headers=headers)


def version_states(replica, headers, name: str) -> dict:
    response = replica.client.get(f"/v2/models/{name}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["flywheel"]["versions"]


def metric(replica, name: str, **labels: str) -> float:
    text = replica.client.get("/metrics").get_data(as_text=True)
    return sum(
        value
        for sample_labels, value in metric_samples(text, name)
        if all(sample_labels.get(k) == v for k, v in labels.items())
    )


def test_three_models_in_a_budget_for_two_load_on_demand_and_evict_the_least_recently_used(
    inference, store, registry, tenants, folders
) -> None:
    alice = tenants.alice
    for name in NAMES:
        serve(store, registry, alice.tenant, folders[name])
    replica = inference(model_memory_budget_mb=BUDGET_MB)
    budget = int(BUDGET_MB * 1024 * 1024)
    assert version_states(replica, alice.headers, "alpha")["1"] == {"state": "unloaded", "reason": "not_requested"}
    cold = replica.client.get("/v2/models/alpha", headers=alice.headers).get_json()  # described as registered
    assert cold["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
    assert cold["flywheel"]["labels"] == ["red", "blue"] and cold["versions"] == ["1"]
    assert replica.client.get("/v2/models/alpha/ready", headers=alice.headers).status_code == 200  # servable

    for name in NAMES:  # each a cold start the request waits for (the default policy)
        response = predict(replica, alice.headers, name)
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["predictions"][0]["label"] == "red"
        assert metric(replica, "flywheel_inference_model_memory_bytes") <= budget

    evicted = version_states(replica, alice.headers, "alpha")["1"]
    assert evicted["state"] == "unloaded" and evicted["reason"] == "evicted" and evicted["evicted_at"]
    for name in ("beta", "gamma"):
        ready = version_states(replica, alice.headers, name)["1"]
        assert ready["state"] == "ready" and ready["residency"]["reason"] == "recent"
        assert ready["residency"]["memory_bytes"] > 4 * 1024 * 1024
    assert metric(replica, "flywheel_inference_evictions_total", model="alpha") == 1
    assert metric(replica, "flywheel_inference_evictions_total") == 1
    assert metric(replica, "flywheel_inference_resident_versions", reason="recent") == 2
    assert metric(replica, "flywheel_inference_resident_versions", model="alpha") == 0
    assert metric(replica, "flywheel_inference_cold_starts_total", outcome="loaded") == 3
    assert metric(replica, "flywheel_inference_cold_start_seconds_count") == 3
    assert metric(replica, "flywheel_inference_model_memory_budget_bytes") == budget

    assert predict(replica, alice.headers, "gamma").status_code == 200  # a hit: gamma becomes the most recent
    assert metric(replica, "flywheel_inference_version_lookups_total", model="gamma", result="hit") == 1
    pinned = replica.client.post(  # a version named in the path loads on demand too, evicting beta (the LRU)
        "/v2/models/alpha/versions/1/infer",
        json={"inputs": [{"name": "pixels", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.5] * 768}]},
        headers=alice.headers,
    )
    assert pinned.status_code == 200, pinned.get_json()
    assert version_states(replica, alice.headers, "beta")["1"]["reason"] == "evicted"
    assert version_states(replica, alice.headers, "gamma")["1"]["state"] == "ready"
    assert metric(replica, "flywheel_inference_version_lookups_total", result="miss") == 4
    budgeted = replica.server.repository.budget
    assert budgeted is not None and budgeted.peak_bytes <= budget
    assert metric(replica, "flywheel_inference_model_memory_bytes") <= budget


def test_the_reject_policy_answers_503_with_retry_after_until_the_version_is_loaded(
    inference, store, registry, tenants, folders
) -> None:
    alice = tenants.alice
    serve(store, registry, alice.tenant, folders["alpha"])
    serve(store, registry, alice.tenant, folders["beta"])
    replica = inference(model_memory_budget_mb=BUDGET_MB, cold_start_policy="reject")
    cold = predict(replica, alice.headers, "alpha")
    assert cold.status_code == 503, cold.get_json()
    assert int(cold.headers["Retry-After"]) >= 1
    assert cold.get_json()["error"]["code"] == "model_loading"
    eventually(lambda: predict(replica, alice.headers, "alpha").status_code == 200, timeout=20, what="loaded")
    assert version_states(replica, alice.headers, "alpha")["1"]["state"] == "ready"
    assert metric(replica, "flywheel_inference_failures_total", model="alpha", reason="model_loading") >= 1

    def infer_beta():
        tensor = {"name": "pixels", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.5] * 768}
        return replica.client.post("/v2/models/beta/infer", json={"inputs": [tensor]}, headers=alice.headers)

    cold_v2 = infer_beta()  # the v2 protocol answers in its own error shape
    assert cold_v2.status_code == 503 and int(cold_v2.headers["Retry-After"]) >= 1
    assert "is loading (cold start)" in cold_v2.get_json()["error"]
    eventually(lambda: infer_beta().status_code == 200, timeout=20, what="beta loaded")

    document = replica.client.get("/openapi.json").get_json()
    for path in ("/v1/models/{name}:predict", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        answer = document["paths"][path]["post"]["responses"]["503"]
        assert "Retry-After" in answer["headers"] and "model_loading" in answer["description"]


def test_a_version_larger_than_the_budget_is_refused_with_503_not_loaded(
    inference, store, registry, tenants, folders
) -> None:
    alice = tenants.alice
    serve(store, registry, alice.tenant, folders["alpha"])
    replica = inference(model_memory_budget_mb=2.0)  # less than one version's 4 MiB overhead
    response = predict(replica, alice.headers, "alpha")
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert response.get_json()["error"]["code"] == "memory_budget_full"
    assert metric(replica, "flywheel_inference_model_memory_bytes") == 0
    assert metric(replica, "flywheel_inference_cold_starts_total", outcome="over_budget") == 1


def test_a_pinned_tenants_production_version_is_loaded_at_once_and_never_evicted(
    inference, store, registry, tenants, folders
) -> None:
    alice, bob = tenants.alice, tenants.bob
    serve(store, registry, alice.tenant, folders["alpha"])
    for name in ("beta", "gamma", "delta"):
        serve(store, registry, bob.tenant, folders[name])
    replica = inference(model_memory_budget_mb=BUDGET_MB, pinned_tenants=(alice.tenant,))
    pinned = version_states(replica, alice.headers, "alpha")["1"]
    assert pinned["state"] == "ready" and pinned["residency"]["reason"] == "pinned"  # loaded before any request
    for name in ("beta", "gamma", "delta", "beta"):  # room for one more: each evicts bob's previous model
        response = predict(replica, bob.headers, name)
        assert response.status_code == 200, response.get_json()
        assert version_states(replica, alice.headers, "alpha")["1"]["state"] == "ready"
    assert metric(replica, "flywheel_inference_evictions_total", tenant=bob.tenant) == 3
    assert metric(replica, "flywheel_inference_evictions_total", tenant=alice.tenant) == 0
    assert metric(replica, "flywheel_inference_resident_versions", model="alpha", reason="pinned") == 1
    assert metric(replica, "flywheel_inference_version_loads_total", model="alpha", trigger="pinned") == 1
    assert predict(replica, alice.headers, "alpha").status_code == 200
    assert metric(replica, "flywheel_inference_version_lookups_total", model="alpha", result="miss") == 0


def test_a_lazily_promoted_version_that_fails_to_load_leaves_the_old_one_serving(
    inference, registry_bus, store, registry, tenants, folders
) -> None:
    """A cold model's new version is routed to without loading it; when its first load fails (a corrupt graph),
    the routing goes back to the old version and the request that found out is answered by it."""
    alice = tenants.alice
    folder = folders["alpha"]
    versions = serve(store, registry, alice.tenant, folder)
    replica = inference(model_memory_budget_mb=BUDGET_MB)
    versions[2] = upload_version(store, alice.tenant, folder, 2, replace_bytes={"model.onnx": b"not a graph"})
    registry.serve(serving_document(alice.tenant, folder, versions, 2))
    registry_bus.promote(alice.tenant, "alpha", 2, previous_version=1)

    def serving() -> int | None:
        routing = replica.client.get("/v2/models/alpha", headers=alice.headers).get_json()["flywheel"]["serving"]
        return routing["version"] if routing else None

    eventually(lambda: serving() == 2, timeout=20, what="version 2 routed, not loaded")
    assert version_states(replica, alice.headers, "alpha")["2"]["state"] == "unloaded"
    response = predict(replica, alice.headers, "alpha")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["model_version"] == 1
    states = version_states(replica, alice.headers, "alpha")
    assert states["2"]["state"] == "failed" and states["2"]["reason"] == "integrity"
    assert states["1"]["state"] == "ready" and serving() == 1
    assert metric(replica, "flywheel_inference_cold_starts_total", outcome="failed") == 1


@pytest.mark.faults
def test_a_swap_under_load_with_a_budget_fails_no_request(
    inference, registry_bus, store, registry, tenants, folders
) -> None:
    alice = tenants.alice
    folder = folders["alpha"]
    versions = serve(store, registry, alice.tenant, folder)
    serve(store, registry, alice.tenant, folders["beta"])  # a second model shares the budget
    replica = inference(model_memory_budget_mb=SWAP_BUDGET_MB)
    url = replica.serve()
    stop = threading.Event()
    outcomes: list[tuple[int, int | None]] = []
    lock = threading.Lock()

    def load_loop(name: str) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    response = session.post(
                        f"{url}/v1/models/{name}:predict", json={"images": [RED]}, headers=alice.headers, timeout=15
                    )
                    ok = response.status_code == 200
                    outcome = (200, response.json()["model_version"]) if ok else (-response.status_code, None)
                except requests.RequestException:
                    outcome = (-1, None)
                if name == "alpha" or outcome[0] != 200:
                    with lock:
                        outcomes.append(outcome)

    threads = [threading.Thread(target=load_loop, args=("alpha",)) for _ in range(3)]
    threads.append(threading.Thread(target=load_loop, args=("beta",)))
    for thread in threads:
        thread.start()
    try:
        eventually(lambda: len(outcomes) >= 20, what="load running")
        for new in (2, 3):
            versions[new] = upload_version(store, alice.tenant, folder, new)
            registry.serve(serving_document(alice.tenant, folder, {new: versions[new]}, new))
            registry_bus.promote(alice.tenant, "alpha", new, previous_version=new - 1)
            eventually(lambda v=new: any(version == v for _, version in outcomes[-8:]), timeout=20, what=f"v{new}")
            seen = len(outcomes)
            eventually(lambda s=seen: len(outcomes) >= s + 20, what="load after the swap")
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    failures = [status for status, _ in outcomes if status != 200]
    figures(
        "inference_hot_swap_under_load_with_a_memory_budget",
        sent=len(outcomes),
        accepted=len(outcomes) - len(failures),
        lost=0,
        duplicated=0,
        errors=len(failures),
    )
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed during the swaps: {failures[:5]}"
    assert {1, 2, 3} <= {version for _, version in outcomes}
    assert metric(replica, "flywheel_inference_version_loads_total", model="alpha", trigger="hot_swap") == 2
    budgeted = replica.server.repository.budget
    assert budgeted is not None and budgeted.peak_bytes <= int(SWAP_BUDGET_MB * 1024 * 1024)
