"""Ingestion push throughput, beside the raw storage-write + DB-insert ceiling, on both storage backends.

    python -m bench.ingestion            # full run, about 2 minutes on a 2-core machine
    python -m bench.ingestion --quick    # fewer repeats, for a smoke test

What it does, per backend (file:// and S3 through a moto server in a subprocess):

1. starts the real ingestion service as a separate process, exactly as `flywheel up` does (gunicorn, gthread,
   1 worker, 8 threads), with its own FLYWHEEL_HOME under a temp dir and Redis DB 9 (flushed before and after);
2. creates a partner and two datasets over HTTP, then pushes with a bounded load generator: ``--threads``
   client threads (one ``requests.Session`` each) push pre-built JSON bodies, ``--text-batches`` batches of
   500 unique ~200-character texts and ``--image-batches`` batches of 50 distinct 32x32 PNGs (base64) per
   repeat; items/s = accepted items / wall time of the repeat;
3. in the same run, interleaved with the service repeats, measures the raw ceiling in-process: the same
   backend's ``put`` (text: one packed object per 500 items, as ingestion writes them; images: one object
   per image, through as many upload threads as ingestion uses) plus one SQLAlchemy bulk INSERT of the
   equivalent rows into a temp SQLite made with ``services.ingestion.models`` (same engine settings as the
   service: WAL, synchronous=NORMAL, BEGIN IMMEDIATE), with the same number of concurrent threads.

Beside each rate it records the CPU each process burnt (from /proc): "svc items/CPU-s" is what the service
would do with one whole core, the number a shared machine distorts least; and how much the service's
database grew per item (event_outbox envelopes included).

Then it profiles the text push in-process (Flask test client, file backend) with cProfile: CPU (thread CPU
time) and wall time per product module and function, the library code each calls charged to it, with one
thread and with ``--threads`` pushes in flight, and a top list by own time (see ``bench.ingestion.profiler``).

Targets (from the issue): text >= 2,000 items/s; images >= half of the raw ceiling. Medians over repeats are
compared; a measurement whose IQR exceeds 10% of its median is flagged noisy ("~").
Results: bench/results/ingestion.json. Exit status 0 when every target is met, 1 when one is missed, 130 on
Ctrl-C. Every process the bench starts is stopped on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import redis

from bench.common import Progress, describe_machine, machine, write_results
from bench.ingestion import REDIS_URL, REPO_ROOT
from bench.ingestion.ceiling import RawCeiling
from bench.ingestion.profiler import print_profile, profile_text_push
from bench.ingestion.service import service_storage_growth, set_up_tenant, start_service
from bench.ingestion.throughput import IMAGE_TARGET_FRACTION, TEXT_TARGET_ITEMS_PER_S, Measurement, measure_kind
from bench.ingestion.workload import Workload
from shared.tables import NUMBERS, print_table
from testkit.processes import managed_processes
from testkit.s3 import start_s3_process


def flush_bench_redis() -> None:
    redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=10).flushdb()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ingestion", description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="file,s3", help="comma-separated: file, s3 (default both)")
    parser.add_argument("--threads", type=int, default=4, help="client threads pushing concurrently (default 4)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per measurement (default 5)")
    parser.add_argument("--text-batches", type=int, default=8, help="text pushes per repeat (default 8)")
    parser.add_argument("--image-batches", type=int, default=8, help="image pushes per repeat (default 8)")
    parser.add_argument("--text-batch-size", type=int, default=500)
    parser.add_argument("--image-batch-size", type=int, default=50)
    parser.add_argument("--profile-pushes", type=int, default=8, help="pushes per profiling pass (0: skip)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, fewer batches: a smoke test")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.text_batches, args.image_batches, args.profile_pushes = 3, 4, 4, 4
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - {"file", "s3"}
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Progress()
    info = machine()
    progress(f"machine: {describe_machine(info)}")
    try:
        flush_bench_redis()
    except redis.RedisError as exc:
        print(f"the bench needs Redis at {REDIS_URL}: {exc}", file=sys.stderr)
        return 2

    measurements: list[Measurement] = []
    storage_growth: dict[str, dict[str, Any]] = {}
    profile: dict[str, Any] | None = None
    workloads = [
        Workload("text", args.text_batch_size, args.text_batches),
        Workload("image", args.image_batch_size, args.image_batches),
    ]
    with tempfile.TemporaryDirectory(prefix="flywheel-ingestion-bench-") as tmp, managed_processes() as processes:
        workdir = Path(tmp)
        try:
            s3_endpoint, moto = None, None
            if "s3" in args.backends:
                progress("starting moto (S3) in a subprocess")
                s3_endpoint, moto = start_s3_process(processes, workdir / "moto.log")
                progress(f"moto answers at {s3_endpoint}")
            for backend in args.backends:
                progress(f"[{backend}] starting ingestion under gunicorn (gthread, 1 worker, 8 threads)")
                service = start_service(processes, backend, workdir / f"service-{backend}", s3_endpoint)
                set_up_tenant(service, f"{backend}-{uuid.uuid4().hex[:8]}")
                progress(f"[{backend}] ingestion ready at {service.url}; partner and datasets created")
                raw = RawCeiling(backend, workdir / f"raw-{backend}", s3_endpoint, args.threads)
                try:
                    for workload in workloads:
                        progress(
                            f"[{backend}] {workload.kind}: {args.repeats} repeats of {workload.batches_per_repeat} "
                            f"pushes x {workload.batch_size} items, {args.threads} client threads, vs raw ceiling"
                        )
                        measurements.append(
                            measure_kind(
                                progress,
                                service,
                                raw,
                                workload,
                                threads=args.threads,
                                repeats=args.repeats,
                                seed=args.seed,
                                moto=moto if backend == "s3" else None,
                            )
                        )
                    storage_growth[backend] = service_storage_growth(service)
                finally:
                    raw.close()
                    processes.stop(service.child)
                    flush_bench_redis()
                progress(f"[{backend}] ingestion stopped")
            if args.profile_pushes > 0:
                progress("profiling the text push in-process (Flask test client, file backend)")
                try:
                    profile = profile_text_push(
                        progress,
                        workdir / "profile",
                        pushes=args.profile_pushes,
                        batch_size=args.text_batch_size,
                        threads=args.threads,
                    )
                except Exception as exc:  # the throughput table is still worth printing
                    progress(f"profiling failed: {exc!r}")
                    profile = None
        finally:
            with contextlib.suppress(redis.RedisError):
                flush_bench_redis()
    progress("all processes stopped, temp data removed")

    print(f"\nMachine: {describe_machine(info)}")
    print(
        f"Load: {args.threads} client threads; medians of {args.repeats} repeats, ±IQR as % of median, "
        "'~' = noisy (IQR > 10% of median)\n"
    )
    rows = [
        [
            m.backend,
            f"{m.kind} x{m.batch_size}",
            m.service.show(),
            m.raw.show(),
            f"{m.ratio:.2f}" if m.ratio is not None else "n/a",
            m.target,
            "PASS" if m.passed else "FAIL",
            m.service_per_cpu_second.show(),
            m.cores("service"),
            m.cores("raw"),
        ]
        for m in measurements
    ]
    headers = ["backend", "kind", "service items/s", "raw items/s", "ratio", "target", "result"]
    table = print_table(
        [*headers, "svc items/CPU-s", "cores svc/moto/bench: service run", "raw run"], rows, align=NUMBERS, rule=True
    )
    print(
        "svc items/CPU-s = items accepted per CPU-second the service used (its rate if it had one whole core);\n"
        "cores = average CPU cores kept busy during the repeats by the ingestion service (gunicorn), moto and this "
        "process (the load generator, or the raw writer)"
    )
    for backend, growth in storage_growth.items():
        print(
            f"[{backend}] service database: {growth['db_bytes_per_item']:,.0f} bytes per item on disk, of which "
            f"event_outbox envelopes {growth['outbox_bytes_per_item']:,.0f} (never deleted: "
            f"{growth['outbox_rows']:,} rows, {growth['outbox_rows_unsent']} unsent)"
        )
    print(f"load average at end: {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    if any(m.service.noisy or m.raw.noisy for m in measurements):
        print("note: rows marked '~' were noisy (the machine is shared); rerun before trusting a close call")
    profile_text = print_profile(profile) if profile else ""
    path = write_results(
        "ingestion",
        {
            "machine": info,
            "config": {
                **vars(args),
                "redis_url": REDIS_URL,
                "gunicorn": "gthread, 1 worker, 8 threads (cli.launcher.http_command)",
            },
            "targets": {
                "text_items_per_s": TEXT_TARGET_ITEMS_PER_S,
                "image_fraction_of_raw": IMAGE_TARGET_FRACTION,
            },
            "measurements": [m.as_dict() for m in measurements],
            "service_storage_growth": storage_growth,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "profile": profile,
            "table": table,
            "profile_table": profile_text,
            "duration_s": round(progress.elapsed, 1),
        },
    )
    print(f"\nwrote {path.relative_to(REPO_ROOT)} in {progress.elapsed:.0f}s total")
    return 0 if all(m.passed for m in measurements) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: every process the bench started has been stopped", file=sys.stderr)
        sys.exit(130)
