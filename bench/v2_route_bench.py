"""Issue #23's image target, measured as it is set: the image model's good-put at concurrency 32 as a share of raw
ONNX Runtime measured right beside it, for the service with its plain WSGI route for v2 inference (the default),
the same service with the route off (`INFERENCE_V2_WSGI_ROUTE=false`: every request through Flask, the baseline),
and the floor app (`bench.inference_floor`: parse, batch, answer, nothing else), on one and on two worker
processes.

    python -m bench.v2_route_bench            # about 4 minutes on a 2-core machine
    python -m bench.v2_route_bench --quick    # 2 rounds per deployment

Each deployment's three servers run side by side, idle unless driven; each round samples the ceiling (ONNX
Runtime at batch 32, in this process), then drives every server in turn (v2 binary, one 1x3x64x64 image per
request, 32 keep-alive connections), the order alternating round by round so all three see the same machine.
Shares are of the median ceiling of the deployment's rounds. Writes bench/results/v2_route.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Progress, Stats, describe_machine, machine, process_tree_cpu_seconds, write_results
from bench.inference_bench import (
    CeilingProbe,
    binary_image_requests,
    drive,
    export_image_model,
    stand_in,
    start_server,
)
from bench.inference_floor import serve
from shared.storage import FileStore
from shared.tables import NUMBERS, print_table
from testkit.processes import answers_ok, managed_processes, wait_until

CONCURRENCY = 32
MAX_BATCH = 32
REQUEST_THREADS = 64  # what `flywheel up` runs inference with (2 x the max batch)
TARGET_SHARE = 0.40
SERVERS = ("route", "flask", "floor")
LABELS = {
    "route": "service, v2 WSGI route (default)",
    "flask": "service, through Flask (baseline)",
    "floor": "floor app (no auth, log, metrics)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s per deployment")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--workers", default="1,2", help="worker processes per server, comma-separated")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"))
    args = parser.parse_args(argv)
    rounds, seconds = (2, 2.0) if args.quick else (args.rounds, args.seconds)
    progress = Progress()
    info = machine()
    progress(f"machine: {describe_machine(info)}")
    root = Path(tempfile.mkdtemp(prefix="flywheel-v2-route-bench-"))
    stoppers = []
    results: dict[str, Any] = {}
    finished = False
    try:
        folder = export_image_model(root / "model")
        graph = folder / "model.onnx"
        requests_, feeds = binary_image_requests(64)
        probe = CeilingProbe(graph, feeds, MAX_BATCH, 1.5)
        stand_ins = {}
        for mode in ("route", "flask"):
            store = FileStore(root / "homes" / mode / "objects")
            store.ensure_buckets("models", "raw")
            registry = stand_in(store, {"image": folder}, {"mobilenet": {"max_batch_size": MAX_BATCH}})
            stand_ins[mode] = registry.url
            stoppers.append(registry.stop)
        for workers in (int(w) for w in args.workers.split(",")):
            ort_threads = max(1, (os.cpu_count() or 1) // workers)
            progress(f"{workers} worker(s) x {REQUEST_THREADS} threads, ONNX Runtime {ort_threads} thread(s) each")
            results[str(workers)] = measure_deployment(
                root,
                graph,
                stand_ins,
                args.redis_url,
                (workers, ort_threads),
                requests_,
                probe,
                (rounds, seconds),
                progress,
            )
        finished = True
    finally:
        for stop in stoppers:
            stop()
        if finished:
            shutil.rmtree(root, ignore_errors=True)
        else:  # a server that died took its reason with it otherwise
            progress(f"the run did not finish: the servers' logs are kept in {root}")
    verdict = report(results)
    path = write_results(
        "v2_route",
        {
            "machine": info,
            "settings": {
                "concurrency": CONCURRENCY,
                "max_batch": MAX_BATCH,
                "request_threads": REQUEST_THREADS,
                "rounds": rounds,
                "seconds_per_round": seconds,
                "request": "POST /v2/models/mobilenet/infer, v2 binary, one 1x3x64x64 FP32 image",
            },
            "deployments": results,
            "target": {"share_of_ceiling": TARGET_SHARE, **verdict},
        },
    )
    progress(f"results written to {path}")
    return 0


def measure_deployment(
    root: Path,
    graph: Path,
    stand_ins: dict[str, str],
    redis_url: str,
    layout: tuple[int, int],
    requests_: list[bytes],
    probe: CeilingProbe,
    schedule: tuple[int, float],
    progress: Progress,
) -> dict[str, Any]:
    """One deployment (worker processes, ONNX Runtime threads each): its three servers, `schedule` rounds of
    so many seconds."""
    workers, ort_threads = layout
    rounds, seconds = schedule
    with managed_processes() as processes:
        servers: dict[str, tuple[int, int]] = {}
        for mode in ("route", "flask"):
            server, child = start_server(
                processes,
                mode=mode,
                home=root / "homes" / mode,
                stand_in_url=stand_ins[mode],
                redis_url=redis_url,
                config={"intra_op_threads": ort_threads, "v2_wsgi_route": mode == "route"},
                workers=workers,
                threads=REQUEST_THREADS,
                server="granian",
            )
            ready = f"{server.url}/v2/health/ready"
            wait_until(lambda url=ready: answers_ok(url), timeout=240, what=f"inference ({mode}) ready", child=child)
            servers[mode] = (server.port, server.pid)
        servers["floor"] = serve(
            processes,
            "granian",
            graph,
            ort_threads,
            MAX_BATCH,
            root / "logs",
            workers=workers,
            request_threads=REQUEST_THREADS,
        )
        for port, _ in servers.values():
            drive(port, requests_, CONCURRENCY, 0.5, 1.0)  # warm every worker's session and connections
        ceilings: list[float] = []
        samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in SERVERS}
        for number in range(rounds):
            ceilings.append(probe.sample())
            order = SERVERS if number % 2 == 0 else SERVERS[::-1]
            for mode in order:
                port, pid = servers[mode]
                before = process_tree_cpu_seconds(pid)
                level = drive(port, requests_, CONCURRENCY, 1.0, seconds)
                spent = process_tree_cpu_seconds(pid) - before
                samples[mode].append(
                    {
                        "items_per_s": level.throughput,
                        "cpu_ms_per_request": 1000 * spent / max(1, level.answered),
                        "completed": level.completed,
                        "failed": level.errors,
                    }
                )
            progress(
                f"  round {number + 1}/{rounds}: ceiling {ceilings[-1]:,.0f}/s, "
                + ", ".join(f"{mode} {samples[mode][-1]['items_per_s']:,.0f}/s" for mode in SERVERS)
            )
    ceiling = Stats.of(ceilings)
    rows = {}
    for mode in SERVERS:
        good_put = Stats.of([s["items_per_s"] for s in samples[mode]])
        rows[mode] = {
            "items_per_s": good_put.as_dict(),
            "share_of_ceiling": good_put.median / ceiling.median,
            "share_by_round": [s["items_per_s"] / c for s, c in zip(samples[mode], ceilings, strict=True)],
            "cpu_ms_per_request": float(np.median([s["cpu_ms_per_request"] for s in samples[mode]])),
            "completed": sum(s["completed"] for s in samples[mode]),
            "failed": sum(s["failed"] for s in samples[mode]),
        }
    return {"ceiling_items_per_s": ceiling.as_dict(), "servers": rows}


HEADERS = ["deployment", "server", "good-put/s", "of ceiling", "by round", "CPU ms/req", "vs Flask", "failed"]


def table_rows(results: dict[str, Any]) -> list[list[Any]]:
    """The table's rows: per deployment, the ceiling beside it, then each server."""
    table: list[list[Any]] = []
    for workers, deployment in results.items():
        ceiling = deployment["ceiling_items_per_s"]["median"]
        flask = deployment["servers"]["flask"]["items_per_s"]["median"]
        table.append([f"{workers} worker(s)", "raw ONNX Runtime, batch 32", f"{ceiling:,.0f}", "100%"] + ["-"] * 4)
        for mode in SERVERS:
            row = deployment["servers"][mode]
            shares = row["share_by_round"]
            table.append(
                [
                    "",
                    LABELS[mode],
                    Stats.of(row["items_per_s"]["samples"]).show(),
                    f"{100 * row['share_of_ceiling']:.1f}%",
                    f"{100 * min(shares):.0f}-{100 * max(shares):.0f}%",
                    f"{row['cpu_ms_per_request']:.2f}",
                    f"{row['items_per_s']['median'] / flask:.2f}x",
                    row["failed"],
                ]
            )
    return table


def report(results: dict[str, Any]) -> dict[str, Any]:
    print()
    print_table(HEADERS, table_rows(results), align=NUMBERS, rule=True)
    best_workers, best = max(
        results.items(), key=lambda item: item[1]["servers"]["route"]["share_of_ceiling"], default=("-", None)
    )
    if best is None:
        return {}
    share = best["servers"]["route"]["share_of_ceiling"]
    met = share >= TARGET_SHARE and best["servers"]["route"]["failed"] == 0
    print(
        f"\nimage at concurrency 32, best deployment ({best_workers} worker(s)): {100 * share:.1f}% of the ceiling "
        f"beside it; target >= {100 * TARGET_SHARE:.0f}% with 0 failed: {'met' if met else 'NOT met'}"
    )
    return {"best_workers": best_workers, "share": share, "met": met}


if __name__ == "__main__":
    raise SystemExit(main())
