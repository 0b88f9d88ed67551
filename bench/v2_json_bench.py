"""The v2 JSON tensor path in process: parse and encode cost, before (standard library), orjson, and after
(simdjson's fast read of numeric data, orjson for the rest).

    python -m bench.v2_json_bench            # 15 interleaved rounds
    python -m bench.v2_json_bench --quick    # 5 shorter rounds: well under a minute
    python -m bench.v2_json_bench --quick --served   # and the served good-put, JSON beside binary: about a minute

What it measures, on one 1x3x64x64 FP32 image tensor (12,288 values, a ~250 KB JSON body: the issue's figure),
in its nested `data` layout (rows of lists, as `tensor.tolist()` writes it) and its flat layout (one list):

- before: what the previous `parse_infer_request` did per numeric tensor: the standard library's `json.loads`
  into Python lists, then `np.asarray(data, dtype)` and the shape check;
- orjson: the service's general path alone (orjson, then numpy in one call), every check included: what the
  service did before simdjson's fast read;
- after: the service's own `services.inference.tensors.parse_infer_request` on the same body (simdjson reading
  the numeric `data` straight into one buffer, the rest of the request as Python objects), every check included;
- binary: the same function on the binary tensor data extension's form of the same tensor, the floor the JSON
  path is compared with;
- encoding an answer as JSON: the previous writer (`tolist()` and `json.dumps`) against the service's own
  `encode_infer_response` (orjson writing the numpy arrays), for a 1,000-class logits row and a 12,288-value
  output.

Each round times every variant in turn (a varying order), so a slow moment of a shared machine lands on all of
them; medians over rounds, ratios per round.

With `--served`, two copies of the real inference app run side by side under granian (`flywheel up`'s command,
1 worker x 16 threads, batching max 32 / 2 ms, the stand-ins of `bench.inference_bench`), serving
mobilenet_v3_small at 64x64: "after" as it is, "orjson" with `simdjson` shadowed by a stand-in whose parser
declines every body (so the general path reads it), and "before" with that stand-in and `orjson` shadowed by a
module that does the same calls with the standard library's `json` (so its JSON path is the first one:
`json.loads` into Python lists, `tolist()` and `json.dumps` for answers; everything else is the same code). The
bounded load generator of `bench.inference_bench` sends the same tensors at concurrency 32 as v2 JSON to all
three and as v2 binary to "after", in rotating rounds: good-put (200 answers per second), the server's CPU per request,
and the ratios. Raw in-process ONNX Runtime at batch 32 on the same tensors (`CeilingProbe`) is sampled before
each round, so each form's good-put is also given as a share of the ceiling measured beside it.

With `--profile` (and `--served`), py-spy then records the "after" server through one more measurement of each
form (binary, JSON) and prints where the sampled (not idle) threads are: per part of the request path (Flask
dispatch, the request log line, key verification, the request annotations, Prometheus, canary routing, tensor
parsing and encoding, fair use, the batcher handoff) and, apart, threads blocked on a lock or a socket (`BLOCKED`),
as shares of the samples.

With `--request-cost`, the real app runs in this process (the same stand-ins, no HTTP server) and one thread
sends it the binary and the JSON request through WSGI, one at a time: the request thread's CPU per request
(`time.thread_time`, so the wait for the batch is not counted; the batcher's own thread is not either), then
one pass under cProfile on that thread's CPU clock, its time split by the same parts of the request path
(a builtin's time goes to its callers' parts). Unlike the served profile it does not depend on how loaded the
machine is (its call counts and shares; its microseconds do), so it is the one that shows what a cut saves.

Writes bench/results/v2_json.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests

from bench.common import Progress, Stats, describe_machine, machine, write_results
from bench.inference_bench import (
    API_KEY,
    IMAGE,
    TOKEN,
    CeilingProbe,
    Workload,
    export_image_model,
    http_request,
    measure,
    stand_in,
    start_server,
)
from bench.profiling import Profile, Recording
from services.inference import tensors
from services.inference.tensors import V2_TO_NUMPY, InferRequest, encode_infer_response, parse_infer_request
from shared.storage import FileStore
from shared.tables import print_table
from testkit.processes import answers_ok, managed_processes, wait_until

SHAPE = (1, 3, 64, 64)


def json_body(pixels: np.ndarray, *, flat: bool) -> bytes:
    data = pixels.reshape(-1).tolist() if flat else pixels.tolist()
    tensor = {"name": "pixels", "datatype": "FP32", "shape": list(pixels.shape), "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


def binary_body(pixels: np.ndarray) -> tuple[bytes, str]:
    tensor = {
        "name": "pixels",
        "datatype": "FP32",
        "shape": list(pixels.shape),
        "parameters": {"binary_data_size": pixels.nbytes},
    }
    header = json.dumps({"inputs": [tensor]}).encode()
    return header + pixels.tobytes(), str(len(header))


def stdlib_parse(body: bytes) -> dict[str, np.ndarray]:
    """The previous parser's steps for numeric tensors (what the service ran before orjson)."""
    header = json.loads(body)
    inputs = {}
    for tensor in header["inputs"]:
        shape = tuple(tensor["shape"])
        flat = np.asarray(tensor["data"], dtype=V2_TO_NUMPY[tensor["datatype"]]).reshape(-1)
        if flat.size != math.prod(shape):
            raise ValueError("shape mismatch")
        inputs[tensor["name"]] = flat.reshape(shape)
    return inputs


