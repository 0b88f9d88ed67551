"""Small helpers the tests share: waiting for eventual effects, creating a partner with a dataset, and
holding PostgreSQL row locks to order concurrent requests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from shared.client import wait_for
from tests.conftest import INTERNAL_TOKEN

T = TypeVar("T")

INTERNAL = {"Authorization": f"Bearer {INTERNAL_TOKEN}"}


def eventually(probe: Callable[[], T], *, timeout: float = 20.0, interval: float = 0.1, what: str = "") -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout` seconds."""
    try:
        return wait_for(probe, timeout=timeout, what=what or repr(probe), interval=interval)
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


def libpq_url(database_url: str) -> str:
    """A SQLAlchemy `postgresql+psycopg://` URL as psycopg itself takes it."""
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def lock_waiters(database_url: str) -> int:
    """How many sessions of that PostgreSQL database are waiting for a lock right now."""
    server, _, name = libpq_url(database_url).rpartition("/")
    with psycopg.connect(f"{server}/postgres") as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", (name,)
        ).fetchone()
    return row[0]
