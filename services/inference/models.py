"""Inference's tables: the prediction log (inputs by reference, outputs, latency, version, feedback)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, DateTime, Float, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import declarative_base

Base = declarative_base()


def utcnow() -> datetime:
    return datetime.now(UTC)


class Prediction(Base):
    """One logged prediction. `input_*` is where its input sits in object storage (a byte range of a packed
    object in the `raw` bucket, under `<tenant>/predictions/`); `input_sha256` is the sha256 of those bytes."""

    __tablename__ = "predictions"
    __table_args__ = (Index("ix_predictions_tenant_model_created", "tenant", "model_name", "created_at"),)

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
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    outputs: Mapped[dict] = mapped_column(JSON)
    latency_ms: Mapped[float] = mapped_column(Float)
    trace_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    feedback_label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    feedback_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    def input_ref(self) -> dict:
        """The input as the event catalog's ObjectRef."""
        return {
            "bucket": self.input_bucket,
            "key": self.input_key,
            "sha256": self.input_sha256,
            "offset": self.input_offset,
            "length": self.input_length,
        }