def general_parse(body: bytes) -> Any:
    """The service's parser with simdjson's fast read declined: its general path (orjson, then numpy)."""
    original, tensors._loads_numeric = tensors._loads_numeric, lambda _body: None
    try:
        return parse_infer_request(body, None)
    finally:
        tensors._loads_numeric = original


def stdlib_encode(outputs: dict[str, np.ndarray]) -> bytes:
    """The previous writer: each output's values through `tolist()`, the header through `json.dumps`."""
    tensors = [
        {"name": name, "datatype": "FP32", "shape": list(array.shape), "data": array.reshape(-1).tolist()}
        for name, array in outputs.items()
    ]
    header = {"model_name": "mobilenet", "model_version": "1", "outputs": tensors}
    return json.dumps(header, separators=(",", ":")).encode()


def per_call_ms(call: Callable[[], Any], seconds: float) -> float:
    call()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        call()
        calls += 1
    return elapsed / calls * 1000


def variants() -> tuple[dict[str, Callable[[], Any]], dict[str, int]]:
    rng = np.random.default_rng(23)
    pixels = rng.standard_normal(SHAPE, dtype=np.float32)
    nested, flat = json_body(pixels, flat=False), json_body(pixels, flat=True)
    binary, header_length = binary_body(pixels)
    for body in (nested, flat):  # every parser reads the same tensor out of each body, the fast read taken
        assert tensors._loads_numeric(body) is not None
        after = parse_infer_request(body, None).inputs["pixels"]
        assert np.array_equal(stdlib_parse(body)["pixels"], after) and np.array_equal(after, pixels)
        assert np.array_equal(general_parse(body).inputs["pixels"], after)
    assert np.array_equal(parse_infer_request(binary, header_length).inputs["pixels"], pixels)
    request = InferRequest(id=None, parameters={}, inputs={}, datatypes={}, outputs=None)
    answers = {
        "logits_1000": {"logits": rng.standard_normal((1, 1000), dtype=np.float32)},
        "output_12288": {"logits": rng.standard_normal((1, 12288), dtype=np.float32)},
    }
    calls: dict[str, Callable[[], Any]] = {
        "parse_nested_before": lambda: stdlib_parse(nested),
        "parse_nested_orjson": lambda: general_parse(nested),
        "parse_nested_after": lambda: parse_infer_request(nested, None),
        "parse_flat_before": lambda: stdlib_parse(flat),
        "parse_flat_orjson": lambda: general_parse(flat),
        "parse_flat_after": lambda: parse_infer_request(flat, None),
        "parse_binary": lambda: parse_infer_request(binary, header_length),
    }
    for name, outputs in answers.items():
        new, _ = encode_infer_response(model_name="m", model_version=1, request=request, outputs=outputs, labels=[])
        assert np.array_equal(np.asarray(json.loads(new)["outputs"][0]["data"], dtype=np.float32), outputs["logits"][0])
        calls[f"encode_{name}_before"] = lambda outputs=outputs: stdlib_encode(outputs)
        calls[f"encode_{name}_after"] = lambda outputs=outputs: encode_infer_response(
            model_name="mobilenet", model_version=1, request=request, outputs=outputs, labels=[]
        )
    return calls, {"nested": len(nested), "flat": len(flat), "binary": len(binary)}


