"""The labeling service: turns ingested items into labeling tasks, consensus labels and dataset snapshots."""

from __future__ import annotations

from celery import Celery
from flask import Flask

from services.labeling import api
from services.labeling.consumers import handlers, register_tasks
from services.labeling.models import Base
from shared.console import console
from shared.runtime import ServiceSpec, create_http_app, create_worker
from shared.settings import Settings

SPEC = ServiceSpec(
    name="labeling",
    title="Flywheel labeling API",
    metadata=Base.metadata,
    blueprints=[api.datasets, api.tasks, api.annotators],
    # The web console (shared/console) is served where annotators already work; it reaches every service.
    pages=[console],
    handlers=handlers,
    register_tasks=register_tasks,
)


def create_app(settings: Settings | None = None) -> Flask:
    return create_http_app(SPEC, settings)


def create_celery(settings: Settings | None = None) -> Celery:
    return create_worker(SPEC, settings)
