"""The ingestion service: partners, keys, datasets and the push API. Owns partner credentials."""

from __future__ import annotations

from celery import Celery
from flask import Flask

from services.ingestion import api, consumers, erasure, imports, invoices, storage_meter
from services.ingestion.models import Base
from shared.runtime import ServiceSpec, create_http_app, create_worker
from shared.settings import Settings

SPEC = ServiceSpec(
    name="ingestion",
    title="Flywheel ingestion API",
    metadata=Base.metadata,
    blueprints=[api.partners, api.datasets, api.item_routes, api.internal, api.billing],
    handlers=consumers.handlers,
    key_lookup=lambda runtime: lambda key_hash: api.lookup_key(runtime, key_hash),
    register_tasks=lambda runtime: (
        invoices.PriceList.from_settings(runtime.settings),  # a bad PRICE_LIST stops the start, not an invoice
        imports.register_tasks(runtime),
        storage_meter.register(runtime),
        erasure.register(runtime),
    ),
)


def create_app(settings: Settings | None = None) -> Flask:
    return create_http_app(SPEC, settings)


def create_celery(settings: Settings | None = None) -> Celery:
    return create_worker(SPEC, settings)
