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
from bench.model_memory_bench import section as model_memory_section
from shared.tables import render

RESULTS = Path(__file__).parent / "results"
MODULES = {  # benchmark name -> the module `python -m` runs
    "ingestion_bench": "bench.ingestion",
    "training_bench": "bench.training_bench",
    "inference_bench": "bench.inference_bench",
    "inference_floor": "bench.inference_floor",
    "v2_route_bench": "bench.v2_route_bench",
    "predict_route_bench": "bench.predict_route_bench",
    "monitoring_bench": "bench.monitoring_bench",
    "metering_bench": "bench.metering_bench",
    "flywheel_bench": "bench.flywheel_bench",
    "quality_bench": "bench.quality_bench",
    "model_memory_bench": "bench.model_memory_bench",
    "peer_bench": "bench.peer_bench",
}
BENCHMARKS = tuple(MODULES)
RESULT_FILES = {
    "ingestion_bench": "ingestion",
    "training_bench": "training",
    "inference_bench": "inference",
    "inference_floor": "inference_floor",
    "v2_route_bench": "v2_route",
    "predict_route_bench": "predict_route",
    "monitoring_bench": "monitoring",
    "metering_bench": "metering",
    "flywheel_bench": "flywheel",
    "quality_bench": "quality",
    "model_memory_bench": "model_memory",
    "peer_bench": "peer",
}


def run_all(names: list[str]) -> dict[str, Any]:
    outcomes: dict[str, Any] = {}
    for number, name in enumerate(names, start=1):
        print(f"\n=== [{number}/{len(names)}] python -m {MODULES[name]}", flush=True)
        started = time.monotonic()
        status = subprocess.run([sys.executable, "-m", MODULES[name]], check=False).returncode
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


def _median(stat: Any) -> float:
    return stat["median"] if isinstance(stat, dict) else float(stat)


def _shown(stat: Any, digits: int = 0) -> str:
    """A Stats dict as `1,234 ±5%`, with `~` when its repeats were noisy."""
    if not isinstance(stat, dict):
        return f"{stat:,.{digits}f}"
    spread = 100 * stat["iqr"] / stat["median"] if stat["median"] else 0.0
    return f"{stat['median']:,.{digits}f} ±{spread:.0f}%{' ~' if stat['noisy'] else ''}"


def _ingestion(r: dict[str, Any]) -> str:
    rows = [
        [
            m["backend"],
            f"{m['kind']}, batches of {m['batch_size']}",
            _shown(m["service_items_per_s"]),
            _shown(m["raw_items_per_s"]),
            f"{m['ratio']:.2f}",
            m["target"],
            "met" if m["passed"] else "**missed**",
        ]
        for m in r["measurements"]
    ]
    headers = ["backend", "push", "service items/s", "raw writes items/s (baseline)", "ratio", "target", "result"]
    return render(headers, rows, markdown=True)


def _training(r: dict[str, Any]) -> str:
    overhead = render(
        ["workload", "bare loop samples/s (baseline)", "trainer samples/s", "ratio", "overhead wall / CPU", "noisy"],
        [
            [
                w["workload"],
                w["bare_loop_samples_per_second"],
                w["trainer_samples_per_second"],
                f"{w['trainer_vs_bare']:.3f}",
                f"{w['overhead_percent']:.1f}% / {w['cpu_overhead_percent']:.1f}%",
                w.get("noisy", "-"),
            ]
            for w in r["trainer_overhead"]
        ],
        markdown=True,
    )
    onnx = render(
        ["model", "batch", "torch ms (baseline)", "ONNX Runtime ms", "speed-up"],
        [
            [i["model"], i["batch"], i["torch_ms"], i["onnxruntime_ms"], f"{i['onnxruntime_speedup']:.2f}x"]
            for i in r["inference"]
        ],
        markdown=True,
    )
    threads = r.get("machine", {}).get("torch_threads")
    return f"Trainer against a bare loop (torch on {threads} thread(s); target overhead <= 5%):\n\n{overhead}\n\n{onnx}"


