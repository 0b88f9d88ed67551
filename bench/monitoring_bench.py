"""What monitoring costs the hot path: inference throughput at concurrency 32, monitoring off vs on, in one run.

    python -m bench.monitoring_bench            # 9 rounds of 4 s levels: about 4 minutes on a 2-core machine
    python -m bench.monitoring_bench --quick    # 5 rounds of 2 s levels: about 1.5 minutes

Three inference servers (granian, `flywheel up`'s command, one process) serve the same MiniLM text model
(`bench.inference_bench`'s export, 64-token texts through `POST /v1/models/minilm:predict`), each with its
own FLYWHEEL_HOME and database:

- `off`: the prediction log off (INFERENCE_LOG_PREDICTIONS=false), so no sampling and no shadow either;
- `log+sample`: every prediction logged (batched writer, packed inputs, input statistics), and the policy's
  `sample_rate` of 5% sent to labeling as `prediction.sampled`;
- `log+sample+shadow`: the same, plus 10% of requests mirrored to a staged version (v2, the same graph).

The load generator (C keep-alive connections, each one request at a time) measures the three in rounds of
short levels, in the order off, on, shadow and then reversed the next round (ABBA), so that a slow period of
a shared machine falls on every mode alike rather than on one. Each round gives a ratio of each mode to the
`off` level beside it; the figures are the medians over rounds of those ratios (and of the throughputs), with
their spread, and the server's CPU per request (its process tree's CPU seconds over the requests it answered),
which contention on a shared machine disturbs less than throughput. The target is at most 5% of throughput
lost with logging and sampling on (the median per-round loss); shadow traffic costs its share of extra
compute by design (it runs the model again) and is reported beside. Results go to
bench/results/monitoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import requests

from bench.common import Progress, Stats, describe_machine, machine, process_tree_cpu_seconds, write_results
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
    parser.add_argument("--quick", action="store_true", help="5 rounds of 2 s levels")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one level")
    parser.add_argument("--rounds", type=int, default=9, help="rounds of off/on/shadow levels, order alternating")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"))
    args = parser.parse_args(argv)
    seconds, warmup, rounds = (2.0, 0.5, 5) if args.quick else (args.seconds, 1.0, args.rounds)
    progress = Progress()
    info = machine()
    progress(f"machine: {describe_machine(info)}")
    root = Path(tempfile.mkdtemp(prefix="flywheel-monitoring-bench-"))
    models = export_models(root / "models")
    load = workloads(models)["text"]
    progress("exported MiniLM (+ linear head) to ONNX")
    throughput: dict[str, list[float]] = {mode: [] for mode in MODES}
    p99: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu_ms: dict[str, list[float]] = {mode: [] for mode in MODES}
    losses: dict[str, list[float]] = {mode: [] for mode in MODES}
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
        for round_ in range(rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            level_throughput = {}
            for mode in order:
                server = servers[mode]
                cpu_before = process_tree_cpu_seconds(server.pid)
                level = drive(server.port, load.requests, CONCURRENCY, warmup, seconds)
                cpu = process_tree_cpu_seconds(server.pid) - cpu_before  # the warm-up's requests included
                answered = level.completed + level.throughput * warmup
                level_throughput[mode] = level.throughput
                throughput[mode].append(level.throughput)
                p99[mode].append(level.percentile(99))
                cpu_ms[mode].append(1000 * cpu / answered if answered else 0.0)
            for mode in servers:
                off = level_throughput["off"]
                losses[mode].append(1 - level_throughput[mode] / off if off else 0.0)
            progress(
                f"round {round_ + 1}/{rounds} ({', '.join(order)}): "
                + ", ".join(f"{m} {level_throughput[m]:.1f} req/s ({losses[m][-1] * 100:+.1f}%)" for m in servers)
            )
        logged = {
            mode: requests.get(
                f"{server.url}/v1/predictions?limit=1", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
            ).json()["predictions"]
            for mode, server in servers.items()
        }
    cpu_off = statistics.median(cpu_ms["off"])
    rows, results = [], {}
    for mode in MODES:
        level, loss, cpu = Stats.of(throughput[mode]), Stats.of(losses[mode]), Stats.of(cpu_ms[mode])
        results[mode] = {
            "throughput": level.as_dict(),
            "loss_per_round": loss.as_dict(),
            "loss": loss.median,
            "p99_ms": statistics.median(p99[mode]),
            "server_cpu_ms_per_request": cpu.as_dict(),
            "cpu_ratio": cpu.median / cpu_off if cpu_off else None,
            "logged_something": bool(logged[mode]),
        }
        rows.append(
            [
                mode,
                level.show(1),
                f"{statistics.median(p99[mode]):.1f}",
                f"{loss.median * 100:+.1f}% (IQR {loss.q1 * 100:+.1f}..{loss.q3 * 100:+.1f})",
                cpu.show(2),
                f"{results[mode]['cpu_ratio']:.3f}" if results[mode]["cpu_ratio"] else "-",
            ]
        )
    print_table(
        ["mode", "req/s (median)", "p99 ms", "lost vs off (median per round)", "server CPU ms/req", "CPU vs off"],
        rows,
        align=NUMBERS,
        rule=True,
    )
    met = results["log+sample"]["loss"] <= TARGET_LOSS
    verdict = "met" if met else "NOT met"
    print(f"target: logging and sampling on lose at most {TARGET_LOSS:.0%} (median per round): {verdict}")
    write_results(
        "monitoring",
        {
            "machine": info,
            "concurrency": CONCURRENCY,
            "seconds": seconds,
            "warmup_s": warmup,
            "rounds": rounds,
            "order": "ABBA: off, log+sample, log+sample+shadow, then reversed",
            "modes": results,
            "target": {"max_loss": TARGET_LOSS, "met": met},
        },
    )
    print(json.dumps({mode: round(r["throughput"]["median"], 1) for mode, r in results.items()}))
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
