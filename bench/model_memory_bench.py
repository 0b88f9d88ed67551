"""Many tenants' models per replica: 50 models across 10 tenants, served eagerly and under a memory budget.

    python -m bench.model_memory_bench            # 3,000 requests per server: about 2 minutes on a 2-core machine
    python -m bench.model_memory_bench --quick    # 1,000 requests per server

Fifty image models (a 768 -> 1024 -> 2 MLP over 16x16 pixels, 3 MiB of weights each: one exported graph,
registered 50 times under 10 tenants, 5 each) are served by two inference servers (granian, one process,
`flywheel up`'s command) from the same registry stand-in:

- `eager`: no budget, every version loaded at start (the behaviour without INFERENCE_MODEL_MEMORY_BUDGET_MB);
- `budget`: INFERENCE_MODEL_MEMORY_BUDGET_MB sized for 15 of the 50 versions (by their accounted size, see
  `services/inference/residency.py`), the `wait` cold-start policy.

Both get the same request mix: each request picks a model by a Zipf-like law (rank k drawn with weight
1/k^1.1, ranks shuffled over the models with a fixed seed), sent by 8 client threads. The figures: the peak
of accounted bytes against the budget (the server's own `flywheel_inference_model_memory_peak_bytes`), the
server process's RSS at the end and its peak (VmHWM), the cold starts' durations (p50/p99, from the server's
`model_version_cold_started` log lines), the hit rate (`flywheel_inference_version_lookups_total`), the
evictions, the requests' own latency (p50/p99 at the client) and the failed requests. Results go to
bench/results/model_memory.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
from PIL import Image

from bench.common import Progress, describe_machine, machine, write_results
from bench.inference_bench import TOKEN, start_server
from services.inference.config import MODEL_MEMORY_FACTOR, MODEL_MEMORY_OVERHEAD_MB
from services.inference.residency import MIB, accounted_bytes
from shared.storage import FileStore
from shared.tables import NUMBERS, print_table, render
from testkit.models import export_graph, write_metadata
from testkit.processes import answers_ok, managed_processes, wait_until
from testkit.serving import RegistryStandIn, metric_samples, serving_document, upload_version

TENANTS = 10
MODELS_PER_TENANT = 5
FITS = 15
"""The budget holds this many of the versions (by accounted size)."""
ZIPF_S = 1.1
CONCURRENCY = 8
HIDDEN = 1024
SIZE = 16
SEED = 7


def export_mlp(folder: Path) -> Path:
    """One graph every model shares: 16x16 RGB pixels -> 1024 hidden units -> 2 logits (about 3 MiB)."""
    import torch

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.hidden = torch.nn.Linear(3 * SIZE * SIZE, HIDDEN)
            self.head = torch.nn.Linear(HIDDEN, 2)

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.hidden(pixels.flatten(1))))

    folder.mkdir(parents=True, exist_ok=True)
    graph = folder / "model.onnx"
    export_graph(MLP(), (torch.zeros(1, 3, SIZE, SIZE),), ["pixels"], graph)
    return graph


def model_folders(root: Path, graph: Path) -> dict[tuple[str, str], Path]:
    """(tenant, model) -> a version folder: the shared graph and its own metadata.json."""
    folders = {}
    for t in range(TENANTS):
        for m in range(MODELS_PER_TENANT):
            tenant, name = f"tenant{t:02d}", f"model{m}"
            folder = root / tenant / name
            folder.mkdir(parents=True)
            shutil.copy(graph, folder / "model.onnx")
            write_metadata(
                folder,
                model_name=name,
                task_type="image_classification",
                labels=["red", "blue"],
                inputs=[{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]}],
                preprocessing={"kind": "image", "size": [SIZE, SIZE], "mean": [0.5] * 3, "std": [0.5] * 3},
                lineage={"source": "bench"},
            )
            folders[(tenant, name)] = folder
    return folders


def api_key(tenant: str) -> str:
    return f"fwk_bench_{tenant}_" + "k" * 30


def stand_in(store: FileStore, folders: dict[tuple[str, str], Path]) -> tuple[RegistryStandIn, int]:
    """Every model served (version 1 in production); returns the stand-in and one version's accounted bytes."""
    registry = RegistryStandIn(token=TOKEN)
    size = 0
    for (tenant, _name), folder in folders.items():
        registry.accept_key(api_key(tenant), tenant=tenant, key_id=f"key_{tenant}")
        version = upload_version(store, tenant, folder, 1)
        registry.serve(serving_document(tenant, folder, {1: version}, production=1))
        size = accounted_bytes(version, factor=MODEL_MEMORY_FACTOR, overhead_mb=MODEL_MEMORY_OVERHEAD_MB)
    return registry.start(), size


