"""Fixtures for the ingestion tests: a served ingestion service with a partner and datasets."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image

from tests.helpers import bearer, create_dataset, create_partner


@dataclass
class Tenant:
    service: Any
    key: str
    partner_id: str
    text: dict[str, Any]
    images: dict[str, Any]

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.key)

    def push(self, dataset_id: str, items: list[dict[str, Any]], **headers: str) -> Any:
        return self.service.client.post(
            f"/v1/datasets/{dataset_id}/items", json={"items": items}, headers=self.headers | headers
        )


def png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 8), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def make_tenant(service: Any, name: str, **text_fields: Any) -> Tenant:
    issued = create_partner(service.client, name)
    text = create_dataset(service.client, issued["api_key"], name="reviews", **text_fields)
    images = create_dataset(
        service.client, issued["api_key"], name="photos", task_type="image_classification", labels=["cat", "dog"]
    )
    return Tenant(service, issued["api_key"], issued["partner"]["id"], text, images)


@pytest.fixture
def ingestion(platform):
    return platform("ingestion")


@pytest.fixture
def tenant(ingestion) -> Tenant:
    return make_tenant(ingestion, "acme")