def _inference(r: dict[str, Any]) -> str:
    parts = []
    for layout, modes in r["served"].items():
        rows = []
        for model in modes["on"]:
            ceiling = r["ceilings"][model]["best"]
            off_levels = {level["concurrency"]: level for level in modes["off"][model]}
            for on in modes["on"][model]:
                off = off_levels[on["concurrency"]]
                rows.append(
                    [
                        model,
                        on["concurrency"],
                        _shown(on["items_per_s"]),
                        _shown(off["items_per_s"]),
                        f"{_median(on['items_per_s']) / _median(off['items_per_s']):.2f}x",
                        f"{on['p99_ms']:.1f} / {off['p99_ms']:.1f}",
                        f"{ceiling:,.0f}",
                        f"{_median(on['items_per_s']) / _median(on['adjacent_ceiling']):.0%}",
                        "-" if on["mean_batch"] is None else f"{on['mean_batch']:.1f}",
                    ]
                )
        headers = [
            "model",
            "concurrency",
            "batching on items/s",
            "off items/s",
            "on/off",
            "p99 ms on / off",
            "in-process ceiling (baseline)",
            "on, of ceiling beside",
            "mean batch",
        ]
        verdicts = r["targets"][layout]
        text, image = verdicts["text_on_vs_ceiling"], verdicts["image_on_vs_off"]
        parts.append(
            f"Deployment {layout} (server worker processes x threads):\n\n{render(headers, rows, markdown=True)}\n\n"
            f"Targets at concurrency 32: text {text['ratio']:.0%} of its ceiling (>= {text['target']:.0%}: "
            f"{'met' if text['met'] else '**missed**'}); image batching on/off {image['speedup']:.2f}x "
            f"(>= {image['target']:.0f}x: {'met' if image['met'] else '**missed**'}); "
            f"failed requests: {verdicts['errors']}."
        )
    return "\n\n".join(parts)


def _inference_floor(r: dict[str, Any]) -> str:
    rows = [
        [
            row["server"],
            row["onnxruntime_threads"],
            _shown(row["on_items_per_s"]),
            _shown(row["off_items_per_s"]),
            f"{row['speedup']:.2f}x",
            f"{row['on_cpu_ms_per_request']:.2f} / {row['off_cpu_ms_per_request']:.2f}",
        ]
        for row in r["rows"]
    ]
    headers = ["front end (floor app)", "ORT threads", "on items/s", "off items/s (baseline)", "on/off", "CPU ms/req"]
    table = render(headers, rows, markdown=True)
    return f"{table}\n\nBest floor {r['best_speedup']:.2f}x against the {r['target']:.0f}x target."


def _v2_route(r: dict[str, Any]) -> str:
    from bench.v2_route_bench import HEADERS, table_rows

    target = r.get("target") or {}
    verdict = "met" if target.get("met") else "**missed**"
    share = 100 * target.get("share", 0.0)
    return (
        f"{render(HEADERS, table_rows(r['deployments']), markdown=True)}\n\n"
        f"{r.get('workload', 'image').capitalize()} at concurrency 32, best deployment: {share:.1f}% of the ceiling "
        f"beside it, target ≥ {100 * target.get('share_of_ceiling', 0.4):.0f}%: {verdict}."
    )


def _flywheel(r: dict[str, Any]) -> str:
    stages = r["stages"]
    rows = [[name, _shown(stat, 1)] for name, stat in stages.items()]
    ratio = r.get("ratio_loop_to_training")
    tail = f"threshold → serving / training alone (baseline): {ratio:.2f}" if ratio else ""
    return f"{render(['stage', 'seconds'], rows, markdown=True)}\n\n{tail}"


