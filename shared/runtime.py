"""A service's runtime: the resources one process of it holds, built from settings in one place.

`ServiceSpec` says what a service is (its tables, HTTP blueprints, event handlers, whether it runs a Celery
worker); `Runtime` builds its database, object store, Celery app, event bus, key verifier and metrics from
`Settings`. Each service's `app.py` declares its spec and exposes `create_app()` (gunicorn) and, if it runs a
worker, `create_celery()` (Celery), both thin calls into this module, so nothing happens at import time and
tests build services with their own settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from flask import Flask
from prometheus_client import CollectorRegistry
from sqlalchemy import MetaData

from shared.auth import HttpKeyLookup, KeyLookup, KeyVerifier
from shared.db import Database
from shared.events.bus import EventBus
from shared.events.celery_app import make_celery, service_queues
from shared.events.consumer import EventHandlers
from shared.events.dead_letters import blp as dead_letters_blp
from shared.logging import configure_logging, get_logger
from shared.settings import BUCKETS, Settings
from shared.storage import ObjectStore, create_store

log = get_logger(__name__)


@dataclass
class ServiceSpec:
    name: str
    title: str
    metadata: MetaData
    blueprints: list[Any] = field(default_factory=list)
    pages: list[Any] = field(default_factory=list)
    """Plain Flask blueprints that are not API (the web console): served, but not in the OpenAPI document."""
    handlers: EventHandlers | None = None
    key_lookup: Callable[[Runtime], KeyLookup] | None = None
    """How this service resolves partner keys; default: ask ingestion over HTTP."""
    register_tasks: Callable[[Runtime], None] | None = None
    """Registers the service's own Celery tasks (work it queues for itself, not catalog events)."""
    runs_worker: bool = True
    """False: the service consumes nothing through Celery (no handlers, no tasks of its own), so it runs its HTTP
    server only; `flywheel up`, docker-compose and Kubernetes start no worker for it."""
    worker_pool: str = "threads"
    worker_concurrency: int = 4

    def __post_init__(self) -> None:
        if not self.runs_worker and (self.handlers is not None or self.register_tasks is not None):
            raise ValueError(f"{self.name} runs no worker, so nothing would run its event handlers or tasks")


class Runtime:
    def __init__(self, spec: ServiceSpec, settings: Settings | None = None) -> None:
        self.spec = spec
        self.service = spec.name
        self.settings = (settings or Settings.from_env()).for_service(spec.name)
        configure_logging(self.service, self.settings.log_level, self.settings.log_format)
        self.metrics = CollectorRegistry(auto_describe=True)
        self.db = Database(self.settings.database_url, spec.metadata)
        self.storage: ObjectStore = create_store(
            s3_endpoint=self.settings.s3_endpoint or None,
            s3_access_key=self.settings.s3_access_key,
            s3_secret_key=self.settings.s3_secret_key,
            s3_secure=self.settings.s3_secure,
            s3_region=self.settings.s3_region,
            file_root=self.settings.file_store_root,
            s3_server_side_encryption=self.settings.s3_server_side_encryption,
        )
        self.celery: Celery = make_celery(self.settings, self.service)
        self.bus = EventBus(self.service, self.celery, self.db, relay_interval=self.settings.outbox_relay_interval)
        self.redis = redis.Redis.from_url(
            self.settings.redis_url, socket_connect_timeout=2, socket_timeout=2, health_check_interval=10
        )
        lookup = (
            spec.key_lookup(self)
            if spec.key_lookup
            else HttpKeyLookup(self.settings.ingestion_url, self.settings.internal_token)
        )
        self.keys = KeyVerifier(lookup, self.settings.key_cache_seconds)
        self._started = False
        self._closers: list[Callable[[], None]] = []

    def start(self) -> Runtime:
        """Create tables, bootstrap buckets (if storage answers now; readiness reports it otherwise)."""
        if self._started:
            return self
        self.db.create_all()
        try:
            self.storage.ensure_buckets(*BUCKETS)
        except Exception as exc:
            log.warning("storage_bootstrap_deferred", storage=self.storage.describe, error=str(exc)[:300])
        if self.spec.handlers is not None:
            self.spec.handlers.register_tasks(self)
        if self.spec.register_tasks is not None:
            self.spec.register_tasks(self)
        self._started = True
        log.info(
            "service_started",
            database=self.db.safe_url,
            storage=self.storage.describe,
            storage_encryption="sse-s3" if getattr(self.storage, "encrypts", False) else None,
            broker=redact_url(self.settings.redis_url),
        )
        return self

    def readiness_checks(self) -> dict[str, Callable[[], None]]:
        return {"redis": self._ping_redis, "database": self.db.ping, "storage": self.storage.ping}

    def _ping_redis(self) -> None:
        self.redis.ping()

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run `closer` (stop a service's own threads, flush its buffers) when the runtime closes."""
        self._closers.append(closer)

    def close(self) -> None:
        for closer in reversed(self._closers):
            closer()
        self.bus.stop_relay()
        self.db.dispose()
        self.redis.close()


def redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def create_http_app(spec: ServiceSpec, settings: Settings | None = None) -> Flask:
    runtime = Runtime(spec, settings).start()
    from shared.http import create_flask_app

    app = create_flask_app(runtime, spec.title, [*spec.blueprints, dead_letters_blp])
    for page in spec.pages:
        app.register_blueprint(page)
    # An HTTP process only publishes: one quick connection attempt, then the outbox relay takes over, instead
    # of Celery's default of retrying the connection for seconds while a request waits.
    runtime.celery.conf.broker_connection_max_retries = 1
    runtime.bus.start_relay()
    return app


def create_worker(spec: ServiceSpec, settings: Settings | None = None) -> Celery:
    """The service's Celery app with its consumers registered (start it with `flywheel worker <service>`)."""
    if not spec.runs_worker:
        raise ValueError(f"{spec.name} runs no Celery worker")
    runtime = Runtime(spec, settings).start()
    runtime.celery.conf.worker_pool = spec.worker_pool
    runtime.celery.conf.worker_concurrency = spec.worker_concurrency
    runtime.celery.flywheel_runtime = runtime  # type: ignore[attr-defined]
    return runtime.celery


def worker_argv(spec: ServiceSpec) -> list[str]:
    return [
        "--quiet",  # no ASCII banner (the CLI logs `worker_starting` instead): every line stays JSON
        "worker",
        f"--queues={','.join(service_queues(spec.name))}",
        f"--pool={spec.worker_pool}",
        f"--concurrency={spec.worker_concurrency}",
        f"--hostname={spec.name}@%h",
        "--without-gossip",
        "--without-mingle",
        "--loglevel=INFO",
    ]
