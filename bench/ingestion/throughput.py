"""Service against ceiling: repeats interleaved, with the CPU each process burnt, and the targets."""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from bench.common import Progress, Stats, process_tree_cpu_seconds, ratio, self_cpu_seconds
from bench.ingestion.ceiling import RawBatch, RawCeiling
from bench.ingestion.service import LoadGenerator, Service
from bench.ingestion.workload import ImageSource, TextSource, Workload, image_push_body, text_push_body
from testkit.processes import Child

TEXT_TARGET_ITEMS_PER_S = 2000.0
IMAGE_TARGET_FRACTION = 0.5


@dataclass
class Measurement:
    backend: str
    kind: str
    batch_size: int
    batches_per_repeat: int
    service: Stats
    raw: Stats
    item_bytes: float
    cpu: dict[str, dict[str, Stats]]  # side ("service" | "raw") -> process -> cores busy
    service_per_cpu_second: Stats  # items accepted per CPU-second of the service: its rate on one whole core

    def cores(self, side: str) -> str:
        """'svc/moto/bench' median cores busy during that side's repeats, e.g. '0.98/-/0.21'."""
        got = self.cpu.get(side, {})
        return "/".join(f"{got[name].median:.2f}" if name in got else "-" for name in ("service", "moto", "bench"))

    @property
    def ratio(self) -> float | None:
        return ratio(self.service.median, self.raw.median)

    @property
    def target(self) -> str:
        if self.kind == "text":
            return f">= {TEXT_TARGET_ITEMS_PER_S:,.0f}/s"
        return f">= {IMAGE_TARGET_FRACTION:.0%} of raw"

    @property
    def passed(self) -> bool:
        if self.kind == "text":
            return self.service.median >= TEXT_TARGET_ITEMS_PER_S
        return self.raw.median > 0 and self.service.median >= IMAGE_TARGET_FRACTION * self.raw.median

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "kind": self.kind,
            "batch_size": self.batch_size,
            "batches_per_repeat": self.batches_per_repeat,
            "avg_item_bytes": round(self.item_bytes, 1),
            "service_items_per_s": self.service.as_dict(),
            "raw_items_per_s": self.raw.as_dict(),
            "ratio": self.ratio,
            "service_items_per_cpu_second": self.service_per_cpu_second.as_dict(),
            "cpu_cores_busy": {side: {k: v.as_dict() for k, v in d.items()} for side, d in self.cpu.items()},
            "target": self.target,
            "passed": self.passed,
        }


def measure_kind(
    progress: Progress,
    service: Service,
    raw: RawCeiling,
    workload: Workload,
    *,
    threads: int,
    repeats: int,
    seed: int,
    moto: Child | None,
) -> Measurement:
    kind, size = workload.kind, workload.batch_size
    tag = f"{service.backend}-{uuid.uuid4().hex[:6]}"
    if kind == "text":
        svc_text, raw_text = TextSource(f"s{tag}", 200, seed), TextSource(f"r{tag}", 200, seed + 1)

        def service_bodies(n: int) -> list[bytes]:
            return [text_push_body(svc_text, size) for _ in range(n)]

        def raw_batches(n: int) -> list[RawBatch]:
            return [raw.text_batch(raw_text, size) for _ in range(n)]
    else:
        svc_img, raw_img = ImageSource(32, seed), ImageSource(32, seed + 1)

        def service_bodies(n: int) -> list[bytes]:
            return [image_push_body(svc_img, size) for _ in range(n)]

        def raw_batches(n: int) -> list[RawBatch]:
            return [raw.image_batch(raw_img, size) for _ in range(n)]

    load = LoadGenerator(service, kind, threads)
    # Warm-up: connections, SQLite pages, moto buckets, the first-request imports of the service.
    load.run(service_bodies(threads), size)
    raw.run(raw_batches(threads))
    service_rates: list[float] = []
    raw_rates: list[float] = []
    cpu: dict[str, dict[str, list[float]]] = {"service": defaultdict(list), "raw": defaultdict(list)}
    per_cpu_second: list[float] = []
    item_bytes: list[float] = []
    n = workload.batches_per_repeat
    for repeat in range(repeats):
        bodies, batches = service_bodies(n), raw_batches(n)
        item_bytes.append(sum(len(o[1]) for b in batches for o in b.objects) / (n * size))
        # Alternate which goes first so that a drift in the machine's load hits both sides alike.
        order = ("service", "raw") if repeat % 2 == 0 else ("raw", "service")
        for side in order:
            before = cpu_snapshot(service, moto)
            if side == "service":
                seconds, accepted = load.run(bodies, size)
                service_rates.append(accepted / seconds)
                used = process_tree_cpu_seconds(service.child.process.pid) - before["service"]
                per_cpu_second.append(accepted / used if used > 0 else 0.0)
            else:
                seconds, written = raw.run(batches)
                raw_rates.append(written / seconds)
            for name, cores in cpu_cores(before, cpu_snapshot(service, moto), seconds).items():
                cpu[side][name].append(cores)
        progress(
            f"  {service.backend:<4} {kind:<5} repeat {repeat + 1}/{repeats}: "
            f"service {service_rates[-1]:,.0f} items/s, raw {raw_rates[-1]:,.0f} items/s"
        )
    return Measurement(
        service.backend,
        kind,
        size,
        workload.batches_per_repeat,
        Stats.of(service_rates),
        Stats.of(raw_rates),
        sum(item_bytes) / len(item_bytes),
        {side: {name: Stats.of(values) for name, values in by_name.items()} for side, by_name in cpu.items()},
        Stats.of(per_cpu_second),
    )


def cpu_snapshot(service: Service, moto: Child | None) -> dict[str, float]:
    """CPU seconds so far of the service (gunicorn master + worker), moto, and this process (client or raw)."""
    snapshot = {"service": process_tree_cpu_seconds(service.child.process.pid), "bench": self_cpu_seconds()}
    if moto is not None:
        snapshot["moto"] = process_tree_cpu_seconds(moto.process.pid)
    return snapshot


def cpu_cores(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Average cores each process kept busy over ``seconds`` of wall time."""
    return {name: (after[name] - before[name]) / seconds for name in before}