def _quality(r: dict[str, Any]) -> str:
    parts = []
    for task_type in ("text_classification", "image_classification"):
        if task_type not in r:
            continue
        rows = [
            [
                name,
                " ".join(f"{run['macro_f1']:.3f}" for run in c["runs"]),
                f"{c['mean_macro_f1']:.3f}",
                f"{c['spread']:.3f}",
                f"{c['baseline_macro_f1']:.3f}",
                f"{c['lift']:+.3f}",
                f"{c['mean_train_seconds']:.0f}",
            ]
            for name, c in r[task_type]["configurations"].items()
        ]
        headers = ["configuration", "macro-F1 per seed", "mean", "spread", "baseline (same items)", "lift", "s/run"]
        method = r[task_type]["baseline"]["method"]
        parts.append(f"{task_type} against {method}:\n\n{render(headers, rows, markdown=True)}")
    return "\n\n".join(parts) + "\n\nTargets: lift >= 0.05, spread <= 0.03 over the seeds."


def _metering(r: dict[str, Any]) -> str:
    rows = [
        [
            mode,
            _shown(m["throughput"], 1),
            f"{m['loss'] * 100:+.1f}%",
            _shown(m["server_cpu_ms_per_request"], 3),
            "-" if m["cpu_ratio"] is None else f"{m['cpu_ratio']:.3f}",
            m["errors"],
        ]
        for mode, m in r["modes"].items()
    ]
    headers = ["mode", "req/s", "lost vs off (median per round)", "server CPU ms/req", "CPU vs off", "errors"]
    profiled = all("profile" in m for m in r["modes"].values())
    if profiled:
        headers.append("CPU samples in metering")
        for row, m in zip(rows, r["modes"].values(), strict=True):
            row.append(f"{m['profile']['metering_share'] * 100:.2f}%")
    target = r["target"]
    return (
        f"{render(headers, rows, markdown=True)}\n\nTarget: metering loses at most {target['max_loss']:.0%}: "
        f"{'met' if target['met'] else '**missed**'}; the request thread's share, in process: "
        f"{r['count_us_per_request']:.2f} us per request."
        + (
            f" A/A control ({r['control']}) against off: {r['modes'][r['control']]['loss'] * 100:+.1f}%."
            if "control" in r
            else ""
        )
    )


def _monitoring(r: dict[str, Any]) -> str:
    rows = [
        [
            mode,
            _shown(m["throughput"], 1),
            f"{m['loss'] * 100:+.1f}%",
            f"{m['p99_ms']:.1f}",
            _shown(m["server_cpu_ms_per_request"], 3),
        ]
        for mode, m in r["modes"].items()
    ]
    headers = ["mode", "req/s", "lost vs off (median per round)", "p99 ms", "server CPU ms/req"]
    target = r["target"]
    return (
        f"{render(headers, rows, markdown=True)}\n\nTarget: logging and sampling lose at most "
        f"{target['max_loss']:.0%}: {'met' if target['met'] else '**missed**'}."
    )


def _peer(r: dict[str, Any]) -> str:
    peer = r["settings"]["peer"]["server"]
    rows = []
    for form, m in r["forms"].items():
        mine, theirs, ratio = m.get("flywheel"), m.get("mlserver"), m.get("ratio_per_round")
        rows.append(
            [
                f"v2 {form}",
                _shown(mine["goodput_per_s"], 1) if mine else "n/a",
                _shown(theirs["goodput_per_s"], 1) if theirs else "n/a",
                _shown(ratio, 2) if ratio else "n/a",
                " / ".join(f"{x['p99_ms']:.0f}" if x else "n/a" for x in (mine, theirs)),
                " / ".join(f"{_median(x['server_cpu_ms_per_request']):.2f}" if x else "n/a" for x in (mine, theirs)),
                " / ".join(str(x["errors"]) if x else "n/a" for x in (mine, theirs)),
                " / ".join(f"{x['mean_batch']:.1f}" if x and x.get("mean_batch") else "-" for x in (mine, theirs)),
            ]
        )
    headers = ["concurrency 32", "Flywheel good-put/s", f"{peer} good-put/s", "Flywheel / peer (per round)"]
    headers += ["p99 ms F / P", "server CPU ms/req F / P", "errors F / P", "mean batch F / P"]
    loads = r.get("load_average_per_round") or []
    load = f" Load average (1 min) over the rounds: {min(loads):.1f} to {max(loads):.1f}." if loads else ""
    return (
        f"{render(headers, rows, markdown=True)}\n\nThe same mobilenet_v3_small graph and request bytes; rounds in "
        f"alternating order, the ratio is the median of the per-round ratios.{load}"
    )


