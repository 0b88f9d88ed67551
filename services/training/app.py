"""The training service: training runs, checkpoints and verified ONNX exports."""

from __future__ import annotations

from celery import Celery
from flask import Flask

from services.training import api
from services.training.consumers import handlers
from services.training.models import Base
from services.training.worker import recover_on_start, register_run_task
from shared.runtime import ServiceSpec, create_http_app, create_worker
from shared.settings import Settings

SPEC = ServiceSpec(
    name="training",
    title="Flywheel training API",
    metadata=Base.metadata,
    blueprints=[api.runs],
    handlers=handlers,
    # One run at a time per worker, prefetch 1: a long run never holds other messages hostage.
    worker_pool="solo",
    worker_concurrency=1,
)


def create_app(settings: Settings | None = None) -> Flask:
    return create_http_app(SPEC, settings)


def create_celery(settings: Settings | None = None) -> Celery:
    celery = create_worker(SPEC, settings)
    register_run_task(celery.flywheel_runtime)
    recover_on_start(celery.flywheel_runtime)
    return celery
