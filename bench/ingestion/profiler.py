"""The text push in-process (Flask test client, file backend), profiled with cProfile, broken down by product
function and module.

cProfile sees every call, so nothing in the product is wrapped or named here. Each function of ``services/`` and
``shared/`` gets its cumulative time, and the time of the library code it calls (SQLAlchemy, marshmallow,
sqlite3, the Redis client, ...) is charged to the nearest product function above it, along the call edges
pstats records: "where the CPU goes" per module and function, by library. Three profiled passes push the same
kind of bodies: one thread timed by its CPU time (``time.thread_time``: what a shared, busy machine distorts
least; waiting on a lock, the disk or Redis does not count), one thread timed by the wall clock, and
``threads`` threads by the wall clock (a profiler in each, merged), where a wall figure far above the CPU one
is waiting, mostly for SQLite's write lock. Only the threads that push are profiled: the outbox relay thread
is not (it sweeps every few seconds; pushes deliver their own events).
"""

from __future__ import annotations

import contextlib
import cProfile
import hashlib
import logging
import os
import pstats
import re
import sysconfig
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Progress, Stats, self_cpu_seconds
from bench.ingestion import LABELS, REDIS_URL, REPO_ROOT, TOKEN
from bench.ingestion.workload import TextSource, text_push_body
from shared.tables import NUMBERS, print_table

Func = tuple[str, int, str]  # pstats' key of a function: (file name, line, name)
PRODUCT = tuple(str(REPO_ROOT / folder) + os.sep for folder in ("services", "shared"))
OUTSIDE = "(outside services/ and shared/)"
"""The time no product function called for: the test client, Flask's dispatch and werkzeug around the view."""
OWN = "own"
TOP_FUNCTIONS = 25
_PACKAGE_ROOTS = ("site-packages" + os.sep, sysconfig.get_paths()["stdlib"] + os.sep, str(REPO_ROOT) + os.sep)
_C_FUNCTION = re.compile(r"of '([\w.]+)' objects|built-in method ([\w.]+)")


# -- what cProfile says, per product function and module --------------------------------------------------------


def _is_product(func: Func) -> bool:
    return func[0].startswith(PRODUCT)


def _module(func: Func) -> str:
    return str(Path(func[0]).relative_to(REPO_ROOT))


def _library(func: Func) -> str:
    """The package a function belongs to: `sqlalchemy`, `json`, `sqlite3`, `hashlib`, `builtins`, ..."""
    filename, _, name = func
    if filename == "~":  # a C function: "<method 'execute' of 'sqlite3.Cursor' objects>", "<built-in method len>"
        match = _C_FUNCTION.search(name)
        qualified = next((group for group in match.groups() if group), "") if match else ""
        return qualified.split(".")[0].lstrip("_") if "." in qualified else "builtins"
    for root in _PACKAGE_ROOTS:
        if root in filename:
            return filename.split(root, 1)[1].split(os.sep)[0].removesuffix(".py")
    return filename.strip("<>").removeprefix("frozen ").split(".")[0]


def _short(func: Func) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    for root in _PACKAGE_ROOTS:
        if root in filename:
            filename = filename.split(root, 1)[1]
            break
    return f"{name} ({filename}:{line})"


def _callers_first_components(nodes: list[Func], callers: dict[Func, list[Func]]) -> list[list[Func]]:
    """The strongly connected components of the call graph among `nodes` (a recursion is one), each after every
    component that calls into it (Kosaraju's algorithm, iterative: call chains run deep)."""
    callees: dict[Func, list[Func]] = defaultdict(list)
    for node in nodes:
        for caller in callers[node]:
            if caller in callers:
                callees[caller].append(node)
    finished: list[Func] = []
    visited: set[Func] = set()
    for root in nodes:
        if root in visited:
            continue
        visited.add(root)
        stack = [(root, iter(callees[root]))]
        while stack:
            node, rest = stack[-1]
            step = next((callee for callee in rest if callee not in visited), None)
            if step is None:
                stack.pop()
                finished.append(node)
            else:
                visited.add(step)
                stack.append((step, iter(callees[step])))
    components: list[list[Func]] = []
    assigned: set[Func] = set()
    for root in reversed(finished):  # the reversed graph, latest finished first: callers' components come first
        if root in assigned:
            continue
        assigned.add(root)
        component, frontier = [], [root]
        while frontier:
            node = frontier.pop()
            component.append(node)
            for caller in callers[node]:
                if caller in callers and caller not in assigned:
                    assigned.add(caller)
                    frontier.append(caller)
        components.append(component)
    return components


