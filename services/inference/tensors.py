"""The KServe/Triton v2 tensor formats: JSON tensors, and the binary tensor data extension.

A request body is JSON, or — with `Inference-Header-Content-Length: N` — N bytes of JSON followed by the raw
bytes of the inputs whose `parameters.binary_data_size` say so, in input order (little-endian, row-major;
BYTES elements as a 4-byte length then the bytes). Outputs come back as JSON `data`, or as binary when the
output asks for `binary_data: true` or the request sets `binary_data_output: true` (the standard clients'
default); then the response carries `Inference-Header-Content-Length` too. An output may ask for
`classification: k`: the top k classes as BYTES `"<score>:<index>:<label>"`, as Triton answers.

A JSON request is read by simdjson first: each numeric input's `data` (nested rows or one flat list,
row-major) goes from the text into one numpy buffer, with no Python float per value, and only the rest of the
request becomes Python objects. That fast read is taken only when it is certainly what the general path would
give: the nesting must be exactly the declared shape (counted, so a ragged or over-nested `data` is not
flattened into acceptance; a body with a '[' inside a string is not counted and takes the general path), narrow
integers must fit their type, and any doubt sends the body down the general path. There orjson parses the
body in C and numpy converts each `data` in one call. Whatever orjson refuses is handed to the standard
library's parser, so what was accepted before still is (NaN and Infinity literals,
integers past 64 bits, UTF-16 bodies) and a malformed body gets the standard parser's message as before.
Answers are written by orjson from the numpy arrays themselves (`OPT_SERIALIZE_NUMPY`), FP32 values in
float32's shortest round-trip form. After parsing, the JSON and binary forms are one `InferRequest`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import simdjson

from shared.errors import BadRequest

V2_TO_NUMPY: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
NUMPY_TO_V2: dict[np.dtype, str] = {np.dtype(t): name for name, t in V2_TO_NUMPY.items() if name != "BYTES"}
HEADER_LENGTH = "Inference-Header-Content-Length"


def v2_datatype(dtype: np.dtype) -> str:
    return NUMPY_TO_V2.get(np.dtype(dtype), "BYTES")


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None
    classification: int


@dataclass
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    outputs: list[RequestedOutput] | None

    @property
    def binary_output(self) -> bool:
        return bool(self.parameters.get("binary_data_output", False))


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object")
    return value


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise BadRequest(f"{where}: 'shape' must be a list of non-negative integers")
    return tuple(value)


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    if header_length is not None:
        try:
            json_size = int(header_length)
        except ValueError as exc:
            raise BadRequest(f"{HEADER_LENGTH} must be an integer") from exc
        if not 0 < json_size <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} is {json_size}, but the body has {len(body)} bytes")
        header_bytes, binary = body[:json_size], memoryview(body)[json_size:]
    else:
        header_bytes, binary = body, memoryview(b"")
    fast = _loads_numeric(header_bytes) if header_length is None else None
    header = _object(fast if fast is not None else _loads(header_bytes), "the inference request")
    parameters = _object(header.get("parameters") or {}, "'parameters'")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for index, raw in enumerate(raw_inputs):
        tensor = _object(raw, f"inputs[{index}]")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"inputs[{index}] needs a 'name'")
        if name in inputs:
            raise BadRequest(f"input {name!r} is given twice")
        datatype = tensor.get("datatype")
        if datatype not in V2_TO_NUMPY:
            raise BadRequest(f"input {name!r}: unknown datatype {datatype!r}; use one of {sorted(V2_TO_NUMPY)}")
        shape = _shape(tensor.get("shape"), f"input {name!r}")
        tensor_parameters = _object(tensor.get("parameters") or {}, f"input {name!r} parameters")
        size = tensor_parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequest(f"input {name!r}: binary_data_size {size!r} runs past the binary data")
            inputs[name] = _from_binary(binary[offset : offset + size], datatype, shape, name)
            offset += size
        elif "data" in tensor:
            inputs[name] = _from_json(tensor["data"], datatype, shape, name)
        else:
            raise BadRequest(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        datatypes[name] = datatype
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    return InferRequest(
        id=str(header["id"]) if header.get("id") is not None else None,
        parameters=parameters,
        inputs=inputs,
        datatypes=datatypes,
        outputs=_requested_outputs(header.get("outputs")),
    )


def _loads(header_bytes: bytes) -> Any:
    try:
        return orjson.loads(header_bytes)
    except orjson.JSONDecodeError:
        pass  # the standard parser decides: it accepts a little more, and its message is the one clients know
    try:
        return json.loads(header_bytes)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"the inference request is not valid JSON: {exc}") from exc


# The buffer simdjson fills for each datatype it reads straight into numpy: doubles, signed or unsigned 64-bit
# integers; the cast to the declared type follows. BOOL and BYTES take the general path.
_BUFFER_OF = {
    **dict.fromkeys(("FP16", "FP32", "FP64"), ("d", np.float64)),
    **dict.fromkeys(("INT8", "INT16", "INT32", "INT64"), ("i", np.int64)),
    **dict.fromkeys(("UINT8", "UINT16", "UINT32", "UINT64"), ("u", np.uint64)),
}


def _loads_numeric(body: bytes) -> dict[str, Any] | None:
    """The request as `_loads` would read it, but with each numeric input's `data` already a flat numpy array;
    None whenever that is not certain (the caller then takes the general path)."""
    try:
        document = simdjson.Parser().parse(body)  # a fresh parser: its documents die with its next parse
        if not isinstance(document, simdjson.Object) or not isinstance(document.get("inputs"), simdjson.Array):
            return None
        # keys() then each value: items() would build every value as Python objects, `data` included
        header = {key: _plain(document[key]) for key in document.keys() if key != "inputs"}  # noqa: SIM118
        inputs: list[Any] = []
        arrays = 1 + _brackets(header)  # every '[' of the body, counted from what was read
        for raw in document["inputs"]:
            if not isinstance(raw, simdjson.Object):
                inputs.append(_plain(raw))
                arrays += _brackets(inputs[-1])
                continue
            tensor = {key: _plain(raw[key]) for key in raw.keys() if key != "data"}  # noqa: SIM118
            arrays += _brackets(tensor)
            if "data" in raw:
                data = raw["data"]
                read = _numeric_data(data, tensor) if isinstance(data, simdjson.Array) else None
                if read is None:
                    tensor["data"] = _plain(data)
                    arrays += _brackets(tensor["data"])
                else:
                    tensor["data"], nested = read
                    arrays += nested
            inputs.append(tensor)
        header["inputs"] = inputs
    except Exception:  # any doubt: the general path reads the body and names what is wrong
        return None
    # No string holds a '[', so every '[' of the body opens an array. One that was not counted (a ragged or
    # over-nested `data`): the general path decides, with its own message.
    return header if body.count(b"[") == arrays else None


def _numeric_data(data: simdjson.Array, tensor: dict[str, Any]) -> tuple[np.ndarray, int] | None:
    """The values of a numeric `data` in one flat array, and how many JSON arrays its shape nests them in."""
    kind = _BUFFER_OF.get(tensor.get("datatype"))  # type: ignore[arg-type]
    shape = tensor.get("shape")
    if kind is None or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return None
    of_type, buffer_dtype = kind
    values = np.frombuffer(data.as_buffer(of_type=of_type), dtype=buffer_dtype)
    if values.size != math.prod(shape):
        return None
    if len(data) and isinstance(data[0], simdjson.Array):  # nested rows: one array per row of every level
        if not shape or not _nests(data, shape):
            return None
        arrays, rows = 1, 1
        for dim in shape[:-1]:
            rows *= dim
            arrays += rows
    else:
        arrays = 1
    target = np.dtype(V2_TO_NUMPY[tensor["datatype"]])
    if target.kind in "iu" and target.itemsize < 8 and values.size:
        limits = np.iinfo(target)
        if values.min() < limits.min or values.max() > limits.max:
            return None  # the general path refuses it, naming the value that does not fit
    return values, arrays


def _nests(array: simdjson.Array, shape: list[int]) -> bool:
    if len(array) != shape[0]:
        return False
    if len(shape) == 1:
        return True
    return all(isinstance(row, simdjson.Array) and _nests(row, shape[1:]) for row in array)


def _plain(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _brackets(value: Any) -> int:
    """How many '[' the JSON text of a read value holds: one per list. A string or key holding '[' raises: it may
    have been written raw or as an escape, so the text's count could no longer be checked against the lists."""
    if isinstance(value, list):
        return 1 + sum(_brackets(item) for item in value)
    if isinstance(value, dict):
        return sum(_brackets(key) + _brackets(item) for key, item in value.items())
    if isinstance(value, str) and "[" in value:
        raise ValueError("a '[' inside a string: the general path reads this body")
    return 0


