"""Helpers for the registry's tests: real training-run folders in S3, and delivering training.completed."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from services.registry.consumers import on_training_completed
from shared.artifacts import MODELS_BUCKET, model_run_prefix
from shared.events.consumer import handle_once
from shared.events.envelope import Envelope, make_envelope
from shared.events.tables import event_tables
from shared.runtime import Runtime
from shared.storage import ObjectStore
from testkit.models import file_digest, model_metadata
from tests.helpers import INTERNAL

CONSUMER = "registry.training.completed"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class RunFactory:
    """Writes a model version folder (model.onnx, tokenizer.json, metadata.json as testkit.models builds it) to
    object storage, the way training does, and returns the `training.completed` payload that references it."""

    storage: ObjectStore
    dataset_id: str = field(default_factory=lambda: f"ds_{uuid.uuid4().hex[:12]}")

    def __call__(
        self,
        tenant: str,
        model_name: str = "reviews-clf",
        *,
        macro_f1: float = 0.8,
        accuracy: float | None = None,
        snapshot_id: str = "snap-1",
        run_id: str | None = None,
        dataset_id: str | None = None,
        extra_metrics: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        run_id = run_id or f"run_{uuid.uuid4().hex[:16]}"
        dataset_id = dataset_id or self.dataset_id
        prefix = model_run_prefix(tenant, model_name, run_id)
        files = {
            "model.onnx": os.urandom(3000),  # stands in for the graph: the registry checks bytes, never runs them
            "tokenizer.json": json.dumps({"vocab": {"[PAD]": 0, "good": 1, "bad": 2}}).encode(),
        }
        metrics = {
            "macro_f1": macro_f1,
            "accuracy": accuracy if accuracy is not None else macro_f1 + 0.02,
            "per_class": {"neg": {"f1": macro_f1 - 0.01}, "pos": {"f1": macro_f1 + 0.01}},
            **(extra_metrics or {}),
        }
        metadata = model_metadata(
            model_name=model_name,
            task_type="text_classification",
            labels=["neg", "pos"],
            inputs=[
                {"name": "input_ids", "datatype": "INT64", "shape": [-1, 128]},
                {"name": "attention_mask", "datatype": "INT64", "shape": [-1, 128]},
            ],
            preprocessing={"kind": "text", "tokenizer_files": ["tokenizer.json"], "max_length": 128},
            files={name: file_digest(data) for name, data in files.items()},
            metrics=metrics,
            lineage={
                "run_id": run_id,
                "snapshot_id": snapshot_id,
                "manifest_sha256": sha256(snapshot_id.encode()),
                "base_model": "all-MiniLM-L6-v2",
                "base_model_sha256": sha256(b"base"),
                "code_version": "abc1234",
            },
            hyperparameters={"lr": 5e-5, "epochs": 3, "seed": 7},
        )
        files["metadata.json"] = json.dumps(metadata, sort_keys=True).encode()
        artifacts = {}
        for name, data in files.items():
            info = self.storage.put(MODELS_BUCKET, f"{prefix}/{name}", data)
            artifacts[name] = {"bucket": MODELS_BUCKET, "key": info.key, "sha256": info.sha256}
        return {
            "run_id": run_id,
            "dataset_id": dataset_id,
            "snapshot_id": snapshot_id,
            "model_name": model_name,
            "artifacts": artifacts,
            "metrics": metrics,
            "metadata": metadata,
        }


def envelope(tenant: str, payload: dict[str, Any]) -> Envelope:
    return make_envelope("training.completed", payload, tenant=tenant)


def deliver(runtime: Runtime, tenant: str, payload: dict[str, Any], event: Envelope | None = None) -> str:
    """Hand one training.completed to the registry's real consumer (inbox included), in this thread."""
    return handle_once(runtime, CONSUMER, event or envelope(tenant, payload), on_training_completed, use_inbox=True)


def outbox(runtime: Runtime, event_type: str) -> list[dict[str, Any]]:
    """The envelopes the registry emitted of one type, oldest first."""
    table = event_tables(runtime.db.metadata).outbox
    with runtime.db.session() as session:
        rows = session.scalars(select(table.c.envelope).where(table.c.event_type == event_type).order_by(table.c.id))
        return list(rows)


def put_alias(client: Any, tenant: str, model: str, alias: str, **body: Any) -> Any:
    body.setdefault("reason", "test")
    return client.put(f"/v1/models/{model}/aliases/{alias}", json={"tenant": tenant, **body}, headers=INTERNAL)