def request_mix(models: list[tuple[str, str]], count: int) -> list[tuple[str, str]]:
    """`count` requests over the models, Zipf-like: rank k with weight 1/k^s, ranks shuffled over models."""
    rng = random.Random(SEED)  # noqa: S311 - a reproducible request mix, not security
    ranked = list(models)
    rng.shuffle(ranked)
    weights = [1.0 / (rank**ZIPF_S) for rank in range(1, len(ranked) + 1)]
    return rng.choices(ranked, weights=weights, k=count)


def red_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (255, 0, 0)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def drive(url: str, mix: list[tuple[str, str]]) -> tuple[list[float], list[int]]:
    """Send the mix from CONCURRENCY threads; each request's latency (s) and status."""
    body = json.dumps({"images": [red_png()]})
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    cursor = iter(range(len(mix)))

    def worker() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    index = next(cursor, None)
                if index is None:
                    return
                tenant, name = mix[index]
                headers = {"Authorization": f"Bearer {api_key(tenant)}", "Content-Type": "application/json"}
                started = time.perf_counter()
                try:
                    status = session.post(f"{url}/v1/models/{name}:predict", data=body, headers=headers, timeout=60)
                    code = status.status_code
                except requests.RequestException:
                    code = -1
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    statuses.append(code)

    threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, statuses


def tree_memory_kib(root: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) summed over `root` and its descendants, in KiB (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    rss = hwm = 0
    for pid in tree:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1])
    return rss, hwm


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def cold_start_ms(log_path: Path) -> list[float]:
    durations = []
    for line in log_path.read_text(errors="replace").splitlines():
        if '"model_version_cold_started"' in line:
            try:
                durations.append(float(json.loads(line)["duration_ms"]))
            except (ValueError, KeyError):
                continue
    return durations


