"""v2 JSON tensors, read by simdjson (or orjson) straight into numpy: the same answers as the binary form of the
same tensors, both `data` layouts, the fast read bit for bit the general path's, and the same 4xx answers as
before for bad bodies."""

from __future__ import annotations

import gzip
import json
import math
import struct
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from services.inference import tensors
from shared.errors import BadRequest
from shared.settings import Settings
from tests.inference.support import serving_document, upload_version

pytestmark = pytest.mark.timeout(120)

LIMIT = 1 << 20
PIXELS = np.random.default_rng(23).standard_normal((2, 3, 16, 16)).astype(np.float32)
IDS = np.array([[101, 6919, 102, 0], [101, 6659, 6659, 102]], dtype=np.int64)
MASK = (IDS != 0).astype(np.int64)


@pytest.fixture
def inference_settings(inference_settings: Settings) -> Settings:
    return replace(inference_settings, max_request_bytes=LIMIT)


@pytest.fixture
def replica(inference, store, registry, tenants, model_folders):
    for kind, version in (("image", 3), ("text", 1)):
        folder = model_folders[kind]
        uploaded = upload_version(store, tenants.alice.tenant, folder, version)
        registry.serve(serving_document(tenants.alice.tenant, folder, {version: uploaded}, version))
    return inference()


def json_input(name: str, datatype: str, array: np.ndarray, *, flat: bool = False) -> dict[str, Any]:
    data = array.reshape(-1).tolist() if flat else array.tolist()
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def binary_body(header: dict[str, Any], arrays: list[np.ndarray]) -> tuple[bytes, dict[str, str]]:
    payloads = [a.astype(a.dtype.newbyteorder("<")).tobytes() for a in arrays]
    for tensor, payload in zip(header["inputs"], payloads, strict=True):
        tensor["parameters"] = {"binary_data_size": len(payload)}
    head = json.dumps(header).encode()
    return head + b"".join(payloads), {"Inference-Header-Content-Length": str(len(head))}


def post(replica, tenants, path: str, body: bytes, extra: dict[str, str] | None = None):
    headers = {**tenants.alice.headers, "Content-Type": "application/json", **(extra or {})}
    return replica.client.post(path, data=body, headers=headers)


def answer(response) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The response header without the tensors' contents, and each output as numpy, read as tritonclient would."""
    assert response.status_code == 200, response.get_data()[:500]
    raw = response.get_data()
    size = int(response.headers.get("Inference-Header-Content-Length", len(raw)))
    header = json.loads(raw[:size])
    arrays, offset = {}, size
    for tensor in header["outputs"]:
        shape, datatype = tensor["shape"], tensor["datatype"]
        if "data" in tensor:
            if datatype == "BYTES":
                arrays[tensor["name"]] = np.array([s.encode() for s in tensor["data"]], dtype=object).reshape(shape)
            else:
                arrays[tensor["name"]] = np.array(tensor["data"], dtype=np.float32).reshape(shape)
            del tensor["data"]
            continue
        chunk = raw[offset : offset + tensor["parameters"]["binary_data_size"]]
        offset += len(chunk)
        if datatype == "BYTES":
            items, position = [], 0
            while position < len(chunk):
                (length,) = struct.unpack_from("<I", chunk, position)
                items.append(chunk[position + 4 : position + 4 + length])
                position += 4 + length
            arrays[tensor["name"]] = np.array(items, dtype=object).reshape(shape)
        else:
            arrays[tensor["name"]] = np.frombuffer(chunk, dtype="<f4").reshape(shape)
        del tensor["parameters"]
    return header, arrays


def error_of(response, status: int = 400) -> str:
    assert response.status_code == status, (response.status_code, response.get_data()[:300])
    body = response.get_json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


