"""The training service: training runs, checkpoints and verified ONNX exports."""

from __future__ import annotations

from celery import Celery
from flask import Flask

from services.training.models import Base
from shared.runtime import ServiceSpec, create_http_app, create_worker
from shared.settings import Settings

SPEC = ServiceSpec(
    name="training",
    title="Flywheel training API",
    metadata=Base.metadata,
    worker_pool="solo",
    worker_concurrency=1,
)


def create_app(settings: Settings | None = None) -> Flask:
    return create_http_app(SPEC, settings)


def create_celery(settings: Settings | None = None) -> Celery:
    return create_worker(SPEC, settings)
