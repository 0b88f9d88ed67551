"""The inference service: ONNX Runtime serving, the prediction log and feedback."""

from __future__ import annotations

from celery import Celery
from flask import Flask

from services.inference.models import Base
from shared.runtime import ServiceSpec, create_http_app, create_worker
from shared.settings import Settings

SPEC = ServiceSpec(
    name="inference",
    title="Flywheel inference API",
    metadata=Base.metadata,
    worker_pool="threads",
    worker_concurrency=4,
)


def create_app(settings: Settings | None = None) -> Flask:
    return create_http_app(SPEC, settings)


def create_celery(settings: Settings | None = None) -> Celery:
    return create_worker(SPEC, settings)
