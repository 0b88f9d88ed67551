"""Idempotency keys that recover, on real PostgreSQL: a request killed mid-flight blocks its key only until the
in-progress bound, and a finished key is replayed only within the retention window."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psycopg
import requests
from sqlalchemy import func, select

from services.ingestion.models import IdempotencyRecord
from testkit.processes import Processes, answers_ok, free_port, wait_until
from tests.helpers import _libpq_url, _lock_waiters, bearer, create_dataset, create_partner, eventually

SERVE = """
import sys
from werkzeug.serving import make_server
from services.ingestion.app import create_app
make_server("127.0.0.1", int(sys.argv[1]), create_app(), threaded=True).serve_forever()
"""


def child_env(settings, database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "FLYWHEEL_HOME": str(settings.home),
        "DATABASE_URL": database_url,
        "REDIS_URL": settings.redis_url,
        "S3_ENDPOINT": settings.s3_endpoint,
        "S3_ACCESS_KEY": settings.s3_access_key,
        "S3_SECRET_KEY": settings.s3_secret_key,
        "FLYWHEEL_INTERNAL_TOKEN": settings.internal_token,
        "LOG_LEVEL": "WARNING",
    }


def test_a_request_killed_mid_flight_blocks_its_key_only_until_the_bound(platform, settings, postgres_database) -> None:
    database_url = postgres_database()
    ingestion = platform("ingestion", database_url=database_url, idempotency_in_progress_seconds=3.0)
    issued = create_partner(ingestion.client)
    dataset = create_dataset(ingestion.client, issued["api_key"])
    # the very same bytes from both clients: a request's identity is its body
    body = json.dumps({"items": [{"text": f"review {i}", "label": "pos"} for i in range(5)]})
    headers = bearer(issued["api_key"]) | {"Idempotency-Key": "push-killed-1", "Content-Type": "application/json"}

    # A second ingestion process, which will die while it holds the key.
    port = free_port()
    processes = Processes(grace_seconds=1)
    child = processes.spawn(
        "ingestion",
        [sys.executable, "-c", SERVE, str(port)],
        env=child_env(settings, database_url),
        log_path=Path(settings.home) / "child-ingestion.log",
        cwd=Path(__file__).parents[2],
    )
    try:
        wait_until(lambda: answers_ok(f"http://127.0.0.1:{port}/healthz"), timeout=60, what="child", child=child)
        # Hold the lock of the partner's usage row for today (every push updates it in its transaction), so that
        # the child's push claims the key, does its work and blocks before committing; then kill the child.
        warm = ingestion.client.post(
            f"/v1/datasets/{dataset['id']}/items", json={"items": [{"text": "warm"}]}, headers=bearer(issued["api_key"])
        )
        assert warm.status_code == 200
        with psycopg.connect(_libpq_url(database_url)) as holder:
            holder.execute("SELECT id FROM usage WHERE tenant = %s FOR UPDATE", (issued["partner"]["id"],))
            url = f"http://127.0.0.1:{port}/v1/datasets/{dataset['id']}/items"
            pushing = threading.Thread(
                target=lambda: _quietly(lambda: requests.post(url, data=body, headers=headers, timeout=30))
            )
            pushing.start()
            eventually(lambda: _lock_waiters(database_url) == 1, what="the child's push to wait for the lock")
            claimed_at = time.monotonic()
            os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait(10)
            holder.rollback()
        pushing.join(30)
    finally:
        processes.stop_all()

    path = f"/v1/datasets/{dataset['id']}/items"
    blocked = ingestion.client.post(path, data=body, headers=headers)
    assert blocked.status_code == 409, blocked.get_json()
    assert blocked.get_json()["error"]["code"] == "idempotency_in_progress"
    assert 1 <= int(blocked.headers["Retry-After"]) <= 3

    recovered = eventually(
        lambda: (r := ingestion.client.post(path, data=body, headers=headers)).status_code == 200 and r,
        timeout=10,
        interval=0.25,
        what="the retry to run once the bound has passed",
    )
    assert time.monotonic() - claimed_at >= 3.0 - 0.5
    assert [item["status"] for item in recovered.get_json()["items"]] == ["accepted"] * 5
    assert "Idempotent-Replayed" not in recovered.headers
    replayed = ingestion.client.post(path, data=body, headers=headers)
    assert replayed.headers["Idempotent-Replayed"] == "true" and replayed.get_json() == recovered.get_json()
    stored = ingestion.client.get(path, headers=bearer(issued["api_key"])).get_json()["items"]
    assert len(stored) == 1 + 5, "the dead request stored nothing; the retry stored each item once"


def _quietly(call) -> None:
    with contextlib.suppress(requests.RequestException):  # the server was killed under it: that is the point
        call()


def test_keys_are_forgotten_after_the_retention_window(platform, postgres_database) -> None:
    database_url = postgres_database()
    retention_hours = 1.5 / 3600
    ingestion = platform("ingestion", database_url=database_url, idempotency_retention_hours=retention_hours)
    issued = create_partner(ingestion.client)
    dataset = create_dataset(ingestion.client, issued["api_key"])
    path = f"/v1/datasets/{dataset['id']}/items"
    headers = bearer(issued["api_key"]) | {"Idempotency-Key": "push-old"}

    first = ingestion.client.post(path, json={"items": [{"text": "one"}]}, headers=headers)
    assert first.status_code == 200
    again = ingestion.client.post(path, json={"items": [{"text": "one"}]}, headers=headers)
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert ingestion.client.post(path, json={"items": [{"text": "two"}]}, headers=headers).status_code == 409

    time.sleep(1.6)
    # Past the window the key is a new request: a different body is accepted, not refused as a reuse.
    reused = ingestion.client.post(path, json={"items": [{"text": "two"}]}, headers=headers)
    assert reused.status_code == 200 and "Idempotent-Replayed" not in reused.headers
    assert reused.get_json()["items"][0]["status"] == "accepted"
    other = bearer(issued["api_key"]) | {"Idempotency-Key": "push-new"}
    time.sleep(1.6)
    assert ingestion.client.post(path, json={"items": [{"text": "three"}]}, headers=other).status_code == 200
    with ingestion.runtime.db.session() as session:
        keys = session.scalars(select(IdempotencyRecord.key)).all()
        assert session.scalar(select(func.count()).select_from(IdempotencyRecord)) == len(keys)
    assert keys == ["push-new"], "rows past the window are purged"