def served_workloads(count: int = 32) -> dict[str, Workload]:
    """The same `count` 1x3x64x64 tensors, as v2 JSON (nested `data`, JSON answer) and as v2 binary."""
    rng = np.random.default_rng(7)
    pixels = [rng.standard_normal((1, 3, IMAGE, IMAGE), dtype=np.float32) for _ in range(count)]
    path = "/v2/models/mobilenet/infer"
    as_json = [http_request(path, json_body(p, flat=False), "application/json") for p in pixels]
    as_binary = []
    for p in pixels:
        body, length = binary_body(p)
        as_binary.append(
            http_request(path, body, "application/octet-stream", {"Inference-Header-Content-Length": length})
        )
    feeds = [{"pixels": p} for p in pixels]
    return {
        "json": Workload("image, v2 JSON", "mobilenet", f"POST {path} (JSON)", as_json, feeds),
        "binary": Workload("image, v2 binary", "mobilenet", f"POST {path} (binary)", as_binary, feeds),
    }


MODES = ("before", "orjson", "after")
STDLIB_ORJSON = """\"\"\"The bench's "before" server: orjson's calls done by the standard library's json.\"\"\"
import json

JSONDecodeError = json.JSONDecodeError
OPT_SERIALIZE_NUMPY = 0


def loads(data):
    return json.loads(data)


def dumps(value, option=0):
    return json.dumps(value, separators=(",", ":"), default=lambda array: array.tolist()).encode()
"""

NO_SIMDJSON = """\"\"\"The bench's "before" and "orjson" servers: a simdjson whose parser declines every body.\"\"\"


class Object:
    pass


class Array:
    pass


class Parser:
    def parse(self, body):
        raise ValueError("simdjson is shadowed by the bench: the general path reads this body")
"""


def same_answer_different_writer(before: str, after: str) -> None:
    """Both servers answer a JSON request with the same float32 values, and "before" really runs the standard
    library's writer (float32 values written as Python floats, so its answer is longer)."""
    pixels = np.random.default_rng(1).standard_normal((1, 3, IMAGE, IMAGE), dtype=np.float32)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    body, answers = json_body(pixels, flat=False), []
    for url in (before, after):
        response = requests.post(f"{url}/v2/models/mobilenet/infer", data=body, headers=headers, timeout=30)
        response.raise_for_status()
        answers.append(response.content)
    values = [np.asarray(json.loads(a)["outputs"][0]["data"], dtype=np.float32) for a in answers]
    if not np.array_equal(values[0], values[1]) or len(answers[0]) <= len(answers[1]):
        raise RuntimeError(f"before/after do not differ as expected: {answers[0][:200]!r}, {answers[1][:200]!r}")


CEILING_BATCH = 32
PROFILE_PARTS: dict[str, tuple[str, ...]] = {
    "Flask / werkzeug dispatch": ("flask/", "werkzeug/", "flask_smorest/"),
    "request log line and log context (shared/http.py, structlog)": (
        "shared/http.py",
        "shared/logging.py",
        "structlog/",
    ),
    "key verification (shared/auth.py)": ("shared/auth.py", "cachetools/"),
    "request annotations (request_log.py)": ("services/inference/request_log.py",),
    "Prometheus (metrics.py, prometheus_client)": ("services/inference/metrics.py", "prometheus_client/"),
    "canary routing (canary.py)": ("services/inference/canary.py",),
    "tensor parsing and encoding (tensors.py)": ("services/inference/tensors.py",),
    "fair use: rate limit in Redis (fair_use.py, ratelimit.py)": (
        "services/inference/fair_use.py",
        "shared/ratelimit.py",
        "redis/",
    ),
    "usage metering (metering.py)": ("services/inference/metering.py",),
    "batcher handoff and batch assembly (batcher.py)": ("services/inference/batcher.py", "concurrent/futures/"),
    "ONNX Runtime session.run": ("onnxruntime/",),
    "routing and checks (server.py, v2.py)": ("services/inference/server.py", "services/inference/v2.py"),
}
"""Where a sample's CPU goes: the innermost frame of the sample that belongs to one of these parts (so numpy
called by tensors.py counts for tensors.py, and werkzeug's own work for dispatch); the rest is "other"."""
BLOCKED: dict[str, str] = {
    "Handler.acquire": "blocked: waiting for the log handler's lock",
    "SocketBuffer._read_from_socket": "blocked: waiting for Redis's answer",
    "LimitedStream.readinto": "blocked: reading the request body",
}
"""py-spy counts a thread waiting for a lock or a socket (then for the GIL) as active: such samples, by their
innermost frame, are shown apart from the parts that run."""


