"""`make bench` / `python -m bench`: every benchmark, one after another, then one combined report.

Each benchmark runs as its own process (they start servers and load the CPU; isolation keeps one from
skewing the next) and writes bench/results/<name>.json. This collects them into bench/results/latest.json
and a Markdown table (bench/results/latest.md), and plots inference throughput and p99 latency against
concurrency, service beside its ceiling (bench/results/inference.png).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import describe_machine, machine

RESULTS = Path(__file__).parent / "results"
BENCHMARKS = ("ingestion_bench", "training_bench", "inference_bench", "flywheel_bench")
RESULT_FILES = {
    "ingestion_bench": "ingestion",
    "training_bench": "training",
    "inference_bench": "inference",
    "flywheel_bench": "flywheel",
}


def run_all(names: list[str]) -> dict[str, Any]:
    outcomes: dict[str, Any] = {}
    for number, name in enumerate(names, start=1):
        print(f"\n=== [{number}/{len(names)}] python -m bench.{name}", flush=True)
        started = time.monotonic()
        status = subprocess.run([sys.executable, "-m", f"bench.{name}"], check=False).returncode
        outcomes[name] = {"exit_status": status, "seconds": round(time.monotonic() - started, 1)}
        path = RESULTS / f"{RESULT_FILES[name]}.json"
        if path.exists():
            outcomes[name]["results"] = json.loads(path.read_text())
    return outcomes


def plot_inference(results: dict[str, Any]) -> Path | None:
    """Throughput and p99 against concurrency per model, batching on and off, beside the in-process ceiling."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    served = results.get("served") or {}
    if not served:
        return None
    layout = next(iter(served))  # the first server layout measured (workers x threads)
    models = sorted({model for mode in served[layout].values() for model in mode})
    figure, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for mode, sweeps in served[layout].items():
            levels = sorted(sweeps.get(model, []), key=lambda level: level["concurrency"])
            x = [level["concurrency"] for level in levels]
            axes[row][0].plot(x, [lv["items_per_s"]["median"] for lv in levels], marker="o", label=f"batching {mode}")
            axes[row][1].plot(x, [lv["p99_ms"] for lv in levels], marker="o", label=f"batching {mode}")
        ceiling = (results.get("ceilings") or {}).get(model, {}).get("best")
        if ceiling:
            axes[row][0].axhline(ceiling, linestyle="--", color="grey", label="in-process ONNX Runtime (best batch)")
        axes[row][0].set(title=f"{model} ({layout}): throughput", xlabel="concurrency", ylabel="items/s", xscale="log")
        axes[row][1].set(title=f"{model} ({layout}): p99 latency", xlabel="concurrency", ylabel="ms", xscale="log")
        for axis in axes[row]:
            axis.legend()
            axis.grid(alpha=0.3)
    figure.tight_layout()
    path = RESULTS / "inference.png"
    figure.savefig(path, dpi=100)
    return path


def markdown(outcomes: dict[str, Any], info: dict[str, Any]) -> str:
    lines = [
        f"# Benchmark results\n\n{describe_machine(info)}\n",
        "| benchmark | exit | seconds | headline |",
        "|---|---|---|---|",
    ]
    for name, outcome in outcomes.items():
        headline = (outcome.get("results") or {}).get("headline", "")
        lines.append(f"| {name} | {outcome['exit_status']} | {outcome['seconds']} | {headline} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    names = list(argv if argv is not None else sys.argv[1:]) or list(BENCHMARKS)
    info = machine()
    print(describe_machine(info))
    outcomes = run_all(names)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps({"machine": info, "benchmarks": outcomes}, indent=2))
    (RESULTS / "latest.md").write_text(markdown(outcomes, info))
    if "inference_bench" in outcomes:
        plotted = plot_inference(outcomes["inference_bench"].get("results") or {})
        if plotted:
            print(f"plot: {plotted}")
    print(f"\nwrote {RESULTS / 'latest.json'} and {RESULTS / 'latest.md'}")
    return 0 if all(o["exit_status"] == 0 for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
