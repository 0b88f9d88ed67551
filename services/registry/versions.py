"""Registering a training run as a model version: verify its files, number it, gate it.

`register_training_run` runs inside the consumer's transaction (with the inbox row), in this order:

1. Validate `metadata.json` (shared.artifacts.ModelMetadata); a run already registered for this model (same
   run_id, in a new event) is skipped here without touching storage.
2. Verify every artifact against object storage, before any lock is taken: its size (`stat`) and its sha256
   (hashed while it streams, never held whole in memory) must match the event's reference and what
   metadata.json declares. Any mismatch, a missing object or a malformed reference refuses the run: a
   `refused_registrations` row with the reason and a `model_version_refused` log line, no version, no crash.
   Storage being unreachable is not a refusal: it raises, and the consumer retries. The run's evaluation
   report (`evaluation.json`) is read and verified here too (services.registry.evaluation); one the gate
   cannot use does not refuse the run, it stages the version.
3. Create the model if this is its first run (INSERT … ON CONFLICT DO NOTHING, so concurrent first runs do not
   collide), then lock its row (`SELECT … FOR UPDATE`) and take the next number from its counter. Runs of one
   model therefore number 1, 2, 3… with no gap or collision however many register at once; the unique
   (model_id, version) and (model_id, run_id) constraints back this up.
4. Emit `model.version_created`, then pass the version and its evaluation report through the promotion gate
   (services.registry.promotion, which moves `production` or `staging` and emits `model.promoted`), all in
   the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.registry.aliases import Publish, lock_model
from services.registry.evaluation import read_evaluation
from services.registry.models import (
    ModelVersion,
    RefusedRegistration,
    RegisteredModel,
    new_model_id,
    primary_metrics_for,
    utcnow,
)
from services.registry.promotion import gate_new_version
from shared.artifacts import ModelMetadata
from shared.db import insert_if_absent
from shared.logging import get_logger
from shared.storage import ObjectNotFound, ObjectStore, sha256_stream

log = get_logger(__name__)

REQUIRED_FILES = ("model.onnx",)


@dataclass(frozen=True)
class Registration:
    outcome: str
    """'registered', 'duplicate' or 'refused'."""
    version: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Problem:
    file: str
    message: str
    expected_sha256: str | None = None
    actual_sha256: str | None = None
    expected_size: int | None = None
    actual_size: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def verify_artifacts(
    storage: ObjectStore, artifacts: dict[str, dict[str, Any]], declared: dict[str, dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], list[Problem]]:
    """Check each referenced file's bytes against its sha256 and size; returns (verified files, problems).

    `declared` is metadata.json's `files` ({name: {sha256, size}}); metadata.json itself cannot list its own
    hash, so a file it does not list is checked against the event's sha256 alone.
    """
    problems: list[Problem] = []
    verified: dict[str, dict[str, Any]] = {}
    for name in REQUIRED_FILES:
        if name not in artifacts:
            problems.append(Problem(name, f"the run has no {name}"))
    for name in sorted(set(declared) - set(artifacts)):
        problems.append(Problem(name, "metadata.json lists this file but the event carries no reference to it"))
    for name, ref in sorted(artifacts.items()):
        expected_sha = str(ref["sha256"]).lower()
        listed = declared.get(name) or {}
        expected_size = listed.get("size")
        if listed.get("sha256") is not None and str(listed["sha256"]).lower() != expected_sha:
            problems.append(
                Problem(
                    name,
                    "metadata.json and the event disagree on the sha256",
                    expected_sha256=expected_sha,
                    actual_sha256=str(listed["sha256"]).lower(),
                )
            )
            continue
        location = f"{ref['bucket']}/{ref['key']}"
        try:
            info = storage.stat(ref["bucket"], ref["key"])
            with storage.open(ref["bucket"], ref["key"]) as stream:
                digest, size = sha256_stream(stream)
        except ObjectNotFound:
            problems.append(Problem(name, f"not found in object storage at {location}"))
            continue
        except ValueError as exc:  # a bucket or key the store refuses to address
            problems.append(Problem(name, f"invalid location {location}: {exc}"))
            continue
        if digest != expected_sha:
            problems.append(
                Problem(name, f"sha256 mismatch at {location}", expected_sha256=expected_sha, actual_sha256=digest)
            )
        elif isinstance(expected_size, int) and size != expected_size:
            problems.append(
                Problem(name, f"size mismatch at {location}", expected_size=expected_size, actual_size=size)
            )
        elif info.size != size:
            problems.append(
                Problem(
                    name,
                    f"stored size differs from bytes read at {location}",
                    expected_size=info.size,
                    actual_size=size,
                )
            )
        else:
            verified[name] = {"bucket": ref["bucket"], "key": ref["key"], "sha256": digest, "size": size}
    return verified, problems


def _refuse(
    session: Session,
    *,
    tenant: str | None,
    payload: dict[str, Any],
    event_id: str | None,
    trace_id: str | None,
    reason: str,
    details: dict[str, Any] | None = None,
) -> Registration:
    session.add(
        RefusedRegistration(
            tenant=tenant,
            model_name=str(payload.get("model_name"))[:200],
            dataset_id=payload.get("dataset_id"),
            run_id=str(payload.get("run_id"))[:100],
            event_id=event_id,
            trace_id=trace_id,
            reason=reason,
            details=details or {},
        )
    )
    log.warning(
        "model_version_refused",
        model_name=payload.get("model_name"),
        run_id=payload.get("run_id"),
        dataset_id=payload.get("dataset_id"),
        reason=reason,
    )
    return Registration("refused", reason=reason)


def _registered_version(session: Session, tenant: str, model_name: str, run_id: str) -> int | None:
    return session.scalar(
        select(ModelVersion.version)
        .join(RegisteredModel, RegisteredModel.id == ModelVersion.model_id)
        .where(RegisteredModel.tenant == tenant, RegisteredModel.name == model_name, ModelVersion.run_id == run_id)
    )


def _create_model_if_absent(session: Session, tenant: str, payload: dict[str, Any], task_type: str) -> None:
    values = {
        "id": new_model_id(),
        "tenant": tenant,
        "name": payload["model_name"],
        "dataset_id": payload["dataset_id"],
        "task_type": task_type,
        "primary_metric": primary_metrics_for(task_type)[0],
        "description": "",
        "tags": {},
        "last_version": 0,
        "created_at": utcnow(),
        "updated_at": utcnow(),
    }
    insert_if_absent(session, RegisteredModel, values)


def register_training_run(
    session: Session,
    storage: ObjectStore,
    *,
    tenant: str | None,
    payload: dict[str, Any],
    event_id: str | None,
    trace_id: str | None,
    publish: Publish,
) -> Registration:
    """Turn one `training.completed` payload into the model's next version (see the module docstring)."""

    def refuse(reason: str, details: dict[str, Any] | None = None) -> Registration:
        return _refuse(
            session,
            tenant=tenant,
            payload=payload,
            event_id=event_id,
            trace_id=trace_id,
            reason=reason,
            details=details,
        )

    if not tenant:
        return refuse("the training.completed event carries no tenant")
    metadata = payload["metadata"]
    errors = ModelMetadata().validate(metadata)
    if errors:
        return refuse("metadata.json does not match the ModelMetadata schema", {"fields": errors})
    model_name, run_id = payload["model_name"], payload["run_id"]
    existing = _registered_version(session, tenant, model_name, run_id)
    if existing is not None:
        log.info("model_version_duplicate_skipped", model_name=model_name, run_id=run_id, version=existing)
        return Registration("duplicate", version=existing)

    verified, problems = verify_artifacts(storage, payload["artifacts"], metadata["files"])
    if problems:
        summary = "; ".join(f"{p.file}: {p.message}" for p in problems)
        return refuse(f"artifact verification failed: {summary}", {"problems": [p.as_dict() for p in problems]})
    evaluation = read_evaluation(storage, payload.get("evaluation"), metadata["labels"])

    _create_model_if_absent(session, tenant, payload, metadata["task_type"])
    model = lock_model(session, tenant, model_name)
    if model.dataset_id != payload["dataset_id"]:
        return refuse(
            f"model {model_name!r} belongs to dataset {model.dataset_id}, the run trained on {payload['dataset_id']}"
        )
    if model.task_type != metadata["task_type"]:
        return refuse(f"model {model_name!r} is a {model.task_type} model, the run is {metadata['task_type']}")
    existing = _registered_version(session, tenant, model_name, run_id)  # a concurrent delivery won the lock
    if existing is not None:
        log.info("model_version_duplicate_skipped", model_name=model_name, run_id=run_id, version=existing)
        return Registration("duplicate", version=existing)

    model.last_version += 1
    version = ModelVersion(
        model_id=model.id,
        version=model.last_version,
        run_id=run_id,
        dataset_id=payload["dataset_id"],
        snapshot_id=payload["snapshot_id"],
        metrics=dict(payload["metrics"]),
        lineage={
            **metadata["lineage"],
            "run_id": run_id,
            "dataset_id": payload["dataset_id"],
            "snapshot_id": payload["snapshot_id"],
            "hyperparameters": metadata["hyperparameters"],
        },
        artifacts=verified,
        model_metadata=metadata,
        tags={},
        decision={},
        event_id=event_id,
        trace_id=trace_id,
    )
    session.add(version)
    session.flush()
    publish(
        "model.version_created",
        {"model_name": model_name, "version": version.version, "run_id": run_id, "metrics": version.metrics},
    )
    log.info(
        "model_version_registered",
        model_name=model_name,
        model_id=model.id,
        version=version.version,
        run_id=run_id,
        dataset_id=payload["dataset_id"],
        snapshot_id=payload["snapshot_id"],
        files=len(verified),
    )
    gate_new_version(session, model, version, evaluation, publish=publish, trace_id=trace_id)
    return Registration("registered", version=version.version)
