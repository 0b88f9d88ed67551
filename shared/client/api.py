"""Typed methods over every service's public API. Each returns the API's JSON (dicts and lists)."""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from shared.client.http import ServiceClient
from shared.logging import TRACE_HEADER
from shared.settings import SERVICES, Settings


class IngestionClient(ServiceClient):
    # partners and keys (internal token)
    def create_partner(self, name: str, **quotas: int | None) -> dict[str, Any]:
        return self.post("/v1/partners", json={"name": name, **quotas})

    def list_partners(self) -> list[dict[str, Any]]:
        return self.get("/v1/partners")["partners"]

    def update_partner(self, partner_id: str, **quotas: int | None) -> dict[str, Any]:
        return self.patch(f"/v1/partners/{partner_id}", json=quotas)

    def rotate_key(self, partner_id: str, **options: Any) -> dict[str, Any]:
        """Issue a key: `scopes`, `expires_at` (RFC 3339), `replaces` (a key id) with `grace_seconds`."""
        return self.post(f"/v1/partners/{partner_id}/keys", json=options or None)

    def list_keys(self, partner_id: str) -> list[dict[str, Any]]:
        return self.get(f"/v1/partners/{partner_id}/keys")["keys"]

    def revoke_key(self, partner_id: str, key_id: str) -> dict[str, Any]:
        return self.delete(f"/v1/partners/{partner_id}/keys/{key_id}")

    # datasets, pushes, imports, items (partner key)
    def create_dataset(self, name: str, task_type: str, labels: list[str], **options: Any) -> dict[str, Any]:
        return self.post("/v1/datasets", json={"name": name, "task_type": task_type, "labels": labels, **options})

    def list_datasets(self) -> list[dict[str, Any]]:
        return self.get("/v1/datasets")["datasets"]

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        return self.get(f"/v1/datasets/{dataset_id}")

    def update_dataset(self, dataset_id: str, **changes: Any) -> dict[str, Any]:
        return self.patch(f"/v1/datasets/{dataset_id}", json=changes)

    def push(
        self,
        dataset_id: str,
        items: list[dict[str, Any]],
        *,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> dict[str, Any]:
        """Push items: `{"text": ...}` or `{"image": bytes | base64 str}`, each with optional label/metadata."""
        body = [
            {**item, "image": base64.b64encode(item["image"]).decode()}
            if isinstance(item.get("image"), bytes)
            else item
            for item in items
        ]
        headers = {}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        if trace_id:
            headers[TRACE_HEADER] = trace_id
        return self.post(f"/v1/datasets/{dataset_id}/items", json={"items": body}, headers=headers)

    def import_file(self, dataset_id: str, file: IO[bytes] | Path, content_type: str) -> dict[str, Any]:
        """Upload a JSONL file or a zip of images as a stream; follow it with `get_import`."""
        if isinstance(file, Path):
            with file.open("rb") as handle:
                return self.import_file(dataset_id, handle, content_type)
        return self.post(
            f"/v1/datasets/{dataset_id}/imports", data=file, headers={"Content-Type": content_type}, timeout=600
        )

    def get_import(self, import_id: str) -> dict[str, Any]:
        return self.get(f"/v1/imports/{import_id}")

    def list_items(self, dataset_id: str, **query: Any) -> Iterator[dict[str, Any]]:
        """Every item, following the cursor across pages."""
        cursor = None
        while True:
            page = self.get(
                f"/v1/datasets/{dataset_id}/items", params={**query, **({"cursor": cursor} if cursor else {})}
            )
            yield from page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def get_item(self, item_id: str) -> dict[str, Any]:
        return self.get(f"/v1/items/{item_id}")

    def download_url(self, item_id: str) -> str:
        return self.get(f"/v1/items/{item_id}/download")["url"]

    def delete_item(self, item_id: str) -> dict[str, Any]:
        """Erase one item; the answer is the erasure record, whose report `erasure(id)` follows."""
        return self.delete(f"/v1/items/{item_id}")

    def erase_subject(self, subject_id: str) -> dict[str, Any]:
        """Erase every item and logged prediction of a data subject (the `subject_id` given on push/predict)."""
        return self.delete(f"/v1/subjects/{subject_id}")

    def erasure(self, erasure_id: str) -> dict[str, Any]:
        return self.get(f"/v1/erasures/{erasure_id}")

    def usage(
        self, days: int = 30, *, period: str | None = None, bucket: str = "day", by: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The caller's own usage (partner key): daily counts with quotas, and every meter in `report`."""
        params = {"days": days, "period": period, "bucket": bucket, "by": list(by)}
        return self.get("/v1/usage", params={k: v for k, v in params.items() if v})

    def billing_usage(
        self, *, tenant: str | None = None, period: str | None = None, bucket: str = "day", by: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Every tenant's meters, or one's (internal token)."""
        params = {"tenant": tenant, "period": period, "bucket": bucket, "by": list(by)}
        return self.get("/v1/billing/usage", params={k: v for k, v in params.items() if v})

    def billing_export(self, period: str, *, tenant: str | None = None, format: str = "cloudevents") -> bytes:
        """A billing period's usage records: CloudEvents JSON lines or CSV (internal token)."""
        params = {"period": period, "tenant": tenant, "format": format}
        return self.get("/v1/billing/export", params={k: v for k, v in params.items() if v})

    def billing_invoices(self, period: str, *, tenant: str | None = None) -> dict[str, Any]:
        """A billing period's invoice lines per tenant, priced by the deployment's price list (internal token)."""
        params = {"period": period, "tenant": tenant}
        return self.get("/v1/billing/invoices", params={k: v for k, v in params.items() if v})


class LabelingClient(ServiceClient):
    # operators
    def create_annotator(self, tenant: str, name: str, datasets: list[str]) -> dict[str, Any]:
        return self.post("/v1/annotators", json={"tenant": tenant, "name": name, "datasets": datasets})

    # annotators (annotator token)
    def next_task(self, dataset_id: str, lease_seconds: int = 300) -> dict[str, Any] | None:
        return self.get(f"/v1/datasets/{dataset_id}/tasks/next", params={"lease_seconds": lease_seconds})

    def annotate(self, task_id: int, label: str | None = None, *, spans: list[dict] | None = None) -> dict[str, Any]:
        """A class label, or (token_classification) entity spans `{start, end, label}`: [] means no entities."""
        body = {"spans": spans} if spans is not None else {"label": label}
        return self.post(f"/v1/tasks/{task_id}/annotations", json=body)

    def skip(self, task_id: int) -> dict[str, Any]:
        return self.post(f"/v1/tasks/{task_id}/skip")

    def task_content(self, task_id: int) -> bytes:
        return self.get(f"/v1/tasks/{task_id}/content")

    # dataset owners (partner key)
    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self.get(f"/v1/datasets/{dataset_id}")

    def settings(self, dataset_id: str, **changes: Any) -> dict[str, Any]:
        return self.patch(f"/v1/datasets/{dataset_id}/settings", json=changes)

    def tasks(self, dataset_id: str, **query: Any) -> list[dict[str, Any]]:
        return self.get(f"/v1/datasets/{dataset_id}/tasks", params=query)["tasks"]

    def stats(self, dataset_id: str) -> dict[str, Any]:
        return self.get(f"/v1/datasets/{dataset_id}/stats")

    def resolve(self, task_id: int, label: str) -> dict[str, Any]:
        return self.post(f"/v1/tasks/{task_id}/resolve", json={"label": label})

    def create_snapshot(self, dataset_id: str) -> dict[str, Any]:
        return self.post(f"/v1/datasets/{dataset_id}/snapshots")

    def snapshots(self, dataset_id: str) -> list[dict[str, Any]]:
        return self.get(f"/v1/datasets/{dataset_id}/snapshots")["snapshots"]

    def export(self, snapshot_id: str, fmt: str = "jsonl") -> Iterator[bytes]:
        return self.stream(f"/v1/snapshots/{snapshot_id}/export", params={"format": fmt})


class TrainingClient(ServiceClient):
    def create_run(self, tenant: str, dataset_id: str, snapshot_id: str, **options: Any) -> dict[str, Any]:
        body = {"tenant": tenant, "dataset_id": dataset_id, "snapshot_id": snapshot_id, **options}
        return self.post("/v1/runs", json=body)

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self.get(f"/v1/runs/{run_id}")

    def list_runs(self, **query: Any) -> list[dict[str, Any]]:
        return self.get("/v1/runs", params=query)["runs"]

    def cancel_run(self, run_id: str) -> dict[str, Any]:
        return self.post(f"/v1/runs/{run_id}/cancel")


class RegistryClient(ServiceClient):
    def list_models(self, **query: Any) -> list[dict[str, Any]]:
        return self.get("/v1/models", params=query)["models"]

    def get_model(self, name: str, **query: Any) -> dict[str, Any]:
        return self.get(f"/v1/models/{name}", params=query)

    def versions(self, name: str, **query: Any) -> list[dict[str, Any]]:
        return self.get(f"/v1/models/{name}/versions", params=query)["versions"]

    def version(self, name: str, version: int, **query: Any) -> dict[str, Any]:
        return self.get(f"/v1/models/{name}/versions/{version}", params=query)

    def set_alias(self, name: str, alias: str, *, tenant: str, reason: str, **target: Any) -> dict[str, Any]:
        """Point an alias at `version=N`, or split it as a canary with `weights={"3": 90, "4": 10}`."""
        return self.put(f"/v1/models/{name}/aliases/{alias}", json={"tenant": tenant, "reason": reason, **target})

    def rollback(
        self, name: str, *, tenant: str, reason: str, alias: str = "production", actor: str | None = None
    ) -> dict[str, Any]:
        body = {"tenant": tenant, "reason": reason, "alias": alias} | ({"actor": actor} if actor else {})
        return self.post(f"/v1/models/{name}/rollback", json=body)

    def audit(self, name: str, **query: Any) -> list[dict[str, Any]]:
        return self.get(f"/v1/models/{name}/audit", params=query)["changes"]

    def serving(self, tenant: str, name: str) -> dict[str, Any]:
        return self.get(f"/v1/internal/serving/{tenant}/{name}")


class InferenceClient(ServiceClient):
    def predict(
        self,
        model: str,
        *,
        texts: list[str] | None = None,
        images: list[bytes] | None = None,
        request_key: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"texts": texts} if texts is not None else {}
        if images is not None:
            body["images"] = [base64.b64encode(image).decode() for image in images]
        if request_key:
            body["request_key"] = request_key
        return self.post(f"/v1/models/{model}:predict", json=body)

    def feedback(
        self, prediction_id: str, label: str | None = None, *, spans: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The correct answer for a prediction: a classifier's `label`, or a token model's entity `spans`
        (`[{start, end, label}, ...]` in code points of the text sent; `[]`: no entity). Exactly one of them."""
        if (label is None) == (spans is None):
            raise ValueError("give exactly one of label (a classifier's prediction) and spans (a token model's)")
        body: dict[str, Any] = {"prediction_id": prediction_id}
        if spans is not None:
            body["spans"] = spans
        else:
            body["label"] = label
        return self.post("/v1/feedback", json=body)

    def model(self, name: str) -> dict[str, Any]:
        return self.get(f"/v2/models/{name}")


@dataclass
class Flywheel:
    """All five services with one credential: `Flywheel.from_settings(settings, token=api_key)`."""

    ingestion: IngestionClient
    labeling: LabelingClient
    training: TrainingClient
    registry: RegistryClient
    inference: InferenceClient

    @classmethod
    def from_urls(cls, urls: dict[str, str], token: str | None = None) -> Flywheel:
        return cls(
            ingestion=IngestionClient(urls["ingestion"], token),
            labeling=LabelingClient(urls["labeling"], token),
            training=TrainingClient(urls["training"], token),
            registry=RegistryClient(urls["registry"], token),
            inference=InferenceClient(urls["inference"], token),
        )

    @classmethod
    def from_settings(cls, settings: Settings, token: str | None = None) -> Flywheel:
        return cls.from_urls(service_urls(settings), token)

    def with_token(self, token: str | None) -> Flywheel:
        return Flywheel.from_urls({name: getattr(self, name).base_url for name in SERVICES}, token)

    def admin(self, service: str) -> ServiceClient:
        """The operator endpoints every service serves (dead letters)."""
        return getattr(self, service)


def service_urls(settings: Settings) -> dict[str, str]:
    return {name: settings.service_url(name) for name in SERVICES}