def _requested_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest("'outputs' must be a list")
    outputs = []
    for index, item in enumerate(raw):
        output = _object(item, f"outputs[{index}]")
        if not isinstance(output.get("name"), str):
            raise BadRequest(f"outputs[{index}] needs a 'name'")
        parameters = _object(output.get("parameters") or {}, f"output {output['name']!r} parameters")
        classification = parameters.get("classification", 0)
        if not isinstance(classification, int) or classification < 0:
            raise BadRequest(f"output {output['name']!r}: classification must be a non-negative integer")
        binary = parameters.get("binary_data")
        outputs.append(RequestedOutput(output["name"], None if binary is None else bool(binary), classification))
    return outputs


def _from_json(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    try:
        if datatype == "BYTES":
            flat = np.asarray(
                [item.encode() if isinstance(item, str) else bytes(item) for item in _flatten(data)], dtype=object
            )
        elif isinstance(data, np.ndarray):  # read by simdjson: already flat, in range, in a 64-bit type
            flat = data.astype(V2_TO_NUMPY[datatype], copy=False)
        else:
            flat = np.asarray(data, dtype=V2_TO_NUMPY[datatype]).reshape(-1)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise BadRequest(f"input {name!r}: data does not hold {datatype} values: {exc}") from exc
    if flat.size != math.prod(shape):
        raise BadRequest(f"input {name!r}: shape {list(shape)} needs {math.prod(shape)} values, data has {flat.size}")
    return flat.reshape(shape)


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [value for item in data for value in _flatten(item)]
    return [data]


def _from_binary(chunk: memoryview, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        items, position = [], 0
        while position < len(chunk):
            if position + 4 > len(chunk):
                raise BadRequest(f"input {name!r}: truncated BYTES element")
            (length,) = struct.unpack_from("<I", chunk, position)
            position += 4
            items.append(bytes(chunk[position : position + length]))
            position += length
        if position != len(chunk) or len(items) != count:
            raise BadRequest(f"input {name!r}: BYTES data holds {len(items)} elements, shape needs {count}")
        return np.asarray(items, dtype=object).reshape(shape)
    dtype = np.dtype(V2_TO_NUMPY[datatype]).newbyteorder("<")
    if len(chunk) != count * dtype.itemsize:
        raise BadRequest(
            f"input {name!r}: {len(chunk)} bytes of {datatype} do not fill shape {list(shape)} "
            f"({count * dtype.itemsize} bytes)"
        )
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def _classify(array: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    rows = array.reshape(array.shape[0], -1)
    k = min(k, rows.shape[1])
    top = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    entries = [
        [
            f"{rows[r, i]:.6f}:{i}:{labels[i]}".encode() if i < len(labels) else f"{rows[r, i]:.6f}:{i}".encode()
            for i in top[r]
        ]
        for r in range(rows.shape[0])
    ]
    return np.asarray(entries, dtype=object).reshape(rows.shape[0], k)


def _bytes_payload(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)


def encode_infer_response(
    *,
    model_name: str,
    model_version: int,
    request: InferRequest,
    outputs: dict[str, np.ndarray],
    labels: list[str],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    requested = request.outputs or [RequestedOutput(name, None, 0) for name in outputs]
    tensors: list[dict[str, Any]] = []
    binary_parts: list[bytes] = []
    finite = True
    for wanted in requested:
        array = outputs[wanted.name]
        if wanted.classification:
            array = _classify(array, wanted.classification, labels)
        datatype = "BYTES" if array.dtype == object else v2_datatype(array.dtype)
        tensor: dict[str, Any] = {"name": wanted.name, "datatype": datatype, "shape": list(array.shape)}
        binary = wanted.binary if wanted.binary is not None else request.binary_output
        if binary:
            payload = (
                _bytes_payload(array)
                if datatype == "BYTES"
                else np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
            )
            tensor["parameters"] = {"binary_data_size": len(payload)}
            binary_parts.append(payload)
        elif datatype == "BYTES":
            tensor["data"] = [item.decode("utf-8", "replace") for item in array.reshape(-1)]
        else:
            flat = np.ascontiguousarray(array.reshape(-1))
            finite = finite and (flat.dtype.kind != "f" or bool(np.isfinite(flat).all()))
            tensor["data"] = flat
        tensors.append(tensor)
    header: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version), "outputs": tensors}
    if request.id is not None:
        header["id"] = request.id
    if parameters:
        header["parameters"] = parameters
    header_bytes = _dumps(header, finite)
    if not binary_parts:
        return header_bytes, {"Content-Type": "application/json"}
    return header_bytes + b"".join(binary_parts), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header_bytes)),
    }


def _dumps(header: dict[str, Any], finite: bool) -> bytes:
    if finite:  # orjson writes NaN and infinities as null: those answers keep the standard writer's literals
        try:
            return orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:
            pass  # what orjson does not write (a non-native byte order, an integer past 64 bits in parameters)
    return json.dumps(header, separators=(",", ":"), default=_as_list).encode()


def _as_list(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
