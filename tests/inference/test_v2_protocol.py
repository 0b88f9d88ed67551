"""The KServe/Triton v2 protocol: health, metadata, JSON and binary tensors, errors, and the standard client."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tests.helpers import eventually
from tests.inference.support import serving_document, upload_version

pytestmark = pytest.mark.timeout(120)

RED = np.stack([np.ones((16, 16)), -np.ones((16, 16)), -np.ones((16, 16))]).astype(np.float32)  # normalised red
BLUE = RED[::-1].copy()  # (-1, -1, 1)


@pytest.fixture
def served(store, registry, tenants, model_folders):
    image = model_folders["image"]
    registry.serve(
        serving_document(tenants.alice.tenant, image, {3: upload_version(store, tenants.alice.tenant, image, 3)}, 3)
    )
    text = model_folders["text"]
    registry.serve(
        serving_document(tenants.alice.tenant, text, {1: upload_version(store, tenants.alice.tenant, text, 1)}, 1)
    )


def error_of(response) -> str:
    body = response.get_json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


def test_readiness_waits_for_the_registry_and_loads_in_the_background(inference, registry, served, tenants) -> None:
    registry.available = False
    replica = inference(wait_ready=False)
    assert replica.client.get("/v2/health/live").status_code == 200
    not_ready = replica.client.get("/v2/health/ready")
    assert not_ready.status_code == 400 and not_ready.get_json()["ready"] is False
    assert replica.client.get("/readyz").status_code == 200  # the process and its dependencies are fine
    registry.available = True
    eventually(lambda: replica.client.get("/v2/health/ready").status_code == 200, timeout=15, what="ready")
    assert replica.client.get("/v2/models/colours/ready", headers=tenants.alice.headers).status_code == 200


def test_model_metadata_reports_the_graphs_tensors(inference, served, tenants) -> None:
    replica = inference()
    headers = tenants.alice.headers
    metadata = replica.client.get("/v2/models/colours", headers=headers).get_json()
    assert (
        metadata["name"] == "colours" and metadata["versions"] == ["3"] and metadata["platform"] == "onnxruntime_onnx"
    )
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]
    assert metadata["flywheel"]["serving"] == {"version": 3, "weights": {"3": 100}}
    assert metadata["flywheel"]["versions"]["3"]["state"] == "ready"
    assert metadata["flywheel"]["versions"]["3"]["provider"] == "CPUExecutionProvider"
    text = replica.client.get("/v2/models/reviews/versions/1", headers=headers).get_json()
    assert {t["name"]: (t["datatype"], t["shape"]) for t in text["inputs"]} == {
        "input_ids": ("INT64", [-1, -1]),
        "attention_mask": ("INT64", [-1, -1]),
    }
    assert replica.client.get("/v2/models/colours/versions/3/ready", headers=headers).status_code == 200
    assert replica.client.get("/v2/models/colours/versions/4/ready", headers=headers).status_code == 400
    config = replica.client.get("/v2/models/colours/config", headers=headers).get_json()
    assert config["max_batch_size"] == 32 and config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert config["input"] == [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [3, 16, 16]}]
    assert error_of(replica.client.get("/v2/models/colours/versions/x", headers=headers)).startswith("version")
    server = replica.client.get("/v2").get_json()
    assert "binary_tensor_data" in server["extensions"]


def test_json_tensors_in_and_out(inference, served, tenants) -> None:
    replica = inference()
    pixels = np.stack([RED, BLUE])
    request = {
        "id": "req-7",
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 3, 16, 16], "data": pixels.tolist()}],
    }
    response = replica.client.post("/v2/models/colours/infer", json=request, headers=tenants.alice.headers)
    assert response.status_code == 200, response.get_json()
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.get_json()
    assert body["id"] == "req-7" and body["model_name"] == "colours" and body["model_version"] == "3"
    (logits,) = body["outputs"]
    assert logits["name"] == "logits" and logits["datatype"] == "FP32" and logits["shape"] == [2, 2]
    assert logits["data"] == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)

    flat = {
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": RED.reshape(-1).tolist()}]
    }
    flat["outputs"] = [{"name": "logits", "parameters": {"classification": 2}}]
    classified = replica.client.post("/v2/models/colours/versions/3/infer", json=flat, headers=tenants.alice.headers)
    assert classified.status_code == 200, classified.get_json()
    (top,) = classified.get_json()["outputs"]
    assert top["datatype"] == "BYTES" and top["shape"] == [1, 2]
    assert top["data"] == ["1.000000:0:red", "-1.000000:1:blue"]


def test_binary_tensor_extension_by_hand(inference, served, tenants) -> None:
    replica = inference()
    ids = np.array([[101, 6919, 102, 0], [101, 6659, 6659, 102]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    header = {
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [2, 4], "parameters": {"binary_data_size": ids.nbytes}},
            {
                "name": "attention_mask",
                "datatype": "INT64",
                "shape": [2, 4],
                "parameters": {"binary_data_size": mask.nbytes},
            },
        ],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    response = replica.client.post(
        "/v2/models/reviews/infer",
        data=head + ids.tobytes() + mask.tobytes(),
        headers={
            **tenants.alice.headers,
            "Inference-Header-Content-Length": str(len(head)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert response.status_code == 200, response.get_data()
    size = int(response.headers["Inference-Header-Content-Length"])
    raw = response.get_data()
    body = json.loads(raw[:size])
    (logits,) = body["outputs"]
    assert logits["parameters"]["binary_data_size"] == 16 and logits["shape"] == [2, 2]
    values = np.frombuffer(raw[size:], dtype="<f4").reshape(2, 2)
    assert values.tolist() == [[0.0, 4.0], [8.0, 0.0]]

    strings = {"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}
    head = json.dumps(strings).encode()
    wrong_type = replica.client.post(
        "/v2/models/colours/infer",
        data=head + struct.pack("<I", 5) + b"hello",
        headers={**tenants.alice.headers, "Inference-Header-Content-Length": str(len(head))},
    )
    assert wrong_type.status_code == 400 and "must be FP32" in error_of(wrong_type)


PROTOCOL_ERRORS = [
    (
        {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.0] * 192}]},
        "must have shape",
    ),
    ({"inputs": [{"name": "pixels", "datatype": "INT64", "shape": [1, 3, 16, 16], "data": [0] * 768}]}, "must be FP32"),
    (
        {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.0] * 7}]},
        "needs 768 values",
    ),
    ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [0.0]}]}, "missing ['pixels']"),
    ({"inputs": []}, "non-empty list"),
    ({"inputs": [{"name": "pixels", "datatype": "FP99", "shape": [1], "data": [1]}]}, "unknown datatype"),
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": ["x"] * 768}]}, "FP32 values"),
    (
        {
            "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.0] * 768}],
            "outputs": [{"name": "probabilities"}],
        },
        "no output 'probabilities'",
    ),
]


def test_protocol_errors_are_400_with_a_message(inference, served, tenants) -> None:
    replica = inference()
    for body, message in PROTOCOL_ERRORS:
        response = replica.client.post("/v2/models/colours/infer", json=body, headers=tenants.alice.headers)
        assert response.status_code == 400, (body, response.get_json())
        assert message in error_of(response)


def test_other_errors_keep_the_protocol_shape(inference, served, tenants) -> None:
    replica = inference()
    assert (
        replica.client.post("/v2/models/colours/infer", data="{nope", headers=tenants.alice.headers).status_code == 400
    )
    unauthorised = replica.client.post("/v2/models/colours/infer", json={})
    assert unauthorised.status_code == 401 and "credentials" in error_of(unauthorised)
    other_tenant = replica.client.post("/v2/models/colours/infer", json={}, headers=tenants.bob.headers)
    assert other_tenant.status_code == 404 and "not served" in error_of(other_tenant)
    assert replica.client.get("/v2/models/colours/stats", headers=tenants.alice.headers).status_code == 404
    assert "no v2 endpoint" in error_of(replica.client.get("/v2/repository/index"))
    bad_length = replica.client.post(
        "/v2/models/colours/infer",
        data=b"{}",
        headers={**tenants.alice.headers, "Inference-Header-Content-Length": "99"},
    )
    assert bad_length.status_code == 400 and "Inference-Header-Content-Length" in error_of(bad_length)


def test_the_standard_v2_client_works_unchanged(inference, served, tenants) -> None:
    # The test's dependency: tritonclient[http]==2.73.0 (dev extra). Without it the test is reported skipped.
    triton = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http]==2.73.0 (the dev extra)")
    from tritonclient.utils import InferenceServerException

    replica = inference()
    url = replica.serve().removeprefix("http://")
    client = triton.InferenceServerClient(url=url)
    # tenants.*.headers is a fresh dict each time: the client adds its own headers to the dict it is given
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("colours", headers=tenants.alice.headers)
        assert not client.is_model_ready("colours", model_version="9", headers=tenants.alice.headers)
        metadata = client.get_model_metadata("colours", headers=tenants.alice.headers)
        assert metadata["inputs"][0]["name"] == "pixels"
        assert client.get_model_config("colours", headers=tenants.alice.headers)["max_batch_size"] == 32

        pixels = triton.InferInput("pixels", [2, 3, 16, 16], "FP32")
        pixels.set_data_from_numpy(np.stack([RED, BLUE]))  # binary tensor data, the client's default
        result = client.infer("colours", [pixels], headers=tenants.alice.headers, request_compression_algorithm="gzip")
        np.testing.assert_allclose(result.as_numpy("logits"), [[1, -1], [-1, 1]], atol=1e-5)
        assert result.get_response()["model_version"] == "3"

        ids = triton.InferInput("input_ids", [1, 3], "INT64")
        ids.set_data_from_numpy(np.array([[101, 6919, 102]], dtype=np.int64), binary_data=False)
        mask = triton.InferInput("attention_mask", [1, 3], "INT64")
        mask.set_data_from_numpy(np.ones((1, 3), dtype=np.int64), binary_data=False)
        as_json = client.infer(
            "reviews",
            [ids, mask],
            model_version="1",
            outputs=[triton.InferRequestedOutput("logits", binary_data=False)],
            headers=tenants.alice.headers,
        )
        assert as_json.as_numpy("logits").tolist() == [[0.0, 4.0]]
        top = client.infer(
            "reviews",
            [ids, mask],
            outputs=[triton.InferRequestedOutput("logits", class_count=1)],
            headers=tenants.alice.headers,
        )
        assert top.as_numpy("logits").tolist() == [[b"4.000000:1:pos"]]

        wrong = triton.InferInput("pixels", [1, 3, 8, 8], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 3, 8, 8), dtype=np.float32))
        with pytest.raises(InferenceServerException) as raised:
            client.infer("colours", [wrong], headers=tenants.alice.headers)
        assert raised.value.status() == "400" and "must have shape" in raised.value.message()
        with pytest.raises(InferenceServerException) as missing:
            client.infer("colours", [pixels], headers=tenants.bob.headers)
        assert missing.value.status() == "404"
    finally:
        client.close()
