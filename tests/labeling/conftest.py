"""A labeling harness: ingestion (served), labeling's API and its real worker, on one Redis and S3."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import func, select

from services.labeling.models import Task
from shared.events.envelope import make_envelope
from shared.settings import Settings
from shared.storage import ObjectStore, create_store
from tests.helpers import INTERNAL, bearer, create_dataset, create_partner, eventually


@dataclass
class Harness:
    ingestion: Any
    labeling: Any
    worker: Any  # the worker's runtime
    key: str
    tenant: str
    annotators: dict[str, str] = field(default_factory=dict)

    @property
    def partner(self) -> dict[str, str]:
        return bearer(self.key)

    def dataset(self, **fields: Any) -> str:
        """A new dataset, once labeling has consumed its `dataset.created` (so its settings can be changed)."""
        dataset_id = create_dataset(self.ingestion.client, self.key, **fields)["id"]
        eventually(
            lambda: self.labeling.client.get(f"/v1/datasets/{dataset_id}", headers=self.partner).status_code == 200,
            what="labeling to learn of the dataset",
        )
        return dataset_id

    def push(
        self,
        dataset_id: str,
        texts: list[str],
        labels: list[str | None] | None = None,
        *,
        trace_id: str | None = None,
    ) -> list[str]:
        labels = labels or [None] * len(texts)
        items = [{"text": t, "label": label} for t, label in zip(texts, labels, strict=True)]
        headers = self.partner | ({"X-Request-ID": trace_id} if trace_id else {})
        response = self.ingestion.client.post(
            f"/v1/datasets/{dataset_id}/items", json={"items": items}, headers=headers
        )
        assert response.status_code == 200, response.get_json()
        return [i["item_id"] for i in response.get_json()["items"]]

    def task_count(self, dataset_id: str, status: str | None = None) -> int:
        query = select(func.count()).select_from(Task).where(Task.dataset_id == dataset_id)
        if status:
            query = query.where(Task.status == status)
        with self.worker.db.session() as session:
            return session.scalar(query)

    def wait_tasks(self, dataset_id: str, count: int) -> None:
        eventually(lambda: self.task_count(dataset_id) >= count, what=f"{count} tasks")

    def annotator(self, name: str, *datasets: str) -> dict[str, str]:
        response = self.labeling.client.post(
            "/v1/annotators", json={"tenant": self.tenant, "name": name, "datasets": list(datasets)}, headers=INTERNAL
        )
        assert response.status_code == 201, response.get_json()
        return bearer(response.get_json()["token"])

    def next(self, headers: dict[str, str], dataset_id: str, lease_seconds: int = 300) -> dict[str, Any] | None:
        response = self.labeling.client.get(
            f"/v1/datasets/{dataset_id}/tasks/next?lease_seconds={lease_seconds}", headers=headers
        )
        if response.status_code == 204:
            return None
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    def label(self, headers: dict[str, str], task_id: int, label: str) -> Any:
        return self.labeling.client.post(f"/v1/tasks/{task_id}/annotations", json={"label": label}, headers=headers)

    def promote(self, dataset_id: str, model: str = "reviews", version: int = 3, trace_id: str | None = None) -> None:
        """The registry's `model.promoted` of `model` to production for the dataset."""
        payload = {
            "model_name": model,
            "dataset_id": dataset_id,
            "alias": "production",
            "version": version,
            "previous_version": None,
            "weights": {},
            "reason": "test",
        }
        self.send("model.promoted", payload, trace_id=trace_id)

    def send(self, event_type: str, payload: dict[str, Any], *, trace_id: str | None = None) -> None:
        """Deliver an event another service would produce, through Redis to the labeling worker."""
        message = make_envelope(event_type, payload, tenant=self.tenant, trace_id=trace_id).to_dict()
        self.worker.celery.send_task(f"labeling.{event_type}", args=[message], queue="labeling")


@pytest.fixture
def store(settings: Settings) -> ObjectStore:
    """The object store the platform writes raw items to, as the inference service reads it."""
    return create_store(
        s3_endpoint=settings.s3_endpoint,
        s3_access_key=settings.s3_access_key,
        s3_secret_key=settings.s3_secret_key,
        s3_secure=False,
        s3_region=settings.s3_region,
        file_root=settings.file_store_root,
    )


@pytest.fixture
def harness_factory(platform, worker):
    stack: list[Any] = []

    def build(**overrides: Any) -> Harness:
        """`overrides` apply to labeling (its API and worker share them, a database URL say)."""
        ingestion = platform("ingestion")
        labeling = platform("labeling", **overrides)
        context = worker("labeling", **overrides)
        runtime = context.__enter__()
        stack.append(context)
        issued = create_partner(ingestion.client, "acme")
        return Harness(ingestion, labeling, runtime, issued["api_key"], issued["partner"]["id"])

    yield build
    for context in reversed(stack):
        context.__exit__(None, None, None)


@pytest.fixture
def harness(harness_factory) -> Harness:
    return harness_factory()
