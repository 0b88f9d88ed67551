"""Small helpers the tests share: waiting for eventual effects, creating a partner with a dataset, and
holding PostgreSQL row locks to order concurrent requests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from shared.client import wait_for
from tests.conftest import INTERNAL_TOKEN, PATIENCE

T = TypeVar("T")

INTERNAL = {"Authorization": f"Bearer {INTERNAL_TOKEN}"}


def eventually(probe: Callable[[], T], *, timeout: float = 20.0, interval: float = 0.1, what: str = "") -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout` seconds (stretched by
    the suite's PATIENCE under pytest-xdist)."""
    try:
        return wait_for(probe, timeout=timeout * PATIENCE, what=what or repr(probe), interval=interval)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_partner(client: Any, name: str = "acme") -> dict[str, Any]:
    response = client.post("/v1/partners", json={"name": name}, headers=INTERNAL)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def create_dataset(client: Any, key: str, **fields: Any) -> dict[str, Any]:
    body = {"name": "reviews", "task_type": "text_classification", "labels": ["neg", "pos"], **fields}
    response = client.post("/v1/datasets", json=body, headers=bearer(key))
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def figures(fault: str, **numbers: int) -> None:
    """The one line each fault prints: what was sent, accepted, lost, duplicated, and errors seen."""
    shown = " ".join(f"{name}={value}" for name, value in numbers.items())
    print(f"\nFAULT {fault}: {shown}")


def in_lock_order(database_url: str, lock: str, params: tuple[Any, ...], calls: list[Callable[[], T]]) -> list[T]:
    """Hold a PostgreSQL row lock (`lock`: a SELECT ... FOR UPDATE) while each call starts in a thread of its
    own and queues on it, one after another; then release it, and PostgreSQL grants it in that order. Returns
    what the calls returned, in that order."""
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    with psycopg.connect(_libpq_url(database_url)) as holder:
        holder.execute(lock, params)
        for number, thread in enumerate(threads, 1):
            thread.start()
            eventually(lambda number=number: _lock_waiters(database_url) == number, what=f"call {number} queued")
        holder.rollback()
    for thread in threads:
        thread.join(30)
    return results


def _libpq_url(database_url: str) -> str:
    """A SQLAlchemy `postgresql+psycopg://` URL as psycopg itself takes it."""
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def _lock_waiters(database_url: str) -> int:
    """How many sessions of that PostgreSQL database are waiting for a lock right now."""
    server, _, name = _libpq_url(database_url).rpartition("/")
    with psycopg.connect(f"{server}/postgres") as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", (name,)
        ).fetchone()
    return row[0]
