"""Hot swap: a promotion reaches every replica through Redis, the new version is loaded beside the old one
and swapped in atomically, a version that fails to load or verify leaves the old one serving, and a swap
under steady load fails no request."""

from __future__ import annotations

import base64
import shutil
import threading
from pathlib import Path

import pytest
import requests

from tests.helpers import eventually, figures
from tests.inference.support import metric_samples, png, serving_document, upload_version, write_metadata

pytestmark = pytest.mark.timeout(120)

RED = base64.b64encode(png((255, 0, 0))).decode()


def describe(replica, headers, name: str = "colours") -> dict:
    response = replica.client.get(f"/v2/models/{name}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def serving_version(replica, headers, name: str = "colours") -> int | None:
    serving = describe(replica, headers, name)["flywheel"]["serving"]
    return serving["version"] if serving else None


def predict_version(replica, headers) -> int:
    response = replica.client.post("/v1/models/colours:predict", json={"images": [RED]}, headers=headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["predictions"][0]["label"] == "red"
    return response.get_json()["model_version"]


@pytest.fixture
def colours_v1(store, registry, tenants, model_folders):
    folder = model_folders["image"]
    versions = {1: upload_version(store, tenants.alice.tenant, folder, 1)}
    registry.serve(serving_document(tenants.alice.tenant, folder, versions, 1))
    return versions


def broken_copy(source: Path, target: Path) -> Path:
    """The same model with its graph cut in half, its metadata recording the cut graph's true sha256."""
    shutil.copytree(source, target)
    graph = target / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    (target / "metadata.json").unlink()
    write_metadata(
        target,
        model_name="colours",
        task_type="image_classification",
        labels=["red", "blue"],
        inputs=[{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 16, 16]}],
        preprocessing={"kind": "image", "size": [16, 16], "mean": [0.5] * 3, "std": [0.5] * 3},
    )
    return target


def test_a_promotion_reaches_every_replica(
    inference, registry_bus, store, registry, tenants, model_folders, colours_v1, logs
) -> None:
    """Two independently created apps (replicas) both swap on one model.promoted sent through the shared bus."""
    headers = tenants.alice.headers
    folder = model_folders["image"]
    first, second = inference(), inference()
    assert serving_version(first, headers) == serving_version(second, headers) == 1
    versions = {**colours_v1, 2: upload_version(store, tenants.alice.tenant, folder, 2)}
    registry.serve(serving_document(tenants.alice.tenant, folder, {2: versions[2]}, 2))
    event_id = registry_bus.promote(tenants.alice.tenant, "colours", 2, previous_version=1)
    for replica in (first, second):
        eventually(lambda r=replica: serving_version(r, headers) == 2, timeout=20, what="version 2 serving")
        assert describe(replica, headers)["versions"] == ["2"]  # version 1 retired
        assert predict_version(replica, headers) == 2
    received = logs.find(event="model_promotion_received", event_id=event_id)
    assert len(received) == 2 and received[0]["tenant"] == tenants.alice.tenant
    swaps = logs.find(event="model_swapped", model_name="colours", tenant=tenants.alice.tenant)
    assert len(swaps) == 4  # each replica: the first load, then the swap to version 2


@pytest.mark.faults
def test_a_swap_under_steady_load_fails_no_request(
    inference, registry_bus, store, registry, tenants, model_folders, colours_v1
) -> None:
    replica = inference()
    url = replica.serve()
    folder = model_folders["image"]
    headers = tenants.alice.headers
    stop = threading.Event()
    outcomes: list[tuple[int, int | None]] = []
    lock = threading.Lock()

    def load_loop() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    response = session.post(
                        f"{url}/v1/models/colours:predict", json={"images": [RED]}, headers=headers, timeout=10
                    )
                    ok = response.status_code == 200 and response.json()["predictions"][0]["label"] == "red"
                    version = response.json().get("model_version") if ok else None
                    outcome = (response.status_code if ok else -response.status_code, version)
                except requests.RequestException:
                    outcome = (-1, None)
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=load_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        eventually(lambda: len(outcomes) >= 20, what="load running")
        versions = dict(colours_v1)
        for new in (2, 3):
            versions[new] = upload_version(store, tenants.alice.tenant, folder, new)
            registry.serve(serving_document(tenants.alice.tenant, folder, {new: versions[new]}, new))
            registry_bus.promote(tenants.alice.tenant, "colours", new, previous_version=new - 1)
            eventually(lambda v=new: any(version == v for _, version in outcomes[-8:]), timeout=20, what=f"v{new}")
            seen = len(outcomes)
            eventually(lambda s=seen: len(outcomes) >= s + 20, what="load after the swap")
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    failures = [status for status, _ in outcomes if status != 200]
    figures(
        "inference_hot_swap_under_load",
        sent=len(outcomes),
        accepted=len(outcomes) - len(failures),
        lost=0,
        duplicated=0,
        errors=len(failures),
    )
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed during the swaps: {failures[:5]}"
    versions_seen = [version for _, version in outcomes]
    assert {1, 2, 3} <= set(versions_seen)
    assert all(version == 3 for version in versions_seen[-12:])  # the swap completed: no stragglers on v1/v2


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(
    inference, registry_bus, store, registry, tenants, model_folders, colours_v1, logs, tmp_path
) -> None:
    replica = inference()
    headers = tenants.alice.headers
    folder = model_folders["image"]
    broken = broken_copy(folder, tmp_path / "broken")
    versions = {**colours_v1, 2: upload_version(store, tenants.alice.tenant, broken, 2)}
    registry.serve(serving_document(tenants.alice.tenant, folder, versions, 2))
    registry_bus.promote(tenants.alice.tenant, "colours", 2, previous_version=1)
    eventually(
        lambda: describe(replica, headers)["flywheel"]["versions"].get("2", {}).get("state") == "failed", what="refusal"
    )
    report = describe(replica, headers)["flywheel"]
    assert report["versions"]["2"]["reason"] == "invalid_graph"
    assert "cannot load the graph" in report["versions"]["2"]["message"]
    assert report["serving"]["version"] == 1 and report["desired"]["version"] == 2 and report["ready"] is True
    assert predict_version(replica, headers) == 1
    assert replica.client.get("/v2/models/colours/versions/2/ready", headers=headers).status_code == 400
    failed = logs.find(event="model_version_load_failed", version=2, model_name="colours")
    assert failed and failed[0]["reason"] == "invalid_graph"
    assert logs.find(event="model_swap_withheld", model_name="colours")
    text = replica.client.get("/metrics").get_data(as_text=True)
    assert [
        v for labels, v in metric_samples(text, "flywheel_inference_load_failures_total") if labels["version"] == "2"
    ] == [1.0]

    versions[2] = upload_version(store, tenants.alice.tenant, folder, 2)  # re-registered with a sound graph
    registry.serve(serving_document(tenants.alice.tenant, folder, versions, 2))
    registry_bus.promote(tenants.alice.tenant, "colours", 2, previous_version=1)
    eventually(lambda: serving_version(replica, headers) == 2, timeout=20, what="the repaired version 2")
    assert "2" not in {
        v for v, d in describe(replica, headers)["flywheel"]["versions"].items() if d["state"] == "failed"
    }


@pytest.mark.faults
def test_a_corrupt_artifact_is_refused_and_reported(
    inference, registry_bus, store, registry, tenants, model_folders, colours_v1, logs
) -> None:
    replica = inference()
    headers = tenants.alice.headers
    folder = model_folders["image"]
    tampered = bytearray((folder / "model.onnx").read_bytes())
    tampered[-20] ^= 0xFF  # one flipped byte: the registry's sha256 no longer matches
    versions = {
        **colours_v1,
        2: upload_version(store, tenants.alice.tenant, folder, 2, replace_bytes={"model.onnx": bytes(tampered)}),
    }
    registry.serve(serving_document(tenants.alice.tenant, folder, versions, 2))
    registry_bus.promote(tenants.alice.tenant, "colours", 2)
    eventually(
        lambda: describe(replica, headers)["flywheel"]["versions"].get("2", {}).get("state") == "failed", what="refusal"
    )
    refusal = describe(replica, headers)["flywheel"]["versions"]["2"]
    assert refusal["reason"] == "integrity" and "model.onnx hashes to sha256" in refusal["message"]
    assert serving_version(replica, headers) == 1 and predict_version(replica, headers) == 1
    assert logs.find(event="model_version_load_failed", version=2, reason="integrity")


def test_a_model_whose_only_version_is_refused_is_reported_not_served(
    inference, store, registry, tenants, model_folders
) -> None:
    folder = model_folders["text"]
    version = upload_version(store, tenants.alice.tenant, folder, 1, replace_bytes={"tokenizer.json": b"{}"})
    registry.serve(serving_document(tenants.alice.tenant, folder, {1: version}, 1))
    replica = inference()  # ready: the first load attempt is done, even though it failed
    headers = tenants.alice.headers
    assert describe(replica, headers, "reviews")["flywheel"]["versions"]["1"]["reason"] == "integrity"
    assert replica.client.get("/v2/models/reviews/ready", headers=headers).status_code == 400
    response = replica.client.post("/v1/models/reviews:predict", json={"texts": ["x"]}, headers=headers)
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"


def test_the_reconcile_poll_catches_a_missed_promotion_and_a_withdrawal(
    inference, store, registry, tenants, model_folders, colours_v1
) -> None:
    replica = inference(reconcile_interval_s=0.5)
    headers = tenants.alice.headers
    folder = model_folders["image"]
    versions = {**colours_v1, 2: upload_version(store, tenants.alice.tenant, folder, 2)}
    registry.serve(serving_document(tenants.alice.tenant, folder, versions, 1, weights={1: 50, 2: 50}, staging=2))
    eventually(
        lambda: describe(replica, headers)["versions"] == ["1", "2"], timeout=10, what="the canary loaded by the poll"
    )
    assert describe(replica, headers)["flywheel"]["serving"]["weights"] == {"1": 50, "2": 50}
    registry.withdraw(tenants.alice.tenant, "colours")
    eventually(
        lambda: replica.client.get("/v2/models/colours", headers=headers).status_code == 404, timeout=10, what="unload"
    )