@pytest.mark.parametrize("binary_output", [False, True])
def test_an_fp32_json_tensor_answers_exactly_what_its_binary_form_answers(replica, tenants, binary_output) -> None:
    outputs = [{"name": "logits", "parameters": {"binary_data": binary_output}}]
    as_json = {"id": "same", "inputs": [json_input("pixels", "FP32", PIXELS)], "outputs": outputs}
    as_binary = {"id": "same", "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 3, 16, 16]}]}
    body, extra = binary_body({**as_binary, "outputs": outputs}, [PIXELS])
    json_header, json_arrays = answer(post(replica, tenants, "/v2/models/colours/infer", json.dumps(as_json).encode()))
    binary_header, binary_arrays = answer(
        post(replica, tenants, "/v2/models/colours/infer", body, {**extra, "Content-Type": "application/octet-stream"})
    )
    assert json_header == binary_header
    assert json_header["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [2, 2]}]
    assert json_arrays["logits"].tobytes() == binary_arrays["logits"].tobytes()  # bit for bit
    expected = np.stack([PIXELS[:, 0].mean(axis=(1, 2)), PIXELS[:, 2].mean(axis=(1, 2))], axis=1)
    np.testing.assert_allclose(json_arrays["logits"], expected, atol=1e-5)


def test_an_int64_json_tensor_answers_what_its_binary_form_answers(replica, tenants) -> None:
    inputs = [json_input("input_ids", "INT64", IDS), json_input("attention_mask", "INT64", MASK)]
    as_json = answer(post(replica, tenants, "/v2/models/reviews/infer", json.dumps({"inputs": inputs}).encode()))
    header = {"inputs": [{"name": t["name"], "datatype": "INT64", "shape": t["shape"]} for t in inputs]}
    body, extra = binary_body(header, [IDS, MASK])
    as_binary = answer(post(replica, tenants, "/v2/models/reviews/infer", body, extra))
    assert as_json[0] == as_binary[0]
    assert as_json[1]["logits"].tolist() == as_binary[1]["logits"].tolist() == [[0.0, 4.0], [8.0, 0.0]]


def test_bytes_classification_answers_are_the_same_in_json_and_binary(replica, tenants) -> None:
    def classified(binary: bool) -> np.ndarray:
        request = {
            "inputs": [json_input("pixels", "FP32", PIXELS)],
            "outputs": [{"name": "logits", "parameters": {"classification": 2, "binary_data": binary}}],
        }
        header, arrays = answer(post(replica, tenants, "/v2/models/colours/infer", json.dumps(request).encode()))
        assert header["outputs"] == [{"name": "logits", "datatype": "BYTES", "shape": [2, 2]}]
        return arrays["logits"]

    as_json, as_binary = classified(False), classified(True)
    assert as_json.tolist() == as_binary.tolist()
    assert {entry.split(b":")[2] for entry in as_json.reshape(-1)} == {b"red", b"blue"}


def test_a_bytes_input_is_refused_alike_in_json_and_binary(replica, tenants) -> None:
    as_json = {"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]}
    json_error = error_of(post(replica, tenants, "/v2/models/colours/infer", json.dumps(as_json).encode()))
    header = {"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}
    head = json.dumps(header).encode()
    binary = post(
        replica,
        tenants,
        "/v2/models/colours/infer",
        head + struct.pack("<I", 5) + b"hello",
        {"Inference-Header-Content-Length": str(len(head))},
    )
    assert json_error == error_of(binary) == "input 'pixels' must be FP32, got BYTES"


def test_nested_and_flat_data_layouts_answer_the_same(replica, tenants) -> None:
    answers = []
    for flat in (False, True):
        request = {"inputs": [json_input("pixels", "FP32", PIXELS, flat=flat)]}
        answers.append(answer(post(replica, tenants, "/v2/models/colours/infer", json.dumps(request).encode())))
    assert answers[0][0] == answers[1][0]
    assert answers[0][1]["logits"].tobytes() == answers[1][1]["logits"].tobytes()
    ragged = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3], "data": [[1.0, 2.0], [3.0]]}]}
    message = error_of(post(replica, tenants, "/v2/models/colours/infer", json.dumps(ragged).encode()))
    assert message.startswith("input 'pixels': data does not hold FP32 values")


def test_malformed_json_gets_the_standard_parsers_message(replica, tenants) -> None:
    for body in (b"{nope", b'{"inputs": [1, 2', b'{"inputs": "\xff"}', b"[" * 5000):
        with pytest.raises((ValueError, RecursionError)) as raised:
            json.loads(body)
        expected = f"the inference request is not valid JSON: {raised.value}"
        assert error_of(post(replica, tenants, "/v2/models/colours/infer", body)) == expected


def test_what_the_standard_parser_accepted_is_still_accepted(replica, tenants) -> None:
    pixels = np.zeros((1, 3, 16, 16), dtype=np.float32).tolist()
    pixels[0][0][0][0] = math.nan  # json.dumps writes the NaN literal, as Python clients do
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": pixels}]})
    response = post(replica, tenants, "/v2/models/colours/infer", body.encode())
    assert response.status_code == 200, response.get_data()
    assert b"NaN" in response.get_data()  # a NaN answer is written as before, not as null
    (logits,) = json.loads(response.get_data())["outputs"]
    assert logits["shape"] == [1, 2] and math.isnan(logits["data"][0])  # the 1x1 convolution spreads the NaN
    utf16 = json.dumps({"inputs": [json_input("pixels", "FP32", PIXELS)]}).encode("utf-16")
    assert answer(post(replica, tenants, "/v2/models/colours/infer", utf16))[0]["outputs"][0]["shape"] == [2, 2]


def test_bad_tensor_data_still_gets_its_400(replica, tenants) -> None:
    def tensor(**fields: Any) -> bytes:
        return json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], **fields}]}).encode()

    cases = [
        (tensor(data=[1, 2**64]), "input 'input_ids': data does not hold INT64 values"),
        (tensor(data=[1, "two"]), "input 'input_ids': data does not hold INT64 values"),
        (tensor(data=[1, 2, 3]), "input 'input_ids': shape [1, 2] needs 2 values, data has 3"),
        (tensor(data={"a": 1}), "input 'input_ids': data does not hold INT64 values"),
        (tensor(shape=[1, -2], data=[1, 2]), "input 'input_ids': 'shape' must be a list of non-negative integers"),
        (tensor(), "input 'input_ids' has neither 'data' nor parameters.binary_data_size"),
        (b"[]", "the inference request must be a JSON object"),
    ]
    for body, message in cases:
        assert error_of(post(replica, tenants, "/v2/models/reviews/infer", body)).startswith(message), body