def attribute(profile: Profile) -> dict[str, float]:
    """The share of `profile`'s samples per part of the request path (innermost matching frame wins)."""
    counts: dict[str, int] = dict.fromkeys([*PROFILE_PARTS, "other (granian, threading, interpreter)"], 0)
    for stack, count in profile.stacks.items():
        blocked = next((name for leaf, name in BLOCKED.items() if stack[-1].startswith(leaf)), None)
        if blocked is not None:
            counts[blocked] = counts.get(blocked, 0) + count
            continue
        part = next(
            (
                name
                for frame in reversed(stack)
                for name, files in PROFILE_PARTS.items()
                if any(f in frame for f in files)
            ),
            "other (granian, threading, interpreter)",
        )
        counts[part] += count
    total = max(profile.samples, 1)
    return {part: count / total for part, count in counts.items()}


def profile_forms(
    server: Any, loads: dict[str, Workload], out: Path, seconds: float, warmup: float
) -> dict[str, dict[str, Any]]:
    """py-spy on the server through one measurement per form, after an unrecorded warm-up: per part of the
    request path, its share of the sampled stacks (threads that were not idle) and that share of the server's
    CPU ms per request (a rough figure: blocked samples are shown apart, see `BLOCKED`)."""
    profiles: dict[str, dict[str, Any]] = {}
    for form in ("binary", "json"):
        measure(server, loads[form], 32, 0.0, warmup)
        recording = Recording(server.pid, out / f"{form}.txt")
        measured = measure(server, loads[form], 32, 0.0, seconds)
        profile = recording.stop()
        cpu_ms = 1000 * measured["server_cpu_s"] / max(measured["completed"], 1)
        shares = attribute(profile)
        profiles[form] = {
            "samples": profile.samples,
            "goodput_per_s_while_profiled": (measured["completed"] - measured["errors"]) / seconds,
            "server_cpu_ms_per_request_while_profiled": cpu_ms,
            "parts": {part: {"share": share, "cpu_ms_per_request": share * cpu_ms} for part, share in shares.items()},
        }
    return profiles


def served(
    redis_url: str,
    rounds: int,
    seconds: float,
    warmup: float,
    progress: Progress,
    *,
    profile: bool = False,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="flywheel-v2-json-bench-"))
    try:
        folder = export_image_model(root / "models")
        registries = {}
        for mode in MODES:  # each server has its own FLYWHEEL_HOME, object store and stand-in
            store = FileStore(root / "homes" / mode / "objects")
            store.ensure_buckets("models", "raw")
            registries[mode] = stand_in(store, {"image": folder}, {"mobilenet": {"max_batch_size": 32}})
        loads = served_workloads()
        shims = {"before": root / "stdlib-orjson", "orjson": root / "no-simdjson"}
        for mode, shim in shims.items():
            shim.mkdir()
            (shim / "simdjson.py").write_text(NO_SIMDJSON)
            if mode == "before":
                (shim / "orjson.py").write_text(STDLIB_ORJSON)
        runs = {
            "json_before": ("before", "json"),
            "json_orjson": ("orjson", "json"),
            "json_after": ("after", "json"),
            "binary_after": ("after", "binary"),
        }
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
        probe = CeilingProbe(folder / "model.onnx", loads["binary"].feeds, CEILING_BATCH, seconds=1.0)
        ceilings: list[float] = []
        profiles: dict[str, dict[str, Any]] = {}
        try:
            with managed_processes() as processes:
                servers, children = {}, {}
                for mode in MODES:
                    extra_env = {"PYTHONPATH": str(shims[mode])} if mode in shims else {}
                    servers[mode], children[mode] = start_server(
                        processes,
                        mode=mode,
                        home=root / "homes" / mode,
                        stand_in_url=registries[mode].url,
                        redis_url=redis_url,
                        config={"intra_op_threads": 2},
                        workers=1,
                        threads=16,
                        server="granian",
                        extra_env=extra_env,
                    )
                for mode, server in servers.items():
                    ready = f"{server.url}/v2/health/ready"
                    wait_until(lambda url=ready: answers_ok(url), timeout=240, what=mode, child=children[mode])
                progress(
                    "inference " + ", ".join(f"{mode} ({server.url})" for mode, server in servers.items()) + " ready"
                )
                same_answer_different_writer(servers["before"].url, servers["after"].url)
                same_answer_different_writer(servers["before"].url, servers["orjson"].url)
                names = list(runs)
                for index in range(rounds):
                    ceilings.append(probe.sample())
                    for name in names[index % len(names) :] + names[: index % len(names)]:
                        mode, form = runs[name]
                        samples[name].append(measure(servers[mode], loads[form], 32, warmup, seconds))
                if profile:
                    progress("profiling the after server with py-spy: one more measurement per form")
                    out = profile_dir or root
                    out.mkdir(parents=True, exist_ok=True)
                    profiles = profile_forms(servers["after"], loads, out, max(seconds, 6.0), warmup)
        finally:
            for registry in registries.values():
                registry.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result: dict[str, Any] = {}
    for name, measured in samples.items():
        goodput = [(r["completed"] - r["errors"]) / seconds for r in measured]
        result[name] = {
            "goodput_per_s": Stats.of(goodput),
            "server_cpu_ms_per_request": Stats.of(
                [1000 * r["server_cpu_s"] / max(r["completed"], 1) for r in measured]
            ),
            "errors": sum(r["errors"] for r in measured),
            "mean_batch": sum(r["rows"] for r in measured) / max(sum(r["batches"] for r in measured), 1),
            "share_of_ceiling": Stats.of([g / c for g, c in zip(goodput, ceilings, strict=True)]),
        }
    result["ceiling_items_per_s"] = Stats.of(ceilings)
    if profiles:
        result["profile"] = profiles

    def per_round(numerator: str, denominator: str) -> Stats:
        top, bottom = result[numerator]["goodput_per_s"].samples, result[denominator]["goodput_per_s"].samples
        return Stats.of([n / d for n, d in zip(top, bottom, strict=True)])

    result["json_after_over_before"] = per_round("json_after", "json_before")
    result["json_after_over_orjson"] = per_round("json_after", "json_orjson")
    result["json_over_binary_after"] = per_round("json_after", "binary_after")
    return result


