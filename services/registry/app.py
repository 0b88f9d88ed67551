"""The registry service: models, versions, aliases, lineage and audit. The single source of truth for what
model serves what: versions come from `training.completed`, aliases move by policy or by an operator, and
inference reads `GET /v1/internal/serving` to learn what to load."""

from __future__ import annotations

from celery import Celery
from flask import Flask

from services.registry import api
from services.registry.consumers import handlers
from services.registry.models import Base
from shared.runtime import ServiceSpec, create_http_app, create_worker
from shared.settings import Settings

SPEC = ServiceSpec(
    name="registry",
    title="Flywheel model registry API",
    metadata=Base.metadata,
    blueprints=[api.models, api.refusals, api.internal],
    handlers=handlers,
    worker_pool="threads",
    worker_concurrency=4,
)


def create_app(settings: Settings | None = None) -> Flask:
    return create_http_app(SPEC, settings)


def create_celery(settings: Settings | None = None) -> Celery:
    return create_worker(SPEC, settings)