class ChargedProfile:
    """One profile (pstats), its product functions' cumulative time, and every function's own time charged to
    the nearest product function that called it, by library.

    Library code is charged along the call edges: a library function's time is split between the ways it was
    called by the cumulative time that came each way, up to the first product function on each. Recursion
    (marshmallow's nested schemas, say) is taken as one unit: a cycle's time goes up the ways into it."""

    def __init__(self, stats: pstats.Stats) -> None:
        self.entries: dict[Func, Any] = stats.stats  # type: ignore[attr-defined]
        self.charged: dict[Func | None, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        owners = self._owners()
        for func, (_cc, _nc, own, _cum, _callers) in self.entries.items():
            if _is_product(func):
                self.charged[func][OWN] += own
                continue
            library, unowned = _library(func), own
            for owner, share in owners[func].items():
                self.charged[owner][library] += own * share
                unowned -= own * share
            if unowned > 1e-9:  # what no product function called for (beyond rounding)
                self.charged[None][library] += unowned

    def _owners(self) -> dict[Func, dict[Func, float]]:
        """For each library function: the product functions above it, each with its share of its time."""
        library = [func for func in self.entries if not _is_product(func)]
        callers = {func: [c for c in self.entries[func][4] if c in self.entries] for func in library}
        owners: dict[Func, dict[Func, float]] = {}
        for component in _callers_first_components(library, callers):
            members = set(component)
            ways_in = [
                (caller, edge[3])  # the cumulative time that came into the component through this caller
                for func in component
                for caller, edge in self.entries[func][4].items()
                if caller not in members and caller in self.entries
            ]
            through = sum(seconds for _, seconds in ways_in)
            shares: dict[Func, float] = defaultdict(float)
            for caller, seconds in ways_in:
                weight = seconds / through if through else 1.0 / len(ways_in)
                for owner, share in ({caller: 1.0} if _is_product(caller) else owners[caller]).items():
                    shares[owner] += weight * share
            for func in component:
                owners[func] = shares
        return owners

    @property
    def total(self) -> float:
        return sum(entry[2] for entry in self.entries.values())

    def cumulative(self, func: Func) -> float:
        return self.entries[func][3] if func in self.entries else 0.0

    def calls(self, func: Func) -> int:
        return self.entries[func][1] if func in self.entries else 0

    def by_module(self) -> dict[str, dict[str, float]]:
        modules: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for func, libraries in self.charged.items():
            for library, seconds in libraries.items():
                modules[OUTSIDE if func is None else _module(func)][library] += seconds
        return modules

    def product_functions(self) -> list[Func]:
        return [func for func in self.entries if _is_product(func)]


def _where(libraries: dict[str, float], per: float, top: int = 4) -> str:
    """`sqlalchemy 1.20, own 0.35, sqlite3 0.30`: the largest parts, ms per push."""
    parts = sorted(libraries.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return ", ".join(f"{library} {1000 * seconds / per:.2f}" for library, seconds in parts if seconds > 0)


def breakdown(
    cpu: pstats.Stats, wall: pstats.Stats, concurrent: pstats.Stats, pushes: int, concurrent_pushes: int
) -> dict[str, Any]:
    """Per product module and function, ms per push: CPU (1 thread), wall (1 thread), wall (concurrent)."""
    on_cpu, on_wall, in_flight = ChargedProfile(cpu), ChargedProfile(wall), ChargedProfile(concurrent)
    wall_modules, concurrent_modules = on_wall.by_module(), in_flight.by_module()
    total = on_cpu.total
    modules = [
        {
            "module": module,
            "cpu_ms": 1000 * sum(libraries.values()) / pushes,
            "share_of_push_cpu": sum(libraries.values()) / total if total else 0.0,
            "wall_ms": 1000 * sum(wall_modules.get(module, {}).values()) / pushes,
            "wall_ms_concurrent": 1000 * sum(concurrent_modules.get(module, {}).values()) / concurrent_pushes,
            "cpu_by_library_ms": {k: 1000 * v / pushes for k, v in sorted(libraries.items(), key=lambda kv: -kv[1])},
            "where": _where(libraries, pushes),
        }
        for module, libraries in on_cpu.by_module().items()
    ]
    modules.sort(key=lambda row: row["cpu_ms"], reverse=True)
    functions = [
        {
            "function": _short(func),
            "module": _module(func),
            "cum_cpu_ms": 1000 * on_cpu.cumulative(func) / pushes,
            "charged_cpu_ms": 1000 * sum(on_cpu.charged[func].values()) / pushes,
            "cum_wall_ms": 1000 * on_wall.cumulative(func) / pushes,
            "cum_wall_ms_concurrent": 1000 * in_flight.cumulative(func) / concurrent_pushes,
            "calls_per_push": on_cpu.calls(func) / pushes,
            "where": _where(on_cpu.charged[func], pushes),
        }
        for func in on_cpu.product_functions()
    ]
    functions.sort(key=lambda row: row["cum_cpu_ms"], reverse=True)
    return {
        "push_cpu_ms": 1000 * total / pushes,
        "push_wall_ms": 1000 * on_wall.total / pushes,
        "push_wall_ms_concurrent": 1000 * in_flight.total / concurrent_pushes,
        "modules": modules,
        "functions": functions[:TOP_FUNCTIONS],
        "cprofile_top_self": _top_self(wall, pushes),
    }


def _top_self(stats: pstats.Stats, pushes: int, top: int = 20) -> list[dict[str, Any]]:
    entries = stats.stats  # type: ignore[attr-defined]
    by_self = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [
        {
            "function": _short(func),
            "self_ms_per_push": 1000 * tt / pushes,
            "cum_ms_per_push": 1000 * ct / pushes,
            "calls_per_push": nc / pushes,
        }
        for func, (_cc, nc, tt, ct, _callers) in by_self
    ]


# -- the pushes ---------------------------------------------------------------------------------------------------


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

        def push_all(
            bodies: list[bytes], threads: int = 1, profiler: Callable[[], cProfile.Profile] | None = None
        ) -> tuple[float, float, list[cProfile.Profile]]:
            """Push every body from ``threads`` threads (a test client each, and a profiler each when asked for);
            returns (wall s, process CPU s, the profilers)."""
            pending = list(reversed(bodies))
            lock = threading.Lock()
            errors: list[str] = []
            profiles: list[cProfile.Profile] = []

            def push(own: Any) -> None:
                while True:
                    with lock:
                        if not pending or errors:
                            return
                        body = pending.pop()
                    response = own.post(url, data=body, headers=auth)
                    if response.status_code != 200 or response.get_json()["accepted"] != batch_size:
                        errors.append(f"profile push answered {response.status_code}: {response.text[:300]}")

            def worker() -> None:
                own = app.test_client()
                if profiler is None:
                    push(own)
                    return
                profile = profiler()
                profile.enable()  # cProfile sees the thread that enables it, and only that one
                try:
                    push(own)
                finally:
                    profile.disable()
                    with lock:
                        profiles.append(profile)

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
            return wall, cpu, profiles

        def profiled(count: int, threads: int, profiler: Callable[[], cProfile.Profile]) -> pstats.Stats:
            _, _, profiles = push_all([text_push_body(source, batch_size) for _ in range(count)], threads, profiler)
            return pstats.Stats(*profiles)

        push_all([text_push_body(source, batch_size) for _ in range(3)])  # warm-up

        # 1. in-process rates, no HTTP or gunicorn: 1 thread, then as many threads as the load generator uses
        rates: dict[int, list[float]] = defaultdict(list)
        cores: dict[int, list[float]] = defaultdict(list)
        per_cpu: dict[int, list[float]] = defaultdict(list)
        for _ in range(3):
            for count in (1, threads):
                bodies = [text_push_body(source, batch_size) for _ in range(pushes)]
                wall, cpu, _ = push_all(bodies, count)
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

        # 2. cProfile: thread CPU time with 1 thread, wall time with 1 thread, then with `threads` threads
        on_cpu = profiled(pushes, 1, lambda: cProfile.Profile(time.thread_time))
        on_wall = profiled(pushes, 1, cProfile.Profile)
        concurrent_pushes = max(pushes, 2 * threads)
        in_flight = profiled(concurrent_pushes, threads, cProfile.Profile)
        parts = breakdown(on_cpu, on_wall, in_flight, pushes, concurrent_pushes)

        # 3. hashing, measured alone: without the profiler's overhead on its many small calls
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
        "concurrent_pushes": concurrent_pushes,
        "batch_size": batch_size,
        "threads": threads,
        "in_process": {str(count): got for count, got in in_process.items()},
        **parts,
        "sha256_of_batch_ms": hashing_ms,
    }


def print_profile(profile: dict[str, Any]) -> str:
    lines = []
    threads = profile["threads"]
    print(
        f"\nText push, in-process (Flask test client, file backend), per push of {profile['batch_size']} items, "
        f"profiled with cProfile (means over {profile['pushes']} pushes): {profile['push_cpu_ms']:.1f} ms of CPU, "
        f"{profile['push_wall_ms']:.1f} ms of wall time, {profile['push_wall_ms_concurrent']:.1f} ms with {threads} "
        "pushes in flight.\nCPU = this thread's CPU time; wall includes waits; library code is charged to the "
        "nearest product function that called it ('where': ms per push by library, 'own' the product's own code)."
    )
    rows = [
        [
            row["module"],
            f"{row['cpu_ms']:.2f}",
            f"{100 * row['share_of_push_cpu']:.1f}%",
            f"{row['wall_ms']:.2f}",
            f"{row['wall_ms_concurrent']:.2f}",
            row["where"],
        ]
        for row in profile["modules"]
    ]
    headers = ["module", "CPU ms", "% push CPU", "wall ms", f"wall ms, {threads} thr", "where the CPU goes"]
    lines.append(print_table(headers, rows, align=NUMBERS, rule=True))
    print(f"\nProduct functions, the top {len(profile['functions'])} by cumulative CPU (ms per push):")
    rows = [
        [
            row["function"][:90],
            f"{row['cum_cpu_ms']:.2f}",
            f"{row['charged_cpu_ms']:.2f}",
            f"{row['cum_wall_ms']:.2f}",
            f"{row['cum_wall_ms_concurrent']:.2f}",
            f"{row['calls_per_push']:g}",
            row["where"],
        ]
        for row in profile["functions"]
    ]
    headers = ["function", "cum CPU", "CPU charged", "cum wall", f"cum wall, {threads} thr", "calls", "where"]
    lines.append(print_table(headers, rows, align=NUMBERS, rule=True))
    in_process = profile["in_process"]
    one, many = in_process["1"], in_process[str(threads)]
    unprofiled = 1000 * profile["batch_size"] / one["items_per_cpu_second"].median
    print(
        f"Without a profiler a push costs {unprofiled:.1f} ms of CPU: cProfile multiplies that by "
        f"{profile['push_cpu_ms'] / unprofiled:.1f} here (most on small, frequent calls), so read the figures above "
        "as shares rather than costs."
    )
    print(
        f"In-process rate (no HTTP, no profiler): 1 thread {one['items_per_s'].show()} items/s with "
        f"{one['cores_busy'].median:.2f} cores busy; {threads} threads {many['items_per_s'].show()} items/s with "
        f"{many['cores_busy'].median:.2f} cores busy.\n"
        f"'wall ms, {threads} thr' is the same code with {threads} pushes in flight: where it far exceeds the CPU "
        "figure on sqlite3's share, the thread was waiting for SQLite's write lock (every session begins IMMEDIATE)."
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