def _part(file: str) -> str:
    part = next((name for name, files in PROFILE_PARTS.items() if any(f in file for f in files)), None)
    if part is not None:
        return part
    return "stdlib logging" if "/logging/" in file else "other (stdlib, builtins)"


def cpu_by_part(profile: cProfile.Profile) -> dict[str, float]:
    """A cProfile run's own time per part of the request path, as shares; a builtin's goes to its callers'."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    parts: dict[str, float] = {}
    for (file, _, _), (_, _, own, _, callers) in stats.items():
        if file == "~" and callers:
            weight = sum(c[2] for c in callers.values())
            for (caller, _, _), c in callers.items():
                share = c[2] / weight if weight else 1 / len(callers)
                parts[_part(caller)] = parts.get(_part(caller), 0.0) + own * share
        else:
            parts[_part(file)] = parts.get(_part(file), 0.0) + own
    total = sum(parts.values()) or 1.0
    return {part: value / total for part, value in sorted(parts.items(), key=lambda item: -item[1])}


def request_cost(redis_url: str, count: int, progress: Progress) -> dict[str, Any]:
    """The request thread's CPU per v2 request in process (binary and JSON), and where it goes (cProfile)."""
    root = Path(tempfile.mkdtemp(prefix="flywheel-v2-cost-"))
    folder = export_image_model(root / "models")
    store = FileStore(root / "home" / "objects")
    store.ensure_buckets("models", "raw")
    registry = stand_in(store, {"image": folder}, {"mobilenet": {"max_batch_size": 32}})
    saved, stdout = dict(os.environ), sys.stdout
    os.environ.update(
        {
            "FLYWHEEL_HOME": str(root / "home"),
            "REDIS_URL": redis_url,
            "REGISTRY_URL": registry.url,
            "INGESTION_URL": registry.url,
            "FLYWHEEL_INTERNAL_TOKEN": TOKEN,
            "S3_ENDPOINT": "",
            "LOG_LEVEL": "INFO",
            "INFERENCE_INTRA_OP_THREADS": "1",
        }
    )
    log_file = open(root / "app.log", "w", buffering=1)  # noqa: SIM115 - the app's log lines, written as served
    sys.stdout = log_file  # the request line is written as the service writes it, to a file
    try:
        from services.inference.app import create_app

        app = create_app()
        server = app.extensions["inference"]
        wait_until(lambda: server.repository.ready, timeout=120, what="in-process inference ready")
        pixels = np.random.default_rng(7).standard_normal((1, 3, IMAGE, IMAGE), dtype=np.float32)
        binary, length = binary_body(pixels)
        forms = {"binary": (binary, length), "json": (json_body(pixels, flat=False), None)}
        results: dict[str, Any] = {}
        for form, (body, header_length) in forms.items():
            environ = {
                "REQUEST_METHOD": "POST",
                "PATH_INFO": "/v2/models/mobilenet/infer",
                "SCRIPT_NAME": "",
                "QUERY_STRING": "",
                "SERVER_NAME": "127.0.0.1",
                "SERVER_PORT": "80",
                "SERVER_PROTOCOL": "HTTP/1.1",
                "REMOTE_ADDR": "127.0.0.1",
                "HTTP_HOST": "127.0.0.1",
                "HTTP_AUTHORIZATION": f"Bearer {API_KEY}",
                "CONTENT_TYPE": "application/octet-stream" if header_length else "application/json",
                "CONTENT_LENGTH": str(len(body)),
                "wsgi.url_scheme": "http",
                "wsgi.errors": sys.stderr,
                "wsgi.multithread": True,
                "wsgi.multiprocess": False,
                "wsgi.run_once": False,
                "wsgi.version": (1, 0),
            }
            if header_length:
                environ["HTTP_INFERENCE_HEADER_CONTENT_LENGTH"] = header_length

            def call(environ: dict[str, Any] = environ, body: bytes = body) -> None:
                statuses: list[str] = []
                answer = b"".join(
                    app({**environ, "wsgi.input": io.BytesIO(body)}, lambda s, h, e=None: statuses.append(s))
                )
                if not statuses[0].startswith("200"):
                    raise RuntimeError(f"the in-process request failed: {statuses[0]} {answer[:300]!r}")

            for _ in range(100):
                call()
            runs = []
            for _ in range(3):
                began = time.thread_time()
                for _ in range(count):
                    call()
                runs.append((time.thread_time() - began) / count * 1e6)
            profile = cProfile.Profile(time.thread_time)
            profile.enable()
            for _ in range(count):
                call()
            profile.disable()
            calls = sum(entry[1] for entry in pstats.Stats(profile).stats.values())  # type: ignore[attr-defined]
            results[form] = {
                "cpu_us_per_request": Stats.of(runs),
                "python_calls_per_request": calls / count,
                "parts": cpu_by_part(profile),
            }
            progress(f"request cost in process, {form}: {results[form]['cpu_us_per_request'].show(0)} us CPU")
        server.close()
        return results
    finally:
        sys.stdout = stdout
        log_file.close()
        os.environ.clear()
        os.environ.update(saved)
        registry.stop()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds of 0.2 s per variant: well under a minute")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=0.5, help="timed seconds per variant and round")
    parser.add_argument("--served", action="store_true", help="also measure the served good-put at concurrency 32")
    parser.add_argument("--serve-rounds", type=int, help="served rounds (default: 2 with --quick, else 6)")
    parser.add_argument("--profile", action="store_true", help="with --served: py-spy the after server per form")
    parser.add_argument("--profile-dir", type=Path, help="keep py-spy's raw profiles (<form>.txt) in this folder")
    parser.add_argument(
        "--request-cost", action="store_true", help="the request thread's CPU per v2 request in process, by part"
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests per timed pass of --request-cost")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"))
    args = parser.parse_args(argv)
    rounds, seconds = (5, 0.2) if args.quick else (args.rounds, args.seconds)
    progress = Progress()
    info = machine()
    progress(f"machine: {describe_machine(info)}; load average {os.getloadavg()[0]:.1f}")
    calls, sizes = variants()
    progress(f"bodies: nested {sizes['nested']:,} B, flat {sizes['flat']:,} B, binary {sizes['binary']:,} B")
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            samples[name].append(per_call_ms(calls[name], seconds))
    stats = {name: Stats.of(values) for name, values in samples.items()}

    def speedup(subject: str) -> Stats:
        before, after = samples[f"{subject}_before"], samples[f"{subject}_after"]
        return Stats.of([b / a for b, a in zip(before, after, strict=True)])

    rows, figures = [], {}
    for subject in ("parse_nested", "parse_flat", "encode_logits_1000", "encode_output_12288"):
        orjson_only = stats.get(f"{subject}_orjson")
        figures[subject] = {
            "before_ms": stats[f"{subject}_before"],
            "after_ms": stats[f"{subject}_after"],
            "speedup": speedup(subject),
        }
        if orjson_only is not None:
            figures[subject]["orjson_ms"] = orjson_only
            figures[subject]["orjson_over_after"] = Stats.of(
                [o / a for o, a in zip(samples[f"{subject}_orjson"], samples[f"{subject}_after"], strict=True)]
            )
        rows.append(
            [
                subject,
                stats[f"{subject}_before"].show(3),
                orjson_only.show(3) if orjson_only is not None else "(same)",
                stats[f"{subject}_after"].show(3),
                figures[subject]["speedup"].show(2) + "x",
                figures[subject]["orjson_over_after"].show(2) + "x" if orjson_only is not None else "",
            ]
        )
    rows.append(["parse_binary (same tensor)", "", "", stats["parse_binary"].show(3), "", ""])
    print_table(
        ["ms per call (median ±IQR)", "before (json)", "orjson", "after", "before/after", "orjson/after"],
        rows,
        rule=True,
    )
    figures["parse_binary_ms"] = stats["parse_binary"]
    if args.served:
        serve_rounds, serve_seconds, warmup = (2, 3.0, 1.0) if args.quick else (6, 10.0, 2.0)
        serve_rounds = args.serve_rounds or serve_rounds
        progress("served: three servers (before, orjson, after), concurrency 32, rotating rounds")
        figures["served_c32"] = served(
            args.redis_url,
            serve_rounds,
            serve_seconds,
            warmup,
            progress,
            profile=args.profile,
            profile_dir=args.profile_dir,
        )
        print_table(
            [
                "concurrency 32",
                "good-put/s (median ±IQR)",
                "of ceiling",
                "server CPU ms/request",
                "mean batch",
                "errors",
            ],
            [
                [
                    form,
                    figures["served_c32"][form]["goodput_per_s"].show(1),
                    f"{100 * figures['served_c32'][form]['share_of_ceiling'].median:.1f}%",
                    figures["served_c32"][form]["server_cpu_ms_per_request"].show(2),
                    f"{figures['served_c32'][form]['mean_batch']:.1f}",
                    figures["served_c32"][form]["errors"],
                ]
                for form in ("json_before", "json_orjson", "json_after", "binary_after")
            ],
            rule=True,
        )
        progress(
            f"ceiling beside (raw ONNX Runtime, batch {CEILING_BATCH}): "
            f"{figures['served_c32']['ceiling_items_per_s'].show(0)} items/s"
        )
        for form, found in figures["served_c32"].get("profile", {}).items():
            print(
                f"\nprofile, v2 {form}: {found['samples']} samples, "
                f"{found['goodput_per_s_while_profiled']:.1f}/s and "
                f"{found['server_cpu_ms_per_request_while_profiled']:.2f} CPU ms/request while profiled"
            )
            parts = sorted(found["parts"].items(), key=lambda item: -item[1]["share"])
            print_table(
                ["part of the request path", "share of samples", "~CPU ms/request"],
                [[part, f"{100 * v['share']:.1f}%", f"{v['cpu_ms_per_request']:.3f}"] for part, v in parts],
                rule=True,
            )
        progress(
            f"JSON good-put after / before: {figures['served_c32']['json_after_over_before'].show(2)}; "
            f"after / orjson: {figures['served_c32']['json_after_over_orjson'].show(2)}; "
            f"JSON / binary (after): {figures['served_c32']['json_over_binary_after'].show(2)}"
        )
    if args.request_cost:
        figures["request_cost"] = request_cost(args.redis_url, args.requests, progress)
        for form, found in figures["request_cost"].items():
            print(
                f"\nin process, v2 {form}: {found['cpu_us_per_request'].show(0)} us of request-thread CPU per request"
            )
            print_table(
                ["part of the request path (cProfile, thread CPU)", "share", "~us/request"],
                [
                    [part, f"{100 * share:.1f}%", f"{share * found['cpu_us_per_request'].median:.0f}"]
                    for part, share in found["parts"].items()
                ],
                rule=True,
            )
    path = write_results(
        "v2_json",
        {
            "machine": info,
            "load_average_at_end": list(os.getloadavg()),
            "settings": {"rounds": rounds, "seconds_per_variant": seconds, "quick": args.quick, "shape": SHAPE},
            "body_bytes": sizes,
            "figures": figures,
        },
    )
    progress(f"results written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
