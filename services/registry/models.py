"""Registry's tables: models, their numbered versions, aliases, the alias audit log and refused registrations.

- `registered_models`: one row per (tenant, model name). It holds the promotion policy (`policy()`, with the
  defaults below for what a model never set) and `last_version`,
  the per-model counter that numbers versions. Registration locks this row (`SELECT … FOR UPDATE`) before
  taking the next number, so concurrent registrations of one model queue on the row and get 1, 2, 3…
  without gaps; the unique (model_id, version) constraint is the safety net.
- `model_versions`: what a training run produced, verified at registration; unique run_id per model
  makes a redelivered `training.completed` a no-op.
- `model_aliases`: `production`, `staging` or any name, pointing at a version, optionally splitting
  traffic between two versions by weight (a canary).
- `alias_changes`: every alias move (who, when, from, to, why): what was in production when.
- `refused_registrations`: runs that were not registered and why (an artifact failed verification, say).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import declarative_base

Base = declarative_base()

DEFAULT_PRIMARY_METRIC = "macro_f1"
ENTITY_METRIC = "entity_f1"
CLASSIFICATION_METRICS = ("macro_f1", "accuracy")
PRIMARY_METRICS = (*CLASSIFICATION_METRICS, ENTITY_METRIC)
SPAN_TASK = "token_classification"
"""A token_classification model is gated on entity F1 (seqeval strict, micro over entities): its reports carry
per-item entity counts, not a class per item (services.training.token_runs), so it takes no other metric."""


def primary_metrics_for(task_type: str) -> tuple[str, ...]:
    """The metrics the gate can compare for a model of `task_type`; the first is its default."""
    return (ENTITY_METRIC,) if task_type == SPAN_TASK else CLASSIFICATION_METRICS


DEFAULT_PROMOTION_MARGIN = 0.01
DEFAULT_CONFIDENCE = 0.95
DEFAULT_MAX_CLASS_REGRESSION = 0.10
DEFAULT_MIN_TEST_ITEMS = 30
DEFAULT_BOOTSTRAP_SAMPLES = 2000
MAJORITY_FLOOR = "majority"
CLASSICAL_FLOOR = "classical_baseline"
FLOORS = (MAJORITY_FLOOR, CLASSICAL_FLOOR)
DEFAULT_FLOOR = MAJORITY_FLOOR
"""Which baseline condition (d) holds a candidate to when `min_score` is null (docs/evaluation.md says why)."""
PRODUCTION = "production"
STAGING = "staging"
READY = "ready"
ARCHIVED = "archived"


def new_model_id() -> str:
    return f"mdl_{uuid.uuid4().hex[:20]}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class RegisteredModel(Base):
    __tablename__ = "registered_models"
    __table_args__ = (UniqueConstraint("tenant", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_model_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    dataset_id: Mapped[str] = mapped_column(String(64), index=True)
    task_type: Mapped[str] = mapped_column(String(40))
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    primary_metric: Mapped[str] = mapped_column(String(100), default=DEFAULT_PRIMARY_METRIC)
    promotion_margin: Mapped[float] = mapped_column(Float, default=DEFAULT_PROMOTION_MARGIN)
    auto_promote: Mapped[bool] = mapped_column(Boolean, default=True)
    # The gate's statistical policy; None means the default (for min_score: the majority baseline's score).
    # Nullable so that tables created by earlier releases gain them without a migration.
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_class_regression: Mapped[float | None] = mapped_column(Float, nullable=True)
    min_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    min_test_items: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bootstrap_samples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    floor: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # Retired: the gate now always scores both versions on the same items. Nothing reads it; it stays mapped
    # because tables created by earlier releases have it NOT NULL without a server default.
    require_same_split: Mapped[bool] = mapped_column(Boolean, default=False)
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    def policy(self) -> dict[str, Any]:
        """The promotion policy as the gate applies it (services.registry.promotion documents each field)."""
        return {
            "primary_metric": self.primary_metric,
            "margin": self.promotion_margin,
            "auto_promote": self.auto_promote,
            "confidence": _default(self.confidence, DEFAULT_CONFIDENCE),
            "max_class_regression": _default(self.max_class_regression, DEFAULT_MAX_CLASS_REGRESSION),
            "min_score": self.min_score,
            "floor": _default(self.floor, DEFAULT_FLOOR),
            "min_test_items": _default(self.min_test_items, DEFAULT_MIN_TEST_ITEMS),
            "bootstrap_samples": _default(self.bootstrap_samples, DEFAULT_BOOTSTRAP_SAMPLES),
        }


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"), UniqueConstraint("model_id", "run_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("registered_models.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20), default=READY)
    dataset_id: Mapped[str] = mapped_column(String(64))
    snapshot_id: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON)
    artifacts: Mapped[dict[str, dict[str, Any]]] = mapped_column(JSON)
    """{filename: {bucket, key, sha256, size}}, each verified against object storage at registration."""
    model_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    """The content of metadata.json (shared.artifacts.ModelMetadata): signature, labels, preprocessing…"""
    tags: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    decision: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """The promotion gate's decision for this version, with its numbers."""
    event_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    trace_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    archived_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    archive_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class ModelAlias(Base):
    __tablename__ = "model_aliases"
    __table_args__ = (UniqueConstraint("model_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("registered_models.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    """The alias's main version; during a canary, the stable side of the split."""
    weights: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    """{} for a plain alias; {"<version>": percent, …} summing to 100 for a canary."""
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    updated_by: Mapped[str] = mapped_column(String(200))

    def versions(self) -> set[int]:
        return {self.version, *(int(v) for v in self.weights)}


class AliasChange(Base):
    __tablename__ = "alias_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("registered_models.id"), index=True)
    tenant: Mapped[str] = mapped_column(String(64))
    alias: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(30))
    from_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    from_weights: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    to_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    to_weights: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    trace_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RefusedRegistration(Base):
    __tablename__ = "refused_registrations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    dataset_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    run_id: Mapped[str] = mapped_column(String(100))
    event_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    trace_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
