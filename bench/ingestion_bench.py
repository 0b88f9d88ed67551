"""Ingestion push throughput, beside the raw storage-write + DB-insert ceiling, on both storage backends.

    python -m bench.ingestion_bench            # full run, about 2 minutes on a 2-core machine
    python -m bench.ingestion_bench --quick    # fewer repeats, for a smoke test

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

Then it profiles the text push in-process (Flask test client, file backend): a phase breakdown from
wrappers timed with thread CPU time and wall time (no profiler overhead), and a cProfile top list.

Targets (from the issue): text >= 2,000 items/s; images >= half of the raw ceiling. Medians over repeats are
compared; a measurement whose IQR exceeds 10% of its median is flagged noisy ("~").
Results: bench/results/ingestion.json. Exit status 0 when every target is met, 1 when one is missed, 130 on
Ctrl-C. Every process the bench starts is stopped on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import cProfile
import hashlib
import io
import json
import logging
import os
import pstats
import random
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import requests
from PIL import Image
from sqlalchemy import insert

from bench.common import (
    Child,
    Processes,
    Progress,
    Stats,
    answers_ok,
    describe_machine,
    free_port,
    machine,
    managed_processes,
    print_table,
    process_tree_cpu_seconds,
    ratio,
    self_cpu_seconds,
    wait_until,
    write_results,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/9"  # a DB nobody else uses: the bench flushes it, and only it
TOKEN = "bench-internal-token"  # noqa: S105 - a throwaway service's token
S3_KEYS = ("testing", "testing")
TEXT_TARGET_ITEMS_PER_S = 2000.0
IMAGE_TARGET_FRACTION = 0.5
LABELS = ["neg", "pos"]
WORDS = (  # noqa: SIM905 - a paragraph reads better than a 60-item list
    "the a service partner model label review film great terrible plot actor scene pacing slow quick data push "
    "batch item image text quality price delivery support broken works again never always maybe honest value "
    "customer refund package arrived late early kind rude helpful screen battery camera sound music story "
    "ending boring brilliant awful lovely cheap expensive recommend avoid return order size colour fit"
).split()

MOTO_SCRIPT = """
import os, sys, time
for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
    os.environ.setdefault(name, "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("PORT", server.get_host_and_port()[1], flush=True)
parent = os.getppid()
try:
    while os.getppid() == parent:  # the bench is gone: do not outlive it
        time.sleep(0.5)
finally:
    server.stop()
"""


# -------------------------------------------------------------------------------------------- workload


class TextSource:
    """Unique ~N-character texts: a per-run tag and a counter, then random words."""

    def __init__(self, tag: str, chars: int, seed: int) -> None:
        self.tag = tag
        self.chars = chars
        self.rng = random.Random(seed)  # noqa: S311 - test data, not secrets
        self.count = 0

    def next(self) -> str:
        self.count += 1
        parts = [f"{self.tag}-{self.count:07d}:"]
        length = len(parts[0])
        while length < self.chars:
            word = self.rng.choice(WORDS)
            parts.append(word)
            length += len(word) + 1
        return " ".join(parts)[: self.chars]


class ImageSource:
    """Distinct small PNGs: random RGB pixels (so no two are alike), encoded with Pillow."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.rng = random.Random(seed)  # noqa: S311 - test data, not secrets

    def next(self) -> bytes:
        image = Image.frombytes("RGB", (self.size, self.size), self.rng.randbytes(self.size * self.size * 3))
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()


@dataclass
class Workload:
    kind: str  # "text" | "image"
    batch_size: int
    batches_per_repeat: int

    @property
    def items_per_repeat(self) -> int:
        return self.batch_size * self.batches_per_repeat


def text_push_body(source: TextSource, size: int) -> bytes:
    items = [{"text": source.next(), "label": LABELS[i % 2]} for i in range(size)]
    return json.dumps({"items": items}).encode()


def image_push_body(source: ImageSource, size: int) -> bytes:
    items = [{"image": base64.b64encode(source.next()).decode("ascii"), "label": LABELS[i % 2]} for i in range(size)]
    return json.dumps({"items": items}).encode()


# ------------------------------------------------------------------------------------- the real service


@dataclass
class Service:
    backend: str
    url: str
    child: Child
    home: Path
    api_key: str = ""
    datasets: dict[str, str] = field(default_factory=dict)  # kind -> dataset id


def start_moto(processes: Processes, workdir: Path) -> tuple[str, Child]:
    log_path = workdir / "moto.log"
    child = processes.spawn("moto", [sys.executable, "-c", MOTO_SCRIPT], env=os.environ.copy(), log_path=log_path)
    port: list[int] = []

    def announced() -> bool:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("PORT "):
                port.append(int(line.split()[1]))
                return True
        return False

    wait_until(announced, timeout=30, what="moto to listen", child=child)
    endpoint = f"127.0.0.1:{port[0]}"
    wait_until(lambda: _http_answers(f"http://{endpoint}/moto-api/"), timeout=30, what="moto to answer", child=child)
    return endpoint, child


def _http_answers(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
        return True
    except requests.RequestException:
        return False


def start_service(processes: Processes, backend: str, home: Path, s3_endpoint: str | None) -> Service:
    """The ingestion service under gunicorn, with exactly the command line `flywheel up` uses."""
    from cli.launcher import http_command

    port = free_port()
    env = os.environ.copy()
    for name in ("DATABASE_URL", "INGESTION_DATABASE_URL", "S3_ENDPOINT", "S3_SECURE"):
        env.pop(name, None)
    env.update(
        FLYWHEEL_HOME=str(home),
        REDIS_URL=REDIS_URL,
        FLYWHEEL_INTERNAL_TOKEN=TOKEN,
        INGESTION_PORT=str(port),
        PYTHONUNBUFFERED="1",
    )
    if backend == "s3":
        assert s3_endpoint
        env.update(S3_ENDPOINT=s3_endpoint, S3_ACCESS_KEY=S3_KEYS[0], S3_SECRET_KEY=S3_KEYS[1])
    home.mkdir(parents=True, exist_ok=True)
    command = http_command("ingestion", port)
    child = processes.spawn(f"ingestion ({backend})", command, env=env, log_path=home / "ingestion.log", cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: answers_ok(f"{url}/readyz", timeout=5),
        timeout=90,
        what=f"ingestion ({backend}) /readyz",
        child=child,
        interval=0.25,
    )
    return Service(backend, url, child, home)


def _check(response: requests.Response, what: str) -> dict[str, Any]:
    if response.status_code >= 300:
        raise RuntimeError(f"{what} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def set_up_tenant(service: Service, run_tag: str) -> None:
    internal = {"Authorization": f"Bearer {TOKEN}"}
    body = _check(
        requests.post(f"{service.url}/v1/partners", json={"name": f"bench-{run_tag}"}, headers=internal, timeout=30),
        "create partner",
    )
    service.api_key = body["api_key"]
    partner = {"Authorization": f"Bearer {service.api_key}"}
    for kind, task_type in (("text", "text_classification"), ("image", "image_classification")):
        dataset = _check(
            requests.post(
                f"{service.url}/v1/datasets",
                json={"name": f"bench-{kind}", "task_type": task_type, "labels": LABELS},
                headers=partner,
                timeout=30,
            ),
            f"create {kind} dataset",
        )
        service.datasets[kind] = dataset["id"]


class LoadGenerator:
    """``threads`` client threads, one requests.Session each, pushing pre-built bodies until none are left.

    Each run opens fresh sessions: gunicorn closes a keep-alive connection after 2 idle seconds (the raw
    repeats in between take longer), and a POST on a connection the server is closing fails with a reset."""

    def __init__(self, service: Service, kind: str, threads: int) -> None:
        self.url = f"{service.url}/v1/datasets/{service.datasets[kind]}/items"
        self.headers = {"Authorization": f"Bearer {service.api_key}", "Content-Type": "application/json"}
        self.threads = threads

    def run(self, bodies: list[bytes], expected_per_body: int) -> tuple[float, int]:
        """Push every body; returns (wall seconds, accepted items). Any non-2xx or shortfall is an error."""
        pending = list(reversed(bodies))
        lock = threading.Lock()
        accepted = [0]
        errors: list[str] = []

        def client(session: requests.Session) -> None:
            while True:
                with lock:
                    if not pending or errors:
                        return
                    body = pending.pop()
                try:
                    response = session.post(self.url, data=body, headers=self.headers, timeout=120)
                except requests.RequestException as exc:
                    errors.append(f"push failed: {exc}")
                    return
                if response.status_code != 200:
                    errors.append(f"push answered {response.status_code}: {response.text[:300]}")
                    return
                got = response.json()["accepted"]
                with lock:
                    accepted[0] += got
                if got != expected_per_body:
                    errors.append(f"push accepted {got} of {expected_per_body} items: {response.text[:300]}")
                    return

        sessions = [requests.Session() for _ in range(self.threads)]
        workers = [threading.Thread(target=client, args=(s,), daemon=True) for s in sessions]
        started = time.perf_counter()
        try:
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        except BaseException:
            errors.append("aborted")  # the client threads stop after their current push
            raise
        elapsed = time.perf_counter() - started
        for session in sessions:
            session.close()
        if errors:
            raise RuntimeError(errors[0])
        return elapsed, accepted[0]


def service_storage_growth(service: Service) -> dict[str, Any]:
    """How much the service's SQLite grew per accepted item, and how much of it is event_outbox envelopes."""
    db_path = service.home / "db" / "ingestion.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)) as conn:
        items = conn.execute("SELECT count(*) FROM items").fetchone()[0]
        rows, unsent, envelope_bytes = conn.execute(
            "SELECT count(*), sum(sent_at IS NULL), coalesce(sum(length(envelope)), 0) FROM event_outbox"
        ).fetchone()
    on_disk = sum(p.stat().st_size for p in db_path.parent.glob("ingestion.sqlite3*"))
    return {
        "items": items,
        "db_bytes": on_disk,
        "db_bytes_per_item": on_disk / items if items else 0.0,
        "outbox_rows": rows,
        "outbox_rows_unsent": unsent or 0,
        "outbox_envelope_bytes": envelope_bytes,
        "outbox_bytes_per_item": envelope_bytes / items if items else 0.0,
    }


# ------------------------------------------------------------------------------------------ raw ceiling


@dataclass
class RawBatch:
    objects: list[tuple[str, bytes, str]]  # key, bytes, content type
    rows: list[dict[str, Any]]


class RawCeiling:
    """The same backend's put + one bulk INSERT of equivalent item rows, in-process, with no service around it."""

    TENANT = "ptn_benchraw"
    DATASET = "ds_benchraw"

    def __init__(self, backend: str, workdir: Path, s3_endpoint: str | None, threads: int) -> None:
        from services.ingestion.ingest import IMAGE_UPLOAD_THREADS
        from services.ingestion.models import Base, Dataset, Partner
        from shared.db import Database
        from shared.storage import FileStore, S3Store

        self.threads = threads
        self.upload_threads = IMAGE_UPLOAD_THREADS
        workdir.mkdir(parents=True, exist_ok=True)
        if backend == "s3":
            assert s3_endpoint
            self.store: Any = S3Store(s3_endpoint, *S3_KEYS)
        else:
            self.store = FileStore(workdir / "objects")
        self.store.ensure_buckets("raw")
        self.db = Database(f"sqlite:///{workdir / 'raw.sqlite3'}", Base.metadata)
        self.db.create_all()
        with self.db.session() as session:
            session.add(Partner(id=self.TENANT, name="bench-raw"))
            session.flush()
            session.add(Dataset(id=self.DATASET, tenant=self.TENANT, name="raw", task_type="text", labels=LABELS))

    def _row(self, push_id: str, now: datetime, data: bytes, kind: str, content_type: str, key: str,
             object_sha256: str, offset: int | None, index: int) -> dict[str, Any]:  # fmt: skip
        return {
            "id": f"itm_{uuid.uuid4().hex[:20]}",
            "tenant": self.TENANT,
            "dataset_id": self.DATASET,
            "kind": kind,
            "sha256": hashlib.sha256(data).hexdigest(),
            "content_type": content_type,
            "bucket": "raw",
            "object_key": key,
            "object_sha256": object_sha256,
            "offset": offset,
            "length": len(data),
            "label": LABELS[index % 2],
            "item_metadata": {},
            "redactions": {},
            "push_id": push_id,
            "created_at": now,
        }

    def text_batch(self, source: TextSource, size: int) -> RawBatch:
        push_id = f"push_{uuid.uuid4().hex[:20]}"
        now = datetime.now(UTC)
        texts = [source.next().encode("utf-8") for _ in range(size)]
        pack = b"".join(texts)
        key = f"{self.TENANT}/{self.DATASET}/text/{push_id}.txt"
        digest = hashlib.sha256(pack).hexdigest()
        rows, offset = [], 0
        for index, data in enumerate(texts):
            rows.append(self._row(push_id, now, data, "text", "text/plain; charset=utf-8", key, digest, offset, index))
            offset += len(data)
        return RawBatch([(key, pack, "application/octet-stream")], rows)

    def image_batch(self, source: ImageSource, size: int) -> RawBatch:
        push_id = f"push_{uuid.uuid4().hex[:20]}"
        now = datetime.now(UTC)
        objects, rows = [], []
        for index in range(size):
            data = source.next()
            digest = hashlib.sha256(data).hexdigest()
            key = f"{self.TENANT}/{self.DATASET}/images/{push_id}/{digest}"
            objects.append((key, data, "image/png"))
            rows.append(self._row(push_id, now, data, "image", "image/png", key, digest, None, index))
        return RawBatch(objects, rows)

    def _write(self, batch: RawBatch) -> None:
        from services.ingestion.models import Item

        def put(obj: tuple[str, bytes, str]) -> None:
            self.store.put("raw", obj[0], obj[1], content_type=obj[2])

        if len(batch.objects) == 1:
            put(batch.objects[0])
        else:  # as ingestion does: the objects of one push go up through IMAGE_UPLOAD_THREADS at a time
            with ThreadPoolExecutor(max_workers=self.upload_threads) as uploads:
                list(uploads.map(put, batch.objects))
        with self.db.session() as session:
            session.execute(insert(Item), batch.rows)

    def run(self, batches: list[RawBatch]) -> tuple[float, int]:
        pending = list(reversed(batches))
        lock = threading.Lock()
        abort = threading.Event()  # Ctrl-C or an error: the other writers stop after their current batch

        def worker() -> None:
            while not abort.is_set():
                with lock:
                    if not pending:
                        return
                    batch = pending.pop()
                self._write(batch)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            try:
                for future in [pool.submit(worker) for _ in range(self.threads)]:
                    future.result()
            except BaseException:
                abort.set()
                raise
        return time.perf_counter() - started, sum(len(b.rows) for b in batches)

    def close(self) -> None:
        self.db.dispose()


# ------------------------------------------------------------------------------------------- measurement


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


# ----------------------------------------------------------------------------------------------- profile


class PhaseTimer:
    """Nested timers around chosen functions: wall and thread-CPU time, total and self, per call path.

    Thread CPU time (``time.thread_time``) is what a shared, busy machine distorts least: time stolen by
    other processes does not count, nor does waiting on a lock, a disk or Redis (that is wall time only)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self.order: dict[tuple[str, ...], None] = {}  # paths in the order first entered: a tree walk
        self.totals: dict[tuple[str, ...], float] = defaultdict(float)
        self.cpu: dict[tuple[str, ...], float] = defaultdict(float)
        self.calls: dict[tuple[str, ...], int] = defaultdict(int)

    def wrap(self, fn: Callable[..., Any], label: str | Callable[..., str]) -> Callable[..., Any]:
        timer = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            stack = timer._local.__dict__.setdefault("stack", [])
            name = label(*args, **kwargs) if callable(label) else label
            path = (*stack[-1], name) if stack else (name,)
            stack.append(path)
            timer.order.setdefault(path, None)
            started, cpu_started = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
                stack.pop()
                timer.totals[path] += elapsed
                timer.cpu[path] += cpu
                timer.calls[path] += 1

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def report(self, pushes: int) -> list[dict[str, Any]]:
        """Rows in tree order: path, total ms per push, self ms per push, calls per push."""
        tree: dict[tuple[str, ...], list[tuple[str, ...]]] = defaultdict(list)
        for path in self.order:
            tree[path[:-1]].append(path)

        def walk(path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
            yield path
            for child in tree[path]:
                yield from walk(child)

        rows = []
        for path in (p for root in tree[()] for p in walk(root)):
            kids = tree[path]
            in_children = sum(self.totals[q] for q in kids)
            cpu_in_children = sum(self.cpu[q] for q in kids)
            rows.append(
                {
                    "path": list(path),
                    "total_ms": 1000 * self.totals[path] / pushes,
                    "self_ms": 1000 * (self.totals[path] - in_children) / pushes,
                    "cpu_ms": 1000 * self.cpu[path] / pushes,
                    "cpu_self_ms": 1000 * (self.cpu[path] - cpu_in_children) / pushes,
                    "calls": self.calls[path] / pushes,
                }
            )
        return rows


def _sql_label(_session: Any, statement: Any, *_args: Any, **_kwargs: Any) -> str:
    from sqlalchemy.sql.dml import Insert, Update
    from sqlalchemy.sql.selectable import Select

    if isinstance(statement, Insert | Update):
        return f"SQL {'INSERT' if isinstance(statement, Insert) else 'UPDATE'} {statement.table.name}"
    if isinstance(statement, Select):
        names = sorted({getattr(f, "name", "?") for f in statement.get_final_froms()})
        return f"SQL SELECT {','.join(names)}"
    return "SQL other"


@contextlib.contextmanager
def instrumented(timer: PhaseTimer, app: Any) -> Iterator[None]:
    """Wrap the push path's phases (in this process only); everything is restored afterwards."""
    import celery
    import flask.json.provider
    import flask.wrappers
    import marshmallow
    import structlog.stdlib
    from sqlalchemy.orm import Session

    import services.ingestion.api as api
    import services.ingestion.ingest as ingest
    import services.ingestion.quotas as quotas
    import shared.events.bus as bus
    import shared.events.envelope as envelope
    from services.ingestion.schemas import PushResultSchema, PushSchema
    from shared.auth import KeyVerifier
    from shared.storage import FileStore, S3Store

    targets: list[tuple[Any, str, str | Callable[..., str]]] = [
        (app, "wsgi_app", "request (WSGI app)"),
        (KeyVerifier, "verify", "auth: API key verify (cached)"),
        (api, "tenant_dataset", "dataset lookup"),
        (flask.wrappers.Request, "get_json", "JSON parse of the body"),
        (PushSchema, "load", "PushSchema.load (marshmallow)"),
        (api, "text_candidate", "text_candidate x N"),
        (api, "ingest_batch", "ingest_batch"),
        (quotas, "check", "quotas.check"),
        (ingest, "_store_content", "_store_content (objects)"),
        (FileStore, "put", "ObjectStore.put"),
        (S3Store, "put", "ObjectStore.put"),
        (bus.EventBus, "publish", "EventBus.publish (outbox)"),
        (bus, "make_envelope", "make_envelope"),
        (envelope, "validate_envelope", "validate_envelope (EnvelopeSchema.load)"),
        (envelope.Envelope, "to_dict", "Envelope.to_dict (dataclasses.asdict)"),
        (marshmallow.Schema, "validate", "Schema.validate (event payload)"),
        (bus.EventBus, "deliver", "EventBus.deliver (send to Redis)"),
        (celery.Celery, "send_task", "Celery.send_task"),
        (quotas, "record", "quotas.record"),
        (Session, "_execute_internal", _sql_label),
        (Session, "commit", "COMMIT"),
        (PushResultSchema, "dump", "PushResultSchema.dump"),
        (flask.json.provider.DefaultJSONProvider, "response", "JSON encode of the response"),
        (structlog.stdlib.BoundLogger, "info", "log line (structlog JSON)"),
    ]
    missing = object()
    saved = []
    try:
        for owner, attr, label in targets:
            # On a class, remember only what the class itself defined: an inherited method is restored by
            # deleting the wrapper, not by pinning the parent's function onto the subclass.
            original = owner.__dict__.get(attr, missing) if isinstance(owner, type) else getattr(owner, attr)
            saved.append((owner, attr, original))
            setattr(owner, attr, timer.wrap(getattr(owner, attr), label))
        yield
    finally:
        for owner, attr, original in reversed(saved):
            if original is missing:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


def _short(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    for marker in ("site-packages/", str(REPO_ROOT) + "/", "/lib/python3.11/"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    return f"{name} ({filename}:{line})"


def profile_text_push(
    progress: Progress, workdir: Path, *, pushes: int, batch_size: int, threads: int
) -> dict[str, Any]:
    """In-process: the push view through the Flask test client, file backend, Redis DB 9."""
    from services.ingestion.app import create_app
    from shared.settings import Settings

    settings = Settings(home=workdir, redis_url=REDIS_URL, internal_token=TOKEN, log_level="INFO")
    # The service logs JSON lines to stdout; keep their cost (formatting, writing) but not their noise.
    devnull = open(os.devnull, "w")  # noqa: SIM115 - closed below
    with contextlib.redirect_stdout(devnull):
        app = create_app(settings)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(devnull)
    runtime = app.extensions["flywheel"]
    try:
        client = app.test_client()
        internal = {"Authorization": f"Bearer {TOKEN}"}
        key = client.post("/v1/partners", json={"name": "bench-profile"}, headers=internal).get_json()["api_key"]
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        dataset = client.post(
            "/v1/datasets",
            json={"name": "profile", "task_type": "text_classification", "labels": LABELS},
            headers=auth,
        ).get_json()["id"]
        url = f"/v1/datasets/{dataset}/items"
        source = TextSource(f"p{uuid.uuid4().hex[:6]}", 200, 7)

        def push_all(bodies: list[bytes], threads: int = 1) -> tuple[float, float]:
            """Push every body from ``threads`` threads (a test client each); returns (wall s, process CPU s)."""
            pending = list(reversed(bodies))
            lock = threading.Lock()
            errors: list[str] = []

            def worker() -> None:
                own = app.test_client()
                while True:
                    with lock:
                        if not pending or errors:
                            return
                        body = pending.pop()
                    response = own.post(url, data=body, headers=auth)
                    if response.status_code != 200 or response.get_json()["accepted"] != batch_size:
                        errors.append(f"profile push answered {response.status_code}: {response.text[:300]}")

            cpu_before, started = self_cpu_seconds(), time.perf_counter()
            if threads == 1:
                worker()
            else:
                workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
                for thread in workers:
                    thread.start()
                for thread in workers:
                    thread.join()
            wall, cpu = time.perf_counter() - started, self_cpu_seconds() - cpu_before
            if errors:
                raise RuntimeError(errors[0])
            return wall, cpu

        push_all([text_push_body(source, batch_size) for _ in range(3)])  # warm-up

        # 1. in-process rates, no HTTP or gunicorn: 1 thread, then as many threads as the load generator uses
        rates: dict[int, list[float]] = defaultdict(list)
        cores: dict[int, list[float]] = defaultdict(list)
        per_cpu: dict[int, list[float]] = defaultdict(list)
        for _ in range(3):
            for count in (1, threads):
                bodies = [text_push_body(source, batch_size) for _ in range(pushes)]
                wall, cpu = push_all(bodies, count)
                rates[count].append(pushes * batch_size / wall)
                cores[count].append(cpu / wall)
                per_cpu[count].append(pushes * batch_size / cpu)
        in_process = {
            count: {
                "items_per_s": Stats.of(rates[count]),
                "cores_busy": Stats.of(cores[count]),
                "items_per_cpu_second": Stats.of(per_cpu[count]),
            }
            for count in (1, threads)
        }
        for count, got in in_process.items():
            progress(
                f"  in-process text push, {count} thread(s), no HTTP: {got['items_per_s'].show()} items/s, "
                f"{got['cores_busy'].median:.2f} cores busy, {got['items_per_cpu_second'].show()} items/CPU-s"
            )

        # 2. phase breakdown (thread CPU time and wall time wrappers): 1 thread, then `threads` threads
        timer = PhaseTimer()
        with instrumented(timer, app):
            push_all([text_push_body(source, batch_size) for _ in range(pushes)])
        phases = timer.report(pushes)
        concurrent_timer = PhaseTimer()
        concurrent_pushes = max(pushes, 2 * threads)
        with instrumented(concurrent_timer, app):
            push_all([text_push_body(source, batch_size) for _ in range(concurrent_pushes)], threads)
        concurrent_phases = concurrent_timer.report(concurrent_pushes)
        by_path = {tuple(row["path"]): row for row in concurrent_phases}
        for row in phases:
            other = by_path.get(tuple(row["path"]))
            row["wall_ms_concurrent"] = other["total_ms"] if other else None

        # 3. cProfile (it sees only the thread that enables it: one thread)
        bodies = [text_push_body(source, batch_size) for _ in range(pushes)]
        profiler = cProfile.Profile()
        profiler.enable()
        push_all(bodies)
        profiler.disable()
        stats = pstats.Stats(profiler)
        entries = stats.stats  # type: ignore[attr-defined]
        by_self = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:20]
        top_self = [
            {
                "function": _short(func),
                "self_ms_per_push": 1000 * tt / pushes,
                "cum_ms_per_push": 1000 * ct / pushes,
                "calls_per_push": nc / pushes,
            }
            for func, (_cc, nc, tt, ct, _callers) in by_self
        ]
        product = (str(REPO_ROOT / "services") + "/", str(REPO_ROOT / "shared") + "/")
        repo_funcs = [(func, data) for func, data in entries.items() if func[0].startswith(product)]
        by_cum = sorted(repo_funcs, key=lambda kv: kv[1][3], reverse=True)[:20]
        top_cum = [
            {"function": _short(func), "cum_ms_per_push": 1000 * ct / pushes, "calls_per_push": nc / pushes}
            for func, (_cc, nc, _tt, ct, _callers) in by_cum
        ]

        # 4. hashing, measured alone (it is inline in _ingest, so no wrapper can see it)
        sample = [source.next().encode() for _ in range(batch_size)]
        started = time.perf_counter()
        for _ in range(20):
            for data in sample:
                hashlib.sha256(data).hexdigest()
        hashing_ms = 1000 * (time.perf_counter() - started) / 20
    finally:
        runtime.close()
        devnull.close()
    return {
        "pushes": pushes,
        "batch_size": batch_size,
        "threads": threads,
        "in_process": {str(count): got for count, got in in_process.items()},
        "concurrent_phases": concurrent_phases,
        "phases": phases,
        "sha256_of_batch_ms": hashing_ms,
        "cprofile_top_self": top_self,
        "cprofile_top_cumulative_repo": top_cum,
    }


def print_profile(profile: dict[str, Any]) -> str:
    lines = []
    phases = profile["phases"]
    request_cpu = next((p["cpu_ms"] for p in phases if p["path"] == ["request (WSGI app)"]), 0.0)
    print(
        f"\nText push, in-process (Flask test client, file backend), per push of {profile['batch_size']} items "
        f"(means over {profile['pushes']} pushes; CPU = this thread's CPU time, wall includes waits):"
    )
    rows = []
    for phase in phases:
        depth = len(phase["path"]) - 1
        share = 100 * phase["cpu_ms"] / request_cpu if request_cpu else 0.0
        name = phase["path"][-1]
        if depth == 0 and name != "request (WSGI app)":
            name = f"{name} [background: outbox relay thread]"
        rows.append(
            [
                "  " * depth + name,
                f"{phase['cpu_ms']:.1f}",
                f"{phase['cpu_self_ms']:.1f}",
                f"{share:.1f}%",
                f"{phase['total_ms']:.1f}",
                "" if phase.get("wall_ms_concurrent") is None else f"{phase['wall_ms_concurrent']:.1f}",
                f"{phase['calls']:g}",
            ]
        )
    threads = profile["threads"]
    headers = ["phase (nested)", "CPU ms", "CPU self", "% req CPU", "wall ms", f"wall ms, {threads} thr", "calls"]
    lines.append(print_table(headers, rows))
    in_process = profile["in_process"]
    one, many = in_process["1"], in_process[str(threads)]
    print(
        f"In-process rate (no HTTP): 1 thread {one['items_per_s'].show()} items/s with "
        f"{one['cores_busy'].median:.2f} cores busy; {threads} threads {many['items_per_s'].show()} items/s with "
        f"{many['cores_busy'].median:.2f} cores busy.\n"
        f"'wall ms, {threads} thr' is the same phase with {threads} pushes in flight: where it far exceeds CPU ms "
        "on SQL/COMMIT rows, the thread was waiting for SQLite's write lock (every session begins IMMEDIATE)."
    )
    print(
        f"(sha256 of the batch's {profile['batch_size']} texts, measured alone: {profile['sha256_of_batch_ms']:.2f} ms)"
    )
    print("\ncProfile, top functions by own time (ms per push; profiler overhead inflates small calls):")
    rows = [
        [e["function"][:110], f"{e['self_ms_per_push']:.2f}", f"{e['cum_ms_per_push']:.2f}", f"{e['calls_per_push']:g}"]
        for e in profile["cprofile_top_self"][:15]
    ]
    lines.append(print_table(["function", "self ms", "cum ms", "calls"], rows))
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main


def flush_bench_redis() -> None:
    redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=10).flushdb()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ingestion_bench", description=__doc__.split("\n")[0])
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
                s3_endpoint, moto = start_moto(processes, workdir)
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
    table = print_table([*headers, "svc items/CPU-s", "cores svc/moto/bench: service run", "raw run"], rows)
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