def scrape(url: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text

    def total(name: str, **labels: str) -> float:
        return sum(
            value
            for got, value in metric_samples(text, name)
            if all(got.get(key) == want for key, want in labels.items())
        )

    return {
        "hits": total("flywheel_inference_version_lookups_total", result="hit"),
        "misses": total("flywheel_inference_version_lookups_total", result="miss"),
        "evictions": total("flywheel_inference_evictions_total"),
        "resident": total("flywheel_inference_resident_versions"),
        "peak_bytes": total("flywheel_inference_model_memory_peak_bytes"),
        "used_bytes": total("flywheel_inference_model_memory_bytes"),
    }


def run_mode(
    processes: Any, mode: str, root: Path, registry: RegistryStandIn, store_root: Path, config: dict, mix: list
) -> dict[str, Any]:
    home = root / "homes" / mode
    shutil.copytree(store_root, home / "objects")
    server, child = start_server(
        processes,
        mode=mode,
        home=home,
        stand_in_url=registry.url,
        redis_url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
        config={"intra_op_threads": 1, "log_predictions": "false", "metering": "false", **config},
        workers=1,
        threads=16,
        server="granian",
    )
    started = time.monotonic()
    wait_until(lambda: answers_ok(f"{server.url}/v2/health/ready"), timeout=300, what=f"{mode} ready", child=child)
    ready_s = time.monotonic() - started
    rss_ready, _ = tree_memory_kib(server.pid)
    latencies, statuses = drive(server.url, mix)
    rss_end, hwm = tree_memory_kib(server.pid)
    figures = scrape(server.url)
    lookups = figures["hits"] + figures["misses"]
    colds = cold_start_ms(home / "logs" / "inference.log")
    return {
        "ready_s": round(ready_s, 2),
        "requests": len(statuses),
        "errors": sum(1 for status in statuses if status != 200),
        "request_p50_ms": round(1000 * (percentile(latencies, 50) or 0), 2),
        "request_p99_ms": round(1000 * (percentile(latencies, 99) or 0), 2),
        "hit_rate": round(figures["hits"] / lookups, 4) if lookups else None,
        "misses": int(figures["misses"]),
        "evictions": int(figures["evictions"]),
        "resident_at_end": int(figures["resident"]),
        "peak_accounted_bytes": int(figures["peak_bytes"]),
        "cold_starts": len(colds),
        "cold_start_p50_ms": percentile(colds, 50),
        "cold_start_p99_ms": percentile(colds, 99),
        "cold_start_mean_ms": round(statistics.fmean(colds), 1) if colds else None,
        "rss_after_ready_mib": round(rss_ready / 1024, 1),
        "rss_end_mib": round(rss_end / 1024, 1),
        "rss_peak_mib": round(hwm / 1024, 1),
    }


def _cell(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def rows(results: dict[str, Any]) -> list[list[str]]:
    budget = results.get("budget_bytes") or 0
    table = []
    for mode, r in results["modes"].items():
        peak = r["peak_accounted_bytes"] / MIB if mode != "eager" else None
        table.append(
            [
                mode,
                f"{r['resident_at_end']}/{results['models']}",
                "-" if peak is None else f"{peak:.1f} / {budget / MIB:.1f}",
                f"{r['rss_end_mib']:.0f} (peak {r['rss_peak_mib']:.0f})",
                _cell(r["hit_rate"] * 100 if r["hit_rate"] is not None else None) + "%",
                str(r["evictions"]),
                str(r["cold_starts"]),
                f"{_cell(r['cold_start_p50_ms'])} / {_cell(r['cold_start_p99_ms'])}",
                f"{r['request_p50_ms']:.1f} / {r['request_p99_ms']:.1f}",
                str(r["errors"]),
            ]
        )
    return table


HEADERS = [
    "mode",
    "loaded at end",
    "peak accounted MiB / budget",
    "RSS MiB",
    "hit rate",
    "evictions",
    "cold starts",
    "cold start p50 / p99 ms",
    "request p50 / p99 ms",
    "errors",
]


def section(results: dict[str, Any]) -> str:
    """The report's section (`python -m bench`)."""
    mix = f"{results['requests']} requests, Zipf s={results['zipf_s']}, {results['concurrency']} client threads"
    verdict = "met" if results["under_budget"] else "**missed**"
    return (
        f"{results['models']} models across {results['tenants']} tenants; {mix}.\n\n"
        f"{render(HEADERS, rows(results), markdown=True)}\n\n"
        f"Accounted bytes stayed under the budget: {verdict}."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 requests per server")
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args(argv)
    count = 1000 if args.quick else args.requests
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the registry stand-in's access log
    progress = Progress()
    info = machine()
    progress(f"machine: {describe_machine(info)}")
    root = Path(tempfile.mkdtemp(prefix="flywheel-model-memory-bench-"))
    graph = export_mlp(root / "graph")
    folders = model_folders(root / "models", graph)
    store_root = root / "objects"
    store = FileStore(store_root)
    store.ensure_buckets("models", "raw")
    registry, size = stand_in(store, folders)
    budget_mb = round(FITS * size / MIB + 0.5, 1)  # room for FITS versions, not FITS + 1
    progress(f"{len(folders)} models registered; one version is accounted {size / MIB:.2f} MiB; budget {budget_mb} MiB")
    mix = request_mix(list(folders), count)
    modes = {"eager": {}, "budget": {"model_memory_budget_mb": budget_mb}}
    results: dict[str, Any] = {}
    try:
        with managed_processes() as processes:
            for mode, config in modes.items():
                results[mode] = run_mode(processes, mode, root, registry, store_root, config, mix)
                progress(f"{mode}: {json.dumps(results[mode])}")
    finally:
        registry.stop()
    budget = int(budget_mb * MIB)
    payload = {
        "machine": info,
        "tenants": TENANTS,
        "models": len(folders),
        "version_accounted_bytes": size,
        "graph_bytes": graph.stat().st_size,
        "budget_bytes": budget,
        "fits": FITS,
        "requests": count,
        "zipf_s": ZIPF_S,
        "concurrency": CONCURRENCY,
        "modes": results,
        "under_budget": results["budget"]["peak_accounted_bytes"] <= budget,
    }
    print_table(HEADERS, rows(payload), align=NUMBERS, rule=True)
    print(f"accounted bytes under the budget: {payload['under_budget']}")
    write_results("model_memory", payload)
    shutil.rmtree(root, ignore_errors=True)
    failed = any(r["errors"] for r in results.values())
    return 0 if payload["under_budget"] and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
