"""The floor of a Python HTTP front end: how far dynamic batching can lift image throughput on this machine
when the request path does nothing but parse, batch and answer.

    python -m bench.inference_floor            # about 2 minutes on a 2-core machine
    python -m bench.inference_floor --quick    # one short measurement per row

Why: inference's image target (issue #7: mobilenet_v3_small, concurrency 32, batching on >= 2x batching off)
asks batching to halve what a request costs. Batching removes model time only; the front end's own time per
request stays. `bench.inference_bench` measures the real service; this measures the floor beneath it: the
leanest WSGI app that still answers the exact v2 binary request that benchmark sends (read the body, parse
the JSON header, view the tensor, submit it to the service's own `DynamicBatcher` over an ONNX Runtime
session with the service's session options, encode the v2 binary answer) and nothing else: no Flask, no
authentication, no request log line, no metrics, no canary routing.

It serves that app under gunicorn (gthread, 1 worker x 16 threads, as the other services run) and under
granian (1 worker x 16 threads, as inference runs: a Rust HTTP server, parsing and socket work outside the
GIL), with ONNX Runtime on 1 and on 2 threads, batching
on (max batch 16, 2 ms max queue delay) and off (max batch 1), driven by the same load generator as the
service benchmark at concurrency 32, on and off measured back to back in alternating order. If even this floor
stays under 2x, no tuning of the service's request path can meet the target on this machine, and the table
says by how much. Writes bench/results/inference_floor.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Progress, Stats, describe_machine, machine, process_tree_cpu_seconds, write_results
from shared.tables import NUMBERS, print_table
from testkit.processes import answers_ok, free_port, managed_processes, wait_until

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = 32
MAX_BATCH = 16
TARGET = 2.0

# -- the floor app (runs inside the server process; configured by environment) -------------------------------

_state: dict[str, Any] = {}
_state_lock = threading.Lock()


class _NoObserver:
    def batch_ran(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None:
        pass

    def queue_depth(self, depth: int) -> None:
        pass


def _batcher() -> Any:
    if "batcher" in _state:  # the request path: no lock once the model is loaded
        return _state["batcher"]
    with _state_lock:
        if "batcher" not in _state:
            import onnxruntime as ort

            from services.inference.batcher import DynamicBatcher
            from services.inference.config import BatchingConfig
            from services.inference.sessions import session_options

            options = session_options(intra_op_threads=int(os.environ["FLOOR_THREADS"]), allow_spinning=False)
            session = ort.InferenceSession(os.environ["FLOOR_GRAPH"], options, providers=["CPUExecutionProvider"])
            names = [output.name for output in session.get_outputs()]

            def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                return dict(zip(names, session.run(None, feeds), strict=True))

            config = BatchingConfig(max_batch_size=int(os.environ["FLOOR_MAX_BATCH"]), max_queue_delay_us=2000)
            _state["batcher"] = DynamicBatcher(run, config, name="floor", observer=_NoObserver())
        return _state["batcher"]


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """One v2 binary inference request, as lean as Python gets; a GET answers 200 once the model is loaded."""
    batcher = _batcher()
    if environ["REQUEST_METHOD"] != "POST":
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]
    body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
    header_length = int(environ["HTTP_INFERENCE_HEADER_CONTENT_LENGTH"])
    tensor = json.loads(body[:header_length])["inputs"][0]
    pixels = np.frombuffer(body[header_length:], dtype=np.float32).reshape(tensor["shape"])
    logits = batcher.submit({tensor["name"]: pixels}).result()["logits"]
    data = logits.tobytes()
    header = json.dumps(
        {
            "model_name": "floor",
            "outputs": [
                {
                    "name": "logits",
                    "datatype": "FP32",
                    "shape": list(logits.shape),
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
        }
    ).encode()
    start_response(
        "200 OK",
        [
            ("Content-Type", "application/octet-stream"),
            ("Inference-Header-Content-Length", str(len(header))),
            ("Content-Length", str(len(header) + len(data))),
        ],
    )
    return [header + data]


# -- the measurement -----------------------------------------------------------------------------------------


def serve(
    processes: Any,
    server: str,
    graph: Path,
    threads: int,
    max_batch: int,
    logs: Path,
    *,
    workers: int = 1,
    request_threads: int = 16,
) -> tuple[int, int]:
    """The floor app in its own server process (`workers` of them, `request_threads` each); its port and pid
    once it answers."""
    port = free_port()
    if server == "gunicorn":
        command = ["-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--worker-class", "gthread"]
        command += ["--threads", str(request_threads)]
    else:
        command = ["-m", "granian", "--interface", "wsgi", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--blocking-threads", str(request_threads)]
    command = [sys.executable, *command, "--workers", str(workers), "bench.inference_floor:app"]
    env = {**os.environ, "FLOOR_GRAPH": str(graph), "FLOOR_THREADS": str(threads), "FLOOR_MAX_BATCH": str(max_batch)}
    child = processes.spawn(f"floor-{server}", command, env=env, log_path=logs / f"{server}.log", cwd=REPO)
    wait_until(lambda: answers_ok(f"http://127.0.0.1:{port}/"), timeout=60, what=f"{server} floor app", child=child)
    return port, child.process.pid


def main(argv: list[str] | None = None) -> int:
    from bench.inference_bench import drive, export_models, workloads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short measurement per row")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    seconds, repeats = (2.0, 1) if args.quick else (args.seconds, args.repeats)
    progress = Progress()
    info = machine()
    progress(f"machine: {describe_machine(info)}")
    servers = ["gunicorn", "granian"]
    root = Path(tempfile.mkdtemp(prefix="flywheel-inference-floor-"))
    rows: list[dict[str, Any]] = []
    try:
        models = export_models(root / "models")
        graph = models["image"] / "model.onnx"
        request_bytes = workloads(models)["image"].requests
        progress("exported mobilenet_v3_small (64x64) to ONNX")
        for server in servers:
            for threads in (1, 2):
                with managed_processes() as processes:
                    ports = {
                        mode: serve(processes, server, graph, threads, MAX_BATCH if mode == "on" else 1, root / "logs")
                        for mode in ("on", "off")
                    }
                    samples: dict[str, list[float]] = {"on": [], "off": []}
                    cpu: dict[str, list[float]] = {"on": [], "off": []}
                    for repeat in range(repeats):
                        for mode in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
                            port, pid = ports[mode]
                            before = process_tree_cpu_seconds(pid)
                            level = drive(port, request_bytes, CONCURRENCY, 0.5, seconds)
                            spent = process_tree_cpu_seconds(pid) - before
                            if level.errors:
                                raise RuntimeError(f"{server} floor ({mode}) answered {level.statuses}")
                            samples[mode].append(level.throughput)
                            cpu[mode].append(1000 * spent / max(1, level.answered))
                on, off = Stats.of(samples["on"]), Stats.of(samples["off"])
                row = {
                    "server": server,
                    "onnxruntime_threads": threads,
                    "on_items_per_s": on,
                    "off_items_per_s": off,
                    "on_cpu_ms_per_request": Stats.of(cpu["on"]).median,
                    "off_cpu_ms_per_request": Stats.of(cpu["off"]).median,
                    "speedup": on.median / off.median,
                }
                rows.append(row)
                progress(
                    f"{server}, ONNX Runtime {threads} thread(s): on {on.show()} / off {off.show()} items/s "
                    f"= {row['speedup']:.2f}x"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = max(rows, key=lambda r: r["speedup"])
    print()
    print_table(
        ["front end (floor app)", "ORT threads", "on items/s", "off items/s", "on/off", "server CPU ms/req on/off"],
        [
            [
                r["server"],
                r["onnxruntime_threads"],
                r["on_items_per_s"].show(),
                r["off_items_per_s"].show(),
                f"{r['speedup']:.2f}x",
                f"{r['on_cpu_ms_per_request']:.2f} / {r['off_cpu_ms_per_request']:.2f}",
            ]
            for r in rows
        ],
        align=NUMBERS,
        rule=True,
    )
    verdict = "reachable" if best["speedup"] >= TARGET else "out of reach for a Python front end on this machine"
    print(
        f"\nbest floor: {best['speedup']:.2f}x ({best['server']}, ONNX Runtime {best['onnxruntime_threads']} "
        f"thread(s)); the >= {TARGET:.0f}x image target is {verdict}"
    )
    path = write_results(
        "inference_floor",
        {
            "machine": info,
            "settings": {"concurrency": CONCURRENCY, "max_batch": MAX_BATCH, "seconds": seconds, "repeats": repeats},
            "rows": rows,
            "best_speedup": best["speedup"],
            "target": TARGET,
        },
    )
    progress(f"results written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
