"""The real ingestion service under gunicorn in a subprocess, and the load generator that pushes to it."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench.ingestion import LABELS, REDIS_URL, REPO_ROOT, TOKEN
from testkit.processes import Child, Processes, answers_ok, free_port, wait_until
from testkit.s3 import S3Server


@dataclass
class Service:
    backend: str
    url: str
    child: Child
    home: Path
    api_key: str = ""
    datasets: dict[str, str] = field(default_factory=dict)  # kind -> dataset id


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
        env.update(S3_ENDPOINT=s3_endpoint, S3_ACCESS_KEY=S3Server.access_key, S3_SECRET_KEY=S3Server.secret_key)
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
