"""The text push in-process (Flask test client, file backend), broken down by phase."""

from __future__ import annotations

import contextlib
import cProfile
import hashlib
import logging
import os
import pstats
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.common import Progress, Stats, self_cpu_seconds
from bench.ingestion import LABELS, REDIS_URL, REPO_ROOT, TOKEN
from bench.ingestion.workload import TextSource, text_push_body
from cli.tables import NUMBERS, print_table


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
    lines.append(print_table(headers, rows, align=NUMBERS, rule=True))
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
    lines.append(print_table(["function", "self ms", "cum ms", "calls"], rows, align=NUMBERS, rule=True))
    return "\n".join(lines)
