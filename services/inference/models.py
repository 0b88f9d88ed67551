"""Inference's tables: the prediction log (inputs by reference, outputs, latency, version, feedback, ground
truth), shadow answers, and monitoring: per-model policies, per-tenant retention, alerts."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import declarative_base

Base = declarative_base()


def utcnow() -> datetime:
    return datetime.now(UTC)


class Prediction(Base):
    """One logged prediction. `input_*` is where its input sits in object storage (a byte range of a packed
    object in the `raw` bucket, under `<tenant>/predictions/`); `input_sha256` is the sha256 of those bytes."""

    __tablename__ = "predictions"
    __table_args__ = (
        Index("ix_predictions_tenant_model_created", "tenant", "model_name", "created_at"),
        Index("ix_predictions_tenant_subject", "tenant", "subject_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[int] = mapped_column(Integer)
    dataset_id: Mapped[str] = mapped_column(String(64))
    api: Mapped[str] = mapped_column(String(8))
    """`predict` (friendly API: every prediction is kept) or `v2` (tensor protocol: a sample is kept)."""
    input_kind: Mapped[str] = mapped_column(String(10))
    """`text` (UTF-8 bytes), `image` (the bytes as sent) or `tensors` (an .npz of the v2 request's inputs)."""
    input_bucket: Mapped[str] = mapped_column(String(63))
    input_key: Mapped[str] = mapped_column(String(512))
    input_sha256: Mapped[str] = mapped_column(String(64))
    input_offset: Mapped[int] = mapped_column(BigInteger)
    input_length: Mapped[int] = mapped_column(BigInteger)
    predicted_label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    """A classifier's answer; null for a token-classification prediction (its answer is `entities`) and for v2."""
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    """A classifier's top probability; for a token-classification prediction its least sure entity's score (null
    when it found no entity)."""
    outputs: Mapped[dict] = mapped_column(JSON)
    """A classifier's `probabilities`; for a token-classification prediction whose text was redacted, `redacted`:
    per replaced range `[start, end, stored_start, stored_end]`, its offsets in the text sent then its placeholder's
    in the stored text (how offsets move between the two)."""
    entities: Mapped[list | None] = mapped_column(JSON, nullable=True)
    """A token-classification prediction's entities `{start, end, label, score}` in offsets of the stored text (an
    entity overlapping a redacted range is dropped); `[]`: none found; null for every other prediction."""
    latency_ms: Mapped[float] = mapped_column(Float)
    trace_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    feedback_label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    feedback_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    feedback_spans: Mapped[list | None] = mapped_column(JSON, nullable=True)
    """A token-classification prediction's corrected entities `{start, end, label}` (offsets of the stored text)."""
    input_stats: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    """Cheap facts about the input for drift: text `chars`, `tokens`, `unknown_rate`; image `width`, `height`,
    `brightness` (0..1)."""
    sampled: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    """Sent to labeling by the model's sampling policy (`prediction.sampled`)."""
    true_label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    """The consensus label labeling settled for this prediction's input (`prediction.labeled`): ground truth."""
    true_label_source: Mapped[str | None] = mapped_column(String(20), nullable=True)
    labeled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    subject_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    """The partner-given data subject of the request (`:predict`'s `subject_id`): erased with the subject."""

    def input_ref(self) -> dict:
        """The input as the event catalog's ObjectRef."""
        return {
            "bucket": self.input_bucket,
            "key": self.input_key,
            "sha256": self.input_sha256,
            "offset": self.input_offset,
            "length": self.input_length,
        }


class ShadowPrediction(Base):
    """What a staged version answered for a production request it shadowed: logged, never returned."""

    __tablename__ = "shadow_predictions"
    __table_args__ = (Index("ix_shadow_tenant_model_created", "tenant", "model_name", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prediction_id: Mapped[str] = mapped_column(String(40), index=True)
    """The production prediction it shadowed (the row in `predictions`)."""
    tenant: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[int] = mapped_column(Integer)
    predicted_label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MonitorPolicy(Base):
    """One model's monitoring policy: sampling to labeling, shadow traffic, and the thresholds that trigger a
    retrain. Unset, a model is monitored with the defaults (`monitoring.DEFAULT_POLICY`)."""

    __tablename__ = "monitor_policies"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    policy: Mapped[dict] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class TenantRetention(Base):
    """How many days a tenant's prediction log is kept (default `monitoring.DEFAULT_RETENTION_DAYS`)."""

    __tablename__ = "tenant_retention"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    days: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class MonitorAlert(Base):
    """A policy threshold crossed by one version: while `active`, the same kind does not fire again."""

    __tablename__ = "monitor_alerts"
    __table_args__ = (Index("ix_alerts_tenant_model", "tenant", "model_name", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(40))
    """`prediction_drift`, `confidence_drift`, `input_drift`, `unknown_token_drift`, `accuracy_drop` or `schedule`."""
    reason: Mapped[str] = mapped_column(Text)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    samples: Mapped[int] = mapped_column(Integer)
    details: Mapped[dict] = mapped_column(JSON)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    event_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
