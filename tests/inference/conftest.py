"""Fixtures for inference: real tiny ONNX models, a registry stand-in on a socket, partners with keys, and
inference apps (replicas) built with their own `create_app`, closed after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from services.inference.app import create_app
from services.inference.server import InferenceServer
from shared.runtime import Runtime
from shared.settings import Settings
from shared.storage import ObjectStore, create_store
from tests.conftest import serve
from tests.helpers import bearer, create_partner, eventually
from tests.inference.support import RegistryProducer, RegistryStandIn, build_image_model, build_text_model


@pytest.fixture(scope="session")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-models")
    return {
        "text": build_text_model(root / "text"),
        "image": build_image_model(root / "image"),
        "slow": build_image_model(root / "slow", "slow", slow=True),
    }


@pytest.fixture
def store(settings: Settings) -> ObjectStore:
    store = create_store(
        s3_endpoint=settings.s3_endpoint,
        s3_access_key=settings.s3_access_key,
        s3_secret_key=settings.s3_secret_key,
        s3_secure=False,
        s3_region=settings.s3_region,
        file_root=settings.file_store_root,
    )
    store.ensure_buckets("models", "raw")
    return store


@pytest.fixture
def registry() -> Iterator[RegistryStandIn]:
    stand_in = RegistryStandIn().start()
    yield stand_in
    stand_in.stop()


@dataclass
class Partner:
    tenant: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.key)


@dataclass
class Tenants:
    ingestion_url: str
    alice: Partner
    bob: Partner


@pytest.fixture
def tenants(platform: Callable[..., Any]) -> Tenants:
    ingestion = platform("ingestion")
    alice = create_partner(ingestion.client, "alice")
    bob = create_partner(ingestion.client, "bob")
    return Tenants(
        ingestion_url=ingestion.url,
        alice=Partner(alice["partner"]["id"], alice["api_key"]),
        bob=Partner(bob["partner"]["id"], bob["api_key"]),
    )


@dataclass
class Replica:
    app: Flask
    url: str = ""
    _stop: Callable[[], None] = field(default=lambda: None)

    @property
    def client(self) -> Any:
        return self.app.test_client()

    @property
    def server(self) -> InferenceServer:
        return self.app.extensions["inference"]

    @property
    def runtime(self) -> Runtime:
        return self.app.extensions["flywheel"]

    def serve(self) -> str:
        """Serve on a real loopback socket (for clients that speak HTTP, and load loops)."""
        if not self.url:
            self.url, self._stop = serve(self.app)
        return self.url

    def close(self) -> None:
        self._stop()
        self.server.close()
        self.runtime.close()


@pytest.fixture
def inference_settings(settings: Settings, tenants: Tenants, registry: RegistryStandIn) -> Settings:
    return Settings(**{**settings.__dict__, "ingestion_url": tenants.ingestion_url, "registry_url": registry.url})


@pytest.fixture
def inference(inference_settings: Settings) -> Iterator[Callable[..., Replica]]:
    """Build inference replicas: `inference()`; keyword arguments override the inference config."""
    replicas: list[Replica] = []

    def build(*, wait_ready: bool = True, **config: Any) -> Replica:
        replica = Replica(create_app(inference_settings, {"reconcile_interval_s": 300.0, **config}))
        replicas.append(replica)
        if wait_ready:
            eventually(
                lambda: replica.client.get("/v2/health/ready").status_code == 200, timeout=30, what="inference ready"
            )
        eventually(replica.server.promotions.subscribed.is_set, timeout=10, what="promotion listener subscribed")
        return replica

    yield build
    for replica in replicas:
        replica.close()


@pytest.fixture
def registry_bus(inference_settings: Settings) -> Iterator[RegistryProducer]:
    """Publishes model.promoted through the shared event bus, as the registry service does."""
    producer = RegistryProducer(inference_settings)
    yield producer
    producer.close()
