"""What monitoring costs the hot path: inference throughput at concurrency 32, monitoring off vs on, in one run.

    python -m bench.monitoring_bench            # about 3 minutes on a 2-core machine
    python -m bench.monitoring_bench --quick    # shorter levels, one repeat

Three inference servers (granian, `flywheel up`'s command, one process) serve the same MiniLM text model
(`bench.inference_bench`'s export, 64-token texts through `POST /v1/models/minilm:predict`), each with its
own FLYWHEEL_HOME and database:

- `off`: the prediction log off (INFERENCE_LOG_PREDICTIONS=false), so no sampling and no shadow either;
- `log+sample`: every prediction logged (batched writer, packed inputs, input statistics), and the policy's
  `sample_rate` of 5% sent to labeling as `prediction.sampled`;
- `log+sample+shadow`: the same, plus 10% of requests mirrored to a staged version (v2, the same graph).

The load generator alternates between them repeat by repeat (C keep-alive connections, each one request at a
time) so that each sees the same machine. The target is at most 5% of throughput lost with logging and
sampling on; shadow traffic costs its share of extra compute by design (it runs the model again) and is
reported beside. Results go to bench/results/monitoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import requests

from bench.common import Progress, describe_machine, machine, write_results
from bench.inference_bench import (
    API_KEY,
    TENANT,
    TOKEN,
    drive,
    export_models,
    start_server,
    workloads,
)
from shared.storage import FileStore
from shared.tables import NUMBERS, print_table
from testkit.processes import answers_ok, managed_processes, wait_until
from testkit.serving import RegistryStandIn, serving_document, upload_version

MODES = {
    "off": ({"log_predictions": "false"}, None),
    "log+sample": ({}, {"sample_rate": 0.05}),
    "log+sample+shadow": ({}, {"sample_rate": 0.05, "shadow_version": 2, "shadow_rate": 0.1}),
}
TARGET_LOSS = 0.05
CONCURRENCY = 32


def stand_in(store: FileStore, folder: Path) -> RegistryStandIn:
    """v1 in production, v2 (the same graph) under `staging`, for the shadow."""
    registry = RegistryStandIn(token=TOKEN)
    registry.accept_key(API_KEY, tenant=TENANT, key_id="key_bench")
    versions = {1: upload_version(store, TENANT, folder, 1), 2: upload_version(store, TENANT, folder, 2)}
    registry.serve(serving_document(TENANT, folder, versions, production=1, staging=2))
    return registry.start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"))
    args = parser.parse_args(argv)
    seconds, warmup, repeats = (3.0, 1.0, 1) if args.quick else (args.seconds, 2.0, args.repeats)
    progress = Progress()
    info = machine()
    progress(f"machine: {describe_machine(info)}")
    root = Path(tempfile.mkdtemp(prefix="flywheel-monitoring-bench-"))
    models = export_models(root / "models")
    load = workloads(models)["text"]
    progress("exported MiniLM (+ linear head) to ONNX")
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    p99: dict[str, list[float]] = {mode: [] for mode in MODES}
    with managed_processes() as processes:
        servers = {}
        for mode, (config, policy) in MODES.items():
            home = root / "homes" / mode.replace("+", "_")
            store = FileStore(home / "objects")
            store.ensure_buckets("models", "raw")
            registry = stand_in(store, models["text"])
            server, _child = start_server(
                processes,
                mode=mode,
                home=home,
                stand_in_url=registry.url,
                redis_url=args.redis_url,
                config={"intra_op_threads": 0, **config},
                workers=1,
                threads=16,
                server="granian",
            )
            wait_until(lambda s=server: answers_ok(f"{s.url}/v2/health/ready"), timeout=120, what=f"{mode} ready")
            if policy:
                response = requests.put(
                    f"{server.url}/v1/monitoring/models/minilm/policy",
                    json=policy,
                    headers={"Authorization": f"Bearer {API_KEY}"},
                    timeout=10,
                )
                response.raise_for_status()
            servers[mode] = server
            progress(f"{mode}: serving on {server.url}")
        for repeat in range(repeats):
            for mode, server in servers.items():
                level = drive(server.port, load.requests, CONCURRENCY, warmup, seconds)
                samples[mode].append(level.throughput)
                p99[mode].append(level.percentile(99))
                progress(f"repeat {repeat + 1} {mode}: {level.throughput:.1f} req/s, p99 {level.percentile(99):.1f} ms")
        logged = {
            mode: requests.get(
                f"{server.url}/v1/predictions?limit=1", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
            ).json()["predictions"]
            for mode, server in servers.items()
        }
    off = statistics.median(samples["off"])
    rows, results = [], {}
    for mode in MODES:
        throughput = statistics.median(samples[mode])
        loss = 1 - throughput / off if off else 0.0
        results[mode] = {
            "throughput": throughput,
            "samples": samples[mode],
            "p99_ms": statistics.median(p99[mode]),
            "loss": loss,
            "logged_something": bool(logged[mode]),
        }
        rows.append([mode, f"{throughput:.1f}", f"{statistics.median(p99[mode]):.1f}", f"{loss * 100:+.1f}%"])
    print_table(["mode", "req/s", "p99 ms", "lost vs off"], rows, align=NUMBERS, rule=True)
    met = results["log+sample"]["loss"] <= TARGET_LOSS
    print(f"target: logging and sampling on lose at most {TARGET_LOSS:.0%}: {'met' if met else 'NOT met'}")
    write_results(
        "monitoring",
        {
            "machine": info,
            "concurrency": CONCURRENCY,
            "seconds": seconds,
            "repeats": repeats,
            "modes": results,
            "target": {"max_loss": TARGET_LOSS, "met": met},
        },
    )
    print(json.dumps({mode: round(r["throughput"], 1) for mode, r in results.items()}))
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
