"""Flywheel's inference beside a peer model server (MLServer) on the same graph, the same requests, the same machine.

    python -m bench.peer_bench            # 8 rounds of 5 s per run: about 3 minutes on a 2-core machine
    python -m bench.peer_bench --quick    # 4 rounds of 2 s: about a minute

(plus, on first use, a minute or so to install the peer.)

What it does:

1. exports torchvision's mobilenet_v3_small (untrained) at 64x64 to ONNX (`bench.inference_bench`'s
   `export_image_model`): one graph, read by both servers;
2. installs the peer, MLServer, on first use into a virtualenv of its own under `~/.cache/flywheel/bench-tools/
   mlserver` (`bench/tools.py`; from the configured package index), with the CPU build of ONNX Runtime at the
   project's version: nothing of it goes into the project's virtualenv, nor anything of the project into its;
3. writes the peer's model repository in a temp dir: a `MLModel` subclass that loads the graph into an ONNX
   Runtime session with the service's session options (one intra-op thread, no spinning, all graph
   optimisations), `model-settings.json` with adaptive batching at max 32 rows / 2 ms (what Flywheel's batcher
   is given), and `settings.json`: REST on a free loopback port, the metrics server off, no access log, gRPC
   (which MLServer always starts) on another free loopback port and idle. `--peer-workers` sets MLServer's
   `parallel_workers`: by default 0, the model in the REST process, its session run in a thread so the event
   loop goes on reading requests (MLServer's own default, 1, moves inference to a worker process: about 30%
   less good-put here);
4. starts Flywheel's inference app under granian (`flywheel up`'s command, 1 worker x 16 threads, ONNX Runtime
   on one intra-op thread, batching max 32 / 2 ms; `--workers 2` for two processes) against
   `bench.inference_bench`'s stand-ins, and the peer
   (`mlserver start`), side by side;
5. the correctness gate: both servers answer the same inputs with the logits in-process ONNX Runtime gives
   (same argmax, values within 1e-4), or the bench stops before measuring anything;
6. drives them with `bench.inference_bench`'s load generator (C keep-alive connections, each one request at a
   time) at concurrency 32 with the same request bytes: the v2 JSON tensor form (one 1x3x64x64 FP32 tensor as
   `tolist()` nested `data`, `POST /v2/models/mobilenet/infer`, which both expose), and the v2 binary tensor
   form (Triton's binary data extension) to each server that accepts it (the peer is asked once; MLServer's
   REST does not, so its row reads "n/a"). Rounds alternate the order (ABBA), so that a slow moment of a
   shared machine falls on both alike; each round gives the Flywheel / peer ratio of good-put (HTTP 200
   answers per second) beside it, and the figures are medians over rounds, with p99 latency, failed requests,
   the server's CPU time per request (its whole process tree) and the mean batch each server formed.

Writes bench/results/peer.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import requests

from bench.common import Progress, Stats, describe_machine, machine, process_tree_cpu_seconds, write_results
from bench.inference_bench import (
    API_KEY,
    IMAGE,
    Server,
    batch_histogram,
    drive,
    export_image_model,
    http_request,
    stand_in,
)
from bench.inference_bench import start_server as start_flywheel
from bench.tools import tool_env, tool_venv
from bench.v2_json_bench import binary_body, json_body
from services.inference.sessions import session_options
from shared.storage import FileStore
from shared.tables import NUMBERS, print_table
from testkit.processes import answers_ok, free_port, managed_processes, wait_until
from testkit.serving import RegistryStandIn

PEER = "mlserver"
PEER_VERSION = "1.7.1"
MODEL = "mobilenet"
PATH = f"/v2/models/{MODEL}/infer"
CONCURRENCY = 32
MAX_BATCH_SIZE = 32
MAX_BATCH_DELAY_S = 0.002
FORMS = ("json", "binary")

PEER_MODEL = '''"""The bench's MLServer runtime: the graph in ONNX Runtime, with Flywheel's session options."""
import asyncio

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.handlers import custom_handler
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            self.settings.parameters.uri, options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        self._batches = self._rows = 0
        return True

    @custom_handler(rest_path="/bench/batches", rest_method="GET")
    async def batches(self) -> dict:
        """How many batches the adaptive batcher handed the model, and how many rows they held."""
        return {"batches": self._batches, "rows": self._rows}

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        pixels = NumpyCodec.decode_input(payload.inputs[0])
        self._batches, self._rows = self._batches + 1, self._rows + len(pixels)
        # In a thread, so that the event loop goes on reading requests while the graph runs (as Flywheel's
        # request threads do beside its batcher).
        (logits,) = await asyncio.to_thread(self._session.run, None, {self._input: pixels})
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output("logits", logits)],
        )
'''


def peer_requirements() -> list[str]:
    """MLServer, the CPU build of the ONNX Runtime release the project runs (the same kernels on both sides), and
    the uvloop of MLServer's day: its parallel workers ask for the event loop before setting one, which uvloop
    refuses from 0.22 on ("There is no current event loop")."""
    return [f"{PEER}=={PEER_VERSION}", f"onnxruntime=={ort.__version__.split('+')[0]}", "uvloop==0.21.0"]


def write_peer_repository(folder: Path, graph: Path, *, port: int, grpc_port: int, workers: int) -> Path:
    model = folder / MODEL
    model.mkdir(parents=True)
    (model / "onnx_model.py").write_text(PEER_MODEL)
    model_settings = {
        "name": MODEL,
        "implementation": "onnx_model.OnnxModel",
        "max_batch_size": MAX_BATCH_SIZE,
        "max_batch_time": MAX_BATCH_DELAY_S,
        "parameters": {"uri": str(graph), "version": "1"},
    }
    (model / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    settings = {
        "debug": False,  # no access log, as Flywheel writes none per request
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": grpc_port,
        "metrics_endpoint": None,  # no metrics server
        "parallel_workers": workers,
        "load_models_at_startup": True,
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    return folder


def start_peer(processes: Any, root: Path, graph: Path, workers: int, progress: Progress) -> tuple[Server, Any]:
    tool = tool_venv(PEER, peer_requirements())
    progress(f"{PEER} {PEER_VERSION} in {tool}")
    port = free_port()
    folder = write_peer_repository(root / "peer", graph, port=port, grpc_port=free_port(), workers=workers)
    env = tool_env(tool)
    env["PYTHONUNBUFFERED"] = "1"
    command = [str(tool / "bin" / "mlserver"), "start", str(folder)]
    child = processes.spawn(PEER, command, env=env, log_path=root / "logs" / f"{PEER}.log", cwd=folder)
    return Server(PEER, port, child.process.pid), child


# -- requests and the correctness gate -----------------------------------------------------------------------


def inputs(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal((1, 3, IMAGE, IMAGE), dtype=np.float32) for _ in range(count)]


def raw_requests(pixels: list[np.ndarray]) -> dict[str, list[bytes]]:
    """The same tensors as whole HTTP requests, byte for byte the same for both servers."""
    as_json = [http_request(PATH, json_body(p, flat=False), "application/json") for p in pixels]
    as_binary = []
    for p in pixels:
        body, length = binary_body(p)
        as_binary.append(
            http_request(PATH, body, "application/octet-stream", {"Inference-Header-Content-Length": length})
        )
    return {"json": as_json, "binary": as_binary}


def logits_of(response: requests.Response) -> np.ndarray:
    """The `logits` output of a v2 answer, JSON or binary."""
    length = response.headers.get("Inference-Header-Content-Length")
    header = json.loads(response.content[: int(length)] if length else response.content)
    output = next(o for o in header["outputs"] if o["name"] == "logits")
    if "data" in output:
        return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    return np.frombuffer(response.content[int(length) :], dtype=np.float32).reshape(output["shape"])


def post(url: str, pixels: np.ndarray, form: str) -> requests.Response:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if form == "json":
        body, headers["Content-Type"] = json_body(pixels, flat=False), "application/json"
    else:
        body, length = binary_body(pixels)
        headers.update({"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": length})
    return requests.post(f"{url}{PATH}", data=body, headers=headers, timeout=30)


def gate(servers: dict[str, Server], graph: Path, pixels: list[np.ndarray]) -> dict[str, Any]:
    """Each server answers each input (each form it accepts) with in-process ONNX Runtime's logits: the same
    argmax, values within 1e-4. Returns which forms each server accepts; raises on a wrong answer."""
    session = ort.InferenceSession(
        str(graph), session_options(intra_op_threads=1, allow_spinning=False), providers=["CPUExecutionProvider"]
    )
    expected = [session.run(None, {"pixels": p})[0] for p in pixels]
    accepts: dict[str, dict[str, Any]] = {}
    for name, server in servers.items():
        accepts[name] = {}
        for form in FORMS:
            answers = [post(server.url, p, form) for p in pixels]
            refused = next((a for a in answers if a.status_code != 200), None)
            if refused is not None:
                if form == "json":
                    raise RuntimeError(f"{name} refused a v2 JSON request: {refused.status_code} {refused.text[:300]}")
                accepts[name][form] = {"accepted": False, "status": refused.status_code, "answer": refused.text[:200]}
                continue
            for answer, want in zip(answers, expected, strict=True):
                got = logits_of(answer)
                if got.shape != want.shape or got.argmax() != want.argmax() or not np.allclose(got, want, atol=1e-4):
                    raise RuntimeError(f"{name} answered {form} with other logits: {got[0][:4]} for {want[0][:4]}")
            accepts[name][form] = {"accepted": True, "argmax": [int(w.argmax()) for w in expected]}
    return accepts


# -- the measurement ---------------------------------------------------------------------------------------------


def batches_formed(server: Server) -> tuple[float, float]:
    """How many batches the server ran so far, and how many rows they held: Flywheel's from its /metrics, the
    peer's from the bench's runtime (zero where its model runs in another process: `--peer-workers` above 0)."""
    if server.mode == PEER:
        counts = requests.get(f"{server.url}/bench/batches", timeout=10).json()
        return counts["batches"], counts["rows"]
    return batch_histogram(server.url, MODEL)


def run_once(server: Server, load: list[bytes], warmup: float, seconds: float) -> dict[str, float]:
    cpu_before, (batches_before, rows_before) = process_tree_cpu_seconds(server.pid), batches_formed(server)
    level = drive(server.port, load, CONCURRENCY, warmup, seconds)
    cpu = process_tree_cpu_seconds(server.pid) - cpu_before
    batches_after, rows_after = batches_formed(server)
    answered = level.completed + level.throughput * warmup  # the warm-up's answers cost CPU too
    return {
        "goodput_per_s": (level.completed - level.errors) / seconds,
        "p99_ms": level.percentile(99),
        "errors": level.errors,
        "completed": level.completed,
        "server_cpu_ms_per_request": 1000 * cpu / answered if answered else 0.0,
        "batches": batches_after - batches_before,
        "rows": rows_after - rows_before,
    }


def summarise(samples: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "goodput_per_s": Stats.of([s["goodput_per_s"] for s in samples]),
        "p99_ms": statistics.median(s["p99_ms"] for s in samples),
        "server_cpu_ms_per_request": Stats.of([s["server_cpu_ms_per_request"] for s in samples]),
        "errors": sum(int(s["errors"]) for s in samples),
        "completed": sum(int(s["completed"]) for s in samples),
        "mean_batch": sum(s["rows"] for s in samples) / batches
        if (batches := sum(s["batches"] for s in samples))
        else None,
    }


@contextlib.contextmanager
def registry_running(registry: RegistryStandIn) -> Iterator[None]:
    try:
        yield
    finally:
        registry.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 rounds of 2 s per run (about a minute)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds, the order of the servers alternating")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument(
        "--peer-workers",
        type=int,
        default=0,
        help="MLServer's parallel_workers: 0 (the model in the REST process; the faster here) or its default, 1",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Flywheel's granian worker processes (16 threads and one ONNX Runtime intra-op thread each)",
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"))
    args = parser.parse_args(argv)
    rounds, seconds, warmup = (4, 2.0, 0.5) if args.quick else (args.rounds, args.seconds, 1.0)
    progress = Progress()
    info = machine()
    progress(f"machine: {describe_machine(info)}")
    root = Path(tempfile.mkdtemp(prefix="flywheel-peer-bench-"))
    try:
        graph = export_image_model(root / "models") / "model.onnx"
        progress("exported mobilenet_v3_small (64x64) to ONNX")
        pixels = inputs(32)
        loads = raw_requests(pixels)
        store = FileStore(root / "home" / "objects")
        store.ensure_buckets("models", "raw")
        registry = stand_in(
            store,
            {"image": graph.parent},
            {MODEL: {"max_batch_size": MAX_BATCH_SIZE, "max_queue_delay_us": int(MAX_BATCH_DELAY_S * 1e6)}},
        )
        with registry_running(registry), managed_processes() as processes:
            flywheel, flywheel_child = start_flywheel(
                processes,
                mode="flywheel",
                home=root / "home",
                stand_in_url=registry.url,
                redis_url=args.redis_url,
                config={"intra_op_threads": 1},
                workers=args.workers,
                threads=16,
                server="granian",
            )
            peer, peer_child = start_peer(processes, root, graph, args.peer_workers, progress)
            servers = {"flywheel": flywheel, PEER: peer}
            for name, server, child, ready in (
                ("flywheel", flywheel, flywheel_child, "/v2/health/ready"),
                (PEER, peer, peer_child, f"/v2/models/{MODEL}/ready"),
            ):
                wait_until(lambda u=server.url + ready: answers_ok(u), timeout=240, what=f"{name} ready", child=child)
                progress(f"{name}: serving on {server.url}")
            accepts = gate(servers, graph, pixels[:4])
            progress(
                "gate passed: both answer v2 JSON with in-process ONNX Runtime's logits; v2 binary accepted by "
                + ", ".join(name for name in servers if accepts[name]["binary"]["accepted"])
            )
            runs = [(name, form) for form in FORMS for name in servers if accepts[name][form]["accepted"]]
            samples: dict[tuple[str, str], list[dict[str, float]]] = {run: [] for run in runs}
            ratios: list[float] = []
            loads_per_round = []
            for index in range(rounds):
                order = runs if index % 2 == 0 else list(reversed(runs))
                for name, form in order:
                    samples[name, form].append(run_once(servers[name], loads[form], warmup, seconds))
                mine, theirs = samples["flywheel", "json"][-1], samples[PEER, "json"][-1]
                ratios.append(mine["goodput_per_s"] / theirs["goodput_per_s"] if theirs["goodput_per_s"] else 0.0)
                loads_per_round.append(round(os.getloadavg()[0], 2))
                progress(
                    f"round {index + 1}/{rounds}: "
                    + ", ".join(f"{n} {f} {samples[n, f][-1]['goodput_per_s']:.1f}/s" for n, f in runs)
                    + f"; JSON flywheel / {PEER} {ratios[-1]:.2f} (load {loads_per_round[-1]})"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    forms: dict[str, Any] = {}
    for form in FORMS:
        measured = {name: summarise(samples[name, form]) for name in servers if (name, form) in samples}
        both = len(measured) == 2
        per_round = (
            Stats.of(
                [
                    m["goodput_per_s"] / p["goodput_per_s"] if p["goodput_per_s"] else 0.0
                    for m, p in zip(samples["flywheel", form], samples[PEER, form], strict=True)
                ]
            )
            if both
            else None
        )
        forms[form] = {**measured, "ratio_per_round": per_round, "peer_accepts": accepts[PEER][form]}
    report(forms)
    path = write_results(
        "peer",
        {
            "machine": info,
            "load_average_per_round": loads_per_round,
            "load_average_at_end": list(os.getloadavg()),
            "settings": {
                "quick": args.quick,
                "rounds": rounds,
                "seconds_per_run": seconds,
                "warmup_seconds": warmup,
                "concurrency": CONCURRENCY,
                "model": "mobilenet_v3_small, 64x64, untrained, ONNX",
                "request": f"POST {PATH}, one 1x3x64x64 FP32 tensor",
                "flywheel": f"granian, {args.workers} worker(s) x 16 threads, ONNX Runtime 1 intra-op thread each, "
                "batching max 32 / 2 ms",
                "flywheel_workers": args.workers,
                "peer": {
                    "server": f"{PEER}=={PEER_VERSION}",
                    "install": peer_requirements(),
                    "parallel_workers": args.peer_workers,
                    "adaptive_batching": {"max_batch_size": MAX_BATCH_SIZE, "max_batch_time_s": MAX_BATCH_DELAY_S},
                    "onnxruntime": "CPUExecutionProvider, 1 intra-op thread, no spinning, in a thread of the loop",
                },
            },
            "gate": accepts,
            "forms": forms,
        },
    )
    progress(f"results written to {path}")
    return 0


def report(forms: dict[str, Any]) -> None:
    rows = []
    for form, measured in forms.items():
        mine, theirs = measured.get("flywheel"), measured.get(PEER)
        ratio = measured["ratio_per_round"]
        rows.append(
            [
                f"v2 {form}",
                mine["goodput_per_s"].show(1) if mine else "n/a",
                theirs["goodput_per_s"].show(1) if theirs else "n/a",
                ratio.show(2) if ratio else "n/a",
                " / ".join(f"{m['p99_ms']:.0f}" if m else "n/a" for m in (mine, theirs)),
                " / ".join(f"{m['server_cpu_ms_per_request'].median:.2f}" if m else "n/a" for m in (mine, theirs)),
                " / ".join(str(m["errors"]) if m else "n/a" for m in (mine, theirs)),
                " / ".join(f"{m['mean_batch']:.1f}" if m and m["mean_batch"] else "-" for m in (mine, theirs)),
            ]
        )
    print()
    print_table(
        [
            f"concurrency {CONCURRENCY}",
            "Flywheel good-put/s",
            f"{PEER} good-put/s",
            f"Flywheel / {PEER} (per round)",
            "p99 ms F / P",
            "CPU ms/req F / P",
            "errors F / P",
            "mean batch F / P",
        ],
        rows,
        align=NUMBERS,
        rule=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