def test_oversized_bodies_still_get_413(replica, tenants) -> None:
    big = np.full((16, 3, 64, 64), 0.125, dtype=np.float32)  # 7 bytes a value: 1.4 MB
    body = json.dumps({"inputs": [json_input("pixels", "FP32", big, flat=True)]}).encode()
    assert len(body) > LIMIT
    error_of(post(replica, tenants, "/v2/models/colours/infer", body), 413)
    bomb = post(replica, tenants, "/v2/models/colours/infer", gzip.compress(body), {"Content-Encoding": "gzip"})
    assert "larger than" in error_of(bomb, 413)


def fast_read(body: bytes) -> tuple[str, Any]:
    """What `parse_infer_request` makes of a JSON body that simdjson's fast read takes (checked that it does)."""
    assert tensors._loads_numeric(body) is not None, "the fast read declined this body"
    return outcome(lambda: tensors.parse_infer_request(body, None))


def general(body: bytes) -> tuple[str, Any]:
    """What the general path alone (orjson, then numpy) makes of the same body."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tensors, "_loads_numeric", lambda _body: None)
        return outcome(lambda: tensors.parse_infer_request(body, None))


def outcome(parse) -> tuple[str, Any]:
    try:
        request = parse()
    except BadRequest as exc:
        return "refused", str(exc)
    return "read", {name: (a.dtype.str, a.shape, a.tobytes()) for name, a in request.inputs.items()}


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("FP32", [0.1, -2.5e-7, 3, -0.0, 1e39, 65504.0]),  # an integer literal and float32 overflow among them
        ("FP16", [0.1, 70000.0, -1, 2.5, 0.0, 1e-8]),
        ("FP64", [0.1, 1e308, -5e-324, 7, 0.5, 2.0]),
        ("INT64", [-(2**63), 2**63 - 1, 0, 1, -1, 42]),
        ("INT8", [-128, 127, 0, 1, -1, 5]),
        ("UINT64", [2**64 - 1, 0, 1, 2**63, 7, 9]),
        ("UINT16", [65535, 0, 1, 2, 3, 4]),
    ],
)
def test_the_fast_read_gives_the_general_paths_tensor_bit_for_bit(datatype, values) -> None:
    for shape, data in (([2, 3], [values[:3], values[3:]]), ([6], values), ([1, 2, 3], [[values[:3], values[3:]]])):
        body = json.dumps({"id": "r1", "inputs": [{"name": "x0", "datatype": datatype, "shape": shape, "data": data}]})
        fast = fast_read(body.encode())
        assert fast[0] == "read" and fast == general(body.encode()), (shape, fast)


@pytest.mark.parametrize(
    ("shape", "data"),
    [
        ([2, 2], [[1.0, 2.0], [3.0]]),  # ragged, with the right count of values
        ([2, 2], [[1.0, [2.0]], [3.0, 4.0]]),  # a value wrapped in its own array
        ([2, 2], [[1.0, 2.0, []], [3.0, 4.0]]),  # an empty array among the values
        ([4], [1.0, [2.0], 3.0, 4.0]),  # flat, with one value nested
    ],
)
def test_data_that_does_not_nest_as_its_shape_is_refused_as_before(shape, data) -> None:
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": shape, "data": data}]}).encode()
    before = general(body)
    assert before[0] == "refused" and before[1].startswith("input 'pixels': ")
    assert outcome(lambda: tensors.parse_infer_request(body, None)) == before


def test_a_bracket_inside_a_string_cannot_hide_one_too_many_in_the_data() -> None:
    # The name's '[' is written as an escape, so the text holds one '[' fewer than the strings read: it would
    # make up for the extra '[' of the over-nested value if strings were counted.
    body = b'{"inputs": [{"name": "ids\\u005b0]", "datatype": "INT32", "shape": [2], "data": [128, [40000]]}]}'
    before = general(body)
    assert before[0] == "refused" and before[1].startswith("input 'ids[0]': data does not hold INT32 values")
    assert outcome(lambda: tensors.parse_infer_request(body, None)) == before
    named = json.dumps({"inputs": [{"name": "ids[0]", "datatype": "INT32", "shape": [2], "data": [1, 2]}]})
    assert outcome(lambda: tensors.parse_infer_request(named.encode(), None)) == general(named.encode())


def test_integers_out_of_their_types_range_are_refused_as_before() -> None:
    for datatype, value in (("INT8", 128), ("INT32", -(2**31) - 1), ("UINT8", 256), ("UINT32", -1), ("INT64", 2**63)):
        body = json.dumps(
            {"inputs": [{"name": "ids", "datatype": datatype, "shape": [2], "data": [1, value]}]}
        ).encode()
        with pytest.raises(BadRequest) as raised:
            tensors.parse_infer_request(body, None)
        assert str(raised.value) == general(body)[1]
        assert str(raised.value).startswith(f"input 'ids': data does not hold {datatype} values"), raised.value