SECTIONS = {
    "monitoring_bench": ("Monitoring: the hot path with the prediction log, sampling and shadow traffic", _monitoring),
    "metering_bench": ("Metering: the hot path with usage metering on and off", _metering),
    "ingestion_bench": ("Ingestion", _ingestion),
    "training_bench": ("Training", _training),
    "inference_bench": ("Inference", _inference),
    "inference_floor": ("Inference: the floor of a Python front end", _inference_floor),
    "v2_route_bench": ("Inference: the image path, WSGI route and Flask, beside the ceiling", _v2_route),
    "predict_route_bench": ("Inference: the text path, WSGI route and Flask, beside the ceiling", _v2_route),
    "flywheel_bench": ("The flywheel: retrain threshold to serving", _flywheel),
    "quality_bench": ("Quality: fine-tuned model against a classical baseline", _quality),
    "model_memory_bench": ("Many tenants' models per replica: a memory budget", model_memory_section),
    "peer_bench": ("Beside a peer: Flywheel and MLServer on the same graph", _peer),
}


def markdown(outcomes: dict[str, Any], info: dict[str, Any]) -> str:
    runs = []
    for name, outcome in outcomes.items():
        results = outcome.get("results") or {}
        finished = results.get("finished_at") or results.get("created_at", "")
        runs.append([name, outcome["exit_status"], outcome["seconds"], finished])
    lines = [
        f"# Benchmark results\n\n{describe_machine(info)}\n",
        "Medians over repeats, `±` the inter-quartile range as a share of the median, `~` a noisy figure.\n",
        render(["benchmark", "exit", "seconds", "finished"], runs, markdown=True),
    ]
    for name, outcome in outcomes.items():
        results = outcome.get("results")
        if not results:
            continue
        title, section = SECTIONS[name]
        try:
            body = section(results)
        except (KeyError, TypeError, ZeroDivisionError) as exc:  # an older or partial results file
            body = f"(results file not in the expected shape: {exc!r})"
        lines.append(f"\n## {title}\n\n{body}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m bench` runs every benchmark; `python -m bench NAME…` reruns some and reports all of them (the
    others from their last results); `python -m bench --report` only rewrites the report."""
    args = list(argv if argv is not None else sys.argv[1:])
    report_only = "--report" in args
    names = [] if report_only else [a for a in args if a != "--report"] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    info = machine()
    print(describe_machine(info))
    fresh = run_all(names)
    outcomes = {**_previous_outcomes(), **fresh}
    outcomes = {name: outcomes[name] for name in BENCHMARKS if name in outcomes}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps({"machine": info, "benchmarks": outcomes}, indent=2))
    (RESULTS / "latest.md").write_text(markdown(outcomes, info))
    if "inference_bench" in outcomes:
        plotted = plot_inference(outcomes["inference_bench"].get("results") or {})
        if plotted:
            print(f"plot: {plotted}")
    print(f"\nwrote {RESULTS / 'latest.json'} and {RESULTS / 'latest.md'}")
    return 0 if all(o["exit_status"] == 0 for o in fresh.values()) else 1


def _previous_outcomes() -> dict[str, Any]:
    """What the last report said about each benchmark, refreshed from its results file when one is there."""
    try:
        previous = json.loads((RESULTS / "latest.json").read_text())["benchmarks"]
    except (OSError, ValueError, KeyError):
        previous = {}
    outcomes = {}
    for name, stem in RESULT_FILES.items():
        path = RESULTS / f"{stem}.json"
        if path.exists():
            outcome = dict(previous.get(name) or {"exit_status": "-", "seconds": "-"})
            outcome["results"] = json.loads(path.read_text())
            outcomes[name] = outcome
    return outcomes


if __name__ == "__main__":
    sys.exit(main())
